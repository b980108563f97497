//! The one integration-test binary; each area is a module.

mod cli;
mod decode;
mod digits;
mod eval;
mod gguf;
mod merge;
mod methods;
mod model;
mod recipe;
mod search;
mod store;
