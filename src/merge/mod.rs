//! Merge methods and the executor that applies them tensor by tensor.
//!
//! Every method implements [`MergeMethod`]: it *declares* its parameters once ([`ParamDecl`]:
//! name, scope, default, valid range), and merges one tensor at a time from `f32` slices. The
//! recipe layer validates user parameters against those declarations, and the search reads its
//! gene ranges from them — neither names a method.
//!
//! A method may also offer its merge as a [`stream::Stream`] — statistics passes over chunks,
//! then an elementwise pass — which the executor runs chunk by chunk from disk to disk; `merge`
//! must give the same values (the streaming methods implement `merge` by running the stream over
//! in-memory slices, so there is one implementation of each formula).
//!
//! Registry keys match mergekit's (`linear`, `ties`, `dare_ties`, ...), see [`registry`].

use std::collections::BTreeMap;

use crate::error::{Error, Result};
use crate::tensor::DType;
use stream::{Stream, StreamSpec};

pub mod arcee_fusion;
pub mod executor;
pub mod fisher;
pub mod karcher;
pub mod linear;
pub mod model_stock;
pub mod multislerp;
pub mod nearswap;
pub mod nuslerp;
pub mod passthrough;
pub mod plan;
pub mod ram;
pub mod regmean;
pub mod sce;
mod select;
pub mod slerp;
pub mod soup;
pub mod sparsify;
pub mod stream;
pub mod task_arithmetic;
mod util;

/// Where a parameter is set: once per tensor for the whole merge, or once per input model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    Global,
    PerModel,
}

/// The type and valid range of a parameter. Booleans are carried as `0.0` / `1.0`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ParamKind {
    /// A real value in `[min, max]` (inclusive). The search draws genes inside this range.
    Float { min: f64, max: f64 },
    /// A flag (`true` / `false` in YAML).
    Bool,
}

/// One declared parameter of a merge method.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ParamDecl {
    pub name: &'static str,
    pub scope: Scope,
    pub kind: ParamKind,
    /// `None` means required.
    pub default: Option<f64>,
    /// Whether a search evolves it when its `space.params` does not list the parameters
    /// (false for numerical guards such as `eps` and `tol`; a search may still name them).
    pub searched: bool,
    /// One line for docs and `--help`.
    pub doc: &'static str,
}

/// Parameter values resolved for one output tensor (global ones, or one model's).
/// Values not set by the recipe are filled with the declared defaults before a method sees them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Params(pub BTreeMap<String, f64>);

impl Params {
    /// The value of `name`; an error naming the parameter when it is missing.
    pub fn get(&self, name: &str) -> Result<f64> {
        self.0
            .get(name)
            .copied()
            .ok_or_else(|| Error::msg(format!("parameter `{name}` is not set")))
    }

    /// A boolean parameter (non-zero is true).
    pub fn flag(&self, name: &str) -> Result<bool> {
        Ok(self.get(name)? != 0.0)
    }

    /// Set a value.
    pub fn set(&mut self, name: &str, value: f64) {
        self.0.insert(name.to_string(), value);
    }
}

/// Whether a method uses a base model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BaseUse {
    /// The method needs `base_model` (task-arithmetic family, slerp, model_stock).
    Required,
    /// Used when given (e.g. `linear` ignores it, but accepts it among `models`).
    /// A base the recipe also lists among `models` stays among them.
    Optional,
    /// Used when given, and never one of the `models`: a base the recipe also lists among
    /// `models` is taken out of them (as mergekit does for `multislerp` and `karcher`).
    OptionalApart,
}

impl BaseUse {
    /// Whether the base model, when the recipe also lists it among `models`, is handed to the
    /// method as one of [`MergeInput::models`] (only for [`BaseUse::Optional`]).
    pub fn listed_base_is_a_model(self) -> bool {
        self == BaseUse::Optional
    }
}

/// Everything a method needs to merge one tensor.
#[derive(Debug)]
pub struct MergeInput<'a> {
    /// The output tensor's name (for error messages and per-tensor randomness).
    pub tensor: &'a str,
    pub shape: &'a [usize],
    /// The base model's tensor, when the recipe has a base model.
    pub base: Option<&'a [f32]>,
    /// The other models' tensors, in recipe order (the base model is not among them).
    pub models: Vec<&'a [f32]>,
    /// Per-model parameters, parallel to `models`, defaults filled in.
    pub model_params: Vec<Params>,
    /// Global parameters, defaults filled in.
    pub global: Params,
    /// Per-model auxiliary data, parallel to `models`, for methods that declare
    /// [`MergeMethod::aux`] (a Fisher diagonal, a RegMean Gram matrix); empty otherwise.
    pub aux: Vec<Option<&'a [f32]>>,
    /// A seed for this tensor (derived from `--seed` and the tensor name); random methods
    /// (DARE, DELLA) must draw only from an RNG seeded with it.
    pub seed: u64,
}

impl MergeInput<'_> {
    /// Everything but the values.
    pub fn spec(&self) -> StreamSpec<'_> {
        StreamSpec {
            tensor: self.tensor,
            shape: self.shape,
            has_base: self.base.is_some(),
            models: self.models.len(),
            model_params: &self.model_params,
            global: &self.global,
            seed: self.seed,
        }
    }
}

/// A merge method: a formula from the literature applied to one tensor at a time.
pub trait MergeMethod: Send + Sync {
    /// The registry key, as in mergekit (`ties`, `dare_ties`, ...).
    fn name(&self) -> &'static str;
    /// The declared parameters (global and per-model).
    fn params(&self) -> &'static [ParamDecl];
    /// Whether a base model is required.
    fn base(&self) -> BaseUse;
    /// How many non-base models it accepts: `(min, max)`, `max = None` for no limit.
    fn model_count(&self) -> (usize, Option<usize>);
    /// The auxiliary file a method reads beside each model (e.g. `fisher.safetensors`), if any.
    fn aux(&self) -> Option<&'static str> {
        None
    }
    /// Merge one tensor. The output has `input.shape`'s element count.
    fn merge(&self, input: &MergeInput<'_>) -> Result<Vec<f32>>;
    /// This tensor's merge as a [`Stream`] (chunk by chunk, see [`stream`]) when the method,
    /// with these parameters, can run that way; it must give exactly what `merge` gives. `None`
    /// (the default) makes the executor hand whole tensors to `merge`.
    fn stream(&self, spec: &StreamSpec<'_>) -> Result<Option<Box<dyn Stream>>> {
        let _ = spec;
        Ok(None)
    }
    /// Whether the method can reproduce mergekit's arithmetic in `dtype` exactly
    /// (`evomerge merge --compute-dtype recipe`, see [`executor::ComputeDtype`]): `f32` always;
    /// `bf16` / `f16` only where [`MergeMethod::stream_in`] implements it.
    fn computes_in(&self, dtype: DType) -> bool {
        dtype == DType::F32
    }
    /// [`MergeMethod::stream`] with mergekit's arithmetic in `dtype`: the inputs rounded to
    /// `dtype`, then every operation rounded as mergekit's torch code rounds it. Called only
    /// when [`MergeMethod::computes_in`] says so. The default, for `f32`, is
    /// [`MergeMethod::stream`] itself (a method whose `f32` order of operations differs from
    /// mergekit's, like `linear`'s fused multiply-adds, overrides it).
    fn stream_in(&self, spec: &StreamSpec<'_>, dtype: DType) -> Result<Option<Box<dyn Stream>>> {
        if dtype == DType::F32 {
            return self.stream(spec);
        }
        Err(Error::msg(format!(
            "{}: mergekit's {dtype} arithmetic is not implemented for this method",
            self.name()
        )))
    }
}

/// The methods that implement mergekit's arithmetic in `dtype` ([`MergeMethod::computes_in`]).
pub fn computing_in(dtype: DType) -> Vec<&'static str> {
    registry()
        .iter()
        .filter(|m| m.computes_in(dtype))
        .map(|m| m.name())
        .collect()
}

/// A stable 64-bit seed for one tensor from the run seed and the tensor's name (FNV-1a).
pub fn tensor_seed(seed: u64, tensor: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    for b in tensor.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Every registered method.
pub fn registry() -> &'static [&'static dyn MergeMethod] {
    use task_arithmetic as ta;
    static REGISTRY: &[&dyn MergeMethod] = &[
        &linear::Linear,
        &slerp::Slerp,
        &nuslerp::NuSlerp,
        &ta::TASK_ARITHMETIC,
        &ta::TIES,
        &ta::DARE_TIES,
        &ta::DARE_LINEAR,
        &ta::BREADCRUMBS,
        &ta::BREADCRUMBS_TIES,
        &ta::DELLA,
        &ta::DELLA_LINEAR,
        &model_stock::ModelStock,
        &passthrough::Passthrough,
        &fisher::Fisher,
        &regmean::RegMean,
        &sce::Sce,
        &multislerp::MultiSlerp,
        &karcher::Karcher,
        &nearswap::NearSwap,
        &arcee_fusion::ArceeFusion,
        &ram::RAM,
        &ram::RAMPLUS_TL,
    ];
    REGISTRY
}

/// Look a method up by its registry key; the error lists the known keys.
pub fn method(name: &str) -> Result<&'static dyn MergeMethod> {
    registry()
        .iter()
        .copied()
        .find(|m| m.name() == name)
        .ok_or_else(|| {
            let known: Vec<_> = registry().iter().map(|m| m.name()).collect();
            Error::msg(format!(
                "unknown merge method `{name}` (known: {})",
                known.join(", ")
            ))
        })
}
