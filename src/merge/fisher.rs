//! Fisher-weighted averaging (Matena & Raffel 2022, "Merging Models with Fisher-Weighted
//! Averaging", NeurIPS).
//!
//! Each model's parameters are weighted, entry by entry, by its diagonal Fisher information:
//!
//! ```text
//! θ = Σᵢ λᵢ (Fᵢ + ε) θᵢ  /  Σᵢ λᵢ (Fᵢ + ε)
//! ```
//!
//! `λᵢ` is the per-model `weight` (default 1), `ε` the global `epsilon` floor (default 1e-6, as in
//! the paper's code) that keeps entries no data touches at the plain weighted average.
//!
//! `Fᵢ` is read from `fisher.safetensors` beside each model (same tensor names and shapes). It is
//! made by [`mlp_fisher`] (or any code that calls [`fisher_diagonal`]): the mean over examples of
//! the squared gradient of `log p(y|x)`, with `y` the true label (the "empirical" Fisher) or drawn
//! from the model's own prediction (the Fisher the paper uses).
//!
//! Models fine-tuned on different data have Fishers of very different overall size (a confident
//! model has tiny gradients everywhere), which then acts as a hidden per-model weight.
//! [`normalize_fisher`] rescales one model's Fisher to mean 1 over all its entries, leaving `λᵢ`
//! as the only between-model weighting (FusionBench's Fisher merging offers a similar per-model
//! normalisation). Neither variant dominates on the digits experts: with 128 hidden units
//! (seeds 0–3) the raw Fisher lost to the plain average once and the normalised one never; with
//! 64 hidden units (seeds 0–7) the raw one always won and the normalised one tied once. The digits
//! example reports both.
//!
//! Workflow: `Mlp::train` → `mlp_fisher(&mlp, &train_data, FisherLabels::Sampled(seed), 1000)` →
//! `normalize_fisher` → `save_fisher(dir, &f)`; then a recipe with `merge_method: fisher`. For a
//! causal LM, `evomerge fisher MODEL_DIR --tasks TASKS.toml` does the same over task examples
//! ([`lm_examples`], [`lm_fisher`]): the empirical Fisher of each example's summed target-token
//! log-likelihood.

use std::path::Path;

use candle_core::{D, Device, Tensor, Var};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::candidate::TensorMap;
use crate::error::{Error, Result};
use crate::eval::classify::Dataset;
use crate::merge::{BaseUse, MergeInput, MergeMethod, ParamDecl, ParamKind, Scope};
use crate::model::mlp::Mlp;
use crate::tensor::TensorBuf;

/// The file beside each model that holds its diagonal Fisher.
pub const FISHER_FILE: &str = "fisher.safetensors";

/// Registry key `fisher`.
pub struct Fisher;

const PARAMS: &[ParamDecl] = &[
    ParamDecl {
        name: "weight",
        scope: Scope::PerModel,
        kind: ParamKind::Float { min: 0.0, max: 1.0 },
        default: Some(1.0),
        searched: true,
        doc: "λᵢ: the model's share before Fisher weighting",
    },
    ParamDecl {
        name: "epsilon",
        scope: Scope::Global,
        kind: ParamKind::Float { min: 0.0, max: 1.0 },
        default: Some(1e-6),
        searched: true,
        doc: "floor added to every Fisher entry (ε)",
    },
];

impl MergeMethod for Fisher {
    fn name(&self) -> &'static str {
        "fisher"
    }

    fn params(&self) -> &'static [ParamDecl] {
        PARAMS
    }

    fn base(&self) -> BaseUse {
        BaseUse::Optional
    }

    fn model_count(&self) -> (usize, Option<usize>) {
        (1, None)
    }

    fn aux(&self) -> Option<&'static str> {
        Some(FISHER_FILE)
    }

    fn merge(&self, input: &MergeInput<'_>) -> Result<Vec<f32>> {
        let err = |msg: String| Error::Method {
            method: "fisher".into(),
            msg: format!("tensor `{}`: {msg}", input.tensor),
        };
        let n = input.shape.iter().product::<usize>();
        if input.aux.len() != input.models.len() {
            return Err(err(format!(
                "{} Fisher diagonals for {} models (is {FISHER_FILE} beside every model?)",
                input.aux.len(),
                input.models.len()
            )));
        }
        let eps = input.global.get("epsilon")?;
        let mut num = vec![0f64; n];
        let mut den = vec![0f64; n];
        for (i, (theta, fisher)) in input.models.iter().zip(&input.aux).enumerate() {
            let fisher =
                fisher.ok_or_else(|| err(format!("model {i} has no entry in {FISHER_FILE}")))?;
            if fisher.len() != n || theta.len() != n {
                return Err(err(format!(
                    "model {i}: {} values and {} Fisher entries, expected {n}",
                    theta.len(),
                    fisher.len()
                )));
            }
            let lambda = input.model_params[i].get("weight")?;
            for k in 0..n {
                let w = lambda * (f64::from(fisher[k]) + eps);
                num[k] += w * f64::from(theta[k]);
                den[k] += w;
            }
        }
        Ok(num
            .iter()
            .zip(&den)
            .map(|(a, b)| if *b > 0.0 { (a / b) as f32 } else { 0.0 })
            .collect())
    }
}

/// Which labels the log-likelihood is taken of.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum FisherLabels {
    /// The data's labels (the empirical Fisher).
    True,
    /// One label per example drawn from the model's predicted distribution, seeded.
    Sampled(u64),
}

/// Diagonal Fisher of the parameters `vars`: the mean over `n` examples of the squared gradient of
/// `log_likelihood(k)` (a scalar tensor for example `k`). Returned under the vars' names.
pub fn fisher_diagonal(
    vars: &[(String, Var)],
    n: usize,
    mut log_likelihood: impl FnMut(usize) -> Result<Tensor>,
) -> Result<TensorMap> {
    if n == 0 {
        return Err(Error::msg("the Fisher needs at least one example"));
    }
    let mut sums: Vec<Tensor> = vars
        .iter()
        .map(|(_, v)| v.as_tensor().zeros_like())
        .collect::<candle_core::Result<_>>()?;
    for k in 0..n {
        let grads = log_likelihood(k)?.backward()?;
        for ((_, v), sum) in vars.iter().zip(sums.iter_mut()) {
            if let Some(g) = grads.get(v.as_tensor()) {
                *sum = (&*sum + g.sqr()?)?;
            }
        }
    }
    let mut out = TensorMap::new();
    for ((name, v), sum) in vars.iter().zip(sums) {
        let mean = (sum / n as f64)?;
        let data = mean.flatten_all()?.to_vec1::<f32>()?;
        out.insert(name.clone(), TensorBuf::new(v.dims().to_vec(), data));
    }
    Ok(out)
}

/// The diagonal Fisher of an MLP classifier on (at most `max_examples` of) `data`.
pub fn mlp_fisher(
    mlp: &Mlp,
    data: &Dataset,
    labels: FisherLabels,
    max_examples: usize,
) -> Result<TensorMap> {
    let device = Device::Cpu;
    let n = data.len().min(max_examples);
    let x = data.x_tensor(&device)?;
    let mut rng = StdRng::seed_from_u64(match labels {
        FisherLabels::Sampled(seed) => seed,
        FisherLabels::True => 0,
    });
    fisher_diagonal(&mlp.named_vars(), n, |k| {
        let xk = x.narrow(0, k, 1)?;
        let log_p = candle_nn::ops::log_softmax(&mlp.forward(&xk)?, D::Minus1)?.squeeze(0)?;
        let y = match labels {
            FisherLabels::True => data.y[k] as usize,
            FisherLabels::Sampled(_) => {
                let p: Vec<f32> = log_p.exp()?.to_vec1()?;
                let mut u = rng.random::<f32>();
                let mut pick = p.len() - 1;
                for (c, pc) in p.iter().enumerate() {
                    if u < *pc {
                        pick = c;
                        break;
                    }
                    u -= pc;
                }
                pick
            }
        };
        Ok(log_p.get(y)?)
    })
}

/// Token sequences for [`lm_fisher`] from task examples, as the LM evaluator reads them: bos
/// (when the tokenizer has one) + prompt, then the target (a generation's target + eos, a
/// choice's correct answer) whose tokens carry the log-likelihood; a text is all target.
pub fn lm_examples(
    examples: &[crate::eval::tasks::Example],
    tokenizer: &dyn crate::tokenizer::TextTokenizer,
) -> Result<Vec<crate::model::train::TrainExample>> {
    use crate::eval::tasks::Example as Task;
    use crate::model::train::TrainExample;
    let bos: Vec<u32> = tokenizer.bos_id().into_iter().collect();
    examples
        .iter()
        .map(|e| {
            Ok(match e {
                Task::Generation { prompt, target } => {
                    let prompt: Vec<u32> = bos
                        .iter()
                        .copied()
                        .chain(tokenizer.encode(prompt)?)
                        .collect();
                    let mut target = tokenizer.encode(target)?;
                    target.extend(tokenizer.eos_id());
                    TrainExample::prompt_target(&prompt, &target)
                }
                Task::Choice {
                    prompt,
                    choices,
                    answer,
                } => {
                    let prompt: Vec<u32> = bos
                        .iter()
                        .copied()
                        .chain(tokenizer.encode(prompt)?)
                        .collect();
                    let choice = choices.get(*answer).ok_or_else(|| {
                        Error::msg(format!("answer {answer} of {} choices", choices.len()))
                    })?;
                    TrainExample::prompt_target(&prompt, &tokenizer.encode(choice)?)
                }
                Task::Text { text } => {
                    let ids: Vec<u32> =
                        bos.iter().copied().chain(tokenizer.encode(text)?).collect();
                    TrainExample::text(&ids)
                }
            })
        })
        .collect()
}

/// The diagonal empirical Fisher of a causal LM (our transformer forward) over `examples`: the
/// mean over examples of the squared gradient of the example's summed log-likelihood of its
/// target tokens. Returned under the model's tensor names (a tied head has no tensor of its own),
/// in `f32`. The forward and the gradients run on `device` in `f32`, whatever the model's
/// storage dtype (each tensor is cast on its way to the device).
pub fn lm_fisher(
    model: &crate::candidate::MemModel,
    examples: &[crate::model::train::TrainExample],
    device: &Device,
) -> Result<TensorMap> {
    use crate::model::train::{lm_loss, make_batch};
    let vars = model
        .tensors
        .iter()
        .map(|(name, t)| {
            let w = t.to_candle(device)?.to_dtype(candle_core::DType::F32)?;
            Ok((name.clone(), Var::from_tensor(&w)?))
        })
        .collect::<Result<Vec<(String, Var)>>>()?;
    let by_name: std::collections::HashMap<String, Tensor> = vars
        .iter()
        .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
        .collect();
    let net = crate::model::Transformer::from_tensors(&model.config, &by_name, device)?;
    fisher_diagonal(&vars, examples.len(), |k| {
        // one example per batch: nothing is padded, so no id may be mistaken for padding
        let (inputs, targets, mask) = make_batch(&[&examples[k]], u32::MAX, device)?;
        let tokens = f64::from(mask.sum_all()?.to_scalar::<f32>()?);
        let mean_nll = lm_loss(&net.logits(&inputs)?, &targets, &mask)
            .map_err(|e| Error::msg(format!("Fisher example {k}: {e}")))?;
        Ok((mean_nll * -tokens)?)
    })
}

/// Rescale a model's Fisher so that its mean entry (over every tensor) is 1. An all-zero Fisher
/// is left as it is.
pub fn normalize_fisher(fisher: &mut TensorMap) {
    let count: usize = fisher.values().map(|t| t.len()).sum();
    let total: f64 = fisher
        .values()
        .map(|t| t.values().iter().map(|v| f64::from(*v)).sum::<f64>())
        .sum();
    if count == 0 || total <= 0.0 {
        return;
    }
    let scale = count as f64 / total;
    for t in fisher.values_mut() {
        for v in t.f32_mut() {
            *v = (f64::from(*v) * scale) as f32;
        }
    }
}

/// Write `dir/fisher.safetensors`.
pub fn save_fisher(dir: &Path, fisher: &TensorMap) -> Result<()> {
    crate::model::mlp::save_tensors(&dir.join(FISHER_FILE), fisher)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::merge::Params;

    fn input<'a>(
        models: Vec<&'a [f32]>,
        aux: Vec<Option<&'a [f32]>>,
        weights: &[f64],
        eps: f64,
    ) -> MergeInput<'a> {
        let mut global = Params::default();
        global.set("epsilon", eps);
        MergeInput {
            tensor: "t",
            shape: &[2],
            base: None,
            model_params: weights
                .iter()
                .map(|w| {
                    let mut p = Params::default();
                    p.set("weight", *w);
                    p
                })
                .collect(),
            models,
            global,
            aux,
            seed: 0,
        }
    }

    #[test]
    fn fisher_weights_each_entry() {
        // Entry 0: F = (3, 1) → (3·1 + 1·5) / 4 = 2.  Entry 1: F = (0, 0) → plain mean 3 via ε.
        let (a, b) = ([1f32, 2.], [5f32, 4.]);
        let (fa, fb) = ([3f32, 0.], [1f32, 0.]);
        let out = Fisher
            .merge(&input(
                vec![&a, &b],
                vec![Some(&fa), Some(&fb)],
                &[1., 1.],
                1e-6,
            ))
            .unwrap();
        assert!((out[0] - 2.0).abs() < 1e-5, "{out:?}");
        assert!((out[1] - 3.0).abs() < 1e-5, "{out:?}");
        // λ = (1, 3) on entry 0: (3·1 + 3·1·5) / (3 + 3) = 3.
        let out = Fisher
            .merge(&input(
                vec![&a, &b],
                vec![Some(&fa), Some(&fb)],
                &[1., 3.],
                0.,
            ))
            .unwrap();
        assert!((out[0] - 3.0).abs() < 1e-6, "{out:?}");
    }

    #[test]
    fn normalized_fisher_has_mean_one() {
        let mut f = TensorMap::new();
        f.insert("a".into(), TensorBuf::new(vec![2], vec![1., 3.]));
        f.insert("b".into(), TensorBuf::new(vec![1], vec![2.]));
        normalize_fisher(&mut f);
        // Mean 2 → scale ½.
        assert_eq!(*f["a"].values(), [0.5, 1.5]);
        assert_eq!(*f["b"].values(), [1.0]);
    }

    #[test]
    fn missing_fisher_is_an_error_naming_the_file() {
        let (a, b) = ([1f32, 2.], [5f32, 4.]);
        let fa = [1f32, 1.];
        let err = Fisher
            .merge(&input(vec![&a, &b], vec![Some(&fa), None], &[1., 1.], 1e-6))
            .unwrap_err();
        assert!(err.to_string().contains(FISHER_FILE), "{err}");
    }

    #[test]
    fn fisher_of_a_linear_softmax_matches_hand_computation() {
        // Logits z = W x with W = 0 (2 classes, 1 input x = 2): p = (½, ½). With true label 0,
        // ∂ log p₀ / ∂W = (1 − p₀, −p₁)·x = (1, −1) → squared (1, 1); bias grads (½, −½)² = ¼.
        let mut t = TensorMap::new();
        t.insert(
            "layers.0.weight".into(),
            TensorBuf::new(vec![2, 1], vec![0., 0.]),
        );
        t.insert(
            "layers.0.bias".into(),
            TensorBuf::new(vec![2], vec![0., 0.]),
        );
        let cfg = crate::model::mlp::MlpConfig::relu(vec![1, 2]);
        let mlp = Mlp::from_tensors(&cfg, &t, Path::new("t"), &Device::Cpu).unwrap();
        let data = Dataset {
            x: vec![2.0],
            y: vec![0],
            dim: 1,
        };
        let f = mlp_fisher(&mlp, &data, FisherLabels::True, 10).unwrap();
        assert_eq!(*f["layers.0.weight"].values(), [1.0, 1.0]);
        assert_eq!(*f["layers.0.bias"].values(), [0.25, 0.25]);
    }
}
