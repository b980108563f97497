//! Plan → execute: a recipe becomes a list of output tensors with resolved inputs and parameters;
//! execution merges them in parallel (rayon) into a sink — a shard writer on disk, or a map in
//! memory for search candidates.

use std::path::{Path, PathBuf};

use crate::candidate::MemModel;
use crate::error::Result;
use crate::recipe::Recipe;
use crate::store::ModelSet;
use crate::tensor::DType;

/// Options for running a merge.
#[derive(Clone, Debug)]
pub struct MergeOptions {
    /// Seed for the random methods (DARE, DELLA).
    pub seed: u64,
    /// Output dtype; `None` = the recipe's `out_dtype`, else its `dtype`, else the base's.
    pub out_dtype: Option<DType>,
    /// Largest shard in bytes.
    pub max_shard_size: u64,
    /// Show a progress bar.
    pub progress: bool,
}

impl Default for MergeOptions {
    fn default() -> Self {
        MergeOptions {
            seed: 0,
            out_dtype: None,
            max_shard_size: 5_000_000_000,
            progress: false,
        }
    }
}

/// Merge `recipe` into memory (the search's candidates). Models are taken from (or opened into)
/// `models`, so repeated candidates reuse the same memory maps.
pub fn merge_in_memory(recipe: &Recipe, models: &mut ModelSet, seed: u64) -> Result<MemModel> {
    let _ = (recipe, models, seed);
    todo!("executor::merge_in_memory")
}

/// Merge `recipe` into a Hugging Face model directory at `out_dir` (written to a temporary
/// directory and renamed at the end).
pub fn merge_to_disk(
    recipe: &Recipe,
    models: &mut ModelSet,
    out_dir: &Path,
    options: &MergeOptions,
) -> Result<PathBuf> {
    let _ = (recipe, models, out_dir, options);
    todo!("executor::merge_to_disk")
}
