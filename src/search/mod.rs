//! Evolutionary search over merge recipes (Akiba et al. 2024, "Evolutionary Optimization of
//! Model Merging Recipes").
//!
//! A [`def::SearchDef`] (`searches/*.toml`) names the models, the merge method, the space, the
//! evaluator and the budget. [`run::run_search`] opens the models once, lets the
//! [`optimizer::Optimizer`] (CMA-ES) propose genomes one generation at a time, decodes each
//! genome through the [`space::Space`] into a mergekit recipe (PS) or a route (DFS), builds the
//! candidate in memory, scores it on the dev split, and appends it to the
//! [`history`]. At the end it writes the best recipe and the merged model, scores the report's
//! rows on the test split and returns them ([`run::RunSummary`]); the report and the plots are
//! written after the search by [`crate::pipeline`] (the search never calls into
//! [`crate::report`]). [`run::resume`] continues a killed run to the identical result.
//!
//! The loop names no merge method: genes come from the method's declared parameters.

pub mod def;
pub mod history;
pub mod optimizer;
pub mod run;
pub mod space;

pub use def::SearchDef;
pub use run::{resume, run_search};
