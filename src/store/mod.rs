//! Hugging Face model directories: open (config.json + single or sharded safetensors,
//! memory-mapped, every header validated) and write (shards, index, config, donor files, model
//! card; into a temporary directory renamed into place at the end).

use std::path::{Path, PathBuf};

use crate::error::Result;
use crate::tensor::{DType, TensorBuf};

/// Name, dtype and shape of one stored tensor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
}

impl TensorInfo {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Read access to a model's tensors, on disk ([`Model`]) or in memory
/// ([`crate::candidate::MemModel`]). The planner and the executor see models only through this.
pub trait TensorSource: Send + Sync {
    /// The model's config.json.
    fn config(&self) -> &serde_json::Value;
    /// Info of every tensor, sorted by name.
    fn tensor_infos(&self) -> Vec<TensorInfo>;
    /// One tensor's info, if present.
    fn info(&self, name: &str) -> Option<TensorInfo>;
    /// Decode one tensor to `f32` into `out` (length = element count).
    fn read_into(&self, name: &str, out: &mut [f32]) -> Result<()>;
    /// Where the model lives, for messages (a directory, or `<memory>`).
    fn label(&self) -> String;
}

/// An opened model directory. Tensors are memory-mapped and decoded to `f32` on demand.
pub struct Model {
    _private: (),
}

impl Model {
    /// Open `dir`: read config.json, map `model.safetensors` or the shards listed in
    /// `model.safetensors.index.json`, and validate every header.
    pub fn open(dir: impl AsRef<Path>) -> Result<Model> {
        let _ = dir;
        todo!("store: Model::open")
    }

    /// The directory this model was opened from.
    pub fn dir(&self) -> &Path {
        todo!()
    }

    /// The parsed config.json.
    pub fn config(&self) -> &serde_json::Value {
        todo!()
    }

    /// All tensors, sorted by name.
    pub fn tensors(&self) -> &[TensorInfo] {
        todo!()
    }

    /// One tensor's info, if present.
    pub fn tensor_info(&self, name: &str) -> Option<&TensorInfo> {
        let _ = name;
        todo!()
    }

    /// Decode a tensor to `f32` into `out` (length = element count).
    pub fn read_into(&self, name: &str, out: &mut [f32]) -> Result<()> {
        let _ = (name, out);
        todo!()
    }

    /// Decode a tensor to a new `f32` buffer.
    pub fn read(&self, name: &str) -> Result<TensorBuf> {
        let _ = name;
        todo!()
    }
}

/// Options for writing a model directory.
#[derive(Clone, Debug)]
pub struct WriteConfig {
    /// Largest shard in bytes (tensor data); more than one shard adds model.safetensors.index.json.
    pub max_shard_size: u64,
}

/// Writes a model directory: the layout (which tensor goes to which shard, at which offset) is
/// fixed up front from the tensor list, so each tensor can be written the moment it is ready,
/// from any thread. Everything goes to a temporary directory beside the target, renamed into place
/// by [`ModelWriter::finish`]; dropping an unfinished writer removes it.
pub struct ModelWriter {
    _private: (),
}

impl ModelWriter {
    /// Lay out `tensors` (with their output dtypes) into shards under a temporary directory next
    /// to `target`. Fails if `target` already exists.
    pub fn create(target: &Path, tensors: &[TensorInfo], config: &WriteConfig) -> Result<Self> {
        let _ = (target, tensors, config);
        todo!()
    }

    /// Encode and write one tensor (any thread, any order). `values.len()` must match its shape.
    pub fn write(&self, name: &str, values: &[f32]) -> Result<()> {
        let _ = (name, values);
        todo!()
    }

    /// Check every tensor was written, write config.json (`config` as given), copy tokenizer /
    /// generation / chat-template files from `donor`, write README.md (`model_card`), then rename
    /// the temporary directory to the target. Returns the target path.
    pub fn finish(
        self,
        config: &serde_json::Value,
        donor: Option<&Path>,
        model_card: &str,
    ) -> Result<PathBuf> {
        let _ = (config, donor, model_card);
        todo!()
    }
}

/// The models a recipe refers to, opened once and shared (memory-mapped models are reused across
/// every candidate of a search). In-memory models can be registered under a name of their own.
#[derive(Clone, Default)]
pub struct ModelSet {
    models: std::collections::BTreeMap<PathBuf, std::sync::Arc<dyn TensorSource>>,
}

impl ModelSet {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// The model registered or opened under `path`, opening it from disk on first use.
    pub fn get_or_open(&mut self, path: &Path) -> Result<std::sync::Arc<dyn TensorSource>> {
        if let Some(m) = self.models.get(path) {
            return Ok(m.clone());
        }
        let model: std::sync::Arc<dyn TensorSource> = std::sync::Arc::new(Model::open(path)?);
        self.models.insert(path.to_path_buf(), model.clone());
        Ok(model)
    }

    /// The model under `path`, if registered or opened already.
    pub fn get(&self, path: &Path) -> Option<std::sync::Arc<dyn TensorSource>> {
        self.models.get(path).cloned()
    }

    /// Register a model (e.g. an in-memory merge) under `path`.
    pub fn insert(&mut self, path: impl Into<PathBuf>, model: std::sync::Arc<dyn TensorSource>) {
        self.models.insert(path.into(), model);
    }
}

impl TensorSource for Model {
    fn config(&self) -> &serde_json::Value {
        Model::config(self)
    }
    fn tensor_infos(&self) -> Vec<TensorInfo> {
        self.tensors().to_vec()
    }
    fn info(&self, name: &str) -> Option<TensorInfo> {
        self.tensor_info(name).cloned()
    }
    fn read_into(&self, name: &str, out: &mut [f32]) -> Result<()> {
        Model::read_into(self, name, out)
    }
    fn label(&self) -> String {
        self.dir().display().to_string()
    }
}
