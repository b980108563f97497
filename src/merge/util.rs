//! Shared plumbing for the merge methods: input validation with errors that name the tensor and
//! the method, typed parameter access, and deterministic parallel reductions.
//!
//! Reductions over a tensor are computed as one partial per fixed-size chunk (in parallel), then
//! summed in chunk order, so results are bit-identical run to run whatever the thread count.

use rayon::prelude::*;

use super::stream::StreamSpec;
use super::{BaseUse, MergeInput, MergeMethod, Params};
use crate::error::{Error, Result};

/// Elements per parallel work item. A multiple of 64, so chunks start on a bitset word.
pub(crate) const CHUNK: usize = 1 << 14;

/// An error about one tensor, prefixed with the method name.
pub(crate) fn tensor_err(method: &str, tensor: &str, msg: impl std::fmt::Display) -> Error {
    Error::Tensor {
        tensor: tensor.to_string(),
        msg: format!("{method}: {msg}"),
    }
}

/// Parameter access shared by whole-tensor inputs ([`MergeInput`]) and stream specs
/// ([`StreamSpec`]).
pub(crate) trait Args {
    fn tensor_name(&self) -> &str;
    fn global_params(&self) -> &Params;
    fn per_model_params(&self) -> &[Params];
}

impl Args for MergeInput<'_> {
    fn tensor_name(&self) -> &str {
        self.tensor
    }
    fn global_params(&self) -> &Params {
        &self.global
    }
    fn per_model_params(&self) -> &[Params] {
        &self.model_params
    }
}

impl Args for StreamSpec<'_> {
    fn tensor_name(&self) -> &str {
        self.tensor
    }
    fn global_params(&self) -> &Params {
        self.global
    }
    fn per_model_params(&self) -> &[Params] {
        self.model_params
    }
}

/// Validate what every method needs before seeing data: model count, base presence, per-model
/// parameters parallel to the models. Returns the element count.
pub(crate) fn check_spec(method: &dyn MergeMethod, spec: &StreamSpec<'_>) -> Result<usize> {
    let name = method.name();
    let n = spec.numel();
    let (min, max) = method.model_count();
    let count = spec.models;
    if count < min || max.is_some_and(|m| count > m) {
        let want = match max {
            Some(m) if m == min => format!("exactly {min}"),
            Some(m) => format!("{min} to {m}"),
            None => format!("at least {min}"),
        };
        let base = if method.base() == BaseUse::Required {
            " besides the base model"
        } else {
            ""
        };
        return Err(Error::Method {
            method: name.to_string(),
            msg: format!(
                "tensor `{}`: needs {want} model(s){base}, got {count}",
                spec.tensor
            ),
        });
    }
    if method.base() == BaseUse::Required && !spec.has_base {
        return Err(Error::Method {
            method: name.to_string(),
            msg: format!("tensor `{}`: needs a base_model", spec.tensor),
        });
    }
    if spec.model_params.len() != count {
        return Err(tensor_err(
            name,
            spec.tensor,
            format!(
                "{} per-model parameter sets for {count} models",
                spec.model_params.len()
            ),
        ));
    }
    Ok(n)
}

/// Validate a whole-tensor input: [`check_spec`], and one element count for all inputs.
/// Returns the element count.
pub(crate) fn check(method: &dyn MergeMethod, input: &MergeInput<'_>) -> Result<usize> {
    let name = method.name();
    let n = check_spec(method, &input.spec())?;
    if let Some(b) = input.base
        && b.len() != n
    {
        return Err(tensor_err(
            name,
            input.tensor,
            format!(
                "base model has {} elements, shape {:?} needs {n}",
                b.len(),
                input.shape
            ),
        ));
    }
    for (j, m) in input.models.iter().enumerate() {
        if m.len() != n {
            return Err(tensor_err(
                name,
                input.tensor,
                format!(
                    "model {j} has {} elements, shape {:?} needs {n}",
                    m.len(),
                    input.shape
                ),
            ));
        }
    }
    Ok(n)
}

/// The base tensor (call after [`check`] for methods whose base is required).
pub(crate) fn base<'a>(method: &dyn MergeMethod, input: &MergeInput<'a>) -> Result<&'a [f32]> {
    input.base.ok_or_else(|| Error::Method {
        method: method.name().to_string(),
        msg: format!("tensor `{}`: needs a base_model", input.tensor),
    })
}

/// A global parameter, the error naming method and tensor.
pub(crate) fn global(method: &str, input: &impl Args, name: &str) -> Result<f64> {
    input
        .global_params()
        .get(name)
        .map_err(|e| tensor_err(method, input.tensor_name(), e))
}

/// A global flag.
pub(crate) fn global_flag(method: &str, input: &impl Args, name: &str) -> Result<bool> {
    Ok(global(method, input, name)? != 0.0)
}

/// Model `j`'s parameter, the error naming method, tensor and model index.
pub(crate) fn per_model(method: &str, input: &impl Args, j: usize, name: &str) -> Result<f64> {
    input.per_model_params()[j]
        .get(name)
        .map_err(|e| tensor_err(method, input.tensor_name(), format!("model {j}: {e}")))
}

/// Sum, in chunk order, of per-chunk partials computed in parallel (deterministic).
pub(crate) fn chunked_sum<const K: usize>(
    n: usize,
    partial: impl Fn(std::ops::Range<usize>) -> [f64; K] + Sync,
) -> [f64; K] {
    let parts: Vec<[f64; K]> = (0..n.div_ceil(CHUNK))
        .into_par_iter()
        .map(|c| partial(c * CHUNK..((c + 1) * CHUNK).min(n)))
        .collect();
    let mut acc = [0.0; K];
    for p in parts {
        for (a, v) in acc.iter_mut().zip(p) {
            *a += v;
        }
    }
    acc
}

/// A well-mixed 64-bit value from a seed and two indices (SplitMix64 finaliser), for seeding
/// per-model, per-chunk RNGs so parallel draws do not depend on scheduling.
pub(crate) fn mix_seed(seed: u64, a: u64, b: u64) -> u64 {
    fn splitmix(mut z: u64) -> u64 {
        z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    splitmix(splitmix(splitmix(seed) ^ a) ^ b.wrapping_mul(0xd6e8_feb8_6659_fd93))
}

#[cfg(test)]
pub(crate) mod testing {
    //! Building [`MergeInput`]s for unit tests.
    use super::super::{MergeInput, Params};

    /// Parameters from `(name, value)` pairs.
    pub fn params(pairs: &[(&str, f64)]) -> Params {
        let mut p = Params::default();
        for (k, v) in pairs {
            p.set(k, *v);
        }
        p
    }

    /// A merge input over `models` with the declared defaults of `method` filled in.
    pub fn input<'a>(
        method: &dyn super::MergeMethod,
        shape: &'a [usize],
        base: Option<&'a [f32]>,
        models: Vec<&'a [f32]>,
        model_params: Vec<Params>,
        global: Params,
        seed: u64,
    ) -> MergeInput<'a> {
        let mut g = global;
        let mut mp = model_params;
        for d in method.params() {
            if let Some(v) = d.default {
                match d.scope {
                    super::super::Scope::Global => {
                        g.0.entry(d.name.to_string()).or_insert(v);
                    }
                    super::super::Scope::PerModel => {
                        for p in mp.iter_mut() {
                            p.0.entry(d.name.to_string()).or_insert(v);
                        }
                    }
                }
            }
        }
        MergeInput {
            tensor: "test.weight",
            shape,
            base,
            models,
            model_params: mp,
            global: g,
            aux: Vec::new(),
            seed,
        }
    }

    /// Assert two slices agree to `tol` (absolute), printing both on failure.
    pub fn assert_close(got: &[f32], want: &[f32], tol: f32) {
        assert_eq!(got.len(), want.len(), "length");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                (g - w).abs() <= tol,
                "element {i}: got {g}, want {w}\n got: {got:?}\nwant: {want:?}"
            );
        }
    }
}
