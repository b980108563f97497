//! `nearswap`: take the other model's value only where it is near the base model's, fading to
//! the base as the two move apart (alchemonaut's NearSwap, model card of
//! `alchemonaut/QuartetAnemoi-70B-t0.0001` on the Hugging Face Hub; mergekit 0.1.5's `nearswap`).
//!
//! ```text
//! w = clamp(t / max(|θ_base − θ_1|, 1e-6), 0, 1)      elementwise
//! θ = w·θ_1 + (1 − w)·θ_base
//! ```
//!
//! Where the two models differ by at most `t` the result is the other model's value (`w = 1`);
//! further apart it moves back towards the base (`w = t / |Δ|`), so large, deliberate changes of
//! the fine-tune are mostly undone while small ones are adopted. `t` is in the weights' own
//! units: fine-tuning changes weights by about 1e-4 to 1e-2, hence the declared range [0, 0.01]
//! (recipes may use any value).
//!
//! Inputs: the base model and exactly one other model. Elementwise, so it streams with no
//! statistics pass. As in mergekit (torch evaluates `t / x` as `x⁻¹ · t`), the weight is
//! computed as `(1 / max(|Δ|, 1e-6)) · t` in `f32`.

use super::stream::{Chunk, Stream, StreamSpec, run_in_memory};
use super::util::{base, check, check_spec, global};
use super::{BaseUse, MergeInput, MergeMethod, ParamDecl, ParamKind, Scope};
use crate::error::Result;
use crate::simd::avx2_fn;

/// NearSwap (see the module docs).
#[derive(Clone, Copy, Debug, Default)]
pub struct NearSwap;

/// Differences below this count as this (mergekit's clamp), so `w` stays finite.
pub const MIN_DIFF: f32 = 1e-6;

static PARAMS: &[ParamDecl] = &[ParamDecl {
    name: "t",
    scope: Scope::Global,
    kind: ParamKind::Float {
        min: 0.0,
        max: 0.01,
    },
    default: None,
    searched: true,
    doc: "distance up to which the other model's value is taken whole (weights' units)",
}];

impl MergeMethod for NearSwap {
    fn name(&self) -> &'static str {
        "nearswap"
    }

    fn params(&self) -> &'static [ParamDecl] {
        PARAMS
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
        let stream = self
            .stream(&input.spec())?
            .expect("nearswap always streams");
        run_in_memory(stream, n, Some(b), &input.models)
    }

    fn stream(&self, spec: &StreamSpec<'_>) -> Result<Option<Box<dyn Stream>>> {
        check_spec(self, spec)?;
        let t = global(self.name(), spec, "t")? as f32;
        Ok(Some(Box::new(NearSwapStream { t })))
    }
}

/// Elementwise: no pass.
struct NearSwapStream {
    t: f32,
}

impl Stream for NearSwapStream {
    fn apply(&self, chunk: &Chunk<'_>, out: &mut [f32]) -> Result<()> {
        let a = chunk.base.expect("nearswap has a base");
        near_swap(self.t, a, chunk.models[0], out);
        Ok(())
    }
}

avx2_fn!(fn near_swap(t: f32, a: &[f32], b: &[f32], out: &mut [f32]) => near_swap_body);

#[inline(always)]
fn near_swap_body(t: f32, a: &[f32], b: &[f32], out: &mut [f32]) {
    for ((o, &a), &b) in out.iter_mut().zip(a).zip(b) {
        let w = ((1.0 / (a - b).abs().max(MIN_DIFF)) * t).clamp(0.0, 1.0);
        *o = w * b + (1.0 - w) * a;
    }
}

#[cfg(test)]
mod tests {
    use super::super::util::testing::{assert_close, input, params};
    use super::*;

    fn run(a: &[f32], b: &[f32], t: f64) -> Result<Vec<f32>> {
        let shape = [a.len()];
        let inp = input(
            &NearSwap,
            &shape,
            Some(a),
            vec![b],
            vec![params(&[])],
            params(&[("t", t)]),
            0,
        );
        NearSwap.merge(&inp)
    }

    #[test]
    fn near_values_swap_far_values_fade_to_the_base() {
        let a = [1.0f32, 1.0, 1.0, 0.0, 2.0];
        let b = [1.05f32, 1.2, 0.6, 0.0, 2.0];
        // |Δ| = 0.05 ≤ t → b; 0.2 → w = 0.5; 0.4 → w = 0.25; equal → either (w = 1)
        let got = run(&a, &b, 0.1).unwrap();
        assert_close(&got, &[1.05, 1.1, 0.9, 0.0, 2.0], 1e-6);
        // t = 0: the base everywhere
        assert_eq!(run(&a, &b, 0.0).unwrap(), a.to_vec());
    }

    #[test]
    fn needs_a_base_and_exactly_one_model() {
        let a = [1.0f32];
        let shape = [1];
        let no_base = input(
            &NearSwap,
            &shape,
            None,
            vec![&a],
            vec![params(&[])],
            params(&[("t", 0.1)]),
            0,
        );
        let err = NearSwap.merge(&no_base).unwrap_err().to_string();
        assert!(
            err.contains("base_model") && err.contains("test.weight"),
            "{err}"
        );
        let two = input(
            &NearSwap,
            &shape,
            Some(&a),
            vec![&a, &a],
            vec![params(&[]), params(&[])],
            params(&[("t", 0.1)]),
            0,
        );
        let err = NearSwap.merge(&two).unwrap_err().to_string();
        assert!(err.contains("exactly 1 model"), "{err}");
        let no_t = input(
            &NearSwap,
            &shape,
            Some(&a),
            vec![&a],
            vec![params(&[])],
            params(&[]),
            0,
        );
        let err = NearSwap.merge(&no_t).unwrap_err().to_string();
        assert!(err.contains("`t`"), "{err}");
    }
}
