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

/// Model Stock (see the module docs).
#[derive(Clone, Copy, Debug, Default)]
pub struct ModelStock;

static PARAMS: &[ParamDecl] = &[ParamDecl {
    name: "filter_wise",
    scope: Scope::Global,
    kind: ParamKind::Bool,
    default: Some(0.0),
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

/// Gram statistics of the task vectors over `range`: `g[i*k + j] = <δ_i, δ_j>`.
fn gram(base: &[f32], models: &[&[f32]], range: std::ops::Range<usize>) -> Vec<f64> {
    let k = models.len();
    let mut g = vec![0.0f64; k * k];
    for idx in range {
        let b = base[idx];
        for i in 0..k {
            let di = f64::from(models[i][idx] - b);
            for j in i..k {
                g[i * k + j] += di * f64::from(models[j][idx] - b);
            }
        }
    }
    g
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
        let inv = self.k as f32;
        for (i, o) in out.iter_mut().enumerate() {
            let mut sum = 0.0f32;
            for m in chunk.models {
                sum += m[i];
            }
            let t = self.ts[(chunk.start + i) / self.row];
            *o = t * (sum / inv) + (1.0 - t) * b[i];
        }
        Ok(())
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
