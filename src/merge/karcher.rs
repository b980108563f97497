//! `karcher`: the Karcher (Riemannian, Fréchet) mean of the models' directions on the unit
//! hypersphere, scaled by their mean norm (Karcher 1977, "Riemannian center of mass and
//! mollifier smoothing", Comm. Pure Appl. Math. 30; for model merging: arXiv:2603.04972;
//! mergekit 0.1.5's `karcher`). Each tensor is one flat vector; every input has weight `α = 1/K`.
//!
//! ```text
//! n_j = |θ_j|,  u_j = θ_j / n_j                     (inputs with n_j ≤ tol take no part)
//! β_j = α_j / Σ_valid α                             weights of the valid inputs
//! m   = Σ β_j u_j / |Σ β_j u_j|                     (u_first valid when that norm < tol)
//! repeat max_iter times (gradient descent with unit step on the sphere):
//!     ψ_j = arccos(clamp(<m, u_j>, −1, 1))           (inputs with ψ_j < tol skipped)
//!     τ   = Σ β_j ψ_j / sin ψ_j · (u_j − <m, u_j> m)  Riemannian log map, weighted
//!     stop when |τ| < tol
//!     m   = cos|τ| · m + sin|τ| · τ/|τ|,  then m /= |m| (when |m| > tol)
//! θ   = (Σ_j α_j n_j) · m
//! ```
//!
//! One input is returned unchanged; no valid input gives zeros. `max_iter` is rounded to the
//! nearest integer (mergekit takes an integer).
//!
//! Inputs: every model, and the base model when the recipe gives one (mergekit adds the base to
//! the inputs and gives it no special role). A base also listed among `models` counts once, as in
//! mergekit ([`BaseUse::OptionalApart`]: the planner takes it out of the models).
//!
//! **Streamed**: `m` and `τ` stay linear combinations of the `u_j`, so one pass for the Gram
//! matrix `<θ_i, θ_j>` (in `f64`) gives every norm and dot product of the iteration, which then
//! runs on `K` coefficients; the elementwise pass writes `Σ_j c_j θ_j` (the Gram stream of
//! [`super::multislerp`]). mergekit iterates on the full vectors in `f32`; this is the same
//! arithmetic, exact up to rounding, and more accurate for nearly parallel models, where `f32`
//! arccos of a dot product near 1 loses most of its digits.

use super::multislerp::{Gram, GramStream, Solve, Vectors};
use super::stream::{Stream, StreamSpec, run_in_memory};
use super::util::{check, check_spec, global, tensor_err};
use super::{BaseUse, MergeInput, MergeMethod, ParamDecl, ParamKind, Scope};
use crate::error::Result;

/// Karcher mean (see the module docs).
#[derive(Clone, Copy, Debug, Default)]
pub struct Karcher;

static PARAMS: &[ParamDecl] = &[
    ParamDecl {
        name: "max_iter",
        scope: Scope::Global,
        kind: ParamKind::Float {
            min: 0.0,
            max: 50.0,
        },
        default: Some(10.0),
        searched: true,
        doc: "most iterations of the mean (rounded; 0 = the normalised Euclidean mean)",
    },
    ParamDecl {
        name: "tol",
        scope: Scope::Global,
        kind: ParamKind::Float {
            min: 0.0,
            max: 1e-3,
        },
        default: Some(1e-5),
        searched: false,
        doc: "convergence tolerance (also: smallest norm and angle that count)",
    },
];

impl MergeMethod for Karcher {
    fn name(&self) -> &'static str {
        "karcher"
    }

    fn params(&self) -> &'static [ParamDecl] {
        PARAMS
    }

    fn base(&self) -> BaseUse {
        BaseUse::OptionalApart
    }

    fn model_count(&self) -> (usize, Option<usize>) {
        (1, None)
    }

    fn merge(&self, input: &MergeInput<'_>) -> Result<Vec<f32>> {
        let n = check(self, input)?;
        let stream = self.stream(&input.spec())?.expect("karcher always streams");
        run_in_memory(stream, n, input.base, &input.models)
    }

    fn stream(&self, spec: &StreamSpec<'_>) -> Result<Option<Box<dyn Stream>>> {
        check_spec(self, spec)?;
        let name = self.name();
        let max_iter = global(name, spec, "max_iter")?;
        if max_iter.is_nan() || max_iter < 0.0 {
            return Err(tensor_err(
                name,
                spec.tensor,
                format!("`max_iter` must be a count ≥ 0, got {max_iter}"),
            ));
        }
        let max_iter = max_iter.round() as usize;
        let tol = global(name, spec, "tol")?;
        let vectors = if spec.has_base {
            Vectors::RawWithBase
        } else {
            Vectors::Raw
        };
        let k = spec.models + usize::from(spec.has_base);
        let solve: Solve =
            Box::new(move |g: &Gram, _: &str| Ok(karcher_coefficients(g, max_iter, tol)));
        Ok(Some(Box::new(GramStream::new(
            spec.tensor,
            vectors,
            spec.models,
            (k > 1).then_some(solve),
        ))))
    }
}

/// The output coefficients `c_j` (of `Σ c_j θ_j`) from the inputs' Gram matrix.
fn karcher_coefficients(g: &Gram, max_iter: usize, tol: f64) -> Vec<f64> {
    let k = g.k;
    let alpha = 1.0 / k as f64;
    let norms: Vec<f64> = (0..k).map(|j| g.get(j, j).max(0.0).sqrt()).collect();
    let valid: Vec<usize> = (0..k).filter(|&j| norms[j] > tol).collect();
    if valid.is_empty() {
        return vec![0.0; k];
    }
    // work in the basis of the unit vectors u_j = θ_j / n_j: their Gram matrix
    let mut ug = Gram {
        k,
        g: vec![0.0; k * k],
    };
    for &i in &valid {
        for &j in &valid {
            ug.g[i * k + j] = g.get(i, j) / (norms[i] * norms[j]);
        }
    }
    let beta = 1.0 / valid.len() as f64; // α_j / Σ_valid α, all α equal
    let mut mean = vec![0.0f64; k];
    for &j in &valid {
        mean[j] = beta;
    }
    let mean_norm = ug.norm(&mean);
    if mean_norm < tol {
        mean = vec![0.0; k];
        mean[valid[0]] = 1.0;
    } else {
        for m in &mut mean {
            *m /= mean_norm;
        }
    }
    for _ in 0..max_iter {
        let mut tangent = vec![0.0f64; k];
        for &j in &valid {
            let mut e = vec![0.0; k];
            e[j] = 1.0;
            let dot = ug.dot(&mean, &e).clamp(-1.0, 1.0);
            let theta = dot.acos();
            if theta < tol {
                continue;
            }
            let f = beta * theta / theta.sin();
            tangent[j] += f;
            for (t, m) in tangent.iter_mut().zip(&mean) {
                *t -= f * dot * m;
            }
        }
        let tn = ug.norm(&tangent);
        if tn < tol {
            break;
        }
        let (c, s) = (tn.cos(), tn.sin() / tn);
        for (m, t) in mean.iter_mut().zip(&tangent) {
            *m = c * *m + s * t;
        }
        let un = ug.norm(&mean);
        if un > tol {
            for m in &mut mean {
                *m /= un;
            }
        }
    }
    let scale: f64 = norms.iter().map(|n| alpha * n).sum();
    (0..k)
        .map(|j| {
            if norms[j] > tol {
                scale * mean[j] / norms[j]
            } else {
                0.0
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::super::util::testing::{assert_close, input, params};
    use super::*;

    fn run(base: Option<&[f32]>, models: &[&[f32]], global: &[(&str, f64)]) -> Result<Vec<f32>> {
        let shape = [models.first().map_or(1, |m| m.len())];
        let inp = input(
            &Karcher,
            &shape,
            base,
            models.to_vec(),
            models.iter().map(|_| params(&[])).collect(),
            params(global),
            0,
        );
        Karcher.merge(&inp)
    }

    #[test]
    fn two_inputs_meet_at_the_arc_midpoint_with_the_mean_norm() {
        // 90° apart, norms 1 and 3: direction 45°, length 2
        let got = run(None, &[&[1.0, 0.0], &[0.0, 3.0]], &[]).unwrap();
        let h = 2.0 * std::f32::consts::FRAC_1_SQRT_2;
        assert_close(&got, &[h, h], 1e-6);
        // the base model is one more input: three unit vectors at 0°, 90°, 90° + a tiny tilt
        let got = run(Some(&[0.0, 1.0]), &[&[1.0, 0.0], &[0.0, 1.0]], &[]).unwrap();
        // Karcher mean of angles 0, 90, 90 on a circle: the mean angle 60°
        let (c, s) = (60f32.to_radians().cos(), 60f32.to_radians().sin());
        assert_close(&got, &[c, s], 1e-5);
    }

    #[test]
    fn iterations_refine_the_euclidean_start() {
        // angles 0°, 0°, 120° (unit vectors): the Karcher mean is at 40°, the normalised
        // Euclidean mean (the start) at 30°
        let (c, s) = (120f32.to_radians().cos(), 120f32.to_radians().sin());
        let x = [1.0f32, 0.0];
        let y = [c, s];
        let angle = |v: &[f32]| v[1].atan2(v[0]).to_degrees();
        let none = run(None, &[&x, &x, &y], &[("max_iter", 0.0)]).unwrap();
        assert!((angle(&none) - 30.0).abs() < 1e-3, "{none:?}");
        let many = run(None, &[&x, &x, &y], &[("max_iter", 50.0), ("tol", 1e-9)]).unwrap();
        assert!((angle(&many) - 40.0).abs() < 1e-3, "{many:?}");
        // on a circle the unit step is exact: one iteration lands on the mean
        let one = run(None, &[&x, &x, &y], &[("max_iter", 1.0)]).unwrap();
        assert!((angle(&one) - 40.0).abs() < 1e-3, "{one:?}");

        // on a sphere it is not: one step moves towards the stationary point, many reach it
        let (x, y, z) = ([1.0f32, 0.0, 0.0], [0.0f32, 1.0, 0.0], [0.0f32, 0.0, 1.0]);
        let gradient = |m: &[f32]| -> f64 {
            let m: Vec<f64> = m.iter().map(|&v| f64::from(v)).collect();
            let n = m.iter().map(|v| v * v).sum::<f64>().sqrt();
            let m: Vec<f64> = m.iter().map(|v| v / n).collect();
            let mut t = [0.0f64; 3];
            for u in [&x, &x, &y, &z] {
                let u: Vec<f64> = u.iter().map(|&v| f64::from(v)).collect();
                let dot: f64 = u.iter().zip(&m).map(|(a, b)| a * b).sum();
                let th = dot.clamp(-1.0, 1.0).acos();
                for i in 0..3 {
                    t[i] += th / th.sin() * (u[i] - dot * m[i]) / 4.0;
                }
            }
            t.iter().map(|v| v * v).sum::<f64>().sqrt()
        };
        let start = run(None, &[&x, &x, &y, &z], &[("max_iter", 0.0)]).unwrap();
        let one = run(None, &[&x, &x, &y, &z], &[("max_iter", 1.0)]).unwrap();
        let many = run(
            None,
            &[&x, &x, &y, &z],
            &[("max_iter", 50.0), ("tol", 1e-9)],
        )
        .unwrap();
        let (g0, g1, g50) = (gradient(&start), gradient(&one), gradient(&many));
        assert!(
            g0 > 1e-2 && g1 < g0 && g1 > 1e-5 && g50 < 1e-6,
            "{g0} {g1} {g50}"
        );
    }

    #[test]
    fn degenerate_inputs() {
        let a = [3.0f32, -1.0];
        // one input: returned unchanged
        assert_eq!(run(None, &[&a], &[]).unwrap(), a);
        // all zero: zeros
        let z = [0.0f32, 0.0];
        assert_eq!(run(None, &[&z, &z], &[]).unwrap(), z);
        // a zero input takes no part in the direction but counts in the mean norm
        let got = run(None, &[&a, &z], &[]).unwrap();
        assert_close(&got, &[1.5, -0.5], 1e-6);
    }

    #[test]
    fn error_cases() {
        let shape = [2];
        let a = [1.0f32, 0.0];
        let inp = input(&Karcher, &shape, Some(&a), vec![], vec![], params(&[]), 0);
        let err = Karcher.merge(&inp).unwrap_err().to_string();
        assert!(err.contains("at least 1 model"), "{err}");
        let err = run(None, &[&a, &a], &[("max_iter", -1.0)])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("max_iter") && err.contains("test.weight"),
            "{err}"
        );
        let inp = input(
            &Karcher,
            &shape,
            None,
            vec![&a, &a],
            vec![params(&[])],
            params(&[]),
            0,
        );
        let err = Karcher.merge(&inp).unwrap_err().to_string();
        assert!(
            err.contains("1 per-model parameter sets for 2 models"),
            "{err}"
        );
    }
}
