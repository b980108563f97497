//! Architecture from tensor names: which tensors are pre-layer (embeddings), which belong to
//! decoder/encoder layer `i`, which are post-layer (final norm, head); the layer count from
//! config.json; tied embeddings; and the compatibility check run before merging models.
//!
//! Layer tensors are recognised by the known prefixes of the common families —
//! llama / mistral / qwen2 / gemma / phi-3 (`model.layers.{i}.`), gpt2 (`transformer.h.{i}.`,
//! `h.{i}.`), bert / roberta (`encoder.layer.{i}.`, optionally under `bert.` / `roberta.`),
//! gpt-neox, opt — and, for any other architecture, by the first `.<int>.` segment of the name
//! (the grouping mergekit infers for unknown architectures). Tensors outside the layers are
//! pre-layer when they are embeddings (`embed`, `wte`, `wpe` in the name) and post-layer
//! otherwise (final norm, `lm_head`, pooler, classifier).
//!
//! ```
//! use evomerge::arch::{position, set_layer_index, Position};
//! assert_eq!(position("model.layers.3.mlp.up_proj.weight"), Position::Layer(3));
//! assert_eq!(position("model.embed_tokens.weight"), Position::Pre);
//! assert_eq!(position("lm_head.weight"), Position::Post);
//! assert_eq!(set_layer_index("transformer.h.3.attn.c_attn.weight", 7), "transformer.h.7.attn.c_attn.weight");
//! ```

use std::collections::BTreeMap;
use std::ops::Range;

use serde_json::Value;

use crate::error::{Error, Result};
use crate::store::{TensorInfo, TensorSource};

/// Where a tensor sits in the network.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Position {
    Pre,
    Layer(usize),
    Post,
}

/// Prefixes after which the layer index follows, for the families we know by name.
const LAYER_PREFIXES: &[&str] = &[
    "model.layers.",                // llama, mistral, qwen2, gemma, phi-3
    "model.language_model.layers.", // multimodal wrappers of the above
    "language_model.model.layers.",
    "model.decoder.layers.", // opt
    "transformer.h.",        // gpt2, gpt-j
    "h.",                    // gpt2 saved without the `transformer.` prefix
    "bert.encoder.layer.",   // bert
    "roberta.encoder.layer.",
    "encoder.layer.", // bert without prefix
    "gpt_neox.layers.",
    "transformer.blocks.", // mpt
];

/// Config keys holding the layer count, in the order we look for them.
const LAYER_COUNT_KEYS: &[&str] = &["num_hidden_layers", "n_layer", "num_layers", "n_layers"];

/// The byte range of the layer index in `name`, and its value.
fn layer_span(name: &str) -> Option<(Range<usize>, usize)> {
    let digits_at = |start: usize| -> Option<(Range<usize>, usize)> {
        let rest = &name[start..];
        let len = rest.find('.')?;
        let digits = &rest[..len];
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        Some((start..start + len, digits.parse().ok()?))
    };
    for prefix in LAYER_PREFIXES {
        if name.starts_with(prefix)
            && let Some(span) = digits_at(prefix.len())
        {
            return Some(span);
        }
    }
    // Unknown architecture: the first purely numeric segment that is not the last one.
    let mut start = 0;
    for segment in name.split('.') {
        let end = start + segment.len();
        if end < name.len()
            && !segment.is_empty()
            && segment.bytes().all(|b| b.is_ascii_digit())
            && let Ok(i) = segment.parse()
        {
            return Some((start..end, i));
        }
        start = end + 1;
    }
    None
}

/// Where the tensor `name` sits: before the layers, in layer `i`, or after the layers.
pub fn position(name: &str) -> Position {
    if let Some((_, i)) = layer_span(name) {
        return Position::Layer(i);
    }
    let embedding = ["embed", "wte", "wpe"].iter().any(|k| name.contains(k));
    if embedding {
        Position::Pre
    } else {
        Position::Post
    }
}

/// `name` with its layer index replaced by `new_index` (unchanged if it is not a layer tensor).
pub fn set_layer_index(name: &str, new_index: usize) -> String {
    match layer_span(name) {
        Some((span, _)) => format!("{}{new_index}{}", &name[..span.start], &name[span.end..]),
        None => name.to_string(),
    }
}

/// The config.json key that holds the layer count (`num_hidden_layers`, `n_layer`, `num_layers`
/// or `n_layers`), if any.
pub fn layer_count_key(config: &Value) -> Option<&'static str> {
    LAYER_COUNT_KEYS
        .iter()
        .copied()
        .find(|k| config.get(k).is_some_and(Value::is_u64))
}

/// Largest size [`check_config`] accepts for a layer count, width, head count or vocabulary
/// (the largest open models are far below: ~262k vocabulary, ~30k hidden size).
pub const MAX_CONFIG_SIZE: u64 = 1 << 24;
/// Largest `max_position_embeddings` / `n_positions` [`check_config`] accepts.
pub const MAX_CONFIG_POSITIONS: u64 = 1 << 30;

/// Check the config.json fields evomerge relies on, when present (any architecture; a key that
/// is absent or `null` is not checked): layer count, hidden size, intermediate size, attention
/// and key/value heads, head_dim and vocabulary are positive integers (at most
/// [`MAX_CONFIG_SIZE`]), `max_position_embeddings` a positive integer (at most
/// [`MAX_CONFIG_POSITIONS`]); the heads divide `hidden_size` (unless `head_dim` is given) and
/// the key/value heads divide the heads; `rms_norm_eps` / `layer_norm_eps` is a number in
/// [0, 1]; `rope_theta` a positive finite number; `tie_word_embeddings` a boolean. Called
/// when a model directory is opened ([`crate::store::Model::open`]) and when a forward reads
/// its config ([`crate::model::LlamaConfig::from_json`]), so a bad value is refused before it
/// is copied into a merge's output. The error names the key and the value.
pub fn check_config(config: &Value) -> std::result::Result<(), String> {
    let present = |key: &str| config.get(key).filter(|v| !v.is_null());
    let size = |key: &str, max: u64| -> std::result::Result<Option<u64>, String> {
        let Some(v) = present(key) else {
            return Ok(None);
        };
        match v.as_u64() {
            Some(n) if (1..=max).contains(&n) => Ok(Some(n)),
            _ => Err(format!(
                "`{key}` = {v} must be a positive integer (at most {max})"
            )),
        }
    };
    for key in LAYER_COUNT_KEYS
        .iter()
        .chain(&["n_embd", "d_model", "n_head", "n_inner", "head_dim"])
    {
        size(key, MAX_CONFIG_SIZE)?;
    }
    for key in ["max_position_embeddings", "n_positions"] {
        size(key, MAX_CONFIG_POSITIONS)?;
    }
    size("vocab_size", MAX_CONFIG_SIZE)?;
    // Some architectures give one intermediate size per layer.
    if let Some(list) = present("intermediate_size").and_then(Value::as_array) {
        if list.is_empty()
            || list
                .iter()
                .any(|v| v.as_u64().is_none_or(|n| n == 0 || n > MAX_CONFIG_SIZE))
        {
            return Err(format!(
                "`intermediate_size` = {} must be a positive integer (at most {MAX_CONFIG_SIZE}) \
                 or a list of them",
                present("intermediate_size").expect("present")
            ));
        }
    } else {
        size("intermediate_size", MAX_CONFIG_SIZE)?;
    }
    let hidden = size("hidden_size", MAX_CONFIG_SIZE)?;
    let heads = size("num_attention_heads", MAX_CONFIG_SIZE)?;
    let kv_heads = size("num_key_value_heads", MAX_CONFIG_SIZE)?;
    if let (Some(h), Some(n)) = (hidden, heads)
        && present("head_dim").is_none()
        && !h.is_multiple_of(n)
    {
        return Err(format!(
            "`num_attention_heads` = {n} does not divide `hidden_size` = {h} (and no `head_dim` \
             is given)"
        ));
    }
    if let (Some(n), Some(kv)) = (heads, kv_heads)
        && !n.is_multiple_of(kv)
    {
        return Err(format!(
            "`num_key_value_heads` = {kv} does not divide `num_attention_heads` = {n}"
        ));
    }
    for key in ["rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon"] {
        if let Some(v) = present(key)
            && !v.as_f64().is_some_and(|e| (0.0..=1.0).contains(&e))
        {
            return Err(format!("`{key}` = {v} must be a number in [0, 1]"));
        }
    }
    if let Some(v) = present("rope_theta")
        && !v.as_f64().is_some_and(|t| t > 0.0 && t.is_finite())
    {
        return Err(format!(
            "`rope_theta` = {v} must be a positive finite number"
        ));
    }
    if let Some(v) = present("tie_word_embeddings")
        && !v.is_boolean()
    {
        return Err(format!("`tie_word_embeddings` = {v} must be true or false"));
    }
    Ok(())
}

/// The layer count from config.json, if it names one.
pub fn layer_count(config: &Value) -> Option<usize> {
    let key = layer_count_key(config)?;
    config.get(key)?.as_u64().map(|n| n as usize)
}

/// The layer count implied by tensor names: one more than the largest layer index.
pub fn layer_count_from_names<'a>(names: impl IntoIterator<Item = &'a str>) -> Option<usize> {
    names
        .into_iter()
        .filter_map(|n| match position(n) {
            Position::Layer(i) => Some(i + 1),
            _ => None,
        })
        .max()
}

/// Output-head tensor names that may be absent when embeddings are tied.
const HEAD_NAMES: &[&str] = &["lm_head.weight"];

/// Embedding tensors a tied head shares its weights with, by family.
const EMBEDDING_NAMES: &[&str] = &[
    "model.embed_tokens.weight",
    "transformer.wte.weight",
    "wte.weight",
    "gpt_neox.embed_in.weight",
    "model.decoder.embed_tokens.weight",
];

/// Whether the model ties its output head to the input embeddings: config.json's
/// `tie_word_embeddings` when present, otherwise true when the checkpoint has no `lm_head.weight`
/// (gpt2 and friends omit both the key and the head).
pub fn tied_embeddings(model: &dyn TensorSource) -> bool {
    match model
        .config()
        .get("tie_word_embeddings")
        .and_then(Value::as_bool)
    {
        Some(tied) => tied,
        // Without the config key: tied when there is an embedding but no separate head.
        None => {
            EMBEDDING_NAMES.iter().any(|e| model.info(e).is_some())
                && HEAD_NAMES.iter().all(|h| model.info(h).is_none())
        }
    }
}

/// For a head tensor absent because embeddings are tied, the embedding tensor of `model` that
/// stands in for it; `None` when `name` is not a head, the model is not tied, or it has no known
/// embedding tensor.
pub fn tied_source(model: &dyn TensorSource, name: &str) -> Option<String> {
    if !HEAD_NAMES.contains(&name) || !tied_embeddings(model) {
        return None;
    }
    EMBEDDING_NAMES
        .iter()
        .find(|e| model.info(e).is_some())
        .map(|e| e.to_string())
}

/// How many differences [`check_compatible`] lists before summarising.
const MAX_LISTED: usize = 8;

/// Check that `models` have the same tensor names and shapes (dtypes may differ). A head missing
/// from a model with tied embeddings is not a difference. Every model is compared with the
/// first; the error lists the first few differences, naming models and tensors.
pub fn check_compatible(models: &[&dyn TensorSource]) -> Result<()> {
    let Some((first, rest)) = models.split_first() else {
        return Ok(());
    };
    let label = |i: usize, m: &dyn TensorSource| format!("model {} ({})", i + 1, m.label());
    let reference: BTreeMap<String, TensorInfo> = first
        .tensor_infos()
        .into_iter()
        .map(|t| (t.name.clone(), t))
        .collect();
    let first_label = label(0, *first);
    let mut diffs = Vec::new();
    for (k, model) in rest.iter().enumerate() {
        let this_label = label(k + 1, *model);
        let infos: BTreeMap<String, TensorInfo> = model
            .tensor_infos()
            .into_iter()
            .map(|t| (t.name.clone(), t))
            .collect();
        for (name, info) in &reference {
            match infos.get(name) {
                None if tied_source(*model, name).is_some() => {}
                None => diffs.push(format!("`{name}` is missing from {this_label}")),
                Some(other) if other.shape != info.shape => diffs.push(format!(
                    "`{name}` has shape {:?} in {this_label} but {:?} in {first_label}",
                    other.shape, info.shape
                )),
                Some(_) => {}
            }
        }
        for name in infos.keys() {
            if !reference.contains_key(name) && tied_source(*first, name).is_none() {
                diffs.push(format!(
                    "`{name}` is in {this_label} but missing from {first_label}"
                ));
            }
        }
    }
    if diffs.is_empty() {
        return Ok(());
    }
    let total = diffs.len();
    let mut msg = diffs
        .iter()
        .take(MAX_LISTED)
        .cloned()
        .collect::<Vec<_>>()
        .join("; ");
    if total > MAX_LISTED {
        msg.push_str(&format!("; ... {} more differences", total - MAX_LISTED));
    }
    Err(Error::Mismatch(msg))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::candidate::MemModel;
    use crate::tensor::TensorBuf;
    use serde_json::json;

    #[test]
    fn llama_family_names() {
        // llama, mistral, qwen2 (with qkv bias), gemma, phi-3 (fused qkv) share the layout.
        for (name, want) in [
            ("model.embed_tokens.weight", Position::Pre),
            ("model.layers.0.input_layernorm.weight", Position::Layer(0)),
            ("model.layers.11.self_attn.q_proj.bias", Position::Layer(11)),
            (
                "model.layers.3.self_attn.qkv_proj.weight",
                Position::Layer(3),
            ),
            ("model.layers.2.mlp.gate_up_proj.weight", Position::Layer(2)),
            (
                "model.layers.5.pre_feedforward_layernorm.weight",
                Position::Layer(5),
            ),
            ("model.norm.weight", Position::Post),
            ("lm_head.weight", Position::Post),
        ] {
            assert_eq!(position(name), want, "{name}");
        }
    }

    #[test]
    fn gpt2_names() {
        for (name, want) in [
            ("transformer.wte.weight", Position::Pre),
            ("transformer.wpe.weight", Position::Pre),
            ("transformer.h.10.attn.c_attn.weight", Position::Layer(10)),
            ("h.4.mlp.c_fc.bias", Position::Layer(4)),
            ("wte.weight", Position::Pre),
            ("transformer.ln_f.weight", Position::Post),
            ("ln_f.bias", Position::Post),
        ] {
            assert_eq!(position(name), want, "{name}");
        }
    }

    #[test]
    fn bert_names() {
        for (name, want) in [
            ("bert.embeddings.word_embeddings.weight", Position::Pre),
            ("bert.embeddings.LayerNorm.weight", Position::Pre),
            ("embeddings.position_embeddings.weight", Position::Pre),
            (
                "bert.encoder.layer.7.attention.self.query.weight",
                Position::Layer(7),
            ),
            ("encoder.layer.1.output.dense.bias", Position::Layer(1)),
            ("bert.pooler.dense.weight", Position::Post),
            ("cls.predictions.transform.dense.weight", Position::Post),
            ("classifier.weight", Position::Post),
        ] {
            assert_eq!(position(name), want, "{name}");
        }
    }

    #[test]
    fn unknown_architecture_falls_back_to_first_numeric_segment() {
        assert_eq!(
            position("backbone.stages.2.conv.weight"),
            Position::Layer(2)
        );
        assert_eq!(
            set_layer_index("backbone.stages.2.sub.0.weight", 9),
            "backbone.stages.9.sub.0.weight"
        );
        // A trailing number is not a layer index.
        assert_eq!(position("head.0"), Position::Post);
    }

    #[test]
    fn set_layer_index_rewrites_only_the_layer_segment() {
        assert_eq!(
            set_layer_index("model.layers.3.mlp.down_proj.weight", 12),
            "model.layers.12.mlp.down_proj.weight"
        );
        assert_eq!(
            set_layer_index("bert.encoder.layer.10.output.dense.weight", 0),
            "bert.encoder.layer.0.output.dense.weight"
        );
        assert_eq!(set_layer_index("h.1.ln_1.weight", 2), "h.2.ln_1.weight");
        assert_eq!(set_layer_index("model.norm.weight", 2), "model.norm.weight");
    }

    #[test]
    fn layer_count_reads_each_key() {
        assert_eq!(layer_count(&json!({"num_hidden_layers": 22})), Some(22));
        assert_eq!(layer_count(&json!({"n_layer": 12})), Some(12));
        assert_eq!(layer_count(&json!({"num_layers": 4})), Some(4));
        assert_eq!(layer_count(&json!({"hidden_size": 4})), None);
        assert_eq!(
            layer_count_from_names(["model.layers.0.a.weight", "model.layers.5.a.weight", "x"]),
            Some(6)
        );
    }

    fn mem(config: Value, tensors: &[(&str, &[usize])]) -> MemModel {
        MemModel {
            config,
            tensors: tensors
                .iter()
                .map(|(n, s)| {
                    let len = s.iter().product();
                    (n.to_string(), TensorBuf::new(s.to_vec(), vec![0.0; len]))
                })
                .collect(),
        }
    }

    #[test]
    fn tied_head_may_be_absent() {
        let untied = mem(
            json!({"tie_word_embeddings": false}),
            &[
                ("model.embed_tokens.weight", &[4, 2]),
                ("lm_head.weight", &[4, 2]),
            ],
        );
        let tied = mem(
            json!({"tie_word_embeddings": true}),
            &[("model.embed_tokens.weight", &[4, 2])],
        );
        let gpt2 = mem(json!({}), &[("transformer.wte.weight", &[4, 2])]);
        assert!(!tied_embeddings(&untied));
        assert!(tied_embeddings(&tied));
        assert!(tied_embeddings(&gpt2));
        assert_eq!(
            tied_source(&tied, "lm_head.weight").as_deref(),
            Some("model.embed_tokens.weight")
        );
        assert_eq!(tied_source(&untied, "lm_head.weight"), None);
        assert!(check_compatible(&[&untied, &tied]).is_ok());
        assert!(check_compatible(&[&tied, &untied]).is_ok());
    }

    #[test]
    fn mismatches_are_listed_by_model_and_tensor() {
        let a = mem(json!({}), &[("x", &[2, 3]), ("y", &[3]), ("z", &[1])]);
        let b = mem(json!({}), &[("x", &[3, 2]), ("y", &[3]), ("w", &[1])]);
        let err = check_compatible(&[&a, &b]).unwrap_err().to_string();
        assert!(
            err.contains("`x` has shape [3, 2] in model 2 (<memory>) but [2, 3] in model 1"),
            "{err}"
        );
        assert!(err.contains("`z` is missing from model 2"), "{err}");
        assert!(
            err.contains("`w` is in model 2 (<memory>) but missing from model 1"),
            "{err}"
        );
        assert!(check_compatible(&[&a, &a.clone()]).is_ok());
    }
}
