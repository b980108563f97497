//! Held-out task files for the LM evaluator.
//!
//! A task is a directory with one JSONL file per split: `<dir>/dev.jsonl` scores candidates
//! during a search, `<dir>/test.jsonl` is kept for the final report, and `<dir>/train.jsonl`
//! (optional) is read only for few-shot examples. One example per line; blank lines are
//! skipped. The line format depends on the task's [`Metric`]:
//!
//! | metric            | line                                                      |
//! |-------------------|-----------------------------------------------------------|
//! | `exact_match`     | `{"prompt": "37+45=", "target": "82"}`                    |
//! | `multiple_choice` | `{"prompt": "2+2=", "choices": ["3", "4"], "answer": 1}`  |
//! | `perplexity`      | `{"text": "any text"}`                                    |
//!
//! A [`TaskSpec`] (embedded in a search TOML, hence `deny_unknown_fields`) names the directory,
//! metric, weight and options; [`Task::load`] validates the options, reads both splits once (so
//! a search does not re-read files for every candidate) and draws the few-shot examples. Errors
//! name the file and the 1-based line.
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
//!
//! # Options
//!
//! | option | metrics | default | meaning |
//! |---|---|---|---|
//! | `weight` | all | 1 | weight of the task score in the fitness (a weighted mean) |
//! | `limit` | all | none | score only the first N examples of each split |
//! | `batch_size` | all | the evaluator's | sequences per forward for this task |
//! | `max_new_tokens` | exact_match | 32 | generation budget |
//! | `stop` | exact_match | `"\n"` | generation stops at this string (cut off); `""` = only at EOS / budget |
//! | `answer_regex` | exact_match | none | extract the answer from the output (below) |
//! | `answer_group_select` | exact_match | 0 (`last_number`: −1) | which match of `answer_regex`: 0 = first, −1 = last |
//! | `fewshot` | exact_match, multiple_choice | 0 | prefix k solved examples from `train.jsonl` |
//! | `fewshot_seed` | exact_match, multiple_choice | from the task name | seed of the draw |
//! | `fewshot_separator` | exact_match, multiple_choice | `"\n\n"` | between shots, and between the last shot and the prompt |
//! | `chat_template` | exact_match, multiple_choice | false | render the prompt through the model's chat template |
//! | `mc_score` | multiple_choice | `acc` | the task score: `acc` or `acc_norm` |
//! | `score_transform` | perplexity | `byte_probability` | the task score: `byte_probability` or `token_probability` |
//!
//! **Few-shot.** `fewshot = k` draws k distinct examples of `train.jsonl` (all of it, `limit`
//! does not apply) with a fixed generator seeded by `fewshot_seed`, or by a hash of the task
//! name. One draw per task: every example of both splits sees the same shots, in the same order,
//! so scores of different candidates (and of dev and test) are comparable and the shared prefix
//! can be cached. (lm-evaluation-harness draws per example with a fixed seed; the average is
//! the same in expectation.) A shot is `prompt + target` (multiple choice: `prompt` + the correct
//! choice); shots are joined by `fewshot_separator`, which also ends the last one before the
//! example's prompt. A missing `train.jsonl`, or one with fewer than k examples, is an error.
//! With `chat_template = true` the shots become alternating user / assistant turns instead
//! (lm-evaluation-harness's `--fewshot_as_multiturn`).
//!
//! **Answer extraction.** Without `answer_regex` an output is correct when it equals the target,
//! both trimmed. With it, the regex ([`fancy_regex`] syntax, Python-like) is searched in the
//! output: the match at index `answer_group_select` (0 = first, −1 = last, like
//! lm-evaluation-harness's `regex` filter) gives the answer — its first non-empty capture group,
//! or the whole match when the regex has no groups. No match is wrong. The answer and the target
//! are then compared after [`normalize_answer`]: trimmed, and a number loses `,` and `$` and a
//! final `.` (`"1,234."` = `"1234"`). GSM8K's format is `answer_regex = "#### (\\-?[0-9\\.\\,]+)"`;
//! the shorthand `answer_regex = "last_number"` is [`LAST_NUMBER`] with `answer_group_select = -1`
//! (the last number in the output).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::eval::Split;

/// How a task is scored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// Greedy generation compared with the target (see the module docs for `answer_regex`);
    /// score = accuracy.
    ExactMatch,
    /// The choice with the highest log-likelihood given the prompt (summed, or per character
    /// for `acc_norm`); score = accuracy ([`McScore`]).
    MultipleChoice,
    /// Log-likelihood of the texts: perplexity, NLL per token, bits per byte; score per
    /// [`ScoreTransform`].
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

/// Which accuracy is a multiple-choice task's score (both are always reported).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum McScore {
    /// The argmax of the summed log-likelihood of the choice's tokens.
    #[default]
    Acc,
    /// The argmax of the log-likelihood divided by the choice's length in characters (Unicode
    /// scalar values, as lm-evaluation-harness's `len(choice)`; bytes for ASCII).
    AccNorm,
}

impl McScore {
    fn is_default(&self) -> bool {
        *self == McScore::Acc
    }
}

/// How a perplexity task's pooled log-likelihood becomes its score, a number in (0, 1] that
/// rises as the model gets better, so it can be averaged with accuracies.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScoreTransform {
    /// `2^(−bits_per_byte)`: the geometric-mean probability of a byte of text. Independent of
    /// the tokenizer; around 0.4–0.6 for a fair LM on English prose.
    #[default]
    ByteProbability,
    /// `1 / perplexity = exp(−nll)`: the geometric-mean probability of a token (small for
    /// large vocabularies: perplexity 20 reads as 0.05).
    TokenProbability,
}

impl ScoreTransform {
    fn is_default(&self) -> bool {
        *self == ScoreTransform::ByteProbability
    }
}

/// The `answer_regex` shorthand `last_number`: an optionally signed number with optional
/// thousands separators and decimals.
pub const LAST_NUMBER: &str = r"-?[0-9][0-9,]*(?:\.[0-9]+)?";

fn default_weight() -> f64 {
    1.0
}

fn default_max_new_tokens() -> usize {
    32
}

fn default_stop() -> String {
    "\n".to_string()
}

fn default_fewshot_separator() -> String {
    "\n\n".to_string()
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

fn is_false(b: &bool) -> bool {
    !*b
}

fn is_default_separator(s: &str) -> bool {
    s == "\n\n"
}

/// One task as configured in a search definition (see the module docs for the options).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskSpec {
    /// Short name, used in metric keys (`<name>/<metric>`) and table columns.
    pub name: String,
    /// The directory holding `dev.jsonl` and `test.jsonl` (and `train.jsonl` for few-shot).
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
    /// Sequences per forward for this task; default the evaluator's `batch_size`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_size: Option<usize>,
    /// Number of solved `train.jsonl` examples prefixed to every prompt. Default 0.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub fewshot: usize,
    /// Seed of the few-shot draw; default a hash of `name`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fewshot_seed: Option<u64>,
    /// Between shots, and between the last shot and the prompt. Default `"\n\n"`.
    #[serde(
        default = "default_fewshot_separator",
        skip_serializing_if = "is_default_separator"
    )]
    pub fewshot_separator: String,
    /// Render prompts (and shots) through the model's chat template. Default false.
    #[serde(default, skip_serializing_if = "is_false")]
    pub chat_template: bool,
    /// `exact_match`: a regex whose selected match is the answer, or `"last_number"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answer_regex: Option<String>,
    /// `exact_match`: which match of `answer_regex` (0 = first, −1 = last). Default 0, or −1
    /// for `last_number`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answer_group_select: Option<i64>,
    /// `multiple_choice`: which accuracy is the task score. Default `acc`.
    #[serde(default, skip_serializing_if = "McScore::is_default")]
    pub mc_score: McScore,
    /// `perplexity`: how the log-likelihood becomes the task score. Default `byte_probability`.
    #[serde(default, skip_serializing_if = "ScoreTransform::is_default")]
    pub score_transform: ScoreTransform,
}

impl TaskSpec {
    /// A spec with the defaults (weight 1, 32 new tokens, stop at newline, no limit, no shots,
    /// no chat template, plain exact match, `acc`, `byte_probability`).
    pub fn new(name: impl Into<String>, path: impl Into<PathBuf>, metric: Metric) -> Self {
        TaskSpec {
            name: name.into(),
            path: path.into(),
            metric,
            weight: default_weight(),
            max_new_tokens: default_max_new_tokens(),
            stop: default_stop(),
            limit: None,
            batch_size: None,
            fewshot: 0,
            fewshot_seed: None,
            fewshot_separator: default_fewshot_separator(),
            chat_template: false,
            answer_regex: None,
            answer_group_select: None,
            mc_score: McScore::Acc,
            score_transform: ScoreTransform::ByteProbability,
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

    /// The file few-shot examples are drawn from.
    pub fn train_path(&self) -> PathBuf {
        self.path.join("train.jsonl")
    }

    /// Check the weight, the name, and that every option set applies to the metric. Returns
    /// the compiled answer filter, if any.
    fn validate(&self) -> Result<Option<AnswerFilter>> {
        let fail = |msg: String| Error::Config {
            path: self.path.clone(),
            msg: format!("task `{}`: {msg}", self.name),
        };
        if !(self.weight.is_finite() && self.weight >= 0.0) {
            return Err(fail(format!(
                "weight must be finite and >= 0, got {}",
                self.weight
            )));
        }
        if self.name.is_empty() || self.name.contains('/') {
            return Err(Error::Config {
                path: self.path.clone(),
                msg: format!(
                    "task name `{}` must be non-empty and contain no `/`",
                    self.name
                ),
            });
        }
        if self.batch_size == Some(0) {
            return Err(fail("batch_size must be at least 1".into()));
        }
        let only = |set: bool, option: &str, metrics: &[Metric]| -> Result<()> {
            if set && !metrics.contains(&self.metric) {
                let names: Vec<&str> = metrics.iter().map(|m| m.name()).collect();
                return Err(fail(format!(
                    "`{option}` applies to {} tasks, not `{}`",
                    names.join(" / "),
                    self.metric.name()
                )));
            }
            Ok(())
        };
        let prompted = [Metric::ExactMatch, Metric::MultipleChoice];
        only(self.fewshot > 0, "fewshot", &prompted)?;
        only(self.chat_template, "chat_template", &prompted)?;
        only(
            self.answer_regex.is_some(),
            "answer_regex",
            &[Metric::ExactMatch],
        )?;
        only(
            self.answer_group_select.is_some(),
            "answer_group_select",
            &[Metric::ExactMatch],
        )?;
        only(
            !self.mc_score.is_default(),
            "mc_score",
            &[Metric::MultipleChoice],
        )?;
        only(
            !self.score_transform.is_default(),
            "score_transform",
            &[Metric::Perplexity],
        )?;
        if self.answer_group_select.is_some() && self.answer_regex.is_none() {
            return Err(fail("`answer_group_select` needs `answer_regex`".into()));
        }
        self.answer_regex
            .as_deref()
            .map(|r| AnswerFilter::new(r, self.answer_group_select))
            .transpose()
            .map_err(|msg| fail(format!("answer_regex: {msg}")))
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
    /// Generate from `prompt`; correct when the output equals `target` (both trimmed), or per
    /// the task's `answer_regex` ([`Task::is_correct`]).
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

/// A solved example shown before the prompt (few-shot).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shot {
    pub prompt: String,
    /// The target, or the correct choice.
    pub target: String,
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
    Ok(parse_numbered(path, contents, metric, limit)?
        .into_iter()
        .map(|(_, e)| e)
        .collect())
}

/// [`parse_examples`] with each example's 1-based line number.
fn parse_numbered(
    path: &Path,
    contents: &str,
    metric: Metric,
    limit: Option<usize>,
) -> Result<Vec<(usize, Example)>> {
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
        out.push((i + 1, example));
    }
    if out.is_empty() {
        return Err(Error::Config {
            path: path.to_path_buf(),
            msg: "no examples".into(),
        });
    }
    Ok(out)
}

/// A task with both splits loaded and validated, and its few-shot examples drawn.
#[derive(Clone, Debug)]
pub struct Task {
    pub spec: TaskSpec,
    pub dev: Vec<Example>,
    pub test: Vec<Example>,
    /// The few-shot examples, in the order they are shown (`spec.fewshot` of them).
    pub shots: Vec<Shot>,
    answer: Option<AnswerFilter>,
    /// 1-based line numbers of the dev / test examples in their files; empty for tasks built
    /// in memory.
    lines: [Vec<usize>; 2],
}

impl Task {
    /// Read `dev.jsonl` and `test.jsonl` under `spec.path` (the first `spec.limit` examples of
    /// each) and, for `fewshot > 0`, draw the shots from `train.jsonl`. Fails on a bad option,
    /// a missing file, a malformed line, an empty split or too few train examples.
    pub fn load(spec: &TaskSpec) -> Result<Task> {
        let answer = spec.validate()?;
        let read = |path: PathBuf, limit: Option<usize>| -> Result<Vec<(usize, Example)>> {
            let contents = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
            parse_numbered(&path, &contents, spec.metric, limit)
        };
        let dev = read(spec.split_path(Split::Dev), spec.limit)?;
        let test = read(spec.split_path(Split::Test), spec.limit)?;
        let train = if spec.fewshot > 0 {
            let path = spec.train_path();
            if !path.is_file() {
                return Err(Error::Config {
                    path,
                    msg: format!(
                        "task `{}` asks for fewshot = {} but there is no train split",
                        spec.name, spec.fewshot
                    ),
                });
            }
            read(path, None)?.into_iter().map(|(_, e)| e).collect()
        } else {
            Vec::new()
        };
        let shots = draw_shots(spec, &train)?;
        let (dev_lines, dev) = dev.into_iter().unzip();
        let (test_lines, test) = test.into_iter().unzip();
        Ok(Task {
            spec: spec.clone(),
            dev,
            test,
            shots,
            answer,
            lines: [dev_lines, test_lines],
        })
    }

    /// A task built from examples in memory (tests, generated worlds). Every example must fit
    /// `spec.metric`; `spec.fewshot` must be 0 (see [`Task::from_examples_with_train`]).
    pub fn from_examples(spec: TaskSpec, dev: Vec<Example>, test: Vec<Example>) -> Result<Task> {
        Self::from_examples_with_train(spec, &[], dev, test)
    }

    /// [`Task::from_examples`] with few-shot examples drawn from `train`.
    pub fn from_examples_with_train(
        spec: TaskSpec,
        train: &[Example],
        dev: Vec<Example>,
        test: Vec<Example>,
    ) -> Result<Task> {
        let answer = spec.validate()?;
        let fits = |e: &Example| {
            matches!(
                (spec.metric, e),
                (Metric::ExactMatch, Example::Generation { .. })
                    | (Metric::MultipleChoice, Example::Choice { .. })
                    | (Metric::Perplexity, Example::Text { .. })
            )
        };
        if let Some(bad) = train.iter().chain(&dev).chain(&test).find(|e| !fits(e)) {
            return Err(Error::msg(format!(
                "task `{}`: example {bad:?} does not fit metric `{}`",
                spec.name,
                spec.metric.name()
            )));
        }
        let shots = draw_shots(&spec, train)?;
        Ok(Task {
            spec,
            dev,
            test,
            shots,
            answer,
            lines: [Vec::new(), Vec::new()],
        })
    }

    /// The examples of `split`.
    pub fn examples(&self, split: Split) -> &[Example] {
        match split {
            Split::Dev => &self.dev,
            Split::Test => &self.test,
        }
    }

    /// Where example `index` of `split` comes from, for messages: `<dir>/dev.jsonl: line 7`, or
    /// `dev example 3` for a task built in memory.
    pub fn location(&self, split: Split, index: usize) -> String {
        let lines = match split {
            Split::Dev => &self.lines[0],
            Split::Test => &self.lines[1],
        };
        match lines.get(index) {
            Some(line) => format!("{}: line {line}", self.spec.split_path(split).display()),
            None => format!("{} example {}", split.name(), index + 1),
        }
    }

    /// The answer filter of an `exact_match` task with `answer_regex`.
    pub fn answer_filter(&self) -> Option<&AnswerFilter> {
        self.answer.as_ref()
    }

    /// Whether a generated `output` answers `target`: trimmed equality, or, with
    /// `answer_regex`, the extracted answer equals the target after [`normalize_answer`].
    pub fn is_correct(&self, output: &str, target: &str) -> bool {
        match &self.answer {
            None => output.trim() == target.trim(),
            Some(filter) => filter
                .extract(output)
                .is_some_and(|a| normalize_answer(&a) == normalize_answer(target)),
        }
    }

    /// Key of this task's main metric: `<name>/<metric>`.
    pub fn metric_key(&self) -> String {
        format!("{}/{}", self.spec.name, self.spec.metric.name())
    }
}

/// Draw `spec.fewshot` shots from `train` (see the module docs).
fn draw_shots(spec: &TaskSpec, train: &[Example]) -> Result<Vec<Shot>> {
    let k = spec.fewshot;
    if k == 0 {
        return Ok(Vec::new());
    }
    if train.len() < k {
        return Err(Error::Config {
            path: spec.train_path(),
            msg: format!(
                "task `{}` asks for fewshot = {k} but the train split has {} example{}",
                spec.name,
                train.len(),
                if train.len() == 1 { "" } else { "s" }
            ),
        });
    }
    let seed = spec.fewshot_seed.unwrap_or_else(|| fnv1a(&spec.name));
    Ok(sample_indices(train.len(), k, seed)
        .into_iter()
        .filter_map(|i| match &train[i] {
            Example::Generation { prompt, target } => Some(Shot {
                prompt: prompt.clone(),
                target: target.clone(),
            }),
            Example::Choice {
                prompt,
                choices,
                answer,
            } => Some(Shot {
                prompt: prompt.clone(),
                target: choices[*answer].clone(),
            }),
            Example::Text { .. } => None,
        })
        .collect())
}

/// FNV-1a of a string: a seed that is stable across platforms and Rust versions.
pub(crate) fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// `k` distinct indices below `n`, by a partial Fisher–Yates shuffle driven by SplitMix64 (a
/// fixed algorithm, so a seed draws the same shots on every machine and version).
pub(crate) fn sample_indices(n: usize, k: usize, seed: u64) -> Vec<usize> {
    let mut state = seed;
    let mut next = move || {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    let mut idx: Vec<usize> = (0..n).collect();
    for i in 0..k.min(n) {
        // Multiply-shift maps a 64-bit draw onto 0..(n − i) with negligible bias.
        let span = (n - i) as u128;
        let j = i + ((u128::from(next()) * span) >> 64) as usize;
        idx.swap(i, j);
    }
    idx.truncate(k.min(n));
    idx
}

/// The answer of a generated output under `answer_regex` (see the module docs).
#[derive(Clone, Debug)]
pub struct AnswerFilter {
    regex: fancy_regex::Regex,
    group_select: i64,
}

impl AnswerFilter {
    /// Compile `pattern` (or the shorthand `last_number`); `group_select` defaults to 0, or −1
    /// for `last_number`. `Err` holds a message.
    pub fn new(pattern: &str, group_select: Option<i64>) -> std::result::Result<Self, String> {
        let (pattern, default_select) = match pattern {
            "last_number" => (LAST_NUMBER, -1),
            p => (p, 0),
        };
        let regex = fancy_regex::Regex::new(pattern).map_err(|e| format!("{pattern:?}: {e}"))?;
        Ok(AnswerFilter {
            regex,
            group_select: group_select.unwrap_or(default_select),
        })
    }

    /// The selected match's first non-empty capture group (or the whole match when the regex
    /// has no groups), trimmed; `None` when nothing matches or the selected match does not
    /// exist.
    pub fn extract(&self, output: &str) -> Option<String> {
        let mut matches: Vec<String> = Vec::new();
        for caps in self.regex.captures_iter(output) {
            let Ok(caps) = caps else {
                // Backtracking limit hit: treat as no further matches.
                break;
            };
            let text = if caps.len() > 1 {
                (1..caps.len())
                    .filter_map(|g| caps.get(g))
                    .map(|m| m.as_str())
                    .find(|s| !s.is_empty())
                    .unwrap_or("")
            } else {
                caps.get(0).map_or("", |m| m.as_str())
            };
            matches.push(text.to_string());
        }
        let n = matches.len() as i64;
        let at = if self.group_select < 0 {
            n + self.group_select
        } else {
            self.group_select
        };
        if !(0..n).contains(&at) {
            return None;
        }
        Some(matches.swap_remove(at as usize).trim().to_string())
    }
}

/// The form in which an extracted answer and its target are compared: trimmed; a number (after
/// dropping `,` and `$` and one final `.`) in that short form.
pub fn normalize_answer(s: &str) -> String {
    let s = s.trim();
    let stripped: String = s.chars().filter(|&c| c != ',' && c != '$').collect();
    let number = stripped.strip_suffix('.').unwrap_or(&stripped);
    if !number.is_empty() && number.parse::<f64>().is_ok() {
        number.to_string()
    } else {
        s.to_string()
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

    #[test]
    fn options_parse_and_defaults_are_not_serialized() {
        let spec: TaskSpec = toml::from_str(
            "name = \"g\"\npath = \"t\"\nmetric = \"exact_match\"\nfewshot = 3\n\
             fewshot_seed = 7\nfewshot_separator = \"\\n###\\n\"\nchat_template = true\n\
             answer_regex = \"last_number\"\nanswer_group_select = 0\nbatch_size = 4\n",
        )
        .unwrap();
        assert_eq!(
            (spec.fewshot, spec.fewshot_seed, spec.batch_size),
            (3, Some(7), Some(4))
        );
        assert_eq!(spec.fewshot_separator, "\n###\n");
        assert!(spec.chat_template);
        assert_eq!(spec.answer_group_select, Some(0));
        let mc: TaskSpec = toml::from_str(
            "name = \"m\"\npath = \"t\"\nmetric = \"multiple_choice\"\nmc_score = \"acc_norm\"\n",
        )
        .unwrap();
        assert_eq!(mc.mc_score, McScore::AccNorm);
        let ppl: TaskSpec = toml::from_str(
            "name = \"p\"\npath = \"t\"\nmetric = \"perplexity\"\n\
             score_transform = \"token_probability\"\n",
        )
        .unwrap();
        assert_eq!(ppl.score_transform, ScoreTransform::TokenProbability);
        // A spec with the defaults serializes without the new options.
        let text = toml::to_string(&TaskSpec::new("a", "t", Metric::ExactMatch)).unwrap();
        for key in [
            "fewshot",
            "chat_template",
            "answer_regex",
            "mc_score",
            "batch_size",
        ] {
            assert!(!text.contains(key), "{text}");
        }
        let back: TaskSpec = toml::from_str(&toml::to_string(&spec).unwrap()).unwrap();
        assert_eq!(back, spec);
    }

    #[test]
    fn options_must_fit_the_metric() {
        let dev = vec![Example::Text { text: "a".into() }];
        let check = |edit: &dyn Fn(&mut TaskSpec), metric: Metric, want: &str| {
            let mut spec = TaskSpec::new("t", "-", metric);
            edit(&mut spec);
            let e = Task::from_examples(spec, dev.clone(), dev.clone())
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{e}");
        };
        check(
            &|s| s.fewshot = 1,
            Metric::Perplexity,
            "`fewshot` applies to",
        );
        check(
            &|s| s.chat_template = true,
            Metric::Perplexity,
            "`chat_template`",
        );
        check(
            &|s| s.answer_regex = Some("x".into()),
            Metric::Perplexity,
            "`answer_regex` applies to exact_match",
        );
        check(
            &|s| s.mc_score = McScore::AccNorm,
            Metric::Perplexity,
            "`mc_score`",
        );
        check(
            &|s| s.batch_size = Some(0),
            Metric::Perplexity,
            "batch_size",
        );
        check(
            &|s| s.score_transform = ScoreTransform::TokenProbability,
            Metric::ExactMatch,
            "`score_transform`",
        );
        check(
            &|s| s.answer_group_select = Some(-1),
            Metric::ExactMatch,
            "needs `answer_regex`",
        );
        check(
            &|s| s.answer_regex = Some("(".into()),
            Metric::ExactMatch,
            "answer_regex: \"(\"",
        );
    }

    fn gx(prompt: &str, target: &str) -> Example {
        Example::Generation {
            prompt: prompt.into(),
            target: target.into(),
        }
    }

    #[test]
    fn fewshot_draws_distinct_train_examples_deterministically() {
        let train: Vec<Example> = (0..20)
            .map(|i| gx(&format!("q{i}"), &format!("a{i}")))
            .collect();
        let mut spec = TaskSpec::new("t", "-", Metric::ExactMatch);
        spec.fewshot = 5;
        let draw = |spec: &TaskSpec| {
            Task::from_examples_with_train(
                spec.clone(),
                &train,
                vec![gx("x", "y")],
                vec![gx("x", "y")],
            )
            .unwrap()
            .shots
        };
        let shots = draw(&spec);
        assert_eq!(shots.len(), 5);
        let mut prompts: Vec<&str> = shots.iter().map(|s| s.prompt.as_str()).collect();
        for s in &shots {
            assert_eq!(s.target, s.prompt.replace('q', "a"));
        }
        assert_eq!(draw(&spec), shots, "same spec, same shots");
        prompts.sort();
        prompts.dedup();
        assert_eq!(prompts.len(), 5, "distinct");
        let mut other = spec.clone();
        other.fewshot_seed = Some(12345);
        assert_ne!(draw(&other), shots);
        other.name = "u".into();
        other.fewshot_seed = None;
        assert_ne!(draw(&other), shots, "the seed follows the name");
        // Pinned: the generator is fixed (SplitMix64 + Fisher–Yates), so is the draw.
        assert_eq!(sample_indices(10, 3, 0), sample_indices(10, 3, 0));
        assert_eq!(sample_indices(4, 4, 9).iter().sum::<usize>(), 6);
        assert_eq!(fnv1a(""), 0xcbf2_9ce4_8422_2325);

        // Multiple choice: the shot shows the correct choice.
        let mut mc = TaskSpec::new("m", "-", Metric::MultipleChoice);
        mc.fewshot = 1;
        let ch = Example::Choice {
            prompt: "2+2=".into(),
            choices: vec!["3".into(), "4".into()],
            answer: 1,
        };
        let task = {
            let train = vec![ch.clone()];
            Task::from_examples_with_train(mc, &train, vec![ch.clone()], vec![ch]).unwrap()
        };
        assert_eq!(
            task.shots,
            vec![Shot {
                prompt: "2+2=".into(),
                target: "4".into()
            }]
        );
    }

    #[test]
    fn fewshot_needs_enough_train_examples() {
        let dir = tempfile::tempdir().unwrap();
        let line = "{\"prompt\":\"a\",\"target\":\"b\"}\n";
        for split in ["dev", "test"] {
            std::fs::write(dir.path().join(format!("{split}.jsonl")), line).unwrap();
        }
        let mut spec = TaskSpec::new("t", dir.path(), Metric::ExactMatch);
        spec.fewshot = 2;
        let e = Task::load(&spec).unwrap_err().to_string();
        assert!(
            e.contains("train.jsonl") && e.contains("no train split"),
            "{e}"
        );
        std::fs::write(dir.path().join("train.jsonl"), line).unwrap();
        let e = Task::load(&spec).unwrap_err().to_string();
        assert!(
            e.contains("fewshot = 2") && e.contains("has 1 example"),
            "{e}"
        );
        std::fs::write(dir.path().join("train.jsonl"), line.repeat(2)).unwrap();
        let task = Task::load(&spec).unwrap();
        assert_eq!(task.shots.len(), 2);
        assert_eq!(
            task.location(Split::Dev, 0),
            format!("{}: line 1", dir.path().join("dev.jsonl").display())
        );
        let e = Task::from_examples(spec, vec![gx("a", "b")], vec![gx("a", "b")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("has 0 examples"), "{e}");
    }

    #[test]
    fn answer_regex_selects_like_lm_eval() {
        let gsm = AnswerFilter::new(r"#### (\-?[0-9\.\,]+)", None).unwrap();
        assert_eq!(
            gsm.extract("so 3 + 4 = 7.\n#### 1,234\n#### 9").as_deref(),
            Some("1,234")
        );
        assert_eq!(gsm.extract("the answer is 7"), None);
        let last = AnswerFilter::new(r"#### (\-?[0-9\.\,]+)", Some(-1)).unwrap();
        assert_eq!(last.extract("#### 1\n#### 2").as_deref(), Some("2"));
        let out_of_range = AnswerFilter::new("x", Some(3)).unwrap();
        assert_eq!(out_of_range.extract("xx"), None);
        // No group: the whole match; several groups: the first non-empty one.
        let whole = AnswerFilter::new("[a-z]+", None).unwrap();
        assert_eq!(whole.extract("12 abc de").as_deref(), Some("abc"));
        let alt = AnswerFilter::new(r"(-?[$0-9.,]{2,})|(-?[0-9]+)", Some(-1)).unwrap();
        assert_eq!(alt.extract("5 apples, then 12 and 3").as_deref(), Some("3"));
        let num = AnswerFilter::new("last_number", None).unwrap();
        assert_eq!(
            num.extract("48/2 = 24, plus $1,000.50 is -1,024.5.")
                .as_deref(),
            Some("-1,024.5")
        );
        assert_eq!(num.extract("no digits"), None);
        let first_num = AnswerFilter::new("last_number", Some(0)).unwrap();
        assert_eq!(first_num.extract("48/2 = 24").as_deref(), Some("48"));

        assert_eq!(normalize_answer(" 1,234. "), "1234");
        assert_eq!(normalize_answer("$5"), "5");
        assert_eq!(normalize_answer("-1,024.5"), "-1024.5");
        assert_eq!(normalize_answer(" Paris. "), "Paris.");
        assert_eq!(normalize_answer(""), "");

        let mut spec = TaskSpec::new("g", "-", Metric::ExactMatch);
        spec.answer_regex = Some("last_number".into());
        let task = Task::from_examples(spec, vec![gx("q", "1234")], vec![gx("q", "1234")]).unwrap();
        assert!(task.is_correct("I think 12, no: 1,234.", "1234"));
        assert!(task.is_correct("1234", " 1,234 "));
        assert!(!task.is_correct("1234 or 5", "1234"));
        assert!(!task.is_correct("none", "1234"));
        let plain = Task::from_examples(
            TaskSpec::new("p", "-", Metric::ExactMatch),
            vec![gx("q", "7")],
            vec![gx("q", "7")],
        )
        .unwrap();
        assert!(plain.is_correct(" 7\n", "7"));
        assert!(!plain.is_correct("7.", "7"));
    }
}
