//! RegMean (Jin, Ren, Preotiuc-Pietro & Cheng 2023, "Dataless Knowledge Fusion by Merging
//! Weights of Language Models", ICLR).
//!
//! A linear layer `y = W x` (`W`: `[out, in]`) of model `i` saw inputs `Xᵢ` (`[nᵢ, in]`). The
//! merged `W` that best reproduces every model's outputs on its own inputs,
//! `min_W Σᵢ ‖Xᵢ Wᵀ − Xᵢ Wᵢᵀ‖²`, is
//!
//! ```text
//! Wᵀ = (Σᵢ G̃ᵢ)⁻¹ Σᵢ G̃ᵢ Wᵢᵀ,     Gᵢ = XᵢᵀXᵢ,   G̃ᵢ = α Gᵢ + (1 − α) diag(Gᵢ)
//! ```
//!
//! with the off-diagonals shrunk by `alpha` (default 0.95, as in FusionBench). The system is solved
//! in `f64` by Cholesky with a small ridge `ρ = ridge · mean(diag Σ G̃ᵢ)` that pulls the directions
//! no input spans towards the plain average `W̄`: `(Σ G̃ᵢ + ρI) Wᵀ = Σ G̃ᵢ Wᵢᵀ + ρ W̄ᵀ`.
//! Tensors without a Gram matrix (biases, norms, embeddings) are averaged.
//!
//! `Gᵢ` is read from `regmean.safetensors` beside each model, keyed by the weight's name, shape
//! `[in, in]`; [`mlp_grams`] makes it for an MLP (stored as the mean `XᵀX / n`, so models trained
//! on data sets of different sizes count alike).

use std::path::Path;

use candle_core::Device;

use crate::candidate::TensorMap;
use crate::error::{Error, Result};
use crate::eval::classify::Dataset;
use crate::merge::{BaseUse, MergeInput, MergeMethod, ParamDecl, ParamKind, Scope};
use crate::model::mlp::{Mlp, weight_name};
use crate::tensor::TensorBuf;

/// The file beside each model that holds its Gram matrices.
pub const REGMEAN_FILE: &str = "regmean.safetensors";

/// Registry key `regmean`.
pub struct RegMean;

const PARAMS: &[ParamDecl] = &[
    ParamDecl {
        name: "alpha",
        scope: Scope::Global,
        kind: ParamKind::Float { min: 0.0, max: 1.0 },
        default: Some(0.95),
        searched: true,
        doc: "scale of the Gram matrices' off-diagonal entries",
    },
    ParamDecl {
        name: "ridge",
        scope: Scope::Global,
        kind: ParamKind::Float { min: 0.0, max: 1.0 },
        default: Some(1e-4),
        searched: true,
        doc: "ridge towards the plain average, relative to the mean diagonal of Σ G̃ᵢ",
    },
];

impl MergeMethod for RegMean {
    fn name(&self) -> &'static str {
        "regmean"
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
        Some(REGMEAN_FILE)
    }

    fn merge(&self, input: &MergeInput<'_>) -> Result<Vec<f32>> {
        let err = |msg: String| Error::Method {
            method: "regmean".into(),
            msg: format!("tensor `{}`: {msg}", input.tensor),
        };
        let m = input.models.len();
        let n: usize = input.shape.iter().product();
        if m == 0 {
            return Err(err("no models".into()));
        }
        let mean: Vec<f64> = (0..n)
            .map(|k| input.models.iter().map(|t| f64::from(t[k])).sum::<f64>() / m as f64)
            .collect();
        let present = input.aux.iter().filter(|a| a.is_some()).count();
        if present == 0 {
            return Ok(mean.into_iter().map(|v| v as f32).collect());
        }
        if present != m || input.aux.len() != m {
            return Err(err(format!(
                "{present} of {m} models have a Gram matrix in {REGMEAN_FILE}; all or none must"
            )));
        }
        let [out_dim, in_dim] = input.shape else {
            return Err(err(format!(
                "has a Gram matrix but shape {:?} is not [out, in]",
                input.shape
            )));
        };
        let (out_dim, d) = (*out_dim, *in_dim);
        let alpha = input.global.get("alpha")?;
        let ridge = input.global.get("ridge")?;
        // A = Σ G̃ᵢ (d × d), B = Σ G̃ᵢ Wᵢᵀ (d × out).
        let mut a = vec![0f64; d * d];
        let mut b = vec![0f64; d * out_dim];
        for (i, (w, g)) in input.models.iter().zip(&input.aux).enumerate() {
            let g = g.unwrap_or_default();
            if g.len() != d * d {
                return Err(err(format!(
                    "model {i}: Gram matrix has {} entries, expected {d}×{d}",
                    g.len()
                )));
            }
            let mut gt = vec![0f64; d * d];
            for r in 0..d {
                for c in 0..d {
                    let v = f64::from(g[r * d + c]);
                    gt[r * d + c] = if r == c { v } else { alpha * v };
                }
            }
            for r in 0..d {
                for c in 0..d {
                    a[r * d + c] += gt[r * d + c];
                }
                for o in 0..out_dim {
                    let row = &w[o * d..(o + 1) * d];
                    let dot: f64 = (0..d).map(|c| gt[r * d + c] * f64::from(row[c])).sum();
                    b[r * out_dim + o] += dot;
                }
            }
        }
        let diag_mean = (0..d).map(|r| a[r * d + r]).sum::<f64>() / d as f64;
        let mut rho = ridge * diag_mean.max(1e-12);
        if rho <= 0.0 {
            rho = 1e-12;
        }
        for attempt in 0..8 {
            let mut a_r = a.clone();
            let mut b_r = b.clone();
            for r in 0..d {
                a_r[r * d + r] += rho;
                for o in 0..out_dim {
                    b_r[r * out_dim + o] += rho * mean[o * d + r];
                }
            }
            if let Some(x) = cholesky_solve(&a_r, d, &b_r, out_dim) {
                // x is Wᵀ (d × out); the output is W (out × d).
                let mut w = vec![0f32; n];
                for r in 0..d {
                    for o in 0..out_dim {
                        w[o * d + r] = x[r * out_dim + o] as f32;
                    }
                }
                return Ok(w);
            }
            rho *= 10.0;
            let _ = attempt;
        }
        Err(err(
            "Σ G̃ᵢ is not positive definite even with a large ridge".into()
        ))
    }
}

/// Solve `A X = B` for symmetric positive definite `A` (`d × d`) and `B` (`d × k`) by Cholesky;
/// `None` when `A` is not positive definite.
fn cholesky_solve(a: &[f64], d: usize, b: &[f64], k: usize) -> Option<Vec<f64>> {
    let mut l = vec![0f64; d * d];
    for i in 0..d {
        for j in 0..=i {
            let s: f64 = (0..j).map(|p| l[i * d + p] * l[j * d + p]).sum();
            if i == j {
                let v = a[i * d + i] - s;
                if v <= 0.0 || !v.is_finite() {
                    return None;
                }
                l[i * d + i] = v.sqrt();
            } else {
                l[i * d + j] = (a[i * d + j] - s) / l[j * d + j];
            }
        }
    }
    let mut x = b.to_vec();
    for c in 0..k {
        // Forward: L y = b.
        for i in 0..d {
            let s: f64 = (0..i).map(|p| l[i * d + p] * x[p * k + c]).sum();
            x[i * k + c] = (x[i * k + c] - s) / l[i * d + i];
        }
        // Backward: Lᵀ x = y.
        for i in (0..d).rev() {
            let s: f64 = (i + 1..d).map(|p| l[p * d + i] * x[p * k + c]).sum();
            x[i * k + c] = (x[i * k + c] - s) / l[i * d + i];
        }
    }
    Some(x)
}

/// The mean input Gram matrix `XᵀX / n` of every linear layer of `mlp` on `data`, keyed by the
/// layer's weight name (`layers.{i}.weight`), shape `[in, in]`.
pub fn mlp_grams(mlp: &Mlp, data: &Dataset) -> Result<TensorMap> {
    if data.is_empty() {
        return Err(Error::msg(
            "RegMean's Gram matrices need at least one example",
        ));
    }
    let x = data.x_tensor(&Device::Cpu)?;
    let (_, inputs) = mlp.forward_with_inputs(&x)?;
    let mut out = TensorMap::new();
    for (i, h) in inputs.iter().enumerate() {
        let d = h.dim(1)?;
        let g = (h.t()?.matmul(h)? / data.len() as f64)?;
        let values = g.flatten_all()?.to_vec1::<f32>()?;
        out.insert(weight_name(i), TensorBuf::new(vec![d, d], values));
    }
    Ok(out)
}

/// Write `dir/regmean.safetensors`.
pub fn save_grams(dir: &Path, grams: &TensorMap) -> Result<()> {
    crate::model::mlp::save_tensors(&dir.join(REGMEAN_FILE), grams)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::merge::Params;

    fn input<'a>(
        shape: &'a [usize],
        models: Vec<&'a [f32]>,
        aux: Vec<Option<&'a [f32]>>,
        alpha: f64,
        ridge: f64,
    ) -> MergeInput<'a> {
        let mut global = Params::default();
        global.set("alpha", alpha);
        global.set("ridge", ridge);
        MergeInput {
            tensor: "layers.0.weight",
            shape,
            base: None,
            model_params: vec![Params::default(); models.len()],
            models,
            global,
            aux,
            seed: 0,
        }
    }

    #[test]
    fn diagonal_grams_weight_each_input_column() {
        // W is 1 × 2. Model a saw only input 0 (G = diag(3, 0)), model b only input 1
        // (G = diag(0, 1)): each column comes from the model that saw that input.
        let (wa, wb) = ([1f32, 10.], [20f32, 2.]);
        let (ga, gb) = ([3f32, 0., 0., 0.], [0f32, 0., 0., 1.]);
        let out = RegMean
            .merge(&input(
                &[1, 2],
                vec![&wa, &wb],
                vec![Some(&ga), Some(&gb)],
                1.0,
                1e-9,
            ))
            .unwrap();
        assert!(
            (out[0] - 1.0).abs() < 1e-5 && (out[1] - 2.0).abs() < 1e-5,
            "{out:?}"
        );
    }

    #[test]
    fn full_grams_solve_the_least_squares_problem() {
        // d = 2, out = 1. Ga = [[2, 1], [1, 1]], Gb = I, wa = (1, 0), wb = (0, 1), α = 1:
        // A = [[3, 1], [1, 2]], B = Ga·waᵀ + Gb·wbᵀ = (2, 1) + (0, 1) = (2, 2) → w = A⁻¹B = (0.4, 0.8).
        let (wa, wb) = ([1f32, 0.], [0f32, 1.]);
        let (ga, gb) = ([2f32, 1., 1., 1.], [1f32, 0., 0., 1.]);
        let out = RegMean
            .merge(&input(
                &[1, 2],
                vec![&wa, &wb],
                vec![Some(&ga), Some(&gb)],
                1.0,
                0.0,
            ))
            .unwrap();
        assert!(
            (out[0] - 0.4).abs() < 1e-5 && (out[1] - 0.8).abs() < 1e-5,
            "{out:?}"
        );
        // α = 0 drops the off-diagonals: A = diag(3, 2), B = (2, 1) → (2/3, 1/2).
        let out = RegMean
            .merge(&input(
                &[1, 2],
                vec![&wa, &wb],
                vec![Some(&ga), Some(&gb)],
                0.0,
                0.0,
            ))
            .unwrap();
        assert!(
            (out[0] - 2. / 3.).abs() < 1e-5 && (out[1] - 0.5).abs() < 1e-5,
            "{out:?}"
        );
    }

    #[test]
    fn no_gram_means_average_and_unspanned_inputs_fall_back_to_average() {
        let (ba, bb) = ([1f32, 3.], [3f32, 5.]);
        let out = RegMean
            .merge(&input(&[2], vec![&ba, &bb], vec![None, None], 0.95, 1e-4))
            .unwrap();
        assert_eq!(out, vec![2.0, 4.0]);
        // Input 1 is never seen by either model: its column is the average (10 + 20) / 2.
        let (wa, wb) = ([1f32, 10.], [3f32, 20.]);
        let g = [1f32, 0., 0., 0.];
        let out = RegMean
            .merge(&input(
                &[1, 2],
                vec![&wa, &wb],
                vec![Some(&g), Some(&g)],
                0.95,
                1e-4,
            ))
            .unwrap();
        assert!(
            (out[0] - 2.0).abs() < 1e-3 && (out[1] - 15.0).abs() < 1e-3,
            "{out:?}"
        );
    }

    #[test]
    fn partial_grams_are_an_error() {
        let (wa, wb) = ([1f32, 0.], [0f32, 1.]);
        let g = [1f32, 0., 0., 1.];
        let err = RegMean
            .merge(&input(
                &[1, 2],
                vec![&wa, &wb],
                vec![Some(&g), None],
                0.95,
                1e-4,
            ))
            .unwrap_err();
        assert!(err.to_string().contains(REGMEAN_FILE), "{err}");
    }
}
