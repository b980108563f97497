//! LoRA adapters as model inputs: a PEFT adapter directory (`adapter_config.json` +
//! `adapter_model.safetensors`) folded into its base model while the base is read, tensor by
//! tensor. Nothing is written to disk: [`LoraModel`] is a [`TensorSource`] whose tensors are
//! `W' = W + scale · (B · A)` (computed in `f32`, reported in the base tensor's dtype), so every
//! merge method, `eval` and `inspect` take `base+adapter` like any model directory.
//!
//! **Model references.** mergekit writes a LoRA input as `BASE+ADAPTER`
//! (`mergekit/common.py`, `ModelReference.validate_string`: the string is split at `+`; one
//! chunk is a model, two are model + LoRA, more cannot be parsed). [`parse_ref`] follows it, with
//! two local-path refinements:
//!
//! 1. a string that names an existing file or directory as a whole is that path (a directory
//!    whose name holds a `+` stays usable);
//! 2. otherwise, with exactly one `+`, the left side is the base and the right side the adapter
//!    (mergekit's rule; a missing side is an error naming that side's path); with several `+`
//!    (which mergekit refuses), the split is at the last `+` whose left side is an existing
//!    directory and whose right side is a directory with `adapter_config.json`, and an error
//!    when there is none.
//!
//! A plain path to a PEFT directory (`adapter_config.json`, no `config.json`) folds the adapter
//! into its `base_model_name_or_path` when that is a local directory. In a recipe or search file,
//! both sides of `BASE+ADAPTER` resolve relative to the file's directory ([`resolve_ref`]).
//!
//! **Adapter config.** `peft_type` must be `LORA`; `r` and `lora_alpha` (PEFT's defaults 8 and 8)
//! give `scale = lora_alpha / r`, or `lora_alpha / sqrt(r)` with `use_rslora`; `rank_pattern` /
//! `alpha_pattern` override them per module (PEFT's rule: the first key `k`, in file order, for
//! which the module name matches the regex `(.*\.)?(k)$`). `target_modules` (a list of module
//! names or name suffixes, a regex that must match the whole module name, or `all-linear`) is
//! checked against the adapter's modules. Refused, each with an error naming the file:
//! `fan_in_fan_out: true` (GPT-2 `Conv1D` layout), `use_dora` (and `lora_magnitude_vector`
//! tensors), `lora_bias`, `layer_replication`, adapters saved only as `adapter_model.bin`.
//!
//! **Adapter tensors.** Keys lose their `base_model.model.` prefix. `M.lora_A.weight` `[r, in]`
//! and `M.lora_B.weight` `[out, r]` fold into `M.weight` `[out, in]`; `M.lora_embedding_A`
//! `[r, vocab]` and `M.lora_embedding_B` `[hidden, r]` fold `(B · A)ᵀ` into the embedding
//! `M.weight` `[vocab, hidden]` (an adapter name segment such as `.default` is accepted after
//! the `lora_*` segment). Any other key (`M.modules_to_save.default.weight`, or the plain
//! `M.weight` PEFT saves for `modules_to_save`) replaces that base tensor whole. Every A needs
//! its B, shapes must agree with the base tensor and the configured rank, and every key must
//! map to a base tensor; otherwise the error names the adapter file and the key.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;
use serde_json::Value;

use super::reader::{CONFIG_FILE, parse_header};
use super::{Model, TensorInfo, TensorSource};
use crate::error::{Error, Result};
use crate::tensor::DType;

/// The adapter's config file.
pub const ADAPTER_CONFIG: &str = "adapter_config.json";
/// The adapter's weights file.
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
/// The pickle weights file (refused).
pub const ADAPTER_BIN: &str = "adapter_model.bin";
/// The prefix PEFT puts before the base model's tensor names.
const PEFT_PREFIX: &str = "base_model.model.";

fn config_err(path: &Path, msg: impl Into<String>) -> Error {
    Error::Config {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

fn bad(path: &Path, key: &str, msg: impl Into<String>) -> Error {
    Error::BadTensor {
        path: path.to_path_buf(),
        tensor: key.to_string(),
        msg: msg.into(),
    }
}

/// Whether `dir` is a PEFT adapter directory (holds `adapter_config.json`).
pub fn is_adapter_dir(dir: &Path) -> bool {
    dir.join(ADAPTER_CONFIG).is_file()
}

/// A model reference, split.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModelRefKind {
    /// A model directory.
    Plain(PathBuf),
    /// A base model directory and a LoRA adapter directory folded into it.
    Lora { base: PathBuf, adapter: PathBuf },
}

/// Split the reference `s` (see the module doc), resolving each side with `resolve`.
fn split_with(s: &str, resolve: &dyn Fn(&str) -> PathBuf) -> Result<Option<(PathBuf, PathBuf)>> {
    let whole = resolve(s);
    if whole.exists() || !s.contains('+') {
        return Ok(None);
    }
    let pluses: Vec<usize> = s.match_indices('+').map(|(i, _)| i).collect();
    if let [i] = pluses[..] {
        let (base, adapter) = (&s[..i], &s[i + 1..]);
        if base.is_empty() || adapter.is_empty() {
            return Err(config_err(
                Path::new(s),
                "model reference with `+` needs a base and an adapter: BASE+ADAPTER",
            ));
        }
        return Ok(Some((resolve(base), resolve(adapter))));
    }
    for &i in pluses.iter().rev() {
        let (base, adapter) = (resolve(&s[..i]), resolve(&s[i + 1..]));
        if base.is_dir() && is_adapter_dir(&adapter) {
            return Ok(Some((base, adapter)));
        }
    }
    Err(config_err(
        Path::new(s),
        "no such model directory, and no `+` in it splits it into BASE+ADAPTER with an existing \
         base directory and a LoRA adapter directory (one holding adapter_config.json)",
    ))
}

/// Split a model reference (an already resolved path) into a plain directory or base + adapter.
pub fn parse_ref(path: &Path) -> Result<ModelRefKind> {
    let Some(s) = path.to_str() else {
        return Ok(ModelRefKind::Plain(path.to_path_buf()));
    };
    // A side that is not a path but a hub id (`owner/name`) is its snapshot in the local
    // Hugging Face cache, or an error saying models must be local or cached.
    Ok(match split_with(s, &|p| PathBuf::from(p))? {
        Some((base, adapter)) => ModelRefKind::Lora {
            base: super::hub::locate(&base)?,
            adapter: super::hub::locate(&adapter)?,
        },
        None => ModelRefKind::Plain(super::hub::locate(path)?),
    })
}

/// Resolve a model reference written in a file in `dir` (`None`: the working directory): a
/// relative path joins `dir`, and so does each relative side of `BASE+ADAPTER`. The result is
/// what [`parse_ref`] / [`crate::store::open_source`] take.
///
/// A relative side that does not exist under `dir` but reads as a Hugging Face hub id
/// (`owner/name`) is its cached snapshot ([`super::hub`]); when the cache lacks it, the path
/// under `dir`, which opening refuses with an error that also says the cache lacks the id.
pub fn resolve_ref(name: &Path, dir: Option<&Path>) -> PathBuf {
    let join = |p: &Path| match dir {
        Some(d) if p.is_relative() => {
            let joined = d.join(p);
            match p.to_str() {
                Some(id) if !joined.exists() && super::hub::looks_like_hub_id(id) => {
                    super::hub::resolve(id).unwrap_or(joined)
                }
                _ => joined,
            }
        }
        _ => p.to_path_buf(),
    };
    let Some(s) = name.to_str() else {
        return join(name);
    };
    match split_with(s, &|p| join(Path::new(p))) {
        Ok(Some((base, adapter))) => {
            let mut joined = base.into_os_string();
            joined.push("+");
            joined.push(adapter.as_os_str());
            PathBuf::from(joined)
        }
        _ => join(name),
    }
}

/// The model directory a reference takes its config and tokenizer from: the base of
/// `BASE+ADAPTER` (or of a PEFT directory with a local `base_model_name_or_path`), else the path.
pub fn base_dir_of(path: &Path) -> PathBuf {
    match parse_ref(path) {
        Ok(ModelRefKind::Lora { base, .. }) => base,
        Ok(ModelRefKind::Plain(p)) => peft_base(&p).ok().flatten().unwrap_or(p),
        Err(_) => path.to_path_buf(),
    }
}

/// For a PEFT directory without a config.json: its `base_model_name_or_path` when that is a
/// local directory (`Ok(None)` when `dir` is not such a PEFT directory).
pub fn peft_base(dir: &Path) -> Result<Option<PathBuf>> {
    if !is_adapter_dir(dir) || dir.join(CONFIG_FILE).exists() {
        return Ok(None);
    }
    let path = dir.join(ADAPTER_CONFIG);
    let config = read_json(&path)?;
    let named = config
        .get("base_model_name_or_path")
        .and_then(Value::as_str);
    // A hub id as the base (what PEFT writes) is its snapshot in the local cache, if there.
    let local = named
        .filter(|b| !b.is_empty())
        .and_then(|b| super::hub::locate(Path::new(b)).ok())
        .filter(|b| b.is_dir());
    match local {
        Some(b) => Ok(Some(b)),
        _ => Err(config_err(
            &path,
            format!(
                "a PEFT adapter directory, not a model; its base_model_name_or_path {} is not a \
                 local directory: name the base as BASE+ADAPTER",
                named.map_or("(none)".to_string(), |b| format!("`{b}`"))
            ),
        )),
    }
}

/// Open any model reference: a model directory, `BASE+ADAPTER`, or a PEFT directory whose base
/// is local.
pub fn open_ref(path: &Path) -> Result<Arc<dyn TensorSource>> {
    match parse_ref(path)? {
        ModelRefKind::Lora { base, adapter } => Ok(Arc::new(LoraModel::open(&base, &adapter)?)),
        ModelRefKind::Plain(p) => {
            if let Some(e) = super::hub::missing(&p) {
                return Err(e);
            }
            match peft_base(&p)? {
                Some(base) => Ok(Arc::new(LoraModel::open(&base, &p)?)),
                None => Ok(Arc::new(Model::open(&p)?)),
            }
        }
    }
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| config_err(path, format!("invalid JSON: {e}")))
}

/// PEFT's pattern dicts are matched in file order, so they are read as ordered pairs.
use crate::store::reader::HeaderPairs as Ordered;

#[derive(serde::Deserialize)]
struct Patterns {
    #[serde(default)]
    rank_pattern: Option<Ordered>,
    #[serde(default)]
    alpha_pattern: Option<Ordered>,
}

/// Which modules an adapter targets (`target_modules`).
#[derive(Clone, Debug)]
pub enum Targets {
    /// Module names or `.`-separated name suffixes.
    List(Vec<String>),
    /// A regex that must match the whole module name.
    Regex(String),
    /// Every linear layer.
    AllLinear,
    /// Not stated: not checked.
    Any,
}

/// A parsed `adapter_config.json`.
#[derive(Clone, Debug)]
pub struct AdapterConfig {
    pub r: usize,
    pub alpha: f64,
    pub use_rslora: bool,
    pub targets: Targets,
    /// (module pattern, rank), in file order.
    pub rank_pattern: Vec<(String, usize)>,
    /// (module pattern, alpha), in file order.
    pub alpha_pattern: Vec<(String, f64)>,
    pub base_model_name_or_path: Option<String>,
}

/// `(.*\.)?(key)$` anchored at the start, as PEFT's `get_pattern_key` uses with `re.match`.
fn pattern_regex(path: &Path, key: &str) -> Result<fancy_regex::Regex> {
    fancy_regex::Regex::new(&format!(r"^(?:.*\.)?(?:{key})$")).map_err(|e| {
        config_err(
            path,
            format!("pattern key `{key}` is not a valid regex: {e}"),
        )
    })
}

impl AdapterConfig {
    /// Parse and check the text of `adapter_config.json` (read from `path`).
    pub fn parse(path: &Path, text: &str) -> Result<AdapterConfig> {
        let json: Value = serde_json::from_str(text)
            .map_err(|e| config_err(path, format!("invalid JSON: {e}")))?;
        if !json.is_object() {
            return Err(config_err(path, "not a JSON object"));
        }
        match json.get("peft_type").and_then(Value::as_str) {
            Some("LORA") => {}
            Some(other) => {
                return Err(config_err(
                    path,
                    format!("peft_type is `{other}`; only LoRA adapters (`LORA`) can be folded"),
                ));
            }
            None => return Err(config_err(path, "no `peft_type` (expected \"LORA\")")),
        }
        let truthy = |k: &str| json.get(k).is_some_and(|v| v.as_bool() == Some(true));
        if truthy("fan_in_fan_out") {
            return Err(config_err(
                path,
                "fan_in_fan_out is true (GPT-2 Conv1D weights stored [in, out]); only \
                 fan_in_fan_out: false adapters are supported",
            ));
        }
        if truthy("use_dora") {
            return Err(config_err(
                path,
                "use_dora is true: DoRA adapters are not supported",
            ));
        }
        if truthy("lora_bias") {
            return Err(config_err(
                path,
                "lora_bias is true: LoRA bias terms are not supported",
            ));
        }
        if json.get("layer_replication").is_some_and(|v| !v.is_null()) {
            return Err(config_err(
                path,
                "layer_replication is set: adapters that replicate layers are not supported",
            ));
        }
        let r =
            match json.get("r") {
                None | Some(Value::Null) => 8,
                Some(v) => v.as_u64().filter(|&r| r > 0).ok_or_else(|| {
                    config_err(path, format!("`r` is {v}, not a positive integer"))
                })? as usize,
            };
        let alpha = match json.get("lora_alpha") {
            None | Some(Value::Null) => 8.0,
            Some(v) => v
                .as_f64()
                .ok_or_else(|| config_err(path, format!("`lora_alpha` is {v}, not a number")))?,
        };
        let use_rslora = truthy("use_rslora");
        let targets = match json.get("target_modules") {
            None | Some(Value::Null) => Targets::Any,
            Some(Value::String(s)) if s == "all-linear" => Targets::AllLinear,
            Some(Value::String(s)) => {
                fancy_regex::Regex::new(&format!("^(?:{s})$")).map_err(|e| {
                    config_err(
                        path,
                        format!("target_modules `{s}` is not a valid regex: {e}"),
                    )
                })?;
                Targets::Regex(s.clone())
            }
            Some(Value::Array(a)) => Targets::List(
                a.iter()
                    .map(|v| v.as_str().map(str::to_string))
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| config_err(path, "target_modules holds a non-string entry"))?,
            ),
            Some(v) => {
                return Err(config_err(
                    path,
                    format!("target_modules is {v}, not a list, a regex string or \"all-linear\""),
                ));
            }
        };
        let patterns: Patterns = serde_json::from_str(text)
            .map_err(|e| config_err(path, format!("rank_pattern / alpha_pattern: {e}")))?;
        let mut rank_pattern = Vec::new();
        for (k, v) in patterns.rank_pattern.unwrap_or_default().0 {
            pattern_regex(path, &k)?;
            let rank = v.as_u64().filter(|&r| r > 0).ok_or_else(|| {
                config_err(
                    path,
                    format!("rank_pattern `{k}` is {v}, not a positive integer"),
                )
            })?;
            rank_pattern.push((k, rank as usize));
        }
        let mut alpha_pattern = Vec::new();
        for (k, v) in patterns.alpha_pattern.unwrap_or_default().0 {
            pattern_regex(path, &k)?;
            let a = v.as_f64().ok_or_else(|| {
                config_err(path, format!("alpha_pattern `{k}` is {v}, not a number"))
            })?;
            alpha_pattern.push((k, a));
        }
        Ok(AdapterConfig {
            r,
            alpha,
            use_rslora,
            targets,
            rank_pattern,
            alpha_pattern,
            base_model_name_or_path: json
                .get("base_model_name_or_path")
                .and_then(Value::as_str)
                .map(str::to_string),
        })
    }

    /// The (rank, alpha) of `module` (a base-model module name, e.g.
    /// `model.layers.0.self_attn.q_proj`), after `rank_pattern` / `alpha_pattern`.
    pub fn rank_alpha(&self, module: &str) -> (usize, f64) {
        fn first<T: Copy>(pattern: &[(String, T)], module: &str) -> Option<T> {
            pattern
                .iter()
                .find(|(k, _)| {
                    pattern_regex(Path::new(""), k)
                        .ok()
                        .is_some_and(|re| re.is_match(module).unwrap_or(false))
                })
                .map(|(_, v)| *v)
        }
        (
            first(&self.rank_pattern, module).unwrap_or(self.r),
            first(&self.alpha_pattern, module).unwrap_or(self.alpha),
        )
    }

    /// The scale of `module`: `alpha / r`, or `alpha / sqrt(r)` with rsLoRA.
    pub fn scale(&self, module: &str) -> f64 {
        let (rank, alpha) = self.rank_alpha(module);
        if self.use_rslora {
            alpha / (rank as f64).sqrt()
        } else {
            alpha / rank as f64
        }
    }

    /// Whether `target_modules` covers `module` (PEFT's `check_target_module_exists`).
    pub fn targets(&self, module: &str) -> bool {
        match &self.targets {
            Targets::Any | Targets::AllLinear => true,
            Targets::Regex(re) => fancy_regex::Regex::new(&format!("^(?:{re})$"))
                .ok()
                .is_some_and(|re| re.is_match(module).unwrap_or(false)),
            Targets::List(list) => list
                .iter()
                .any(|t| module == t || module.ends_with(&format!(".{t}"))),
        }
    }
}

/// Where an adapter tensor's bytes are in the mapped file.
#[derive(Clone, Debug)]
struct Entry {
    key: String,
    dtype: DType,
    shape: Vec<usize>,
    start: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FoldKind {
    /// `W [out, in] += scale · B [out, r] · A [r, in]`.
    Linear,
    /// `W [vocab, hidden] += scale · (B [hidden, r] · A [r, vocab])ᵀ`.
    Embedding,
}

#[derive(Clone, Debug)]
struct Fold {
    kind: FoldKind,
    a: Entry,
    b: Entry,
    rank: usize,
    scale: f32,
    /// Base tensor `[rows, cols]`.
    rows: usize,
    cols: usize,
}

/// What an adapter tensor key is, after the `base_model.model.` prefix is stripped.
enum KeyKind {
    /// A LoRA factor of `module` (`A` or `B`, embedding or not).
    Factor {
        module: String,
        b: bool,
        embedding: bool,
    },
    /// A whole tensor replacing base tensor `name`.
    Full(String),
}

fn classify(file: &Path, key: &str) -> Result<KeyKind> {
    let k = key.strip_prefix(PEFT_PREFIX).unwrap_or(key);
    let segs: Vec<&str> = k.split('.').collect();
    if segs.contains(&"lora_magnitude_vector") {
        return Err(bad(
            file,
            key,
            "a DoRA magnitude vector: DoRA is not supported",
        ));
    }
    let factor = segs.iter().position(|s| {
        matches!(
            *s,
            "lora_A" | "lora_B" | "lora_embedding_A" | "lora_embedding_B"
        )
    });
    if let Some(i) = factor {
        let rest = &segs[i + 1..];
        if rest.last() == Some(&"bias") {
            return Err(bad(file, key, "a LoRA bias: lora_bias is not supported"));
        }
        let ok = match rest {
            [] | ["weight"] => true,
            [name] | [name, "weight"] => !name.is_empty(),
            _ => false,
        };
        if !ok || i == 0 {
            return Err(bad(
                file,
                key,
                "not a LoRA key of the form MODULE.lora_A[.ADAPTER].weight",
            ));
        }
        return Ok(KeyKind::Factor {
            module: segs[..i].join("."),
            b: segs[i].ends_with('B'),
            embedding: segs[i].starts_with("lora_embedding"),
        });
    }
    if let Some(i) = segs.iter().position(|s| *s == "modules_to_save") {
        if i + 2 >= segs.len() {
            return Err(bad(file, key, "modules_to_save key without a tensor name"));
        }
        let mut name: Vec<&str> = segs[..i].to_vec();
        name.extend_from_slice(&segs[i + 2..]);
        return Ok(KeyKind::Full(name.join(".")));
    }
    Ok(KeyKind::Full(k.to_string()))
}

/// An opened, validated PEFT LoRA adapter, bound to the base model it was checked against.
pub struct Adapter {
    dir: PathBuf,
    file: PathBuf,
    config: AdapterConfig,
    map: Mmap,
    /// Base tensor name → its fold.
    folds: BTreeMap<String, Fold>,
    /// Base tensor name → the adapter tensor that replaces it.
    replaced: BTreeMap<String, Entry>,
}

/// What [`Adapter::summary`] reports (shown by `evomerge inspect BASE+ADAPTER`).
#[derive(Clone, Debug, PartialEq)]
pub struct AdapterSummary {
    pub dir: PathBuf,
    pub r: usize,
    pub alpha: f64,
    pub use_rslora: bool,
    /// `alpha / r` (or `/ sqrt(r)`) of the config's defaults.
    pub scale: f64,
    /// Whether `rank_pattern` / `alpha_pattern` give some modules another rank or alpha.
    pub patterns: bool,
    /// Base tensors a LoRA product is folded into.
    pub folded: usize,
    /// Base tensors replaced whole (`modules_to_save`).
    pub replaced: usize,
}

impl Adapter {
    /// Open the adapter in `dir` and check it against the base tensors `base` knows.
    pub fn open(dir: &Path, base: &dyn TensorSource) -> Result<Adapter> {
        if !dir.is_dir() {
            return Err(config_err(
                dir,
                "LoRA adapter directory does not exist (the ADAPTER of BASE+ADAPTER)",
            ));
        }
        let config_path = dir.join(ADAPTER_CONFIG);
        if !config_path.is_file() {
            return Err(config_err(
                &config_path,
                "missing: not a PEFT adapter directory (the ADAPTER of BASE+ADAPTER)",
            ));
        }
        let text = std::fs::read_to_string(&config_path).map_err(|e| Error::io(&config_path, e))?;
        let config = AdapterConfig::parse(&config_path, &text)?;
        let file = dir.join(ADAPTER_WEIGHTS);
        if !file.is_file() {
            let msg = if dir.join(ADAPTER_BIN).is_file() {
                format!(
                    "missing; the adapter has only {ADAPTER_BIN}, and only safetensors adapters \
                     are supported (convert it, e.g. load it with PEFT and save_pretrained with \
                     safe_serialization=True)"
                )
            } else {
                "missing: the adapter has no weights".to_string()
            };
            return Err(config_err(&file, msg));
        }
        let handle = File::open(&file).map_err(|e| Error::io(&file, e))?;
        let len = handle.metadata().map_err(|e| Error::io(&file, e))?.len();
        if len < 8 {
            return Err(Error::Safetensors {
                path: file,
                msg: format!("file is {len} bytes, too short for the 8-byte header length"),
            });
        }
        // SAFETY: read-only map kept inside the adapter; like every mmap-based reader we rely
        // on input files not being truncated or rewritten while they are open.
        let map = unsafe { Mmap::map(&handle) }.map_err(|e| Error::io(&file, e))?;
        let entries = parse_header(&file, &map)?;

        // Group the keys.
        #[derive(Default)]
        struct Pair {
            a: Option<Entry>,
            b: Option<Entry>,
            embedding: Option<(bool, String)>,
        }
        let mut pairs: BTreeMap<String, Pair> = BTreeMap::new();
        let mut replaced: BTreeMap<String, Entry> = BTreeMap::new();
        for e in entries {
            let entry = Entry {
                key: e.info.name.clone(),
                dtype: e.info.dtype,
                shape: e.info.shape.clone(),
                start: e.start,
            };
            match classify(&file, &e.info.name)? {
                KeyKind::Factor {
                    module,
                    b,
                    embedding,
                } => {
                    let p = pairs.entry(module).or_default();
                    match &p.embedding {
                        Some((emb, other)) if *emb != embedding => {
                            return Err(bad(
                                &file,
                                &entry.key,
                                format!("mixes lora_A/lora_B and lora_embedding_A/B (`{other}`)"),
                            ));
                        }
                        _ => p.embedding = Some((embedding, entry.key.clone())),
                    }
                    let slot = if b { &mut p.b } else { &mut p.a };
                    if let Some(prev) = slot {
                        return Err(bad(
                            &file,
                            &entry.key,
                            format!("a second LoRA factor for its module (also `{}`)", prev.key),
                        ));
                    }
                    *slot = Some(entry);
                }
                KeyKind::Full(name) => {
                    let Some(info) = base.info(&name) else {
                        return Err(bad(
                            &file,
                            &entry.key,
                            format!(
                                "maps to base tensor `{name}`, which the base model {} does not \
                                 have",
                                base.label()
                            ),
                        ));
                    };
                    if info.shape != entry.shape {
                        return Err(bad(
                            &file,
                            &entry.key,
                            format!(
                                "shape {:?} replaces base tensor `{name}` of shape {:?}",
                                entry.shape, info.shape
                            ),
                        ));
                    }
                    if let Some(prev) = replaced.insert(name.clone(), entry) {
                        return Err(bad(
                            &file,
                            &prev.key,
                            format!("base tensor `{name}` is replaced by two adapter tensors"),
                        ));
                    }
                }
            }
        }

        let mut folds = BTreeMap::new();
        for (module, p) in pairs {
            let embedding = p.embedding.as_ref().is_some_and(|(e, _)| *e);
            let (a_name, b_name) = if embedding {
                ("lora_embedding_A", "lora_embedding_B")
            } else {
                ("lora_A", "lora_B")
            };
            let (a, b) = match (p.a, p.b) {
                (Some(a), Some(b)) => (a, b),
                (Some(a), None) => {
                    return Err(bad(
                        &file,
                        &a.key,
                        format!("has no matching {b_name} for module `{module}`"),
                    ));
                }
                (None, Some(b)) => {
                    return Err(bad(
                        &file,
                        &b.key,
                        format!("has no matching {a_name} for module `{module}`"),
                    ));
                }
                (None, None) => unreachable!("a module is recorded with a factor"),
            };
            let name = format!("{module}.weight");
            let Some(info) = base.info(&name) else {
                return Err(bad(
                    &file,
                    &a.key,
                    format!(
                        "LoRA of module `{module}`, but the base model {} has no tensor `{name}`",
                        base.label()
                    ),
                ));
            };
            if replaced.contains_key(&name) {
                return Err(bad(
                    &file,
                    &a.key,
                    format!("base tensor `{name}` is both LoRA-adapted and replaced whole"),
                ));
            }
            if !config.targets(&module) {
                return Err(bad(
                    &file,
                    &a.key,
                    format!(
                        "module `{module}` is not among the adapter's target_modules {:?}",
                        config.targets
                    ),
                ));
            }
            let [rows, cols] = info.shape[..] else {
                return Err(bad(
                    &file,
                    &a.key,
                    format!(
                        "base tensor `{name}` has shape {:?}; LoRA folds only into 2-D weights",
                        info.shape
                    ),
                ));
            };
            let (ra, rb) = match (&a.shape[..], &b.shape[..]) {
                ([ra, an], [bn, rb]) => {
                    // Linear: A [r, in = cols], B [out = rows, r]. Embedding: A [r, vocab =
                    // rows], B [hidden = cols, r].
                    let (want_a, want_b) = if embedding {
                        (rows, cols)
                    } else {
                        (cols, rows)
                    };
                    if *an != want_a || *bn != want_b {
                        return Err(bad(
                            &file,
                            &a.key,
                            format!(
                                "{a_name} {:?} and {b_name} {:?} do not fit base tensor `{name}` \
                                 {:?} (expected {a_name} [r, {want_a}], {b_name} [{want_b}, r])",
                                a.shape, b.shape, info.shape
                            ),
                        ));
                    }
                    (*ra, *rb)
                }
                _ => {
                    return Err(bad(
                        &file,
                        &a.key,
                        format!(
                            "{a_name} {:?} / {b_name} {:?}: LoRA factors must be 2-D",
                            a.shape, b.shape
                        ),
                    ));
                }
            };
            let (rank, _) = config.rank_alpha(&module);
            if ra != rb || ra != rank {
                return Err(bad(
                    &file,
                    &a.key,
                    format!(
                        "rank {ra} ({b_name} rank {rb}), but adapter_config.json gives module \
                         `{module}` r = {rank}"
                    ),
                ));
            }
            folds.insert(
                name,
                Fold {
                    kind: if embedding {
                        FoldKind::Embedding
                    } else {
                        FoldKind::Linear
                    },
                    a,
                    b,
                    rank,
                    scale: config.scale(&module) as f32,
                    rows,
                    cols,
                },
            );
        }
        Ok(Adapter {
            dir: dir.to_path_buf(),
            file,
            config,
            map,
            folds,
            replaced,
        })
    }

    /// The adapter directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The adapter's safetensors file.
    pub fn file(&self) -> &Path {
        &self.file
    }

    /// The parsed adapter_config.json.
    pub fn config(&self) -> &AdapterConfig {
        &self.config
    }

    /// Base tensors a LoRA product is folded into, sorted.
    pub fn folded(&self) -> Vec<&str> {
        self.folds.keys().map(String::as_str).collect()
    }

    /// Base tensors replaced whole, sorted.
    pub fn replaced(&self) -> Vec<&str> {
        self.replaced.keys().map(String::as_str).collect()
    }

    /// A summary for `inspect`.
    pub fn summary(&self) -> AdapterSummary {
        let c = &self.config;
        AdapterSummary {
            dir: self.dir.clone(),
            r: c.r,
            alpha: c.alpha,
            use_rslora: c.use_rslora,
            scale: if c.use_rslora {
                c.alpha / (c.r as f64).sqrt()
            } else {
                c.alpha / c.r as f64
            },
            patterns: self
                .folds
                .values()
                .any(|f| f.scale != c_scale(c) || f.rank != c.r),
            folded: self.folds.len(),
            replaced: self.replaced.len(),
        }
    }

    /// Decode `out.len()` elements of `e` from element `from`.
    fn decode(&self, e: &Entry, from: usize, out: &mut [f32]) {
        let size = e.dtype.size();
        let at = e.start + from * size;
        e.dtype
            .decode_into(&self.map[at..at + out.len() * size], out);
    }

    /// Add the fold's delta for elements `start .. start + out.len()` (flattened) to `out`.
    fn add_delta(&self, f: &Fold, start: usize, out: &mut [f32]) {
        if out.is_empty() {
            return;
        }
        let (r, cols) = (f.rank, f.cols);
        let end = start + out.len();
        let (first, last) = (start / cols, (end - 1) / cols);
        let n = last - first + 1;
        // `left[k][i]`: the factor entry multiplying row `first + i` at rank `k`;
        // `right[k][c]`: the factor row giving column `c`.
        let mut left = vec![0f32; r * n];
        let mut right = vec![0f32; r * cols];
        match f.kind {
            FoldKind::Linear => {
                // B rows first..=last [n, r], transposed; A whole [r, cols].
                let mut b = vec![0f32; n * r];
                self.decode(&f.b, first * r, &mut b);
                for i in 0..n {
                    for k in 0..r {
                        left[k * n + i] = b[i * r + k];
                    }
                }
                self.decode(&f.a, 0, &mut right);
            }
            FoldKind::Embedding => {
                // A [r, vocab]: columns first..=last of each row; B [hidden, r], transposed.
                for k in 0..r {
                    self.decode(&f.a, k * f.rows + first, &mut left[k * n..(k + 1) * n]);
                }
                let mut b = vec![0f32; cols * r];
                self.decode(&f.b, 0, &mut b);
                for c in 0..cols {
                    for k in 0..r {
                        right[k * cols + c] = b[c * r + k];
                    }
                }
            }
        }
        let mut delta = vec![0f32; cols];
        for i in 0..n {
            let row = first + i;
            let c0 = if i == 0 { start - row * cols } else { 0 };
            let c1 = if row == last { end - row * cols } else { cols };
            let d = &mut delta[c0..c1];
            d.fill(0.0);
            for k in 0..r {
                let l = left[k * n + i];
                for (d, &x) in d.iter_mut().zip(&right[k * cols + c0..k * cols + c1]) {
                    *d += l * x;
                }
            }
            let o = &mut out[row * cols + c0 - start..row * cols + c1 - start];
            for (o, &d) in o.iter_mut().zip(d.iter()) {
                *o += f.scale * d;
            }
        }
    }
}

fn c_scale(c: &AdapterConfig) -> f32 {
    (if c.use_rslora {
        c.alpha / (c.r as f64).sqrt()
    } else {
        c.alpha / c.r as f64
    }) as f32
}

/// A base model with a LoRA adapter folded in as it is read (`BASE+ADAPTER`).
pub struct LoraModel {
    base: Model,
    adapter: Adapter,
}

impl LoraModel {
    /// Open the base model directory and the adapter, and check the adapter against the base.
    pub fn open(base: &Path, adapter: &Path) -> Result<LoraModel> {
        if !adapter.exists() {
            return Err(config_err(
                adapter,
                format!(
                    "LoRA adapter directory does not exist (the ADAPTER of `{}+{}`)",
                    base.display(),
                    adapter.display()
                ),
            ));
        }
        if !base.is_dir() {
            return Err(config_err(
                base,
                format!(
                    "base model directory does not exist (the BASE of `{}+{}`)",
                    base.display(),
                    adapter.display()
                ),
            ));
        }
        let base = Model::open(base)?;
        let adapter = Adapter::open(adapter, &base)?;
        Ok(LoraModel { base, adapter })
    }

    /// The base model.
    pub fn base(&self) -> &Model {
        &self.base
    }

    /// The adapter.
    pub fn adapter(&self) -> &Adapter {
        &self.adapter
    }
}

impl TensorSource for LoraModel {
    fn config(&self) -> &serde_json::Value {
        self.base.config()
    }
    fn tensor_infos(&self) -> Vec<TensorInfo> {
        self.base.tensors().to_vec()
    }
    fn info(&self, name: &str) -> Option<TensorInfo> {
        self.base.tensor_info(name).cloned()
    }
    fn read_into(&self, name: &str, out: &mut [f32]) -> Result<()> {
        let info = self
            .base
            .tensor_info(name)
            .ok_or_else(|| Error::MissingTensor {
                model: PathBuf::from(self.label()),
                tensor: name.to_string(),
            })?;
        if out.len() != info.numel() {
            return Err(Error::Tensor {
                tensor: name.to_string(),
                msg: format!(
                    "output buffer holds {} values, tensor has {} (shape {:?})",
                    out.len(),
                    info.numel(),
                    info.shape
                ),
            });
        }
        self.read_range_into(name, 0, out)
    }
    fn read_range_into(&self, name: &str, start: usize, out: &mut [f32]) -> Result<()> {
        if let Some(e) = self.adapter.replaced.get(name) {
            let n: usize = e.shape.iter().product();
            if start.checked_add(out.len()).is_none_or(|end| end > n) {
                return Err(Error::Tensor {
                    tensor: name.to_string(),
                    msg: format!(
                        "elements {start}..{} requested, tensor has {n} (shape {:?})",
                        start.saturating_add(out.len()),
                        e.shape
                    ),
                });
            }
            self.adapter.decode(e, start, out);
            return Ok(());
        }
        self.base.read_range_into(name, start, out)?;
        if let Some(f) = self.adapter.folds.get(name) {
            self.adapter.add_delta(f, start, out);
        }
        Ok(())
    }
    fn label(&self) -> String {
        format!(
            "{}+{}",
            self.base.dir().display(),
            self.adapter.dir.display()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{ModelWriter, WriteConfig};

    fn cfg(extra: &str) -> AdapterConfig {
        let text = format!(r#"{{"peft_type": "LORA", "r": 4, "lora_alpha": 8{extra}}}"#);
        AdapterConfig::parse(Path::new("adapter_config.json"), &text).unwrap()
    }

    fn cfg_err(text: &str) -> String {
        AdapterConfig::parse(Path::new("a/adapter_config.json"), text)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn scale_is_alpha_over_r_or_sqrt_r() {
        assert_eq!(cfg("").scale("model.layers.0.self_attn.q_proj"), 2.0);
        assert_eq!(
            cfg(r#", "use_rslora": true"#).scale("model.layers.0.self_attn.q_proj"),
            4.0
        );
        let peft_defaults =
            AdapterConfig::parse(Path::new("x"), r#"{"peft_type": "LORA"}"#).unwrap();
        assert_eq!((peft_defaults.r, peft_defaults.alpha), (8, 8.0));
    }

    #[test]
    fn rank_and_alpha_patterns_match_module_suffixes_in_file_order() {
        let c = cfg(
            r#", "rank_pattern": {"layers.1.self_attn.q_proj": 2, "q_proj": 16},
                 "alpha_pattern": {"v_proj": 32, "model.layers.0.self_attn.v_proj": 1}"#,
        );
        assert_eq!(c.rank_alpha("model.layers.1.self_attn.q_proj"), (2, 8.0));
        assert_eq!(c.rank_alpha("model.layers.0.self_attn.q_proj"), (16, 8.0));
        // First key in file order wins (PEFT's get_pattern_key).
        assert_eq!(c.rank_alpha("model.layers.0.self_attn.v_proj"), (4, 32.0));
        // Suffixes match whole name segments only.
        assert_eq!(c.rank_alpha("model.layers.0.self_attn.xq_proj"), (4, 8.0));
        assert_eq!(c.scale("model.layers.1.self_attn.q_proj"), 4.0);
        let rs = cfg(r#", "use_rslora": true, "rank_pattern": {"k_proj": 16}"#);
        assert_eq!(rs.scale("model.layers.0.self_attn.k_proj"), 2.0);
    }

    #[test]
    fn target_modules_list_regex_and_all_linear() {
        let l = cfg(r#", "target_modules": ["q_proj", "v_proj"]"#);
        assert!(l.targets("model.layers.0.self_attn.q_proj"));
        assert!(!l.targets("model.layers.0.self_attn.k_proj"));
        let r = cfg(r#", "target_modules": ".*\\.(q|k)_proj""#);
        assert!(r.targets("model.layers.3.self_attn.k_proj"));
        assert!(!r.targets("model.layers.3.self_attn.v_proj"));
        assert!(cfg(r#", "target_modules": "all-linear""#).targets("lm_head"));
    }

    #[test]
    fn config_errors_are_clear() {
        assert!(cfg_err(r#"{"peft_type": "IA3"}"#).contains("peft_type is `IA3`"));
        assert!(cfg_err(r#"{"r": 4}"#).contains("no `peft_type`"));
        let e = cfg_err(r#"{"peft_type": "LORA", "fan_in_fan_out": true}"#);
        assert!(
            e.contains("a/adapter_config.json") && e.contains("fan_in_fan_out"),
            "{e}"
        );
        assert!(cfg_err(r#"{"peft_type": "LORA", "use_dora": true}"#).contains("DoRA"));
        assert!(cfg_err(r#"{"peft_type": "LORA", "r": 0}"#).contains("`r`"));
        // Unknown keys are fine.
        AdapterConfig::parse(
            Path::new("x"),
            r#"{"peft_type": "LORA", "task_type": "CAUSAL_LM", "lora_dropout": 0.05, "bias": "none"}"#,
        )
        .unwrap();
    }

    /// Write a safetensors file of f32 tensors.
    fn write_st(path: &Path, tensors: &[(&str, Vec<usize>, Vec<f32>)]) {
        let mut header = serde_json::Map::new();
        let mut data = Vec::new();
        for (name, shape, values) in tensors {
            let begin = data.len();
            data.extend(values.iter().flat_map(|v| v.to_le_bytes()));
            header.insert(
                name.to_string(),
                serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [begin, data.len()]}),
            );
        }
        let h = serde_json::to_vec(&Value::Object(header)).unwrap();
        let mut bytes = (h.len() as u64).to_le_bytes().to_vec();
        bytes.extend(h);
        bytes.extend(data);
        std::fs::write(path, bytes).unwrap();
    }

    fn vals(n: usize, seed: f32) -> Vec<f32> {
        (0..n)
            .map(|i| (i as f32 * 0.37 + seed).sin() * 0.5)
            .collect()
    }

    /// A base with `w` [6, 5] and `emb` [7, 3] (bf16 for `w`), and an adapter dir.
    fn setup(dir: &Path, adapter_tensors: &[(&str, Vec<usize>, Vec<f32>)], config: &str) {
        let infos = vec![
            TensorInfo {
                name: "emb.weight".into(),
                dtype: DType::F32,
                shape: vec![7, 3],
            },
            TensorInfo {
                name: "m.w.weight".into(),
                dtype: DType::BF16,
                shape: vec![6, 5],
            },
        ];
        let w = ModelWriter::create(&dir.join("base"), &infos, &WriteConfig::default()).unwrap();
        w.write("emb.weight", &vals(21, 1.0)).unwrap();
        w.write("m.w.weight", &vals(30, 2.0)).unwrap();
        w.finish(&serde_json::json!({"model_type": "llama"}), None, "")
            .unwrap();
        let a = dir.join("ad");
        std::fs::create_dir_all(&a).unwrap();
        std::fs::write(a.join(ADAPTER_CONFIG), config).unwrap();
        write_st(&a.join(ADAPTER_WEIGHTS), adapter_tensors);
    }

    fn good_tensors() -> Vec<(&'static str, Vec<usize>, Vec<f32>)> {
        vec![
            (
                "base_model.model.m.w.lora_A.weight",
                vec![2, 5],
                vals(10, 3.0),
            ),
            (
                "base_model.model.m.w.lora_B.weight",
                vec![6, 2],
                vals(12, 4.0),
            ),
            (
                "base_model.model.emb.lora_embedding_A",
                vec![2, 7],
                vals(14, 5.0),
            ),
            (
                "base_model.model.emb.lora_embedding_B",
                vec![3, 2],
                vals(6, 6.0),
            ),
        ]
    }

    const CONFIG: &str = r#"{"peft_type": "LORA", "r": 2, "lora_alpha": 3, "target_modules": ["w", "emb"], "rank_pattern": {}, "alpha_pattern": {"emb": 5}}"#;

    #[test]
    fn folds_linear_and_embedding_and_range_reads_equal_full_reads() {
        let tmp = tempfile::tempdir().unwrap();
        setup(tmp.path(), &good_tensors(), CONFIG);
        let reference = lref(tmp.path(), "ad");
        let src = open_ref(&reference).unwrap();
        assert_eq!(
            src.label(),
            format!(
                "{}+{}",
                tmp.path().join("base").display(),
                tmp.path().join("ad").display()
            )
        );
        assert_eq!(src.info("m.w.weight").unwrap().dtype, DType::BF16);
        let base = Model::open(tmp.path().join("base")).unwrap();
        // Linear: W + 1.5 · B·A.
        let (a, b) = (vals(10, 3.0), vals(12, 4.0));
        let w = base.read("m.w.weight").unwrap().values().to_vec();
        let mut got = vec![0f32; 30];
        src.read_into("m.w.weight", &mut got).unwrap();
        for o in 0..6 {
            for i in 0..5 {
                let d: f64 = (0..2).map(|k| (b[o * 2 + k] * a[k * 5 + i]) as f64).sum();
                let want = w[o * 5 + i] as f64 + 1.5 * d;
                assert!((got[o * 5 + i] as f64 - want).abs() < 1e-6, "{o},{i}");
            }
        }
        // Embedding: W + 2.5 · (B·A)ᵀ (alpha_pattern gives emb alpha 5).
        let (a, b) = (vals(14, 5.0), vals(6, 6.0));
        let e = base.read("emb.weight").unwrap().values().to_vec();
        let mut got_e = vec![0f32; 21];
        src.read_into("emb.weight", &mut got_e).unwrap();
        for v in 0..7 {
            for h in 0..3 {
                let d: f64 = (0..2).map(|k| (b[h * 2 + k] * a[k * 7 + v]) as f64).sum();
                let want = e[v * 3 + h] as f64 + 2.5 * d;
                assert!((got_e[v * 3 + h] as f64 - want).abs() < 1e-6, "{v},{h}");
            }
        }
        // Every sub-range equals the full read bit for bit.
        for (name, full) in [("m.w.weight", &got), ("emb.weight", &got_e)] {
            for start in 0..full.len() {
                for len in [1, 2, 4, 7, full.len() - start] {
                    let len = len.min(full.len() - start);
                    let mut part = vec![0f32; len];
                    src.read_range_into(name, start, &mut part).unwrap();
                    assert_eq!(part, full[start..start + len], "{name} {start}+{len}");
                }
            }
        }
        assert!(
            src.read_range_into("m.w.weight", 29, &mut [0.0; 2])
                .is_err()
        );
    }

    #[test]
    fn modules_to_save_replace_and_plain_peft_dir_uses_its_base() {
        let tmp = tempfile::tempdir().unwrap();
        let mut t = good_tensors();
        t.truncate(2);
        t.push((
            "base_model.model.emb.modules_to_save.default.weight",
            vec![7, 3],
            vals(21, 9.0),
        ));
        let config = format!(
            r#"{{"peft_type": "LORA", "r": 2, "lora_alpha": 2, "base_model_name_or_path": "{}"}}"#,
            tmp.path().join("base").display()
        );
        setup(tmp.path(), &t, &config);
        let src = open_ref(&tmp.path().join("ad")).unwrap();
        let mut e = vec![0f32; 21];
        src.read_into("emb.weight", &mut e).unwrap();
        assert_eq!(e, vals(21, 9.0));
        assert_eq!(base_dir_of(&tmp.path().join("ad")), tmp.path().join("base"));
        assert_eq!(
            base_dir_of(&lref(tmp.path(), "ad")),
            tmp.path().join("base")
        );
    }

    /// `DIR/base+DIR/ADAPTER`.
    fn lref(dir: &Path, adapter: &str) -> PathBuf {
        PathBuf::from(format!(
            "{}+{}",
            dir.join("base").display(),
            dir.join(adapter).display()
        ))
    }

    fn open_err(tensors: &[(&str, Vec<usize>, Vec<f32>)], config: &str) -> String {
        let tmp = tempfile::tempdir().unwrap();
        setup(tmp.path(), tensors, config);
        match open_ref(&lref(tmp.path(), "ad")) {
            Ok(_) => panic!("opened"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn adapter_errors_name_the_file_and_key() {
        let mut t = good_tensors();
        t.remove(1);
        let e = open_err(&t, CONFIG);
        assert!(
            e.contains("adapter_model.safetensors")
                && e.contains("`base_model.model.m.w.lora_A.weight`")
                && e.contains("no matching lora_B"),
            "{e}"
        );
        let mut t = good_tensors();
        t[0].0 = "base_model.model.m.x.lora_A.weight";
        t[1].0 = "base_model.model.m.x.lora_B.weight";
        let e = open_err(&t, r#"{"peft_type": "LORA", "r": 2}"#);
        assert!(
            e.contains("`base_model.model.m.x.lora_A.weight`")
                && e.contains("no tensor `m.x.weight`"),
            "{e}"
        );
        let mut t = good_tensors();
        t[0] = (
            "base_model.model.m.w.lora_A.weight",
            vec![2, 4],
            vals(8, 1.0),
        );
        let e = open_err(&t, CONFIG);
        assert!(e.contains("do not fit base tensor `m.w.weight`"), "{e}");
        let e = open_err(&good_tensors(), r#"{"peft_type": "LORA", "r": 4}"#);
        assert!(e.contains("r = 4"), "{e}");
        let e = open_err(
            &good_tensors(),
            r#"{"peft_type": "LORA", "r": 2, "target_modules": ["q_proj"]}"#,
        );
        assert!(e.contains("not among the adapter's target_modules"), "{e}");
        let mut t = good_tensors();
        t.push(("base_model.model.nothing.weight", vec![1], vec![0.0]));
        let e = open_err(&t, CONFIG);
        assert!(e.contains("`base_model.model.nothing.weight`"), "{e}");
    }

    #[test]
    fn references_split_as_mergekit_and_resolve_both_sides() {
        let tmp = tempfile::tempdir().unwrap();
        setup(tmp.path(), &good_tensors(), CONFIG);
        let d = tmp.path();
        assert_eq!(
            parse_ref(&lref(d, "ad")).unwrap(),
            ModelRefKind::Lora {
                base: d.join("base"),
                adapter: d.join("ad")
            }
        );
        assert_eq!(
            parse_ref(&d.join("base")).unwrap(),
            ModelRefKind::Plain(d.join("base"))
        );
        // Relative sides resolve against the file's directory.
        let r = resolve_ref(Path::new("base+ad"), Some(d));
        assert_eq!(
            r,
            PathBuf::from(format!(
                "{}+{}",
                d.join("base").display(),
                d.join("ad").display()
            ))
        );
        assert!(open_ref(&r).is_ok());
        assert_eq!(resolve_ref(Path::new("base"), Some(d)), d.join("base"));
        // A directory whose name has a `+` is a plain path.
        std::fs::create_dir(d.join("x+y")).unwrap();
        assert_eq!(
            parse_ref(&d.join("x+y")).unwrap(),
            ModelRefKind::Plain(d.join("x+y"))
        );
        // A missing adapter is named.
        let e = match open_ref(&lref(d, "nope")) {
            Ok(_) => panic!("opened"),
            Err(e) => e.to_string(),
        };
        assert!(
            e.contains(&d.join("nope").display().to_string()) && e.contains("adapter"),
            "{e}"
        );
        // A bin-only adapter is refused as such.
        std::fs::create_dir(d.join("bin")).unwrap();
        std::fs::write(d.join("bin").join(ADAPTER_CONFIG), CONFIG).unwrap();
        std::fs::write(d.join("bin").join(ADAPTER_BIN), b"x").unwrap();
        let e = match open_ref(&lref(d, "bin")) {
            Ok(_) => panic!("opened"),
            Err(e) => e.to_string(),
        };
        assert!(e.contains("only safetensors"), "{e}");
    }
}
