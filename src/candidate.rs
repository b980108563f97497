//! A candidate model to be scored: merged tensors held in memory, a data-flow route through the
//! layers of several in-memory models, or a model directory on disk. Candidates built by the
//! search never pass through a file, and stay in their storage dtype (bf16 inputs make a bf16
//! candidate); the model casts each tensor to its compute dtype when it is built.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::Result;
use crate::tensor::TensorBuf;

/// Tensors by their Hugging Face names.
pub type TensorMap = BTreeMap<String, TensorBuf>;

/// A model held in memory: its config.json and its tensors, each in its storage dtype (a merge
/// of bf16 checkpoints is held in bf16, the plan's output dtype; see [`TensorBuf`]).
#[derive(Clone, Debug)]
pub struct MemModel {
    pub config: serde_json::Value,
    pub tensors: TensorMap,
}

impl MemModel {
    /// Read a model directory (or any reference [`crate::store::open_source`] opens, such as
    /// `BASE+ADAPTER`) into memory, every tensor in its stored dtype: [`crate::store::load_mem`].
    pub fn read_dir(dir: &Path) -> Result<MemModel> {
        crate::store::load_mem(dir)
    }

    /// Bytes its tensors take in memory.
    pub fn nbytes(&self) -> usize {
        self.tensors.values().map(TensorBuf::nbytes).sum()
    }
}

/// One hop of a data-flow route: run layer `layer` of source model `model`, after multiplying the
/// hidden state by `scale` (Akiba et al. 2024, the scaling matrix W).
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Hop {
    pub model: usize,
    pub layer: usize,
    pub scale: f32,
}

/// A data-flow-space path: the embeddings and head of `models[embed_model]`, and the layers hops.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Route {
    pub embed_model: usize,
    pub hops: Vec<Hop>,
}

/// What gets scored.
#[derive(Clone, Debug)]
pub enum CandidateBody {
    /// A merged (or loaded) model in memory.
    Merged(Arc<MemModel>),
    /// Layers of several in-memory models run in the order of `route`.
    Routed {
        models: Vec<Arc<MemModel>>,
        route: Route,
    },
    /// A Hugging Face model directory on disk.
    Dir(PathBuf),
}

/// A candidate with the recipe that produced it (mergekit YAML, or our DFS recipe file), which
/// external evaluators receive.
#[derive(Clone, Debug)]
pub struct Candidate {
    pub body: CandidateBody,
    pub recipe: Option<String>,
}
