//! Hugging Face model directories: open (config.json + single or sharded safetensors,
//! memory-mapped, every header validated) and write (shards, index, config, donor files, model
//! card; into a temporary directory renamed into place at the end).
//!
//! ```no_run
//! use evomerge::store::{Model, ModelWriter, TensorSource, WriteConfig};
//! # fn main() -> evomerge::Result<()> {
//! let model = Model::open("models/base")?;
//! let infos = model.tensor_infos();
//! let writer = ModelWriter::create("out".as_ref(), &infos, &WriteConfig::default())?;
//! for info in &infos {
//!     let t = model.read(&info.name)?; // decoded to f32
//!     writer.write(&info.name, &t.values())?; // encoded to info.dtype, any thread
//! }
//! writer.finish(model.config(), Some(model.dir()), "# copy\n")?;
//! # Ok(())
//! # }
//! ```
//!
//! - [`reader`]: [`Model::open`] and header validation.
//! - [`writer`]: [`ModelWriter`], [`output_config`].
//! - [`inspect()`]: a [`Summary`] of a model directory.
//! - [`load_mem`] / [`load_mem_f32`]: a model read into memory (a [`MemModel`]);
//!   [`save_model_dir`]: tensors in memory written as a model directory.
//! - [`lora`]: `BASE+ADAPTER` references, a PEFT LoRA adapter folded into its base as it is read;
//!   [`open_source`] opens any model reference.
//! - [`hub`]: Hugging Face hub ids (`owner/name`) read from the local Hugging Face cache.

mod codec;
pub mod gguf;
pub mod hub;
pub mod inspect;
pub mod lora;
pub mod reader;
pub mod writer;

use std::path::{Path, PathBuf};

use crate::candidate::MemModel;
use crate::error::{Error, Result};
use crate::tensor::DType;

pub use inspect::{Summary, inspect};
pub use reader::Model;
pub use writer::{ModelWriter, WriteConfig, output_config};

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
    /// Decode elements `start .. start + out.len()` of one tensor (flattened) into `out`.
    fn read_range_into(&self, name: &str, start: usize, out: &mut [f32]) -> Result<()>;
    /// Where the model lives, for messages (a directory, or `<memory>`).
    fn label(&self) -> String;
}

/// Open any model reference as a [`TensorSource`]: a model directory ([`Model::open`]), a
/// `BASE+ADAPTER` pair or a PEFT directory with a local base ([`lora::LoraModel`], the adapter
/// folded in as tensors are read). See [`lora`] for how a reference is split. A reference that
/// is not a path but a Hugging Face hub id (`owner/name`) opens its snapshot in the local cache
/// ([`hub`]); one that is not cached is an error that names the id and where it looked.
pub fn open_source(path: &Path) -> Result<std::sync::Arc<dyn TensorSource>> {
    lora::open_ref(path)
}

/// Read a model into memory ([`open_source`]: a directory, `BASE+ADAPTER`, a hub id), every
/// tensor in its stored dtype (a bf16 checkpoint takes its file size, not twice that). Reads a
/// chunk at a time with positioned reads, so the file's pages are not counted in our RSS. The
/// one directory → memory loader; [`MemModel::read_dir`] is the same call.
pub fn load_mem(path: &Path) -> Result<MemModel> {
    const CHUNK: usize = 1 << 16;
    let model = open_source(path)?;
    let mut tensors = crate::candidate::TensorMap::new();
    let mut buf = Vec::new();
    for info in &model.tensor_infos() {
        let n = info.numel();
        let mut t = crate::tensor::TensorBuf::zeros(info.shape.clone(), info.dtype);
        for start in (0..n).step_by(CHUNK) {
            let len = CHUNK.min(n - start);
            buf.resize(len, 0f32);
            model.read_range_into(&info.name, start, &mut buf)?;
            t.write_range(start, &buf);
        }
        tensors.insert(info.name.clone(), t);
    }
    Ok(MemModel {
        config: model.config().clone(),
        tensors,
    })
}

/// [`load_mem`] with every tensor decoded to `f32` (what training, alignment and soups compute
/// on).
pub fn load_mem_f32(path: &Path) -> Result<MemModel> {
    let model = open_source(path)?;
    let mut tensors = crate::candidate::TensorMap::new();
    for info in model.tensor_infos() {
        let mut data = vec![0f32; info.numel()];
        model.read_into(&info.name, &mut data)?;
        tensors.insert(info.name, crate::tensor::TensorBuf::new(info.shape, data));
    }
    Ok(MemModel {
        config: model.config().clone(),
        tensors,
    })
}

/// Write `tensors` (each in its own dtype) with `config` as a Hugging Face model directory `dir`
/// (config.json, model.safetensors, README.md = `model_card`; tokenizer / generation files
/// copied from `donor`). Written into a temporary directory renamed into place at the end; fails
/// if `dir` exists. Returns `dir`.
pub fn save_model_dir(
    dir: &Path,
    config: &serde_json::Value,
    tensors: &crate::candidate::TensorMap,
    donor: Option<&Path>,
    model_card: &str,
) -> Result<PathBuf> {
    let infos: Vec<TensorInfo> = tensors
        .iter()
        .map(|(name, t)| TensorInfo {
            name: name.clone(),
            dtype: t.dtype(),
            shape: t.shape.clone(),
        })
        .collect();
    let writer = ModelWriter::create(dir, &infos, &WriteConfig::default())?;
    for (name, t) in tensors {
        writer.write(name, &t.values())?;
    }
    writer.finish(config, donor, model_card)
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
        let model = open_source(path)?;
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
    fn read_range_into(&self, name: &str, start: usize, out: &mut [f32]) -> Result<()> {
        Model::read_range_into(self, name, start, out)
    }
    fn label(&self) -> String {
        self.dir().display().to_string()
    }
}

impl TensorSource for MemModel {
    fn config(&self) -> &serde_json::Value {
        &self.config
    }
    fn tensor_infos(&self) -> Vec<TensorInfo> {
        self.tensors
            .iter()
            .map(|(name, t)| TensorInfo {
                name: name.clone(),
                dtype: t.dtype(),
                shape: t.shape.clone(),
            })
            .collect()
    }
    fn info(&self, name: &str) -> Option<TensorInfo> {
        self.tensors.get(name).map(|t| TensorInfo {
            name: name.to_string(),
            dtype: t.dtype(),
            shape: t.shape.clone(),
        })
    }
    fn read_into(&self, name: &str, out: &mut [f32]) -> Result<()> {
        let t = self.tensors.get(name).ok_or_else(|| Error::MissingTensor {
            model: PathBuf::from(self.label()),
            tensor: name.to_string(),
        })?;
        if out.len() != t.len() {
            return Err(Error::Tensor {
                tensor: name.to_string(),
                msg: format!(
                    "output buffer holds {} values, tensor has {} (shape {:?})",
                    out.len(),
                    t.len(),
                    t.shape
                ),
            });
        }
        t.read_range_into(0, out);
        Ok(())
    }
    fn read_range_into(&self, name: &str, start: usize, out: &mut [f32]) -> Result<()> {
        let t = self.tensors.get(name).ok_or_else(|| Error::MissingTensor {
            model: PathBuf::from(self.label()),
            tensor: name.to_string(),
        })?;
        if start.checked_add(out.len()).is_none_or(|end| end > t.len()) {
            return Err(Error::Tensor {
                tensor: name.to_string(),
                msg: format!(
                    "elements {start}..{} requested, tensor has {} (shape {:?})",
                    start.saturating_add(out.len()),
                    t.len(),
                    t.shape
                ),
            });
        }
        t.read_range_into(start, out);
        Ok(())
    }
    fn label(&self) -> String {
        "<memory>".to_string()
    }
}
