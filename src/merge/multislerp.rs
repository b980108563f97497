//! `multislerp`: barycentric interpolation of any number of models on the hypersphere, of task
//! vectors when a base model is given (Charles Goddard, "Multislerp", goddard.blog;
//! mergekit 0.1.5's `multislerp`). Each tensor is one flat vector.
//!
//! ```text
//! v_j = θ_j − θ_base          (with a base model; else v_j = θ_j)
//! w_j ← w_j / Σ_k w_k         (normalize_weights, the default)
//! u_j = v_j / (|v_j| + eps)                      points on the unit sphere
//! m   = Σ_j w_j u_j,  m̂ = m / |m|                their weighted mean, projected back
//! τ   = Σ_j w_j (u_j − <u_j, m̂> m̂)               the weighted mean in the tangent space at m̂
//! r   = cos(|τ| + eps)·m̂ + sin(|τ| + eps)/(|τ| + eps)·τ      exponential map back to the sphere
//! θ   = θ_base + (Σ_j w_j |v_j|)·r
//! ```
//!
//! (`τ` is zero in exact arithmetic — `Σ w_j <u_j, m̂> = |m|` — so `r ≈ m̂`; it is kept because
//! mergekit computes it.) Special cases, as in mergekit: one model gives that model unchanged;
//! `|m| < eps` (antipodal inputs whose weights cancel) falls back to `w_0 v_0 + w_1 v_1` for two
//! models and is an error for more.
//!
//! **Streamed**: one pass accumulates the Gram matrix `G_jk = <v_j, v_k>` (in `f64`, per chunk,
//! summed in chunk order); every quantity above is a linear combination of the `v_j` whose norms
//! and dot products follow from `G`, so the output is `θ_base + Σ_j c_j v_j` with coefficients
//! fixed before the elementwise pass. [`super::karcher`] uses the same Gram pass.
//!
//! Differences from mergekit: zero-sum weights with `normalize_weights` are an error naming the
//! tensor (mergekit divides by zero). The base model, when given, is only the origin; listed
//! among `models` too, it is dropped from them, as mergekit does ([`BaseUse::OptionalApart`]).

use super::stream::{Chunk, Partial, Pass, Stream, StreamSpec, downcast, run_in_memory};
use super::util::{check, check_spec, global, global_flag, per_model, tensor_err};
use super::{BaseUse, MergeInput, MergeMethod, ParamDecl, ParamKind, Scope};
use crate::error::Result;

/// Multi-SLERP (see the module docs).
#[derive(Clone, Copy, Debug, Default)]
pub struct MultiSlerp;

static PARAMS: &[ParamDecl] = &[
    ParamDecl {
        name: "weight",
        scope: Scope::PerModel,
        kind: ParamKind::Float { min: 0.0, max: 1.0 },
        default: None,
        searched: true,
        doc: "barycentric weight of this model",
    },
    ParamDecl {
        name: "normalize_weights",
        scope: Scope::Global,
        kind: ParamKind::Bool,
        default: Some(1.0),
        searched: true,
        doc: "divide the weights by their sum",
    },
    ParamDecl {
        name: "eps",
        scope: Scope::Global,
        kind: ParamKind::Float {
            min: 0.0,
            max: 1e-4,
        },
        default: Some(1e-8),
        searched: false,
        doc: "added to norms before dividing (numerical guard)",
    },
];

impl MergeMethod for MultiSlerp {
    fn name(&self) -> &'static str {
        "multislerp"
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
        let stream = self
            .stream(&input.spec())?
            .expect("multislerp always streams");
        run_in_memory(stream, n, input.base, &input.models)
    }

    fn stream(&self, spec: &StreamSpec<'_>) -> Result<Option<Box<dyn Stream>>> {
        check_spec(self, spec)?;
        let name = self.name();
        let mut weights = (0..spec.models)
            .map(|j| per_model(name, spec, j, "weight"))
            .collect::<Result<Vec<f64>>>()?;
        if global_flag(name, spec, "normalize_weights")? {
            let total: f64 = weights.iter().sum();
            if total == 0.0 {
                return Err(tensor_err(
                    name,
                    spec.tensor,
                    format!("weights {weights:?} sum to zero, cannot normalize"),
                ));
            }
            for w in &mut weights {
                *w /= total;
            }
        }
        let eps = global(name, spec, "eps")?;
        let solve: Solve = Box::new(move |g: &Gram, tensor: &str| {
            multislerp_coefficients(g, &weights, eps)
                .map_err(|msg| tensor_err("multislerp", tensor, msg))
        });
        // one model: that model, unchanged (no base term, no pass)
        let vectors = if spec.models == 1 {
            Vectors::Raw
        } else if spec.has_base {
            Vectors::Deltas
        } else {
            Vectors::Raw
        };
        Ok(Some(Box::new(GramStream::new(
            spec.tensor,
            vectors,
            spec.models,
            (spec.models > 1).then_some(solve),
        ))))
    }
}

/// The output coefficients `c_j` (of `θ_base + Σ c_j v_j`) from the Gram matrix of the `v_j`.
fn multislerp_coefficients(g: &Gram, w: &[f64], eps: f64) -> std::result::Result<Vec<f64>, String> {
    let k = g.k;
    let norms: Vec<f64> = (0..k).map(|j| g.get(j, j).max(0.0).sqrt()).collect();
    // unit vectors u_j = a_j v_j
    let a: Vec<f64> = norms.iter().map(|n| 1.0 / (n + eps)).collect();
    // m = Σ w_j u_j, as coefficients of the v_j
    let m: Vec<f64> = (0..k).map(|j| w[j] * a[j]).collect();
    let m_norm = g.norm(&m);
    if m_norm < eps {
        if k == 2 {
            return Ok(w.to_vec());
        }
        return Err(format!(
            "the weighted mean of the {k} unit vectors is zero (antipodal inputs whose weights \
             cancel); use other weights"
        ));
    }
    let m_hat: Vec<f64> = m.iter().map(|x| x / m_norm).collect();
    // dots_j = <u_j, m̂>;  τ = Σ w_j u_j − (Σ w_j dots_j) m̂
    let s: f64 = (0..k)
        .map(|j| {
            let mut e = vec![0.0; k];
            e[j] = a[j];
            w[j] * g.dot(&e, &m_hat)
        })
        .sum();
    let tau: Vec<f64> = (0..k).map(|j| m[j] - s * m_hat[j]).collect();
    let tn = g.norm(&tau) + eps;
    let (cos, sinc) = (tn.cos(), tn.sin() / tn);
    let avg_norm: f64 = norms.iter().zip(w).map(|(n, w)| n * w).sum();
    Ok((0..k)
        .map(|j| (cos * m_hat[j] + sinc * tau[j]) * avg_norm)
        .collect())
}

/// A Gram matrix `G_jk = <v_j, v_k>` of `k` vectors (row-major, `f64`).
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Gram {
    pub k: usize,
    pub g: Vec<f64>,
}

impl Gram {
    pub(crate) fn get(&self, i: usize, j: usize) -> f64 {
        self.g[i * self.k + j]
    }

    /// `<Σ x_i v_i, Σ y_j v_j>`.
    pub(crate) fn dot(&self, x: &[f64], y: &[f64]) -> f64 {
        let mut s = 0.0;
        for (i, xi) in x.iter().enumerate() {
            if *xi == 0.0 {
                continue;
            }
            for (j, yj) in y.iter().enumerate() {
                s += xi * yj * self.get(i, j);
            }
        }
        s
    }

    /// `|Σ x_j v_j|` (0 when rounding makes the square negative).
    pub(crate) fn norm(&self, x: &[f64]) -> f64 {
        self.dot(x, x).max(0.0).sqrt()
    }
}

/// Which vectors a [`GramStream`] measures and combines.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Vectors {
    /// The models' values as they are: `out = Σ c_j θ_j`.
    Raw,
    /// The models' values and then the base model's: `out = Σ c_j θ_j + c_k θ_base`.
    RawWithBase,
    /// Task vectors `θ_j − θ_base`: `out = θ_base + Σ c_j (θ_j − θ_base)`.
    Deltas,
}

/// Coefficients from the Gram matrix, or an error message (the tensor's name is passed for it).
pub(crate) type Solve = Box<dyn Fn(&Gram, &str) -> Result<Vec<f64>> + Send + Sync>;

/// One pass for the Gram matrix of the vectors, then `solve` gives the coefficients of the
/// elementwise combination. Without `solve` there is one input and no pass: the output is it.
pub(crate) struct GramStream {
    tensor: String,
    vectors: Vectors,
    /// Number of vectors.
    k: usize,
    solve: Option<Solve>,
    asked: bool,
    coefficients: Vec<f32>,
}

impl GramStream {
    /// `models` non-base inputs; `k` is one more for [`Vectors::RawWithBase`].
    pub(crate) fn new(
        tensor: &str,
        vectors: Vectors,
        models: usize,
        solve: Option<Solve>,
    ) -> GramStream {
        let k = models + usize::from(vectors == Vectors::RawWithBase);
        GramStream {
            tensor: tensor.to_string(),
            vectors,
            k,
            coefficients: if solve.is_none() { vec![1.0] } else { vec![] },
            solve,
            asked: false,
        }
    }
}

impl Stream for GramStream {
    fn next_pass(&mut self, partials: Vec<Partial>) -> Result<Option<Pass>> {
        let Some(solve) = &self.solve else {
            return Ok(None);
        };
        if !self.asked {
            self.asked = true;
            return Ok(Some(Pass::All));
        }
        let mut g = vec![0.0f64; self.k * self.k];
        for part in downcast::<Vec<f64>>(partials) {
            for (a, v) in g.iter_mut().zip(part) {
                *a += v;
            }
        }
        let c = solve(&Gram { k: self.k, g }, &self.tensor)?;
        self.coefficients = c.into_iter().map(|x| x as f32).collect();
        Ok(None)
    }

    fn observe(&self, chunk: &Chunk<'_>) -> Result<Partial> {
        use super::model_stock::{dot, dot_deltas};
        let k = self.k;
        let mut vectors: Vec<&[f32]> = chunk.models.to_vec();
        if self.vectors == Vectors::RawWithBase {
            vectors.push(chunk.base.expect("a base model"));
        }
        let mut g = vec![0.0f64; k * k];
        for a in 0..k {
            for b in a..k {
                let d = match self.vectors {
                    Vectors::Deltas => {
                        dot_deltas(vectors[a], vectors[b], chunk.base.expect("a base model"))
                    }
                    Vectors::Raw | Vectors::RawWithBase => dot(vectors[a], vectors[b]),
                };
                g[a * k + b] = d;
                g[b * k + a] = d;
            }
        }
        Ok(Box::new(g))
    }

    fn uses_base(&self) -> bool {
        self.vectors != Vectors::Raw
    }

    fn apply(&self, chunk: &Chunk<'_>, out: &mut [f32]) -> Result<()> {
        let c = &self.coefficients;
        match self.vectors {
            Vectors::Deltas => {
                let b = chunk.base.expect("a base model");
                out.fill(0.0);
                for (m, &c) in chunk.models.iter().zip(c) {
                    for ((o, &x), &b) in out.iter_mut().zip(*m).zip(b) {
                        *o += c * (x - b);
                    }
                }
                for (o, &b) in out.iter_mut().zip(b) {
                    *o += b;
                }
            }
            Vectors::Raw | Vectors::RawWithBase => {
                out.fill(0.0);
                let base = (self.vectors == Vectors::RawWithBase)
                    .then(|| chunk.base.expect("a base model"));
                for (m, &c) in chunk.models.iter().copied().chain(base).zip(c) {
                    for (o, &x) in out.iter_mut().zip(m) {
                        *o += c * x;
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::util::testing::{assert_close, input, params};
    use super::*;

    fn run(
        base: Option<&[f32]>,
        models: &[&[f32]],
        weights: &[f64],
        global: &[(&str, f64)],
    ) -> Result<Vec<f32>> {
        let shape = [models[0].len()];
        let inp = input(
            &MultiSlerp,
            &shape,
            base,
            models.to_vec(),
            weights.iter().map(|w| params(&[("weight", *w)])).collect(),
            params(global),
            0,
        );
        MultiSlerp.merge(&inp)
    }

    #[test]
    fn two_orthogonal_vectors_meet_on_the_arc() {
        // |a| = 1, |b| = 3, equal weights: direction (1,1)/√2, length (1 + 3)/2
        let got = run(None, &[&[1.0, 0.0], &[0.0, 3.0]], &[1.0, 1.0], &[]).unwrap();
        let h = 2.0 * std::f32::consts::FRAC_1_SQRT_2;
        assert_close(&got, &[h, h], 1e-6);
        // weights 3:1 (normalised to 0.75, 0.25): direction ∝ (0.75, 0.25), length 1.5
        let got = run(None, &[&[1.0, 0.0], &[0.0, 3.0]], &[3.0, 1.0], &[]).unwrap();
        let d = (0.75f32 * 0.75 + 0.25 * 0.25).sqrt();
        assert_close(&got, &[1.5 * 0.75 / d, 1.5 * 0.25 / d], 1e-6);
        // unnormalised weights scale the length only
        let got = run(
            None,
            &[&[1.0, 0.0], &[0.0, 3.0]],
            &[3.0, 1.0],
            &[("normalize_weights", 0.0)],
        )
        .unwrap();
        assert_close(&got, &[6.0 * 0.75 / d, 6.0 * 0.25 / d], 1e-5);
    }

    #[test]
    fn base_model_is_the_origin() {
        let base = [1.0f32, 1.0, 5.0];
        let a = [2.0f32, 1.0, 5.0];
        let b = [1.0f32, 3.0, 5.0];
        let got = run(Some(&base), &[&a, &b], &[1.0, 1.0], &[]).unwrap();
        let h = 1.5 * std::f32::consts::FRAC_1_SQRT_2;
        assert_close(&got, &[1.0 + h, 1.0 + h, 5.0], 1e-6);
    }

    #[test]
    fn one_model_is_returned_unchanged_and_antipodes_fall_back() {
        let a = [1.0f32, -2.0];
        assert_eq!(run(Some(&[9.0, 9.0]), &[&a], &[0.3], &[]).unwrap(), a);
        // a and −a with equal weights: the lerp fallback (0 here) for two models
        let m = [-1.0f32, 2.0];
        assert_close(
            &run(None, &[&a, &m], &[1.0, 1.0], &[]).unwrap(),
            &[0.0, 0.0],
            1e-7,
        );
        // three models whose unit vectors cancel: an error naming the tensor
        let c = [1.0f32, -2.0];
        let err = run(None, &[&a, &m, &c], &[1.0, 2.0, 1.0], &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("test.weight") && err.contains("zero"), "{err}");
    }

    #[test]
    fn error_cases() {
        let a = [1.0f32, 0.0];
        let b = [0.0f32, 1.0];
        let err = run(None, &[&a, &b], &[1.0, -1.0], &[])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("sum to zero") && err.contains("test.weight"),
            "{err}"
        );
        // no model at all
        let shape = [2];
        let inp = input(
            &MultiSlerp,
            &shape,
            Some(&a),
            vec![],
            vec![],
            params(&[]),
            0,
        );
        let err = MultiSlerp.merge(&inp).unwrap_err().to_string();
        assert!(err.contains("at least 1 model"), "{err}");
        // a missing weight names the model
        let inp = input(
            &MultiSlerp,
            &shape,
            None,
            vec![&a, &b],
            vec![params(&[("weight", 1.0)]), params(&[])],
            params(&[]),
            0,
        );
        let err = MultiSlerp.merge(&inp).unwrap_err().to_string();
        assert!(err.contains("model 1") && err.contains("`weight`"), "{err}");
    }
}
