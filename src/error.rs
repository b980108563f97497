//! The library's one error type. Variants carry the file, tensor or key that went wrong, so a
//! message alone tells the user what to fix. The binary prints the whole chain with `{:#}`.

use std::path::PathBuf;

/// Everything the library can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O failure on a named path. (The OS error is part of the message, not a separate
    /// source, so a printed chain shows it once.)
    #[error("{}: {err}", path.display())]
    Io { path: PathBuf, err: std::io::Error },

    /// A safetensors file whose header or layout is invalid.
    #[error("{}: invalid safetensors file: {msg}", path.display())]
    Safetensors { path: PathBuf, msg: String },

    /// One tensor in a file is unusable (bad offsets, dtype, shape).
    #[error("{}: tensor `{tensor}`: {msg}", path.display())]
    BadTensor {
        path: PathBuf,
        tensor: String,
        msg: String,
    },

    /// A JSON / TOML / config file that is missing a key or holds a wrong value.
    #[error("{}: {msg}", path.display())]
    Config { path: PathBuf, msg: String },

    /// A tensor needed by a merge is missing from a model.
    #[error("{}: tensor `{tensor}` not found", model.display())]
    MissingTensor { model: PathBuf, tensor: String },

    /// Models that cannot be merged together (different names or shapes).
    #[error("models do not match: {0}")]
    Mismatch(String),

    /// A merge recipe (mergekit YAML) that cannot be used. `line` is 1-based when known.
    #[error("{}{}: {msg}", path.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "<recipe>".into()), line.map(|l| format!(":{l}")).unwrap_or_default())]
    Recipe {
        path: Option<PathBuf>,
        line: Option<usize>,
        msg: String,
    },

    /// A merge method was given inputs it cannot use.
    #[error("merge method `{method}`: {msg}")]
    Method { method: String, msg: String },

    /// A failure computing one output tensor.
    #[error("tensor `{tensor}`: {msg}")]
    Tensor { tensor: String, msg: String },

    /// A failure inside candle (forward pass, training).
    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    /// An evaluator failed to score a candidate.
    #[error("evaluation failed: {0}")]
    Eval(String),

    /// A search definition or search run that cannot go on.
    #[error("search: {0}")]
    Search(String),

    /// Anything else, with a message that says what and where.
    #[error("{0}")]
    Msg(String),
}

impl Error {
    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            err: source,
        }
    }

    /// A free-form error message.
    pub fn msg(msg: impl Into<String>) -> Self {
        Error::Msg(msg.into())
    }
}

/// The library's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
