//! Held-out task files for the LM evaluator.
//!
//! A task is a directory with one JSONL file per split: `<dir>/dev.jsonl` scores candidates
//! during a search, `<dir>/test.jsonl` is kept for the final report (`train.jsonl` may sit beside
//! them and is never read here). One example per line; blank lines are skipped. The line format
//! depends on the task's [`Metric`]:
//!
//! | metric            | line                                                      |
//! |-------------------|-----------------------------------------------------------|
//! | `exact_match`     | `{"prompt": "37+45=", "target": "82"}`                    |
//! | `multiple_choice` | `{"prompt": "2+2=", "choices": ["3", "4"], "answer": 1}`  |
//! | `perplexity`      | `{"text": "any text"}`                                    |
//!
//! A [`TaskSpec`] (embedded in a search TOML, hence `deny_unknown_fields`) names the directory,
//! metric and weight; [`Task::load`] reads and validates both splits once, so a search does not
//! re-read files for every candidate. Errors name the file and the 1-based line.
//!
//! ```toml
//! [[evaluator.tasks]]
//! name = "add"
//! path = "assets/toy/tasks/add"
//! metric = "exact_match"
//! weight = 1.0
//! max_new_tokens = 8
//! stop = "\n"
//! limit = 200
//! ```

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::eval::Split;

/// How a task is scored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// Greedy generation compared with the target after trimming whitespace; score = accuracy.
    ExactMatch,
    /// The choice with the highest summed log-likelihood given the prompt; score = accuracy.
    MultipleChoice,
    /// Token-level perplexity of the texts; score = 1 / perplexity (the geometric-mean
    /// probability of a token, in (0, 1]).
    Perplexity,
}

impl Metric {
    /// The name used in metric keys (`<task>/<name>`) and task specs.
    pub fn name(self) -> &'static str {
        match self {
            Metric::ExactMatch => "exact_match",
            Metric::MultipleChoice => "multiple_choice",
            Metric::Perplexity => "perplexity",
        }
    }
}

fn default_weight() -> f64 {
    1.0
}

fn default_max_new_tokens() -> usize {
    32
}

fn default_stop() -> String {
    "\n".to_string()
}

/// One task as configured in a search definition.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskSpec {
    /// Short name, used in metric keys (`<name>/<metric>`) and table columns.
    pub name: String,
    /// The directory holding `dev.jsonl` and `test.jsonl`.
    pub path: PathBuf,
    /// How examples are scored.
    pub metric: Metric,
    /// Weight in the fitness (weighted mean of task scores). Default 1.
    #[serde(default = "default_weight")]
    pub weight: f64,
    /// Generation budget for `exact_match`. Default 32.
    #[serde(default = "default_max_new_tokens")]
    pub max_new_tokens: usize,
    /// Generation stops when the decoded output contains this string (which is cut off).
    /// Default `"\n"`; an empty string disables it (generation then stops at EOS or the budget).
    #[serde(default = "default_stop")]
    pub stop: String,
    /// Score only the first `limit` examples of each split.
    #[serde(default)]
    pub limit: Option<usize>,
}

impl TaskSpec {
    /// A spec with the defaults (weight 1, 32 new tokens, stop at newline, no limit).
    pub fn new(name: impl Into<String>, path: impl Into<PathBuf>, metric: Metric) -> Self {
        TaskSpec {
            name: name.into(),
            path: path.into(),
            metric,
            weight: default_weight(),
            max_new_tokens: default_max_new_tokens(),
            stop: default_stop(),
            limit: None,
        }
    }

    /// The same spec with a relative `path` resolved against `base` (e.g. the directory of the
    /// search file that embeds it).
    pub fn relative_to(&self, base: &Path) -> TaskSpec {
        let mut spec = self.clone();
        if spec.path.is_relative() {
            spec.path = base.join(&spec.path);
        }
        spec
    }

    /// The file holding `split`.
    pub fn split_path(&self, split: Split) -> PathBuf {
        self.path.join(format!("{}.jsonl", split.name()))
    }
}

/// A tasks file (`evomerge eval --tasks`, `evomerge fisher --tasks`): `[[tasks]]` entries of
/// [`TaskSpec`].
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TaskFile {
    tasks: Vec<TaskSpec>,
}

/// Load every task of a tasks file, paths relative to the file.
pub fn load_task_file(path: &Path) -> Result<Vec<Task>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let file: TaskFile = toml::from_str(&text).map_err(|e| Error::Config {
        path: path.to_path_buf(),
        msg: e.to_string(),
    })?;
    let base = path.parent().unwrap_or(Path::new("."));
    file.tasks
        .iter()
        .map(|t| Task::load(&t.relative_to(base)))
        .collect()
}

/// One example of a task.
#[derive(Clone, Debug, PartialEq)]
pub enum Example {
    /// Generate from `prompt`; correct when the output equals `target` (both trimmed).
    Generation { prompt: String, target: String },
    /// Pick one of `choices` as the continuation of `prompt`; `answer` is the correct index.
    Choice {
        prompt: String,
        choices: Vec<String>,
        answer: usize,
    },
    /// A text whose perplexity is measured.
    Text { text: String },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GenerationLine {
    prompt: String,
    target: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ChoiceLine {
    prompt: String,
    choices: Vec<String>,
    answer: usize,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TextLine {
    text: String,
}

/// Parse one JSONL line for `metric`. `Err` holds a message without the location.
fn parse_line(metric: Metric, line: &str) -> std::result::Result<Example, String> {
    let err = |e: serde_json::Error| e.to_string();
    match metric {
        Metric::ExactMatch => {
            let l: GenerationLine = serde_json::from_str(line).map_err(err)?;
            Ok(Example::Generation {
                prompt: l.prompt,
                target: l.target,
            })
        }
        Metric::MultipleChoice => {
            let l: ChoiceLine = serde_json::from_str(line).map_err(err)?;
            if l.choices.is_empty() {
                return Err("`choices` is empty".into());
            }
            if l.answer >= l.choices.len() {
                return Err(format!(
                    "`answer` is {} but there are only {} choices",
                    l.answer,
                    l.choices.len()
                ));
            }
            Ok(Example::Choice {
                prompt: l.prompt,
                choices: l.choices,
                answer: l.answer,
            })
        }
        Metric::Perplexity => {
            let l: TextLine = serde_json::from_str(line).map_err(err)?;
            if l.text.is_empty() {
                return Err("`text` is empty".into());
            }
            Ok(Example::Text { text: l.text })
        }
    }
}

/// Parse the examples of a JSONL file's contents; `path` is only used in error messages.
/// Stops after `limit` examples when given.
pub fn parse_examples(
    path: &Path,
    contents: &str,
    metric: Metric,
    limit: Option<usize>,
) -> Result<Vec<Example>> {
    let mut out = Vec::new();
    for (i, line) in contents.lines().enumerate() {
        if limit.is_some_and(|l| out.len() >= l) {
            break;
        }
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let example = parse_line(metric, line).map_err(|msg| Error::Config {
            path: path.to_path_buf(),
            msg: format!("line {}: {} example: {msg}", i + 1, metric.name()),
        })?;
        out.push(example);
    }
    if out.is_empty() {
        return Err(Error::Config {
            path: path.to_path_buf(),
            msg: "no examples".into(),
        });
    }
    Ok(out)
}

/// A task with both splits loaded and validated.
#[derive(Clone, Debug)]
pub struct Task {
    pub spec: TaskSpec,
    pub dev: Vec<Example>,
    pub test: Vec<Example>,
}

impl Task {
    /// Read `dev.jsonl` and `test.jsonl` under `spec.path` (the first `spec.limit` examples of
    /// each). Fails on a missing file, a malformed line, an empty split or a bad weight.
    pub fn load(spec: &TaskSpec) -> Result<Task> {
        if !(spec.weight.is_finite() && spec.weight >= 0.0) {
            return Err(Error::Config {
                path: spec.path.clone(),
                msg: format!(
                    "task `{}`: weight must be finite and >= 0, got {}",
                    spec.name, spec.weight
                ),
            });
        }
        if spec.name.is_empty() || spec.name.contains('/') {
            return Err(Error::Config {
                path: spec.path.clone(),
                msg: format!(
                    "task name `{}` must be non-empty and contain no `/`",
                    spec.name
                ),
            });
        }
        let read = |split: Split| -> Result<Vec<Example>> {
            let path = spec.split_path(split);
            let contents = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
            parse_examples(&path, &contents, spec.metric, spec.limit)
        };
        Ok(Task {
            spec: spec.clone(),
            dev: read(Split::Dev)?,
            test: read(Split::Test)?,
        })
    }

    /// A task built from examples in memory (tests, generated worlds). Every example must fit
    /// `spec.metric`.
    pub fn from_examples(spec: TaskSpec, dev: Vec<Example>, test: Vec<Example>) -> Result<Task> {
        let fits = |e: &Example| {
            matches!(
                (spec.metric, e),
                (Metric::ExactMatch, Example::Generation { .. })
                    | (Metric::MultipleChoice, Example::Choice { .. })
                    | (Metric::Perplexity, Example::Text { .. })
            )
        };
        if let Some(bad) = dev.iter().chain(&test).find(|e| !fits(e)) {
            return Err(Error::msg(format!(
                "task `{}`: example {bad:?} does not fit metric `{}`",
                spec.name,
                spec.metric.name()
            )));
        }
        Ok(Task { spec, dev, test })
    }

    /// The examples of `split`.
    pub fn examples(&self, split: Split) -> &[Example] {
        match split {
            Split::Dev => &self.dev,
            Split::Test => &self.test,
        }
    }

    /// Key of this task's main metric: `<name>/<metric>`.
    pub fn metric_key(&self) -> String {
        format!("{}/{}", self.spec.name, self.spec.metric.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_each_metric_and_skips_blank_lines() {
        let p = Path::new("t/dev.jsonl");
        let ex = parse_examples(
            p,
            "{\"prompt\":\"1+1=\",\"target\":\"2\"}\n\n{\"prompt\":\"a\",\"target\":\"b\"}\n",
            Metric::ExactMatch,
            None,
        )
        .unwrap();
        assert_eq!(
            ex,
            vec![
                Example::Generation {
                    prompt: "1+1=".into(),
                    target: "2".into()
                },
                Example::Generation {
                    prompt: "a".into(),
                    target: "b".into()
                }
            ]
        );
        let ex = parse_examples(
            p,
            r#"{"prompt":"q","choices":["x","y"],"answer":1}"#,
            Metric::MultipleChoice,
            None,
        )
        .unwrap();
        assert_eq!(
            ex[0],
            Example::Choice {
                prompt: "q".into(),
                choices: vec!["x".into(), "y".into()],
                answer: 1
            }
        );
        let ex = parse_examples(p, r#"{"text":"abc"}"#, Metric::Perplexity, None).unwrap();
        assert_eq!(ex[0], Example::Text { text: "abc".into() });
    }

    #[test]
    fn limit_keeps_the_first_examples() {
        let lines = (0..5)
            .map(|i| format!("{{\"text\":\"t{i}\"}}"))
            .collect::<Vec<_>>()
            .join("\n");
        let ex = parse_examples(Path::new("x"), &lines, Metric::Perplexity, Some(2)).unwrap();
        assert_eq!(
            ex,
            vec![
                Example::Text { text: "t0".into() },
                Example::Text { text: "t1".into() }
            ]
        );
    }

    #[test]
    fn errors_name_file_and_line() {
        let p = Path::new("tasks/add/dev.jsonl");
        let e = parse_examples(
            p,
            "{\"prompt\":\"a\",\"target\":\"b\"}\n{\"prompt\":\"a\"}\n",
            Metric::ExactMatch,
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("tasks/add/dev.jsonl: line 2:"), "{e}");
        assert!(e.contains("target"), "{e}");

        let e = parse_examples(
            p,
            r#"{"prompt":"q","choices":["x"],"answer":3}"#,
            Metric::MultipleChoice,
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("line 1") && e.contains("only 1 choices"), "{e}");

        let e = parse_examples(p, r#"{"text":"a","extra":1}"#, Metric::Perplexity, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `extra`"), "{e}");

        let e = parse_examples(p, "\n\n", Metric::Perplexity, None)
            .unwrap_err()
            .to_string();
        assert_eq!(e, "tasks/add/dev.jsonl: no examples");
    }

    #[test]
    fn spec_defaults_and_unknown_fields() {
        let spec: TaskSpec =
            toml::from_str("name = \"add\"\npath = \"t/add\"\nmetric = \"exact_match\"\n").unwrap();
        assert_eq!(spec, TaskSpec::new("add", "t/add", Metric::ExactMatch));
        assert_eq!(spec.stop, "\n");
        assert_eq!(spec.weight, 1.0);
        let bad = toml::from_str::<TaskSpec>(
            "name = \"add\"\npath = \"t\"\nmetric = \"exact_match\"\nstop_string = \"x\"\n",
        );
        assert!(bad.unwrap_err().to_string().contains("unknown field"));
        let bad = toml::from_str::<TaskSpec>("name = \"a\"\npath = \"t\"\nmetric = \"bleu\"\n");
        assert!(bad.is_err());
        assert_eq!(
            spec.relative_to(Path::new("/s")).split_path(Split::Test),
            Path::new("/s/t/add/test.jsonl")
        );
    }
}
