//! Parameter settings as a recipe writes them, and their resolution for one tensor.
//!
//! A setting is a scalar (`0.5`, `true`), a gradient (`[0, 0.5, 1]`, read piecewise-linearly
//! over the layers of a slice), or a list of `{filter, value}` entries (the first entry whose
//! `filter` is a substring of the tensor name wins; no filter, or `"*"`, matches every tensor).
//! A single `{filter, value}` map is accepted as a one-entry list, as mergekit does.
//!
//! [`resolve`] applies mergekit 0.1.5's precedence: settings are tried from the most specific
//! (slice source) to the least (global `parameters`); a filtered setting whose filters all miss
//! falls through to the next level. The caller fills the method's declared default last.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};

/// Parameters by name, at one level of a recipe (global, slice, or source / model).
pub type ParamMap = BTreeMap<String, ParamSetting>;

/// A scalar or a gradient: what a parameter, or one `{filter, value}` entry, holds.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// A number.
    Number(f64),
    /// A flag (`true` / `false`); resolves to `1.0` / `0.0`.
    Bool(bool),
    /// Anchors interpolated piecewise-linearly over the layers of a slice.
    Gradient(Vec<f64>),
}

/// One `{filter, value}` entry of a filtered setting.
#[derive(Clone, Debug, PartialEq)]
pub struct Conditional {
    /// Substring of the tensor name; `None` (or `"*"`) matches every tensor.
    pub filter: Option<String>,
    pub value: Value,
}

/// A parameter's setting at one level of a recipe.
#[derive(Clone, Debug, PartialEq)]
pub enum ParamSetting {
    /// The same scalar or gradient for every tensor.
    Value(Value),
    /// Per-tensor values chosen by name; the first matching entry wins.
    Filtered(Vec<Conditional>),
}

impl ParamSetting {
    /// A scalar number.
    pub fn number(v: f64) -> Self {
        ParamSetting::Value(Value::Number(v))
    }

    /// A flag.
    pub fn flag(v: bool) -> Self {
        ParamSetting::Value(Value::Bool(v))
    }

    /// A gradient over the layers of a slice.
    pub fn gradient(anchors: Vec<f64>) -> Self {
        ParamSetting::Value(Value::Gradient(anchors))
    }

    /// A filtered list from `(filter, value)` pairs (`None` = catch-all).
    pub fn filtered(entries: Vec<(Option<String>, Value)>) -> Self {
        ParamSetting::Filtered(
            entries
                .into_iter()
                .map(|(filter, value)| Conditional { filter, value })
                .collect(),
        )
    }

    /// The value for `tensor` at gradient position `t` (in `[0, 1]`); `None` when every filter
    /// misses (or the list is empty), so that a lower level of the recipe is consulted.
    pub fn evaluate(&self, tensor: &str, t: f64) -> Option<f64> {
        match self {
            ParamSetting::Value(v) => v.evaluate(t),
            ParamSetting::Filtered(entries) => entries
                .iter()
                .find(|c| match c.filter.as_deref() {
                    None | Some("*") => true,
                    Some(f) => !tensor.is_empty() && tensor.contains(f),
                })
                .and_then(|c| c.value.evaluate(t)),
        }
    }

    /// Every value this setting holds (scalars, gradient anchors), for range checks.
    pub(crate) fn values(&self) -> Vec<&Value> {
        match self {
            ParamSetting::Value(v) => vec![v],
            ParamSetting::Filtered(entries) => entries.iter().map(|c| &c.value).collect(),
        }
    }
}

impl Value {
    /// The value at gradient position `t`: a scalar as is; a gradient of `k` anchors read at
    /// `s = t·(k−1)`, between anchors `⌊s⌋` and `⌊s⌋+1` (mergekit's `evaluate_setting`).
    /// An empty gradient gives `None`.
    pub fn evaluate(&self, t: f64) -> Option<f64> {
        match self {
            Value::Number(v) => Some(*v),
            Value::Bool(b) => Some(if *b { 1.0 } else { 0.0 }),
            Value::Gradient(anchors) => interpolate(anchors, t),
        }
    }
}

/// Piecewise-linear read of `anchors` at `t ∈ [0, 1]`, exactly as mergekit computes it.
pub fn interpolate(anchors: &[f64], t: f64) -> Option<f64> {
    let k = anchors.len();
    if k == 0 {
        return None;
    }
    let scaled = t * (k - 1) as f64;
    let i0 = (scaled as usize).min(k - 1);
    let i1 = (i0 + 1).min(k - 1);
    let frac = scaled - i0 as f64;
    Some((1.0 - frac) * anchors[i0] + frac * anchors[i1])
}

/// The gradient position of layer `index` of an `n`-layer slice: `index / (n − 1)`, and `1.0`
/// for a one-layer slice (mergekit's `plan_slice`). Pre- and post-layer tensors use `t = 0`.
pub fn layer_t(index: usize, n: usize) -> f64 {
    if n > 1 {
        index as f64 / (n - 1) as f64
    } else {
        1.0
    }
}

/// Resolve parameter `name` for `tensor` at position `t` from `levels`, most specific first.
/// `None` when no level sets it (the caller then uses the method's default).
pub fn resolve(name: &str, levels: &[&ParamMap], tensor: &str, t: f64) -> Option<f64> {
    levels
        .iter()
        .filter_map(|level| level.get(name))
        .find_map(|setting| setting.evaluate(tensor, t))
}

// ---------------------------------------------------------------------------------------------
// Deserialization: hand-written visitors, so every error keeps yaml_serde's line and key path.

/// One element of a YAML list under a parameter: a number, a flag, or a `{filter, value}` map.
enum Element {
    Number(f64),
    Bool,
    Cond(Conditional),
}

fn number_from_str<E: de::Error>(s: &str) -> Result<f64, E> {
    // mergekit (pydantic) accepts quoted numbers such as "1e-3" for numeric parameters.
    match s.trim().parse::<f64>() {
        Ok(v) if v.is_finite() => Ok(v),
        _ => Err(E::custom(format!(
            "expected a number, a flag, a gradient list or a list of {{filter, value}}, \
             found the string `{s}`"
        ))),
    }
}

fn finite<E: de::Error>(v: f64) -> Result<f64, E> {
    if v.is_finite() {
        Ok(v)
    } else {
        Err(E::custom(format!(
            "parameter values must be finite, found {v}"
        )))
    }
}

struct ElementVisitor;

impl<'de> Visitor<'de> for ElementVisitor {
    type Value = Element;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a number, a flag or a {filter, value} map")
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Element, E> {
        Ok(Element::Number(finite(v)?))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Element, E> {
        Ok(Element::Number(v as f64))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Element, E> {
        Ok(Element::Number(v as f64))
    }
    fn visit_bool<E: de::Error>(self, _v: bool) -> Result<Element, E> {
        Ok(Element::Bool)
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Element, E> {
        Ok(Element::Number(number_from_str(v)?))
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Element, A::Error> {
        Ok(Element::Cond(ConditionalVisitor.visit_map(map)?))
    }
}

impl<'de> Deserialize<'de> for Element {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ElementVisitor)
    }
}

struct ConditionalVisitor;

impl<'de> Visitor<'de> for ConditionalVisitor {
    type Value = Conditional;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a {filter, value} map")
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Conditional, A::Error> {
        // A derived struct, so that an unknown key fails while the key is read and yaml_serde
        // reports that key's own line.
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Raw {
            #[serde(default)]
            filter: Option<String>,
            value: Value,
        }
        let raw = Raw::deserialize(de::value::MapAccessDeserializer::new(map))?;
        Ok(Conditional {
            filter: raw.filter,
            value: raw.value,
        })
    }
}

struct ValueVisitor;

impl<'de> Visitor<'de> for ValueVisitor {
    type Value = Value;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a number, a flag or a gradient list of numbers")
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        Ok(Value::Number(finite(v)?))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Number(v as f64))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Number(v as f64))
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Value, E> {
        Ok(Value::Number(number_from_str(v)?))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut anchors = Vec::new();
        while let Some(e) = seq.next_element::<Element>()? {
            match e {
                Element::Number(v) => anchors.push(v),
                Element::Bool => {
                    return Err(de::Error::custom("gradient anchors must be numbers"));
                }
                Element::Cond(_) => {
                    return Err(de::Error::custom(
                        "a `value` must be a scalar or a gradient, not a {filter, value} map",
                    ));
                }
            }
        }
        Ok(Value::Gradient(anchors))
    }
}

impl<'de> Deserialize<'de> for Value {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ValueVisitor)
    }
}

struct SettingVisitor;

impl<'de> Visitor<'de> for SettingVisitor {
    type Value = ParamSetting;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a number, a flag, a gradient list or a list of {filter, value}")
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<ParamSetting, E> {
        ValueVisitor.visit_f64(v).map(ParamSetting::Value)
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<ParamSetting, E> {
        ValueVisitor.visit_i64(v).map(ParamSetting::Value)
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<ParamSetting, E> {
        ValueVisitor.visit_u64(v).map(ParamSetting::Value)
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<ParamSetting, E> {
        ValueVisitor.visit_bool(v).map(ParamSetting::Value)
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<ParamSetting, E> {
        ValueVisitor.visit_str(v).map(ParamSetting::Value)
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<ParamSetting, A::Error> {
        Ok(ParamSetting::Filtered(vec![
            ConditionalVisitor.visit_map(map)?,
        ]))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<ParamSetting, A::Error> {
        let mut anchors = Vec::new();
        let mut conds = Vec::new();
        while let Some(e) = seq.next_element::<Element>()? {
            match e {
                Element::Number(v) => anchors.push(v),
                Element::Bool => {
                    return Err(de::Error::custom("gradient anchors must be numbers"));
                }
                Element::Cond(c) => conds.push(c),
            }
            if !anchors.is_empty() && !conds.is_empty() {
                return Err(de::Error::custom(
                    "a parameter list holds either numbers (a gradient) or {filter, value} \
                     entries, not both",
                ));
            }
        }
        Ok(if conds.is_empty() {
            ParamSetting::Value(Value::Gradient(anchors))
        } else {
            ParamSetting::Filtered(conds)
        })
    }
}

impl<'de> Deserialize<'de> for ParamSetting {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(SettingVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, ParamSetting)]) -> ParamMap {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect()
    }

    #[test]
    fn layer_t_matches_mergekit() {
        assert_eq!(layer_t(0, 8), 0.0);
        assert_eq!(layer_t(7, 8), 1.0);
        assert_eq!(layer_t(3, 7), 0.5);
        // A one-layer slice reads the end of the gradient.
        assert_eq!(layer_t(0, 1), 1.0);
    }

    #[test]
    fn five_anchor_gradient_over_eight_layers() {
        // t = i/7, s = 4t. Anchors 0, 1, 0, 2, 4.
        let g = [0.0, 1.0, 0.0, 2.0, 4.0];
        let got: Vec<f64> = (0..8)
            .map(|i| interpolate(&g, layer_t(i, 8)).unwrap())
            .collect();
        // s = 0, 4/7, 8/7, 12/7, 16/7, 20/7, 24/7, 4
        let want = [
            0.0,
            4.0 / 7.0,               // between 0 and 1
            1.0 - 1.0 / 7.0,         // s=8/7: 1 -> 0, frac 1/7
            1.0 - 5.0 / 7.0,         // s=12/7: 1 -> 0, frac 5/7
            2.0 * (2.0 / 7.0),       // s=16/7: 0 -> 2, frac 2/7
            2.0 * (6.0 / 7.0),       // s=20/7: 0 -> 2, frac 6/7
            2.0 + 2.0 * (3.0 / 7.0), // s=24/7: 2 -> 4, frac 3/7
            4.0,
        ];
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!((g - w).abs() < 1e-12, "layer {i}: {g} vs {w}");
        }
    }

    #[test]
    fn filters_first_match_wins_and_catch_all() {
        let s = ParamSetting::filtered(vec![
            (Some("self_attn".into()), Value::Number(0.1)),
            (Some("mlp".into()), Value::Gradient(vec![0.0, 1.0])),
            (None, Value::Number(0.7)),
            (Some("mlp".into()), Value::Number(9.0)),
        ]);
        assert_eq!(
            s.evaluate("model.layers.0.self_attn.q_proj.weight", 0.5),
            Some(0.1)
        );
        assert_eq!(
            s.evaluate("model.layers.0.mlp.up_proj.weight", 0.25),
            Some(0.25)
        );
        assert_eq!(s.evaluate("model.norm.weight", 0.0), Some(0.7));
        let star = ParamSetting::filtered(vec![(Some("*".into()), Value::Bool(true))]);
        assert_eq!(star.evaluate("anything", 0.0), Some(1.0));
    }

    #[test]
    fn missed_filters_fall_through_to_lower_levels() {
        let source = map(&[(
            "weight",
            ParamSetting::filtered(vec![(Some("mlp".into()), Value::Number(0.9))]),
        )]);
        let slice = map(&[("density", ParamSetting::number(0.3))]);
        let global = map(&[
            ("weight", ParamSetting::number(0.2)),
            ("density", ParamSetting::number(0.5)),
        ]);
        let levels = [&source, &slice, &global];
        assert_eq!(resolve("weight", &levels, "x.mlp.w", 0.0), Some(0.9));
        assert_eq!(resolve("weight", &levels, "x.attn.w", 0.0), Some(0.2));
        assert_eq!(resolve("density", &levels, "x.attn.w", 0.0), Some(0.3));
        assert_eq!(resolve("lambda", &levels, "x.attn.w", 0.0), None);
    }
}
