//! The one integration-test binary; each area is a module.

mod store;
mod recipe;
mod methods;
mod merge;
mod model;
mod eval;
mod search;
mod digits;
