//! Test doubles: evaluators with a known optimum and evaluators that fail on purpose, plus a
//! tiny bigram "language model" and tokenizer so the LM evaluator can be tested without trained
//! weights.
//!
//! - [`TargetDistance`]: score = −mean squared distance between a merged candidate's tensors and a
//!   target model's. When the target is reachable by the search space (e.g. a linear merge of
//!   the sources with known weights), the optimum is known exactly: score 0.
//! - [`RouteMatch`]: the same idea for data-flow routes: score = −(layer mismatches + squared
//!   scale errors) against a target route.
//! - [`Failing`] always fails with a chosen error (or returns a NaN score); [`Flaky`] wraps an
//!   evaluator and fails on chosen call numbers or candidates — for testing that a search logs and
//!   penalises failures.
//! - [`BigramLm`] + [`CharVocab`] + [`bigram_builder`]: a causal LM whose logits at each position
//!   are a row of one `[vocab, vocab]` tensor named [`BIGRAM_TENSOR`] (so merging two bigram
//!   models merges their tables), with a char-level vocabulary. Plug it into
//!   [`crate::eval::lm::LmEvaluator::with_builder`].

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::{Device, Tensor};

use crate::candidate::{Candidate, CandidateBody, MemModel, Route, TensorMap};
use crate::error::{Error, Result};
use crate::eval::lm::ModelBuilder;
use crate::eval::{EvalError, Evaluator, Score, Split};
use crate::model::CausalLm;
use crate::tensor::TensorBuf;
use crate::tokenizer::TextTokenizer;

/// Scores a merged candidate by how close its tensors are to a target model's:
/// `primary = −Σ‖θ − θ*‖² / Σ numel` over every tensor of the target (metric `mse` is the
/// positive value). A missing tensor or a shape mismatch is an [`EvalError::Candidate`].
pub struct TargetDistance {
    target: Arc<MemModel>,
}

impl TargetDistance {
    /// An evaluator whose optimum is `target`.
    pub fn new(target: Arc<MemModel>) -> Self {
        TargetDistance { target }
    }

    /// Mean squared distance between `tensors` and the target.
    pub fn mse(&self, tensors: &TensorMap) -> Result<f64, EvalError> {
        let mut sum = 0.0f64;
        let mut count = 0usize;
        for (name, want) in &self.target.tensors {
            let got = tensors
                .get(name)
                .ok_or_else(|| EvalError::Candidate(format!("tensor `{name}` not found")))?;
            if got.shape != want.shape {
                return Err(EvalError::Candidate(format!(
                    "tensor `{name}`: shape {:?}, target has {:?}",
                    got.shape, want.shape
                )));
            }
            sum += got
                .values()
                .iter()
                .zip(want.values().iter())
                .map(|(a, b)| {
                    let d = f64::from(*a) - f64::from(*b);
                    d * d
                })
                .sum::<f64>();
            count += want.len();
        }
        Ok(if count == 0 { 0.0 } else { sum / count as f64 })
    }
}

impl Evaluator for TargetDistance {
    fn name(&self) -> &str {
        "target_distance"
    }

    fn evaluate(&self, candidate: &Candidate, _split: Split) -> Result<Score, EvalError> {
        let CandidateBody::Merged(model) = &candidate.body else {
            return Err(EvalError::Candidate(
                "target_distance scores merged (in-memory) candidates only".into(),
            ));
        };
        let mse = self.mse(&model.tensors)?;
        if !mse.is_finite() {
            return Err(EvalError::NotFinite {
                metric: "mse".into(),
                value: mse,
            });
        }
        Ok(Score {
            primary: -mse,
            metrics: [("mse".to_string(), mse)].into(),
        })
    }
}

/// Scores a routed candidate against a target route: `primary = −(m + Σ (s − s*)²)` where `m`
/// counts hop positions whose `(model, layer)` differ (including missing or extra hops, plus one
/// for a different `embed_model`) and the sum runs over the scales of matching positions.
/// Optimum 0 at the target route.
pub struct RouteMatch {
    target: Route,
}

impl RouteMatch {
    /// An evaluator whose optimum is `target`.
    pub fn new(target: Route) -> Self {
        RouteMatch { target }
    }
}

impl Evaluator for RouteMatch {
    fn name(&self) -> &str {
        "route_match"
    }

    fn evaluate(&self, candidate: &Candidate, _split: Split) -> Result<Score, EvalError> {
        let CandidateBody::Routed { route, .. } = &candidate.body else {
            return Err(EvalError::Candidate(
                "route_match scores routed candidates only".into(),
            ));
        };
        let mut mismatches = usize::from(route.embed_model != self.target.embed_model);
        mismatches += route.hops.len().abs_diff(self.target.hops.len());
        let mut scale_err = 0.0f64;
        for (got, want) in route.hops.iter().zip(&self.target.hops) {
            if (got.model, got.layer) != (want.model, want.layer) {
                mismatches += 1;
            } else {
                scale_err += (f64::from(got.scale) - f64::from(want.scale)).powi(2);
            }
        }
        let loss = mismatches as f64 + scale_err;
        if !loss.is_finite() {
            return Err(EvalError::NotFinite {
                metric: "scale_error".into(),
                value: scale_err,
            });
        }
        Ok(Score {
            primary: -loss,
            metrics: [
                ("mismatches".to_string(), mismatches as f64),
                ("scale_error".to_string(), scale_err),
            ]
            .into(),
        })
    }
}

/// Which failure a [`Failing`] evaluator produces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailKind {
    /// `EvalError::Candidate`.
    Candidate,
    /// `EvalError::Exit` (status 1).
    Exit,
    /// `EvalError::Timeout`.
    Timeout,
    /// `EvalError::BadOutput`.
    BadOutput,
    /// `EvalError::NotFinite`.
    NotFinite,
    /// Not an error: `Ok` with a NaN primary — a buggy evaluator the search must survive.
    NanScore,
}

impl FailKind {
    /// The result this kind produces.
    pub fn result(self) -> Result<Score, EvalError> {
        let stderr = "injected failure".to_string();
        Err(match self {
            FailKind::Candidate => EvalError::Candidate("injected failure".into()),
            FailKind::Exit => EvalError::Exit {
                status: "exit status: 1".into(),
                stderr,
            },
            FailKind::Timeout => EvalError::Timeout {
                seconds: 0.0,
                stderr,
            },
            FailKind::BadOutput => EvalError::BadOutput {
                reason: "injected failure".into(),
                stdout: String::new(),
                stderr,
            },
            FailKind::NotFinite => EvalError::NotFinite {
                metric: "primary".into(),
                value: f64::NAN,
            },
            FailKind::NanScore => {
                return Ok(Score {
                    primary: f64::NAN,
                    metrics: Default::default(),
                });
            }
        })
    }
}

/// Fails every call with the same [`FailKind`].
pub struct Failing {
    kind: FailKind,
    calls: AtomicUsize,
}

impl Failing {
    /// An evaluator that always produces `kind`.
    pub fn new(kind: FailKind) -> Self {
        Failing {
            kind,
            calls: AtomicUsize::new(0),
        }
    }

    /// How many times it was called.
    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

impl Evaluator for Failing {
    fn name(&self) -> &str {
        "failing"
    }

    fn evaluate(&self, _candidate: &Candidate, _split: Split) -> Result<Score, EvalError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.kind.result()
    }
}

type CandidatePredicate = dyn Fn(&Candidate) -> bool + Send + Sync;

/// Wraps an evaluator and fails some calls with a [`FailKind`]: either by call number (0-based,
/// counted across threads — deterministic only when calls are sequential) or by a predicate on
/// the candidate (deterministic under any parallelism).
pub struct Flaky {
    inner: Arc<dyn Evaluator>,
    kind: FailKind,
    fail_calls: BTreeSet<usize>,
    predicate: Option<Box<CandidatePredicate>>,
    calls: AtomicUsize,
}

impl Flaky {
    /// Fail calls number `calls` (0-based) with `kind`; pass the others to `inner`.
    pub fn on_calls(
        inner: Arc<dyn Evaluator>,
        calls: impl IntoIterator<Item = usize>,
        kind: FailKind,
    ) -> Self {
        Flaky {
            inner,
            kind,
            fail_calls: calls.into_iter().collect(),
            predicate: None,
            calls: AtomicUsize::new(0),
        }
    }

    /// Fail the candidates for which `predicate` holds with `kind`.
    pub fn when(
        inner: Arc<dyn Evaluator>,
        predicate: impl Fn(&Candidate) -> bool + Send + Sync + 'static,
        kind: FailKind,
    ) -> Self {
        Flaky {
            inner,
            kind,
            fail_calls: BTreeSet::new(),
            predicate: Some(Box::new(predicate)),
            calls: AtomicUsize::new(0),
        }
    }

    /// How many times it was called.
    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

impl Evaluator for Flaky {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn evaluate(&self, candidate: &Candidate, split: Split) -> Result<Score, EvalError> {
        let call = self.calls.fetch_add(1, Ordering::SeqCst);
        let fail = self.fail_calls.contains(&call)
            || self.predicate.as_ref().is_some_and(|p| p(candidate));
        if fail {
            self.kind.result()
        } else {
            self.inner.evaluate(candidate, split)
        }
    }
}

/// The tensor a [`BigramLm`] reads: `[vocab, vocab]`, row `a` = logits of the token after `a`.
pub const BIGRAM_TENSOR: &str = "bigram.weight";

/// A causal LM whose logits at position `t` are row `ids[t]` of a `[vocab, vocab]` table.
pub struct BigramLm {
    table: Tensor,
    vocab: usize,
}

impl BigramLm {
    /// A bigram model from its table (`[vocab, vocab]`).
    pub fn from_table(table: &TensorBuf, device: &Device) -> Result<Self> {
        match table.shape.as_slice() {
            [a, b] if a == b => Ok(BigramLm {
                table: table.to_candle(device)?,
                vocab: *a,
            }),
            s => Err(Error::Tensor {
                tensor: BIGRAM_TENSOR.into(),
                msg: format!("expected a square [vocab, vocab] table, got {s:?}"),
            }),
        }
    }

    /// A bigram model from an in-memory model holding [`BIGRAM_TENSOR`].
    pub fn from_mem(model: &MemModel, device: &Device) -> Result<Self> {
        let table = model
            .tensors
            .get(BIGRAM_TENSOR)
            .ok_or_else(|| Error::MissingTensor {
                model: "<memory>".into(),
                tensor: BIGRAM_TENSOR.into(),
            })?;
        Self::from_table(table, device)
    }

    /// An in-memory model holding `table` (row-major `[vocab, vocab]`) as [`BIGRAM_TENSOR`].
    pub fn mem_model(vocab: usize, table: Vec<f32>) -> MemModel {
        MemModel {
            config: serde_json::json!({ "model_type": "bigram", "vocab_size": vocab }),
            tensors: [(
                BIGRAM_TENSOR.to_string(),
                TensorBuf::new(vec![vocab, vocab], table),
            )]
            .into(),
        }
    }
}

impl CausalLm for BigramLm {
    fn vocab_size(&self) -> usize {
        self.vocab
    }

    fn forward(&self, input_ids: &Tensor) -> Result<Tensor> {
        let (b, s) = input_ids.dims2()?;
        let flat = input_ids.flatten_all()?;
        Ok(self
            .table
            .index_select(&flat, 0)?
            .reshape((b, s, self.vocab))?)
    }
}

/// A [`ModelBuilder`] that builds a [`BigramLm`] from a merged candidate (never touching disk);
/// other candidate kinds are an error.
pub fn bigram_builder() -> ModelBuilder {
    Arc::new(
        |candidate: &Candidate, device: &Device, _dtype: candle_core::DType| match &candidate.body {
            CandidateBody::Merged(m) => {
                Ok(Box::new(BigramLm::from_mem(m, device)?) as Box<dyn CausalLm>)
            }
            _ => Err(Error::msg("bigram double: only merged candidates")),
        },
    )
}

/// A char-level vocabulary for tests: id 0 is EOS, ids `1..` are the given characters in order;
/// no BOS.
pub struct CharVocab {
    chars: Vec<char>,
}

impl CharVocab {
    /// The vocabulary `[EOS, chars...]`.
    pub fn new(chars: &str) -> Self {
        CharVocab {
            chars: chars.chars().collect(),
        }
    }

    /// Vocabulary size including EOS.
    pub fn len(&self) -> usize {
        self.chars.len() + 1
    }

    /// Always false (EOS is always there).
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The id of `c`. Panics if `c` is not in the vocabulary (tests only).
    pub fn id(&self, c: char) -> u32 {
        self.encode(&c.to_string()).expect("char in vocabulary")[0]
    }
}

impl TextTokenizer for CharVocab {
    fn encode(&self, text: &str) -> Result<Vec<u32>> {
        text.chars()
            .map(|c| {
                self.chars
                    .iter()
                    .position(|&x| x == c)
                    .map(|i| i as u32 + 1)
                    .ok_or_else(|| Error::msg(format!("char {c:?} not in vocabulary")))
            })
            .collect()
    }

    fn decode(&self, ids: &[u32]) -> Result<String> {
        ids.iter()
            .filter(|&&i| i != 0)
            .map(|&i| {
                self.chars
                    .get(i as usize - 1)
                    .copied()
                    .ok_or_else(|| Error::msg(format!("token id {i} out of range")))
            })
            .collect()
    }

    fn bos_id(&self) -> Option<u32> {
        None
    }

    fn eos_id(&self) -> Option<u32> {
        Some(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::candidate::Hop;

    fn merged(model: MemModel) -> Candidate {
        Candidate {
            body: CandidateBody::Merged(Arc::new(model)),
            recipe: None,
        }
    }

    #[test]
    fn target_distance_is_minus_mean_squared_error() {
        let target = Arc::new(BigramLm::mem_model(2, vec![0.0, 1.0, 2.0, 3.0]));
        let eval = TargetDistance::new(target.clone());
        let s = eval
            .evaluate(&merged((*target).clone()), Split::Dev)
            .unwrap();
        assert_eq!(s.primary, 0.0);
        // Differences 1, 0, -1, 2 → (1 + 0 + 1 + 4) / 4 = 1.5.
        let c = merged(BigramLm::mem_model(2, vec![1.0, 1.0, 1.0, 5.0]));
        let s = eval.evaluate(&c, Split::Dev).unwrap();
        assert_eq!(s.primary, -1.5);
        assert_eq!(s.metrics["mse"], 1.5);
        let c = merged(BigramLm::mem_model(1, vec![0.0]));
        assert!(matches!(
            eval.evaluate(&c, Split::Dev),
            Err(EvalError::Candidate(m)) if m.contains("shape")
        ));
    }

    #[test]
    fn route_match_counts_mismatches_and_scale_errors() {
        let hop = |model, layer, scale| Hop {
            model,
            layer,
            scale,
        };
        let target = Route {
            embed_model: 0,
            hops: vec![hop(0, 0, 1.0), hop(1, 1, 0.5), hop(0, 2, 1.0)],
        };
        let eval = RouteMatch::new(target.clone());
        let routed = |route| Candidate {
            body: CandidateBody::Routed {
                models: vec![],
                route,
            },
            recipe: None,
        };
        assert_eq!(
            eval.evaluate(&routed(target), Split::Dev).unwrap().primary,
            0.0
        );
        // hop 1 scale off by 0.5 (0.25), hop 2 wrong layer (1), one hop missing (1).
        let r = Route {
            embed_model: 0,
            hops: vec![hop(0, 0, 1.0), hop(1, 1, 1.0)],
        };
        assert_eq!(
            eval.evaluate(&routed(r), Split::Dev).unwrap().primary,
            -1.25
        );
    }

    #[test]
    fn flaky_fails_on_chosen_calls() {
        let inner: Arc<dyn Evaluator> = Arc::new(TargetDistance::new(Arc::new(
            BigramLm::mem_model(1, vec![0.0]),
        )));
        let flaky = Flaky::on_calls(inner, [1], FailKind::Timeout);
        let c = merged(BigramLm::mem_model(1, vec![2.0]));
        assert_eq!(flaky.evaluate(&c, Split::Dev).unwrap().primary, -4.0);
        assert!(matches!(
            flaky.evaluate(&c, Split::Dev),
            Err(EvalError::Timeout { .. })
        ));
        assert!(flaky.evaluate(&c, Split::Dev).is_ok());
        assert_eq!(flaky.calls(), 3);
        let nan = Failing::new(FailKind::NanScore);
        assert!(nan.evaluate(&c, Split::Dev).unwrap().primary.is_nan());
    }

    #[test]
    fn bigram_forward_reads_table_rows() {
        let lm = BigramLm::from_mem(
            &BigramLm::mem_model(2, vec![0.0, 1.0, 2.0, 3.0]),
            &Device::Cpu,
        )
        .unwrap();
        let ids = Tensor::new(&[[1u32, 0, 1]], &Device::Cpu).unwrap();
        let out = lm.forward(&ids).unwrap().to_vec3::<f32>().unwrap();
        assert_eq!(
            out,
            vec![vec![vec![2.0, 3.0], vec![0.0, 1.0], vec![2.0, 3.0]]]
        );
        let v = CharVocab::new("ab\n");
        assert_eq!(v.encode("ba\n").unwrap(), vec![2, 1, 3]);
        assert_eq!(v.decode(&[2, 0, 1]).unwrap(), "ba");
        assert!(v.encode("c").is_err());
    }
}
