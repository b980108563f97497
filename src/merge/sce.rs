//! `sce`: Select, Calculate, Erase — the task-vector fusion of FuseChat (Wan et al. 2024,
//! "FuseChat: Knowledge Fusion of Chat Models", arXiv:2408.07990; mergekit 0.1.5's `sce`).
//!
//! ```text
//! δ_j  = θ_j − θ_base                                          task vectors
//! Select:    σ²_i = Var_j(δ_j,i)  (population variance across the models, per entry)
//!            keep the k = ⌊nnz(σ²) · select_topk⌋ entries of largest σ²; δ_j,i = 0 elsewhere
//!            (select_topk ≥ 1: keep all; ≤ 0: keep none)
//! Calculate: w_j = mean_i(δ_j,i²) / Σ_k mean_i(δ_k,i²)      (1/K each when that sum < 1e-6)
//! Erase:     s_i = sign(Σ_j δ_j,i) (+ for 0);  e_j,i = w_j · [sign(δ_j,i) = s_i]
//! θ    = θ_base + Σ_j e_j δ_j / max(Σ_j e_j, 1e-6)
//! ```
//!
//! The selection counts only entries with non-zero variance, and ⌊·⌋ is taken of the product
//! in `f32`, as torch computes it. Equal variances at the cut are kept in index order (torch's
//! `topk` leaves that order unspecified). A zeroed entry never agrees with the elected sign, so
//! it adds neither value nor weight. `int8_mask` is accepted for recipe compatibility and
//! changes nothing (it only picks mergekit's mask dtype). There are no per-model weights: the
//! models are weighted by their task vectors' mean squares.
//!
//! **Streaming**: without selection (`select_topk ≥ 1` or `≤ 0`) one pass sums each task
//! vector's squares, then the erase-and-average is elementwise. With `0 < select_topk < 1` the
//! cut is on the variance across models, which the rank-window selector of
//! [`super::select`] (keyed on one task vector's magnitudes) does not cover, so those merges
//! take whole tensors: the variances are ranked in memory and the resulting mask is handed to
//! the same stream.

use crate::simd::avx2_fn;
use std::sync::Arc;

use super::stream::{Chunk, Partial, Pass, Stream, StreamSpec, downcast, run_in_memory};
use super::util::{base, check, check_spec, global};
use super::{BaseUse, MergeInput, MergeMethod, ParamDecl, ParamKind, Scope};
use crate::error::Result;

/// SCE (see the module docs).
#[derive(Clone, Copy, Debug, Default)]
pub struct Sce;

static PARAMS: &[ParamDecl] = &[
    ParamDecl {
        name: "select_topk",
        scope: Scope::Global,
        kind: ParamKind::Float { min: 0.0, max: 1.0 },
        default: Some(1.0),
        searched: true,
        doc: "share of the entries (by variance across models) to keep",
    },
    ParamDecl {
        name: "int8_mask",
        scope: Scope::Global,
        kind: ParamKind::Bool,
        default: Some(0.0),
        searched: true,
        doc: "mergekit's int8 mask dtype (no effect on the result)",
    },
];

/// Weight sums below this fall back to equal weights (mergekit).
const WEIGHT_SUM_EPS: f64 = 1e-6;
/// The divisor's floor (mergekit).
const DIVISOR_EPS: f32 = 1e-6;

/// Which entries the selection keeps.
#[derive(Clone, Debug)]
enum Mask {
    All,
    Nothing,
    /// Bit `i % 64` of word `i / 64`.
    Bits(Arc<Vec<u64>>),
}

impl Mask {
    #[inline(always)]
    fn keeps(&self, i: usize) -> bool {
        match self {
            Mask::All => true,
            Mask::Nothing => false,
            Mask::Bits(w) => (w[i / 64] >> (i % 64)) & 1 == 1,
        }
    }
}

impl MergeMethod for Sce {
    fn name(&self) -> &'static str {
        "sce"
    }

    fn params(&self) -> &'static [ParamDecl] {
        PARAMS
    }

    fn base(&self) -> BaseUse {
        BaseUse::Required
    }

    fn model_count(&self) -> (usize, Option<usize>) {
        (1, None)
    }

    fn merge(&self, input: &MergeInput<'_>) -> Result<Vec<f32>> {
        let n = check(self, input)?;
        let b = base(self, input)?;
        let spec = input.spec();
        let stream: Box<dyn Stream> = match self.stream(&spec)? {
            Some(s) => s,
            None => {
                let topk = global(self.name(), &spec, "select_topk")?;
                let mask = variance_mask(b, &input.models, topk);
                Box::new(SceStream::new(spec.models, mask))
            }
        };
        run_in_memory(stream, n, Some(b), &input.models)
    }

    fn stream(&self, spec: &StreamSpec<'_>) -> Result<Option<Box<dyn Stream>>> {
        check_spec(self, spec)?;
        let topk = global(self.name(), spec, "select_topk")?;
        let mask = if topk >= 1.0 {
            Mask::All
        } else if topk <= 0.0 {
            Mask::Nothing
        } else {
            return Ok(None);
        };
        Ok(Some(Box::new(SceStream::new(spec.models, mask))))
    }
}

/// The top-`⌊nnz · density⌋` entries by variance of the task vectors across models.
fn variance_mask(b: &[f32], models: &[&[f32]], density: f64) -> Mask {
    let n = b.len();
    let k = models.len() as f64;
    let var: Vec<f64> = (0..n)
        .map(|i| {
            let d = models.iter().map(|m| f64::from(m[i] - b[i]));
            let mean = d.clone().sum::<f64>() / k;
            d.map(|x| (x - mean) * (x - mean)).sum::<f64>() / k
        })
        .collect();
    let nonzero = var.iter().filter(|v| **v != 0.0).count();
    // torch: int(count_nonzero(var) * density), the product in f32
    let keep = ((nonzero as f32) * (density as f32)) as usize;
    if keep == 0 {
        return Mask::Nothing;
    }
    let mut order: Vec<usize> = (0..n).collect();
    // largest variance first, equal ones by index
    let by = |&x: &usize, &y: &usize| var[y].total_cmp(&var[x]).then(x.cmp(&y));
    if keep < n {
        order.select_nth_unstable_by(keep - 1, by);
    }
    let mut words = vec![0u64; n.div_ceil(64)];
    for &i in &order[..keep.min(n)] {
        words[i / 64] |= 1 << (i % 64);
    }
    Mask::Bits(Arc::new(words))
}

/// One pass for the (selected) task vectors' sums of squares, then the erase-and-average
/// chunk by chunk.
struct SceStream {
    k: usize,
    mask: Mask,
    asked: bool,
    /// `w_j`, once the pass ran.
    weights: Vec<f32>,
    /// Element count, summed from the pass (for the means).
    n: usize,
}

impl SceStream {
    fn new(k: usize, mask: Mask) -> SceStream {
        SceStream {
            k,
            mask,
            asked: false,
            weights: Vec::new(),
            n: 0,
        }
    }
}

impl Stream for SceStream {
    fn next_pass(&mut self, partials: Vec<Partial>) -> Result<Option<Pass>> {
        if !self.asked {
            self.asked = true;
            return Ok(Some(Pass::All));
        }
        let mut sums = vec![0.0f64; self.k];
        for (len, part) in downcast::<(usize, Vec<f64>)>(partials) {
            self.n += len;
            for (s, v) in sums.iter_mut().zip(part) {
                *s += v;
            }
        }
        let means: Vec<f64> = sums.iter().map(|s| s / self.n.max(1) as f64).collect();
        let total: f64 = means.iter().sum();
        self.weights = if total.abs() < WEIGHT_SUM_EPS {
            vec![1.0 / self.k as f32; self.k]
        } else {
            means.iter().map(|m| (m / total) as f32).collect()
        };
        Ok(None)
    }

    fn observe(&self, chunk: &Chunk<'_>) -> Result<Partial> {
        let b = chunk.base.expect("sce has a base");
        let sums: Vec<f64> = chunk
            .models
            .iter()
            .map(|m| {
                if let Mask::All = self.mask {
                    // Every entry: a vectorised `Σ (x − b)²`.
                    return super::model_stock::dot_deltas(m, m, b);
                }
                m.iter()
                    .zip(b)
                    .enumerate()
                    .filter(|(i, _)| self.mask.keeps(chunk.start + i))
                    .map(|(_, (&x, &b))| {
                        let d = f64::from(x - b);
                        d * d
                    })
                    .sum()
            })
            .collect();
        Ok(Box::new((chunk.len(), sums)))
    }

    fn apply(&self, chunk: &Chunk<'_>, out: &mut [f32]) -> Result<()> {
        let b = chunk.base.expect("sce has a base");
        if let Mask::Nothing = self.mask {
            out.copy_from_slice(b);
            return Ok(());
        }
        // Model by model over the whole chunk (the loops vectorise); the same operations in the
        // same order per entry as a loop over entries.
        let n = out.len();
        let mut sum = vec![0.0f32; n];
        for m in chunk.models {
            add_delta(&mut sum, &m[..n], &b[..n]);
        }
        let (mut acc, mut div) = (vec![0.0f32; n], vec![0.0f32; n]);
        for (m, &w) in chunk.models.iter().zip(&self.weights) {
            add_agreeing(&mut acc, &mut div, &sum, &m[..n], &b[..n], w);
        }
        finish(out, &b[..n], &acc, &div);
        if let Mask::Bits(_) = self.mask {
            for (i, (o, &bv)) in out.iter_mut().zip(b).enumerate() {
                if !self.mask.keeps(chunk.start + i) {
                    *o = bv;
                }
            }
        }
        Ok(())
    }
}

avx2_fn!(fn add_delta(sum: &mut [f32], m: &[f32], b: &[f32]) => add_delta_body);
avx2_fn!(fn add_agreeing(acc: &mut [f32], div: &mut [f32], sum: &[f32], m: &[f32], b: &[f32], w: f32) => add_agreeing_body);
avx2_fn!(fn finish(out: &mut [f32], b: &[f32], acc: &[f32], div: &[f32]) => finish_body);

/// `sum += m − b`.
#[inline(always)]
fn add_delta_body(sum: &mut [f32], m: &[f32], b: &[f32]) {
    let n = sum.len();
    let (m, b) = (&m[..n], &b[..n]);
    for i in 0..n {
        sum[i] += m[i] - b[i];
    }
}

/// Where `d = m − b` agrees in sign with the elected `sum`: `acc += d·w`, `div += w`.
#[inline(always)]
fn add_agreeing_body(acc: &mut [f32], div: &mut [f32], sum: &[f32], m: &[f32], b: &[f32], w: f32) {
    let n = acc.len();
    let (div, sum, m, b) = (&mut div[..n], &sum[..n], &m[..n], &b[..n]);
    for i in 0..n {
        let d = m[i] - b[i];
        let agree = (sum[i] >= 0.0) & (d > 0.0) | (sum[i] < 0.0) & (d < 0.0);
        acc[i] += if agree { d * w } else { 0.0 };
        div[i] += if agree { w } else { 0.0 };
    }
}

/// `out = b + acc / max(div, ε)`.
#[inline(always)]
fn finish_body(out: &mut [f32], b: &[f32], acc: &[f32], div: &[f32]) {
    let n = out.len();
    let (b, acc, div) = (&b[..n], &acc[..n], &div[..n]);
    for i in 0..n {
        let dv = if div[i] > DIVISOR_EPS {
            div[i]
        } else {
            DIVISOR_EPS
        };
        out[i] = b[i] + acc[i] / dv;
    }
}

#[cfg(test)]
mod tests {
    use super::super::util::testing::{assert_close, input, params};
    use super::*;

    fn run(base: &[f32], models: &[&[f32]], topk: f64) -> Result<Vec<f32>> {
        let shape = [base.len()];
        let inp = input(
            &Sce,
            &shape,
            Some(base),
            models.to_vec(),
            models.iter().map(|_| params(&[])).collect(),
            params(&[("select_topk", topk)]),
            0,
        );
        Sce.merge(&inp)
    }

    #[test]
    fn weights_by_mean_square_and_sign_erase() {
        let base = [0.0f32; 4];
        let a = [2.0f32, -2.0, 2.0, 2.0]; // mean square 4
        let b = [-1.0f32, -1.0, 1.0, -1.0]; // mean square 1
        // w = (0.8, 0.2); sums (1, −3, 3, 1) elect (+, −, +, +)
        let got = run(&base, &[&a, &b], 1.0).unwrap();
        // entries 1 and 2: both agree, Σ w = 1, so the weighted sums
        let both = 0.8 * 2.0 + 0.2 * 1.0;
        let neg = -(0.8 * 2.0 + 0.2 * 1.0);
        assert_close(&got, &[2.0, neg, both, 2.0], 1e-6);
        // nothing selected: the base
        assert_eq!(run(&base, &[&a, &b], 0.0).unwrap(), base.to_vec());
    }

    #[test]
    fn select_keeps_the_entries_of_largest_variance() {
        let base = [1.0f32; 5];
        // task vectors a: (1, 0, 2, 0, 0), b: (−1, 0, 2, 3, 0.5)
        // variances: 1, 0, 0, 2.25, 0.0625 → 3 non-zero; topk 0.7 → ⌊2.1⌋ = 2: entries 0 and 3
        let a = [2.0f32, 1.0, 3.0, 1.0, 1.0];
        let b = [0.0f32, 1.0, 3.0, 4.0, 1.5];
        let got = run(&base, &[&a, &b], 0.7).unwrap();
        // selected a: (1, 0, 0, 0, 0) ms 0.2; b: (−1, 0, 0, 3, 0) ms 2 → w = (1/11, 10/11)
        // entry 0: sum 0 → +: only a agrees → 1; entry 3: only b → 3
        assert_close(&got, &[2.0, 1.0, 1.0, 4.0, 1.0], 1e-6);
    }

    #[test]
    fn tiny_task_vectors_get_equal_weights() {
        let base = [0.0f32; 2];
        let a = [1e-4f32, 1e-4];
        let b = [3e-4f32, 3e-4];
        // mean squares 1e-8 and 9e-8 sum below 1e-6 → w = ½ each: plain mean of agreeing
        let got = run(&base, &[&a, &b], 1.0).unwrap();
        assert_close(&got, &[2e-4, 2e-4], 1e-10);
    }

    #[test]
    fn streams_without_selection_only() {
        let p = params(&[("select_topk", 0.5), ("int8_mask", 0.0)]);
        let mp = vec![params(&[]), params(&[])];
        let spec = StreamSpec {
            tensor: "t",
            shape: &[4],
            has_base: true,
            models: 2,
            model_params: &mp,
            global: &p,
            seed: 0,
        };
        assert!(Sce.stream(&spec).unwrap().is_none());
        let p = params(&[("select_topk", 1.0), ("int8_mask", 0.0)]);
        assert!(
            Sce.stream(&StreamSpec { global: &p, ..spec })
                .unwrap()
                .is_some()
        );
    }

    #[test]
    fn error_cases() {
        let a = [1.0f32];
        let shape = [1];
        let inp = input(
            &Sce,
            &shape,
            None,
            vec![&a, &a],
            vec![params(&[]), params(&[])],
            params(&[]),
            0,
        );
        let err = Sce.merge(&inp).unwrap_err().to_string();
        assert!(
            err.contains("base_model") && err.contains("test.weight"),
            "{err}"
        );
        let inp = input(&Sce, &shape, Some(&a), vec![], vec![], params(&[]), 0);
        let err = Sce.merge(&inp).unwrap_err().to_string();
        assert!(err.contains("at least 1 model"), "{err}");
    }
}
