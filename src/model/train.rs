//! Training the toy world: seeded initialisation, next-token cross-entropy with a per-token loss
//! mask, and candle-nn's AdamW with linear warm-up and cosine decay.
//!
//! Everything is deterministic for a given seed and thread count: the initial weights come from a
//! seeded [`StdRng`] through `Tensor::from_vec` (candle's own CPU RNG cannot be seeded), batches
//! are drawn from the same kind of RNG, and the forward is [`Transformer`] itself (plain
//! differentiable ops).
//!
//! ```no_run
//! # use evomerge::model::train::*;
//! # fn demo(config: &serde_json::Value, data: &[Example]) -> evomerge::Result<()> {
//! let cfg = evomerge::model::LlamaConfig::from_json(config)?;
//! let init = init_weights(&cfg, 42);
//! let tc = TrainConfig { steps: 100, ..TrainConfig::default() };
//! let trained = train(config, &init, data, &tc, &candle_core::Device::Cpu, |_, _| {})?;
//! # Ok(()) }
//! ```

use std::collections::HashMap;

use candle_core::{D, DType, Device, Tensor, Var};
use candle_nn::optim::{AdamW, Optimizer, ParamsAdamW};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal};

use crate::candidate::TensorMap;
use crate::error::{Error, Result};
use crate::model::transformer::{LlamaConfig, Transformer, log_softmax_last};
use crate::tensor::TensorBuf;

/// One training sequence: `ids` (with bos / eos as wanted) and, per position `t`, whether
/// predicting `ids[t]` from `ids[..t]` counts in the loss (`loss_mask[0]` is ignored).
#[derive(Clone, Debug, PartialEq)]
pub struct Example {
    pub ids: Vec<u32>,
    pub loss_mask: Vec<bool>,
}

impl Example {
    /// A prompt / target pair: loss on the target tokens only.
    pub fn prompt_target(prompt: &[u32], target: &[u32]) -> Self {
        let ids: Vec<u32> = prompt.iter().chain(target).copied().collect();
        let loss_mask = (0..ids.len()).map(|i| i >= prompt.len()).collect();
        Example { ids, loss_mask }
    }

    /// Plain text: loss on every token after the first.
    pub fn text(ids: &[u32]) -> Self {
        Example {
            ids: ids.to_vec(),
            loss_mask: (0..ids.len()).map(|i| i > 0).collect(),
        }
    }
}

/// Optimiser and schedule settings.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainConfig {
    pub steps: usize,
    pub batch_size: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Linear warm-up steps, then cosine decay to `lr · min_lr_ratio`.
    pub warmup: usize,
    pub min_lr_ratio: f64,
    pub weight_decay: f64,
    /// Seeds the batch sampling.
    pub seed: u64,
    /// The padding id (its positions never count in the loss).
    pub pad_id: u32,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            steps: 1000,
            batch_size: 32,
            lr: 3e-3,
            warmup: 50,
            min_lr_ratio: 0.1,
            weight_decay: 0.01,
            seed: 0,
            pad_id: 0,
        }
    }
}

impl TrainConfig {
    /// The learning rate at `step` (0-based).
    pub fn lr_at(&self, step: usize) -> f64 {
        if step < self.warmup {
            return self.lr * (step + 1) as f64 / self.warmup as f64;
        }
        let span = self.steps.saturating_sub(self.warmup).max(1) as f64;
        let t = ((step - self.warmup) as f64 / span).min(1.0);
        let min = self.lr * self.min_lr_ratio;
        min + (self.lr - min) * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
    }
}

/// Seeded initial weights for `cfg`: matrices ~ N(0, 0.02²) (the transformers default), norms 1,
/// no biases. Tensors are drawn in [`LlamaConfig::tensor_shapes`] order.
pub fn init_weights(cfg: &LlamaConfig, seed: u64) -> TensorMap {
    let mut rng = StdRng::seed_from_u64(seed);
    let normal = Normal::new(0.0f32, 0.02).expect("valid std");
    cfg.tensor_shapes(false)
        .into_iter()
        .map(|(name, shape)| {
            let n: usize = shape.iter().product();
            let data = if shape.len() == 1 {
                vec![1.0; n]
            } else {
                (0..n).map(|_| normal.sample(&mut rng)).collect()
            };
            (name, TensorBuf::new(shape, data))
        })
        .collect()
}

/// Build a padded batch: inputs `[b, s]`, targets `[b, s]`, mask `[b, s]` (f32), where
/// `s` = longest example − 1.
pub fn make_batch(
    examples: &[&Example],
    pad_id: u32,
    device: &Device,
) -> Result<(Tensor, Tensor, Tensor)> {
    let s = examples
        .iter()
        .map(|e| e.ids.len())
        .max()
        .unwrap_or(1)
        .max(2)
        - 1;
    let b = examples.len();
    let mut inputs = vec![pad_id; b * s];
    let mut targets = vec![pad_id; b * s];
    let mut mask = vec![0f32; b * s];
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
            targets[r * s + t] = e.ids[t + 1];
            if e.loss_mask[t + 1] && e.ids[t + 1] != pad_id {
                mask[r * s + t] = 1.0;
            }
        }
    }
    Ok((
        Tensor::from_vec(inputs, (b, s), device)?,
        Tensor::from_vec(targets, (b, s), device)?,
        Tensor::from_vec(mask, (b, s), device)?,
    ))
}

/// Mean next-token cross-entropy over the masked positions: logits `[b, s, v]`, targets
/// `[b, s]` u32, mask `[b, s]` f32. Differentiable.
pub fn lm_loss(logits: &Tensor, targets: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let logp = log_softmax_last(logits)?;
    let picked = logp
        .gather(&targets.unsqueeze(D::Minus1)?.contiguous()?, D::Minus1)?
        .squeeze(D::Minus1)?;
    let total = mask.sum_all()?.to_scalar::<f32>()?;
    if total == 0.0 {
        return Err(Error::msg("loss mask selects no token"));
    }
    Ok(((picked * mask)?.sum_all()?.neg()? / total as f64)?)
}

/// Train from `start` (tensors by HF name, e.g. [`init_weights`] or a base model) on `data`;
/// returns the trained tensors. `log(step, loss)` is called after every step.
pub fn train(
    config: &serde_json::Value,
    start: &TensorMap,
    data: &[Example],
    tc: &TrainConfig,
    device: &Device,
    mut log: impl FnMut(usize, f32),
) -> Result<TensorMap> {
    if data.is_empty() {
        return Err(Error::msg("no training examples"));
    }
    let mut vars: Vec<(String, Var)> = Vec::with_capacity(start.len());
    for (name, t) in start {
        vars.push((name.clone(), Var::from_tensor(&t.to_candle(device)?)?));
    }
    let by_name: HashMap<String, Tensor> = vars
        .iter()
        .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
        .collect();
    let model = Transformer::from_tensors(config, &by_name, device)?;
    let params = ParamsAdamW {
        lr: tc.lr_at(0),
        weight_decay: tc.weight_decay,
        ..ParamsAdamW::default()
    };
    let mut opt = AdamW::new(vars.iter().map(|(_, v)| v.clone()).collect(), params)?;
    let mut rng = StdRng::seed_from_u64(tc.seed);
    for step in 0..tc.steps {
        let batch: Vec<&Example> = (0..tc.batch_size)
            .map(|_| &data[rng.random_range(0..data.len())])
            .collect();
        let (inputs, targets, mask) = make_batch(&batch, tc.pad_id, device)?;
        let logits = model.logits(&inputs)?;
        let loss = lm_loss(&logits, &targets, &mask)?;
        opt.set_learning_rate(tc.lr_at(step));
        opt.backward_step(&loss)?;
        log(step, loss.to_dtype(DType::F32)?.to_scalar::<f32>()?);
    }
    vars.into_iter()
        .map(|(name, v)| {
            let t = v.as_tensor();
            let shape = t.dims().to_vec();
            let data = t.flatten_all()?.to_vec1::<f32>()?;
            Ok((name, TensorBuf::new(shape, data)))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny_config() -> serde_json::Value {
        serde_json::json!({
            "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 8,
            "rms_norm_eps": 1e-5, "tie_word_embeddings": true
        })
    }

    #[test]
    fn lr_schedule_warms_up_then_decays() {
        let tc = TrainConfig {
            steps: 110,
            warmup: 10,
            lr: 1.0,
            min_lr_ratio: 0.1,
            ..TrainConfig::default()
        };
        assert!((tc.lr_at(0) - 0.1).abs() < 1e-12);
        assert!((tc.lr_at(9) - 1.0).abs() < 1e-12);
        assert!((tc.lr_at(10) - 1.0).abs() < 1e-12);
        assert!((tc.lr_at(60) - 0.55).abs() < 1e-12);
        assert!((tc.lr_at(110) - 0.1).abs() < 1e-12);
    }

    #[test]
    fn loss_is_masked_cross_entropy() {
        // Uniform logits over 4 classes: every position's loss is ln 4; the mask picks 2 of 3.
        let dev = Device::Cpu;
        let logits = Tensor::zeros((1, 3, 4), DType::F32, &dev).unwrap();
        let targets = Tensor::new(&[[0u32, 1, 2]], &dev).unwrap();
        let mask = Tensor::new(&[[1f32, 0., 1.]], &dev).unwrap();
        let l = lm_loss(&logits, &targets, &mask).unwrap();
        assert!((l.to_scalar::<f32>().unwrap() - 4f32.ln()).abs() < 1e-6);
        // A confident correct logit lowers it: position 0 has logit 10 on class 0.
        let mut v = vec![0f32; 12];
        v[0] = 10.0;
        let logits = Tensor::from_vec(v, (1, 3, 4), &dev).unwrap();
        let l = lm_loss(&logits, &targets, &mask).unwrap();
        let p0 = -(10f32 - (10f32.exp() + 3.0).ln());
        let want = (p0 + 4f32.ln()) / 2.0;
        assert!((l.to_scalar::<f32>().unwrap() - want).abs() < 1e-5);
    }

    #[test]
    fn batch_masks_prompt_and_padding() {
        let a = Example::prompt_target(&[1, 5, 6], &[7, 2]);
        let b = Example::text(&[1, 4]);
        let (i, t, m) = make_batch(&[&a, &b], 0, &Device::Cpu).unwrap();
        assert_eq!(
            i.to_vec2::<u32>().unwrap(),
            vec![vec![1, 5, 6, 7], vec![1, 0, 0, 0]]
        );
        assert_eq!(
            t.to_vec2::<u32>().unwrap(),
            vec![vec![5, 6, 7, 2], vec![4, 0, 0, 0]]
        );
        assert_eq!(
            m.to_vec2::<f32>().unwrap(),
            vec![vec![0., 0., 1., 1.], vec![1., 0., 0., 0.]]
        );
    }

    #[test]
    fn training_memorises_a_sequence_deterministically() {
        let config = tiny_config();
        let cfg = LlamaConfig::from_json(&config).unwrap();
        let init = init_weights(&cfg, 7);
        let data = vec![
            Example::text(&[1, 3, 5, 7, 2]),
            Example::text(&[1, 4, 6, 2]),
        ];
        let tc = TrainConfig {
            steps: 60,
            batch_size: 4,
            lr: 1e-2,
            warmup: 5,
            seed: 3,
            ..TrainConfig::default()
        };
        let mut losses = Vec::new();
        let out = train(&config, &init, &data, &tc, &Device::Cpu, |_, l| {
            losses.push(l)
        })
        .unwrap();
        assert!(losses[0] > 1.5, "start near ln 8: {}", losses[0]);
        assert!(*losses.last().unwrap() < 0.8, "{losses:?}");
        // Every tensor moved (gradients reach all of them).
        for (name, t) in &out {
            assert_ne!(t, &init[name], "{name} did not change");
        }
        let mut again = Vec::new();
        let out2 = train(&config, &init, &data, &tc, &Device::Cpu, |_, l| {
            again.push(l)
        })
        .unwrap();
        assert_eq!(losses, again);
        assert_eq!(out, out2);
    }
}
