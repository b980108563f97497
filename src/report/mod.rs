//! The end-of-search report: each source model, the default merge (or route) and the evolved
//! candidate scored on the **test** split, one column per task, as a Markdown table.
//!
//! The search scores the rows and returns them ([`crate::search::run::RunSummary::test_rows`],
//! [`crate::search::run::Search::score_test_rows`]); [`from_run`] makes the report of them,
//! [`after_search`] (run after every search by [`crate::pipeline`]) writes it and the plots;
//! [`save`] writes
//! `report.json` (every metric) and `report.md` (the table) into the output directory;
//! [`report`] re-reads `report.json` and returns the table (what `evomerge report OUT_DIR`
//! prints). Plots live in [`plots`].
//!
//! Scores are shown as `evomerge eval` shows them ([`crate::eval::table`]): accuracy-like
//! metrics and fitness in percent with one decimal, metrics ending in `/perplexity` as they are.
//! Below the table, the search's own summary ([`SearchSummary`]): the best candidate's dev
//! fitness, evaluations (and how many failed), generations, wall time, and which file holds the
//! result (`best_recipe.yaml` or `best_route.json`).

use std::fmt::Write as _;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::eval::Split;
use crate::store::writer::write_atomic;

pub mod plots;

pub use crate::search::run::ScoredRow;
use crate::search::run::{RunOptions, RunSummary};

/// File names inside an output directory.
pub const REPORT_JSON: &str = "report.json";
pub const REPORT_MD: &str = "report.md";

/// What the search itself did (written under the table).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SearchSummary {
    /// The best candidate's fitness on the search's (dev) split.
    pub best_dev_fitness: Option<f64>,
    /// Evaluations in the history (answered from it on a resume included), and how many of
    /// them failed / were answered from the history.
    pub evaluations: usize,
    pub failed: usize,
    #[serde(default)]
    pub replayed: usize,
    pub generations: usize,
    /// Wall time of the search loop of the run that finished the search (a resumed run: the
    /// resumed part).
    pub wall_seconds: f64,
    /// The result file, relative to the output directory (`best_recipe.yaml`,
    /// `best_route.json`).
    pub result_file: String,
}

/// The whole report.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub search: String,
    pub split: Split,
    pub rows: Vec<ScoredRow>,
    /// The search's own summary (absent in reports of older versions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<SearchSummary>,
}

impl Report {
    /// The metric columns: per-task `<task>/score` keys when the evaluator gives them, else
    /// every metric key.
    pub fn columns(&self) -> Vec<String> {
        let mut all: Vec<String> = self
            .rows
            .iter()
            .flat_map(|r| r.metrics.keys().cloned())
            .collect();
        all.sort();
        all.dedup();
        let scores: Vec<String> = all
            .iter()
            .filter(|k| k.ends_with("/score"))
            .cloned()
            .collect();
        if scores.is_empty() { all } else { scores }
    }

    /// The Markdown table.
    pub fn markdown(&self) -> String {
        let cols = self.columns();
        let split = match self.split {
            Split::Dev => "dev",
            Split::Test => "test",
        };
        let shown = |c: &str, v: f64| {
            if c.ends_with("/perplexity") {
                num(v)
            } else {
                pct(v)
            }
        };
        let mut s = String::new();
        let _ = writeln!(
            s,
            "Search `{}`: scores on the **{split}** split.\n",
            self.search
        );
        let heads: Vec<String> = cols
            .iter()
            .map(|c| c.strip_suffix("/score").unwrap_or(c).to_string())
            .collect();
        let _ = writeln!(s, "| candidate | {} | mean |", heads.join(" | "));
        let _ = writeln!(s, "|---|{}---:|", "---:|".repeat(cols.len()));
        for r in &self.rows {
            let cells: Vec<String> = cols
                .iter()
                .map(|c| r.metrics.get(c).map_or("–".into(), |v| shown(c, *v)))
                .collect();
            let mean = match (&r.primary, &r.error) {
                (Some(p), _) => format!("**{}**", pct(*p)),
                (None, Some(_)) => "failed".into(),
                _ => "–".into(),
            };
            let _ = writeln!(s, "| {} | {} | {mean} |", r.name, cells.join(" | "));
        }
        let _ = writeln!(s, "\nAccuracy and fitness in %; perplexity as is.");
        for r in self.rows.iter().filter(|r| r.error.is_some()) {
            let _ = writeln!(
                s,
                "\n`{}` failed: {}",
                r.name,
                r.error.as_deref().unwrap_or("")
            );
        }
        if let Some(sum) = &self.summary {
            let _ = writeln!(s, "\n## The search\n");
            let _ = writeln!(
                s,
                "- best dev fitness: {}",
                sum.best_dev_fitness.map_or("–".into(), pct)
            );
            let _ = writeln!(
                s,
                "- evaluations: {} ({} failed{})",
                sum.evaluations,
                sum.failed,
                if sum.replayed > 0 {
                    format!(", {} answered from the history on resume", sum.replayed)
                } else {
                    String::new()
                }
            );
            let _ = writeln!(s, "- generations: {}", sum.generations);
            let _ = writeln!(s, "- wall time: {:.1} s", sum.wall_seconds);
            let what = if sum.result_file.ends_with(".yaml") {
                format!(
                    "mergekit YAML: `evomerge merge {} OUT` (or `mergekit-yaml`) builds it",
                    sum.result_file
                )
            } else {
                "the pool and the route through it".to_string()
            };
            let _ = writeln!(s, "- result: `{}` ({what})", sum.result_file);
        }
        s
    }
}

/// A fraction in percent with one decimal, as `evomerge eval` shows it.
fn pct(v: f64) -> String {
    format!("{:.1}", v * 100.0)
}

/// Three decimals, or three significant digits in scientific notation for very small or large
/// magnitudes (distances, perplexities).
fn num(v: f64) -> String {
    let a = v.abs();
    if v == 0.0 || (1e-2..1e4).contains(&a) {
        format!("{v:.3}")
    } else {
        format!("{v:.3e}")
    }
}

/// The report of a finished search, from what it returned: its test-split rows and its own
/// summary. `None` when the search scored no rows ([`RunOptions::report`] off, or interrupted).
pub fn from_run(summary: &RunSummary) -> Option<Report> {
    let rows = summary.test_rows.clone()?;
    Some(Report {
        search: summary.search.clone(),
        split: Split::Test,
        rows,
        summary: Some(SearchSummary {
            best_dev_fitness: summary.best.fitness,
            evaluations: summary.evaluated + summary.replayed,
            failed: summary.failures,
            replayed: summary.replayed,
            generations: summary.generations,
            wall_seconds: summary.loop_seconds,
            result_file: summary.result_file.clone().unwrap_or_default(),
        }),
    })
}

/// What runs after a finished search in its output directory ([`RunOptions::finish`], installed
/// by [`crate::pipeline`]): `report.json` and `report.md` when the search scored its rows, then
/// the plots when [`RunOptions::plots`].
pub fn after_search(out_dir: &Path, summary: &RunSummary, options: &RunOptions) -> Result<()> {
    if let Some(report) = from_run(summary) {
        save(out_dir, &report)?;
    }
    if options.plots {
        plots::plot(out_dir)?;
    }
    Ok(())
}

/// Write `report.json` and `report.md` into `out_dir`, each atomically
/// ([`crate::store::writer::write_atomic`]: a kill leaves the old file or the new one).
pub fn save(out_dir: &Path, report: &Report) -> Result<()> {
    let json = out_dir.join(REPORT_JSON);
    let text = serde_json::to_string_pretty(report)
        .map_err(|e| Error::Search(format!("cannot encode the report: {e}")))?;
    write_atomic(&json, text.as_bytes())?;
    write_atomic(&out_dir.join(REPORT_MD), report.markdown().as_bytes())
}

/// Read `out_dir/report.json`.
///
/// A directory without one is an error that says why: it does not exist, it is not a search's
/// output directory, or its search has not finished (then `evomerge resume DIR` finishes it).
pub fn load(out_dir: &Path) -> Result<Report> {
    let path = out_dir.join(REPORT_JSON);
    if !path.exists() {
        let dir = out_dir.display();
        let history = out_dir.join(crate::search::history::HISTORY_FILE);
        return Err(Error::Search(if !out_dir.is_dir() {
            format!("{dir}: no such directory (expected a search's output directory)")
        } else if history.exists() || out_dir.join("search.toml").exists() {
            format!(
                "{dir}: the search has not finished (no {REPORT_JSON} yet); run `evomerge \
                 resume {dir}` to finish it and write the report"
            )
        } else {
            format!(
                "{dir}: not a search's output directory (no {REPORT_JSON}, no {})",
                crate::search::history::HISTORY_FILE
            )
        }));
    }
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::Config {
        path,
        msg: e.to_string(),
    })
}

/// The Markdown table of a finished search (what `evomerge report OUT_DIR` prints).
pub fn report(out_dir: &Path) -> Result<String> {
    Ok(load(out_dir)?.markdown())
}

/// One table from several finished searches (e.g. toy-ps, toy-dfs, toy-ps-dfs): every row of
/// the first report, then the rows of the others whose names are new. The columns are the
/// union of all.
pub fn combined(out_dirs: &[&Path]) -> Result<String> {
    let mut all: Option<Report> = None;
    for dir in out_dirs {
        let r = load(dir)?;
        match all.as_mut() {
            None => all = Some(r),
            Some(a) => {
                a.search = format!("{} + {}", a.search, r.search);
                for row in r.rows {
                    if !a.rows.iter().any(|x| x.name == row.name) {
                        a.rows.push(row);
                    }
                }
            }
        }
    }
    all.map(|r| r.markdown())
        .ok_or_else(|| Error::Search("no output directory given".into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn markdown_table_has_one_column_per_task() {
        let row = |name: &str, a: f64, b: f64| ScoredRow {
            name: name.into(),
            primary: Some((a + b) / 2.0),
            metrics: BTreeMap::from([
                ("add/exact_match".to_string(), a),
                ("add/score".to_string(), a),
                ("cipher/score".to_string(), b),
            ]),
            dev_fitness: None,
            error: None,
            seconds: 0.1,
        };
        let mut failed = row("broken", 0.0, 0.0);
        failed.primary = None;
        failed.metrics.clear();
        failed.error = Some("missing tensor".into());
        let r = Report {
            search: "toy".into(),
            split: Split::Test,
            rows: vec![row("add", 0.9, 0.1), row("evolved", 0.8, 0.7), failed],
            summary: None,
        };
        let md = r.markdown();
        assert!(md.contains("| candidate | add | cipher | mean |"), "{md}");
        assert!(md.contains("| evolved | 80.0 | 70.0 | **75.0** |"), "{md}");
        assert!(md.contains("| broken | – | – | failed |"), "{md}");
        assert!(md.contains("`broken` failed: missing tensor"), "{md}");
        let dir = tempfile::tempdir().unwrap();
        save(dir.path(), &r).unwrap();
        assert_eq!(load(dir.path()).unwrap(), r);
        assert_eq!(report(dir.path()).unwrap(), md);

        let other = tempfile::tempdir().unwrap();
        let mut r2 = r.clone();
        r2.search = "dfs".into();
        r2.rows = vec![row("add", 0.0, 0.0), row("evolved (DFS)", 0.5, 0.5)];
        save(other.path(), &r2).unwrap();
        let both = combined(&[dir.path(), other.path()]).unwrap();
        assert!(both.contains("Search `toy + dfs`"), "{both}");
        assert!(
            both.contains("| add | 90.0 |"),
            "first report's row kept: {both}"
        );
        assert!(
            both.contains("| evolved (DFS) | 50.0 | 50.0 | **50.0** |"),
            "{both}"
        );
    }

    #[test]
    fn report_shows_percentages_like_eval_and_the_search_summary() {
        let r = Report {
            search: "toy".into(),
            split: Split::Test,
            rows: vec![ScoredRow {
                name: "evolved (PS)".into(),
                primary: Some(0.6125),
                metrics: BTreeMap::from([
                    ("add/score".to_string(), 0.257),
                    ("wiki/perplexity".to_string(), 12.5),
                ]),
                dev_fitness: Some(0.698),
                error: None,
                seconds: 1.0,
            }],
            summary: Some(SearchSummary {
                best_dev_fitness: Some(0.698),
                evaluations: 240,
                failed: 3,
                replayed: 0,
                generations: 30,
                wall_seconds: 36.04,
                result_file: "best_recipe.yaml".into(),
            }),
        };
        let md = r.markdown();
        // `/score` columns only (add), in %; the mean (fitness) in %.
        assert!(md.contains("| evolved (PS) | 25.7 | **61.3** |"), "{md}");
        assert!(
            md.contains("Accuracy and fitness in %; perplexity as is."),
            "{md}"
        );
        assert!(md.contains("- best dev fitness: 69.8"), "{md}");
        assert!(md.contains("- evaluations: 240 (3 failed)"), "{md}");
        assert!(md.contains("- generations: 30"), "{md}");
        assert!(md.contains("- wall time: 36.0 s"), "{md}");
        assert!(md.contains("- result: `best_recipe.yaml`"), "{md}");
        let mut ppl = r.clone();
        ppl.rows[0].metrics.remove("add/score");
        ppl.summary = None;
        let md = ppl.markdown();
        assert!(md.contains("| evolved (PS) | 12.500 | **61.3** |"), "{md}");
        assert!(!md.contains("## The search"), "{md}");
    }
}
