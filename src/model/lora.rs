//! LoRA fine-tuning (Hu et al. 2021) on candle autograd, written out as a PEFT adapter directory.
//!
//! The base weights stay frozen; every targeted linear weight `W` (`[out, in]`, e.g.
//! `model.layers.3.self_attn.q_proj.weight`) gets a trainable pair `A` (`[r, in]`) and `B`
//! (`[out, r]`), and the forward uses `W + s·(B·A)` with `s = alpha / r` (or `alpha / √r` with
//! rsLoRA). Initialisation follows PEFT: `A` kaiming-uniform with `a = √5`, i.e.
//! `U(−1/√in, 1/√in)`, `B = 0` (so the step-0 model is the base model exactly), drawn from a
//! seeded [`StdRng`]. Training is AdamW with warm-up and cosine decay ([`TrainConfig`]) on
//! prompt / target examples whose loss counts the target tokens only; the LM head runs on those
//! positions only (its vocabulary-wide product over every position would dominate the step).
//! Deterministic for a seed and thread count.
//!
//! [`crate::model::train::load_task_examples`] encodes a task's `train.jsonl` exactly as the LM
//! evaluator prompts it, the target followed by the tokenizer's EOS. [`LoraAdapter::save_peft`] writes
//! `adapter_config.json` and `adapter_model.safetensors` as PEFT reads them
//! (`base_model.model.<module>.lora_A.weight` `[r, in]`, `.lora_B.weight` `[out, r]`, f32).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{D, DType, Device, Tensor, Var};
use candle_nn::optim::{AdamW, Optimizer, ParamsAdamW};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use crate::candidate::TensorMap;
use crate::error::{Error, Result};
use crate::model::train::{TrainConfig, TrainExample};
use crate::model::transformer::{
    Kernels, LlamaConfig, Transformer, apply_rope, grouped_attention, log_softmax_last, rms_norm,
    rope_values,
};
use crate::tensor::TensorBuf;

/// The linear modules of a decoder layer, in layer order, with the block that holds each.
pub const LINEAR_MODULES: [(&str, &str); 7] = [
    ("q_proj", "self_attn"),
    ("k_proj", "self_attn"),
    ("v_proj", "self_attn"),
    ("o_proj", "self_attn"),
    ("gate_proj", "mlp"),
    ("up_proj", "mlp"),
    ("down_proj", "mlp"),
];

/// The adapter's shape: rank, scaling and which linear modules it adapts.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraConfig {
    pub rank: usize,
    pub alpha: f64,
    /// rsLoRA scaling `alpha / √r` instead of `alpha / r`.
    pub rslora: bool,
    /// Short module names (`q_proj`, ..., `down_proj`), as PEFT's `target_modules`.
    pub target_modules: Vec<String>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        LoraConfig {
            rank: 8,
            alpha: 16.0,
            rslora: false,
            target_modules: LINEAR_MODULES.iter().map(|(m, _)| m.to_string()).collect(),
        }
    }
}

impl LoraConfig {
    /// The factor `s` of `W + s·B·A`.
    pub fn scale(&self) -> f64 {
        if self.rslora {
            self.alpha / (self.rank as f64).sqrt()
        } else {
            self.alpha / self.rank as f64
        }
    }

    /// Every adapted module of a model of `cfg`: its path (`model.layers.{l}.self_attn.q_proj`)
    /// and the weight's `[out, in]`, layer by layer in [`LINEAR_MODULES`] order. An unknown or
    /// repeated target module, an empty list or rank 0 is an error.
    pub fn targets(&self, cfg: &LlamaConfig) -> Result<Vec<(String, [usize; 2])>> {
        if self.rank == 0 {
            return Err(Error::msg("LoRA rank must be at least 1"));
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return Err(Error::msg(format!(
                "LoRA alpha must be finite and > 0, got {}",
                self.alpha
            )));
        }
        if self.target_modules.is_empty() {
            return Err(Error::msg("no LoRA target modules"));
        }
        let known: Vec<&str> = LINEAR_MODULES.iter().map(|(m, _)| *m).collect();
        for (i, t) in self.target_modules.iter().enumerate() {
            if !known.contains(&t.as_str()) {
                return Err(Error::msg(format!(
                    "unknown LoRA target module `{t}`; the model's linear modules are {}",
                    known.join(", ")
                )));
            }
            if self.target_modules[..i].contains(t) {
                return Err(Error::msg(format!("LoRA target module `{t}` given twice")));
            }
        }
        let (h, i, hd) = (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim);
        let (q, kv) = (cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd);
        let shape = |m: &str| match m {
            "q_proj" => [q, h],
            "k_proj" | "v_proj" => [kv, h],
            "o_proj" => [h, q],
            "gate_proj" | "up_proj" => [i, h],
            _ => [h, i], // down_proj
        };
        let mut out = Vec::new();
        for l in 0..cfg.num_hidden_layers {
            for (m, block) in LINEAR_MODULES {
                if self.target_modules.iter().any(|t| t == m) {
                    out.push((format!("model.layers.{l}.{block}.{m}"), shape(m)));
                }
            }
        }
        Ok(out)
    }
}

/// A trained (or loaded) adapter: `A` `[r, in]` and `B` `[out, r]` per module path.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraAdapter {
    pub config: LoraConfig,
    /// Module path (`model.layers.0.self_attn.q_proj`) → `(A, B)`.
    pub weights: BTreeMap<String, (TensorBuf, TensorBuf)>,
    /// Free-form lines for the adapter's README.md (how it was trained).
    pub notes: Vec<String>,
}

/// The PEFT key prefix of a causal LM's module paths.
const PEFT_PREFIX: &str = "base_model.model.";
/// The adapter's files.
pub const ADAPTER_CONFIG: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";

impl LoraAdapter {
    /// `s` of `W + s·B·A`.
    pub fn scale(&self) -> f64 {
        self.config.scale()
    }

    /// The base tensors with every adapted weight replaced by `W + s·B·A` (computed in f32;
    /// the folded tensors are f32). Errors name a module whose weight the base lacks or whose
    /// shape disagrees.
    pub fn fold_into(&self, base: &TensorMap) -> Result<TensorMap> {
        let mut out = base.clone();
        let s = self.scale() as f32;
        for (module, (a, b)) in &self.weights {
            let name = format!("{module}.weight");
            let w = base.get(&name).ok_or_else(|| Error::MissingTensor {
                model: PathBuf::from("<base>"),
                tensor: name.clone(),
            })?;
            let (r, inp, outp) = (a.shape[0], a.shape[1], b.shape[0]);
            if w.shape != [outp, inp] || b.shape != [outp, r] {
                return Err(Error::Tensor {
                    tensor: name,
                    msg: format!(
                        "base shape {:?}, adapter A {:?} / B {:?}",
                        w.shape, a.shape, b.shape
                    ),
                });
            }
            let (av, bv) = (a.values(), b.values());
            let mut wv = w.to_f32_vec();
            for o in 0..outp {
                let row = &mut wv[o * inp..(o + 1) * inp];
                for k in 0..r {
                    let c = s * bv[o * r + k];
                    if c == 0.0 {
                        continue;
                    }
                    for (x, av) in row.iter_mut().zip(&av[k * inp..(k + 1) * inp]) {
                        *x += c * av;
                    }
                }
            }
            out.insert(name, TensorBuf::new(w.shape.clone(), wv));
        }
        Ok(out)
    }

    /// The tensors of `adapter_model.safetensors`, under PEFT's names.
    pub fn peft_tensors(&self) -> TensorMap {
        let mut out = TensorMap::new();
        for (module, (a, b)) in &self.weights {
            out.insert(format!("{PEFT_PREFIX}{module}.lora_A.weight"), a.clone());
            out.insert(format!("{PEFT_PREFIX}{module}.lora_B.weight"), b.clone());
        }
        out
    }

    /// PEFT's `adapter_config.json` for a LoRA adapter of `base_name`.
    pub fn peft_config(&self, base_name: &str) -> serde_json::Value {
        serde_json::json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_name,
            "r": self.config.rank,
            "lora_alpha": self.config.alpha,
            "target_modules": self.config.target_modules,
            "use_rslora": self.config.rslora,
            "lora_dropout": 0.0,
            "bias": "none",
            "fan_in_fan_out": false,
            "init_lora_weights": true,
            "inference_mode": true,
            "modules_to_save": null,
            "use_dora": false,
        })
    }

    /// Write the adapter as a PEFT directory `dir` (which must not exist): `adapter_config.json`,
    /// `adapter_model.safetensors` and a README.md with [`LoraAdapter::notes`]. Everything is
    /// written into `.NAME.tmp-PID-N` beside `dir` and renamed at the end, so a failure leaves
    /// nothing under `dir`.
    pub fn save_peft(&self, dir: &Path, base_name: &str) -> Result<PathBuf> {
        if dir.exists() {
            return Err(Error::io(
                dir,
                std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    "the output directory already exists",
                ),
            ));
        }
        let name = dir
            .file_name()
            .ok_or_else(|| Error::msg(format!("{}: not a directory name", dir.display())))?
            .to_string_lossy()
            .into_owned();
        let parent = match dir.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
        let mut n = 0usize;
        let tmp = loop {
            let candidate = parent.join(format!(".{name}.tmp-{}-{n}", std::process::id()));
            match std::fs::create_dir(&candidate) {
                Ok(()) => break candidate,
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => n += 1,
                Err(e) => return Err(Error::io(&candidate, e)),
            }
        };
        let guard = RemoveOnDrop(Some(tmp.clone()));
        let config_path = tmp.join(ADAPTER_CONFIG);
        let text = serde_json::to_string_pretty(&self.peft_config(base_name))
            .map_err(|e| Error::msg(format!("{}: {e}", config_path.display())))?;
        std::fs::write(&config_path, text + "\n").map_err(|e| Error::io(&config_path, e))?;
        crate::model::mlp::save_tensors(&tmp.join(ADAPTER_WEIGHTS), &self.peft_tensors())?;
        let readme = tmp.join("README.md");
        std::fs::write(&readme, self.readme(base_name)).map_err(|e| Error::io(&readme, e))?;
        std::fs::rename(&tmp, dir).map_err(|e| Error::io(dir, e))?;
        std::mem::forget(guard);
        Ok(dir.to_path_buf())
    }

    fn readme(&self, base_name: &str) -> String {
        let c = &self.config;
        let mut s = format!(
            "# LoRA adapter\n\nA PEFT LoRA adapter of `{base_name}` written by `evomerge finetune`.\n\n\
             - rank {}, alpha {}, {}scale {}\n- target modules: {}\n- {} adapted weights\n",
            c.rank,
            c.alpha,
            if c.rslora { "rsLoRA, " } else { "" },
            c.scale(),
            c.target_modules.join(", "),
            self.weights.len()
        );
        if !self.notes.is_empty() {
            s.push_str("\n## Training\n\n");
            for line in &self.notes {
                s.push_str(&format!("- {line}\n"));
            }
        }
        s
    }

    /// Read a PEFT LoRA adapter directory written by [`LoraAdapter::save_peft`] (or by PEFT for a
    /// Llama-family model: `base_model.model.` keys, f32 / f16 / bf16).
    pub fn load_peft(dir: &Path) -> Result<LoraAdapter> {
        let cpath = dir.join(ADAPTER_CONFIG);
        let text = std::fs::read_to_string(&cpath).map_err(|e| Error::io(&cpath, e))?;
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Config {
            path: cpath.clone(),
            msg: format!("invalid JSON: {e}"),
        })?;
        let bad = |msg: String| Error::Config {
            path: cpath.clone(),
            msg,
        };
        if v.get("peft_type").and_then(|t| t.as_str()) != Some("LORA") {
            return Err(bad("peft_type is not \"LORA\"".into()));
        }
        let rank = v
            .get("r")
            .and_then(|r| r.as_u64())
            .ok_or_else(|| bad("missing integer `r`".into()))? as usize;
        let alpha = v
            .get("lora_alpha")
            .and_then(|a| a.as_f64())
            .ok_or_else(|| bad("missing number `lora_alpha`".into()))?;
        let rslora = v
            .get("use_rslora")
            .and_then(|a| a.as_bool())
            .unwrap_or(false);
        let target_modules = match v.get("target_modules") {
            Some(serde_json::Value::Array(a)) => a
                .iter()
                .filter_map(|m| m.as_str().map(str::to_string))
                .collect(),
            Some(serde_json::Value::String(s)) => vec![s.clone()],
            _ => Vec::new(),
        };
        let wpath = dir.join(ADAPTER_WEIGHTS);
        let tensors = crate::model::mlp::load_tensors(&wpath)?;
        let mut parts: BTreeMap<String, (Option<TensorBuf>, Option<TensorBuf>)> = BTreeMap::new();
        for (key, t) in tensors {
            let rest = key.strip_prefix(PEFT_PREFIX).unwrap_or(&key);
            if let Some(m) = rest.strip_suffix(".lora_A.weight") {
                parts.entry(m.to_string()).or_default().0 = Some(t);
            } else if let Some(m) = rest.strip_suffix(".lora_B.weight") {
                parts.entry(m.to_string()).or_default().1 = Some(t);
            } else {
                return Err(Error::BadTensor {
                    path: wpath.clone(),
                    tensor: key,
                    msg: "not a lora_A / lora_B weight".into(),
                });
            }
        }
        let mut weights = BTreeMap::new();
        for (m, (a, b)) in parts {
            let missing = |which: &str| Error::MissingTensor {
                model: wpath.clone(),
                tensor: format!("{PEFT_PREFIX}{m}.{which}.weight"),
            };
            let a = a.ok_or_else(|| missing("lora_A"))?;
            let b = b.ok_or_else(|| missing("lora_B"))?;
            if a.shape.len() != 2 || b.shape.len() != 2 || a.shape[0] != rank || b.shape[1] != rank
            {
                return Err(Error::BadTensor {
                    path: wpath.clone(),
                    tensor: format!("{PEFT_PREFIX}{m}"),
                    msg: format!(
                        "lora_A {:?} / lora_B {:?} do not fit rank {rank}",
                        a.shape, b.shape
                    ),
                });
            }
            weights.insert(m, (a, b));
        }
        Ok(LoraAdapter {
            config: LoraConfig {
                rank,
                alpha,
                rslora,
                target_modules,
            },
            weights,
            notes: Vec::new(),
        })
    }
}

/// Removes a directory when dropped (a half-written adapter).
struct RemoveOnDrop(Option<PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_dir_all(p);
        }
    }
}

/// The frozen base tensors (f32, on the device) with trainable `A` / `B` [`Var`]s per module.
pub struct LoraModel {
    config: serde_json::Value,
    cfg: LlamaConfig,
    base: HashMap<String, Tensor>,
    /// `(module path, A, B)` in [`LoraConfig::targets`] order.
    vars: Vec<(String, Var, Var)>,
    lora: LoraConfig,
    device: Device,
    layers: Vec<FrozenLayer>,
    embed: Tensor,
    norm: Tensor,
    head: Tensor,
}

/// One decoder layer's frozen tensors and which of its linear modules are adapted.
struct FrozenLayer {
    input_norm: Tensor,
    post_norm: Tensor,
    /// The weights of [`LINEAR_MODULES`], in that order.
    linear: Vec<Tensor>,
    /// q / k / v biases (Qwen2).
    bias: [Option<Tensor>; 3],
    /// Index into [`LoraModel::vars`] of each linear module's adapter.
    lora: [Option<usize>; 7],
}

impl LoraModel {
    /// Fresh adapters on `base` (tensors by HF name): `A` ~ U(−1/√in, 1/√in) drawn from
    /// `StdRng(seed)` module by module, `B = 0`.
    pub fn new(
        config: &serde_json::Value,
        base: &TensorMap,
        lora: &LoraConfig,
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        let cfg = LlamaConfig::from_json(config)?;
        let targets = lora.targets(&cfg)?;
        let mut rng = StdRng::seed_from_u64(seed);
        let mut weights = BTreeMap::new();
        let mut order = Vec::with_capacity(targets.len());
        for (module, [out, inp]) in targets {
            let bound = 1.0 / (inp as f32).sqrt();
            let a: Vec<f32> = (0..lora.rank * inp)
                .map(|_| (rng.random::<f32>() * 2.0 - 1.0) * bound)
                .collect();
            let a = TensorBuf::new(vec![lora.rank, inp], a);
            let b = TensorBuf::new(vec![out, lora.rank], vec![0.0; out * lora.rank]);
            order.push(module.clone());
            weights.insert(module, (a, b));
        }
        let adapter = LoraAdapter {
            config: lora.clone(),
            weights,
            notes: Vec::new(),
        };
        Self::build(config, base, &adapter, Some(&order), device)
    }

    /// The adapter's weights as trainable variables on `base`.
    pub fn from_adapter(
        config: &serde_json::Value,
        base: &TensorMap,
        adapter: &LoraAdapter,
        device: &Device,
    ) -> Result<Self> {
        Self::build(config, base, adapter, None, device)
    }

    fn build(
        config: &serde_json::Value,
        base: &TensorMap,
        adapter: &LoraAdapter,
        order: Option<&[String]>,
        device: &Device,
    ) -> Result<Self> {
        let mut tensors = HashMap::with_capacity(base.len());
        for (name, t) in base {
            tensors.insert(name.clone(), t.to_candle(device)?.to_dtype(DType::F32)?);
        }
        let names: Vec<String> = match order {
            Some(o) => o.to_vec(),
            None => adapter.weights.keys().cloned().collect(),
        };
        let mut vars = Vec::with_capacity(names.len());
        for module in names {
            let (a, b) = &adapter.weights[&module];
            let wname = format!("{module}.weight");
            let w = tensors.get(&wname).ok_or_else(|| Error::MissingTensor {
                model: PathBuf::from("<base>"),
                tensor: wname.clone(),
            })?;
            if w.dims() != [b.shape[0], a.shape[1]] {
                return Err(Error::Tensor {
                    tensor: wname,
                    msg: format!(
                        "shape {:?}, the adapter's B·A is {:?}",
                        w.dims(),
                        [b.shape[0], a.shape[1]]
                    ),
                });
            }
            let a = Var::from_tensor(&a.to_candle(device)?.to_dtype(DType::F32)?)?;
            let b = Var::from_tensor(&b.to_candle(device)?.to_dtype(DType::F32)?)?;
            vars.push((module, a, b));
        }
        let cfg = LlamaConfig::from_json(config)?;
        let get = |name: &str| -> Result<Tensor> {
            tensors
                .get(name)
                .cloned()
                .ok_or_else(|| Error::MissingTensor {
                    model: PathBuf::from("<base>"),
                    tensor: name.to_string(),
                })
        };
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{l}");
            let mut linear = Vec::with_capacity(7);
            let mut lora = [None; 7];
            for (i, (m, block)) in LINEAR_MODULES.iter().enumerate() {
                let module = format!("{p}.{block}.{m}");
                linear.push(get(&format!("{module}.weight"))?.contiguous()?);
                lora[i] = vars.iter().position(|(name, _, _)| *name == module);
            }
            let bias = |m: &str| tensors.get(&format!("{p}.self_attn.{m}.bias")).cloned();
            layers.push(FrozenLayer {
                input_norm: get(&format!("{p}.input_layernorm.weight"))?,
                post_norm: get(&format!("{p}.post_attention_layernorm.weight"))?,
                linear,
                bias: [bias("q_proj"), bias("k_proj"), bias("v_proj")],
                lora,
            });
        }
        for (v, (module, _, _)) in vars.iter().enumerate() {
            if !layers.iter().any(|l| l.lora.contains(&Some(v))) {
                return Err(Error::msg(format!(
                    "{module}: not a decoder layer's linear module"
                )));
            }
        }
        let embed = get("model.embed_tokens.weight")?;
        let head = match tensors.get("lm_head.weight") {
            Some(t) => t.contiguous()?,
            None if cfg.tie_word_embeddings => embed.contiguous()?,
            None => get("lm_head.weight")?,
        };
        // The transformer checks every shape against the config.
        Transformer::from_tensors(config, &tensors, device)?;
        Ok(LoraModel {
            config: config.clone(),
            cfg,
            norm: get("model.norm.weight")?,
            base: tensors,
            vars,
            lora: adapter.config.clone(),
            device: device.clone(),
            layers,
            embed,
            head,
        })
    }

    /// `x · Wᵀ` of linear module `i` of `layer`, plus `s·(x·Aᵀ)·Bᵀ` when it is adapted, plus
    /// its bias; `x` is `[b, s, in]`. The frozen product has no weight gradient.
    fn linear(&self, layer: &FrozenLayer, i: usize, x: &Tensor) -> Result<Tensor> {
        let (b, s, inp) = x.dims3()?;
        let x2 = x.reshape((b * s, inp))?;
        let mut y = frozen_linear(&x2, &layer.linear[i])?;
        if let Some(v) = layer.lora[i] {
            let (_, a, bm) = &self.vars[v];
            let low = (x2.matmul(&a.as_tensor().t()?)? * self.lora.scale())?;
            y = (y + low.matmul(&bm.as_tensor().t()?)?)?;
        }
        if i < 3
            && let Some(bias) = &layer.bias[i]
        {
            y = y.broadcast_add(bias)?;
        }
        let out = y.dim(1)?;
        Ok(y.reshape((b, s, out))?)
    }

    /// Hidden states after the last layer (before the final norm), `[b, s, hidden]`: the
    /// LoRA-aware forward (the same function as [`LoraModel::transformer`]'s, without forming
    /// `W + s·B·A`, and without the frozen weights' gradients).
    pub fn hidden(&self, input_ids: &Tensor) -> Result<Tensor> {
        let c = &self.cfg;
        let (b, s) = input_ids.dims2()?;
        let ids: Vec<u32> = input_ids.flatten_all()?.to_vec1()?;
        if let Some(bad) = ids.iter().find(|&&i| i as usize >= c.vocab_size) {
            return Err(Error::msg(format!(
                "token id {bad} is out of range for vocab_size {}",
                c.vocab_size
            )));
        }
        let flat = Tensor::from_vec(ids, b * s, &self.device)?;
        let mut x = self
            .embed
            .index_select(&flat, 0)?
            .reshape((b, s, c.hidden_size))?;
        let positions: Vec<usize> = (0..s).collect();
        let (cos, sin) = rope_values(&positions, c, Kernels::Differentiable);
        let rope = (
            Tensor::from_vec(cos, (s, c.head_dim), &self.device)?,
            Tensor::from_vec(sin, (s, c.head_dim), &self.device)?,
        );
        let mut mask = vec![0f32; s * s];
        for i in 0..s {
            for j in i + 1..s {
                mask[i * s + j] = f32::NEG_INFINITY;
            }
        }
        let mask = Tensor::from_vec(mask, (s, s), &self.device)?;
        let (nh, nkv, hd) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let heads = |t: Tensor, n: usize| -> candle_core::Result<Tensor> {
            t.reshape((b, s, n, hd))?.transpose(1, 2)?.contiguous()
        };
        for l in &self.layers {
            let h = rms_norm(&x, &l.input_norm, c.rms_norm_eps)?;
            let q = apply_rope(&heads(self.linear(l, 0, &h)?, nh)?, &rope)?;
            let k = apply_rope(&heads(self.linear(l, 1, &h)?, nkv)?, &rope)?;
            let v = heads(self.linear(l, 2, &h)?, nkv)?;
            let attn = grouped_attention(&q, &k, &v, &mask, nh, Kernels::Differentiable)?;
            x = (x + self.linear(l, 3, &attn)?)?;
            let h = rms_norm(&x, &l.post_norm, c.rms_norm_eps)?;
            let gate = self.linear(l, 4, &h)?;
            let up = self.linear(l, 5, &h)?;
            let act = ((&gate * (gate.neg()?.exp()? + 1.0)?.recip()?)? * up)?;
            x = (&x + self.linear(l, 6, &act)?)?;
        }
        Ok(x)
    }

    /// Final norm and LM head on hidden rows `[n, hidden]` → logits `[n, vocab]`.
    pub fn head(&self, x: &Tensor) -> Result<Tensor> {
        let x = rms_norm(x, &self.norm, self.cfg.rms_norm_eps)?;
        frozen_linear(&x, &self.head)
    }

    /// Logits for every position, `[b, s, vocab]`, by the LoRA-aware forward.
    pub fn logits(&self, input_ids: &Tensor) -> Result<Tensor> {
        let x = self.hidden(input_ids)?;
        let (b, s, h) = x.dims3()?;
        Ok(self
            .head(&x.reshape((b * s, h))?)?
            .reshape((b, s, self.cfg.vocab_size))?)
    }

    /// The training forward: a differentiable [`Transformer`] whose adapted weights are
    /// `W + s·(B·A)` (gradients reach `A` and `B`).
    pub fn transformer(&self) -> Result<Transformer> {
        let s = self.lora.scale();
        let mut tensors = self.base.clone();
        for (module, a, b) in &self.vars {
            let name = format!("{module}.weight");
            let w = &self.base[&name];
            let delta = (b.as_tensor().matmul(a.as_tensor())? * s)?;
            tensors.insert(name, (w + delta)?);
        }
        Transformer::from_tensors(&self.config, &tensors, &self.device)
    }

    /// The trainable variables (`A`s and `B`s).
    pub fn vars(&self) -> Vec<Var> {
        self.vars
            .iter()
            .flat_map(|(_, a, b)| [a.clone(), b.clone()])
            .collect()
    }

    /// The current adapter.
    pub fn adapter(&self) -> Result<LoraAdapter> {
        let buf = |v: &Var| -> Result<TensorBuf> {
            let t = v.as_tensor();
            Ok(TensorBuf::new(
                t.dims().to_vec(),
                t.flatten_all()?.to_vec1::<f32>()?,
            ))
        };
        let mut weights = BTreeMap::new();
        for (m, a, b) in &self.vars {
            weights.insert(m.clone(), (buf(a)?, buf(b)?));
        }
        Ok(LoraAdapter {
            config: self.lora.clone(),
            weights,
            notes: Vec::new(),
        })
    }
}

/// `x · wᵀ` for `x` `[rows, in]` and a frozen `w` `[out, in]`: on the CPU a custom op whose
/// backward is `grad · w` alone (candle's matmul would also form the weight's gradient, a
/// weight-sized product and buffers per module per step, though nothing reads it); elsewhere a
/// plain matmul.
fn frozen_linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 && w.dtype() == DType::F32 {
        Ok(x.contiguous()?.apply_op1(Frozen(w.clone()))?)
    } else {
        Ok(x.matmul(&w.t()?)?)
    }
}

/// The custom op of [`frozen_linear`]: `x · wᵀ`, gradient only for `x`.
struct Frozen(Tensor);

impl candle_core::CustomOp1 for Frozen {
    fn name(&self) -> &'static str {
        "lora-frozen-linear"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let (start, end) = layout
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("frozen linear: non-contiguous input".into()))?;
        let data = &storage.as_slice::<f32>()?[start..end];
        let x = Tensor::from_slice(data, layout.shape(), &Device::Cpu)?;
        let y = x.matmul(&self.0.t()?)?;
        let shape = y.shape().clone();
        let values = y.flatten_all()?.to_vec1::<f32>()?;
        Ok((candle_core::CpuStorage::F32(values), shape))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad.matmul(&self.0)?))
    }
}

/// A padded batch for the target-only loss: inputs `[b, s]` (padded with 0; attention is causal,
/// so padding after a row's end changes none of its positions), the flat positions `row · s + t`
/// whose next token counts, and those tokens.
fn target_batch(examples: &[&TrainExample], device: &Device) -> Result<(Tensor, Tensor, Tensor)> {
    let s = examples
        .iter()
        .map(|e| e.ids.len())
        .max()
        .unwrap_or(1)
        .max(2)
        - 1;
    let b = examples.len();
    let mut inputs = vec![0u32; b * s];
    let mut positions = Vec::new();
    let mut targets = Vec::new();
    for (r, e) in examples.iter().enumerate() {
        if e.ids.len() != e.loss_mask.len() {
            return Err(Error::msg(format!(
                "training example {r}: {} ids but {} mask entries",
                e.ids.len(),
                e.loss_mask.len()
            )));
        }
        for t in 0..e.ids.len().saturating_sub(1) {
            inputs[r * s + t] = e.ids[t];
            if e.loss_mask[t + 1] {
                positions.push((r * s + t) as u32);
                targets.push(e.ids[t + 1]);
            }
        }
    }
    if positions.is_empty() {
        return Err(Error::msg("the batch has no target token"));
    }
    let n = positions.len();
    Ok((
        Tensor::from_vec(inputs, (b, s), device)?,
        Tensor::from_vec(positions, n, device)?,
        Tensor::from_vec(targets, n, device)?,
    ))
}

/// Mean cross-entropy of `targets` at flat `positions` of the batch `inputs`, with the head run
/// on those positions only. Differentiable.
pub fn target_loss(
    model: &LoraModel,
    inputs: &Tensor,
    positions: &Tensor,
    targets: &Tensor,
) -> Result<Tensor> {
    let hidden = model.hidden(inputs)?;
    let (b, s, h) = hidden.dims3()?;
    let picked = hidden.reshape((b * s, h))?.index_select(positions, 0)?;
    let logp = log_softmax_last(&model.head(&picked)?)?;
    let nll = logp
        .gather(&targets.unsqueeze(D::Minus1)?.contiguous()?, D::Minus1)?
        .squeeze(D::Minus1)?;
    Ok(nll.mean_all()?.neg()?)
}

/// Train a fresh adapter of shape `lora` on `data` over the frozen `base` (tensors by HF name,
/// any storage dtype; the math runs in f32). `tc.seed` seeds the initialisation and the batch
/// order (shuffled epochs); `log(step, loss, lr)` is called after every step.
pub fn train_lora(
    config: &serde_json::Value,
    base: &TensorMap,
    data: &[TrainExample],
    lora: &LoraConfig,
    tc: &TrainConfig,
    device: &Device,
    mut log: impl FnMut(usize, f32, f64),
) -> Result<LoraAdapter> {
    if data.is_empty() {
        return Err(Error::msg("no training examples"));
    }
    if tc.batch_size == 0 {
        return Err(Error::msg("batch size must be at least 1"));
    }
    let model = LoraModel::new(config, base, lora, tc.seed, device)?;
    let params = ParamsAdamW {
        lr: tc.lr_at(0),
        weight_decay: tc.weight_decay,
        ..ParamsAdamW::default()
    };
    let mut opt = AdamW::new(model.vars(), params)?;
    let mut rng = StdRng::seed_from_u64(tc.seed ^ 0x05ee_dba7_c4e5_u64);
    let mut order: Vec<usize> = Vec::new();
    for step in 0..tc.steps {
        let mut batch = Vec::with_capacity(tc.batch_size);
        while batch.len() < tc.batch_size {
            if order.is_empty() {
                order = (0..data.len()).collect();
                order.shuffle(&mut rng);
            }
            batch.push(&data[order.pop().expect("refilled above")]);
        }
        let (inputs, positions, targets) = target_batch(&batch, device)?;
        let loss = target_loss(&model, &inputs, &positions, &targets)?;
        let lr = tc.lr_at(step);
        opt.set_learning_rate(lr);
        opt.backward_step(&loss)?;
        log(step, loss.to_scalar::<f32>()?, lr);
    }
    model.adapter()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::train::init_weights;

    fn tiny_config() -> serde_json::Value {
        serde_json::json!({
            "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 8,
            "rms_norm_eps": 1e-5, "tie_word_embeddings": true
        })
    }

    fn setup() -> (serde_json::Value, TensorMap, Vec<TrainExample>) {
        let config = tiny_config();
        let cfg = LlamaConfig::from_json(&config).unwrap();
        // Weights ~ N(0, 0.5²): large enough for the (frozen, tied) head to express confident
        // predictions, so the adapters can memorise.
        let base: TensorMap = init_weights(&cfg, 11)
            .into_iter()
            .map(|(n, t)| {
                if t.shape.len() == 1 {
                    return (n, t);
                }
                let v = t.values().iter().map(|x| x * 25.0).collect();
                (n, TensorBuf::new(t.shape.clone(), v))
            })
            .collect();
        let data = vec![
            TrainExample::prompt_target(&[1, 3], &[5, 7, 2]),
            TrainExample::prompt_target(&[1, 4], &[6, 2]),
            TrainExample::prompt_target(&[1, 5, 5], &[3, 2]),
        ];
        (config, base, data)
    }

    fn tc(steps: usize) -> TrainConfig {
        TrainConfig {
            steps,
            batch_size: 3,
            lr: 2e-2,
            warmup: 3,
            weight_decay: 0.0,
            seed: 5,
            ..TrainConfig::default()
        }
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    #[test]
    fn lora_memorises_and_is_deterministic() {
        let (config, base, data) = setup();
        let lora = LoraConfig {
            rank: 4,
            alpha: 8.0,
            ..LoraConfig::default()
        };
        let mut losses = Vec::new();
        let a = train_lora(
            &config,
            &base,
            &data,
            &lora,
            &tc(80),
            &Device::Cpu,
            |_, l, _| losses.push(l),
        )
        .unwrap();
        let first: f32 = losses[..3].iter().sum::<f32>() / 3.0;
        let last: f32 = losses[losses.len() - 3..].iter().sum::<f32>() / 3.0;
        assert!(first > 1.5, "start near ln 8: {losses:?}");
        assert!(last < 0.5 * first, "loss must fall: {losses:?}");
        // 2 layers × 7 modules, every B moved off zero.
        assert_eq!(a.weights.len(), 14);
        for (m, (_, b)) in &a.weights {
            assert!(b.values().iter().any(|v| *v != 0.0), "{m}: B stayed 0");
        }
        let mut again = Vec::new();
        let b = train_lora(
            &config,
            &base,
            &data,
            &lora,
            &tc(80),
            &Device::Cpu,
            |_, l, _| again.push(l),
        )
        .unwrap();
        assert_eq!(losses, again);
        assert_eq!(a, b);
        // Another seed, another adapter.
        let other = TrainConfig { seed: 6, ..tc(2) };
        let c = train_lora(
            &config,
            &base,
            &data,
            &lora,
            &other,
            &Device::Cpu,
            |_, _, _| {},
        )
        .unwrap();
        assert_ne!(a.weights, c.weights);
    }

    #[test]
    fn init_is_peft_like_and_step_zero_is_the_base_model() {
        let (config, base, _) = setup();
        let lora = LoraConfig::default();
        let m = LoraModel::new(&config, &base, &lora, 3, &Device::Cpu).unwrap();
        let adapter = m.adapter().unwrap();
        for (module, (a, b)) in &adapter.weights {
            let bound = 1.0 / (a.shape[1] as f32).sqrt();
            assert!(a.values().iter().all(|v| v.abs() <= bound), "{module}");
            assert!(a.values().iter().any(|v| *v != 0.0), "{module}");
            assert!(b.values().iter().all(|v| *v == 0.0), "{module}");
        }
        let ids = Tensor::new(&[[1u32, 3, 5, 7, 2], [1, 4, 6, 2, 0]], &Device::Cpu).unwrap();
        let lora_logits = m.transformer().unwrap().logits(&ids).unwrap();
        let aware_logits = m.logits(&ids).unwrap();
        let base_logits = Transformer::from_tensors(
            &config,
            &base
                .iter()
                .map(|(n, t)| (n.clone(), t.to_candle(&Device::Cpu).unwrap()))
                .collect(),
            &Device::Cpu,
        )
        .unwrap()
        .logits(&ids)
        .unwrap();
        assert_eq!(max_diff(&lora_logits, &base_logits), 0.0);
        let d = max_diff(&aware_logits, &base_logits);
        assert!(d < 1e-5, "{d}");
    }

    #[test]
    fn folded_adapter_gives_the_training_forward_logits() {
        let (config, base, data) = setup();
        for rslora in [false, true] {
            let lora = LoraConfig {
                rank: 2,
                alpha: 6.0,
                rslora,
                target_modules: vec!["q_proj".into(), "v_proj".into(), "down_proj".into()],
            };
            let adapter = train_lora(
                &config,
                &base,
                &data,
                &lora,
                &tc(10),
                &Device::Cpu,
                |_, _, _| {},
            )
            .unwrap();
            assert_eq!(adapter.weights.len(), 6);
            let ids = Tensor::new(&[[1u32, 3, 5, 7, 2]], &Device::Cpu).unwrap();
            let model = LoraModel::from_adapter(&config, &base, &adapter, &Device::Cpu).unwrap();
            // the training forward (LoRA-aware) and the W + s·B·A transformer
            let trained = model.logits(&ids).unwrap();
            let effective = model.transformer().unwrap().logits(&ids).unwrap();
            let folded = adapter.fold_into(&base).unwrap();
            // untouched tensors stay bit-identical
            assert_eq!(
                folded["model.layers.0.self_attn.k_proj.weight"],
                base["model.layers.0.self_attn.k_proj.weight"]
            );
            let mem = crate::candidate::MemModel {
                config: config.clone(),
                tensors: folded,
            };
            let plain = Transformer::from_mem(&mem, &Device::Cpu, DType::F32)
                .unwrap()
                .logits(&ids)
                .unwrap();
            let d = max_diff(&trained, &plain);
            assert!(d < 1e-5, "rslora {rslora}: {d}");
            let d = max_diff(&effective, &plain);
            assert!(d < 1e-5, "rslora {rslora}: {d}");
            let base_logits = Transformer::from_mem(
                &crate::candidate::MemModel {
                    config: config.clone(),
                    tensors: base.clone(),
                },
                &Device::Cpu,
                DType::F32,
            )
            .unwrap()
            .logits(&ids)
            .unwrap();
            assert!(
                max_diff(&plain, &base_logits) > 1e-3,
                "the adapter does something"
            );
        }
    }

    #[test]
    fn lora_aware_gradients_equal_the_effective_weight_gradients() {
        // The training forward (frozen custom op + low-rank path) and W + s·B·A through the
        // plain transformer give the same loss gradients for every A and B.
        let (config, base, data) = setup();
        let lora = LoraConfig {
            rank: 2,
            alpha: 3.0,
            ..LoraConfig::default()
        };
        let mut adapter = train_lora(
            &config,
            &base,
            &data,
            &lora,
            &tc(2),
            &Device::Cpu,
            |_, _, _| {},
        )
        .unwrap();
        adapter.notes.clear();
        let model = LoraModel::from_adapter(&config, &base, &adapter, &Device::Cpu).unwrap();
        let batch: Vec<&TrainExample> = data.iter().collect();
        let (inputs, positions, targets) = target_batch(&batch, &Device::Cpu).unwrap();
        let aware = target_loss(&model, &inputs, &positions, &targets).unwrap();
        let net = model.transformer().unwrap();
        let hidden = net.hidden(&inputs).unwrap();
        let (b, s, h) = hidden.dims3().unwrap();
        let picked = hidden
            .reshape((b * s, h))
            .unwrap()
            .index_select(&positions, 0)
            .unwrap();
        let logp = log_softmax_last(&net.head(&picked).unwrap()).unwrap();
        let plain = logp
            .gather(&targets.unsqueeze(1).unwrap(), 1)
            .unwrap()
            .mean_all()
            .unwrap()
            .neg()
            .unwrap();
        let (la, lp) = (
            aware.to_scalar::<f32>().unwrap(),
            plain.to_scalar::<f32>().unwrap(),
        );
        assert!((la - lp).abs() < 1e-5, "{la} vs {lp}");
        let (ga, gp) = (aware.backward().unwrap(), plain.backward().unwrap());
        for var in model.vars() {
            let x = ga.get(var.as_tensor()).unwrap();
            let y = gp.get(var.as_tensor()).unwrap();
            let scale = y
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(scale > 0.0);
            let d = max_diff(x, y);
            assert!(d <= 1e-4 * scale.max(1.0), "{d} (scale {scale})");
        }
    }

    #[test]
    fn saved_adapter_has_peft_keys_and_shapes_and_loads_back() {
        let (config, base, data) = setup();
        let lora = LoraConfig {
            rank: 3,
            alpha: 5.0,
            rslora: true,
            target_modules: vec!["o_proj".into(), "gate_proj".into()],
        };
        let mut adapter = train_lora(
            &config,
            &base,
            &data,
            &lora,
            &tc(3),
            &Device::Cpu,
            |_, _, _| {},
        )
        .unwrap();
        adapter.notes.push("steps: 3".into());
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("adapter");
        adapter.save_peft(&out, "tiny-base").unwrap();
        let mut files: Vec<String> = std::fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        files.sort();
        assert_eq!(files, vec!["adapter"], "no temporary directory left");
        let tensors =
            crate::model::mlp::load_tensors(&out.join("adapter_model.safetensors")).unwrap();
        let mut want = Vec::new();
        for l in 0..2 {
            for (m, shape_b) in [("self_attn.o_proj", [16, 3]), ("mlp.gate_proj", [32, 3])] {
                let in_dim = 16;
                want.push((
                    format!("base_model.model.model.layers.{l}.{m}.lora_A.weight"),
                    vec![3, in_dim],
                ));
                want.push((
                    format!("base_model.model.model.layers.{l}.{m}.lora_B.weight"),
                    shape_b.to_vec(),
                ));
            }
        }
        want.sort();
        let got: Vec<(String, Vec<usize>)> = tensors
            .iter()
            .map(|(k, t)| (k.clone(), t.shape.clone()))
            .collect();
        assert_eq!(got, want);
        let cfg: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(out.join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(cfg["peft_type"], "LORA");
        assert_eq!(cfg["r"], 3);
        assert_eq!(cfg["lora_alpha"], 5.0);
        assert_eq!(cfg["use_rslora"], true);
        assert_eq!(
            cfg["target_modules"],
            serde_json::json!(["o_proj", "gate_proj"])
        );
        assert_eq!(cfg["base_model_name_or_path"], "tiny-base");
        assert!(
            std::fs::read_to_string(out.join("README.md"))
                .unwrap()
                .contains("steps: 3")
        );
        let mut loaded = LoraAdapter::load_peft(&out).unwrap();
        loaded.notes = adapter.notes.clone();
        assert_eq!(loaded, adapter);
        // An existing directory is refused.
        let err = adapter.save_peft(&out, "x").unwrap_err().to_string();
        assert!(err.contains("already exists"), "{err}");
    }

    #[test]
    fn unknown_target_module_lists_the_linear_modules() {
        let (config, base, data) = setup();
        let lora = LoraConfig {
            target_modules: vec!["q_proj".into(), "qkv".into()],
            ..LoraConfig::default()
        };
        let err = train_lora(
            &config,
            &base,
            &data,
            &lora,
            &tc(1),
            &Device::Cpu,
            |_, _, _| {},
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("`qkv`"), "{err}");
        assert!(err.contains("q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj"));
    }
}
