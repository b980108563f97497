//! Forward passes on candle: a decoder-only transformer (Llama / Mistral / Qwen2 names) that runs
//! merged tensors or data-flow routes from memory.

use candle_core::{Device, Tensor};

use crate::candidate::Candidate;
use crate::error::Result;

/// A causal language model: token ids in, logits for every position out.
pub trait CausalLm: Send + Sync {
    /// Vocabulary size (last dimension of the logits).
    fn vocab_size(&self) -> usize;
    /// `input_ids`: `[batch, seq]` u32 → logits `[batch, seq, vocab]` f32.
    fn forward(&self, input_ids: &Tensor) -> Result<Tensor>;
}

/// Build a runnable model for a candidate: merged tensors, a route over several models, or a
/// model directory.
pub fn build(candidate: &Candidate, device: &Device) -> Result<Box<dyn CausalLm>> {
    let _ = (candidate, device);
    todo!("model::build")
}
