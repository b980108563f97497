//! Importing a llama.cpp GGUF checkpoint as a Hugging Face model directory.
//!
//! ```no_run
//! use evomerge::store::gguf::{ImportConfig, import_gguf};
//! use evomerge::tensor::DType;
//! # fn main() -> evomerge::Result<()> {
//! let config = ImportConfig { dtype: DType::F32 };
//! let summary = import_gguf("SmolLM2.Q4_1.gguf".as_ref(), "models/smol".as_ref(), &config)?;
//! println!("{} tensors of a {} model", summary.tensors, summary.arch);
//! # Ok(())
//! # }
//! ```
//!
//! What is converted:
//!
//! - **Tensors**, read with candle's GGUF reader and dequantized to `f32` (any GGML type candle
//!   knows: F32/F16/BF16, Q4_0 … Q8_0, the K-quants), renamed from llama.cpp to Hugging Face
//!   names (`token_embd` → `model.embed_tokens`, `blk.N.attn_q` → `model.layers.N.self_attn.q_proj`,
//!   …, `output` → `lm_head`; see [`hf_name`]) and written in the requested dtype through
//!   [`ModelWriter`]. For the `llama` architecture, llama.cpp's converter interleaves the two
//!   rotary halves of every q and k head (`permute` in `convert_hf_to_gguf.py`); the rows are put
//!   back in Hugging Face order ([`unpermute_rows`]). `qwen2` files are not permuted.
//! - **config.json** from the `<arch>.*` metadata (layers, sizes, heads, RoPE base and linear
//!   scaling, RMSNorm epsilon, context length) and the `tokenizer.ggml.*` ids; `vocab_size` is
//!   the embedding's row count, `tie_word_embeddings` is true when there is no `output.weight`.
//!   The tensor shapes are then checked against what that config implies.
//! - **tokenizer.json** for `tokenizer.ggml.model = "gpt2"` (byte-level BPE): the token list and
//!   merges, control tokens (`token_type` 3) and the bos / eos / unk / pad tokens as special added
//!   tokens, user-defined tokens (type 4) as plain added tokens, and the pre-tokenizer that
//!   llama.cpp applies for `tokenizer.ggml.pre` (see [`pre_tokenizer`]). It is loaded back with
//!   the `tokenizers` crate before anything is written.
//! - **tokenizer_config.json** (`bos_token`, `eos_token`, `add_bos_token`, `chat_template`) and
//!   **generation_config.json** (bos / eos ids).
//!
//! Everything is written into a temporary directory beside the target and renamed into place at
//! the end, so a failure leaves nothing under the target name. Errors name the GGUF file and the
//! metadata key or tensor. Other architectures, SentencePiece (`llama`) tokenizers, unknown
//! pre-tokenizers and Llama 3.1's `rope_freqs` are refused with an error saying so.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use candle_core::Device;
use candle_core::quantized::gguf_file::{Content, Value as GValue};
use rayon::prelude::*;
use serde_json::{Map, Value, json};

use super::TensorInfo;
use super::writer::{ModelWriter, WriteConfig};
use crate::error::{Error, Result};
use crate::model::transformer::LlamaConfig;
use crate::tensor::DType;

/// Options of [`import_gguf`].
#[derive(Clone, Debug)]
pub struct ImportConfig {
    /// Dtype of the written safetensors. Default bf16.
    pub dtype: DType,
}

impl Default for ImportConfig {
    fn default() -> Self {
        ImportConfig { dtype: DType::BF16 }
    }
}

/// What [`import_gguf`] wrote.
#[derive(Clone, Debug)]
pub struct ImportSummary {
    /// The model directory.
    pub dir: PathBuf,
    /// `general.architecture` (`llama` or `qwen2`).
    pub arch: String,
    /// Number of tensors written.
    pub tensors: usize,
    /// Count of source tensors per GGML type (`Q4_1`, `F32`, …).
    pub ggml_types: BTreeMap<String, usize>,
    /// Tokens in the vocabulary.
    pub vocab: usize,
}

/// The architectures [`import_gguf`] converts.
pub const SUPPORTED_ARCHS: &[&str] = &["llama", "qwen2"];

/// Convert the GGUF file `file` into a Hugging Face model directory `out` (which must not exist).
pub fn import_gguf(file: &Path, out: &Path, config: &ImportConfig) -> Result<ImportSummary> {
    let bad = |msg: String| Error::Config {
        path: file.to_path_buf(),
        msg,
    };
    let mut reader = File::open(file).map_err(|e| Error::io(file, e))?;
    let content =
        Content::read(&mut reader).map_err(|e| bad(format!("not a readable GGUF file: {e}")))?;
    let meta = Meta {
        path: file,
        md: &content.metadata,
    };
    let arch = meta.str("general.architecture")?.to_string();
    if !SUPPORTED_ARCHS.contains(&arch.as_str()) {
        return Err(bad(format!(
            "architecture `{arch}` is not supported (supported: {})",
            SUPPORTED_ARCHS.join(", ")
        )));
    }

    // Names, shapes and source types of the output tensors.
    let mut plan = Vec::with_capacity(content.tensor_infos.len());
    let mut ggml_types = BTreeMap::new();
    for (gguf_name, info) in &content.tensor_infos {
        let hf = hf_name(gguf_name).ok_or_else(|| {
            let why = if gguf_name == "rope_freqs.weight" {
                "Llama 3.1 RoPE frequency factors are not supported".to_string()
            } else {
                "no Hugging Face name for this llama.cpp tensor".to_string()
            };
            Error::BadTensor {
                path: file.to_path_buf(),
                tensor: gguf_name.clone(),
                msg: why,
            }
        })?;
        *ggml_types
            .entry(format!("{:?}", info.ggml_dtype))
            .or_insert(0usize) += 1;
        plan.push((gguf_name.clone(), hf, info.shape.dims().to_vec()));
    }
    plan.sort_by(|a, b| a.1.cmp(&b.1));

    let shape_of = |hf: &str| plan.iter().find(|p| p.1 == hf).map(|p| p.2.clone());
    let embed = shape_of("model.embed_tokens.weight").ok_or_else(|| Error::BadTensor {
        path: file.to_path_buf(),
        tensor: "token_embd.weight".into(),
        msg: "missing".into(),
    })?;
    let tied = shape_of("lm_head.weight").is_none();
    let qkv_bias = shape_of("model.layers.0.self_attn.q_proj.bias").is_some();
    let vocab_rows = embed[0];

    let tok = TokenizerParts::read(&meta)?;
    if tok.tokens.len() > vocab_rows {
        return Err(bad(format!(
            "`tokenizer.ggml.tokens` lists {} tokens but token_embd.weight has {vocab_rows} rows",
            tok.tokens.len()
        )));
    }
    let hf_config = hf_config(&meta, &arch, vocab_rows, tied, &tok, config.dtype)?;

    // The shapes must be exactly those the config implies.
    let llama = LlamaConfig::from_json(&hf_config).map_err(|e| bad(format!("{e}")))?;
    let expected: BTreeMap<String, Vec<usize>> =
        llama.tensor_shapes(qkv_bias).into_iter().collect();
    for (gguf_name, hf, shape) in &plan {
        match expected.get(hf) {
            Some(want) if want == shape => {}
            Some(want) => {
                return Err(Error::BadTensor {
                    path: file.to_path_buf(),
                    tensor: gguf_name.clone(),
                    msg: format!("shape {shape:?}, but the metadata implies {want:?} for `{hf}`"),
                });
            }
            None => {
                return Err(Error::BadTensor {
                    path: file.to_path_buf(),
                    tensor: gguf_name.clone(),
                    msg: format!("`{hf}` does not belong to a {arch} model of this config"),
                });
            }
        }
    }
    if let Some(missing) = expected.keys().find(|k| !plan.iter().any(|p| &p.1 == *k)) {
        return Err(bad(format!("tensor for `{missing}` is missing")));
    }

    let tokenizer = tokenizer_json(&meta, &tok)?;
    let tokenizer_config = tokenizer_config(&meta, &tok)?;

    let infos: Vec<TensorInfo> = plan
        .iter()
        .map(|(_, hf, shape)| TensorInfo {
            name: hf.clone(),
            dtype: config.dtype,
            shape: shape.clone(),
        })
        .collect();
    let writer = ModelWriter::create(out, &infos, &WriteConfig::default())?;

    // Tokenizer files go through a staging directory that the writer copies as donor files.
    let staging = Staging::create(out)?;
    let tok_path = staging.0.join("tokenizer.json");
    write_json(&tok_path, &tokenizer)?;
    tokenizers::Tokenizer::from_file(&tok_path).map_err(|e| {
        bad(format!(
            "the tokenizer.json built from its metadata does not load: {e}"
        ))
    })?;
    write_json(&staging.0.join("tokenizer_config.json"), &tokenizer_config)?;
    let mut generation = Map::new();
    for (key, id) in [("bos_token_id", tok.bos), ("eos_token_id", tok.eos)] {
        if let Some(id) = id {
            generation.insert(key.into(), json!(id));
        }
    }
    write_json(
        &staging.0.join("generation_config.json"),
        &Value::Object(generation),
    )?;

    let (n_head, n_kv) = (llama.num_attention_heads, llama.num_key_value_heads);
    let permuted = arch == "llama";
    plan.par_iter()
        .try_for_each(|(gguf_name, hf, shape)| -> Result<()> {
            let tensor_err = |msg: String| Error::BadTensor {
                path: file.to_path_buf(),
                tensor: gguf_name.clone(),
                msg,
            };
            let mut f = File::open(file).map_err(|e| Error::io(file, e))?;
            let q = content
                .tensor(&mut f, gguf_name, &Device::Cpu)
                .map_err(|e| tensor_err(format!("cannot read: {e}")))?;
            let data: Vec<f32> = q
                .dequantize(&Device::Cpu)
                .and_then(|t| t.flatten_all()?.to_vec1())
                .map_err(|e| tensor_err(format!("cannot dequantize: {e}")))?;
            let heads = if !permuted {
                None
            } else if hf.ends_with("q_proj.weight") || hf.ends_with("q_proj.bias") {
                Some(n_head)
            } else if hf.ends_with("k_proj.weight") || hf.ends_with("k_proj.bias") {
                Some(n_kv)
            } else {
                None
            };
            let data = match heads {
                Some(n) => {
                    let cols = shape[1..].iter().product();
                    unpermute_rows(&data, shape[0], cols, n).map_err(tensor_err)?
                }
                None => data,
            };
            writer.write(hf, &data)
        })?;

    let card = format!(
        "# {}\n\nImported by `evomerge import-gguf` from `{}` ({arch}; {}).\n",
        out.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        file.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        ggml_types
            .iter()
            .map(|(t, n)| format!("{n} × {t}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let dir = writer.finish(&hf_config, Some(&staging.0), &card)?;
    Ok(ImportSummary {
        dir,
        arch,
        tensors: plan.len(),
        ggml_types,
        vocab: tok.tokens.len(),
    })
}

/// The Hugging Face name of a llama.cpp tensor of a Llama / Qwen2 model, if it has one.
pub fn hf_name(gguf: &str) -> Option<String> {
    match gguf {
        "token_embd.weight" => return Some("model.embed_tokens.weight".into()),
        "output_norm.weight" => return Some("model.norm.weight".into()),
        "output.weight" => return Some("lm_head.weight".into()),
        _ => {}
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (part, kind) = rest.rsplit_once('.')?;
    if kind != "weight" && kind != "bias" {
        return None;
    }
    let hf = match part {
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{kind}"))
}

/// Undo llama.cpp's q / k permutation: `convert_hf_to_gguf.py` stores Hugging Face row
/// `h·d + j·d/2 + i` (head `h`, half `j`, index `i`) at row `h·d + 2i + j`, where `d` is the
/// head dimension (`w.reshape(n_head, 2, d/2, …).swapaxes(1, 2)`). `data` is `rows × cols`,
/// row-major; returns the rows in Hugging Face order.
pub fn unpermute_rows(
    data: &[f32],
    rows: usize,
    cols: usize,
    n_head: usize,
) -> std::result::Result<Vec<f32>, String> {
    if n_head == 0 || !rows.is_multiple_of(2 * n_head) || data.len() != rows * cols {
        return Err(format!(
            "cannot undo the rotary permutation: {rows} rows × {cols} columns ({} values) \
             over {n_head} heads",
            data.len()
        ));
    }
    let d = rows / n_head;
    let half = d / 2;
    let mut out = vec![0f32; data.len()];
    for h in 0..n_head {
        for j in 0..2 {
            for i in 0..half {
                let src = h * d + 2 * i + j;
                let dst = h * d + j * half + i;
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&data[src * cols..][..cols]);
            }
        }
    }
    Ok(out)
}

/// Typed access to the GGUF metadata, with errors naming the file and key.
struct Meta<'a> {
    path: &'a Path,
    md: &'a HashMap<String, GValue>,
}

impl Meta<'_> {
    fn err(&self, key: &str, msg: impl std::fmt::Display) -> Error {
        Error::Config {
            path: self.path.to_path_buf(),
            msg: format!("metadata `{key}`: {msg}"),
        }
    }

    fn get(&self, key: &str) -> Option<&GValue> {
        self.md.get(key)
    }

    fn need(&self, key: &str) -> Result<&GValue> {
        self.get(key).ok_or_else(|| self.err(key, "missing"))
    }

    fn str(&self, key: &str) -> Result<&str> {
        match self.need(key)? {
            GValue::String(s) => Ok(s),
            other => Err(self.err(key, format!("expected a string, got {other:?}"))),
        }
    }

    fn opt_str(&self, key: &str) -> Result<Option<&str>> {
        self.get(key).map(|_| self.str(key)).transpose()
    }

    fn opt_u64(&self, key: &str) -> Result<Option<u64>> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let n = match v {
            GValue::U8(x) => *x as i128,
            GValue::I8(x) => *x as i128,
            GValue::U16(x) => *x as i128,
            GValue::I16(x) => *x as i128,
            GValue::U32(x) => *x as i128,
            GValue::I32(x) => *x as i128,
            GValue::U64(x) => *x as i128,
            GValue::I64(x) => *x as i128,
            other => return Err(self.err(key, format!("expected an integer, got {other:?}"))),
        };
        u64::try_from(n)
            .map(Some)
            .map_err(|_| self.err(key, format!("negative value {n}")))
    }

    fn usize(&self, key: &str) -> Result<usize> {
        self.opt_u64(key)?
            .map(|n| n as usize)
            .ok_or_else(|| self.err(key, "missing"))
    }

    fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        Ok(match self.get(key) {
            None => None,
            Some(GValue::F32(x)) => Some(*x as f64),
            Some(GValue::F64(x)) => Some(*x),
            Some(_) => self.opt_u64(key)?.map(|n| n as f64),
        })
    }

    fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(GValue::Bool(b)) => Ok(Some(*b)),
            Some(other) => Err(self.err(key, format!("expected a bool, got {other:?}"))),
        }
    }

    fn array(&self, key: &str) -> Result<&[GValue]> {
        match self.need(key)? {
            GValue::Array(a) => Ok(a),
            other => Err(self.err(
                key,
                format!("expected an array, got {:?}", other.value_type()),
            )),
        }
    }

    fn strings(&self, key: &str) -> Result<Vec<String>> {
        self.array(key)?
            .iter()
            .enumerate()
            .map(|(i, v)| match v {
                GValue::String(s) => Ok(s.clone()),
                other => Err(self.err(
                    key,
                    format!("entry {i}: expected a string, got {:?}", other.value_type()),
                )),
            })
            .collect()
    }

    fn ints(&self, key: &str) -> Result<Vec<i64>> {
        self.array(key)?
            .iter()
            .enumerate()
            .map(|(i, v)| match v {
                GValue::I32(x) => Ok(*x as i64),
                GValue::U32(x) => Ok(*x as i64),
                GValue::I64(x) => Ok(*x),
                GValue::U8(x) => Ok(*x as i64),
                GValue::I8(x) => Ok(*x as i64),
                other => Err(self.err(
                    key,
                    format!(
                        "entry {i}: expected an integer, got {:?}",
                        other.value_type()
                    ),
                )),
            })
            .collect()
    }

    /// A token id key, checked against the vocabulary size.
    fn token_id(&self, key: &str, vocab: usize) -> Result<Option<u32>> {
        match self.opt_u64(key)? {
            None => Ok(None),
            Some(id) if (id as usize) < vocab => Ok(Some(id as u32)),
            Some(id) => Err(self.err(key, format!("id {id} is outside the {vocab} tokens"))),
        }
    }
}

/// GGUF `token_type` of a control token.
const TOKEN_CONTROL: i64 = 3;
/// GGUF `token_type` of a user-defined token.
const TOKEN_USER_DEFINED: i64 = 4;

/// The tokenizer metadata of a GGUF file.
struct TokenizerParts {
    tokens: Vec<String>,
    types: Vec<i64>,
    merges: Vec<String>,
    pre: Option<String>,
    bos: Option<u32>,
    eos: Option<u32>,
    unk: Option<u32>,
    pad: Option<u32>,
    add_bos: bool,
}

impl TokenizerParts {
    fn read(meta: &Meta) -> Result<Self> {
        let model = meta.str("tokenizer.ggml.model")?;
        if model != "gpt2" {
            let what = match model {
                "llama" => " (SentencePiece)",
                "bert" => " (WordPiece)",
                _ => "",
            };
            return Err(meta.err(
                "tokenizer.ggml.model",
                format!(
                    "tokenizer model `{model}`{what} is not supported; only `gpt2` (byte-level \
                     BPE) is"
                ),
            ));
        }
        let tokens = meta.strings("tokenizer.ggml.tokens")?;
        let types = match meta.get("tokenizer.ggml.token_type") {
            Some(_) => meta.ints("tokenizer.ggml.token_type")?,
            None => vec![1; tokens.len()],
        };
        if types.len() != tokens.len() {
            return Err(meta.err(
                "tokenizer.ggml.token_type",
                format!("{} entries for {} tokens", types.len(), tokens.len()),
            ));
        }
        let merges = meta.strings("tokenizer.ggml.merges")?;
        let n = tokens.len();
        Ok(TokenizerParts {
            pre: meta.opt_str("tokenizer.ggml.pre")?.map(str::to_string),
            bos: meta.token_id("tokenizer.ggml.bos_token_id", n)?,
            eos: meta.token_id("tokenizer.ggml.eos_token_id", n)?,
            unk: meta.token_id("tokenizer.ggml.unknown_token_id", n)?,
            pad: meta.token_id("tokenizer.ggml.padding_token_id", n)?,
            add_bos: meta
                .opt_bool("tokenizer.ggml.add_bos_token")?
                .unwrap_or(false),
            tokens,
            types,
            merges,
        })
    }

    fn text(&self, id: Option<u32>) -> Option<&str> {
        id.map(|i| self.tokens[i as usize].as_str())
    }
}

/// The config.json of the imported model.
fn hf_config(
    meta: &Meta,
    arch: &str,
    vocab_size: usize,
    tied: bool,
    tok: &TokenizerParts,
    dtype: DType,
) -> Result<Value> {
    let k = |name: &str| format!("{arch}.{name}");
    let hidden = meta.usize(&k("embedding_length"))?;
    let heads = meta.usize(&k("attention.head_count"))?;
    let kv_heads = meta
        .opt_u64(&k("attention.head_count_kv"))?
        .map_or(heads, |n| n as usize);
    let mut c = Map::new();
    let (class, model_type) = match arch {
        "llama" => ("LlamaForCausalLM", "llama"),
        _ => ("Qwen2ForCausalLM", "qwen2"),
    };
    c.insert("architectures".into(), json!([class]));
    c.insert("model_type".into(), json!(model_type));
    c.insert("hidden_act".into(), json!("silu"));
    c.insert("hidden_size".into(), json!(hidden));
    c.insert(
        "intermediate_size".into(),
        json!(meta.usize(&k("feed_forward_length"))?),
    );
    c.insert(
        "num_hidden_layers".into(),
        json!(meta.usize(&k("block_count"))?),
    );
    c.insert("num_attention_heads".into(), json!(heads));
    c.insert("num_key_value_heads".into(), json!(kv_heads));
    let head_dim = meta
        .opt_u64(&k("attention.key_length"))?
        .or(meta.opt_u64(&k("rope.dimension_count"))?);
    if let Some(d) = head_dim
        && heads > 0
        && d as usize * heads != hidden
    {
        c.insert("head_dim".into(), json!(d));
    }
    let eps_key = k("attention.layer_norm_rms_epsilon");
    let eps = meta
        .opt_f64(&eps_key)?
        .ok_or_else(|| meta.err(&eps_key, "missing"))?;
    c.insert("rms_norm_eps".into(), json!(eps));
    c.insert(
        "rope_theta".into(),
        json!(meta.opt_f64(&k("rope.freq_base"))?.unwrap_or(10_000.0)),
    );
    let scaling_key = k("rope.scaling.type");
    match meta.opt_str(&scaling_key)? {
        None | Some("none") => {
            c.insert("rope_scaling".into(), Value::Null);
        }
        Some("linear") => {
            let factor_key = k("rope.scaling.factor");
            let factor = meta
                .opt_f64(&factor_key)?
                .ok_or_else(|| meta.err(&factor_key, "missing (rope.scaling.type is linear)"))?;
            c.insert(
                "rope_scaling".into(),
                json!({"type": "linear", "rope_type": "linear", "factor": factor}),
            );
        }
        Some(other) => {
            return Err(meta.err(
                &scaling_key,
                format!("RoPE scaling `{other}` is not supported (none or linear)"),
            ));
        }
    }
    if let Some(ctx) = meta.opt_u64(&k("context_length"))? {
        c.insert("max_position_embeddings".into(), json!(ctx));
    }
    c.insert("vocab_size".into(), json!(vocab_size));
    c.insert("tie_word_embeddings".into(), json!(tied));
    if arch == "llama" {
        c.insert("attention_bias".into(), json!(false));
        c.insert("mlp_bias".into(), json!(false));
    }
    if let Some(id) = tok.bos {
        c.insert("bos_token_id".into(), json!(id));
    }
    if let Some(id) = tok.eos {
        c.insert("eos_token_id".into(), json!(id));
    }
    if let Some(id) = tok.pad {
        c.insert("pad_token_id".into(), json!(id));
    }
    c.insert("torch_dtype".into(), json!(dtype.torch_name()));
    Ok(Value::Object(c))
}

/// GPT-2's pre-tokenization regex is ByteLevel's built-in one (`use_regex: true`).
fn byte_level(use_regex: bool) -> Value {
    json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true,
           "use_regex": use_regex})
}

fn split_then_byte_level(regex: &str) -> Value {
    json!({"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false},
        byte_level(false),
    ]})
}

/// Qwen2's split regex (its tokenizer.json; llama.cpp's `qwen2` pre-tokenizer).
const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Llama 3's split regex (its tokenizer.json; llama.cpp's `llama-bpe` pre-tokenizer).
const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The `tokenizers` pre-tokenizer (and normalizer) for llama.cpp's `tokenizer.ggml.pre`:
///
/// | `pre` | pre-tokenizer |
/// |---|---|
/// | absent, `default`, `gpt2` | ByteLevel with GPT-2's regex |
/// | `smollm`, `starcoder`, `refact` | each digit split off (`Digits`), then ByteLevel — llama.cpp's `\p{N}` split before GPT-2's regex, as SmolLM2's own tokenizer.json does |
/// | `qwen2` | NFC, Qwen2's regex, ByteLevel |
/// | `llama-bpe` | Llama 3's regex, ByteLevel (and BPE `ignore_merges`) |
///
/// Other values are an error: tokenizing with the wrong split would silently change the ids.
fn pre_tokenizer(meta: &Meta, pre: Option<&str>) -> Result<(Value, Value)> {
    Ok(match pre {
        None | Some("default") | Some("gpt2") => (Value::Null, byte_level(true)),
        Some("smollm") | Some("starcoder") | Some("refact") => (
            Value::Null,
            json!({"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": true},
                byte_level(true),
            ]}),
        ),
        Some("qwen2") => (json!({"type": "NFC"}), split_then_byte_level(QWEN2_REGEX)),
        Some("llama-bpe") => (Value::Null, split_then_byte_level(LLAMA3_REGEX)),
        Some(other) => {
            return Err(meta.err(
                "tokenizer.ggml.pre",
                format!(
                    "pre-tokenizer `{other}` is not supported (gpt2, smollm, starcoder, refact, \
                     qwen2, llama-bpe)"
                ),
            ));
        }
    })
}

/// The Hugging Face tokenizer.json for a `gpt2` (byte-level BPE) GGUF tokenizer.
fn tokenizer_json(meta: &Meta, tok: &TokenizerParts) -> Result<Value> {
    let (normalizer, pre) = pre_tokenizer(meta, tok.pre.as_deref())?;
    let mut vocab = Map::new();
    for (id, t) in tok.tokens.iter().enumerate() {
        vocab.insert(t.clone(), json!(id));
    }
    let merges = tok
        .merges
        .iter()
        .enumerate()
        .map(|(i, m)| {
            // llama.cpp splits at the first space after the first character.
            let at = m
                .char_indices()
                .skip(1)
                .find(|&(_, c)| c == ' ')
                .map(|(i, _)| i);
            match at {
                Some(at) => Ok(json!([&m[..at], &m[at + 1..]])),
                None => Err(meta.err(
                    "tokenizer.ggml.merges",
                    format!("entry {i} ({m:?}) is not two tokens separated by a space"),
                )),
            }
        })
        .collect::<Result<Vec<_>>>()?;
    let specials: Vec<u32> = [tok.bos, tok.eos, tok.unk, tok.pad]
        .into_iter()
        .flatten()
        .collect();
    let added: Vec<Value> = tok
        .types
        .iter()
        .enumerate()
        .filter_map(|(id, &ty)| {
            let special = ty == TOKEN_CONTROL || specials.contains(&(id as u32));
            (special || ty == TOKEN_USER_DEFINED).then(|| {
                json!({"id": id, "content": tok.tokens[id], "single_word": false,
                       "lstrip": false, "rstrip": false, "normalized": false,
                       "special": special})
            })
        })
        .collect();
    let post = match (tok.add_bos, tok.text(tok.bos)) {
        (true, Some(bos)) => {
            let piece = |seq: &str| {
                json!([{"SpecialToken": {"id": bos, "type_id": 0}},
                       {"Sequence": {"id": seq, "type_id": 0}}])
            };
            let mut pair = piece("A").as_array().cloned().unwrap_or_default();
            pair.extend(piece("B").as_array().cloned().unwrap_or_default());
            json!({"type": "TemplateProcessing", "single": piece("A"), "pair": pair,
                   "special_tokens": {bos: {"id": bos, "ids": [tok.bos], "tokens": [bos]}}})
        }
        _ => json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false,
                    "use_regex": true}),
    };
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": normalizer,
        "pre_tokenizer": pre,
        "post_processor": post,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true,
                    "use_regex": true},
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": tok.text(tok.unk),
            "continuing_subword_prefix": "",
            "end_of_word_suffix": "",
            "fuse_unk": false,
            "byte_fallback": false,
            "ignore_merges": tok.pre.as_deref() == Some("llama-bpe"),
            "vocab": vocab,
            "merges": merges,
        },
    }))
}

/// tokenizer_config.json: special tokens, `add_bos_token`, the chat template.
fn tokenizer_config(meta: &Meta, tok: &TokenizerParts) -> Result<Value> {
    let mut c = Map::new();
    c.insert("tokenizer_class".into(), json!("PreTrainedTokenizerFast"));
    c.insert("add_bos_token".into(), json!(tok.add_bos));
    c.insert(
        "add_eos_token".into(),
        json!(
            meta.opt_bool("tokenizer.ggml.add_eos_token")?
                .unwrap_or(false)
        ),
    );
    for (key, id) in [
        ("bos_token", tok.bos),
        ("eos_token", tok.eos),
        ("unk_token", tok.unk),
        ("pad_token", tok.pad),
    ] {
        if let Some(text) = tok.text(id) {
            c.insert(key.into(), json!(text));
        }
    }
    c.insert("clean_up_tokenization_spaces".into(), json!(false));
    if let Some(t) = meta.opt_str("tokenizer.chat_template")? {
        c.insert("chat_template".into(), json!(t));
    }
    let arch = meta.str("general.architecture")?;
    if let Some(ctx) = meta.opt_u64(&format!("{arch}.context_length"))? {
        c.insert("model_max_length".into(), json!(ctx));
    }
    Ok(Value::Object(c))
}

fn write_json(path: &Path, value: &Value) -> Result<()> {
    let mut text = serde_json::to_string_pretty(value)
        .map_err(|e| Error::msg(format!("{}: encoding JSON: {e}", path.display())))?;
    text.push('\n');
    std::fs::write(path, text).map_err(|e| Error::io(path, e))
}

/// A scratch directory beside the target for the tokenizer files, removed on drop.
struct Staging(PathBuf);

impl Staging {
    fn create(target: &Path) -> Result<Self> {
        let name = target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into());
        let parent = match target.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        for n in 0.. {
            let dir = parent.join(format!(".{name}.gguf-{}-{n}", std::process::id()));
            match std::fs::create_dir(&dir) {
                Ok(()) => return Ok(Staging(dir)),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(Error::io(&dir, e)),
            }
        }
        unreachable!("an unbounded loop returns")
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `convert_hf_to_gguf.py`'s permute on a rows × 1 column of row indices.
    fn permute(rows: usize, n_head: usize) -> Vec<f32> {
        let d = rows / n_head;
        let mut out = Vec::new();
        for h in 0..n_head {
            for i in 0..d / 2 {
                for j in 0..2 {
                    out.push((h * d + j * d / 2 + i) as f32);
                }
            }
        }
        out
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        // 2 heads of dim 4: file rows are [0 2 1 3 | 4 6 5 7].
        let p = permute(8, 2);
        assert_eq!(p, vec![0., 2., 1., 3., 4., 6., 5., 7.]);
        let back = unpermute_rows(&p, 8, 1, 2).unwrap();
        assert_eq!(back, (0..8).map(|i| i as f32).collect::<Vec<_>>());
        // Two columns move with their row.
        let wide: Vec<f32> = p.iter().flat_map(|&r| [r, -r]).collect();
        let back = unpermute_rows(&wide, 8, 2, 2).unwrap();
        assert_eq!(back[4..6], [2.0, -2.0]);
        assert!(unpermute_rows(&p, 8, 1, 3).is_err());
    }

    #[test]
    fn names_map_to_hugging_face() {
        assert_eq!(
            hf_name("blk.11.attn_output.weight").unwrap(),
            "model.layers.11.self_attn.o_proj.weight"
        );
        assert_eq!(
            hf_name("blk.0.attn_k.bias").unwrap(),
            "model.layers.0.self_attn.k_proj.bias"
        );
        assert_eq!(
            hf_name("blk.3.ffn_norm.weight").unwrap(),
            "model.layers.3.post_attention_layernorm.weight"
        );
        assert_eq!(hf_name("output.weight").unwrap(), "lm_head.weight");
        assert_eq!(hf_name("rope_freqs.weight"), None);
        assert_eq!(hf_name("blk.x.attn_q.weight"), None);
    }
}
