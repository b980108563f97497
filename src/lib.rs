//! evomerge: find model-merge recipes by evolution.
//!
//! Data flows one way: store → plan → merge → candidate → evaluate → history → report.

pub mod align;
pub mod arch;
pub mod candidate;
pub mod device;
pub mod error;
pub mod eval;
pub mod merge;
pub mod model;
pub mod recipe;
pub mod report;
pub mod search;
mod simd;
pub mod store;
pub mod synth;
pub mod tensor;
pub mod tokenizer;

pub use error::{Error, Result};
