//! Integration tests: recipe parsing / writing, validation, per-tensor parameter resolution and
//! the merge planner, on seeded in-memory Llama families (no files).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use evomerge::Error;
use evomerge::candidate::MemModel;
use evomerge::merge::plan::{Plan, PlannedTensor, SourceRef, plan_with};
use evomerge::merge::{BaseUse, MergeInput, MergeMethod, ParamDecl, ParamKind, Scope};
use evomerge::recipe::Recipe;
use evomerge::store::ModelSet;
use evomerge::synth::{LlamaSpec, mem_family};
use evomerge::tensor::DType;

/// A ties-like method: base required, `weight` (required) and `density` per model, `normalize`
/// and `lambda` global.
struct TiesLike;
/// A passthrough-like method: one model, optional base, per-model `scale`.
struct Stack;

static TIES_PARAMS: &[ParamDecl] = &[
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
    ParamDecl {
        name: "lambda",
        scope: Scope::Global,
        kind: ParamKind::Float { min: 0.0, max: 2.0 },
        default: Some(1.0),
        searched: true,
        doc: "",
    },
];

static STACK_PARAMS: &[ParamDecl] = &[ParamDecl {
    name: "scale",
    scope: Scope::PerModel,
    kind: ParamKind::Float { min: 0.0, max: 2.0 },
    default: Some(1.0),
    searched: true,
    doc: "",
}];

impl MergeMethod for TiesLike {
    fn name(&self) -> &'static str {
        "ties_like"
    }
    fn params(&self) -> &'static [ParamDecl] {
        TIES_PARAMS
    }
    fn base(&self) -> BaseUse {
        BaseUse::Required
    }
    fn model_count(&self) -> (usize, Option<usize>) {
        (1, None)
    }
    fn merge(&self, _: &MergeInput<'_>) -> evomerge::Result<Vec<f32>> {
        Ok(vec![])
    }
}

impl MergeMethod for Stack {
    fn name(&self) -> &'static str {
        "stack"
    }
    fn params(&self) -> &'static [ParamDecl] {
        STACK_PARAMS
    }
    fn base(&self) -> BaseUse {
        BaseUse::Optional
    }
    fn model_count(&self) -> (usize, Option<usize>) {
        (1, Some(1))
    }
    fn merge(&self, _: &MergeInput<'_>) -> evomerge::Result<Vec<f32>> {
        Ok(vec![])
    }
}

static TIES: TiesLike = TiesLike;
static STACK: Stack = Stack;

fn spec(layers: usize) -> LlamaSpec {
    LlamaSpec {
        layers,
        ..LlamaSpec::tiny()
    }
}

/// base, ft1, ft2 of an `layers`-layer tiny Llama, registered as /mem/base, /mem/ft1, /mem/ft2.
fn family(layers: usize) -> ModelSet {
    let mut set = ModelSet::new();
    for (k, m) in mem_family(&spec(layers), 2, 7).into_iter().enumerate() {
        let name = if k == 0 {
            "/mem/base".to_string()
        } else {
            format!("/mem/ft{k}")
        };
        set.insert(name, Arc::new(m));
    }
    set
}

fn parse(text: &str) -> Recipe {
    Recipe::from_str(text, None).unwrap()
}

fn find<'a>(p: &'a Plan, name: &str) -> &'a PlannedTensor {
    p.tensors
        .iter()
        .find(|t| t.name == name)
        .unwrap_or_else(|| panic!("no planned tensor `{name}`"))
}

fn src(model: &str, tensor: &str) -> SourceRef {
    SourceRef {
        model: PathBuf::from(model),
        tensor: tensor.to_string(),
    }
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-12
}

#[test]
fn round_trip_of_a_search_style_recipe() {
    // What the search generates: one slice per layer group, filter lists per parameter.
    let mut text = String::new();
    for g in 0..4 {
        text.push_str(&format!(
            "  - sources:\n      - model: base\n        layer_range: [{a}, {b}]\n      - model: ft1\n        layer_range: [{a}, {b}]\n    parameters:\n      weight:\n        - filter: self_attn\n          value: {w}\n        - filter: mlp\n          value: [0.1, {w}]\n        - value: 0.3\n",
            a = 2 * g,
            b = 2 * g + 2,
            w = 0.25 * g as f64 + 0.125,
        ));
    }
    let text = format!(
        "slices:\n{text}merge_method: ties\nbase_model: base\nparameters:\n  density: 0.5\n  normalize: false\ndtype: float32\nout_dtype: bfloat16\n"
    );
    let dir = Path::new("/recipes");
    let r = Recipe::from_str(&text, Some(&dir.join("r.yml"))).unwrap();
    let yaml = r.to_yaml();
    assert_eq!(
        Recipe::from_str(&yaml, Some(&dir.join("r.yml"))).unwrap(),
        r
    );
    // Paths resolve against the recipe's directory, the original string is written back.
    assert!(yaml.contains("model: base\n"), "{yaml}");
    assert_eq!(r.referenced_models()[0].path, Path::new("/recipes/base"));
}

#[test]
fn unknown_key_error_names_key_and_line() {
    let text = "models:\n  - model: a\n    parameters:\n      weight: 1\nmerge_method: linear\nout_dtyp: bfloat16\n";
    let err = Recipe::from_str(text, Some(Path::new("r.yml"))).unwrap_err();
    let shown = err.to_string();
    assert!(
        matches!(err, Error::Recipe { line: Some(6), .. }),
        "{shown}"
    );
    assert!(shown.starts_with("r.yml:6: "), "{shown}");
    assert!(shown.contains("`out_dtyp`"), "{shown}");
}

#[test]
fn frankenmerge_two_slices_map_layers() {
    let mut set = family(4);
    let r = parse(
        "slices:\n  - sources:\n      - model: /mem/ft1\n        layer_range: [0, 3]\n  - sources:\n      - model: /mem/ft2\n        layer_range: [1, 4]\n        parameters:\n          scale: [0.5, 1.5]\nmerge_method: passthrough\n",
    );
    let p = plan_with(&r, &STACK, &mut set).unwrap();
    // 6 output layers × 9 tensors + embed + norm + head.
    assert_eq!(p.tensors.len(), 6 * 9 + 3);
    assert_eq!(p.config["num_hidden_layers"], 6);
    let q = |l: usize| format!("model.layers.{l}.self_attn.q_proj.weight");
    for (out, model, input) in [
        (0, "/mem/ft1", 0),
        (2, "/mem/ft1", 2),
        (3, "/mem/ft2", 1),
        (5, "/mem/ft2", 3),
    ] {
        let t = find(&p, &q(out));
        assert_eq!(t.models, vec![src(model, &q(input))], "output layer {out}");
        assert_eq!(t.base, None);
    }
    // Embeddings from the first slice, final norm and head from the last.
    assert_eq!(
        find(&p, "model.embed_tokens.weight").models,
        vec![src("/mem/ft1", "model.embed_tokens.weight")]
    );
    assert_eq!(
        find(&p, "lm_head.weight").models,
        vec![src("/mem/ft2", "lm_head.weight")]
    );
    // The gradient runs over the 3 layers of the second slice: 0.5, 1.0, 1.5; head at t = 0.
    for (out, want) in [(3, 0.5), (4, 1.0), (5, 1.5)] {
        let got = find(&p, &q(out)).model_params[0].get("scale").unwrap();
        assert!(close(got, want), "layer {out}: {got}");
    }
    assert_eq!(
        find(&p, "lm_head.weight").model_params[0]
            .get("scale")
            .unwrap(),
        0.5
    );
    // Order: pre-layer, then layers, then post-layer.
    assert_eq!(p.tensors[0].name, "model.embed_tokens.weight");
    assert_eq!(p.tensors.last().unwrap().name, "model.norm.weight");
}

#[test]
fn one_layer_slice_reads_the_end_of_a_gradient() {
    let mut set = family(4);
    let r = parse(
        "slices:\n  - sources:\n      - model: /mem/ft1\n        layer_range: [2, 3]\n        parameters:\n          scale: [0.2, 0.8]\nmerge_method: passthrough\n",
    );
    let p = plan_with(&r, &STACK, &mut set).unwrap();
    assert_eq!(p.config["num_hidden_layers"], 1);
    let t = find(&p, "model.layers.0.mlp.up_proj.weight");
    assert_eq!(
        t.models,
        vec![src("/mem/ft1", "model.layers.2.mlp.up_proj.weight")]
    );
    assert_eq!(t.model_params[0].get("scale").unwrap(), 0.8);
}

#[test]
fn precedence_source_over_slice_over_global_over_default() {
    let mut set = family(2);
    let r = parse(
        "slices:\n  - sources:\n      - model: /mem/base\n        layer_range: [0, 2]\n      - model: /mem/ft1\n        layer_range: [0, 2]\n        parameters:\n          weight: 0.9\n      - model: /mem/ft2\n        layer_range: [0, 2]\n    parameters:\n      weight: 0.4\n      lambda: 0.7\nmerge_method: ties\nbase_model: /mem/base\nparameters:\n  weight: 0.1\n  density: 0.6\n  lambda: 0.2\n",
    );
    let p = plan_with(&r, &TIES, &mut set).unwrap();
    let t = find(&p, "model.layers.1.mlp.down_proj.weight");
    // Base separate, not among the models.
    assert_eq!(
        t.base,
        Some(src("/mem/base", "model.layers.1.mlp.down_proj.weight"))
    );
    assert_eq!(t.models.len(), 2);
    let w = |k: usize| t.model_params[k].get("weight").unwrap();
    assert_eq!(w(0), 0.9); // source level
    assert_eq!(w(1), 0.4); // slice level
    assert_eq!(t.model_params[0].get("density").unwrap(), 0.6); // global level
    assert_eq!(t.global.get("lambda").unwrap(), 0.7); // slice beats global
    assert_eq!(t.global.get("normalize").unwrap(), 1.0); // declared default
}

#[test]
fn gradient_and_filters_per_layer_on_an_eight_layer_model() {
    let mut set = family(8);
    let r = parse(
        "models:\n  - model: /mem/ft1\n    parameters:\n      weight:\n        - filter: self_attn\n          value: [0, 1, 0, 2, 4]\n        - filter: mlp\n          value: 0.25\n        - value: [1, 0]\n  - model: /mem/ft2\n    parameters:\n      weight: 1\nmerge_method: ties\nbase_model: /mem/base\nparameters:\n  lambda:\n    - filter: layers.3.\n      value: 0.5\n",
    );
    let p = plan_with(&r, &TIES, &mut set).unwrap();
    // models form: ft1, ft2 merged; base appended as the base.
    assert_eq!(p.tensors.len(), 8 * 9 + 3);
    let w = |name: String| find(&p, &name).model_params[0].get("weight").unwrap();
    // self_attn: 5 anchors over 8 layers, t = i/7, s = 4t (hand-computed).
    let want = [
        0.0,
        4.0 / 7.0,
        6.0 / 7.0,
        2.0 / 7.0,
        4.0 / 7.0,
        12.0 / 7.0,
        2.0 + 6.0 / 7.0,
        4.0,
    ];
    for (i, want) in want.iter().enumerate() {
        let got = w(format!("model.layers.{i}.self_attn.k_proj.weight"));
        assert!(close(got, *want), "layer {i}: {got} vs {want}");
        assert_eq!(w(format!("model.layers.{i}.mlp.gate_proj.weight")), 0.25);
        // Catch-all gradient [1, 0] on the layer norms: 1 - i/7.
        let got = w(format!("model.layers.{i}.input_layernorm.weight"));
        assert!(close(got, 1.0 - i as f64 / 7.0), "layer {i}: {got}");
    }
    // Pre/post-layer tensors read gradients at t = 0.
    assert_eq!(w("model.norm.weight".into()), 1.0);
    assert_eq!(w("model.embed_tokens.weight".into()), 1.0);
    // Global filter: only layer 3 gets lambda 0.5, the rest fall through to the default.
    assert_eq!(
        find(&p, "model.layers.3.mlp.up_proj.weight")
            .global
            .get("lambda")
            .unwrap(),
        0.5
    );
    assert_eq!(
        find(&p, "model.layers.4.mlp.up_proj.weight")
            .global
            .get("lambda")
            .unwrap(),
        1.0
    );
    // Output config and dtype come from the base.
    assert_eq!(p.out_dtype, DType::F32);
    assert_eq!(p.config["num_hidden_layers"], 8);
    assert_eq!(p.donor.as_deref(), Some(Path::new("/mem/base")));
}

#[test]
fn model_filters_match_the_input_name_global_ones_the_output_name() {
    let mut set = family(4);
    // Output layer 0 is input layer 2 of both sources.
    let r = parse(
        "slices:\n  - sources:\n      - model: /mem/base\n        layer_range: [2, 3]\n      - model: /mem/ft1\n        layer_range: [2, 3]\n        parameters:\n          weight:\n            - filter: layers.2.\n              value: 0.8\n            - value: 0.1\nmerge_method: ties\nbase_model: /mem/base\nparameters:\n  lambda:\n    - filter: layers.0.\n      value: 0.3\n",
    );
    let p = plan_with(&r, &TIES, &mut set).unwrap();
    let t = find(&p, "model.layers.0.mlp.up_proj.weight");
    assert_eq!(t.model_params[0].get("weight").unwrap(), 0.8);
    assert_eq!(t.global.get("lambda").unwrap(), 0.3);
}

#[test]
fn required_parameter_missed_by_every_filter_names_the_tensor() {
    let mut set = family(2);
    let r = parse(
        "models:\n  - model: /mem/ft1\n    parameters:\n      weight:\n        - filter: mlp\n          value: 1\nmerge_method: ties\nbase_model: /mem/base\n",
    );
    let err = plan_with(&r, &TIES, &mut set).unwrap_err().to_string();
    assert!(
        err.contains("`weight`") && err.contains("/mem/ft1") && err.contains("tensor `"),
        "{err}"
    );
}

#[test]
fn output_dtype_donor_and_config() {
    let mut set = family(2);
    let r = parse(
        "models:\n  - model: /mem/ft1\n  - model: /mem/ft2\nmerge_method: passthrough\ndtype: float16\n",
    );
    // Stack takes one model: the count error names the method.
    let err = plan_with(&r, &STACK, &mut set).unwrap_err().to_string();
    assert!(err.contains("exactly 1 model(s), got 2"), "{err}");
    let r = parse(
        "models:\n  - model: /mem/ft2\n    parameters: {weight: 1}\nmerge_method: ties\nbase_model: /mem/base\ndtype: float16\ntokenizer_source: /mem/ft2\n",
    );
    let p = plan_with(&r, &TIES, &mut set).unwrap();
    assert_eq!(p.out_dtype, DType::F16);
    assert_eq!(p.config["torch_dtype"], "float16");
    assert_eq!(p.donor.as_deref(), Some(Path::new("/mem/ft2")));
    assert_eq!(Recipe::from_str(&p.recipe_yaml, None).unwrap(), r);
}

#[test]
fn mismatched_models_list_the_differences() {
    let mut set = family(2);
    let mut other = mem_family(
        &LlamaSpec {
            intermediate: 48,
            ..spec(2)
        },
        0,
        1,
    )
    .remove(0);
    other
        .tensors
        .remove("model.layers.1.input_layernorm.weight");
    set.insert("/mem/odd", Arc::new(other) as Arc<_>);
    let r = parse(
        "models:\n  - model: /mem/odd\n    parameters: {weight: 1}\nmerge_method: ties\nbase_model: /mem/base\n",
    );
    let err = plan_with(&r, &TIES, &mut set).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::Mismatch(_)), "{msg}");
    assert!(
        msg.contains("model.layers.0.mlp.up_proj.weight") && msg.contains("[48, 16]"),
        "{msg}"
    );
    assert!(
        msg.contains("model.layers.1.input_layernorm.weight"),
        "{msg}"
    );
}

#[test]
fn tied_head_reads_the_embedding() {
    let mut set = family(2);
    let tied = mem_family(
        &LlamaSpec {
            tie_embeddings: true,
            ..spec(2)
        },
        0,
        3,
    )
    .remove(0);
    set.insert("/mem/tied", Arc::new(tied) as Arc<_>);
    let r = parse(
        "models:\n  - model: /mem/ft1\n    parameters: {weight: 1}\n  - model: /mem/tied\n    parameters: {weight: 1}\nmerge_method: ties\nbase_model: /mem/base\n",
    );
    let p = plan_with(&r, &TIES, &mut set).unwrap();
    assert_eq!(
        find(&p, "lm_head.weight").models,
        vec![
            src("/mem/ft1", "lm_head.weight"),
            src("/mem/tied", "model.embed_tokens.weight")
        ]
    );
}

#[test]
fn optional_base_listed_among_models_stays_a_model() {
    struct Avg;
    static AVG_PARAMS: &[ParamDecl] = &[ParamDecl {
        name: "weight",
        scope: Scope::PerModel,
        kind: ParamKind::Float {
            min: -1.0,
            max: 2.0,
        },
        default: None,
        searched: true,
        doc: "",
    }];
    impl MergeMethod for Avg {
        fn name(&self) -> &'static str {
            "avg"
        }
        fn params(&self) -> &'static [ParamDecl] {
            AVG_PARAMS
        }
        fn base(&self) -> BaseUse {
            BaseUse::Optional
        }
        fn model_count(&self) -> (usize, Option<usize>) {
            (1, None)
        }
        fn merge(&self, _: &MergeInput<'_>) -> evomerge::Result<Vec<f32>> {
            Ok(vec![])
        }
    }
    static AVG: Avg = Avg;
    let mut set = family(2);
    let r = parse(
        "models:\n  - model: /mem/base\n    parameters: {weight: 0.3}\n  - model: /mem/ft1\n    parameters: {weight: 0.7}\nmerge_method: linear\nbase_model: /mem/base\n",
    );
    let p = plan_with(&r, &AVG, &mut set).unwrap();
    let t = find(&p, "model.norm.weight");
    assert_eq!(t.models.len(), 2);
    assert_eq!(t.model_params[0].get("weight").unwrap(), 0.3);
    assert_eq!(t.base, Some(src("/mem/base", "model.norm.weight")));
    // Registered models are reused, not reopened: planning twice gives the same plan.
    let again = plan_with(&r, &AVG, &mut set).unwrap();
    assert_eq!(again.tensors, p.tensors);
}

#[test]
fn mem_model_type_is_usable_directly() {
    // A MemModel built by hand (not from synth) plans too.
    let base = mem_family(&spec(1), 0, 9).remove(0);
    let hand = MemModel {
        config: base.config.clone(),
        tensors: base.tensors.clone(),
    };
    let mut set = ModelSet::new();
    set.insert("/mem/hand", Arc::new(hand) as Arc<_>);
    let r = parse(
        "slices:\n  - sources:\n      - model: /mem/hand\n        layer_range: [0, 1]\n  - sources:\n      - model: /mem/hand\n        layer_range: [0, 1]\nmerge_method: passthrough\n",
    );
    let p = plan_with(&r, &STACK, &mut set).unwrap();
    assert_eq!(p.config["num_hidden_layers"], 2);
    assert_eq!(
        find(&p, "model.layers.1.mlp.up_proj.weight").models,
        vec![src("/mem/hand", "model.layers.0.mlp.up_proj.weight")]
    );
}

#[test]
fn mergekit_slerp_example_through_the_registry() {
    // mergekit's README slerp recipe, planned with the registered `slerp`.
    let mut set = family(8);
    let r = parse(
        "slices:\n  - sources:\n      - model: /mem/ft1\n        layer_range: [0, 8]\n      - model: /mem/ft2\n        layer_range: [0, 8]\nmerge_method: slerp\nbase_model: /mem/ft1\nparameters:\n  t:\n    - filter: self_attn\n      value: [0, 0.5, 0.3, 0.7, 1]\n    - filter: mlp\n      value: [1, 0.5, 0.7, 0.3, 0]\n    - value: 0.5\ndtype: bfloat16\n",
    );
    let p = evomerge::merge::plan::plan(&r, &mut set).unwrap();
    assert_eq!(p.method.name(), "slerp");
    assert_eq!(p.out_dtype, DType::BF16);
    let t = |name: &str| find(&p, name).global.get("t").unwrap();
    assert_eq!(t("model.layers.0.self_attn.q_proj.weight"), 0.0);
    assert_eq!(t("model.layers.7.self_attn.q_proj.weight"), 1.0);
    assert_eq!(t("model.layers.7.mlp.up_proj.weight"), 0.0);
    // Layer 2: s = 4·2/7 = 8/7, between anchors 0.5 and 0.3 at 1/7.
    assert!(close(
        t("model.layers.2.self_attn.o_proj.weight"),
        0.5 * (6.0 / 7.0) + 0.3 / 7.0
    ));
    assert_eq!(t("model.layers.4.input_layernorm.weight"), 0.5);
    assert_eq!(t("model.embed_tokens.weight"), 0.5);
    let q = find(&p, "model.layers.3.self_attn.q_proj.weight");
    assert_eq!(
        q.base,
        Some(src("/mem/ft1", "model.layers.3.self_attn.q_proj.weight"))
    );
    assert_eq!(
        q.models,
        vec![src("/mem/ft2", "model.layers.3.self_attn.q_proj.weight")]
    );
    // An unknown method names the known ones.
    let bad = parse("models:\n  - model: /mem/ft1\nmerge_method: tiez\n");
    let err = evomerge::merge::plan::plan(&bad, &mut set)
        .unwrap_err()
        .to_string();
    assert!(err.contains("`tiez`") && err.contains("ties"), "{err}");
}

/// Compare our plan of `tests/golden/plan/<case>/recipe.yml` with mergekit 0.1.5's (`plan.json`,
/// made by `tests/golden/plan/make_plan_golden.py`): the same output tensors, the same input
/// models and input tensor names, the same base, and the same resolved parameters.
fn check_against_mergekit(case: &str) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden/plan")
        .join(case);
    let recipe = Recipe::from_path(dir.join("recipe.yml")).unwrap();
    let mut set = ModelSet::new();
    let p = evomerge::merge::plan::plan(&recipe, &mut set).unwrap();
    let golden: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("plan.json")).unwrap()).unwrap();
    assert_eq!(
        p.config["num_hidden_layers"], golden["num_hidden_layers"],
        "{case}: layer count"
    );
    let want = golden["tensors"].as_array().unwrap();
    assert_eq!(p.tensors.len(), want.len(), "{case}: tensor count");
    let short = |s: &SourceRef| {
        serde_json::json!([
            s.model.file_name().unwrap().to_str().unwrap(),
            s.tensor.as_str()
        ])
    };
    let same_params = |ours: &evomerge::merge::Params, theirs: &serde_json::Value, what: &str| {
        for (k, v) in theirs.as_object().unwrap() {
            // mergekit's passthrough `scale` defaults to None (= no scaling), ours to 1.0.
            let Some(v) = v.as_f64() else { continue };
            let got = ours.get(k).unwrap();
            assert!(
                (got - v).abs() < 1e-12,
                "{case}: {what}: `{k}` = {got}, mergekit {v}"
            );
        }
    };
    for w in want {
        let name = w["name"].as_str().unwrap();
        let t = find(&p, name);
        let base = t
            .base
            .as_ref()
            .map(short)
            .unwrap_or(serde_json::Value::Null);
        assert_eq!(base, w["base"], "{case}: base of {name}");
        let models: Vec<_> = t.models.iter().map(short).collect();
        assert_eq!(
            serde_json::Value::from(models),
            w["models"],
            "{case}: models of {name}"
        );
        same_params(&t.global, &w["global"], name);
        for (k, mp) in w["model_params"].as_array().unwrap().iter().enumerate() {
            same_params(&t.model_params[k], mp, &format!("{name} model {k}"));
        }
    }
}

#[test]
fn ties_slices_resolve_as_mergekit() {
    check_against_mergekit("ties_slices");
}

#[test]
fn passthrough_stack_plans_as_mergekit() {
    check_against_mergekit("passthrough_stack");
}
