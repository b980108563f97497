//! `nuslerp`: mergekit's "new" SLERP — spherical interpolation of exactly two models with the
//! factor given by per-model weights, optionally of task vectors relative to a base model, and
//! optionally per row or per column instead of per whole tensor (SLERP: Shoemake 1985,
//! "Animating rotation with quaternion curves", SIGGRAPH '85).
//!
//! ```text
//! t = w_1 / (w_0 + w_1)          (t = 0.5 when |w_0 + w_1| < 1e-6)
//! v_j = θ_j − θ_base             (with a base model; else v_j = θ_j)
//! per vector: cos Ω = <v_0/max(|v_0|,1e-7), v_1/max(|v_1|,1e-7)>
//!             r = (sin((1−t)Ω)·v_0 + sin(tΩ)·v_1) / sin Ω,   or (1−t)·v_0 + t·v_1 if 1−cos²Ω ≤ 1e-16
//! θ = θ_base + r                 (with a base model; else θ = r)
//! ```
//!
//! Vectors: `nuslerp_flatten = true` (default) takes the whole tensor as one vector. With
//! `nuslerp_flatten = false`, `nuslerp_row_wise = false` (default) interpolates each slice along
//! the last axis (each row of a matrix), and `nuslerp_row_wise = true` each slice along the first
//! axis (each column) — mergekit 0.1.5's naming, kept for compatible recipes.
//!
//! Inputs: exactly two models besides the optional base; when the base model is also listed
//! among the models (three inputs, one equal to the base), that entry is dropped.
//!
//! Streaming (see [`super::stream`]): the whole-tensor form takes one pass for the three dot
//! products (summed per `util::CHUNK` piece, in order, as the earlier whole-tensor code did, so
//! streaming changed no bit), then an elementwise pass; the per-row form needs no pass: its
//! chunks are whole rows, each interpolated where it is read. The per-column form (`nuslerp_row_wise`)
//! and a recipe listing the base among three models take whole tensors.

use std::ops::Range;

use rayon::prelude::*;

use super::stream::{
    Chunk, Partial, Pass, STREAM_CHUNK, Stream, StreamSpec, downcast, run_in_memory,
};
use super::util::{CHUNK, check, check_spec, global_flag, per_model};
use super::{BaseUse, MergeInput, MergeMethod, ParamDecl, ParamKind, Scope};
use crate::error::Result;

/// Weighted spherical interpolation of two models (see the module docs).
#[derive(Clone, Copy, Debug, Default)]
pub struct NuSlerp;

static PARAMS: &[ParamDecl] = &[
    ParamDecl {
        name: "weight",
        scope: Scope::PerModel,
        kind: ParamKind::Float { min: 0.0, max: 1.0 },
        default: None,
        searched: true,
        doc: "relative weight; t = w_1 / (w_0 + w_1)",
    },
    ParamDecl {
        name: "nuslerp_flatten",
        scope: Scope::Global,
        kind: ParamKind::Bool,
        default: Some(1.0),
        searched: true,
        doc: "interpolate the whole tensor as one vector",
    },
    ParamDecl {
        name: "nuslerp_row_wise",
        scope: Scope::Global,
        kind: ParamKind::Bool,
        default: Some(0.0),
        searched: true,
        doc: "without flatten: interpolate slices along the first axis instead of the last",
    },
];

/// `(c_0, c_1)` for one vector pair from `<v0,v0>`, `<v1,v1>`, `<v0,v1>`.
fn coefficients(s00: f64, s11: f64, s01: f64, t: f64) -> (f32, f32) {
    let n0 = s00.sqrt().max(1e-7);
    let n1 = s11.sqrt().max(1e-7);
    let cos = (s01 / (n0 * n1)).clamp(-1.0, 1.0);
    if 1.0 - cos * cos <= 1e-16 {
        return ((1.0 - t) as f32, t as f32);
    }
    let omega = cos.acos();
    let s = omega.sin();
    (
        (((1.0 - t) * omega).sin() / s) as f32,
        ((t * omega).sin() / s) as f32,
    )
}

impl MergeMethod for NuSlerp {
    fn name(&self) -> &'static str {
        "nuslerp"
    }

    fn params(&self) -> &'static [ParamDecl] {
        PARAMS
    }

    fn base(&self) -> BaseUse {
        BaseUse::Optional
    }

    fn model_count(&self) -> (usize, Option<usize>) {
        (2, Some(3))
    }

    fn merge(&self, input: &MergeInput<'_>) -> Result<Vec<f32>> {
        check(self, input)?;
        // A recipe may list the base model among `models` too (mergekit adds it there anyway):
        // then the base's own entry is not one of the two interpolated models.
        if input.models.len() == 3
            && let Some(b) = input.base
            && let Some(j) = input
                .models
                .iter()
                .position(|m| std::ptr::eq(*m, b) || *m == b)
        {
            let mut models = input.models.clone();
            let mut model_params = input.model_params.clone();
            models.remove(j);
            model_params.remove(j);
            return self.merge(&MergeInput {
                models,
                model_params,
                global: input.global.clone(),
                aux: Vec::new(),
                ..*input
            });
        }
        if input.models.len() != 2 {
            return Err(crate::error::Error::Method {
                method: self.name().to_string(),
                msg: format!(
                    "tensor `{}`: needs exactly 2 models besides the optional base model, got {}",
                    input.tensor,
                    input.models.len()
                ),
            });
        }
        let n: usize = input.shape.iter().product();
        if let Some(stream) = self.stream(&input.spec())? {
            return run_in_memory(stream, n, input.base, &input.models);
        }
        // per column: one vector per position of the other axes, along the first axis
        let t = self.t(&input.spec())?;
        let (v0, v1): (Vec<f32>, Vec<f32>) = match input.base {
            Some(b) => (
                input.models[0].iter().zip(b).map(|(x, b)| x - b).collect(),
                input.models[1].iter().zip(b).map(|(x, b)| x - b).collect(),
            ),
            None => (input.models[0].to_vec(), input.models[1].to_vec()),
        };
        let mut out = vec![0.0f32; n];
        let rest = n / input.shape[0].max(1);
        let mut s = vec![[0.0f64; 3]; rest];
        for (x, y) in v0.chunks(rest).zip(v1.chunks(rest)) {
            for ((s, &x), &y) in s.iter_mut().zip(x).zip(y) {
                let (x, y) = (f64::from(x), f64::from(y));
                s[0] += x * x;
                s[1] += y * y;
                s[2] += x * y;
            }
        }
        let c: Vec<(f32, f32)> = s
            .iter()
            .map(|s| coefficients(s[0], s[1], s[2], t))
            .collect();
        out.par_chunks_mut(rest)
            .zip(v0.par_chunks(rest).zip(v1.par_chunks(rest)))
            .for_each(|(o, (x, y))| {
                for (((o, &x), &y), &(c0, c1)) in o.iter_mut().zip(x).zip(y).zip(&c) {
                    *o = c0 * x + c1 * y;
                }
            });
        if let Some(b) = input.base {
            out.par_iter_mut().zip(b).for_each(|(o, &b)| *o += b);
        }
        Ok(out)
    }

    /// The whole-tensor and per-row forms stream; the per-column form, and three models (the
    /// base possibly among them, which only the values tell), take whole tensors.
    fn stream(&self, spec: &StreamSpec<'_>) -> Result<Option<Box<dyn Stream>>> {
        check_spec(self, spec)?;
        if spec.models != 2 {
            return Ok(None);
        }
        let name = self.name();
        let t = self.t(spec)?;
        let flatten = global_flag(name, spec, "nuslerp_flatten")?;
        let row_wise = global_flag(name, spec, "nuslerp_row_wise")?;
        let shape = spec.shape;
        let form = if flatten || shape.len() < 2 {
            Form::Whole { coef: None }
        } else if !row_wise {
            let len = shape[shape.len() - 1].max(1);
            if len > MAX_ROW {
                return Ok(None);
            }
            Form::Rows { len }
        } else {
            return Ok(None);
        };
        Ok(Some(Box::new(NuStream {
            t,
            has_base: spec.has_base,
            form,
            asked: false,
        })))
    }
}

/// Longest row the per-row form streams (a chunk holds at least one row of each input).
const MAX_ROW: usize = 1 << 22;

impl NuSlerp {
    /// The interpolation factor `t = w_1 / (w_0 + w_1)` (0.5 when the weights cancel).
    fn t(&self, spec: &StreamSpec<'_>) -> Result<f64> {
        let name = self.name();
        let (w0, w1) = (
            per_model(name, spec, 0, "weight")?,
            per_model(name, spec, 1, "weight")?,
        );
        Ok(if (w0 + w1).abs() < 1e-6 {
            0.5
        } else {
            w1 / (w0 + w1)
        })
    }
}

/// Which vectors are interpolated.
enum Form {
    /// The whole tensor as one vector; `coef` once the dot-product pass ran.
    Whole { coef: Option<(f32, f32)> },
    /// Each row of `len` elements (slices along the last axis); chunks are whole rows.
    Rows { len: usize },
}

/// One tensor's nuslerp, chunk by chunk.
struct NuStream {
    t: f64,
    has_base: bool,
    form: Form,
    /// Whether the dot-product pass was asked for.
    asked: bool,
}

impl NuStream {
    /// `c0·v0 + c1·v1 (+ base)` over entries `range` of the chunk into `out[range]`.
    fn write(&self, chunk: &Chunk<'_>, range: Range<usize>, (c0, c1): (f32, f32), out: &mut [f32]) {
        let (x, y) = (
            &chunk.models[0][range.clone()],
            &chunk.models[1][range.clone()],
        );
        let out = &mut out[range.clone()];
        match chunk.base {
            Some(b) => {
                for (((o, &x), &y), &b) in out.iter_mut().zip(x).zip(y).zip(&b[range]) {
                    *o = (c0 * (x - b) + c1 * (y - b)) + b;
                }
            }
            None => {
                for ((o, &x), &y) in out.iter_mut().zip(x).zip(y) {
                    *o = c0 * x + c1 * y;
                }
            }
        }
    }
}

/// `<v0,v0>, <v1,v1>, <v0,v1>` of the two vectors (task vectors with a base) over entries
/// `range` of the chunk, accumulated in order.
fn chunk_dots(chunk: &Chunk<'_>, range: Range<usize>) -> [f64; 3] {
    let (x, y) = (
        &chunk.models[0][range.clone()],
        &chunk.models[1][range.clone()],
    );
    match chunk.base {
        Some(b) => {
            let b = &b[range];
            let mut s = [0.0f64; 3];
            for ((&x, &y), &b) in x.iter().zip(y).zip(b) {
                let (x, y) = (f64::from(x - b), f64::from(y - b));
                s[0] += x * x;
                s[1] += y * y;
                s[2] += x * y;
            }
            s
        }
        None => dots(x, y),
    }
}

impl Stream for NuStream {
    fn chunk_len(&self) -> usize {
        match self.form {
            Form::Whole { .. } => STREAM_CHUNK,
            Form::Rows { len } => len * (STREAM_CHUNK / len).max(1),
        }
    }

    fn next_pass(&mut self, partials: Vec<Partial>) -> Result<Option<Pass>> {
        let Form::Whole { coef } = &mut self.form else {
            return Ok(None);
        };
        if !self.asked {
            self.asked = true;
            return Ok(Some(Pass::All));
        }
        // sums per CHUNK piece, added in order: the in-memory form's `chunked_sum`
        let mut acc = [0.0f64; 3];
        for piece in downcast::<Vec<[f64; 3]>>(partials).into_iter().flatten() {
            for (a, v) in acc.iter_mut().zip(piece) {
                *a += v;
            }
        }
        *coef = Some(coefficients(acc[0], acc[1], acc[2], self.t));
        Ok(None)
    }

    fn observe(&self, chunk: &Chunk<'_>) -> Result<Partial> {
        // STREAM_CHUNK is a multiple of CHUNK, so these pieces are `chunked_sum`'s
        let n = chunk.len();
        let pieces: Vec<[f64; 3]> = (0..n.div_ceil(CHUNK))
            .map(|p| chunk_dots(chunk, p * CHUNK..((p + 1) * CHUNK).min(n)))
            .collect();
        Ok(Box::new(pieces))
    }

    fn uses_base(&self) -> bool {
        self.has_base
    }

    fn apply(&self, chunk: &Chunk<'_>, out: &mut [f32]) -> Result<()> {
        match self.form {
            Form::Whole { coef } => {
                let c = coef.expect("the dot-product pass ran");
                self.write(chunk, 0..out.len(), c, out);
            }
            Form::Rows { len } => {
                for r in (0..out.len()).step_by(len) {
                    let [s00, s11, s01] = chunk_dots(chunk, r..r + len);
                    let c = coefficients(s00, s11, s01, self.t);
                    self.write(chunk, r..r + len, c, out);
                }
            }
        }
        Ok(())
    }
}

fn dots(x: &[f32], y: &[f32]) -> [f64; 3] {
    let mut s = [0.0f64; 3];
    for (&x, &y) in x.iter().zip(y) {
        let (x, y) = (f64::from(x), f64::from(y));
        s[0] += x * x;
        s[1] += y * y;
        s[2] += x * y;
    }
    s
}

#[cfg(test)]
mod tests {
    use super::super::util::testing::{assert_close, input, params};
    use super::*;

    #[test]
    fn weights_give_t_and_rows_interpolate_separately() {
        // rows: (1,0)→(0,1) orthogonal, (2,0)→(4,0) parallel (lerp); t = 1/(1+1) = 0.5
        let a = [1.0f32, 0.0, 2.0, 0.0];
        let b = [0.0f32, 1.0, 4.0, 0.0];
        let inp = input(
            &NuSlerp,
            &[2, 2],
            None,
            vec![&a, &b],
            vec![params(&[("weight", 1.0)]), params(&[("weight", 1.0)])],
            params(&[("nuslerp_flatten", 0.0)]),
            0,
        );
        let h = std::f32::consts::FRAC_1_SQRT_2;
        assert_close(&NuSlerp.merge(&inp).unwrap(), &[h, h, 3.0, 0.0], 1e-6);
    }

    #[test]
    fn row_wise_means_columns_and_base_is_subtracted() {
        // base 1 everywhere; task vectors columns: col0 (1,0)→(0,1), col1 (0,3)→(0,1)
        let base = [1.0f32; 4];
        let a = [2.0f32, 1.0, 1.0, 4.0];
        let b = [1.0f32, 1.0, 2.0, 2.0];
        let inp = input(
            &NuSlerp,
            &[2, 2],
            Some(&base),
            vec![&a, &b],
            vec![params(&[("weight", 3.0)]), params(&[("weight", 1.0)])],
            params(&[("nuslerp_flatten", 0.0), ("nuslerp_row_wise", 1.0)]),
            0,
        );
        // t = 0.25; col0: Ω = 90° → (cos 22.5°, sin 22.5°); col1 parallel → 0.75·3 + 0.25·1
        let (c, s) = (22.5f32.to_radians().cos(), 22.5f32.to_radians().sin());
        let want = [1.0 + c, 1.0, 1.0 + s, 1.0 + 2.5];
        assert_close(&NuSlerp.merge(&inp).unwrap(), &want, 1e-6);
    }

    #[test]
    fn base_listed_among_models_is_dropped() {
        let base = [1.0f32, 1.0];
        let a = [2.0f32, 1.0];
        let b = [1.0f32, 2.0];
        let w = |x: f64| params(&[("weight", x)]);
        let with = input(
            &NuSlerp,
            &[2],
            Some(&base),
            vec![&a, &base, &b],
            vec![w(1.0), w(9.0), w(1.0)],
            params(&[]),
            0,
        );
        let without = input(
            &NuSlerp,
            &[2],
            Some(&base),
            vec![&a, &b],
            vec![w(1.0), w(1.0)],
            params(&[]),
            0,
        );
        let h = std::f32::consts::FRAC_1_SQRT_2;
        assert_close(&NuSlerp.merge(&with).unwrap(), &[1.0 + h, 1.0 + h], 1e-6);
        assert_eq!(
            NuSlerp.merge(&with).unwrap(),
            NuSlerp.merge(&without).unwrap()
        );
        // three distinct models is an error
        let c = [5.0f32, 5.0];
        let three = input(
            &NuSlerp,
            &[2],
            Some(&base),
            vec![&a, &b, &c],
            vec![w(1.0), w(1.0), w(1.0)],
            params(&[]),
            0,
        );
        let err = NuSlerp.merge(&three).unwrap_err().to_string();
        assert!(err.contains("exactly 2 models"), "{err}");
    }

    /// The whole-tensor and per-row forms as they ran before streaming: task vectors
    /// materialised, dot products by `chunked_sum` (whole) or one row at a time.
    fn unstreamed(input: &MergeInput<'_>, t: f64, rows: bool) -> Vec<f32> {
        let (v0, v1): (Vec<f32>, Vec<f32>) = match input.base {
            Some(b) => (
                input.models[0].iter().zip(b).map(|(x, b)| x - b).collect(),
                input.models[1].iter().zip(b).map(|(x, b)| x - b).collect(),
            ),
            None => (input.models[0].to_vec(), input.models[1].to_vec()),
        };
        let n = v0.len();
        let len = if rows {
            input.shape[input.shape.len() - 1]
        } else {
            n
        };
        let mut out = vec![0.0f32; n];
        for (o, (x, y)) in out.chunks_mut(len).zip(v0.chunks(len).zip(v1.chunks(len))) {
            let [s00, s11, s01] = if rows {
                dots(x, y)
            } else {
                super::super::util::chunked_sum(n, |r| dots(&x[r.clone()], &y[r]))
            };
            let (c0, c1) = coefficients(s00, s11, s01, t);
            for ((o, &x), &y) in o.iter_mut().zip(x).zip(y) {
                *o = c0 * x + c1 * y;
            }
        }
        if let Some(b) = input.base {
            out.iter_mut().zip(b).for_each(|(o, &b)| *o += b);
        }
        out
    }

    /// Streaming changes no bit: whole tensors over several chunks (dot products summed per
    /// `CHUNK` in order) and rows of 1000 (chunks of 32 whole rows), with and without a base.
    #[test]
    fn streamed_forms_equal_the_unstreamed_ones() {
        use rand::rngs::StdRng;
        use rand::{Rng, SeedableRng};
        let mut rng = StdRng::seed_from_u64(3);
        let shape = [70usize, 1000];
        let n = 70_000;
        let mut draw = || -> Vec<f32> { (0..n).map(|_| rng.random::<f32>() - 0.5).collect() };
        let (b, x, y) = (draw(), draw(), draw());
        let w = |v: f64| params(&[("weight", v)]);
        for base in [None, Some(b.as_slice())] {
            for flatten in [1.0, 0.0] {
                let inp = input(
                    &NuSlerp,
                    &shape,
                    base,
                    vec![&x, &y],
                    vec![w(0.3), w(0.5)],
                    params(&[("nuslerp_flatten", flatten)]),
                    0,
                );
                assert!(NuSlerp.stream(&inp.spec()).unwrap().is_some());
                let got = NuSlerp.merge(&inp).unwrap();
                let want = unstreamed(&inp, 0.5 / 0.8, flatten == 0.0);
                assert!(
                    got.iter()
                        .zip(&want)
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "base {} flatten {flatten}",
                    base.is_some()
                );
            }
        }
    }

    #[test]
    fn zero_weight_sum_uses_half() {
        let a = [1.0f32, 0.0];
        let b = [3.0f32, 0.0];
        let inp = input(
            &NuSlerp,
            &[2],
            None,
            vec![&a, &b],
            vec![params(&[("weight", 1.0)]), params(&[("weight", -1.0)])],
            params(&[]),
            0,
        );
        assert_close(&NuSlerp.merge(&inp).unwrap(), &[2.0, 0.0], 1e-6);
    }
}
