//! A one-screen summary of a model directory (what `evomerge inspect` prints): architecture,
//! layer count, parameter count, tensors per dtype, size on disk, shards, tied embeddings; for
//! `BASE+ADAPTER`, the base's summary and what the LoRA adapter folds in (r, alpha, scale,
//! target count).
//!
//! ```no_run
//! let summary = evomerge::store::inspect("models/base")?;
//! println!("{summary}");
//! # Ok::<(), evomerge::Error>(())
//! ```

use std::fmt;
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::lora::{AdapterSummary, LoraModel, ModelRefKind};
use super::{Model, TensorSource};
use crate::error::{Error, Result};
use crate::tensor::DType;

/// What [`inspect`] found.
#[derive(Clone, Debug, PartialEq)]
pub struct Summary {
    pub dir: PathBuf,
    /// `architectures[0]` of config.json, else its `model_type`, else `unknown`.
    pub architecture: String,
    /// config.json's `model_type`, if any.
    pub model_type: Option<String>,
    /// From config.json.
    pub layers_config: Option<usize>,
    /// From tensor names (largest layer index + 1).
    pub layers_tensors: Option<usize>,
    pub tensors: usize,
    pub parameters: u64,
    /// (dtype, tensor count, parameter count), for each dtype present, in F32, F16, BF16 order.
    pub dtypes: Vec<(DType, usize, u64)>,
    /// Size of the safetensors files.
    pub bytes_on_disk: u64,
    pub shards: usize,
    pub tied_embeddings: bool,
    /// The LoRA adapter folded into the model (`BASE+ADAPTER`), if any.
    pub adapter: Option<AdapterSummary>,
}

/// Open `dir` (validating every header) and summarise it. `BASE+ADAPTER` (or a PEFT directory
/// with a local base) opens the adapter against the base and summarises both.
pub fn inspect(dir: impl AsRef<Path>) -> Result<Summary> {
    let dir = dir.as_ref();
    // `plain`: the directory itself (a hub id: its snapshot in the local cache).
    let (lora, plain) = match super::lora::parse_ref(dir)? {
        ModelRefKind::Lora { base, adapter } => {
            (Some(LoraModel::open(&base, &adapter)?), dir.to_path_buf())
        }
        ModelRefKind::Plain(p) => match super::lora::peft_base(&p)? {
            Some(base) => (Some(LoraModel::open(&base, &p)?), p),
            None => (None, p),
        },
    };
    let adapter = lora.as_ref().map(|l| l.adapter().summary());
    let opened;
    let model = match &lora {
        Some(l) => l.base(),
        None => {
            opened = Model::open(&plain)?;
            &opened
        }
    };
    let mut summary = summarise(model)?;
    if let Some(a) = adapter {
        let file = a.dir.join(super::lora::ADAPTER_WEIGHTS);
        summary.bytes_on_disk += std::fs::metadata(&file)
            .map_err(|e| Error::io(&file, e))?
            .len();
        summary.adapter = Some(a);
        summary.dir = dir.to_path_buf();
    }
    Ok(summary)
}

fn summarise(model: &Model) -> Result<Summary> {
    let config = model.config();
    let str_key = |k: &str| config.get(k).and_then(Value::as_str).map(str::to_string);
    let model_type = str_key("model_type");
    let architecture = config
        .get("architectures")
        .and_then(Value::as_array)
        .and_then(|a| a.first())
        .and_then(Value::as_str)
        .map(str::to_string)
        .or_else(|| model_type.clone())
        .unwrap_or_else(|| "unknown".into());
    let mut dtypes = Vec::new();
    for dt in [DType::F32, DType::F16, DType::BF16] {
        let (count, params) = model
            .tensors()
            .iter()
            .filter(|t| t.dtype == dt)
            .fold((0usize, 0u64), |(c, p), t| (c + 1, p + t.numel() as u64));
        if count > 0 {
            dtypes.push((dt, count, params));
        }
    }
    let mut bytes_on_disk = 0;
    for file in model.files() {
        bytes_on_disk += std::fs::metadata(file)
            .map_err(|e| Error::io(file, e))?
            .len();
    }
    Ok(Summary {
        dir: model.dir().to_path_buf(),
        architecture,
        model_type,
        layers_config: crate::arch::layer_count(config),
        layers_tensors: crate::arch::layer_count_from_names(
            model.tensors().iter().map(|t| t.name.as_str()),
        ),
        tensors: model.tensors().len(),
        parameters: model.tensors().iter().map(|t| t.numel() as u64).sum(),
        dtypes,
        bytes_on_disk,
        shards: model.files().len(),
        tied_embeddings: crate::arch::tied_embeddings(model as &dyn TensorSource),
        adapter: None,
    })
}

/// `1234567` → `1.23 M`.
fn human(n: u64) -> String {
    let n = n as f64;
    if n >= 1e9 {
        format!("{:.2} B", n / 1e9)
    } else if n >= 1e6 {
        format!("{:.2} M", n / 1e6)
    } else if n >= 1e3 {
        format!("{:.2} K", n / 1e3)
    } else {
        format!("{n}")
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "model:         {}", self.dir.display())?;
        write!(f, "architecture:  {}", self.architecture)?;
        match &self.model_type {
            Some(t) => writeln!(f, " (model_type {t})")?,
            None => writeln!(f)?,
        }
        let layers = |n: Option<usize>| n.map_or("-".to_string(), |n| n.to_string());
        write!(f, "layers:        {}", layers(self.layers_config))?;
        if self.layers_config != self.layers_tensors {
            write!(
                f,
                " (config.json); {} (tensor names)",
                layers(self.layers_tensors)
            )?;
        }
        writeln!(f)?;
        writeln!(
            f,
            "parameters:    {} ({})",
            self.parameters,
            human(self.parameters)
        )?;
        writeln!(f, "tensors:       {}", self.tensors)?;
        for (dt, count, params) in &self.dtypes {
            writeln!(
                f,
                "  {:<5}        {count} tensors, {} parameters",
                dt.to_string(),
                human(*params)
            )?;
        }
        writeln!(
            f,
            "size on disk:  {} bytes ({}B) in {} shard{}",
            self.bytes_on_disk,
            human(self.bytes_on_disk),
            self.shards,
            if self.shards == 1 { "" } else { "s" }
        )?;
        write!(
            f,
            "tied embeddings: {}",
            if self.tied_embeddings { "yes" } else { "no" }
        )?;
        if let Some(a) = &self.adapter {
            write!(
                f,
                "\nLoRA adapter:  {} folded in: r {}, alpha {}, scale {} ({}){}; {} target \
                 tensor{}{}",
                a.dir.display(),
                a.r,
                a.alpha,
                a.scale,
                if a.use_rslora {
                    "rsLoRA: alpha/sqrt(r)"
                } else {
                    "alpha/r"
                },
                if a.patterns {
                    ", other values per module by rank_pattern / alpha_pattern"
                } else {
                    ""
                },
                a.folded,
                if a.folded == 1 { "" } else { "s" },
                if a.replaced > 0 {
                    format!(", {} replaced whole (modules_to_save)", a.replaced)
                } else {
                    String::new()
                }
            )?;
        }
        Ok(())
    }
}
