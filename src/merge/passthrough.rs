//! `passthrough`: copy one model's tensor, optionally multiplied by `scale`. With slices that
//! stack layers from several models this builds "frankenmerges" (the layer bookkeeping lives in
//! the recipe planner; this method only sees one tensor at a time).
//!
//! ```text
//! θ = scale · θ_0        (scale defaults to 1: an exact copy)
//! ```
//!
//! Matches mergekit 0.1.5's `passthrough` (one input per tensor, optional `scale`).

use super::stream::{Chunk, Stream, StreamSpec, run_in_memory};
use super::util::{check, check_spec, per_model};
use super::{BaseUse, MergeInput, MergeMethod, ParamDecl, ParamKind, Scope};
use crate::error::Result;

/// Copy (and scale) a single model's tensor.
#[derive(Clone, Copy, Debug, Default)]
pub struct Passthrough;

static PARAMS: &[ParamDecl] = &[ParamDecl {
    name: "scale",
    scope: Scope::PerModel,
    kind: ParamKind::Float { min: 0.0, max: 2.0 },
    default: Some(1.0),
    searched: true,
    doc: "multiply the tensor by this factor",
}];

impl MergeMethod for Passthrough {
    fn name(&self) -> &'static str {
        "passthrough"
    }

    fn params(&self) -> &'static [ParamDecl] {
        PARAMS
    }

    fn base(&self) -> BaseUse {
        BaseUse::Optional
    }

    fn model_count(&self) -> (usize, Option<usize>) {
        (1, Some(1))
    }

    fn merge(&self, input: &MergeInput<'_>) -> Result<Vec<f32>> {
        let n = check(self, input)?;
        let stream = self
            .stream(&input.spec())?
            .expect("passthrough always streams");
        run_in_memory(stream, n, None, &input.models)
    }

    fn stream(&self, spec: &StreamSpec<'_>) -> Result<Option<Box<dyn Stream>>> {
        check_spec(self, spec)?;
        let scale = per_model(self.name(), spec, 0, "scale")? as f32;
        Ok(Some(Box::new(Scaled(scale))))
    }
}

/// `scale · x`, chunk by chunk (a plain copy for scale 1).
struct Scaled(f32);

impl Stream for Scaled {
    fn uses_base(&self) -> bool {
        false
    }

    fn apply(&self, chunk: &Chunk<'_>, out: &mut [f32]) -> Result<()> {
        let x = chunk.models[0];
        if self.0 == 1.0 {
            out.copy_from_slice(x);
        } else {
            for (o, &v) in out.iter_mut().zip(x) {
                *o = v * self.0;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::util::testing::{input, params};
    use super::*;

    #[test]
    fn copies_and_scales() {
        let x = [1.5f32, -2.0];
        let inp = input(
            &Passthrough,
            &[2],
            None,
            vec![&x],
            vec![params(&[])],
            params(&[]),
            0,
        );
        assert_eq!(Passthrough.merge(&inp).unwrap(), vec![1.5, -2.0]);
        let inp = input(
            &Passthrough,
            &[2],
            None,
            vec![&x],
            vec![params(&[("scale", 0.5)])],
            params(&[]),
            0,
        );
        assert_eq!(Passthrough.merge(&inp).unwrap(), vec![0.75, -1.0]);
    }

    #[test]
    fn two_inputs_is_an_error() {
        let x = [1.0f32];
        let inp = input(
            &Passthrough,
            &[1],
            None,
            vec![&x, &x],
            vec![params(&[]), params(&[])],
            params(&[]),
            0,
        );
        let err = Passthrough.merge(&inp).unwrap_err().to_string();
        assert!(err.contains("exactly 1"), "{err}");
    }
}
