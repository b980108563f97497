//! Merge recipes in mergekit's YAML: `models` or `slices`, `base_model`, `merge_method`,
//! `parameters` (scalars, gradients, `{filter, value}` lists) at global / slice / source level,
//! `dtype`, `out_dtype`, `tokenizer_source`. Read with line-numbered errors for unknown keys,
//! written back in the same form so mergekit can run it too.

/// A parsed merge recipe (mergekit `MergeConfiguration`).
#[derive(Clone, Debug)]
pub struct Recipe {
    _private: (),
}
