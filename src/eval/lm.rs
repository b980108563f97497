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
//! written to disk), then every task is scored:
//!
//! - **exact_match**: greedy generation from `[BOS] + prompt`, stopping at EOS, at the task's
//!   stop string (cut off) or after `max_new_tokens`; correct when the output equals the target
//!   after trimming whitespace. Score = accuracy.
//! - **multiple_choice**: for each choice, the summed log-probability of the choice's tokens
//!   after `[BOS] + prompt` (prompt and choice tokenized separately, then concatenated); the
//!   argmax (first on ties) is the prediction. Score = accuracy.
//! - **perplexity**: `exp(−Σ log p / N)` pooled over all tokens of all texts (each text after an
//!   optional BOS; without BOS the first token is not predicted). Score = `1 / perplexity`, the
//!   geometric-mean probability of a token, which lies in (0, 1] like an accuracy, so tasks of
//!   all three kinds can be averaged.
//!
//! Metrics: `<task>/<metric>` (accuracy in [0, 1], or the perplexity) and `<task>/score` (the
//! task's contribution). The primary value is the weighted mean of task scores.
//!
//! Batching: sequences are sorted by length, cut into batches of `batch_size`, right-padded and
//! run with rayon over batches (in the caller's pool, so a search that caps concurrent
//! evaluations also caps this). Right padding is exact without an attention mask because the
//! model is causal: a position never sees the padding after it. Generation re-runs the full
//! forward each step (the forward returns every position; there is no KV cache), dropping
//! finished sequences from the batch. Examples are tokenized once, when the evaluator is made.

use std::sync::Arc;

use candle_core::{DType, Device};

use crate::candidate::Candidate;
use crate::error::{Error, Result};
use crate::eval::runner::Runner;
use crate::eval::tasks::{Example, Metric, Task};
use crate::eval::{EvalError, Evaluator, Score, Split};
use crate::model::CausalLm;
use crate::tokenizer::TextTokenizer;

/// Builds a runnable model for a candidate on a device. The default is [`crate::model::build`];
/// tests plug in doubles such as [`crate::eval::double::bigram_builder`].
pub type ModelBuilder =
    Arc<dyn Fn(&Candidate, &Device, DType) -> Result<Box<dyn CausalLm>> + Send + Sync>;

/// Options of the LM evaluator.
#[derive(Clone, Debug)]
pub struct LmConfig {
    /// Where the forward runs. Default CPU.
    pub device: Device,
    /// The compute dtype of the forward (`f32`, `bf16`, `f16`). Default `f32`.
    pub dtype: DType,
    /// Sequences per forward call. Default 32.
    pub batch_size: usize,
    /// The longest sequence (prompt + generated tokens) any example may need; `None` means no
    /// limit beyond the model's own.
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
        answer: usize,
    },
    Text {
        ids: Vec<u32>,
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
            Encoded::Text { ids } => m(ids),
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
    /// An evaluator for `tasks` with models built by [`crate::model::build`]. Tokenizes every
    /// example now. Fails when there are no tasks, task names repeat, the weights sum to zero,
    /// or an example cannot be tokenized (the message names the task, split and example).
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
        let mut encoded = Vec::with_capacity(tasks.len());
        for task in tasks {
            let dev = encode_split(&task, Split::Dev, tokenizer.as_ref())?;
            let test = encode_split(&task, Split::Test, tokenizer.as_ref())?;
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

    fn runner<'a>(&'a self, model: &'a dyn CausalLm) -> Runner<'a> {
        Runner {
            model,
            device: &self.config.device,
            batch_size: self.config.batch_size,
        }
    }

    /// Greedy generation with this evaluator's tokenizer and batching: each output is cut at
    /// `stop` (unless empty) and ends at EOS or after `max_new_tokens`. For inspecting what a
    /// model answers.
    pub fn generate(
        &self,
        model: &dyn CausalLm,
        prompts: &[&str],
        max_new_tokens: usize,
        stop: &str,
    ) -> Result<Vec<String>, EvalError> {
        let tok = self.tokenizer.as_ref();
        let mut encoded = Vec::with_capacity(prompts.len());
        for p in prompts {
            let mut ids: Vec<u32> = tok.bos_id().into_iter().collect();
            ids.extend(tok.encode(p)?);
            if ids.is_empty() {
                return Err(EvalError::Candidate(
                    "empty prompt and the tokenizer has no BOS".into(),
                ));
            }
            encoded.push(ids);
        }
        let rows: Vec<&[u32]> = encoded.iter().map(Vec::as_slice).collect();
        self.runner(model)
            .generate(&rows, max_new_tokens, stop, tok)
    }

    /// Σ log p(continuation | [BOS] + context) for each `(context, continuation)` pair (both
    /// tokenized separately), batched like the multiple-choice metric.
    pub fn log_likelihood(
        &self,
        model: &dyn CausalLm,
        pairs: &[(&str, &str)],
    ) -> Result<Vec<f64>, EvalError> {
        let tok = self.tokenizer.as_ref();
        let mut seqs = Vec::with_capacity(pairs.len());
        for (context, continuation) in pairs {
            let mut ids: Vec<u32> = tok.bos_id().into_iter().collect();
            ids.extend(tok.encode(context)?);
            let start = ids.len();
            if start == 0 {
                return Err(EvalError::Candidate(
                    "empty context and the tokenizer has no BOS".into(),
                ));
            }
            ids.extend(tok.encode(continuation)?);
            seqs.push((ids, start));
        }
        self.runner(model)
            .log_likelihoods(&seqs)
            .map_err(candidate_err)
    }

    /// Score an already built model on `split`.
    pub fn score_model(&self, model: &dyn CausalLm, split: Split) -> Result<Score, EvalError> {
        let vocab = model.vocab_size();
        if self.max_id as usize >= vocab {
            return Err(EvalError::Candidate(format!(
                "the task tokens reach id {} but the model's vocabulary has {vocab} entries",
                self.max_id
            )));
        }
        let run = self.runner(model);
        let mut metrics = std::collections::BTreeMap::new();
        let mut weighted = 0.0;
        let mut total_weight = 0.0;
        for et in &self.tasks {
            let spec = &et.task.spec;
            let examples = match split {
                Split::Dev => &et.dev,
                Split::Test => &et.test,
            };
            let (value, score) = match spec.metric {
                Metric::ExactMatch => {
                    let acc = self.exact_match(&run, examples, spec)?;
                    (acc, acc)
                }
                Metric::MultipleChoice => {
                    let acc = choice_accuracy(&run, examples).map_err(candidate_err)?;
                    (acc, acc)
                }
                Metric::Perplexity => {
                    let ppl = perplexity(&run, examples).map_err(candidate_err)?;
                    (ppl, 1.0 / ppl)
                }
            };
            let key = et.task.metric_key();
            if !value.is_finite() || !score.is_finite() {
                return Err(EvalError::NotFinite { metric: key, value });
            }
            metrics.insert(key, value);
            metrics.insert(format!("{}/score", spec.name), score);
            weighted += spec.weight * score;
            total_weight += spec.weight;
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

    fn exact_match(
        &self,
        run: &Runner<'_>,
        examples: &[Encoded],
        spec: &crate::eval::tasks::TaskSpec,
    ) -> Result<f64, EvalError> {
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
            spec.max_new_tokens,
            &spec.stop,
            self.tokenizer.as_ref(),
        )?;
        let correct = outputs
            .iter()
            .zip(&targets)
            .filter(|(o, t)| o.trim() == t.trim())
            .count();
        Ok(correct as f64 / targets.len().max(1) as f64)
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
}

fn candidate_err(e: Error) -> EvalError {
    EvalError::Candidate(e.to_string())
}

fn encode_split(task: &Task, split: Split, tok: &dyn TextTokenizer) -> Result<Vec<Encoded>> {
    let bos = tok.bos_id();
    let with_bos = |text: &str| -> Result<Vec<u32>> {
        let mut ids: Vec<u32> = bos.into_iter().collect();
        ids.extend(tok.encode(text)?);
        Ok(ids)
    };
    let name = &task.spec.name;
    let split_name = split.name();
    let fail = |i: usize, msg: String| {
        Error::Eval(format!(
            "task `{name}`, {split_name} example {}: {msg}",
            i + 1
        ))
    };
    task.examples(split)
        .iter()
        .enumerate()
        .map(|(i, e)| -> Result<Encoded> {
            let enc = |text: &str| with_bos(text).map_err(|e| fail(i, e.to_string()));
            Ok(match e {
                Example::Generation { prompt, target } => {
                    let prompt = enc(prompt)?;
                    if prompt.is_empty() {
                        return Err(fail(i, "empty prompt and the tokenizer has no BOS".into()));
                    }
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
                    let prompt = enc(prompt)?;
                    if prompt.is_empty() {
                        return Err(fail(i, "empty prompt and the tokenizer has no BOS".into()));
                    }
                    let choices = choices
                        .iter()
                        .map(|c| {
                            let ids = tok.encode(c).map_err(|e| fail(i, e.to_string()))?;
                            if ids.is_empty() {
                                return Err(fail(i, format!("choice {c:?} has no tokens")));
                            }
                            Ok(ids)
                        })
                        .collect::<Result<Vec<_>>>()?;
                    Encoded::Choice {
                        prompt,
                        choices,
                        answer: *answer,
                    }
                }
                Example::Text { text } => {
                    let ids = enc(text)?;
                    if ids.len() < 2 {
                        return Err(fail(
                            i,
                            "text needs at least one token to predict (two with no BOS)".into(),
                        ));
                    }
                    Encoded::Text { ids }
                }
            })
        })
        .collect()
}

/// Multiple-choice accuracy: argmax of summed choice log-likelihood (first on ties).
fn choice_accuracy(run: &Runner<'_>, examples: &[Encoded]) -> Result<f64> {
    let mut seqs = Vec::new();
    let mut owner = Vec::new();
    for (i, e) in examples.iter().enumerate() {
        if let Encoded::Choice {
            prompt, choices, ..
        } = e
        {
            for c in choices {
                let mut s = prompt.clone();
                s.extend(c);
                seqs.push((s, prompt.len()));
                owner.push(i);
            }
        }
    }
    let ll = run.log_likelihoods(&seqs)?;
    let mut best: Vec<Option<(usize, f64)>> = vec![None; examples.len()];
    let mut choice_index = vec![0usize; examples.len()];
    for (&i, &l) in owner.iter().zip(&ll) {
        let c = choice_index[i];
        choice_index[i] += 1;
        let l = if l.is_nan() { f64::NEG_INFINITY } else { l };
        if best[i].is_none_or(|(_, b)| l > b) {
            best[i] = Some((c, l));
        }
    }
    let mut correct = 0usize;
    let mut n = 0usize;
    for (e, b) in examples.iter().zip(&best) {
        if let (Encoded::Choice { answer, .. }, Some((pick, _))) = (e, b) {
            n += 1;
            correct += usize::from(pick == answer);
        }
    }
    Ok(correct as f64 / n.max(1) as f64)
}

/// Corpus perplexity `exp(−Σ log p / N)`.
fn perplexity(run: &Runner<'_>, examples: &[Encoded]) -> Result<f64> {
    let seqs: Vec<(Vec<u32>, usize)> = examples
        .iter()
        .filter_map(|e| match e {
            Encoded::Text { ids } => Some((ids.clone(), 1)),
            _ => None,
        })
        .collect();
    let tokens: usize = seqs.iter().map(|(s, start)| s.len() - start).sum();
    let ll: f64 = run.log_likelihoods(&seqs)?.iter().sum();
    Ok((-ll / tokens.max(1) as f64).exp())
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
        // "abc\n" predicts 3 successors, "ca" one non-successor.
        let hi = (5f64.exp() / (5f64.exp() + 4.0)).ln();
        let lo = (1.0 / (5f64.exp() + 4.0)).ln();
        let want = (-(3.0 * hi + lo) / 4.0).exp();
        assert!(
            (s.metrics["text/perplexity"] - want).abs() < 1e-4 * want,
            "{s:?}"
        );
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
}
