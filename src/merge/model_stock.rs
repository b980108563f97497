//! `model_stock`: interpolate between the base model and the average of N ≥ 2 fine-tunes with a
//! ratio set by the angle between their task vectors (Jang, Yun & Han 2024, "Model Stock: All
//! we need is just a few fine-tuned models", ECCV 2024).
//!
//! ```text
//! δ_j = θ_j − θ_base
//! cos θ = mean over pairs i<j of <δ_i, δ_j> / max(|δ_i|·|δ_j|, 1e-6)     (clamped to [−1, 1])
//! t = N·cos θ / (1 + (N−1)·cos θ)            (t = 0 when |1 + (N−1)·cos θ| < 1e-6)
//! θ = t · (Σ_j θ_j)/N + (1 − t) · θ_base
//! ```
//!
//! With `filter_wise = true` the angle and `t` are computed per row (slices along the last
//! axis) instead of once per tensor. Matches mergekit 0.1.5's `model_stock`.

use super::stream::{Chunk, Partial, Pass, Stream, StreamSpec, downcast, run_in_memory};
use super::util::{CHUNK, base, check, check_spec, global_flag};
use super::{BaseUse, MergeInput, MergeMethod, ParamDecl, ParamKind, Scope};
use crate::error::Result;
use crate::simd::avx2_fn;

/// Model Stock (see the module docs).
#[derive(Clone, Copy, Debug, Default)]
pub struct ModelStock;

static PARAMS: &[ParamDecl] = &[ParamDecl {
    name: "filter_wise",
    scope: Scope::Global,
    kind: ParamKind::Bool,
    default: Some(0.0),
    searched: true,
    doc: "compute the interpolation ratio per row instead of per tensor",
}];

/// The ratio `t` for `count` models from the mean pairwise cosine of their task vectors.
pub fn stock_ratio(count: usize, cos: f64) -> f64 {
    let den = 1.0 + (count as f64 - 1.0) * cos;
    if den.abs() < 1e-6 {
        0.0
    } else {
        count as f64 * cos / den
    }
}

/// Gram statistics of the task vectors over `range`: `g[i*k + j] = <δ_i, δ_j>` (`i ≤ j`), each
/// product summed in four `f64` lanes.
fn gram(base: &[f32], models: &[&[f32]], range: std::ops::Range<usize>) -> Vec<f64> {
    let k = models.len();
    let b = &base[range.clone()];
    let mut g = vec![0.0f64; k * k];
    for i in 0..k {
        for j in i..k {
            g[i * k + j] = dot_deltas(&models[i][range.clone()], &models[j][range.clone()], b);
        }
    }
    g
}

avx2_fn!(pub(super) fn dot_deltas(x: &[f32], y: &[f32], b: &[f32]) -> f64 => dot_deltas_body);
avx2_fn!(pub(super) fn dot(x: &[f32], y: &[f32]) -> f64 => dot_body);

/// `Σ x·y` in `f64`, four lanes (so the loop vectorises).
#[inline(always)]
fn dot_body(x: &[f32], y: &[f32]) -> f64 {
    let mut lanes = [0.0f64; 4];
    let (x4, y4) = (x.chunks_exact(4), y.chunks_exact(4));
    let tail = x4.remainder().len();
    for (x4, y4) in x4.zip(y4) {
        for t in 0..4 {
            lanes[t] += f64::from(x4[t]) * f64::from(y4[t]);
        }
    }
    let start = x.len() - tail;
    for t in 0..tail {
        lanes[t] += f64::from(x[start + t]) * f64::from(y[start + t]);
    }
    lanes.iter().sum()
}

/// `Σ (x − b)(y − b)` in `f64`, four lanes (so the loop vectorises).
#[inline(always)]
fn dot_deltas_body(x: &[f32], y: &[f32], b: &[f32]) -> f64 {
    let mut lanes = [0.0f64; 4];
    let (x4, y4, b4) = (x.chunks_exact(4), y.chunks_exact(4), b.chunks_exact(4));
    let tail = x4.remainder().len();
    for ((x4, y4), b4) in x4.zip(y4).zip(b4) {
        for t in 0..4 {
            lanes[t] += f64::from(x4[t] - b4[t]) * f64::from(y4[t] - b4[t]);
        }
    }
    let start = x.len() - tail;
    for t in 0..tail {
        lanes[t] += f64::from(x[start + t] - b[start + t]) * f64::from(y[start + t] - b[start + t]);
    }
    lanes.iter().sum()
}

/// `t` from Gram statistics.
fn ratio_from_gram(g: &[f64], k: usize) -> f64 {
    let mut sum = 0.0;
    let mut pairs = 0usize;
    for i in 0..k {
        for j in i + 1..k {
            let norm = (g[i * k + i].sqrt() * g[j * k + j].sqrt()).max(1e-6);
            sum += (g[i * k + j] / norm).clamp(-1.0, 1.0);
            pairs += 1;
        }
    }
    stock_ratio(k, sum / pairs as f64)
}

impl MergeMethod for ModelStock {
    fn name(&self) -> &'static str {
        "model_stock"
    }

    fn params(&self) -> &'static [ParamDecl] {
        PARAMS
    }

    fn base(&self) -> BaseUse {
        BaseUse::Required
    }

    fn model_count(&self) -> (usize, Option<usize>) {
        (2, None)
    }

    fn merge(&self, input: &MergeInput<'_>) -> Result<Vec<f32>> {
        let n = check(self, input)?;
        let b = base(self, input)?;
        let stream = self
            .stream(&input.spec())?
            .expect("model_stock always streams");
        run_in_memory(stream, n, Some(b), &input.models)
    }

    fn stream(&self, spec: &StreamSpec<'_>) -> Result<Option<Box<dyn Stream>>> {
        let n = check_spec(self, spec)?;
        let filter_wise = global_flag(self.name(), spec, "filter_wise")?;
        // one t per row of `row` entries (filter_wise), or one for the whole tensor
        let row = if filter_wise && spec.shape.len() >= 2 {
            spec.shape[spec.shape.len() - 1].max(1)
        } else {
            n.max(1)
        };
        Ok(Some(Box::new(StockStream {
            k: spec.models,
            row,
            asked: false,
            ts: Vec::new(),
        })))
    }
}

/// One pass for the task vectors' Gram statistics (per row, or per [`CHUNK`] piece summed in
/// order), then `t · mean + (1 − t) · base` chunk by chunk.
struct StockStream {
    k: usize,
    /// Entries per interpolation ratio.
    row: usize,
    asked: bool,
    /// One ratio per row.
    ts: Vec<f32>,
}

impl Stream for StockStream {
    fn next_pass(&mut self, partials: Vec<Partial>) -> Result<Option<Pass>> {
        if !self.asked {
            self.asked = true;
            return Ok(Some(Pass::All));
        }
        // (row, Gram of that row's entries in one piece), pieces in tensor order
        let mut grams: Vec<Vec<f64>> = Vec::new();
        for (r, g) in downcast::<Vec<(usize, Vec<f64>)>>(partials)
            .into_iter()
            .flatten()
        {
            if grams.len() <= r {
                grams.resize(r + 1, vec![0.0; self.k * self.k]);
            }
            for (a, v) in grams[r].iter_mut().zip(g) {
                *a += v;
            }
        }
        self.ts = grams
            .iter()
            .map(|g| ratio_from_gram(g, self.k) as f32)
            .collect();
        Ok(None)
    }

    fn observe(&self, chunk: &Chunk<'_>) -> Result<Partial> {
        let b = chunk.base.expect("model_stock has a base");
        let (start, end) = (chunk.start, chunk.start + chunk.len());
        // pieces end at row ends and at CHUNK boundaries (the whole-tensor sum's grouping)
        let mut pieces = Vec::new();
        let mut at = start;
        while at < end {
            let r = at / self.row;
            let stop = end.min((r + 1) * self.row).min((at / CHUNK + 1) * CHUNK);
            let local = at - start..stop - start;
            pieces.push((r, gram(b, chunk.models, local)));
            at = stop;
        }
        Ok(Box::new(pieces))
    }

    fn apply(&self, chunk: &Chunk<'_>, out: &mut [f32]) -> Result<()> {
        let b = chunk.base.expect("model_stock has a base");
        // row by row, so the ratio is a constant of each inner loop
        let mut at = 0;
        while at < out.len() {
            let r = (chunk.start + at) / self.row;
            let stop = out.len().min((r + 1) * self.row - chunk.start);
            let models: Vec<&[f32]> = chunk.models.iter().map(|m| &m[at..stop]).collect();
            stock_row(self.ts[r], &models, &b[at..stop], &mut out[at..stop]);
            at = stop;
        }
        Ok(())
    }
}

avx2_fn!(fn stock_row(t: f32, models: &[&[f32]], b: &[f32], out: &mut [f32]) => stock_row_body);

/// `out = t · mean(models) + (1 − t) · b`, the models summed in order.
#[inline(always)]
fn stock_row_body(t: f32, models: &[&[f32]], b: &[f32], out: &mut [f32]) {
    out.fill(0.0);
    for m in models {
        for (o, &x) in out.iter_mut().zip(*m) {
            *o += x;
        }
    }
    let inv = models.len() as f32;
    for (o, &y) in out.iter_mut().zip(b) {
        *o = t * (*o / inv) + (1.0 - t) * y;
    }
}

#[cfg(test)]
mod tests {
    use super::super::util::testing::{assert_close, input, params};
    use super::*;

    #[test]
    fn ratio_formula() {
        // N = 2, cos = 0.5: t = 1 / 1.5
        assert!((stock_ratio(2, 0.5) - 2.0 / 3.0).abs() < 1e-12);
        // N = 3, cos = 0: t = 0 (orthogonal updates cancel out: stay at the base)
        assert_eq!(stock_ratio(3, 0.0), 0.0);
        // parallel updates: t = 1
        assert!((stock_ratio(4, 1.0) - 1.0).abs() < 1e-12);
        // singular denominator: N = 2, cos = −1
        assert_eq!(stock_ratio(2, -1.0), 0.0);
    }

    #[test]
    fn merge_at_sixty_degrees() {
        // δ_1 = (1,0), δ_2 = (0.5, √3/2): cos = 0.5 → t = 2/3
        let base = [1.0f32, 1.0];
        let a = [2.0f32, 1.0];
        let b = [1.5f32, 1.0 + 0.866_025_4];
        let inp = input(
            &ModelStock,
            &[2],
            Some(&base),
            vec![&a, &b],
            vec![params(&[]), params(&[])],
            params(&[]),
            0,
        );
        let t = 2.0f32 / 3.0;
        let want = [t * 1.75 + (1.0 - t), t * (1.0 + 0.433_012_7) + (1.0 - t)];
        assert_close(&ModelStock.merge(&inp).unwrap(), &want, 1e-6);
    }

    #[test]
    fn filter_wise_uses_one_ratio_per_row() {
        // row 0: parallel updates → t = 1 (average); row 1: opposite → singular → base
        let base = [0.0f32; 4];
        let a = [1.0f32, 0.0, 1.0, 0.0];
        let b = [3.0f32, 0.0, -1.0, 0.0];
        let inp = input(
            &ModelStock,
            &[2, 2],
            Some(&base),
            vec![&a, &b],
            vec![params(&[]), params(&[])],
            params(&[("filter_wise", 1.0)]),
            0,
        );
        assert_close(
            &ModelStock.merge(&inp).unwrap(),
            &[2.0, 0.0, 0.0, 0.0],
            1e-6,
        );
    }

    /// Rows that straddle streamed chunks get the ratio of their whole row.
    #[test]
    fn rows_across_chunks_use_their_whole_row() {
        use crate::merge::stream::STREAM_CHUNK;
        let cols = 1000; // does not divide the chunk size
        let rows = 2 * STREAM_CHUNK / cols + 3;
        let n = rows * cols;
        let base: Vec<f32> = (0..n).map(|i| ((i * 7) % 13) as f32 * 0.1).collect();
        let a: Vec<f32> = (0..n)
            .map(|i| base[i] + ((i * 5) % 11) as f32 * 0.01 - 0.05)
            .collect();
        let b: Vec<f32> = (0..n)
            .map(|i| base[i] + ((i * 3) % 7) as f32 * 0.01 - 0.03)
            .collect();
        let shape = [rows, cols];
        let inp = input(
            &ModelStock,
            &shape,
            Some(&base),
            vec![&a, &b],
            vec![params(&[]), params(&[])],
            params(&[("filter_wise", 1.0)]),
            0,
        );
        let got = ModelStock.merge(&inp).unwrap();
        for r in 0..rows {
            let row = r * cols..(r + 1) * cols;
            let t = ratio_from_gram(&gram(&base, &[&a, &b], row.clone()), 2) as f32;
            for i in row {
                let want = t * ((a[i] + b[i]) / 2.0) + (1.0 - t) * base[i];
                assert!((got[i] - want).abs() <= 1e-5, "row {r} entry {i}");
            }
        }
    }

    #[test]
    fn one_fine_tune_is_an_error() {
        let x = [1.0f32];
        let inp = input(
            &ModelStock,
            &[1],
            Some(&x),
            vec![&x],
            vec![params(&[])],
            params(&[]),
            0,
        );
        let err = ModelStock.merge(&inp).unwrap_err().to_string();
        assert!(err.contains("at least 2"), "{err}");
    }
}
