//! `linear`: the weighted average of the models — the model soup of Wortsman et al. 2022
//! ("Model soups: averaging weights of multiple fine-tuned models improves accuracy without
//! increasing inference time", ICML 2022), and with equal weights the uniform soup / SWA.
//!
//! ```text
//! θ = Σ_j w_j θ_j                 (normalize = false)
//! θ = Σ_j w_j θ_j / Σ_j w_j       (normalize = true, the default)
//! ```
//!
//! The declared `weight` range [0, 1] bounds the search; recipes may use any weight.
//!
//! As in mergekit 0.1.5, the base model has no special role here: a recipe that lists it among
//! `models` gives it a weight like any other input, and the executor passes it among
//! [`MergeInput::models`]. A separate [`MergeInput::base`] is ignored.
//!
//! mergekit's `linear` computes in `f32` whatever the recipe's `dtype` (it only casts its
//! inputs to `dtype` on loading, and its result to the output dtype), so `--compute-dtype
//! recipe` ([`MergeMethod::stream_in`]) only rounds the inputs to `dtype` first: exact for
//! inputs stored in it, bit-identical to mergekit on the `linear_bf16` golden case.

use super::stream::{Chunk, RoundInputs, Stream, StreamSpec, run_in_memory};
use super::util::{check, check_spec, global_flag, per_model, tensor_err};
use super::{BaseUse, MergeInput, MergeMethod, ParamDecl, ParamKind, Scope};
use crate::error::Result;
use crate::simd::avx2_fn;
use crate::tensor::DType;

/// The weighted average (see the module docs).
#[derive(Clone, Copy, Debug, Default)]
pub struct Linear;

static PARAMS: &[ParamDecl] = &[
    ParamDecl {
        name: "weight",
        scope: Scope::PerModel,
        kind: ParamKind::Float { min: 0.0, max: 1.0 },
        default: None,
        searched: true,
        doc: "weight of this model in the average",
    },
    ParamDecl {
        name: "normalize",
        scope: Scope::Global,
        kind: ParamKind::Bool,
        default: Some(1.0),
        searched: true,
        doc: "divide by the sum of the weights",
    },
];

impl MergeMethod for Linear {
    fn name(&self) -> &'static str {
        "linear"
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

    fn merge(&self, input: &MergeInput<'_>) -> Result<Vec<f32>> {
        let n = check(self, input)?;
        let stream = self.stream(&input.spec())?.expect("linear always streams");
        run_in_memory(stream, n, None, &input.models)
    }

    fn stream(&self, spec: &StreamSpec<'_>) -> Result<Option<Box<dyn Stream>>> {
        Ok(Some(Box::new(self.linear_stream(spec, false)?)))
    }

    /// mergekit's `linear` computes in `f32` whatever the recipe's `dtype`.
    fn computes_in(&self, _dtype: DType) -> bool {
        true
    }

    /// mergekit's order: `result.addcmul_(x_j, w_j)` model by model (a fused multiply-add on
    /// CPU: `fma(x_j, w_j, result)`, one rounding), then `result / Σ w_j`, on the inputs
    /// rounded to `dtype` (as mergekit loads them).
    fn stream_in(&self, spec: &StreamSpec<'_>, dtype: DType) -> Result<Option<Box<dyn Stream>>> {
        let inner = Box::new(self.linear_stream(spec, true)?);
        Ok(Some(match dtype {
            DType::F32 => inner,
            _ => Box::new(RoundInputs { inner, dtype }),
        }))
    }
}

impl Linear {
    /// The weighted sum's stream; `fused`: mergekit's fused multiply-adds.
    fn linear_stream(&self, spec: &StreamSpec<'_>, fused: bool) -> Result<LinearStream> {
        check_spec(self, spec)?;
        let name = self.name();
        let weights = (0..spec.models)
            .map(|j| per_model(name, spec, j, "weight").map(|w| w as f32))
            .collect::<Result<Vec<f32>>>()?;
        let normalize = global_flag(name, spec, "normalize")?;
        let total: f32 = weights.iter().sum();
        if normalize && total == 0.0 {
            return Err(tensor_err(
                name,
                spec.tensor,
                format!("weights {weights:?} sum to zero, cannot normalize"),
            ));
        }
        Ok(LinearStream {
            weights,
            divisor: normalize.then_some(total),
            fused,
        })
    }
}

/// The weighted sum of one chunk: elementwise, no statistics pass.
struct LinearStream {
    weights: Vec<f32>,
    divisor: Option<f32>,
    /// Fused multiply-adds (mergekit's `addcmul_`) instead of a product and a sum.
    fused: bool,
}

impl Stream for LinearStream {
    fn uses_base(&self) -> bool {
        false
    }

    fn apply(&self, chunk: &Chunk<'_>, out: &mut [f32]) -> Result<()> {
        if self.fused {
            out.fill(0.0);
            for (m, &w) in chunk.models.iter().zip(&self.weights) {
                for (o, &x) in out.iter_mut().zip(*m) {
                    *o = x.mul_add(w, *o);
                }
            }
            if let Some(total) = self.divisor {
                out.iter_mut().for_each(|o| *o /= total);
            }
        } else {
            weighted_sum(&self.weights, chunk.models, self.divisor, out);
        }
        Ok(())
    }
}

avx2_fn!(fn weighted_sum(
    weights: &[f32],
    models: &[&[f32]],
    divisor: Option<f32>,
    out: &mut [f32],
) => weighted_sum_body);

/// `out = Σ_j w_j x_j`, divided by `divisor` when given.
#[inline(always)]
fn weighted_sum_body(weights: &[f32], models: &[&[f32]], divisor: Option<f32>, out: &mut [f32]) {
    out.fill(0.0);
    for (m, &w) in models.iter().zip(weights) {
        for (o, &x) in out.iter_mut().zip(*m) {
            *o += w * x;
        }
    }
    if let Some(total) = divisor {
        for o in out.iter_mut() {
            *o /= total;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::util::testing::{assert_close, input, params};
    use super::*;

    #[test]
    fn weighted_average_normalized() {
        let a = [1.0f32, 2.0, -3.0];
        let b = [3.0f32, 0.0, 1.0];
        let inp = input(
            &Linear,
            &[3],
            None,
            vec![&a, &b],
            vec![params(&[("weight", 1.0)]), params(&[("weight", 3.0)])],
            params(&[]),
            0,
        );
        // (1·a + 3·b) / 4
        assert_close(&Linear.merge(&inp).unwrap(), &[2.5, 0.5, 0.0], 1e-6);
    }

    #[test]
    fn weighted_sum_without_normalize() {
        let a = [1.0f32, 2.0];
        let b = [3.0f32, -1.0];
        let inp = input(
            &Linear,
            &[2],
            None,
            vec![&a, &b],
            vec![params(&[("weight", 0.5)]), params(&[("weight", 2.0)])],
            params(&[("normalize", 0.0)]),
            0,
        );
        assert_close(&Linear.merge(&inp).unwrap(), &[6.5, -1.0], 1e-6);
    }

    #[test]
    fn zero_weight_sum_is_an_error_naming_the_tensor() {
        let a = [1.0f32];
        let inp = input(
            &Linear,
            &[1],
            None,
            vec![&a, &a],
            vec![params(&[("weight", 1.0)]), params(&[("weight", -1.0)])],
            params(&[]),
            0,
        );
        let err = Linear.merge(&inp).unwrap_err().to_string();
        assert!(
            err.contains("test.weight") && err.contains("sum to zero"),
            "{err}"
        );
    }

    #[test]
    fn wrong_length_is_an_error() {
        let a = [1.0f32, 2.0];
        let b = [1.0f32];
        let inp = input(
            &Linear,
            &[2],
            None,
            vec![&a, &b],
            vec![params(&[("weight", 1.0)]), params(&[("weight", 1.0)])],
            params(&[]),
            0,
        );
        let err = Linear.merge(&inp).unwrap_err().to_string();
        assert!(err.contains("model 1 has 1 elements"), "{err}");
    }
}
