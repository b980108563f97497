//! Scoring candidates. An [`Evaluator`] scores a [`Candidate`] on a split of its tasks and returns
//! a primary value (higher is better) plus named metrics; failures are values ([`EvalError`]), never
//! panics, so a search can log and penalise them.

pub mod classify;

pub mod command;
pub mod double;
pub mod lm;
pub mod runner;
pub mod slurm;
pub mod subsample;
pub mod table;
pub mod tasks;

use std::collections::BTreeMap;

use crate::candidate::Candidate;

/// Which split of the held-out tasks to score on. The search's fitness uses `Dev` only; `Test`
/// is for the final report.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    Dev,
    Test,
}

impl Split {
    /// `dev` or `test` (the task file stem and the `{split}` value of command evaluators).
    pub fn name(self) -> &'static str {
        match self {
            Split::Dev => "dev",
            Split::Test => "test",
        }
    }
}

impl std::fmt::Display for Split {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The result of scoring one candidate.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Score {
    /// The fitness (higher is better).
    pub primary: f64,
    /// Every metric by name (e.g. `add/exact_match`).
    pub metrics: BTreeMap<String, f64>,
}

/// Why a candidate could not be scored.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// The candidate could not be built or run (missing tensor, shape mismatch, ...).
    #[error("candidate failed: {0}")]
    Candidate(String),
    /// An external evaluator exited with a failure status.
    #[error("evaluator command exited with {status}; stderr:\n{stderr}")]
    Exit { status: String, stderr: String },
    /// An external evaluator ran past its timeout.
    #[error("evaluator command timed out after {seconds} s; stderr:\n{stderr}")]
    Timeout { seconds: f64, stderr: String },
    /// An external evaluator printed something that is not one JSON object of metrics.
    #[error(
        "evaluator output is not a JSON object of metrics ({reason}): {stdout:?}; stderr:\n{stderr}"
    )]
    BadOutput {
        reason: String,
        stdout: String,
        stderr: String,
    },
    /// A metric came back NaN or infinite.
    #[error("metric `{metric}` is not finite ({value})")]
    NotFinite { metric: String, value: f64 },
    /// Anything else.
    #[error(transparent)]
    Other(#[from] crate::error::Error),
}

/// Scores candidates. Implementations must be usable from several threads at once.
pub trait Evaluator: Send + Sync {
    /// A short name for logs and reports.
    fn name(&self) -> &str;
    /// Score `candidate` on `split`.
    fn evaluate(&self, candidate: &Candidate, split: Split) -> Result<Score, EvalError>;

    /// Score `candidate` on `split` a slice of examples at a time, stopping once it cannot reach
    /// `race.bound` ([`subsample`]). `None` (the default) when this evaluator cannot score part
    /// of a split: the caller then scores the candidate whole.
    fn evaluate_subsampled(
        &self,
        candidate: &Candidate,
        split: Split,
        race: &subsample::Race,
    ) -> Option<Result<subsample::Raced, EvalError>> {
        let _ = (candidate, split, race);
        None
    }
}
