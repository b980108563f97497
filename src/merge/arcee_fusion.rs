//! `arcee_fusion`: keep only the fine-tune's most important changes to the base model (Arcee
//! AI's "Arcee Fusion", <https://arcee.ai>; mergekit 0.1.5's `arcee_fusion.py`). One model
//! besides the base.
//!
//! ```text
//! δ      = θ − θ_base
//! p, q   = softmax(θ) + 1e-8,  softmax(θ_base) + 1e-8      along the last axis (per row)
//! KL     = Σ p · ln(p / q)                                  per row
//! I      = |δ| · KL                                         importance of each entry
//! Q1, Q2, Q3 = I sorted ascending at ⌊0.25·(n−1)⌋, ⌊0.5·(n−1)⌋, ⌊0.75·(n−1)⌋
//! t      = Q2 + 1.5 · (Q3 − Q1)                            an outlier fence over the tensor
//! θ      = θ_base + δ · [I ≥ t]
//! ```
//!
//! A 1-D tensor is one row. The divergence is computed with the softmax in `f64`, the rest in
//! `f32` as mergekit does on `f32` inputs; the golden case (`tests/golden/arcee_fusion`) agrees
//! to the last bit, but an importance within float rounding of the fence could be decided the
//! other way than torch decides it. On bf16 inputs mergekit computes the divergence in bf16,
//! where `p/q ≈ 1` rounds to a multiple of 2⁻⁸ and the KL is mostly rounding; its fence decisions
//! then differ from evomerge's `f32` ones on about 5 % of the entries (111 of 2232 on
//! `tests/golden/arcee_fusion_bf16`; mergekit's own formula run in `f64` differs from its bf16
//! run on 113).
//!
//! Deviation: for tensors of more than 1,000,000 entries mergekit estimates the quartiles from
//! 1,000,000 entries drawn with replacement (torch's RNG); evomerge takes the exact quartiles of
//! the whole tensor (linear-time selection), so on such tensors the fence differs from
//! mergekit's by that sampling noise.
//!
//! Not streamed: the fence needs three exact order statistics of the importance over the whole
//! tensor, and the importance needs each row's softmax normalisers first — so the executor
//! hands it whole tensors.

use rayon::prelude::*;

use super::util::{base, check};
use super::{BaseUse, MergeInput, MergeMethod, ParamDecl};
use crate::error::Result;

/// Arcee Fusion (see the module docs).
#[derive(Clone, Copy, Debug, Default)]
pub struct ArceeFusion;

/// Added to both softmaxes, as in mergekit.
const EPS: f32 = 1e-8;

impl MergeMethod for ArceeFusion {
    fn name(&self) -> &'static str {
        "arcee_fusion"
    }

    fn params(&self) -> &'static [ParamDecl] {
        &[]
    }

    fn base(&self) -> BaseUse {
        BaseUse::Required
    }

    fn model_count(&self) -> (usize, Option<usize>) {
        (1, Some(1))
    }

    fn merge(&self, input: &MergeInput<'_>) -> Result<Vec<f32>> {
        let n = check(self, input)?;
        let b = base(self, input)?;
        let m = input.models[0];
        if n == 0 {
            return Ok(Vec::new());
        }
        let row = input.shape.last().copied().filter(|&r| r > 0).unwrap_or(n);
        let importance = importance(m, b, row);
        let fence = fence(&importance);
        Ok(m.par_iter()
            .zip(b)
            .zip(&importance)
            .map(|((&x, &y), &i)| {
                let keep = u32::from(i >= fence) as f32;
                y + (x - y) * keep
            })
            .collect())
    }
}

/// `|θ − θ_base| · KL(row)` for every entry, rows of `row` entries.
fn importance(m: &[f32], b: &[f32], row: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; m.len()];
    out.par_chunks_mut(row)
        .zip(m.par_chunks(row))
        .zip(b.par_chunks(row))
        .for_each(|((o, m), b)| {
            let kl = row_kl(m, b);
            for ((o, &x), &y) in o.iter_mut().zip(m).zip(b) {
                *o = (x - y).abs() * kl;
            }
        });
    out
}

/// `Σ p·ln(p/q)` with `p = softmax(m) + ε`, `q = softmax(b) + ε` (each softmax in `f64`,
/// rounded to `f32`; the terms in `f32`, summed in `f64`).
fn row_kl(m: &[f32], b: &[f32]) -> f32 {
    let softmax = |x: &[f32]| -> Vec<f32> {
        let max = x.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v));
        let exps: Vec<f64> = x.iter().map(|&v| f64::from(v - max).exp()).collect();
        let sum: f64 = exps.iter().sum();
        exps.iter().map(|e| (e / sum) as f32 + EPS).collect()
    };
    let (p, q) = (softmax(m), softmax(b));
    let kl: f64 = p
        .iter()
        .zip(&q)
        .map(|(&p, &q)| f64::from(p * ((p / q).ln())))
        .sum();
    kl as f32
}

/// `Q2 + 1.5·(Q3 − Q1)` of the importances (in `f32`, as mergekit); quartile `q` is entry
/// `⌊q·(n−1)⌋` of the ascending order.
fn fence(importance: &[f32]) -> f32 {
    let n = importance.len();
    let mut work = importance.to_vec();
    let mut at = |q: f32| -> f32 {
        // mergekit: (q * (n − 1)).long() with q a f32 tensor
        let k = ((q * (n - 1) as f32) as usize).min(n - 1);
        *work.select_nth_unstable_by(k, f32::total_cmp).1
    };
    let (q1, q2, q3) = (at(0.25), at(0.5), at(0.75));
    q2 + 1.5 * (q3 - q1)
}

#[cfg(test)]
mod tests {
    use super::super::util::testing::{input, params};
    use super::*;

    #[test]
    fn keeps_only_entries_above_the_fence() {
        // one row of 8; δ = (0, 0, 0, 0, 0, 0, 0.01, 2): the quartiles are 0, 0, 0 scaled by
        // KL, so the fence is 0 and every entry is "kept" (δ = 0 changes nothing) …
        let base = [0.0f32; 8];
        let m = [0.0f32, 0.0, 0.0, 0.0, 0.0, 0.0, 0.01, 2.0];
        let shape = [8];
        let inp = input(
            &ArceeFusion,
            &shape,
            Some(&base),
            vec![&m],
            vec![params(&[])],
            params(&[]),
            0,
        );
        assert_eq!(ArceeFusion.merge(&inp).unwrap(), m.to_vec());
        // … while a spread of changes keeps only the outliers above Q2 + 1.5·IQR
        let m: Vec<f32> = (0..16)
            .map(|i| if i == 15 { 5.0 } else { 0.1 * i as f32 })
            .collect();
        let base = vec![0.0f32; 16];
        let shape = [16];
        let inp = input(
            &ArceeFusion,
            &shape,
            Some(&base),
            vec![&m],
            vec![params(&[])],
            params(&[]),
            0,
        );
        let got = ArceeFusion.merge(&inp).unwrap();
        // |δ| ranks: Q1 = δ[3] = 0.3, Q2 = δ[7] = 0.7, Q3 = δ[11] = 1.1 (all × KL):
        // fence = 0.7 + 1.5·0.8 = 1.9 → only 5.0 survives
        let mut want = vec![0.0f32; 16];
        want[15] = 5.0;
        assert_eq!(got, want);
    }

    /// Against a plain reference (everything in `f64`, a full sort) on rows of different
    /// scales: the same entries survive.
    #[test]
    fn matches_a_sorting_reference_per_row() {
        use rand::rngs::StdRng;
        use rand::{Rng, SeedableRng};
        let (rows, cols) = (37, 64);
        let mut rng = StdRng::seed_from_u64(9);
        let base: Vec<f32> = (0..rows * cols)
            .map(|_| rng.random::<f32>() - 0.5)
            .collect();
        let m: Vec<f32> = base
            .iter()
            .enumerate()
            .map(|(i, &b)| b + (rng.random::<f32>() - 0.5) * (1 + i / cols) as f32 * 0.05)
            .collect();
        let kl = |r: usize| -> f64 {
            let sm = |x: &[f32]| -> Vec<f64> {
                let e: Vec<f64> = x.iter().map(|&v| f64::from(v).exp()).collect();
                let s: f64 = e.iter().sum();
                e.iter().map(|v| v / s + 1e-8).collect()
            };
            let (p, q) = (sm(&m[r * cols..][..cols]), sm(&base[r * cols..][..cols]));
            p.iter().zip(&q).map(|(p, q)| p * (p / q).ln()).sum()
        };
        let imp: Vec<f64> = (0..rows * cols)
            .map(|i| f64::from((m[i] - base[i]).abs()) * kl(i / cols))
            .collect();
        let mut sorted = imp.clone();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len() - 1;
        let q = |f: f64| sorted[(f * n as f64) as usize];
        let fence = q(0.5) + 1.5 * (q(0.75) - q(0.25));
        let shape = [rows, cols];
        let inp = input(
            &ArceeFusion,
            &shape,
            Some(&base),
            vec![&m],
            vec![params(&[])],
            params(&[]),
            0,
        );
        let got = ArceeFusion.merge(&inp).unwrap();
        let mut kept = 0;
        for i in 0..rows * cols {
            let want = if imp[i] >= fence { m[i] } else { base[i] };
            assert_eq!(got[i], want, "entry {i}");
            kept += usize::from(imp[i] >= fence);
        }
        // an outlier fence: a few per cent survive, mostly from the large-δ rows
        assert!(kept > 0 && kept < rows * cols / 5, "{kept}");
        // identical rows have no divergence
        assert_eq!(row_kl(&[1.0, 2.0], &[1.0, 2.0]), 0.0);
    }

    #[test]
    fn needs_a_base_and_exactly_one_model() {
        let shape = [2];
        let x = [1.0f32, 2.0];
        let inp = input(
            &ArceeFusion,
            &shape,
            None,
            vec![&x],
            vec![params(&[])],
            params(&[]),
            0,
        );
        let err = ArceeFusion.merge(&inp).unwrap_err().to_string();
        assert!(
            err.contains("arcee_fusion")
                && err.contains("base_model")
                && err.contains("test.weight"),
            "{err}"
        );
        let inp = input(
            &ArceeFusion,
            &shape,
            Some(&x),
            vec![&x, &x],
            vec![params(&[]), params(&[])],
            params(&[]),
            0,
        );
        let err = ArceeFusion.merge(&inp).unwrap_err().to_string();
        assert!(err.contains("exactly 1") && err.contains("got 2"), "{err}");
    }
}
