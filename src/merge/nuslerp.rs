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

use rayon::prelude::*;

use super::util::{check, chunked_sum, global_flag, per_model};
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
        doc: "relative weight; t = w_1 / (w_0 + w_1)",
    },
    ParamDecl {
        name: "nuslerp_flatten",
        scope: Scope::Global,
        kind: ParamKind::Bool,
        default: Some(1.0),
        doc: "interpolate the whole tensor as one vector",
    },
    ParamDecl {
        name: "nuslerp_row_wise",
        scope: Scope::Global,
        kind: ParamKind::Bool,
        default: Some(0.0),
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
        let name = self.name();
        let (w0, w1) = (
            per_model(name, input, 0, "weight")?,
            per_model(name, input, 1, "weight")?,
        );
        let t = if (w0 + w1).abs() < 1e-6 {
            0.5
        } else {
            w1 / (w0 + w1)
        };
        let flatten = global_flag(name, input, "nuslerp_flatten")?;
        let row_wise = global_flag(name, input, "nuslerp_row_wise")?;

        // The two vectors (task vectors when there is a base model).
        let (v0, v1): (Vec<f32>, Vec<f32>) = match input.base {
            Some(b) => (
                input.models[0].iter().zip(b).map(|(x, b)| x - b).collect(),
                input.models[1].iter().zip(b).map(|(x, b)| x - b).collect(),
            ),
            None => (input.models[0].to_vec(), input.models[1].to_vec()),
        };

        let shape = input.shape;
        let mut out = vec![0.0f32; n];
        if flatten || shape.len() < 2 {
            let [s00, s11, s01] = chunked_sum(n, |r| dots(&v0[r.clone()], &v1[r]));
            let (c0, c1) = coefficients(s00, s11, s01, t);
            out.par_iter_mut()
                .zip(v0.par_iter().zip(&v1))
                .for_each(|(o, (&x, &y))| *o = c0 * x + c1 * y);
        } else if !row_wise {
            // one vector per slice along the last axis: contiguous rows
            let len = shape[shape.len() - 1].max(1);
            out.par_chunks_mut(len)
                .zip(v0.par_chunks(len).zip(v1.par_chunks(len)))
                .for_each(|(o, (x, y))| {
                    let [s00, s11, s01] = dots(x, y);
                    let (c0, c1) = coefficients(s00, s11, s01, t);
                    for ((o, &x), &y) in o.iter_mut().zip(x).zip(y) {
                        *o = c0 * x + c1 * y;
                    }
                });
        } else {
            // one vector per position of the other axes, along the first axis
            let rest = n / shape[0].max(1);
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
        }
        if let Some(b) = input.base {
            out.par_iter_mut().zip(b).for_each(|(o, &b)| *o += b);
        }
        Ok(out)
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
