//! The one integration-test binary; each area is a module.

mod cli;
mod compute_dtype;
mod decode;
mod digits;
mod eval;
mod finetune;
mod fuzz;
mod gguf;
mod library;
mod lora;
mod merge;
mod methods;
mod methods_bf16;
mod methods_more;
mod model;
mod overnight;
mod recipe;
mod search;
mod signals;
mod store;
mod subsample;
