//! `ram` and `ramplus_tl`: Reinforced Agent Merging (arXiv 2601.13572, "Reinforced Agent
//! Merging"; mergekit 0.1.5's `ram.py`). Task vectors are summed where only one model changed an
//! entry and averaged where several did, so a change made by one model alone is not diluted by
//! the models that left it untouched (as a plain average would).
//!
//! ```text
//! δ_j  = θ_j − θ_base
//! z_j  = δ_j · [|δ_j| > ε]                        entries of δ_j that count as changed
//! c    = Σ_j [|δ_j| > ε]                          contributors per entry
//! u    = [c = 1],  o = [c > 1]
//! ram:         θ = θ_base + Σ_j ( z_j·u + z_j·o / max(c, 1) )
//! ramplus_tl:  θ = θ_base + Σ_j ( z_j·u·λ_j + z_j·o / max(c, 1) )
//!              λ_j = 1 + r · clamp(ρ_j, 0, α),   ρ_j = S_j / max(U_j, ε)
//!              S_j = #{entries where z_j ≠ 0 and c > 1},   U_j = #{entries where z_j ≠ 0 and c = 1}
//! ```
//!
//! `ramplus_tl` ("RAM+, tensor-local") boosts each model's unique entries by how much of its
//! change the model shares with others (`ρ_j`, counted over the whole tensor), at most by `r·α`.
//!
//! Parameters are mergekit's: global `epsilon` (1e-5; both methods), `r` (0.1) and `alpha` (0.2)
//! (`ramplus_tl`). The declared ranges bound the search; recipes may use any value. The
//! comparisons `|δ| > ε` use `ε` rounded to `f32`, as torch does on `f32` tensors.
//!
//! Both stream (see [`super::stream`]): `ram` is elementwise (no pass); `ramplus_tl` needs
//! `S_j` and `U_j` over the whole tensor first — one counting pass over all chunks — then the
//! elementwise pass. Results equal mergekit's on `f32` inputs to the last bit (the same
//! operations in the same order; `tests/golden/ram`, `ramplus_tl`).
//!
//! Deviation: mergekit also accepts a group with the base model alone (and returns it); here
//! at least one model besides the base is required.

use super::stream::{Chunk, Partial, Pass, Stream, StreamSpec, downcast, run_in_memory};
use super::util::{base, check, check_spec, global, tensor_err};
use super::{BaseUse, MergeInput, MergeMethod, ParamDecl, ParamKind, Scope};
use crate::error::Result;
use crate::simd::avx2_fn;

/// `ram` (`plus = false`) or `ramplus_tl` (`plus = true`); see the module docs.
#[derive(Clone, Copy, Debug)]
pub struct Ram {
    plus: bool,
}

/// The `ram` method.
pub static RAM: Ram = Ram { plus: false };
/// The `ramplus_tl` method.
pub static RAMPLUS_TL: Ram = Ram { plus: true };

const EPSILON: ParamDecl = ParamDecl {
    name: "epsilon",
    scope: Scope::Global,
    kind: ParamKind::Float {
        min: 0.0,
        max: 0.01,
    },
    default: Some(1e-5),
    searched: true,
    doc: "task-vector entries with |δ| ≤ epsilon count as unchanged",
};

static RAM_PARAMS: &[ParamDecl] = &[EPSILON];

static RAMPLUS_PARAMS: &[ParamDecl] = &[
    ParamDecl {
        name: "r",
        scope: Scope::Global,
        kind: ParamKind::Float { min: 0.0, max: 1.0 },
        default: Some(0.1),
        searched: true,
        doc: "boost of a model's unique entries per unit of shared/unique ratio",
    },
    ParamDecl {
        name: "alpha",
        scope: Scope::Global,
        kind: ParamKind::Float { min: 0.0, max: 1.0 },
        default: Some(0.2),
        searched: true,
        doc: "cap of the shared/unique ratio (the boost is at most r·alpha)",
    },
    EPSILON,
];

impl MergeMethod for Ram {
    fn name(&self) -> &'static str {
        if self.plus { "ramplus_tl" } else { "ram" }
    }

    fn params(&self) -> &'static [ParamDecl] {
        if self.plus {
            RAMPLUS_PARAMS
        } else {
            RAM_PARAMS
        }
    }

    fn base(&self) -> BaseUse {
        BaseUse::Required
    }

    fn model_count(&self) -> (usize, Option<usize>) {
        (1, None)
    }

    fn merge(&self, input: &MergeInput<'_>) -> Result<Vec<f32>> {
        let n = check(self, input)?;
        let b = base(self, input)?;
        let stream = self.stream(&input.spec())?.expect("ram always streams");
        run_in_memory(stream, n, Some(b), &input.models)
    }

    fn stream(&self, spec: &StreamSpec<'_>) -> Result<Option<Box<dyn Stream>>> {
        check_spec(self, spec)?;
        let name = self.name();
        let epsilon = global(name, spec, "epsilon")?;
        let (r, alpha) = if self.plus {
            (global(name, spec, "r")?, global(name, spec, "alpha")?)
        } else {
            (0.0, 0.0)
        };
        for (p, v) in [("epsilon", epsilon), ("r", r), ("alpha", alpha)] {
            if !v.is_finite() {
                return Err(tensor_err(name, spec.tensor, format!("`{p}` is {v}")));
            }
        }
        Ok(Some(Box::new(RamStream {
            tensor: spec.tensor.to_string(),
            name,
            epsilon: epsilon as f32,
            plus: self.plus.then_some((r as f32, alpha as f32)),
            asked: false,
            // `ram`: every model's unique entries count once
            lambdas: (!self.plus).then(|| vec![1.0; spec.models]),
        })))
    }
}

/// One tensor's RAM merge: for `ramplus_tl` a counting pass, then elementwise.
struct RamStream {
    tensor: String,
    name: &'static str,
    epsilon: f32,
    /// `(r, alpha)` for `ramplus_tl`.
    plus: Option<(f32, f32)>,
    asked: bool,
    /// The factor of each model's unique entries, once known.
    lambdas: Option<Vec<f32>>,
}

impl Stream for RamStream {
    fn next_pass(&mut self, partials: Vec<Partial>) -> Result<Option<Pass>> {
        if self.lambdas.is_some() {
            return Ok(None);
        }
        if !self.asked {
            self.asked = true;
            return Ok(Some(Pass::All));
        }
        let (r, alpha) = self.plus.expect("only ramplus_tl counts");
        let parts = downcast::<Vec<[u64; 2]>>(partials);
        let k = parts.first().map_or(0, Vec::len);
        let mut totals = vec![[0u64; 2]; k];
        for part in parts {
            for (t, p) in totals.iter_mut().zip(part) {
                t[0] += p[0];
                t[1] += p[1];
            }
        }
        self.lambdas = Some(
            totals
                .iter()
                .map(|&[shared, unique]| {
                    // mergekit: shared / unique.clamp(min=ε), all in f32
                    let rho = shared as f32 / (unique as f32).max(self.epsilon);
                    1.0 + r * rho.clamp(0.0, alpha)
                })
                .collect(),
        );
        Ok(None)
    }

    fn observe(&self, chunk: &Chunk<'_>) -> Result<Partial> {
        let b = self.chunk_base(chunk)?;
        let mut counts = vec![0.0f32; b.len()];
        contributors(self.epsilon, b, chunk.models, &mut counts);
        let per_model: Vec<[u64; 2]> = chunk
            .models
            .iter()
            .map(|m| shared_unique(self.epsilon, m, b, &counts))
            .collect();
        Ok(Box::new(per_model))
    }

    fn apply(&self, chunk: &Chunk<'_>, out: &mut [f32]) -> Result<()> {
        let b = self.chunk_base(chunk)?;
        let lambdas = self.lambdas.as_deref().expect("counting pass ran");
        let mut counts = vec![0.0f32; b.len()];
        contributors(self.epsilon, b, chunk.models, &mut counts);
        combine(self.epsilon, b, chunk.models, lambdas, &counts, out);
        Ok(())
    }
}

impl RamStream {
    fn chunk_base<'a>(&self, chunk: &Chunk<'a>) -> Result<&'a [f32]> {
        chunk
            .base
            .ok_or_else(|| tensor_err(self.name, &self.tensor, "needs a base_model"))
    }
}

avx2_fn!(fn contributors(eps: f32, b: &[f32], models: &[&[f32]], counts: &mut [f32]) => contributors_body);

/// `counts[i] = #{j : |m_j[i] − b[i]| > eps}` (as `f32`, so the loops vectorise).
#[inline(always)]
fn contributors_body(eps: f32, b: &[f32], models: &[&[f32]], counts: &mut [f32]) {
    counts.fill(0.0);
    let n = counts.len();
    for m in models {
        let (m, b) = (&m[..n], &b[..n]);
        for i in 0..n {
            counts[i] += u32::from((m[i] - b[i]).abs() > eps) as f32;
        }
    }
}

/// `[S, U]` of one model over a chunk: its changed entries that others changed too / alone.
fn shared_unique(eps: f32, m: &[f32], b: &[f32], counts: &[f32]) -> [u64; 2] {
    let (mut shared, mut unique) = (0u64, 0u64);
    for ((&x, &y), &c) in m.iter().zip(b).zip(counts) {
        if (x - y).abs() > eps {
            shared += u64::from(c > 1.0);
            unique += u64::from(c == 1.0);
        }
    }
    [shared, unique]
}

avx2_fn!(fn combine(
    eps: f32,
    b: &[f32],
    models: &[&[f32]],
    lambdas: &[f32],
    counts: &[f32],
    out: &mut [f32],
) => combine_body);

/// `out = b + Σ_j ((z_j·u)·λ_j + (z_j·o) / max(c, 1))` — mergekit's expression term by term
/// (a `× 1` or `× 0` where torch multiplies by a mask), so the bits match.
#[inline(always)]
fn combine_body(
    eps: f32,
    b: &[f32],
    models: &[&[f32]],
    lambdas: &[f32],
    counts: &[f32],
    out: &mut [f32],
) {
    let n = out.len();
    let (b, counts) = (&b[..n], &counts[..n]);
    out.fill(0.0);
    for (m, &lambda) in models.iter().zip(lambdas) {
        let m = &m[..n];
        for i in 0..n {
            let d = m[i] - b[i];
            let z = d * u32::from(d.abs() > eps) as f32;
            let c = counts[i];
            let unique = u32::from(c == 1.0) as f32;
            let overlap = u32::from(c > 1.0) as f32;
            out[i] += (z * unique) * lambda + (z * overlap) / c.max(1.0);
        }
    }
    for i in 0..n {
        out[i] += b[i];
    }
}

#[cfg(test)]
mod tests {
    use super::super::util::testing::{assert_close, input, params};
    use super::*;

    fn run(method: &Ram, base: &[f32], models: &[&[f32]], global: &[(&str, f64)]) -> Vec<f32> {
        let shape = [base.len()];
        let mp = models.iter().map(|_| params(&[])).collect();
        let inp = input(
            method,
            &shape,
            Some(base),
            models.to_vec(),
            mp,
            params(global),
            0,
        );
        method.merge(&inp).unwrap()
    }

    #[test]
    fn unique_changes_add_and_shared_ones_average() {
        let base = [1.0f32, 1.0, 1.0, 1.0];
        // entry 0: only a; 1: a and b; 2: nobody (below ε); 3: a, b and c
        let a = [1.5f32, 2.0, 1.0, 0.0];
        let b = [1.0f32, 4.0, 1.05, 3.0];
        let c = [1.0f32, 1.0, 0.95, 4.0];
        let got = run(&RAM, &base, &[&a, &b, &c], &[("epsilon", 0.1)]);
        assert_close(&got, &[1.5, 1.0 + 4.0 / 2.0, 1.0, 1.0 + 4.0 / 3.0], 1e-6);
    }

    #[test]
    fn ramplus_boosts_unique_entries_by_the_shared_ratio() {
        let base = [0.0f32; 6];
        // a changes entries 0..4: 0, 1 alone, 2, 3 shared with b → ρ_a = 2/2 = 1
        // b changes 2, 3 shared and 4 alone → ρ_b = 2/1 = 2
        let a = [1.0f32, 2.0, 3.0, 4.0, 0.0, 0.0];
        let b = [0.0f32, 0.0, 1.0, 2.0, 5.0, 0.0];
        let (r, alpha) = (0.5, 1.5);
        let got = run(
            &RAMPLUS_TL,
            &base,
            &[&a, &b],
            &[("r", r), ("alpha", alpha), ("epsilon", 0.5)],
        );
        let la = 1.0 + 0.5 * 1.0f32; // ρ_a = 1 < α
        let lb = 1.0 + 0.5 * 1.5f32; // ρ_b = 2 clamped to α
        assert_close(&got, &[la, 2.0 * la, 2.0, 3.0, 5.0 * lb, 0.0], 1e-6);
        // r = 0: plain ram
        let plain = run(
            &RAMPLUS_TL,
            &base,
            &[&a, &b],
            &[("r", 0.0), ("epsilon", 0.5)],
        );
        assert_eq!(plain, run(&RAM, &base, &[&a, &b], &[("epsilon", 0.5)]));
    }

    #[test]
    fn ramplus_without_unique_entries_caps_the_ratio() {
        // every change is shared: U = 0, ρ = S/ε is huge, clamped to α; no entry uses λ
        let base = [0.0f32; 3];
        let a = [1.0f32, 1.0, 0.0];
        let b = [3.0f32, -1.0, 0.0];
        let got = run(&RAMPLUS_TL, &base, &[&a, &b], &[]);
        assert_close(&got, &[2.0, 0.0, 0.0], 1e-6);
    }

    #[test]
    fn streams_over_several_chunks_like_whole_tensors() {
        use super::super::stream::STREAM_CHUNK;
        let n = 2 * STREAM_CHUNK + 77;
        let base: Vec<f32> = (0..n).map(|i| (i % 13) as f32 * 0.1).collect();
        let a: Vec<f32> = (0..n)
            .map(|i| base[i] + if i % 3 == 0 { 0.5 } else { 0.0 })
            .collect();
        let b: Vec<f32> = (0..n)
            .map(|i| base[i] + if i % 5 < 2 { -0.25 } else { 0.0 })
            .collect();
        let got = run(&RAMPLUS_TL, &base, &[&a, &b], &[("alpha", 10.0)]);
        // S_a: i%3==0 and i%5<2; U_a: i%3==0 and i%5>=2 → ρ_a ≈ (2/15)/(3/15) = 2/3
        let count = |f: &dyn Fn(usize) -> bool| (0..n).filter(|&i| f(i)).count() as f32;
        let rho_a = count(&|i| i % 3 == 0 && i % 5 < 2) / count(&|i| i % 3 == 0 && i % 5 >= 2);
        let rho_b = count(&|i| i % 3 == 0 && i % 5 < 2) / count(&|i| i % 3 != 0 && i % 5 < 2);
        let (la, lb) = (1.0 + 0.1 * rho_a, 1.0 + 0.1 * rho_b);
        for i in [0, 3, 5, 6, STREAM_CHUNK + 1, n - 1] {
            let want = match (i % 3 == 0, i % 5 < 2) {
                (true, true) => base[i] + (0.5 - 0.25) / 2.0,
                (true, false) => base[i] + 0.5 * la,
                (false, true) => base[i] - 0.25 * lb,
                (false, false) => base[i],
            };
            assert!((got[i] - want).abs() < 1e-6, "{i}: {} vs {want}", got[i]);
        }
    }

    #[test]
    fn errors_name_method_and_tensor() {
        let shape = [2];
        let x = [0.0f32; 2];
        // no base model
        let inp = input(
            &RAM,
            &shape,
            None,
            vec![&x],
            vec![params(&[])],
            params(&[]),
            0,
        );
        let err = RAM.merge(&inp).unwrap_err().to_string();
        assert!(err.contains("ram") && err.contains("base_model"), "{err}");
        assert!(err.contains("test.weight"), "{err}");
        // no model besides the base
        let inp = input(
            &RAMPLUS_TL,
            &shape,
            Some(&x),
            vec![],
            vec![],
            params(&[]),
            0,
        );
        let err = RAMPLUS_TL.merge(&inp).unwrap_err().to_string();
        assert!(
            err.contains("ramplus_tl") && err.contains("at least 1") && err.contains("got 0"),
            "{err}"
        );
    }
}
