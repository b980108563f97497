//! Evaluation tables: score labelled candidates on both splits and render a Markdown table
//! (rows = models, columns = metric × split), as `evomerge eval` and the search report print.
//!
//! ```no_run
//! # use evomerge::eval::{Split, lm::LmEvaluator, table::EvalTable};
//! # fn demo(eval: &LmEvaluator, candidates: &[(String, evomerge::candidate::Candidate)]) {
//! let table = EvalTable::score(eval, candidates, &eval.metric_keys(), &[Split::Dev, Split::Test]);
//! print!("{}", table.to_markdown());
//! # }
//! ```
//!
//! Accuracy-like metrics are shown as percentages with one decimal; metrics whose name ends in
//! `/perplexity` are shown as they are. The pseudo-metric [`PRIMARY`] is the evaluator's fitness.
//! A candidate that fails to evaluate gets `error` cells and a footnote with the message, so one
//! broken model does not hide the others.

use std::fmt::Write as _;

use crate::candidate::Candidate;
use crate::eval::{Evaluator, Split};

/// The column name that selects [`crate::eval::Score::primary`].
pub const PRIMARY: &str = "primary";

/// One column: a metric on a split.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Column {
    pub metric: String,
    pub split: Split,
}

impl Column {
    fn is_percent(&self) -> bool {
        !self.metric.ends_with("/perplexity")
    }

    fn header(&self) -> String {
        let split = self.split.name();
        let name = if self.metric == PRIMARY {
            "fitness".to_string()
        } else {
            match self.metric.split_once('/') {
                Some((task, "perplexity")) => format!("{task} ppl"),
                Some((task, _)) => task.to_string(),
                None => self.metric.clone(),
            }
        };
        format!("{name} {split}")
    }
}

/// One row: a labelled candidate's values (aligned with the table's columns; `None` where the
/// metric is missing or the evaluation failed) and its errors.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    pub label: String,
    pub values: Vec<Option<f64>>,
    pub errors: Vec<String>,
}

/// Scores of several candidates on several metrics and splits.
#[derive(Clone, Debug, PartialEq)]
pub struct EvalTable {
    pub columns: Vec<Column>,
    pub rows: Vec<Row>,
}

impl EvalTable {
    /// Evaluate every candidate once per split and collect `metrics` (grouped by metric, then
    /// split). Candidates are scored one after another (each evaluation is parallel inside).
    pub fn score(
        evaluator: &dyn Evaluator,
        candidates: &[(String, Candidate)],
        metrics: &[String],
        splits: &[Split],
    ) -> EvalTable {
        let columns: Vec<Column> = metrics
            .iter()
            .flat_map(|m| {
                splits.iter().map(move |&split| Column {
                    metric: m.clone(),
                    split,
                })
            })
            .collect();
        let rows = candidates
            .iter()
            .map(|(label, candidate)| {
                let mut values = vec![None; columns.len()];
                let mut errors = Vec::new();
                for &split in splits {
                    match evaluator.evaluate(candidate, split) {
                        Ok(score) => {
                            for (v, col) in values.iter_mut().zip(&columns) {
                                if col.split == split {
                                    *v = if col.metric == PRIMARY {
                                        Some(score.primary)
                                    } else {
                                        score.metrics.get(&col.metric).copied()
                                    };
                                }
                            }
                        }
                        Err(e) => errors.push(format!("{split}: {e}")),
                    }
                }
                Row {
                    label: label.clone(),
                    values,
                    errors,
                }
            })
            .collect();
        EvalTable { columns, rows }
    }

    /// The value of `metric` on `split` for the row labelled `label`.
    pub fn value(&self, label: &str, metric: &str, split: Split) -> Option<f64> {
        let col = self
            .columns
            .iter()
            .position(|c| c.metric == metric && c.split == split)?;
        self.rows.iter().find(|r| r.label == label)?.values[col]
    }

    /// The table in GitHub Markdown, with a legend line and footnotes for failed evaluations.
    pub fn to_markdown(&self) -> String {
        let mut header = vec!["model".to_string()];
        header.extend(self.columns.iter().map(Column::header));
        let body: Vec<Vec<String>> = self
            .rows
            .iter()
            .enumerate()
            .map(|(i, row)| {
                let mut cells = vec![if row.errors.is_empty() {
                    row.label.clone()
                } else {
                    format!("{} [{}]", row.label, i + 1)
                }];
                for (v, col) in row.values.iter().zip(&self.columns) {
                    cells.push(match v {
                        Some(x) if col.is_percent() => format!("{:.1}", x * 100.0),
                        Some(x) => format!("{x:.3}"),
                        None if row.errors.is_empty() => "—".to_string(),
                        None => "error".to_string(),
                    });
                }
                cells
            })
            .collect();
        let widths: Vec<usize> = (0..header.len())
            .map(|c| {
                std::iter::once(&header[c])
                    .chain(body.iter().map(|r| &r[c]))
                    .map(|s| s.chars().count())
                    .max()
                    .unwrap_or(0)
                    .max(3)
            })
            .collect();
        let line = |cells: &[String]| {
            let mut s = String::from("|");
            for (c, (cell, w)) in cells.iter().zip(&widths).enumerate() {
                let pad = w - cell.chars().count();
                if c == 0 {
                    let _ = write!(s, " {cell}{} |", " ".repeat(pad));
                } else {
                    let _ = write!(s, " {}{cell} |", " ".repeat(pad));
                }
            }
            s.push('\n');
            s
        };
        let mut out = line(&header);
        out.push('|');
        for (c, w) in widths.iter().enumerate() {
            if c == 0 {
                let _ = write!(out, " {} |", "-".repeat(*w));
            } else {
                let _ = write!(out, " {}: |", "-".repeat(w - 1));
            }
        }
        out.push('\n');
        for cells in &body {
            out.push_str(&line(cells));
        }
        out.push_str("\nAccuracy and fitness in %; perplexity as is.\n");
        for (i, row) in self.rows.iter().enumerate() {
            if !row.errors.is_empty() {
                let _ = writeln!(
                    out,
                    "\n[{}] {}: {}",
                    i + 1,
                    row.label,
                    row.errors.join("; ")
                );
            }
        }
        out
    }
}

impl std::fmt::Display for EvalTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_markdown())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use super::*;
    use crate::candidate::{CandidateBody, MemModel};
    use crate::eval::{EvalError, Score};

    /// Scores `add` = 0.5 (dev) / 0.25 (test), `text/perplexity` = 3.5; fails on a model with
    /// no tensors.
    struct Fixed;

    impl Evaluator for Fixed {
        fn name(&self) -> &str {
            "fixed"
        }
        fn evaluate(&self, c: &Candidate, split: Split) -> Result<Score, EvalError> {
            let CandidateBody::Merged(m) = &c.body else {
                unreachable!()
            };
            if m.tensors.is_empty() {
                return Err(EvalError::Candidate("no tensors".into()));
            }
            let add = if split == Split::Dev { 0.5 } else { 0.25 };
            Ok(Score {
                primary: add,
                metrics: BTreeMap::from([
                    ("add/exact_match".to_string(), add),
                    ("text/perplexity".to_string(), 3.5),
                ]),
            })
        }
    }

    #[test]
    fn renders_percentages_perplexity_and_errors() {
        let model = |n: usize| Candidate {
            body: CandidateBody::Merged(Arc::new(MemModel {
                config: serde_json::json!({}),
                tensors: (0..n)
                    .map(|i| {
                        (
                            format!("t{i}"),
                            crate::tensor::TensorBuf::new(vec![1], vec![0.0]),
                        )
                    })
                    .collect(),
            })),
            recipe: None,
        };
        let candidates = vec![
            ("base".to_string(), model(1)),
            ("broken".to_string(), model(0)),
        ];
        let metrics = [
            "add/exact_match".to_string(),
            "text/perplexity".to_string(),
            PRIMARY.to_string(),
        ];
        let t = EvalTable::score(&Fixed, &candidates, &metrics, &[Split::Dev, Split::Test]);
        assert_eq!(t.value("base", "add/exact_match", Split::Test), Some(0.25));
        assert_eq!(t.value("broken", "add/exact_match", Split::Dev), None);
        let md = t.to_markdown();
        let expected = "\
| model      | add dev | add test | text ppl dev | text ppl test | fitness dev | fitness test |
| ---------- | ------: | -------: | -----------: | ------------: | ----------: | -----------: |
| base       |    50.0 |     25.0 |        3.500 |         3.500 |        50.0 |         25.0 |
| broken [2] |   error |    error |        error |         error |       error |        error |

Accuracy and fitness in %; perplexity as is.

[2] broken: dev: candidate failed: no tensors; test: candidate failed: no tensors
";
        assert_eq!(md, expected, "got:\n{md}");
    }
}
