//! The one integration-test binary; each area is a module.

mod cli;
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
mod model;
mod recipe;
mod search;
mod store;
