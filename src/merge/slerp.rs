//! `slerp`: spherical linear interpolation between the base model and one other model, each
//! tensor taken as one flat vector (Shoemake 1985, "Animating rotation with quaternion curves",
//! SIGGRAPH '85).
//!
//! ```text
//! cos Ω = <a/|a|, b/|b|>          (a = base, b = other; a norm ≤ 1e-8 counts as 1)
//! θ = sin((1−t)Ω)/sin Ω · a + sin(tΩ)/sin Ω · b
//! θ = (1−t)·a + t·b               when |cos Ω| > 0.9995 (nearly parallel: plain lerp)
//! ```
//!
//! `t = 0` gives the base model, `t = 1` the other. Matches mergekit 0.1.5's `slerp`
//! (threshold 0.9995, norm epsilon 1e-8, whole-tensor vectors); norms and the dot product are
//! accumulated in `f64` here.

use super::stream::{Chunk, Partial, Pass, Stream, StreamSpec, downcast, run_in_memory};
use super::util::{CHUNK, base, check, check_spec, global};
use super::{BaseUse, MergeInput, MergeMethod, ParamDecl, ParamKind, Scope};
use crate::error::Result;

/// Spherical interpolation of two models (see the module docs).
#[derive(Clone, Copy, Debug, Default)]
pub struct Slerp;

/// Above this |cos Ω| the vectors count as parallel and slerp falls back to lerp (mergekit).
pub const DOT_THRESHOLD: f64 = 0.9995;
/// Norms at or below this are taken as 1 (mergekit).
pub const NORM_EPS: f64 = 1e-8;

static PARAMS: &[ParamDecl] = &[ParamDecl {
    name: "t",
    scope: Scope::Global,
    kind: ParamKind::Float { min: 0.0, max: 1.0 },
    default: None,
    searched: true,
    doc: "interpolation factor: 0 = base model, 1 = the other model",
}];

/// `[Σa², Σb², Σab]` of one [`CHUNK`]-sized piece, in `f64`.
fn moments(a: &[f32], b: &[f32]) -> [f64; 3] {
    let (mut aa, mut bb, mut ab) = (0.0f64, 0.0f64, 0.0f64);
    for (&x, &y) in a.iter().zip(b) {
        let (x, y) = (f64::from(x), f64::from(y));
        aa += x * x;
        bb += y * y;
        ab += x * y;
    }
    [aa, bb, ab]
}

/// The coefficients `(c_a, c_b)` of `c_a·a + c_b·b` for interpolation factor `t`, from the
/// moments `[Σa², Σb², Σab]` of the two (non-empty) vectors.
pub fn slerp_coefficients([aa, bb, ab]: [f64; 3], t: f64) -> (f32, f32) {
    let na = if aa.sqrt() > NORM_EPS { aa.sqrt() } else { 1.0 };
    let nb = if bb.sqrt() > NORM_EPS { bb.sqrt() } else { 1.0 };
    let dot = (ab / (na * nb)).clamp(-1.0, 1.0);
    if dot.abs() > DOT_THRESHOLD {
        return ((1.0 - t) as f32, t as f32);
    }
    let omega = dot.acos();
    let s = omega.sin();
    (
        (((1.0 - t) * omega).sin() / s) as f32,
        ((t * omega).sin() / s) as f32,
    )
}

impl MergeMethod for Slerp {
    fn name(&self) -> &'static str {
        "slerp"
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
        let a = base(self, input)?;
        let stream = self.stream(&input.spec())?.expect("slerp always streams");
        run_in_memory(stream, n, Some(a), &input.models)
    }

    fn stream(&self, spec: &StreamSpec<'_>) -> Result<Option<Box<dyn Stream>>> {
        check_spec(self, spec)?;
        Ok(Some(Box::new(SlerpStream {
            t: global(self.name(), spec, "t")?,
            asked: false,
            coefficients: None,
        })))
    }
}

/// One pass for the two norms and the dot product, then `c_a·a + c_b·b` chunk by chunk.
struct SlerpStream {
    t: f64,
    asked: bool,
    coefficients: Option<(f32, f32)>,
}

impl Stream for SlerpStream {
    fn next_pass(&mut self, partials: Vec<Partial>) -> Result<Option<Pass>> {
        if !self.asked {
            self.asked = true;
            return Ok(Some(Pass::All));
        }
        if partials.is_empty() {
            // an empty tensor: no chunks, nothing to interpolate
            self.coefficients = Some(((1.0 - self.t) as f32, self.t as f32));
            return Ok(None);
        }
        // per-CHUNK moments summed in order, as a whole-tensor chunked sum would
        let mut sums = [0.0f64; 3];
        for piece in downcast::<Vec<[f64; 3]>>(partials).into_iter().flatten() {
            for (s, v) in sums.iter_mut().zip(piece) {
                *s += v;
            }
        }
        self.coefficients = Some(slerp_coefficients(sums, self.t));
        Ok(None)
    }

    fn observe(&self, chunk: &Chunk<'_>) -> Result<Partial> {
        let a = chunk.base.expect("slerp has a base");
        let b = chunk.models[0];
        let pieces: Vec<[f64; 3]> = a
            .chunks(CHUNK)
            .zip(b.chunks(CHUNK))
            .map(|(x, y)| moments(x, y))
            .collect();
        Ok(Box::new(pieces))
    }

    fn apply(&self, chunk: &Chunk<'_>, out: &mut [f32]) -> Result<()> {
        let (ca, cb) = self.coefficients.expect("moments computed");
        let a = chunk.base.expect("slerp has a base");
        for ((o, &x), &y) in out.iter_mut().zip(a).zip(chunk.models[0]) {
            *o = ca * x + cb * y;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::util::testing::{assert_close, input, params};
    use super::*;

    fn run(a: &[f32], b: &[f32], t: f64) -> Vec<f32> {
        let shape = [a.len()];
        let inp = input(
            &Slerp,
            &shape,
            Some(a),
            vec![b],
            vec![params(&[])],
            params(&[("t", t)]),
            0,
        );
        Slerp.merge(&inp).unwrap()
    }

    #[test]
    fn orthogonal_unit_vectors_follow_the_arc() {
        // Ω = 90°, t = 1/3: (cos 30°, sin 30°)
        let got = run(&[1.0, 0.0], &[0.0, 1.0], 1.0 / 3.0);
        assert_close(&got, &[0.866_025_4, 0.5], 1e-6);
    }

    #[test]
    fn endpoints() {
        let a = [1.0f32, 2.0, 0.5];
        let b = [-1.0f32, 0.3, 2.0];
        assert_close(&run(&a, &b, 0.0), &a, 1e-6);
        assert_close(&run(&a, &b, 1.0), &b, 1e-6);
    }

    #[test]
    fn nearly_parallel_vectors_fall_back_to_lerp() {
        // cos Ω ≈ 0.99995 > 0.9995: exactly (1−t)a + tb, no norm-preserving bulge
        let a = [1.0f32, 0.0];
        let b = [2.0f32, 0.02];
        let got = run(&a, &b, 0.25);
        assert_eq!(got, vec![0.75 * 1.0 + 0.25 * 2.0, 0.25 * 0.02]);
        let (ca, cb) = slerp_coefficients(moments(&a, &b), 0.25);
        assert_eq!((ca, cb), (0.75, 0.25));
    }

    #[test]
    fn needs_a_base_model() {
        let a = [1.0f32];
        let inp = input(
            &Slerp,
            &[1],
            None,
            vec![&a],
            vec![params(&[])],
            params(&[("t", 0.5)]),
            0,
        );
        let err = Slerp.merge(&inp).unwrap_err().to_string();
        assert!(err.contains("base_model"), "{err}");
    }
}
