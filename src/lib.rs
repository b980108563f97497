//! evomerge: find model-merge recipes by evolution.
//!
//! Data flows one way: store → plan → merge → candidate → evaluate → history → report.
//!
//! # Using the crate as a library
//!
//! Open a model directory (or `BASE+ADAPTER`, a PEFT adapter directory, a cached Hugging Face
//! hub id) into a runnable forward with [`model::Transformer::open`]; read it into memory (to
//! merge, align or train) with [`store::load_mem`] / [`store::load_mem_f32`]; write tensors back
//! as a model directory with [`store::save_model_dir`].
//!
//! ```no_run
//! use evomerge::candle_core::{DType, Device, Tensor};
//! use evomerge::model::{CausalLm, Transformer};
//! # fn main() -> evomerge::Result<()> {
//! let model = Transformer::open("assets/toy/base", &Device::Cpu, DType::F32)?;
//! let ids = Tensor::new(&[[1u32, 7, 8]], &Device::Cpu)?; // [batch, seq] u32
//! let logits = model.forward(&ids)?; // [batch, seq, vocab] f32
//! # let _ = logits;
//! // In memory, every tensor in its stored dtype:
//! let mem = evomerge::store::load_mem("assets/toy/add".as_ref())?;
//! let merged = Transformer::from_mem(&mem, &Device::Cpu, DType::F32)?;
//! # let _ = merged;
//! # Ok(()) }
//! ```
//!
//! **candle.** Public signatures use [candle](https://docs.rs/candle-core) types (`Tensor`,
//! `Device`, candle's `DType` as the forward's compute dtype). The crate re-exports the
//! candle it is built with as [`candle_core`] (and [`Device`], [`ComputeDType`] at the top):
//! use `evomerge::candle_core::...` instead of depending on candle yourself, so the versions
//! always match. [`tensor::DType`] is evomerge's own *storage* dtype of checkpoint tensors
//! (safetensors F32 / F16 / BF16), a different type.
//!
//! Training your own experts ([`model::train`]): read and encode a task's `train.jsonl`
//! ([`model::train::load_task_examples`]), train ([`model::train::train`]), save
//! ([`store::save_model_dir`]); set `CANDLE_NUM_THREADS=1` for tiny models on CPU (see the
//! module docs). A search ([`search`]) runs end to end, report included, with
//! [`pipeline::run_search`].

pub mod align;
pub mod arch;
pub mod candidate;
pub mod device;
pub mod error;
pub mod eval;
pub mod merge;
pub mod model;
pub mod pipeline;
pub mod procs;
pub mod recipe;
pub mod report;
pub mod search;
mod simd;
pub mod store;
pub mod synth;
pub mod tensor;
pub mod tokenizer;

pub use error::{Error, Result};

/// The candle this crate is built with (its types appear in public signatures).
pub use candle_core;
/// candle's dtype, re-exported under another name: the dtype a forward *computes* in (distinct
/// from [`tensor::DType`], the storage dtype of checkpoint tensors).
pub use candle_core::DType as ComputeDType;
/// candle's device, re-exported: where a forward runs.
pub use candle_core::Device;
