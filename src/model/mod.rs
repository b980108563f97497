//! Forward passes on candle: a decoder-only transformer (Llama / Mistral / Qwen2 names) that runs
//! merged tensors or data-flow routes from memory, and the training loop that made the toy world.
//!
//! [`build`] turns any [`Candidate`] into a [`CausalLm`]: merged tensors become a
//! [`Transformer`], a route becomes a [`RoutedModel`], a model directory is opened with
//! [`crate::store::Model::open`] and decoded to `f32`.

pub mod mlp;
pub mod train;
pub mod transformer;

use candle_core::{DType, Device, Tensor};

use crate::candidate::{Candidate, CandidateBody};
use crate::error::Result;

pub use transformer::{LlamaConfig, RoutedModel, Transformer, forward_route};

/// A causal language model: token ids in, logits for every position out.
pub trait CausalLm: Send + Sync {
    /// Vocabulary size (last dimension of the logits).
    fn vocab_size(&self) -> usize;
    /// `input_ids`: `[batch, seq]` u32 → logits `[batch, seq, vocab]` f32.
    fn forward(&self, input_ids: &Tensor) -> Result<Tensor>;
}

/// Build a runnable model for a candidate: merged tensors, a route over several models, or a
/// model directory.
pub fn build(candidate: &Candidate, device: &Device, dtype: DType) -> Result<Box<dyn CausalLm>> {
    match &candidate.body {
        CandidateBody::Merged(mem) => Ok(Box::new(Transformer::from_mem(mem, device, dtype)?)),
        CandidateBody::Routed { models, route } => {
            let models = models
                .iter()
                .map(|m| Transformer::from_mem(m, device, dtype))
                .collect::<Result<Vec<_>>>()?;
            Ok(Box::new(RoutedModel {
                models,
                route: route.clone(),
            }))
        }
        CandidateBody::Dir(dir) => {
            let model = crate::store::Model::open(dir)?;
            Ok(Box::new(Transformer::from_source(&model, device, dtype)?))
        }
    }
}
