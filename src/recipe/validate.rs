//! Checks of a recipe against its merge method's declarations, before any model is opened.
//!
//! What is checked, and how it relates to mergekit 0.1.5:
//! - the method exists;
//! - every parameter name is one the method declares (mergekit silently ignores unknown names;
//!   a typo there is an error here);
//! - a global parameter (e.g. `normalize`) set on a model or slice source is an error (mergekit
//!   silently ignores it there). A per-model parameter (e.g. `weight`) may be set at slice or
//!   global level, where it is the default for every model, as in mergekit;
//! - flags get `true` / `false` (or 0 / 1), numbers get numbers or gradients;
//! - required parameters are set at some level for every model that needs them (filters that
//!   miss a tensor are caught per tensor by the planner);
//! - each slice's sources span the same number of layers, name no model twice, and number
//!   between the method's minimum and maximum (the base model is not counted when the method
//!   requires one; for methods that merely accept one, a base listed among the models counts);
//! - a method that requires a base model gets one, and in `slices` form each slice lists it
//!   among its sources (as mergekit requires); `tokenizer_source: base` needs a base model.
//!
//! Value ranges are not enforced: the declared ranges bound the search, and mergekit accepts
//! any value (e.g. a negative task-arithmetic weight). The exception is `density`, a fraction:
//! outside `[0, 1]` it is an error (mergekit silently clamps it). Every value is finite (checked
//! while the YAML is read, [`super::params`]).

use super::{Inputs, ModelRef, ParamMap, ParamSetting, Recipe, TokenizerSource, Value};
use crate::error::Result;
use crate::merge::{BaseUse, MergeMethod, ParamDecl, ParamKind, Scope};

/// One group of inputs merged together, with how to name it in messages.
struct Group<'a> {
    label: String,
    /// Every listed input (models, or slice sources), with its own parameters.
    inputs: Vec<(&'a ModelRef, &'a ParamMap)>,
    /// Slice-level parameters (empty for the `models` form).
    slice_params: Option<&'a ParamMap>,
    base: Option<&'a ModelRef>,
}

impl Recipe {
    /// The recipe's merge method from the registry ([`crate::merge::method`]), or a recipe
    /// error naming the unknown key and the known ones.
    pub fn method(&self) -> Result<&'static dyn MergeMethod> {
        crate::merge::method(&self.merge_method).map_err(|e| self.error(e.to_string()))
    }

    /// Check the recipe against `method`'s declarations (the list is in
    /// [`crate::recipe::validate`]). Errors name the parameter / model and where it is set.
    pub fn validate(&self, method: &dyn MergeMethod) -> Result<()> {
        let mname = method.name();
        let decls = method.params();
        let find = |name: &str| decls.iter().find(|d| d.name == name);

        // Parameter names, scopes and kinds at every level.
        let check_level = |map: &ParamMap, at: &str, model_level: bool| -> Result<()> {
            for (name, setting) in map {
                let Some(decl) = find(name) else {
                    let known: Vec<_> = decls.iter().map(|d| d.name).collect();
                    return Err(self.error(format!(
                        "{at}: `{name}` is not a parameter of `{mname}` (its parameters: {})",
                        if known.is_empty() {
                            "none".to_string()
                        } else {
                            known.join(", ")
                        }
                    )));
                };
                if model_level && decl.scope == Scope::Global {
                    return Err(self.error(format!(
                        "{at}: `{name}` is a global parameter of `{mname}`; set it in the \
                         top-level or slice `parameters`, not on a model"
                    )));
                }
                check_kind(decl, setting).map_err(|m| self.error(format!("{at}: `{name}` {m}")))?;
            }
            Ok(())
        };
        check_level(&self.parameters, "parameters", false)?;

        let groups = self.groups();
        for g in &groups {
            if let Some(sp) = g.slice_params {
                check_level(sp, &format!("{}.parameters", g.label), false)?;
            }
            for (m, p) in &g.inputs {
                check_level(p, &format!("{}: model `{m}`", g.label), true)?;
            }
        }

        // Structure: duplicates, base, counts, layer spans.
        if method.base() == BaseUse::Required && groups.iter().any(|g| g.base.is_none()) {
            return Err(self.error(format!("merge method `{mname}` needs a `base_model`")));
        }
        if let Inputs::Slices(slices) = &self.inputs {
            for (i, s) in slices.iter().enumerate() {
                let n0 = s.sources[0].layer_range.1 - s.sources[0].layer_range.0;
                for (j, src) in s.sources.iter().enumerate() {
                    let n = src.layer_range.1 - src.layer_range.0;
                    if n != n0 {
                        return Err(self.error(format!(
                            "slices[{i}].sources[{j}] (model `{}`) spans {n} layers but \
                             sources[0] spans {n0}: all sources of a slice need the same count",
                            src.model
                        )));
                    }
                }
            }
        }
        let (min, max) = method.model_count();
        for g in &groups {
            for (k, (m, _)) in g.inputs.iter().enumerate() {
                if g.inputs[..k].iter().any(|(o, _)| o.path == m.path) {
                    return Err(self.error(format!("{}: model `{m}` is listed twice", g.label)));
                }
            }
            if method.base() == BaseUse::Required
                && let (Inputs::Slices(_), Some(b)) = (&self.inputs, g.base)
                && !g.inputs.iter().any(|(m, _)| m.path == b.path)
            {
                return Err(self.error(format!(
                    "{}: base model `{b}` is not among the slice's sources (merge method \
                     `{mname}` needs it in every slice)",
                    g.label
                )));
            }
            let merged = self.merged_models(g, method);
            let count = merged.len();
            let bad = count < min || max.is_some_and(|mx| count > mx);
            if bad {
                let want = match max {
                    Some(mx) if mx == min => format!("exactly {min}"),
                    Some(mx) => format!("{min} to {mx}"),
                    None => format!("at least {min}"),
                };
                let besides = if method.base() == BaseUse::Required {
                    " besides the base model"
                } else {
                    ""
                };
                return Err(self.error(format!(
                    "{}: merge method `{mname}` takes {want} model(s){besides}, got {count}",
                    g.label
                )));
            }

            // Required parameters.
            for decl in decls.iter().filter(|d| d.default.is_none()) {
                let set_in = |p: Option<&ParamMap>| p.is_some_and(|p| p.contains_key(decl.name));
                let shared = set_in(g.slice_params) || set_in(Some(&self.parameters));
                match decl.scope {
                    Scope::Global if !shared => {
                        return Err(self.error(format!(
                            "{}: required parameter `{}` of `{mname}` is not set",
                            g.label, decl.name
                        )));
                    }
                    Scope::PerModel if !shared => {
                        for m in &merged {
                            let own = g
                                .inputs
                                .iter()
                                .any(|(o, p)| o.path == m.path && p.contains_key(decl.name));
                            if !own {
                                return Err(self.error(format!(
                                    "{}: required parameter `{}` of `{mname}` is not set for \
                                     model `{m}`",
                                    g.label, decl.name
                                )));
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
        if self.tokenizer_source == Some(TokenizerSource::Base) && self.base_model.is_none() {
            return Err(self.error("`tokenizer_source: base` needs a `base_model`"));
        }
        Ok(())
    }

    /// The groups of inputs merged together: one for `models`, one per slice.
    fn groups(&self) -> Vec<Group<'_>> {
        match &self.inputs {
            Inputs::Models(ms) => vec![Group {
                label: "models".into(),
                inputs: ms.iter().map(|m| (&m.model, &m.parameters)).collect(),
                slice_params: None,
                base: self.base_model.as_ref(),
            }],
            Inputs::Slices(ss) => ss
                .iter()
                .enumerate()
                .map(|(i, s)| Group {
                    label: format!("slices[{i}]"),
                    inputs: s
                        .sources
                        .iter()
                        .map(|x| (&x.model, &x.parameters))
                        .collect(),
                    slice_params: Some(&s.parameters),
                    base: s.base_model.as_ref().or(self.base_model.as_ref()),
                })
                .collect(),
        }
    }

    /// The models a method receives in [`crate::merge::MergeInput::models`] for a group.
    fn merged_models<'a>(&self, g: &Group<'a>, method: &dyn MergeMethod) -> Vec<&'a ModelRef> {
        g.inputs
            .iter()
            .map(|(m, _)| *m)
            .filter(|m| {
                method.base().listed_base_is_a_model() || g.base.is_none_or(|b| b.path != m.path)
            })
            .collect()
    }
}

/// Parameters whose value is a fraction by definition: a value outside `[0, 1]` (a scalar or any
/// gradient anchor; a gradient never leaves its anchors' range) is refused. mergekit clamps it.
const FRACTIONS: &[&str] = &["density"];

/// Whether `setting` fits the parameter's kind; the message completes "`name` ...".
fn check_kind(decl: &ParamDecl, setting: &ParamSetting) -> std::result::Result<(), String> {
    if FRACTIONS.contains(&decl.name) {
        for v in setting.values() {
            let anchors = match v {
                Value::Number(x) => std::slice::from_ref(x),
                Value::Gradient(g) => g.as_slice(),
                Value::Bool(_) => &[],
            };
            if let Some(x) = anchors.iter().find(|x| !(0.0..=1.0).contains(*x)) {
                return Err(format!(
                    "must lie in [0, 1], got {x} (mergekit clamps it into the range; evomerge \
                     refuses it)"
                ));
            }
        }
    }
    for v in setting.values() {
        match (decl.kind, v) {
            (ParamKind::Bool, Value::Bool(_)) => {}
            (ParamKind::Bool, Value::Number(x)) if *x == 0.0 || *x == 1.0 => {}
            (ParamKind::Bool, other) => {
                return Err(format!("is a flag (true / false), got {}", describe(other)));
            }
            (ParamKind::Float { .. }, Value::Bool(b)) => {
                return Err(format!("is a number, got `{b}`"));
            }
            (ParamKind::Float { .. }, Value::Gradient(g)) if g.is_empty() => {
                return Err("has an empty gradient list".into());
            }
            (ParamKind::Float { .. }, _) => {}
        }
    }
    if let ParamSetting::Filtered(c) = setting
        && c.is_empty()
    {
        return Err("has an empty filter list".into());
    }
    Ok(())
}

fn describe(v: &Value) -> String {
    match v {
        Value::Number(x) => format!("the number {x}"),
        Value::Bool(b) => format!("`{b}`"),
        Value::Gradient(_) => "a gradient list".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Error;
    use crate::merge::MergeInput;

    /// A ties-like fake: base required, `weight` required per model, `density` per model,
    /// `normalize` global flag.
    struct Fake {
        base: BaseUse,
        count: (usize, Option<usize>),
    }

    static PARAMS: &[ParamDecl] = &[
        ParamDecl {
            name: "weight",
            scope: Scope::PerModel,
            kind: ParamKind::Float {
                min: -1.0,
                max: 2.0,
            },
            default: None,
            searched: true,
            doc: "",
        },
        ParamDecl {
            name: "density",
            scope: Scope::PerModel,
            kind: ParamKind::Float { min: 0.0, max: 1.0 },
            default: Some(1.0),
            searched: true,
            doc: "",
        },
        ParamDecl {
            name: "normalize",
            scope: Scope::Global,
            kind: ParamKind::Bool,
            default: Some(1.0),
            searched: true,
            doc: "",
        },
    ];

    impl MergeMethod for Fake {
        fn name(&self) -> &'static str {
            "fake"
        }
        fn params(&self) -> &'static [ParamDecl] {
            PARAMS
        }
        fn base(&self) -> BaseUse {
            self.base
        }
        fn model_count(&self) -> (usize, Option<usize>) {
            self.count
        }
        fn merge(&self, _: &MergeInput<'_>) -> Result<Vec<f32>> {
            Ok(vec![])
        }
    }

    const TIES: Fake = Fake {
        base: BaseUse::Required,
        count: (1, None),
    };

    fn err(text: &str, m: &Fake) -> String {
        let r = Recipe::from_str(text, None).unwrap();
        match r.validate(m) {
            Err(Error::Recipe { msg, .. }) => msg,
            other => panic!("expected an error, got {other:?}"),
        }
    }

    fn ok(text: &str, m: &Fake) {
        Recipe::from_str(text, None).unwrap().validate(m).unwrap();
    }

    #[test]
    fn accepts_per_model_params_at_global_level() {
        ok(
            "models:\n  - model: a\n  - model: b\nbase_model: base\nmerge_method: fake\nparameters:\n  weight: 0.5\n  normalize: false\n",
            &TIES,
        );
        // The base model needs no per-model parameters.
        ok(
            "models:\n  - model: base\n  - model: a\n    parameters: {weight: 1}\nbase_model: base\nmerge_method: fake\n",
            &TIES,
        );
    }

    #[test]
    fn names_unknown_and_misplaced_parameters() {
        let m = err(
            "models:\n  - model: a\n    parameters: {weight: 1, densty: 0.5}\nbase_model: b\nmerge_method: fake\n",
            &TIES,
        );
        assert!(m.contains("`densty`") && m.contains("model `a`"), "{m}");
        let m = err(
            "models:\n  - model: a\n    parameters: {weight: 1, normalize: true}\nbase_model: b\nmerge_method: fake\n",
            &TIES,
        );
        assert!(m.contains("`normalize` is a global parameter"), "{m}");
        let m = err(
            "models:\n  - model: a\n    parameters: {weight: 1}\nbase_model: b\nmerge_method: fake\nparameters:\n  normalize: [0, 1]\n",
            &TIES,
        );
        assert!(m.contains("`normalize` is a flag"), "{m}");
        let m = err(
            "models:\n  - model: a\n    parameters: {weight: true}\nbase_model: b\nmerge_method: fake\n",
            &TIES,
        );
        assert!(m.contains("`weight` is a number"), "{m}");
    }

    /// Issue 13: density outside [0, 1] was silently clamped (as mergekit does); it is refused,
    /// naming the parameter and where it is set. Weights and lambdas must be finite.
    #[test]
    fn density_outside_0_1_is_an_error() {
        let m = err(
            "models:\n  - model: a\n    parameters: {weight: 1, density: 1.7}\nbase_model: b\nmerge_method: fake\n",
            &TIES,
        );
        assert_eq!(
            m,
            "models: model `a`: `density` must lie in [0, 1], got 1.7 (mergekit clamps it into \
             the range; evomerge refuses it)"
        );
        let m = err(
            "models:\n  - model: a\nbase_model: b\nmerge_method: fake\nparameters:\n  weight: 1\n  density: -0.5\n",
            &TIES,
        );
        assert!(
            m.starts_with("parameters: `density` must lie in [0, 1], got -0.5"),
            "{m}"
        );
        // A gradient anchor or a filtered value out of range, in a slice.
        let m = err(
            "slices:\n  - sources:\n      - model: a\n        layer_range: [0, 2]\n      - model: b\n        layer_range: [0, 2]\n    parameters:\n      density: [0.5, 1.2]\nbase_model: b\nmerge_method: fake\nparameters: {weight: 1}\n",
            &TIES,
        );
        assert!(
            m.starts_with("slices[0].parameters: `density` must lie in [0, 1], got 1.2"),
            "{m}"
        );
        let m = err(
            "models:\n  - model: a\n    parameters:\n      weight: 1\n      density:\n        - {filter: mlp, value: 2}\n        - {value: 0.5}\nbase_model: b\nmerge_method: fake\n",
            &TIES,
        );
        assert!(
            m.contains("model `a`: `density` must lie in [0, 1], got 2"),
            "{m}"
        );
        // The bounds themselves are fine.
        ok(
            "models:\n  - model: a\n    parameters: {weight: 1, density: [0, 1]}\nbase_model: b\nmerge_method: fake\n",
            &TIES,
        );
        // Non-finite weights / lambdas are refused while the YAML is read, with the line.
        for v in [".inf", "-.inf", ".nan", "1e400"] {
            let text = format!(
                "models:\n  - model: a\n    parameters:\n      weight: {v}\nbase_model: b\nmerge_method: fake\n"
            );
            match Recipe::from_str(&text, None) {
                Err(Error::Recipe { line, msg, .. }) => {
                    assert_eq!(line, Some(4), "{v}: {msg}");
                    // 1e400 overflows f64: yaml_serde hands it over as a string, refused too
                    let want = if v == "1e400" {
                        "found the string `1e400`"
                    } else {
                        "parameter values must be finite"
                    };
                    assert!(msg.contains(want), "{v}: {msg}");
                }
                other => panic!("{v}: expected an error, got {other:?}"),
            }
        }
    }

    #[test]
    fn required_parameter_missing_names_the_model() {
        let m = err(
            "models:\n  - model: a\n    parameters: {weight: 1}\n  - model: c\nbase_model: b\nmerge_method: fake\n",
            &TIES,
        );
        assert!(m.contains("`weight`") && m.contains("model `c`"), "{m}");
    }

    #[test]
    fn base_and_counts() {
        let m = err(
            "models:\n  - model: a\n    parameters: {weight: 1}\nmerge_method: fake\n",
            &TIES,
        );
        assert!(m.contains("needs a `base_model`"), "{m}");
        let slerp = Fake {
            base: BaseUse::Required,
            count: (1, Some(1)),
        };
        let m = err(
            "models:\n  - model: a\n  - model: c\n  - model: b\nbase_model: b\nmerge_method: fake\nparameters: {weight: 1}\n",
            &slerp,
        );
        assert!(
            m.contains("exactly 1 model(s) besides the base model, got 2"),
            "{m}"
        );
        // Slices: the base must be among each slice's sources.
        let m = err(
            "slices:\n  - sources:\n      - model: a\n        layer_range: [0, 2]\nbase_model: b\nmerge_method: fake\nparameters: {weight: 1}\n",
            &TIES,
        );
        assert!(m.contains("base model `b` is not among"), "{m}");
        let m = err(
            "slices:\n  - sources:\n      - model: a\n        layer_range: [0, 2]\n      - model: b\n        layer_range: [0, 3]\nbase_model: b\nmerge_method: fake\nparameters: {weight: 1}\n",
            &TIES,
        );
        assert!(m.contains("spans 3 layers"), "{m}");
        // Optional base: a base listed among the models counts as a model.
        let linear = Fake {
            base: BaseUse::Optional,
            count: (1, Some(2)),
        };
        ok(
            "models:\n  - model: a\n  - model: b\nbase_model: b\nmerge_method: fake\nparameters: {weight: 1}\n",
            &linear,
        );
        let m = err(
            "models:\n  - model: a\n  - model: b\n  - model: a\nmerge_method: fake\nparameters: {weight: 1}\n",
            &linear,
        );
        assert!(m.contains("listed twice"), "{m}");
    }
}
