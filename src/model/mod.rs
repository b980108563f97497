//! Forward passes on candle: a decoder-only transformer (Llama / Mistral / Qwen2 names) that runs
//! merged tensors or data-flow routes from memory, incremental decoding with a KV cache
//! ([`decode`]), and the training loop that made the toy world.
//!
//! **Opening a model**: [`Transformer::open`] takes a model directory (or `BASE+ADAPTER`, a
//! PEFT adapter directory, a cached hub id: anything [`crate::store::open_source`] opens) to a
//! runnable forward:
//!
//! ```no_run
//! use evomerge::candle_core::{DType, Device, Tensor};
//! use evomerge::model::{CausalLm, Transformer};
//! # fn main() -> evomerge::Result<()> {
//! let model = Transformer::open("assets/toy/base", &Device::Cpu, DType::F32)?;
//! let ids = Tensor::new(&[[1u32, 7, 8]], &Device::Cpu)?;
//! let logits = model.forward(&ids)?; // [batch, seq, vocab], f32
//! assert_eq!(logits.dims3()?.2, model.vocab_size());
//! # Ok(()) }
//! ```
//!
//! [`build`] turns any [`Candidate`] into a [`CausalLm`] computing in the dtype it is given:
//! merged tensors become a [`Transformer`] ([`Transformer::from_mem`]), a route becomes a
//! [`RoutedModel`], a model directory is opened with [`Transformer::open`]. A model held in
//! memory comes from [`crate::store::load_mem`].

pub mod decode;
pub mod lora;
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

    /// The logits (f32) at flat positions `row · seq + t` of `input_ids`, handed to `sink` in
    /// order, at most `chunk` positions (`[≤ chunk, vocab]`) at a time. Transformers run the
    /// head on those positions only, so full-vocabulary logits of every position never exist;
    /// the default slices [`CausalLm::forward`]'s output.
    fn logits_at(
        &self,
        input_ids: &Tensor,
        positions: &[u32],
        chunk: usize,
        sink: &mut dyn FnMut(Tensor) -> Result<()>,
    ) -> Result<()> {
        let (b, s) = input_ids.dims2()?;
        let logits = self
            .forward(input_ids)?
            .reshape((b * s, self.vocab_size()))?;
        for part in positions.chunks(chunk.max(1)) {
            let idx = Tensor::from_slice(part, part.len(), input_ids.device())?;
            sink(logits.index_select(&idx, 0)?)?;
        }
        Ok(())
    }

    /// Start incremental decoding of `prompts` (each non-empty) with room for
    /// `max_new_tokens` more tokens: the decoder and the logits `[batch, vocab]` of each
    /// prompt's next token. `None` when the model has no cache (callers re-run
    /// [`CausalLm::forward`] instead).
    fn decoder(
        &self,
        _prompts: &[&[u32]],
        _max_new_tokens: usize,
    ) -> Result<Option<(Box<dyn Decode + '_>, Tensor)>> {
        Ok(None)
    }
}

/// A batch being decoded incrementally ([`decode::Decoder`] for transformers).
pub trait Decode {
    /// Append one token per row; the logits `[rows, vocab]` (f32) of the next.
    fn step(&mut self, tokens: &[u32]) -> Result<Tensor>;
    /// Keep only the rows at `keep` (ascending indices into the current rows).
    fn retain(&mut self, keep: &[usize]) -> Result<()>;
}

impl Decode for decode::Decoder<'_> {
    fn step(&mut self, tokens: &[u32]) -> Result<Tensor> {
        decode::Decoder::step(self, tokens)
    }

    fn retain(&mut self, keep: &[usize]) -> Result<()> {
        decode::Decoder::retain(self, keep)
    }
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
        CandidateBody::Dir(dir) => Ok(Box::new(Transformer::open(dir, device, dtype)?)),
    }
}
