//! A decoder-only transformer of the Llama / Mistral / Qwen2 family, written with plain
//! differentiable candle ops so the same code scores candidates, trains the toy world and can be
//! differentiated for Fisher information.
//!
//! Architecture (HF `LlamaForCausalLM` / `Qwen2ForCausalLM`): token embeddings, then per layer
//! `h += o_proj(attn(rope(q), rope(k), v))` on `input_layernorm(h)` and
//! `h += down_proj(silu(gate_proj(x)) * up_proj(x))` on `post_attention_layernorm(h)`, a final
//! RMSNorm and the LM head (or the tied embedding matrix). Attention is causal, grouped-query
//! (`num_key_value_heads` ≤ `num_attention_heads`), with rotary embeddings in the HF
//! `rotate_half` convention (plain, `linear` or Llama 3.1's `llama3` frequency scaling; other
//! scalings are refused) and optional q/k/v biases (Qwen2). Logits come back for every position.
//!
//! ```no_run
//! # use evomerge::model::transformer::Transformer;
//! # fn demo(mem: &evomerge::candidate::MemModel) -> evomerge::Result<()> {
//! let dev = candle_core::Device::Cpu;
//! let model = Transformer::from_mem(mem, &dev, candle_core::DType::F32)?;
//! let ids = candle_core::Tensor::new(&[[1u32, 5, 7]], &dev)?;
//! let logits = model.logits(&ids)?; // [1, 3, vocab]
//! # Ok(()) }
//! ```
//!
//! A data-flow route ([`forward_route`]) runs the embeddings and head of one model and any
//! sequence of layers taken from several models, scaling the hidden state before each hop
//! (Akiba et al. 2024, "Evolutionary Optimization of Model Merging Recipes").
//!
//! Every op here has a backward pass in candle (no fused kernels): RMSNorm, softmax and RoPE are
//! written out with elementwise ops and reductions.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{D, DType, Device, Tensor};
use serde_json::Value;

use crate::candidate::{MemModel, Route};
use crate::error::{Error, Result};
use crate::model::decode::Stack;
use crate::model::{CausalLm, Decode};
use crate::store::TensorSource;

/// The config.json fields the forward reads.
#[derive(Clone, Debug, PartialEq)]
pub struct LlamaConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    /// RoPE frequency scaling (`rope_scaling` / `rope_parameters`).
    pub rope_scaling: RopeScaling,
    pub vocab_size: usize,
    pub tie_word_embeddings: bool,
}

fn cfg_err(msg: String) -> Error {
    Error::Config {
        path: PathBuf::from("config.json"),
        msg,
    }
}

fn get_usize(v: &Value, key: &str) -> Result<usize> {
    v.get(key)
        .and_then(Value::as_u64)
        .map(|x| x as usize)
        .ok_or_else(|| cfg_err(format!("missing or non-integer `{key}`")))
}

/// How RoPE frequencies are scaled for long context (transformers' `rope_type`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE (`default`).
    None,
    /// `linear` (position interpolation, Chen et al. 2023): every frequency ÷ `factor`.
    Linear { factor: f64 },
    /// `llama3` (Llama 3.1+): wavelengths above `original / low_freq_factor` ÷ `factor`, those
    /// below `original / high_freq_factor` unchanged, a smooth blend between.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
}

/// `rope_theta` and the frequency scaling, from the top level and `rope_scaling`
/// (transformers 4) or `rope_parameters` (transformers 5). `linear` and `llama3` scaling are
/// implemented; another type (`yarn`, `dynamic`, ...) is an error rather than silently
/// different logits.
fn rope_settings(v: &Value) -> Result<(f64, RopeScaling)> {
    let mut theta = v
        .get("rope_theta")
        .and_then(Value::as_f64)
        .unwrap_or(10_000.0);
    let mut scaling = RopeScaling::None;
    for key in ["rope_scaling", "rope_parameters"] {
        let Some(p) = v.get(key).filter(|p| !p.is_null()) else {
            continue;
        };
        if let Some(t) = p.get("rope_theta").and_then(Value::as_f64) {
            theta = t;
        }
        let kind = p
            .get("rope_type")
            .or_else(|| p.get("type"))
            .and_then(Value::as_str)
            .unwrap_or("default");
        let num = |name: &str| {
            p.get(name)
                .and_then(Value::as_f64)
                .ok_or_else(|| cfg_err(format!("`{key}` of type `{kind}` needs a number `{name}`")))
        };
        scaling = match kind {
            "default" => scaling,
            "linear" => RopeScaling::Linear {
                factor: num("factor")?,
            },
            "llama3" => {
                let (low, high) = (num("low_freq_factor")?, num("high_freq_factor")?);
                if high <= low {
                    return Err(cfg_err(format!(
                        "`{key}`: high_freq_factor {high} must exceed low_freq_factor {low}"
                    )));
                }
                RopeScaling::Llama3 {
                    factor: num("factor")?,
                    low_freq_factor: low,
                    high_freq_factor: high,
                    original_max_position_embeddings: num("original_max_position_embeddings")?,
                }
            }
            other => {
                return Err(cfg_err(format!(
                    "`{key}` type `{other}` is not supported (plain, `linear` and `llama3` \
                     RoPE are)"
                )));
            }
        };
    }
    Ok((theta, scaling))
}

/// The RoPE inverse frequencies `θ^(−2i/d)` of the `d / 2` pairs, scaled as the config says
/// (transformers' `_compute_*_rope_parameters`).
fn inv_freqs(head_dim: usize, theta: f64, scaling: RopeScaling) -> Vec<f64> {
    (0..head_dim / 2)
        .map(|i| {
            let f = 1.0 / theta.powf((2 * i) as f64 / head_dim as f64);
            match scaling {
                RopeScaling::None => f,
                RopeScaling::Linear { factor } => f / factor,
                RopeScaling::Llama3 {
                    factor,
                    low_freq_factor,
                    high_freq_factor,
                    original_max_position_embeddings: old,
                } => {
                    let wavelen = 2.0 * std::f64::consts::PI / f;
                    if wavelen < old / high_freq_factor {
                        f
                    } else if wavelen > old / low_freq_factor {
                        f / factor
                    } else {
                        let smooth = (old / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                }
            }
        })
        .collect()
}

impl LlamaConfig {
    /// Read the fields from a parsed config.json. Defaults follow transformers:
    /// `num_key_value_heads` = `num_attention_heads`, `rms_norm_eps` = 1e-6, `rope_theta` = 1e4,
    /// `tie_word_embeddings` = false, `head_dim` = hidden / heads.
    pub fn from_json(v: &Value) -> Result<Self> {
        crate::arch::check_config(v).map_err(cfg_err)?;
        let hidden_size = get_usize(v, "hidden_size")?;
        let num_attention_heads = get_usize(v, "num_attention_heads")?;
        let num_key_value_heads = match v.get("num_key_value_heads") {
            Some(Value::Null) | None => num_attention_heads,
            Some(_) => get_usize(v, "num_key_value_heads")?,
        };
        let head_dim = match v.get("head_dim") {
            Some(Value::Null) | None => {
                if num_attention_heads == 0 || hidden_size % num_attention_heads != 0 {
                    return Err(cfg_err(format!(
                        "hidden_size {hidden_size} is not divisible by num_attention_heads \
                         {num_attention_heads}"
                    )));
                }
                hidden_size / num_attention_heads
            }
            Some(_) => get_usize(v, "head_dim")?,
        };
        if num_key_value_heads == 0 || num_attention_heads % num_key_value_heads != 0 {
            return Err(cfg_err(format!(
                "num_attention_heads {num_attention_heads} is not a multiple of \
                 num_key_value_heads {num_key_value_heads}"
            )));
        }
        if head_dim % 2 != 0 {
            return Err(cfg_err(format!(
                "head_dim {head_dim} must be even for RoPE"
            )));
        }
        let (rope_theta, rope_scaling) = rope_settings(v)?;
        Ok(LlamaConfig {
            hidden_size,
            intermediate_size: get_usize(v, "intermediate_size")?,
            num_hidden_layers: get_usize(v, "num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: v
                .get("rms_norm_eps")
                .and_then(Value::as_f64)
                .unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            vocab_size: get_usize(v, "vocab_size")?,
            tie_word_embeddings: v
                .get("tie_word_embeddings")
                .and_then(Value::as_bool)
                .unwrap_or(false),
        })
    }

    /// Name and shape of every tensor a checkpoint of this config holds (biases listed when
    /// `qkv_bias`). The order is embeddings, layers, final norm, head.
    pub fn tensor_shapes(&self, qkv_bias: bool) -> Vec<(String, Vec<usize>)> {
        let (h, i, hd) = (self.hidden_size, self.intermediate_size, self.head_dim);
        let (q, kv) = (self.num_attention_heads * hd, self.num_key_value_heads * hd);
        let mut out = vec![(
            "model.embed_tokens.weight".to_string(),
            vec![self.vocab_size, h],
        )];
        for l in 0..self.num_hidden_layers {
            let p = format!("model.layers.{l}");
            out.push((format!("{p}.input_layernorm.weight"), vec![h]));
            out.push((format!("{p}.self_attn.q_proj.weight"), vec![q, h]));
            out.push((format!("{p}.self_attn.k_proj.weight"), vec![kv, h]));
            out.push((format!("{p}.self_attn.v_proj.weight"), vec![kv, h]));
            if qkv_bias {
                out.push((format!("{p}.self_attn.q_proj.bias"), vec![q]));
                out.push((format!("{p}.self_attn.k_proj.bias"), vec![kv]));
                out.push((format!("{p}.self_attn.v_proj.bias"), vec![kv]));
            }
            out.push((format!("{p}.self_attn.o_proj.weight"), vec![h, q]));
            out.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
            out.push((format!("{p}.mlp.gate_proj.weight"), vec![i, h]));
            out.push((format!("{p}.mlp.up_proj.weight"), vec![i, h]));
            out.push((format!("{p}.mlp.down_proj.weight"), vec![h, i]));
        }
        out.push(("model.norm.weight".to_string(), vec![h]));
        if !self.tie_word_embeddings {
            out.push(("lm_head.weight".to_string(), vec![self.vocab_size, h]));
        }
        out
    }
}

/// One decoder layer's tensors.
#[derive(Clone, Debug)]
pub(super) struct Layer {
    pub(super) input_norm: Tensor,
    pub(super) q: Tensor,
    pub(super) k: Tensor,
    pub(super) v: Tensor,
    pub(super) q_bias: Option<Tensor>,
    pub(super) k_bias: Option<Tensor>,
    pub(super) v_bias: Option<Tensor>,
    pub(super) o: Tensor,
    pub(super) post_norm: Tensor,
    pub(super) gate: Tensor,
    pub(super) up: Tensor,
    pub(super) down: Tensor,
}

/// A decoder-only transformer whose weights are candle tensors (plain tensors, or [`candle_core::Var`]s'
/// tensors when training).
#[derive(Clone, Debug)]
pub struct Transformer {
    pub(super) config: LlamaConfig,
    embed: Tensor,
    pub(super) layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Tensor,
    pub(super) device: Device,
    /// The compute dtype (that of every weight).
    pub(super) dtype: DType,
    /// Inference kernels (see [`Kernels`]); off for models built from training tensors.
    pub(super) kernels: Kernels,
}

/// Which implementation of the layer's ops runs.
///
/// - `Differentiable`: RMSNorm, SiLU, softmax and RoPE written with elementwise candle ops (all
///   with a backward pass), `x · wᵀ` as one matmul — for training and Fisher information.
/// - `Inference`: candle's fused kernels (`candle_nn::ops::rms_norm`, `Tensor::silu`,
///   `softmax_last_dim`, `rotary_emb::rope`; none has a backward pass) and, for a decode step's
///   few rows, `(w · xᵀ)ᵀ`, which the CPU gemm runs faster for those shapes.
///
/// Both compute the same function; they differ by float rounding only.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernels {
    Differentiable,
    Inference,
}

impl Transformer {
    /// Build from a config.json value and a lookup of tensors by HF name. `get` returns
    /// `Ok(None)` for a tensor the model lacks. Shapes are checked against the config; errors
    /// name the tensor and `label` (where the model comes from).
    pub fn from_lookup(
        config: &Value,
        label: &str,
        device: &Device,
        dtype: DType,
        mut get: impl FnMut(&str) -> Result<Option<Tensor>>,
    ) -> Result<Self> {
        let cfg = LlamaConfig::from_json(config).map_err(|e| match e {
            Error::Config { msg, .. } => Error::Config {
                path: PathBuf::from(label).join("config.json"),
                msg,
            },
            other => other,
        })?;
        let mut fetch = |name: &str, shape: &[usize]| -> Result<Option<Tensor>> {
            match get(name)? {
                None => Ok(None),
                Some(t) => {
                    if t.dims() != shape {
                        return Err(Error::BadTensor {
                            path: PathBuf::from(label),
                            tensor: name.to_string(),
                            msg: format!("shape {:?}, config expects {:?}", t.dims(), shape),
                        });
                    }
                    Ok(Some(t.to_device(device)?.to_dtype(dtype)?))
                }
            }
        };
        let (h, i, hd) = (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim);
        let (qd, kvd) = (cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd);
        let missing = |name: &str| Error::MissingTensor {
            model: PathBuf::from(label),
            tensor: name.to_string(),
        };
        macro_rules! req {
            ($name:expr, $shape:expr) => {{
                let name: &str = &$name;
                fetch(name, &$shape)?.ok_or_else(|| missing(name))?
            }};
        }
        let embed = req!("model.embed_tokens.weight", [cfg.vocab_size, h]);
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{l}");
            let a = format!("{p}.self_attn");
            let m = format!("{p}.mlp");
            layers.push(Layer {
                input_norm: req!(format!("{p}.input_layernorm.weight"), [h]),
                q: req!(format!("{a}.q_proj.weight"), [qd, h]),
                k: req!(format!("{a}.k_proj.weight"), [kvd, h]),
                v: req!(format!("{a}.v_proj.weight"), [kvd, h]),
                q_bias: fetch(&format!("{a}.q_proj.bias"), &[qd])?,
                k_bias: fetch(&format!("{a}.k_proj.bias"), &[kvd])?,
                v_bias: fetch(&format!("{a}.v_proj.bias"), &[kvd])?,
                o: req!(format!("{a}.o_proj.weight"), [h, qd]),
                post_norm: req!(format!("{p}.post_attention_layernorm.weight"), [h]),
                gate: req!(format!("{m}.gate_proj.weight"), [i, h]),
                up: req!(format!("{m}.up_proj.weight"), [i, h]),
                down: req!(format!("{m}.down_proj.weight"), [h, i]),
            });
        }
        let norm = req!("model.norm.weight", [h]);
        let lm_head = match fetch("lm_head.weight", &[cfg.vocab_size, h])? {
            Some(t) => t,
            None if cfg.tie_word_embeddings => embed.clone(),
            None => {
                return Err(Error::MissingTensor {
                    model: PathBuf::from(label),
                    tensor: "lm_head.weight".into(),
                });
            }
        };
        Ok(Transformer {
            config: cfg,
            embed,
            layers,
            norm,
            lm_head,
            device: device.clone(),
            dtype,
            kernels: Kernels::Inference,
        })
    }

    /// Build from an in-memory model (merged tensors), computing in `dtype`.
    pub fn from_mem(model: &MemModel, device: &Device, dtype: DType) -> Result<Self> {
        Self::from_lookup(&model.config, "<memory>", device, dtype, |name| {
            model
                .tensors
                .get(name)
                .map(|t| t.to_candle(device))
                .transpose()
        })
    }

    /// Build from candle tensors by name (e.g. the tensors of training `Var`s, so gradients flow).
    pub fn from_tensors(
        config: &Value,
        tensors: &HashMap<String, Tensor>,
        device: &Device,
    ) -> Result<Self> {
        let mut model = Self::from_lookup(config, "<tensors>", device, DType::F32, |name| {
            Ok(tensors.get(name).cloned())
        })?;
        model.kernels = Kernels::Differentiable;
        Ok(model)
    }

    /// Open a model as a runnable forward computing in `dtype`: a model directory, a
    /// `BASE+ADAPTER` pair, a PEFT adapter directory with a local base, or a cached Hugging Face
    /// hub id — anything [`crate::store::open_source`] opens. The one way to go from a path to a
    /// model; [`Transformer::from_source`] on the opened source.
    ///
    /// ```no_run
    /// use evomerge::candle_core::{DType, Device, Tensor};
    /// use evomerge::model::{CausalLm, Transformer};
    /// # fn main() -> evomerge::Result<()> {
    /// let model = Transformer::open("assets/toy/base", &Device::Cpu, DType::F32)?;
    /// let ids = Tensor::new(&[[1u32, 7, 8]], &Device::Cpu)?;
    /// let logits = model.forward(&ids)?; // [1, 3, vocab]
    /// # Ok(()) }
    /// ```
    pub fn open(path: impl AsRef<std::path::Path>, device: &Device, dtype: DType) -> Result<Self> {
        let source = crate::store::open_source(path.as_ref())?;
        Self::from_source(source.as_ref(), device, dtype)
    }

    /// Build from any tensor source (an opened model directory), computing in `dtype`.
    pub fn from_source(source: &dyn TensorSource, device: &Device, dtype: DType) -> Result<Self> {
        let label = source.label();
        Self::from_lookup(source.config(), &label, device, dtype, |name| {
            let Some(info) = source.info(name) else {
                return Ok(None);
            };
            let mut buf = vec![0f32; info.numel()];
            source.read_into(name, &mut buf)?;
            Ok(Some(Tensor::from_vec(buf, info.shape.as_slice(), device)?))
        })
    }

    /// The parsed configuration.
    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Token embeddings of `input_ids` (`[batch, seq]` u32) → `[batch, seq, hidden]`.
    pub fn embed(&self, input_ids: &Tensor) -> Result<Tensor> {
        let (b, s) = input_ids.dims2()?;
        let flat = input_ids.to_dtype(DType::U32)?.flatten_all()?;
        let vocab = self.config.vocab_size as u32;
        // index_select panics on out-of-range ids on some backends; check on the host first.
        let ids: Vec<u32> = flat.to_vec1()?;
        if let Some(bad) = ids.iter().find(|&&i| i >= vocab) {
            return Err(Error::msg(format!(
                "token id {bad} is out of range for vocab_size {vocab}"
            )));
        }
        Ok(self
            .embed
            .index_select(&flat, 0)?
            .reshape((b, s, self.config.hidden_size))?)
    }

    /// Run decoder layer `layer` on the hidden state `x` (`[batch, seq, hidden]`).
    pub fn layer(&self, layer: usize, x: &Tensor) -> Result<Tensor> {
        let l = self.layers.get(layer).ok_or_else(|| {
            Error::msg(format!(
                "layer {layer} out of range: the model has {} layers",
                self.layers.len()
            ))
        })?;
        let (_, s, _) = x.dims3()?;
        let rope = rope_tables(s, &self.config, &self.device, self.dtype, self.kernels)?;
        let mask = causal_mask(s, &self.device, self.dtype)?;
        self.run_layer(l, x, &rope, &mask)
    }

    /// Final norm and LM head: hidden `[batch, seq, hidden]` → logits `[batch, seq, vocab]`.
    pub fn head(&self, x: &Tensor) -> Result<Tensor> {
        let k = self.kernels;
        let x = norm(x, &self.norm, self.config.rms_norm_eps, k)?;
        Ok(project(&x, &self.lm_head, None, k)?.to_dtype(DType::F32)?)
    }

    /// The compute dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Which kernels the forward runs.
    pub fn kernels(&self) -> Kernels {
        self.kernels
    }

    /// Use other kernels (e.g. the differentiable ones, to compare).
    pub fn set_kernels(&mut self, kernels: Kernels) {
        self.kernels = kernels;
    }

    /// Hidden states after the last layer (before the final norm): `[batch, seq, hidden]`.
    pub fn hidden(&self, input_ids: &Tensor) -> Result<Tensor> {
        let mut x = self.embed(input_ids)?;
        let (_, s, _) = x.dims3()?;
        let rope = rope_tables(s, &self.config, &self.device, self.dtype, self.kernels)?;
        let mask = causal_mask(s, &self.device, self.dtype)?;
        for l in &self.layers {
            x = self.run_layer(l, &x, &rope, &mask)?;
        }
        Ok(x)
    }

    /// Logits for every position: `[batch, seq]` u32 → `[batch, seq, vocab]` f32.
    pub fn logits(&self, input_ids: &Tensor) -> Result<Tensor> {
        self.head(&self.hidden(input_ids)?)
    }

    fn run_layer(
        &self,
        l: &Layer,
        x: &Tensor,
        rope: &(Tensor, Tensor),
        mask: &Tensor,
    ) -> Result<Tensor> {
        let c = &self.config;
        let (b, s, _) = x.dims3()?;
        let (nh, nkv, hd) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let kn = self.kernels;
        let h = norm(x, &l.input_norm, c.rms_norm_eps, kn)?;
        let heads = |t: Tensor, n: usize| -> candle_core::Result<Tensor> {
            t.reshape((b, s, n, hd))?.transpose(1, 2)?.contiguous()
        };
        let q = heads(project(&h, &l.q, l.q_bias.as_ref(), kn)?, nh)?;
        let k = heads(project(&h, &l.k, l.k_bias.as_ref(), kn)?, nkv)?;
        let v = heads(project(&h, &l.v, l.v_bias.as_ref(), kn)?, nkv)?;
        let q = apply_rope(&q, rope)?;
        let k = apply_rope(&k, rope)?;
        if kn == Kernels::Inference {
            let attn = grouped_attention(&q, &k, &v, mask, nh, kn)?;
            let x = (x + project(&attn, &l.o, None, kn)?)?;
            return mlp_block(l, &x, c.rms_norm_eps, kn);
        }
        let (k, v) = if nh == nkv {
            (k, v)
        } else {
            (repeat_kv(&k, nh / nkv)?, repeat_kv(&v, nh / nkv)?)
        };
        let scores = (q.matmul(&k.t()?)? * (1.0 / (hd as f64).sqrt()))?;
        let probs = masked_softmax(&scores, mask, kn)?;
        let attn = probs
            .matmul(&v)?
            .transpose(1, 2)?
            .reshape((b, s, nh * hd))?;
        let x = (x + project(&attn, &l.o, None, kn)?)?;
        mlp_block(l, &x, c.rms_norm_eps, kn)
    }
}

impl CausalLm for Transformer {
    fn vocab_size(&self) -> usize {
        self.config.vocab_size
    }

    fn forward(&self, input_ids: &Tensor) -> Result<Tensor> {
        self.logits(input_ids)
    }

    fn logits_at(
        &self,
        input_ids: &Tensor,
        positions: &[u32],
        chunk: usize,
        sink: &mut dyn FnMut(Tensor) -> Result<()>,
    ) -> Result<()> {
        head_at(self, &self.hidden(input_ids)?, positions, chunk, sink)
    }

    fn decoder(
        &self,
        prompts: &[&[u32]],
        max_new_tokens: usize,
    ) -> Result<Option<(Box<dyn Decode + '_>, Tensor)>> {
        let (dec, logits) = Stack::plain(self).start(prompts, max_new_tokens)?;
        Ok(Some((Box::new(dec), logits)))
    }
}

/// The head's logits at flat positions of `hidden` (`[b, s, h]`), `chunk` positions at a time.
fn head_at(
    model: &Transformer,
    hidden: &Tensor,
    positions: &[u32],
    chunk: usize,
    sink: &mut dyn FnMut(Tensor) -> Result<()>,
) -> Result<()> {
    let (b, s, h) = hidden.dims3()?;
    let flat = hidden.reshape((b * s, h))?;
    for part in positions.chunks(chunk.max(1)) {
        let idx = Tensor::from_slice(part, part.len(), hidden.device())?;
        sink(model.head(&flat.index_select(&idx, 0)?)?)?;
    }
    Ok(())
}

/// Run a data-flow route: embeddings, final norm and head of `models[route.embed_model]`; then
/// for each hop, `h ← layer(models[hop.model], hop.layer)(h · hop.scale)`. Each hop uses its own
/// model's RoPE settings. Errors (not panics) for an out-of-range model or layer index, or
/// models whose hidden sizes differ.
pub fn forward_route(models: &[&Transformer], route: &Route, input_ids: &Tensor) -> Result<Tensor> {
    let (embed, x) = route_hidden(models, route, input_ids)?;
    embed.head(&x)
}

/// The hidden state after a route's last hop (before the final norm), with the model whose
/// head finishes it.
fn route_hidden<'m>(
    models: &[&'m Transformer],
    route: &Route,
    input_ids: &Tensor,
) -> Result<(&'m Transformer, Tensor)> {
    let embed = models.get(route.embed_model).ok_or_else(|| {
        Error::msg(format!(
            "route: embed_model {} out of range ({} models)",
            route.embed_model,
            models.len()
        ))
    })?;
    let mut x = embed.embed(input_ids)?;
    let (_, s, hidden) = x.dims3()?;
    let mut tables: HashMap<usize, (Tensor, Tensor)> = HashMap::new();
    let mask = causal_mask(s, &embed.device, embed.dtype)?;
    for (n, hop) in route.hops.iter().enumerate() {
        let m = models.get(hop.model).ok_or_else(|| {
            Error::msg(format!(
                "route hop {n}: model {} out of range ({} models)",
                hop.model,
                models.len()
            ))
        })?;
        let l = m.layers.get(hop.layer).ok_or_else(|| {
            Error::msg(format!(
                "route hop {n}: layer {} out of range (model {} has {} layers)",
                hop.layer,
                hop.model,
                m.layers.len()
            ))
        })?;
        if m.config.hidden_size != hidden {
            return Err(Error::Mismatch(format!(
                "route hop {n}: model {} has hidden_size {}, the route's embeddings {hidden}",
                hop.model, m.config.hidden_size
            )));
        }
        if let std::collections::hash_map::Entry::Vacant(e) = tables.entry(hop.model) {
            e.insert(rope_tables(s, &m.config, &m.device, m.dtype, m.kernels)?);
        }
        if hop.scale != 1.0 {
            x = (x * hop.scale as f64)?;
        }
        if x.dtype() != m.dtype {
            x = x.to_dtype(m.dtype)?;
        }
        x = m.run_layer(l, &x, &tables[&hop.model], &mask)?;
    }
    Ok((embed, x.to_dtype(embed.dtype)?))
}

/// A route over several in-memory models, runnable as one [`CausalLm`].
#[derive(Clone, Debug)]
pub struct RoutedModel {
    pub models: Vec<Transformer>,
    pub route: Route,
}

impl CausalLm for RoutedModel {
    fn vocab_size(&self) -> usize {
        self.models
            .get(self.route.embed_model)
            .map(|m| m.config.vocab_size)
            .unwrap_or(0)
    }

    fn forward(&self, input_ids: &Tensor) -> Result<Tensor> {
        let refs: Vec<&Transformer> = self.models.iter().collect();
        forward_route(&refs, &self.route, input_ids)
    }

    fn logits_at(
        &self,
        input_ids: &Tensor,
        positions: &[u32],
        chunk: usize,
        sink: &mut dyn FnMut(Tensor) -> Result<()>,
    ) -> Result<()> {
        let refs: Vec<&Transformer> = self.models.iter().collect();
        let (embed, x) = route_hidden(&refs, &self.route, input_ids)?;
        head_at(embed, &x, positions, chunk, sink)
    }

    fn decoder(
        &self,
        prompts: &[&[u32]],
        max_new_tokens: usize,
    ) -> Result<Option<(Box<dyn Decode + '_>, Tensor)>> {
        let (dec, logits) =
            Stack::route(&self.models, &self.route)?.start(prompts, max_new_tokens)?;
        Ok(Some((Box::new(dec), logits)))
    }
}

/// `x · wᵀ (+ b)` for `x` of any rank ≥ 2 and `w` `[out, in]`.
pub(super) fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> candle_core::Result<Tensor> {
    // One 2-D matmul over all rows (much faster on CPU than a broadcast batched matmul, and its
    // backward needs no broadcast reduction).
    let dims = x.dims().to_vec();
    let rows: usize = dims[..dims.len() - 1].iter().product();
    let y = x.reshape((rows, dims[dims.len() - 1]))?.matmul(&w.t()?)?;
    let mut out_dims = dims;
    *out_dims.last_mut().expect("rank >= 1") = w.dim(0)?;
    let y = y.reshape(out_dims)?;
    match b {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}

/// Up to this many rows, inference computes `x · wᵀ` as `(w · xᵀ)ᵀ`: for a decode step's few
/// rows the CPU gemm runs that orientation 15–30 % faster (measured on SmolLM2's shapes, 16
/// rows); for a prefill's thousands of rows the transposed copy of the output costs more than
/// it saves.
const SKINNY_ROWS: usize = 64;

/// Causal attention with the query heads grouped by their kv head (head j uses kv head
/// j / rep, transformers' `repeat_kv`), so `[b, nh, s, d]` → `[b, kv, rep·s, d]` is a plain
/// reshape: one `[rep·s, d] × [d, t]` product per kv head and no repeated copy of the keys and
/// values. `q`: `[b, nh, s, d]`; `k`, `v`: `[b, kv, t, d]` (any strides a matmul takes); `mask`
/// broadcasts to `[b, kv, rep, s, t]`. Returns `[b, s, nh·d]`.
pub(super) fn grouped_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    nh: usize,
    kernels: Kernels,
) -> candle_core::Result<Tensor> {
    let (b, _, s, hd) = q.dims4()?;
    let (_, nkv, t, _) = k.dims4()?;
    let rep = nh / nkv;
    let q = q.contiguous()?.reshape((b, nkv, rep * s, hd))?;
    let scores = (q.matmul(&k.t()?)? * (1.0 / (hd as f64).sqrt()))?;
    let scores = scores.reshape((b, nkv, rep, s, t))?;
    let probs = masked_softmax(&scores, mask, kernels)?.reshape((b, nkv, rep * s, t))?;
    probs
        .matmul(v)?
        .reshape((b, nh, s, hd))?
        .transpose(1, 2)?
        .reshape((b, s, nh * hd))
}

/// `x · wᵀ (+ b)` with the chosen kernels: [`linear`], or `(w · xᵀ)ᵀ` for inference on few
/// rows (see [`SKINNY_ROWS`]).
pub(super) fn project(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    kernels: Kernels,
) -> candle_core::Result<Tensor> {
    let dims = x.dims().to_vec();
    let rows: usize = dims[..dims.len() - 1].iter().product();
    if kernels == Kernels::Differentiable || rows > SKINNY_ROWS {
        return linear(x, w, b);
    }
    let x2 = x.reshape((rows, dims[dims.len() - 1]))?;
    let y = w.matmul(&x2.t()?)?.t()?.contiguous()?;
    let mut out_dims = dims;
    *out_dims.last_mut().expect("rank >= 1") = w.dim(0)?;
    let y = y.reshape(out_dims)?;
    match b {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}

/// RMSNorm with the chosen kernels ([`rms_norm`] or candle's fused one).
pub(super) fn norm(
    x: &Tensor,
    w: &Tensor,
    eps: f64,
    kernels: Kernels,
) -> candle_core::Result<Tensor> {
    match kernels {
        Kernels::Differentiable => rms_norm(x, w, eps),
        Kernels::Inference => candle_nn::ops::rms_norm(&x.contiguous()?, w, eps as f32),
    }
}

/// The MLP half of a decoder layer with its residual:
/// `x + down(silu(gate(n)) · up(n))` with `n = post_attention_layernorm(x)`.
pub(super) fn mlp_block(l: &Layer, x: &Tensor, eps: f64, kernels: Kernels) -> Result<Tensor> {
    let h = norm(x, &l.post_norm, eps, kernels)?;
    let gate = project(&h, &l.gate, None, kernels)?;
    let up = project(&h, &l.up, None, kernels)?;
    let act = match kernels {
        Kernels::Differentiable => (silu(&gate)? * up)?,
        Kernels::Inference => (gate.silu()? * up)?,
    };
    Ok((x + project(&act, &l.down, None, kernels)?)?)
}

/// `softmax(scores + mask)` over the last dimension. Half-precision scores are upcast to `f32`
/// for the softmax (as transformers does) and the probabilities cast back.
pub(super) fn masked_softmax(
    scores: &Tensor,
    mask: &Tensor,
    kernels: Kernels,
) -> candle_core::Result<Tensor> {
    let softmax = |t: &Tensor| match kernels {
        Kernels::Differentiable => softmax_last(t),
        Kernels::Inference => candle_nn::ops::softmax_last_dim(t),
    };
    let dt = scores.dtype();
    if dt == DType::F32 {
        return softmax(&scores.broadcast_add(mask)?);
    }
    let s = scores
        .to_dtype(DType::F32)?
        .broadcast_add(&mask.to_dtype(DType::F32)?)?;
    softmax(&s)?.to_dtype(dt)
}

/// RMSNorm: `x / sqrt(mean(x²) + eps) · w` over the last dimension. Half-precision inputs are
/// normalised in `f32` and cast back before the weight is applied (transformers' order).
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    let dt = x.dtype();
    if dt != DType::F32 {
        let x32 = x.to_dtype(DType::F32)?;
        let ms = x32.sqr()?.mean_keepdim(D::Minus1)?;
        let inv = (ms + eps)?.sqrt()?.recip()?;
        return x32.broadcast_mul(&inv)?.to_dtype(dt)?.broadcast_mul(w);
    }
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    let inv = (ms + eps)?.sqrt()?.recip()?;
    x.broadcast_mul(&inv)?.broadcast_mul(w)
}

/// Softmax over the last dimension; the max is subtracted (detached: it does not change the value
/// or the gradient) for stability.
pub fn softmax_last(x: &Tensor) -> candle_core::Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    let sum = e.sum_keepdim(D::Minus1)?;
    e.broadcast_div(&sum)
}

/// Log-softmax over the last dimension (max detached, as in [`softmax_last`]).
pub fn log_softmax_last(x: &Tensor) -> candle_core::Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let shifted = x.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    shifted.broadcast_sub(&lse)
}

/// SiLU `x · σ(x)` from elementwise ops.
fn silu(x: &Tensor) -> candle_core::Result<Tensor> {
    let sig = (x.neg()?.exp()? + 1.0)?.recip()?;
    x * sig
}

/// `cos` and `sin` tables for RoPE: angle `p · f_i` for pair `i` with the config's (scaled)
/// inverse frequencies. Differentiable kernels get `[seq, head_dim]` (the halves concatenated,
/// HF layout); inference kernels `[seq, head_dim / 2]` (one value per pair, for
/// `candle_nn::rotary_emb::rope`). [`apply_rope`] tells them apart by their width.
fn rope_tables(
    seq: usize,
    config: &LlamaConfig,
    device: &Device,
    dtype: DType,
    kernels: Kernels,
) -> candle_core::Result<(Tensor, Tensor)> {
    let positions: Vec<usize> = (0..seq).collect();
    let (cos, sin) = rope_values(&positions, config, kernels);
    let width = cos.len() / seq.max(1);
    Ok((
        Tensor::from_vec(cos, (seq, width), device)?.to_dtype(dtype)?,
        Tensor::from_vec(sin, (seq, width), device)?.to_dtype(dtype)?,
    ))
}

/// `cos` and `sin` of the RoPE angles at each of `positions`: `head_dim` values each for
/// differentiable kernels, `head_dim / 2` (one per pair) for inference kernels.
pub(super) fn rope_values(
    positions: &[usize],
    config: &LlamaConfig,
    kernels: Kernels,
) -> (Vec<f32>, Vec<f32>) {
    let head_dim = config.head_dim;
    // transformers keeps inv_freq in f32 and forms the product in f32; match that
    let freqs: Vec<f32> = inv_freqs(head_dim, config.rope_theta, config.rope_scaling)
        .into_iter()
        .map(|f| f as f32)
        .collect();
    let half = head_dim / 2;
    let width = match kernels {
        Kernels::Differentiable => head_dim,
        Kernels::Inference => half,
    };
    let mut cos = Vec::with_capacity(positions.len() * width);
    let mut sin = Vec::with_capacity(positions.len() * width);
    for &p in positions {
        for j in 0..width {
            let angle = p as f32 * freqs[j % half];
            cos.push(angle.cos());
            sin.push(angle.sin());
        }
    }
    (cos, sin)
}

/// `x · cos + rotate_half(x) · sin` with `rotate_half([a, b]) = [−b, a]`; `x` is
/// `[batch, heads, seq, head_dim]`. Tables of width `head_dim / 2` (inference kernels) go to
/// candle's fused `rope` (`[seq, d/2]` or per row `[batch, seq, d/2]`); full-width ones
/// broadcast over `x`.
pub(super) fn apply_rope(x: &Tensor, (cos, sin): &(Tensor, Tensor)) -> candle_core::Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    if cos.dim(D::Minus1)? * 2 == d {
        return candle_nn::rotary_emb::rope(&x.contiguous()?, cos, sin);
    }
    let a = x.narrow(D::Minus1, 0, d / 2)?;
    let b = x.narrow(D::Minus1, d / 2, d / 2)?;
    let rot = Tensor::cat(&[&b.neg()?, &a], D::Minus1)?;
    x.broadcast_mul(cos)? + rot.broadcast_mul(sin)?
}

/// Repeat each key/value head `n` times: `[b, kv, s, d]` → `[b, kv·n, s, d]` (head `j` uses kv
/// head `j / n`, as transformers' `repeat_kv`).
fn repeat_kv(x: &Tensor, n: usize) -> candle_core::Result<Tensor> {
    let (b, kv, s, d) = x.dims4()?;
    x.unsqueeze(2)?
        .broadcast_as((b, kv, n, s, d))?
        .contiguous()?
        .reshape((b, kv * n, s, d))
}

/// Additive causal mask `[seq, seq]`: 0 on and below the diagonal, −∞ above.
fn causal_mask(seq: usize, device: &Device, dtype: DType) -> candle_core::Result<Tensor> {
    let mut m = vec![0f32; seq * seq];
    for i in 0..seq {
        for j in i + 1..seq {
            m[i * seq + j] = f32::NEG_INFINITY;
        }
    }
    Tensor::from_vec(m, (seq, seq), device)?.to_dtype(dtype)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rope_scalings_scale_the_frequencies() {
        let plain = inv_freqs(8, 500.0, RopeScaling::None);
        // θ^(−2i/8) for θ = 500: 1, 500^−¼, 500^−½, 500^−¾
        assert!((plain[2] - 500f64.powf(-0.5)).abs() < 1e-12);
        let linear = inv_freqs(8, 500.0, RopeScaling::Linear { factor: 4.0 });
        for (l, p) in linear.iter().zip(&plain) {
            assert!((l - p / 4.0).abs() < 1e-15);
        }
        // wavelengths 2π/f ≈ 6.3, 29.8, 140, 665 against bands 64/4 = 16 and 64/1 = 64: the
        // first kept, the second blended, the others ÷ 8
        let llama3 = inv_freqs(
            8,
            500.0,
            RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 64.0,
            },
        );
        assert_eq!(llama3[0], plain[0]);
        let smooth = (64.0 / (2.0 * std::f64::consts::PI / plain[1]) - 1.0) / 3.0;
        assert!(smooth > 0.0 && smooth < 1.0);
        assert!((llama3[1] - ((1.0 - smooth) * plain[1] / 8.0 + smooth * plain[1])).abs() < 1e-15);
        assert_eq!(llama3[2], plain[2] / 8.0);
        assert_eq!(llama3[3], plain[3] / 8.0);
    }

    #[test]
    fn rope_settings_read_both_config_layouts() {
        let v4 = serde_json::json!({
            "rope_theta": 1e6,
            "rope_scaling": {"type": "linear", "factor": 2.0}
        });
        assert_eq!(
            rope_settings(&v4).unwrap(),
            (1e6, RopeScaling::Linear { factor: 2.0 })
        );
        let v5 = serde_json::json!({
            "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}
        });
        assert_eq!(rope_settings(&v5).unwrap(), (5e5, RopeScaling::None));
        let missing = serde_json::json!({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}});
        let err = rope_settings(&missing).unwrap_err().to_string();
        assert!(err.contains("low_freq_factor"), "{err}");
    }
}
