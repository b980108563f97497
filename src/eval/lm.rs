//! The LM evaluator: scores a causal language model on held-out task files.
//!
//! ```no_run
//! # use std::sync::Arc;
//! # use evomerge::eval::{Evaluator, Split, lm::{LmConfig, LmEvaluator}, tasks::{Metric, Task, TaskSpec}};
//! # fn demo(tokenizer: Arc<dyn evomerge::tokenizer::TextTokenizer>, candidate: evomerge::candidate::Candidate) -> evomerge::Result<()> {
//! let add = Task::load(&TaskSpec::new("add", "assets/toy/tasks/add", Metric::ExactMatch))?;
//! let eval = LmEvaluator::try_new(vec![add], tokenizer, LmConfig::default())?;
//! let score = eval.evaluate(&candidate, Split::Dev).unwrap();
//! println!("{} {:?}", score.primary, score.metrics);
//! # Ok(()) }
//! ```
//!
//! For each evaluation the model is built once from the candidate (through a [`ModelBuilder`],
//! by default [`crate::model::build`], which builds merged candidates from memory: nothing is
//! written to disk), then every task is scored.
//!
//! # The context
//!
//! An example's context is its prompt, after the task's few-shot examples joined by
//! `fewshot_separator` (see [`crate::eval::tasks`]); [`render_prompt`] builds it. It is
//! tokenized as one string, the way the model's tokenizer encodes an input: the BOS goes first
//! only when the tokenizer adds one ([`TextTokenizer::bos_id`]: the tokenizer.json
//! post-processor or tokenizer_config.json's `add_bos_token` for Hugging Face models; always
//! for the toy char vocabulary). With `chat_template = true` the context is instead the model's
//! chat template rendered with the prompt as the last user message (shots as earlier
//! user / assistant turns) and `add_generation_prompt`; the template writes its own BOS, so none
//! is added, and special tokens in the rendering (`<|im_start|>`) become their ids. A context
//! that tokenizes to nothing becomes `[EOS]` (lm-evaluation-harness's rule).
//!
//! # Metrics
//!
//! - **exact_match**: greedy generation from the context, stopping at EOS, at the task's stop
//!   string (cut off) or after `max_new_tokens`; correct when the output equals the target
//!   after trimming whitespace, or, with `answer_regex`, when the extracted answer does
//!   ([`Task::is_correct`]). `<task>/exact_match` = accuracy.
//! - **multiple_choice**: for each choice, the summed log-probability of the choice's tokens
//!   after the context (context and choice tokenized separately, then concatenated).
//!   `<task>/acc`: the argmax (first on ties) is the prediction; `<task>/acc_norm`: the argmax
//!   of the log-probability divided by the choice's length in characters (lm-evaluation-harness's
//!   `acc_norm`). `<task>/multiple_choice` is the one `mc_score` selects (default `acc`).
//! - **perplexity**: every token of each text is predicted, the first one from `[BOS]` (or
//!   `[EOS]` when the tokenizer adds no BOS, as lm-evaluation-harness's rolling
//!   log-likelihood does). With `Σ log p` pooled over the split's texts, `N` their tokens and
//!   `B` their UTF-8 bytes: `<task>/nll = −Σ log p / N` (nats per token),
//!   `<task>/perplexity = exp(nll)`, `<task>/bits_per_byte = −Σ log p / (B ln 2)`.
//!
//! Every task also reports `<task>/score`, its contribution to the fitness, a number in [0, 1]
//! that rises as the model improves: the accuracy, or for perplexity the task's
//! `score_transform` — `byte_probability` (default) = `2^(−bits_per_byte)`, the geometric-mean
//! probability of a byte of text, or `token_probability` = `1 / perplexity`. (For the toy char
//! vocabulary, one token per byte, the two are equal.) The primary value is the weighted mean
//! of the task scores.
//!
//! # Limits
//!
//! Examples are tokenized once, when the evaluator is made. With [`LmConfig::max_length`] set,
//! an example that needs more positions than that (context + `max_new_tokens`; context +
//! longest choice; the text and its first-token context) is an error before anything runs,
//! naming the task, the file and line, and the length. A text too long to fit even at
//! [`MAX_BYTES_PER_TOKEN`] bytes per token is refused before it is tokenized.
//!
//! # Batching
//!
//! Sequences are sorted by length, cut into batches of `batch_size` (the task's `batch_size`,
//! else the evaluator's) and run with rayon over batches (in the caller's pool, so a search that
//! caps concurrent evaluations also caps this); see [`crate::eval::runner`].
//!
//! - **Log-likelihoods** (multiple choice, perplexity): right-padded (exact without a mask: the
//!   model is causal, so no position sees the padding after it); the LM head and log-softmax run
//!   only on the positions that predict a scored token, 256 at a time, so full-vocabulary logits
//!   of every position never exist.
//! - **Generation**: each batch is prefilled once and decoded one token per step with a KV cache
//!   (left padding with a mask, RoPE positions that skip the padding, a batch's shared prefix —
//!   few-shot shots, a chat system prompt — prefilled once; [`crate::model::decode`]); finished
//!   rows leave the batch. Greedy outputs equal those of re-running the whole sequence.

use std::sync::Arc;

use candle_core::{DType, Device};

use crate::candidate::Candidate;
use crate::error::{Error, Result};
use crate::eval::runner::Runner;
use crate::eval::subsample;
use crate::eval::tasks::{Example, McScore, Metric, ScoreTransform, Task};
use crate::eval::{EvalError, Evaluator, Score, Split};
use crate::model::CausalLm;
use crate::tokenizer::{ChatMessage, TextTokenizer};

/// Builds a runnable model for a candidate on a device. The default is [`crate::model::build`];
/// tests plug in doubles such as [`crate::eval::double::bigram_builder`].
pub type ModelBuilder =
    Arc<dyn Fn(&Candidate, &Device, DType) -> Result<Box<dyn CausalLm>> + Send + Sync>;

/// A text longer than `max_length × MAX_BYTES_PER_TOKEN` bytes cannot fit in `max_length`
/// tokens with any real vocabulary, so it is refused without tokenizing it.
pub const MAX_BYTES_PER_TOKEN: usize = 1024;

/// Options of the LM evaluator.
#[derive(Clone, Debug)]
pub struct LmConfig {
    /// Where the forward runs. Default CPU.
    pub device: Device,
    /// The compute dtype of the forward (`f32`, `bf16`, `f16`). Default `f32`.
    pub dtype: DType,
    /// Sequences per forward call, for tasks that set no `batch_size`. Default 32.
    pub batch_size: usize,
    /// The longest sequence (context + generated tokens, context + choice, text) any example
    /// may need; longer ones are refused when the evaluator is made. `None` means no limit
    /// beyond the model's own.
    pub max_length: Option<usize>,
}

impl Default for LmConfig {
    fn default() -> Self {
        LmConfig {
            device: Device::Cpu,
            dtype: DType::F32,
            batch_size: 32,
            max_length: None,
        }
    }
}

/// One example, tokenized.
#[derive(Clone, Debug)]
enum Encoded {
    Generation {
        prompt: Vec<u32>,
        target: String,
    },
    Choice {
        prompt: Vec<u32>,
        choices: Vec<Vec<u32>>,
        /// Each choice's length in characters (for `acc_norm`).
        chars: Vec<usize>,
        answer: usize,
    },
    /// `ids[0]` is the context (BOS or EOS); every later token is predicted.
    Text {
        ids: Vec<u32>,
        bytes: usize,
    },
}

impl Encoded {
    fn max_id(&self) -> u32 {
        let m = |v: &[u32]| v.iter().copied().max().unwrap_or(0);
        match self {
            Encoded::Generation { prompt, .. } => m(prompt),
            Encoded::Choice {
                prompt, choices, ..
            } => choices
                .iter()
                .map(|c| m(c))
                .max()
                .unwrap_or(0)
                .max(m(prompt)),
            Encoded::Text { ids, .. } => m(ids),
        }
    }

    fn context(&self) -> &[u32] {
        match self {
            Encoded::Generation { prompt, .. } | Encoded::Choice { prompt, .. } => prompt,
            Encoded::Text { ids, .. } => &ids[..1],
        }
    }
}

struct EncodedTask {
    task: Task,
    dev: Vec<Encoded>,
    test: Vec<Encoded>,
}

/// Scores candidates on weighted LM tasks; see the module docs for the metrics.
pub struct LmEvaluator {
    tasks: Vec<EncodedTask>,
    tokenizer: Arc<dyn TextTokenizer>,
    config: LmConfig,
    builder: ModelBuilder,
    max_id: u32,
}

impl LmEvaluator {
    /// An evaluator for `tasks` with models built by [`crate::model::build`]. Renders and
    /// tokenizes every example now. Fails when there are no tasks, task names repeat, the
    /// weights sum to zero, a task asks for a chat template the tokenizer lacks, or an example
    /// cannot be tokenized or is longer than `config.max_length` (the message names the task
    /// and the example's file and line).
    pub fn try_new(
        tasks: Vec<Task>,
        tokenizer: Arc<dyn TextTokenizer>,
        config: LmConfig,
    ) -> Result<Self> {
        if tasks.is_empty() {
            return Err(Error::Eval(
                "the LM evaluator needs at least one task".into(),
            ));
        }
        let mut names = std::collections::BTreeSet::new();
        for t in &tasks {
            if !names.insert(t.spec.name.as_str()) {
                return Err(Error::Eval(format!("task `{}` appears twice", t.spec.name)));
            }
        }
        let total: f64 = tasks.iter().map(|t| t.spec.weight).sum();
        if !(total > 0.0 && total.is_finite()) {
            return Err(Error::Eval(format!(
                "task weights must sum to a positive number, got {total}"
            )));
        }
        if config.batch_size == 0 {
            return Err(Error::Eval("batch_size must be at least 1".into()));
        }
        if config.max_length == Some(0) {
            return Err(Error::Eval("max_length must be at least 1".into()));
        }
        let mut encoded = Vec::with_capacity(tasks.len());
        for task in tasks {
            if task.spec.chat_template && tokenizer.chat_template().is_none() {
                return Err(Error::Eval(format!(
                    "task `{}` sets chat_template = true but the model's tokenizer has no chat \
                     template (no chat_template in tokenizer_config.json or \
                     chat_template.jinja)",
                    task.spec.name
                )));
            }
            let dev = encode_split(&task, Split::Dev, tokenizer.as_ref(), config.max_length)?;
            let test = encode_split(&task, Split::Test, tokenizer.as_ref(), config.max_length)?;
            encoded.push(EncodedTask { task, dev, test });
        }
        let max_id = encoded
            .iter()
            .flat_map(|t| t.dev.iter().chain(&t.test))
            .map(Encoded::max_id)
            .chain(tokenizer.bos_id())
            .max()
            .unwrap_or(0);
        Ok(LmEvaluator {
            tasks: encoded,
            tokenizer,
            config,
            builder: Arc::new(|c: &Candidate, d: &Device, t: DType| crate::model::build(c, d, t)),
            max_id,
        })
    }

    /// Build models with `builder` instead of [`crate::model::build`].
    pub fn with_builder(mut self, builder: ModelBuilder) -> Self {
        self.builder = builder;
        self
    }

    /// The tasks, in order.
    pub fn tasks(&self) -> Vec<&Task> {
        self.tasks.iter().map(|t| &t.task).collect()
    }

    /// The main metric key of every task (`<task>/<metric>`), in order: the columns of an
    /// evaluation table.
    pub fn metric_keys(&self) -> Vec<String> {
        self.tasks.iter().map(|t| t.task.metric_key()).collect()
    }

    /// The token ids of the context of example `index` of `split` in task `task`, as scored
    /// (BOS, shots or chat template included; a text's is its one-token context). For
    /// inspecting what the model sees.
    pub fn context_ids(&self, task: &str, split: Split, index: usize) -> Option<&[u32]> {
        let et = self.tasks.iter().find(|t| t.task.spec.name == task)?;
        let examples = match split {
            Split::Dev => &et.dev,
            Split::Test => &et.test,
        };
        examples.get(index).map(Encoded::context)
    }

    fn runner<'a>(&'a self, model: &'a dyn CausalLm, batch_size: Option<usize>) -> Runner<'a> {
        Runner {
            model,
            device: &self.config.device,
            batch_size: batch_size.unwrap_or(self.config.batch_size),
        }
    }

    /// Greedy generation with this evaluator's tokenizer and batching: each prompt is encoded
    /// like a context (BOS only when the tokenizer adds one), each output is cut at `stop`
    /// (unless empty) and ends at EOS or after `max_new_tokens`. For inspecting what a model
    /// answers.
    pub fn generate(
        &self,
        model: &dyn CausalLm,
        prompts: &[&str],
        max_new_tokens: usize,
        stop: &str,
    ) -> Result<Vec<String>, EvalError> {
        let tok = self.tokenizer.as_ref();
        let encoded = prompts
            .iter()
            .map(|p| encode_context(p, true, tok))
            .collect::<Result<Vec<_>>>()?;
        let rows: Vec<&[u32]> = encoded.iter().map(Vec::as_slice).collect();
        self.runner(model, None)
            .generate(&rows, max_new_tokens, stop, tok)
    }

    /// Σ log p(continuation | context) for each `(context, continuation)` pair: the context
    /// encoded like an example's (BOS only when the tokenizer adds one; `[EOS]` when empty),
    /// the continuation tokenized separately, batched like the multiple-choice metric.
    pub fn log_likelihood(
        &self,
        model: &dyn CausalLm,
        pairs: &[(&str, &str)],
    ) -> Result<Vec<f64>, EvalError> {
        let tok = self.tokenizer.as_ref();
        let mut seqs = Vec::with_capacity(pairs.len());
        for (context, continuation) in pairs {
            let mut ids = encode_context(context, true, tok)?;
            let start = ids.len();
            ids.extend(tok.encode(continuation)?);
            seqs.push((ids, start));
        }
        self.runner(model, None)
            .log_likelihoods(&seqs)
            .map_err(candidate_err)
    }

    /// Score an already built model on `split`.
    pub fn score_model(&self, model: &dyn CausalLm, split: Split) -> Result<Score, EvalError> {
        self.check_vocab(model)?;
        let mut tallies = Vec::with_capacity(self.tasks.len());
        for (t, et) in self.tasks.iter().enumerate() {
            let examples: Vec<&Encoded> = et.examples(split).iter().collect();
            tallies.push(self.tally(model, t, &examples)?);
        }
        self.score_of(&tallies)
    }

    fn check_vocab(&self, model: &dyn CausalLm) -> Result<(), EvalError> {
        let vocab = model.vocab_size();
        if self.max_id as usize >= vocab {
            return Err(EvalError::Candidate(format!(
                "the task tokens reach id {} but the model's vocabulary has {vocab} entries",
                self.max_id
            )));
        }
        Ok(())
    }

    /// Score `examples` of task `t` (all of one split): the counts its metrics come from.
    fn tally(
        &self,
        model: &dyn CausalLm,
        t: usize,
        examples: &[&Encoded],
    ) -> Result<Tally, EvalError> {
        let task = &self.tasks[t].task;
        let run = self.runner(model, task.spec.batch_size);
        Ok(match task.spec.metric {
            Metric::ExactMatch => {
                let (right, scored) = self.exact_match(&run, examples, task)?;
                Tally {
                    scored,
                    right,
                    ..Tally::default()
                }
            }
            Metric::MultipleChoice => {
                let (right, right_norm, scored) =
                    choice_counts(&run, examples).map_err(candidate_err)?;
                Tally {
                    scored,
                    right,
                    right_norm,
                    ..Tally::default()
                }
            }
            Metric::Perplexity => Tally {
                scored: examples.len(),
                ll: log_likelihood_totals(&run, examples).map_err(candidate_err)?,
                ..Tally::default()
            },
        })
    }

    /// Task `t`'s score (in [0, 1], what the fitness averages) and metrics from its tally.
    fn task_values(&self, t: usize, tally: &Tally) -> (f64, Vec<(String, f64)>) {
        let task = &self.tasks[t].task;
        let spec = &task.spec;
        let name = &spec.name;
        let mut values: Vec<(String, f64)> = Vec::new();
        let accuracy = |right: usize| right as f64 / tally.scored.max(1) as f64;
        let score = match spec.metric {
            Metric::ExactMatch => {
                let acc = accuracy(tally.right);
                values.push((task.metric_key(), acc));
                acc
            }
            Metric::MultipleChoice => {
                let (acc, acc_norm) = (accuracy(tally.right), accuracy(tally.right_norm));
                let main = match spec.mc_score {
                    McScore::Acc => acc,
                    McScore::AccNorm => acc_norm,
                };
                values.push((task.metric_key(), main));
                values.push((format!("{name}/acc"), acc));
                values.push((format!("{name}/acc_norm"), acc_norm));
                main
            }
            Metric::Perplexity => {
                let ll = &tally.ll;
                values.push((task.metric_key(), ll.nll().exp()));
                values.push((format!("{name}/nll"), ll.nll()));
                values.push((format!("{name}/bits_per_byte"), ll.bits_per_byte()));
                match spec.score_transform {
                    ScoreTransform::ByteProbability => (ll.sum / ll.bytes.max(1) as f64).exp(),
                    ScoreTransform::TokenProbability => (-ll.nll()).exp(),
                }
            }
        };
        values.push((format!("{name}/score"), score));
        (score, values)
    }

    /// The highest score task `t` can end with on `split` given its tally: every example not
    /// yet scored right, every text token not yet scored at probability 1.
    fn task_upper(&self, t: usize, split: Split, tally: &Tally) -> f64 {
        let et = &self.tasks[t];
        let spec = &et.task.spec;
        let examples = et.examples(split);
        let n = examples.len();
        match spec.metric {
            Metric::ExactMatch => subsample::accuracy_upper(tally.right, tally.scored, n),
            Metric::MultipleChoice => {
                let right = match spec.mc_score {
                    McScore::Acc => tally.right,
                    McScore::AccNorm => tally.right_norm,
                };
                subsample::accuracy_upper(right, tally.scored, n)
            }
            Metric::Perplexity => {
                let units: usize = examples
                    .iter()
                    .map(|e| match (e, spec.score_transform) {
                        (Encoded::Text { bytes, .. }, ScoreTransform::ByteProbability) => *bytes,
                        (Encoded::Text { ids, .. }, ScoreTransform::TokenProbability) => {
                            ids.len() - 1
                        }
                        _ => 0,
                    })
                    .sum();
                subsample::loglik_upper(tally.ll.sum, units)
            }
        }
    }

    /// The score of every task's tally: the metrics, and the weighted mean of the task scores.
    fn score_of(&self, tallies: &[Tally]) -> Result<Score, EvalError> {
        let mut metrics = std::collections::BTreeMap::new();
        let mut weighted = 0.0;
        let mut total_weight = 0.0;
        for (t, tally) in tallies.iter().enumerate() {
            let (score, values) = self.task_values(t, tally);
            for (key, value) in values {
                if !value.is_finite() {
                    return Err(EvalError::NotFinite { metric: key, value });
                }
                metrics.insert(key, value);
            }
            let weight = self.tasks[t].task.spec.weight;
            weighted += weight * score;
            total_weight += weight;
        }
        let primary = weighted / total_weight;
        if !primary.is_finite() {
            return Err(EvalError::NotFinite {
                metric: "primary".into(),
                value: primary,
            });
        }
        Ok(Score { primary, metrics })
    }

    /// Right answers and examples scored of the generation examples among `examples`.
    fn exact_match(
        &self,
        run: &Runner<'_>,
        examples: &[&Encoded],
        task: &Task,
    ) -> Result<(usize, usize), EvalError> {
        let mut prompts = Vec::with_capacity(examples.len());
        let mut targets = Vec::with_capacity(examples.len());
        for e in examples {
            if let Encoded::Generation { prompt, target } = e {
                prompts.push(prompt.as_slice());
                targets.push(target.as_str());
            }
        }
        let outputs = run.generate(
            &prompts,
            task.spec.max_new_tokens,
            &task.spec.stop,
            self.tokenizer.as_ref(),
        )?;
        let correct = outputs
            .iter()
            .zip(&targets)
            .filter(|(o, t)| task.is_correct(o, t))
            .count();
        Ok((correct, targets.len()))
    }
}

/// What has been scored of one task: the counts its metrics come from. Accuracy metrics divide
/// `right` by `scored` (so the counts of the whole split give exactly the whole evaluation's
/// accuracy); perplexity pools `ll`.
#[derive(Clone, Copy, Debug, Default)]
struct Tally {
    scored: usize,
    /// Exact match: right answers; multiple choice: right by `acc`.
    right: usize,
    /// Multiple choice: right by `acc_norm`.
    right_norm: usize,
    ll: LogLikelihood,
}

impl Tally {
    fn add(&mut self, other: &Tally) {
        self.scored += other.scored;
        self.right += other.right;
        self.right_norm += other.right_norm;
        self.ll.sum += other.ll.sum;
        self.ll.tokens += other.ll.tokens;
        self.ll.bytes += other.ll.bytes;
    }
}

impl EncodedTask {
    fn examples(&self, split: Split) -> &[Encoded] {
        match split {
            Split::Dev => &self.dev,
            Split::Test => &self.test,
        }
    }
}

/// One built model scored a slice at a time ([`subsample::race`]).
struct LmSlices<'a> {
    eval: &'a LmEvaluator,
    model: &'a dyn CausalLm,
    split: Split,
    tallies: Vec<Tally>,
}

impl subsample::Sliced for LmSlices<'_> {
    fn tasks(&self) -> Vec<subsample::SliceTask> {
        self.eval
            .tasks
            .iter()
            .map(|et| {
                let spec = &et.task.spec;
                subsample::SliceTask {
                    name: spec.name.clone(),
                    examples: et.examples(self.split).len(),
                    // one sequence per example, except multiple choice (one per choice)
                    batch: match spec.metric {
                        Metric::MultipleChoice => 1,
                        _ => spec.batch_size.unwrap_or(self.eval.config.batch_size),
                    },
                }
            })
            .collect()
    }

    fn score(&mut self, slice: &[(usize, &[usize])]) -> Result<(), EvalError> {
        use rayon::prelude::*;
        // The tasks of a slice at once (each task's batches in parallel too), on the caller's
        // pool; each task's tally is its own, and the first error in task order is returned,
        // so nothing depends on which finished first.
        let tallies: Vec<Result<Tally, EvalError>> = slice
            .par_iter()
            .map(|&(task, indices)| {
                let all = self.eval.tasks[task].examples(self.split);
                let examples: Vec<&Encoded> = indices.iter().map(|&i| &all[i]).collect();
                self.eval.tally(self.model, task, &examples)
            })
            .collect();
        for (&(task, _), tally) in slice.iter().zip(tallies) {
            self.tallies[task].add(&tally?);
        }
        Ok(())
    }

    fn state(&self, task: usize) -> subsample::TaskState {
        let tally = &self.tallies[task];
        let et = &self.eval.tasks[task];
        subsample::TaskState {
            weight: et.task.spec.weight,
            upper: self.eval.task_upper(task, self.split, tally),
            partial: self.eval.task_values(task, tally).0,
            scored: tally.scored,
            total: et.examples(self.split).len(),
            mean_of_unit_values: et.task.spec.metric != Metric::Perplexity,
        }
    }

    fn score_so_far(&self) -> Result<Score, EvalError> {
        self.eval.score_of(&self.tallies)
    }
}

impl Evaluator for LmEvaluator {
    fn name(&self) -> &str {
        "lm"
    }

    fn evaluate(&self, candidate: &Candidate, split: Split) -> Result<Score, EvalError> {
        let model = (self.builder)(candidate, &self.config.device, self.config.dtype)
            .map_err(candidate_err)?;
        self.score_model(model.as_ref(), split)
    }

    /// Raced as [`subsample`] describes: the model is built once, then scored slice by slice.
    fn evaluate_subsampled(
        &self,
        candidate: &Candidate,
        split: Split,
        race: &subsample::Race,
    ) -> Option<Result<subsample::Raced, EvalError>> {
        let run = || {
            let model = (self.builder)(candidate, &self.config.device, self.config.dtype)
                .map_err(candidate_err)?;
            self.check_vocab(model.as_ref())?;
            let mut slices = LmSlices {
                eval: self,
                model: model.as_ref(),
                split,
                tallies: vec![Tally::default(); self.tasks.len()],
            };
            subsample::race(&mut slices, race)
        };
        Some(run())
    }
}

fn candidate_err(e: Error) -> EvalError {
    EvalError::Candidate(e.to_string())
}

/// The context text of `prompt` in `task` — shots and prompt joined by the task's
/// `fewshot_separator`, or, with `chat_template`, the model's chat template rendered with the
/// shots as user / assistant turns, the prompt as the last user message and the generation
/// prompt — and whether the tokenizer's BOS goes before it (not for chat: the template writes
/// its own).
pub fn render_prompt(task: &Task, prompt: &str, tok: &dyn TextTokenizer) -> Result<(String, bool)> {
    let spec = &task.spec;
    if spec.chat_template {
        let template = tok.chat_template().ok_or_else(|| {
            Error::Eval(format!(
                "task `{}` sets chat_template = true but the tokenizer has no chat template",
                spec.name
            ))
        })?;
        let mut messages = Vec::with_capacity(2 * task.shots.len() + 1);
        for shot in &task.shots {
            messages.push(ChatMessage::user(&shot.prompt));
            messages.push(ChatMessage::assistant(&shot.target));
        }
        messages.push(ChatMessage::user(prompt));
        return Ok((template.render(&messages, true)?, false));
    }
    if task.shots.is_empty() {
        return Ok((prompt.to_string(), true));
    }
    let sep = &spec.fewshot_separator;
    let mut text = String::new();
    for shot in &task.shots {
        text.push_str(&shot.prompt);
        text.push_str(&shot.target);
        text.push_str(sep);
    }
    text.push_str(prompt);
    Ok((text, true))
}

/// `[BOS] + ids(text)` when `add_bos` and the tokenizer adds a BOS, else `ids(text)`; `[EOS]`
/// when that is empty.
fn encode_context(text: &str, add_bos: bool, tok: &dyn TextTokenizer) -> Result<Vec<u32>> {
    let mut ids: Vec<u32> = tok.bos_id().filter(|_| add_bos).into_iter().collect();
    ids.extend(tok.encode(text)?);
    if ids.is_empty() {
        match tok.eos_id() {
            Some(eos) => ids.push(eos),
            None => {
                return Err(Error::Eval(
                    "empty context and the tokenizer has neither BOS nor EOS".into(),
                ));
            }
        }
    }
    Ok(ids)
}

fn encode_split(
    task: &Task,
    split: Split,
    tok: &dyn TextTokenizer,
    max_length: Option<usize>,
) -> Result<Vec<Encoded>> {
    let spec = &task.spec;
    let name = &spec.name;
    let fail = |i: usize, msg: String| {
        Error::Eval(format!("task `{name}`, {}: {msg}", task.location(split, i)))
    };
    // Refuse a text that cannot fit before tokenizing it.
    let check_bytes = |i: usize, what: &str, bytes: usize| -> Result<()> {
        match max_length {
            Some(m) if bytes > m.saturating_mul(MAX_BYTES_PER_TOKEN) => Err(fail(
                i,
                format!(
                    "the {what} is {bytes} bytes, too long for max_length {m} (at most {} \
                     bytes are tokenized)",
                    m.saturating_mul(MAX_BYTES_PER_TOKEN)
                ),
            )),
            _ => Ok(()),
        }
    };
    let check_len = |i: usize, len: usize, detail: String| -> Result<()> {
        match max_length {
            Some(m) if len > m => Err(fail(
                i,
                format!("needs {len} tokens ({detail}), more than max_length {m}"),
            )),
            _ => Ok(()),
        }
    };
    let context = |i: usize, prompt: &str| -> Result<Vec<u32>> {
        let (text, add_bos) =
            render_prompt(task, prompt, tok).map_err(|e| fail(i, e.to_string()))?;
        check_bytes(i, "prompt", text.len())?;
        encode_context(&text, add_bos, tok).map_err(|e| fail(i, e.to_string()))
    };
    task.examples(split)
        .iter()
        .enumerate()
        .map(|(i, e)| -> Result<Encoded> {
            Ok(match e {
                Example::Generation { prompt, target } => {
                    let prompt = context(i, prompt)?;
                    let need = prompt.len().saturating_add(spec.max_new_tokens);
                    check_len(
                        i,
                        need,
                        format!(
                            "{} context + {} max_new_tokens",
                            prompt.len(),
                            spec.max_new_tokens
                        ),
                    )?;
                    Encoded::Generation {
                        prompt,
                        target: target.clone(),
                    }
                }
                Example::Choice {
                    prompt,
                    choices,
                    answer,
                } => {
                    let prompt = context(i, prompt)?;
                    let chars = choices.iter().map(|c| c.chars().count()).collect();
                    let choices = choices
                        .iter()
                        .map(|c| {
                            check_bytes(i, "choice", c.len())?;
                            let ids = tok.encode(c).map_err(|e| fail(i, e.to_string()))?;
                            if ids.is_empty() {
                                return Err(fail(i, format!("choice {c:?} has no tokens")));
                            }
                            Ok(ids)
                        })
                        .collect::<Result<Vec<_>>>()?;
                    let longest = choices.iter().map(Vec::len).max().unwrap_or(0);
                    check_len(
                        i,
                        prompt.len() + longest,
                        format!("{} context + {longest} longest choice", prompt.len()),
                    )?;
                    Encoded::Choice {
                        prompt,
                        chars,
                        choices,
                        answer: *answer,
                    }
                }
                Example::Text { text } => {
                    check_bytes(i, "text", text.len())?;
                    let start = tok.bos_id().or(tok.eos_id()).ok_or_else(|| {
                        fail(
                            i,
                            "perplexity needs a BOS or EOS token to predict the first token \
                             from"
                                .into(),
                        )
                    })?;
                    let mut ids = vec![start];
                    ids.extend(tok.encode(text).map_err(|e| fail(i, e.to_string()))?);
                    if ids.len() < 2 {
                        return Err(fail(i, "text has no tokens".into()));
                    }
                    check_len(i, ids.len(), format!("1 context + {} text", ids.len() - 1))?;
                    Encoded::Text {
                        ids,
                        bytes: text.len(),
                    }
                }
            })
        })
        .collect()
}

/// Multiple-choice counts `(right by acc, right by acc_norm, examples)`: the argmax (first on
/// ties) of the summed choice log-likelihood, and of it divided by the choice's character
/// length.
fn choice_counts(run: &Runner<'_>, examples: &[&Encoded]) -> Result<(usize, usize, usize)> {
    let mut seqs = Vec::new();
    for e in examples {
        if let Encoded::Choice {
            prompt, choices, ..
        } = e
        {
            for c in choices {
                let mut s = prompt.clone();
                s.extend(c);
                seqs.push((s, prompt.len()));
            }
        }
    }
    let ll = run.log_likelihoods(&seqs)?;
    let argmax = |scores: &mut dyn Iterator<Item = f64>| {
        let mut best: Option<(usize, f64)> = None;
        for (c, l) in scores.enumerate() {
            let l = if l.is_nan() { f64::NEG_INFINITY } else { l };
            if best.is_none_or(|(_, b)| l > b) {
                best = Some((c, l));
            }
        }
        best.map(|(c, _)| c)
    };
    let (mut acc, mut acc_norm, mut n) = (0usize, 0usize, 0usize);
    let mut offset = 0;
    for e in examples {
        if let Encoded::Choice {
            choices,
            chars,
            answer,
            ..
        } = e
        {
            let lls = &ll[offset..offset + choices.len()];
            offset += choices.len();
            n += 1;
            acc += usize::from(argmax(&mut lls.iter().copied()) == Some(*answer));
            let mut normed = lls
                .iter()
                .zip(chars)
                .map(|(&l, &len)| l / len.max(1) as f64);
            acc_norm += usize::from(argmax(&mut normed) == Some(*answer));
        }
    }
    Ok((acc, acc_norm, n))
}

/// Pooled log-likelihood of a split's texts.
#[derive(Clone, Copy, Debug, Default)]
struct LogLikelihood {
    /// Σ log p (nats, ≤ 0).
    sum: f64,
    tokens: usize,
    bytes: usize,
}

impl LogLikelihood {
    /// Mean negative log-likelihood per token (nats).
    fn nll(&self) -> f64 {
        -self.sum / self.tokens.max(1) as f64
    }

    fn bits_per_byte(&self) -> f64 {
        -self.sum / (self.bytes.max(1) as f64 * std::f64::consts::LN_2)
    }
}

/// Σ log p of every text token after its one-token context.
fn log_likelihood_totals(run: &Runner<'_>, examples: &[&Encoded]) -> Result<LogLikelihood> {
    let mut seqs = Vec::new();
    let mut bytes = 0;
    for e in examples {
        if let Encoded::Text { ids, bytes: b } = e {
            seqs.push((ids.clone(), 1));
            bytes += b;
        }
    }
    let tokens: usize = seqs.iter().map(|(s, start)| s.len() - start).sum();
    let sum: f64 = run.log_likelihoods(&seqs)?.iter().sum();
    Ok(LogLikelihood { sum, tokens, bytes })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::candidate::{CandidateBody, MemModel};
    use crate::eval::double::{BigramLm, CharVocab, bigram_builder};
    use crate::eval::tasks::TaskSpec;

    /// Vocabulary `[EOS, a, b, c, \n]`.
    fn vocab() -> CharVocab {
        CharVocab::new("abc\n")
    }

    /// A bigram table where `a → b → c → \n → EOS`, with logits 0 elsewhere and 5 on the
    /// successor; row EOS is uniform.
    fn chain_table() -> Vec<f32> {
        let v = 5;
        let mut t = vec![0.0f32; v * v];
        for (from, to) in [(1, 2), (2, 3), (3, 4), (4, 0)] {
            t[from * v + to] = 5.0;
        }
        t
    }

    fn candidate(model: MemModel) -> Candidate {
        Candidate {
            body: CandidateBody::Merged(Arc::new(model)),
            recipe: None,
        }
    }

    fn ex(prompt: &str, target: &str) -> Example {
        Example::Generation {
            prompt: prompt.into(),
            target: target.into(),
        }
    }

    #[test]
    fn exact_match_of_greedy_generation_stops_at_stop_string() {
        let spec = TaskSpec::new("chain", "-", Metric::ExactMatch);
        // "a" → "bc\n…" → cut at "\n" → "bc"; "b" → "c"; "c" → "" (newline first).
        let dev = vec![ex("a", "bc"), ex("b", "c"), ex("c", " "), ex("a", "b")];
        let test = vec![ex("a", "bc\n")];
        let task = Task::from_examples(spec, dev, test).unwrap();
        let cfg = LmConfig {
            batch_size: 3,
            ..LmConfig::default()
        };
        let eval = LmEvaluator::try_new(vec![task], Arc::new(vocab()), cfg)
            .unwrap()
            .with_builder(bigram_builder());
        let c = candidate(BigramLm::mem_model(5, chain_table()));
        let s = eval.evaluate(&c, Split::Dev).unwrap();
        assert_eq!(s.primary, 0.75);
        assert_eq!(s.metrics["chain/exact_match"], 0.75);
        assert_eq!(s.metrics["chain/score"], 0.75);
        // Targets are trimmed too.
        assert_eq!(eval.evaluate(&c, Split::Test).unwrap().primary, 1.0);
    }

    #[test]
    fn generation_without_stop_string_ends_at_eos_or_budget() {
        let mut spec = TaskSpec::new("chain", "-", Metric::ExactMatch);
        spec.stop = String::new();
        spec.max_new_tokens = 2;
        let task = Task::from_examples(
            spec.clone(),
            vec![ex("a", "bc"), ex("c", "\n")],
            vec![ex("b", "c\n")],
        )
        .unwrap();
        let eval = LmEvaluator::try_new(vec![task], Arc::new(vocab()), LmConfig::default())
            .unwrap()
            .with_builder(bigram_builder());
        let c = candidate(BigramLm::mem_model(5, chain_table()));
        // Budget 2: "a" → "bc" ✓; "c" → "\n", then EOS ✓ (trimmed to "" on both sides).
        assert_eq!(eval.evaluate(&c, Split::Dev).unwrap().primary, 1.0);
        // "b" → "c\n" then the budget ends ✓.
        assert_eq!(eval.evaluate(&c, Split::Test).unwrap().primary, 1.0);
    }

    #[test]
    fn multiple_choice_picks_highest_summed_log_likelihood() {
        // Row `a`: logits [0, 0, ln 3, ln 1, 0] ⇒ p(b|a) = 3/7, p(c|a) = 1/7 ... and row `b` has
        // p(b|b) = 1/5 uniform; row `c` gives p(a|c) = e^4/(e^4+4).
        let v = 5;
        let mut t = vec![0.0f32; v * v];
        t[v + 2] = 3f32.ln();
        t[3 * v + 1] = 4.0;
        let spec = TaskSpec::new("mc", "-", Metric::MultipleChoice);
        let ch = |prompt: &str, choices: &[&str], answer| Example::Choice {
            prompt: prompt.into(),
            choices: choices.iter().map(|c| c.to_string()).collect(),
            answer,
        };
        // 1: "b" (3/7) beats "c" (1/7) → pick 0 ✓.
        // 2: "bb" = 3/7 · 1/5 ≈ 0.086 vs "ca" = 1/7 · e^4/(e^4+4) ≈ 0.133 → pick 1, answer 0 ✗.
        // 3: "c" vs "c" tie → first (0), answer 1 ✗.
        let dev = vec![
            ch("a", &["b", "c"], 0),
            ch("a", &["bb", "ca"], 0),
            ch("a", &["c", "c"], 1),
        ];
        let task = Task::from_examples(spec, dev.clone(), dev).unwrap();
        let eval = LmEvaluator::try_new(vec![task], Arc::new(vocab()), LmConfig::default())
            .unwrap()
            .with_builder(bigram_builder());
        let s = eval
            .evaluate(&candidate(BigramLm::mem_model(5, t)), Split::Dev)
            .unwrap();
        assert!((s.primary - 1.0 / 3.0).abs() < 1e-12, "{s:?}");
    }

    /// Three tasks, one per metric, with enough examples to race over; a model that gets some
    /// of each right.
    fn race_world() -> (LmEvaluator, Candidate) {
        let prompts = ["a", "b", "c", "a", "b"];
        let em: Vec<Example> = (0..20)
            .map(|i| ex(prompts[i % 5], ["bc", "c", "x", "b", "cc"][i % 5]))
            .collect();
        let em_task =
            Task::from_examples(TaskSpec::new("em", "-", Metric::ExactMatch), em.clone(), em)
                .unwrap();
        let mc: Vec<Example> = (0..12)
            .map(|i| Example::Choice {
                prompt: prompts[i % 5].into(),
                choices: vec!["b".into(), "c".into(), "a".into()],
                answer: i % 3,
            })
            .collect();
        let mut mc_spec = TaskSpec::new("mc", "-", Metric::MultipleChoice);
        mc_spec.weight = 2.0;
        let mc_task = Task::from_examples(mc_spec, mc.clone(), mc).unwrap();
        let texts: Vec<Example> = (0..9)
            .map(|i| Example::Text {
                text: ["abc\n", "ca", "bca", "cab\n"][i % 4].into(),
            })
            .collect();
        let ppl_task = Task::from_examples(
            TaskSpec::new("text", "-", Metric::Perplexity),
            texts.clone(),
            texts,
        )
        .unwrap();
        let cfg = LmConfig {
            batch_size: 4,
            ..LmConfig::default()
        };
        let eval = LmEvaluator::try_new(vec![em_task, mc_task, ppl_task], Arc::new(vocab()), cfg)
            .unwrap()
            .with_builder(bigram_builder());
        (eval, candidate(BigramLm::mem_model(5, chain_table())))
    }

    #[test]
    fn raced_evaluation_without_a_bar_equals_the_whole_evaluation() {
        let (eval, c) = race_world();
        let whole = eval.evaluate(&c, Split::Dev).unwrap();
        assert!(whole.primary > 0.1 && whole.primary < 0.9, "{whole:?}");
        let race = subsample::Race {
            fraction: 0.25,
            bound: None,
            confidence: None,
        };
        let raced = eval
            .evaluate_subsampled(&c, Split::Dev, &race)
            .unwrap()
            .unwrap();
        assert!(!raced.stopped);
        assert_eq!((raced.examples, raced.total), (41, 41));
        // counts add up to the same accuracies exactly; the pooled log-likelihood is summed
        // slice by slice
        for key in [
            "em/exact_match",
            "mc/acc",
            "mc/acc_norm",
            "mc/multiple_choice",
        ] {
            assert_eq!(raced.score.metrics[key], whole.metrics[key], "{key}");
        }
        assert!((raced.score.primary - whole.primary).abs() < 1e-12);
        for (k, v) in &whole.metrics {
            assert!((raced.score.metrics[k] - v).abs() < 1e-9, "{k}");
        }
    }

    #[test]
    fn task_upper_bounds_hold_for_every_metric_after_every_slice() {
        use subsample::Sliced;
        let (eval, c) = race_world();
        let whole = eval.evaluate(&c, Split::Dev).unwrap();
        let model = bigram_builder()(&c, &Device::Cpu, DType::F32).unwrap();
        let mut slices = LmSlices {
            eval: &eval,
            model: model.as_ref(),
            split: Split::Dev,
            tallies: vec![Tally::default(); 3],
        };
        let names = ["em", "mc", "text"];
        for (t, task) in slices.tasks().into_iter().enumerate() {
            let name = task.name;
            assert_eq!(name, names[t]);
            assert_eq!(
                task.batch,
                [4, 1, 4][t],
                "batch_size 4; multiple choice unaligned"
            );
            let order = subsample::order(&name, task.examples);
            for r in subsample::slices(task.examples, 0.25, 1) {
                slices.score(&[(t, &order[r])]).unwrap();
                let upper = slices.state(t).upper;
                let final_score = whole.metrics[&format!("{name}/score")];
                assert!(
                    upper >= final_score - 1e-12,
                    "{name}: {upper} < {final_score}"
                );
                let partial = slices.score_so_far().unwrap().metrics[&format!("{name}/score")];
                assert!(
                    partial <= upper + 1e-12,
                    "{name}: partial {partial} > {upper}"
                );
            }
            // every example scored: the bound is the score itself
            let done = slices.state(t).upper;
            assert!((done - whole.metrics[&format!("{name}/score")]).abs() < 1e-9);
        }
        assert_eq!(slices.state(1).weight, 2.0);
    }

    #[test]
    fn a_candidate_below_the_bar_is_stopped_with_its_partial_score_flagged() {
        let (eval, c) = race_world();
        // nothing reaches 1.01: stopped after the first slice of every task
        let race = subsample::Race {
            fraction: 0.25,
            bound: Some(1.01),
            confidence: None,
        };
        let raced = eval
            .evaluate_subsampled(&c, Split::Dev, &race)
            .unwrap()
            .unwrap();
        assert!(raced.stopped);
        // a quarter of 20, 12 and 9 examples: 5 and 2 rounded up to whole batches of 4, and 3
        assert_eq!(raced.examples, 8 + 3 + 4);
        assert!(raced.score.primary <= raced.upper && raced.upper < 1.01);
        let s = raced.into_score();
        assert_eq!(s.metrics[subsample::STOPPED_KEY], 1.0);
        assert_eq!(s.metrics[subsample::EXAMPLES_KEY], 15.0);
        assert_eq!(s.metrics[subsample::TOTAL_KEY], 41.0);
        assert_eq!(s.metrics[subsample::BOUND_KEY], 1.01);
        // a bar at the candidate's own fitness is reachable: it is never stopped
        let whole = eval.evaluate(&c, Split::Dev).unwrap();
        let race = subsample::Race {
            fraction: 0.1,
            bound: Some(whole.primary),
            confidence: None,
        };
        let raced = eval
            .evaluate_subsampled(&c, Split::Dev, &race)
            .unwrap()
            .unwrap();
        assert!(!raced.stopped);
        assert_eq!(raced.examples, 41);
    }

    #[test]
    fn perplexity_of_uniform_model_is_vocab_size_and_weights_combine() {
        let ppl = TaskSpec::new("text", "-", Metric::Perplexity);
        let texts = vec![
            Example::Text {
                text: "abc\n".into(),
            },
            Example::Text { text: "ca".into() },
        ];
        let ppl_task = Task::from_examples(ppl, texts.clone(), texts).unwrap();
        let mut em = TaskSpec::new("chain", "-", Metric::ExactMatch);
        em.weight = 3.0;
        let em_task = Task::from_examples(em, vec![ex("a", "bc")], vec![ex("a", "x")]).unwrap();
        let eval = LmEvaluator::try_new(
            vec![ppl_task, em_task],
            Arc::new(vocab()),
            LmConfig::default(),
        )
        .unwrap()
        .with_builder(bigram_builder());
        let uniform = candidate(BigramLm::mem_model(5, vec![0.0; 25]));
        let s = eval.evaluate(&uniform, Split::Dev).unwrap();
        assert!((s.metrics["text/perplexity"] - 5.0).abs() < 1e-5, "{s:?}");
        assert!((s.metrics["text/score"] - 0.2).abs() < 1e-6);
        // The uniform model generates EOS-id 0 first (argmax ties → first) → "" ≠ "bc".
        assert_eq!(s.metrics["chain/exact_match"], 0.0);
        assert!((s.primary - 0.2 / 4.0).abs() < 1e-6);
        let chain = candidate(BigramLm::mem_model(5, chain_table()));
        let s = eval.evaluate(&chain, Split::Dev).unwrap();
        // Chain model: p(successor) = e^5 / (e^5 + 4) for a→b, b→c, c→\n; c→a is 1/(e^5+4).
        // The vocabulary has no BOS, so each text's first token is predicted from EOS (row
        // EOS is uniform: 1/5). "abc\n" predicts a then 3 successors, "ca" c then one
        // non-successor: 6 tokens, 6 bytes.
        let hi = (5f64.exp() / (5f64.exp() + 4.0)).ln();
        let lo = (1.0 / (5f64.exp() + 4.0)).ln();
        let sum = 2.0 * 0.2f64.ln() + 3.0 * hi + lo;
        let want = (-sum / 6.0).exp();
        assert!(
            (s.metrics["text/perplexity"] - want).abs() < 1e-4 * want,
            "{s:?}"
        );
        assert!((s.metrics["text/nll"] - -sum / 6.0).abs() < 1e-5, "{s:?}");
        let bpb = -sum / (6.0 * std::f64::consts::LN_2);
        assert!(
            (s.metrics["text/bits_per_byte"] - bpb).abs() < 1e-5,
            "{s:?}"
        );
        // One token per byte: byte_probability = 2^(−bpb) = 1 / perplexity.
        assert!((s.metrics["text/score"] - 1.0 / want).abs() < 1e-5, "{s:?}");
        assert!((s.primary - (1.0 / want + 3.0) / 4.0).abs() < 1e-4);
    }

    #[test]
    fn failures_are_values() {
        let task = Task::from_examples(
            TaskSpec::new("t", "-", Metric::ExactMatch),
            vec![ex("a", "b")],
            vec![ex("a", "b")],
        )
        .unwrap();
        let eval = LmEvaluator::try_new(vec![task.clone()], Arc::new(vocab()), LmConfig::default())
            .unwrap()
            .with_builder(bigram_builder());
        // Missing tensor → Candidate error; a too-small vocabulary → Candidate error.
        let empty = candidate(MemModel {
            config: serde_json::json!({}),
            tensors: Default::default(),
        });
        assert!(matches!(
            eval.evaluate(&empty, Split::Dev),
            Err(EvalError::Candidate(m)) if m.contains("bigram.weight")
        ));
        let small = candidate(BigramLm::mem_model(1, vec![0.0]));
        assert!(matches!(
            eval.evaluate(&small, Split::Dev),
            Err(EvalError::Candidate(m)) if m.contains("vocabulary")
        ));
        // Untokenizable examples fail at construction, naming the task and example.
        let bad = Task::from_examples(
            TaskSpec::new("bad", "-", Metric::ExactMatch),
            vec![ex("a", "b"), ex("z", "b")],
            vec![ex("a", "b")],
        )
        .unwrap();
        let e = LmEvaluator::try_new(vec![bad], Arc::new(vocab()), LmConfig::default())
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("task `bad`, dev example 2"), "{e}");
        let e = LmEvaluator::try_new(
            vec![task.clone(), task],
            Arc::new(vocab()),
            LmConfig::default(),
        )
        .err()
        .unwrap()
        .to_string();
        assert!(e.contains("twice"), "{e}");
    }

    fn eval_with(tasks: Vec<Task>, tok: Arc<dyn TextTokenizer>, cfg: LmConfig) -> LmEvaluator {
        LmEvaluator::try_new(tasks, tok, cfg)
            .unwrap()
            .with_builder(bigram_builder())
    }

    #[test]
    fn fewshot_prefix_is_shared_and_scored() {
        let mut spec = TaskSpec::new("chain", "-", Metric::ExactMatch);
        spec.fewshot = 1;
        spec.fewshot_separator = "\n".into();
        let train = [ex("c", "\n"), ex("a", "bc")];
        let task = Task::from_examples_with_train(
            spec,
            &train[1..],
            vec![ex("a", "bc"), ex("b", "c")],
            vec![ex("b", "c")],
        )
        .unwrap();
        let tok = vocab();
        // CharVocab adds no BOS: the context is "abc" + "\n" + prompt.
        assert_eq!(
            render_prompt(&task, "b", &tok).unwrap(),
            ("abc\nb".to_string(), true)
        );
        let eval = eval_with(vec![task], Arc::new(vocab()), LmConfig::default());
        let want = |p: &str| tok.encode(&format!("abc\n{p}")).unwrap();
        assert_eq!(eval.context_ids("chain", Split::Dev, 0).unwrap(), want("a"));
        assert_eq!(eval.context_ids("chain", Split::Dev, 1).unwrap(), want("b"));
        assert_eq!(
            eval.context_ids("chain", Split::Test, 0).unwrap(),
            want("b")
        );
        let c = candidate(BigramLm::mem_model(5, chain_table()));
        assert_eq!(eval.evaluate(&c, Split::Dev).unwrap().primary, 1.0);
    }

    #[test]
    fn acc_norm_divides_by_choice_length() {
        // Vocabulary [EOS, a, b, c, \n]. After a: p(b) = 0.3, p(c) = 0.5; after c: p(c) = 0.5.
        // "b": ln 0.3 ≈ −1.20 beats "cc": ln 0.25 ≈ −1.39 summed; per character "cc" wins
        // (−0.69).
        let v = 5;
        let mut t = vec![0.0f32; v * v];
        let row = |t: &mut Vec<f32>, r: usize, p: [f32; 5]| {
            for (j, x) in p.iter().enumerate() {
                t[r * v + j] = x.ln();
            }
        };
        let o = 0.2 / 3.0;
        row(&mut t, 1, [o, o, 0.3, 0.5, o]);
        row(&mut t, 3, [0.125, 0.125, 0.125, 0.5, 0.125]);
        let choice = Example::Choice {
            prompt: "a".into(),
            choices: vec!["b".into(), "cc".into()],
            answer: 1,
        };
        let make = |mc_score| {
            let mut spec = TaskSpec::new("mc", "-", Metric::MultipleChoice);
            spec.mc_score = mc_score;
            let task =
                Task::from_examples(spec, vec![choice.clone()], vec![choice.clone()]).unwrap();
            eval_with(vec![task], Arc::new(vocab()), LmConfig::default())
        };
        let c = candidate(BigramLm::mem_model(5, t));
        let s = make(McScore::Acc).evaluate(&c, Split::Dev).unwrap();
        assert_eq!((s.metrics["mc/acc"], s.metrics["mc/acc_norm"]), (0.0, 1.0));
        assert_eq!(s.metrics["mc/multiple_choice"], 0.0);
        assert_eq!(s.primary, 0.0);
        let s = make(McScore::AccNorm).evaluate(&c, Split::Dev).unwrap();
        assert_eq!(s.metrics["mc/multiple_choice"], 1.0);
        assert_eq!(s.metrics["mc/score"], 1.0);
        assert_eq!(s.primary, 1.0);
    }

    #[test]
    fn answer_regex_extracts_from_the_generation() {
        // The chain model answers "bc" to "a"; the regex keeps the last of b / c.
        let mut spec = TaskSpec::new("chain", "-", Metric::ExactMatch);
        let examples = vec![ex("a", "c"), ex("a", "bc")];
        let plain = Task::from_examples(spec.clone(), examples.clone(), examples.clone()).unwrap();
        spec.name = "re".into();
        spec.answer_regex = Some("[bc]".into());
        spec.answer_group_select = Some(-1);
        let re = Task::from_examples(spec, examples.clone(), examples).unwrap();
        let eval = eval_with(vec![plain, re], Arc::new(vocab()), LmConfig::default());
        let s = eval
            .evaluate(
                &candidate(BigramLm::mem_model(5, chain_table())),
                Split::Dev,
            )
            .unwrap();
        assert_eq!(s.metrics["chain/exact_match"], 0.5);
        assert_eq!(s.metrics["re/exact_match"], 0.5);
        assert_eq!(s.primary, 0.5);
    }

    /// A bigram model that records the largest batch it was given.
    struct Recording {
        inner: BigramLm,
        max_batch: std::sync::atomic::AtomicUsize,
    }

    impl CausalLm for Recording {
        fn vocab_size(&self) -> usize {
            self.inner.vocab_size()
        }

        fn forward(&self, input_ids: &candle_core::Tensor) -> Result<candle_core::Tensor> {
            self.max_batch
                .fetch_max(input_ids.dim(0)?, std::sync::atomic::Ordering::SeqCst);
            self.inner.forward(input_ids)
        }
    }

    #[test]
    fn task_batch_size_overrides_the_evaluators() {
        let texts: Vec<Example> = ["ab", "bc", "ca", "abc"]
            .iter()
            .map(|t| Example::Text {
                text: t.to_string(),
            })
            .collect();
        let mut small = TaskSpec::new("small", "-", Metric::Perplexity);
        small.batch_size = Some(1);
        let task = Task::from_examples(small, texts.clone(), texts.clone()).unwrap();
        let big = Task::from_examples(
            TaskSpec::new("big", "-", Metric::Perplexity),
            texts.clone(),
            texts,
        )
        .unwrap();
        let model = |table| Recording {
            inner: BigramLm::from_mem(&BigramLm::mem_model(5, table), &Device::Cpu).unwrap(),
            max_batch: 0.into(),
        };
        let only_small = eval_with(vec![task.clone()], Arc::new(vocab()), LmConfig::default());
        let m = model(chain_table());
        let s1 = only_small.score_model(&m, Split::Dev).unwrap();
        assert_eq!(m.max_batch.into_inner(), 1);
        let both = eval_with(vec![task, big], Arc::new(vocab()), LmConfig::default());
        let m = model(chain_table());
        let s = both.score_model(&m, Split::Dev).unwrap();
        assert_eq!(m.max_batch.into_inner(), 4);
        // Batching changes nothing in the numbers.
        let (a, b) = (s1.metrics["small/nll"], s.metrics["big/nll"]);
        assert!((a - b).abs() < 1e-6, "{a} vs {b}");
    }

    /// CharVocab with a chat template.
    struct Chatty {
        vocab: CharVocab,
        template: crate::tokenizer::ChatTemplate,
    }

    impl TextTokenizer for Chatty {
        fn encode(&self, text: &str) -> Result<Vec<u32>> {
            self.vocab.encode(text)
        }
        fn decode(&self, ids: &[u32]) -> Result<String> {
            self.vocab.decode(ids)
        }
        fn bos_id(&self) -> Option<u32> {
            Some(self.vocab.id('^'))
        }
        fn eos_id(&self) -> Option<u32> {
            self.vocab.eos_id()
        }
        fn chat_template(&self) -> Option<&crate::tokenizer::ChatTemplate> {
            Some(&self.template)
        }
    }

    #[test]
    fn chat_template_renders_shots_as_turns_without_added_bos() {
        let tok = Chatty {
            vocab: CharVocab::new("abc\n^<>usertin"),
            template: crate::tokenizer::ChatTemplate::new(
                "{{ bos_token }}{% for m in messages %}<{{ m.role[0] }}>{{ m.content }}\n\
                 {% endfor %}{% if add_generation_prompt %}<a>{% endif %}",
            )
            .with_variable("bos_token", "^"),
        };
        let mut spec = TaskSpec::new("chat", "-", Metric::MultipleChoice);
        spec.chat_template = true;
        spec.fewshot = 1;
        let choice = |p: &str, a| Example::Choice {
            prompt: p.into(),
            choices: vec!["b".into(), "c".into()],
            answer: a,
        };
        let task = Task::from_examples_with_train(
            spec.clone(),
            &[choice("c", 0)],
            vec![choice("a", 0)],
            vec![choice("b", 1)],
        )
        .unwrap();
        let (text, add_bos) = render_prompt(&task, "a", &tok).unwrap();
        assert_eq!(text, "^<u>c\n<a>b\n<u>a\n<a>");
        assert!(!add_bos);
        let eval = LmEvaluator::try_new(vec![task], Arc::new(tok), LmConfig::default()).unwrap();
        let ids = eval.context_ids("chat", Split::Dev, 0).unwrap();
        let vocab = CharVocab::new("abc\n^<>usertin");
        // The template's own "^" is the only BOS.
        assert_eq!(ids, vocab.encode("^<u>c\n<a>b\n<u>a\n<a>").unwrap());

        // A task that asks for chat with a tokenizer that has no template.
        spec.fewshot = 0;
        let plain = Task::from_examples(spec, vec![choice("a", 0)], vec![choice("a", 0)]);
        let e = LmEvaluator::try_new(vec![plain.unwrap()], Arc::new(vocab), LmConfig::default())
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("task `chat`") && e.contains("no chat template"),
            "{e}"
        );
    }

    #[test]
    fn empty_context_without_bos_is_eos() {
        // CharVocab has no BOS; EOS is id 0.
        let choice = Example::Choice {
            prompt: String::new(),
            choices: vec!["a".into(), "b".into()],
            answer: 0,
        };
        let task = Task::from_examples(
            TaskSpec::new("mc", "-", Metric::MultipleChoice),
            vec![choice.clone()],
            vec![choice],
        )
        .unwrap();
        let eval = eval_with(vec![task], Arc::new(vocab()), LmConfig::default());
        assert_eq!(eval.context_ids("mc", Split::Dev, 0).unwrap(), [0]);
        // The uniform row EOS: both choices score ln 1/5.
        let model =
            BigramLm::from_mem(&BigramLm::mem_model(5, vec![0.0; 25]), &Device::Cpu).unwrap();
        let ll = eval.log_likelihood(&model, &[("", "ab")]).unwrap();
        assert!((ll[0] - 2.0 * 0.2f64.ln()).abs() < 1e-5, "{ll:?}");
    }

    #[test]
    fn examples_longer_than_max_length_fail_before_evaluation() {
        let cfg = LmConfig {
            max_length: Some(4),
            ..LmConfig::default()
        };
        let mut spec = TaskSpec::new("gen", "-", Metric::ExactMatch);
        spec.max_new_tokens = 2;
        let ok = Task::from_examples(spec.clone(), vec![ex("ab", "c")], vec![ex("ab", "c")]);
        assert!(LmEvaluator::try_new(vec![ok.unwrap()], Arc::new(vocab()), cfg.clone()).is_ok());
        let long = Task::from_examples(
            spec,
            vec![ex("ab", "c"), ex("abc", "c")],
            vec![ex("ab", "c")],
        );
        let e = LmEvaluator::try_new(vec![long.unwrap()], Arc::new(vocab()), cfg.clone())
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains(
                "task `gen`, dev example 2: needs 5 tokens (3 context + 2 max_new_tokens), \
                 more than max_length 4"
            ),
            "{e}"
        );
        let choice = Example::Choice {
            prompt: "ab".into(),
            choices: vec!["a".into(), "abc".into()],
            answer: 0,
        };
        let mc = Task::from_examples(
            TaskSpec::new("mc", "-", Metric::MultipleChoice),
            vec![choice.clone()],
            vec![choice],
        );
        let e = LmEvaluator::try_new(vec![mc.unwrap()], Arc::new(vocab()), cfg.clone())
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("needs 5 tokens (2 context + 3 longest choice)"),
            "{e}"
        );
        let text = vec![Example::Text {
            text: "abcc".into(),
        }];
        let ppl = Task::from_examples(
            TaskSpec::new("ppl", "-", Metric::Perplexity),
            text.clone(),
            text,
        );
        let e = LmEvaluator::try_new(vec![ppl.unwrap()], Arc::new(vocab()), cfg.clone())
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("needs 5 tokens (1 context + 4 text)"), "{e}");

        // A 50 MB prompt is refused by its size, before it is tokenized.
        let huge = "a".repeat(50 << 20);
        let task = Task::from_examples(
            TaskSpec::new("huge", "-", Metric::ExactMatch),
            vec![ex(&huge, "b")],
            vec![ex("a", "b")],
        );
        let e = LmEvaluator::try_new(vec![task.unwrap()], Arc::new(vocab()), cfg)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("task `huge`, dev example 1: the prompt is 52428800 bytes, too long for max_length 4"),
            "{e}"
        );
    }

    #[test]
    fn token_probability_score_is_inverse_perplexity() {
        let mut spec = TaskSpec::new("text", "-", Metric::Perplexity);
        spec.score_transform = ScoreTransform::TokenProbability;
        let texts = vec![Example::Text {
            text: "abca".into(),
        }];
        let task = Task::from_examples(spec, texts.clone(), texts).unwrap();
        let eval = eval_with(vec![task], Arc::new(vocab()), LmConfig::default());
        let s = eval
            .evaluate(
                &candidate(BigramLm::mem_model(5, chain_table())),
                Split::Dev,
            )
            .unwrap();
        let ppl = s.metrics["text/perplexity"];
        assert!((s.metrics["text/score"] - 1.0 / ppl).abs() < 1e-9, "{s:?}");
        assert!((s.metrics["text/nll"] - ppl.ln()).abs() < 1e-9, "{s:?}");
    }
}
