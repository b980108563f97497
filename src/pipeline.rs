//! A search end to end, as `evomerge search` / `evomerge resume` run it: the search
//! ([`crate::search`]), then its report and plots ([`crate::report::after_search`]) in the
//! output directory. Data flows one way: the search returns what the report needs
//! ([`RunSummary`]) and never calls into the report; this module joins the two, by installing
//! the report as the search's [`RunOptions::finish`] hook (so a PS+DFS search's own PS run gets
//! its report too). The hook runs while the search still holds its directory's lock
//! ([`crate::search::run::RunLock`]), and writes each file atomically, as the search does.
//!
//! ```no_run
//! use evomerge::search::{SearchDef, run::RunOptions};
//! # fn main() -> evomerge::Result<()> {
//! let def = SearchDef::load("searches/toy-ps.toml".as_ref())?;
//! let summary = evomerge::pipeline::run_search(&def, &def.output_dir(), &RunOptions::default())?;
//! if summary.test_rows.is_some() {
//!     print!("{}", evomerge::report::report(&def.output_dir())?);
//! }
//! # Ok(()) }
//! ```

use std::path::Path;

use crate::error::Result;
use crate::search::SearchDef;
use crate::search::run::{Finish, RunOptions, RunSummary, Search};

/// The report and plots as a [`RunOptions::finish`] hook ([`crate::report::after_search`]).
pub fn report_hook() -> Finish {
    Finish::new(crate::report::after_search)
}

/// `options` with the report hook installed.
pub fn with_report(options: &RunOptions) -> RunOptions {
    RunOptions {
        finish: Some(report_hook()),
        ..options.clone()
    }
}

/// [`crate::search::run_search`], then the report and the plots (per `options.report` /
/// `options.plots`).
pub fn run_search(def: &SearchDef, out_dir: &Path, options: &RunOptions) -> Result<RunSummary> {
    crate::search::run_search(def, out_dir, &with_report(options))
}

/// [`crate::search::run::resume_with`], then the report and the plots.
pub fn resume(out_dir: &Path, options: &RunOptions) -> Result<RunSummary> {
    crate::search::run::resume_with(out_dir, &with_report(options))
}

/// [`Search::run`] on a prepared search, then the report and the plots.
pub fn run(search: &Search, out_dir: &Path, options: &RunOptions) -> Result<RunSummary> {
    search.run(out_dir, &with_report(options))
}
