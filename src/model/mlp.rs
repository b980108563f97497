//! A small multi-layer perceptron classifier on candle, for the digits world (issue 5).
//!
//! The model is a stack of linear layers with an activation between them. Its tensors use
//! PyTorch's `nn.Linear` layout and names: `layers.{i}.weight` is `[out, in]`, `layers.{i}.bias`
//! is `[out]`. A model directory holds `config.json` (`{"model_type": "mlp", "sizes": [64, 128,
//! 10], "activation": "relu"}`) and `model.safetensors`, so merged MLPs go through the same
//! store / merge / evaluate path as language models.
//!
//! ```no_run
//! use evomerge::model::mlp::{Mlp, MlpConfig, TrainConfig};
//! # fn main() -> evomerge::Result<()> {
//! let device = candle_core::Device::Cpu;
//! let mut mlp = Mlp::init(&MlpConfig::relu(vec![64, 64, 10]), 0, &device)?;
//! # let (x, y) = (candle_core::Tensor::zeros((4, 64), candle_core::DType::F32, &device)?, vec![0u32; 4]);
//! mlp.train(&x, &y, &TrainConfig::default(), |_, _| Ok(()))?;
//! mlp.save("out/mlp")?;
//! # Ok(()) }
//! ```
//!
//! Initialisation draws from a seeded `rand` generator (candle's CPU RNG cannot be seeded) with
//! PyTorch's default `U(-1/√in, 1/√in)`; mini-batches are shuffled by the same kind of generator,
//! so training is deterministic for a given seed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{D, Device, Tensor, Var};
use candle_nn::Optimizer;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use crate::candidate::{MemModel, TensorMap};
use crate::error::{Error, Result};
use crate::tensor::TensorBuf;

/// The `model_type` written to config.json.
pub const MODEL_TYPE: &str = "mlp";

/// The non-linearity between layers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Activation {
    Relu,
    Tanh,
    Gelu,
}

impl Activation {
    fn apply(self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Activation::Relu => x.relu()?,
            Activation::Tanh => x.tanh()?,
            Activation::Gelu => x.gelu_erf()?,
        })
    }
}

/// An MLP's shape: `sizes = [input, hidden..., classes]` and the activation between layers.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MlpConfig {
    pub sizes: Vec<usize>,
    pub activation: Activation,
}

impl MlpConfig {
    /// A ReLU MLP with the given layer sizes.
    pub fn relu(sizes: Vec<usize>) -> Self {
        MlpConfig {
            sizes,
            activation: Activation::Relu,
        }
    }

    /// Number of linear layers.
    pub fn n_layers(&self) -> usize {
        self.sizes.len().saturating_sub(1)
    }

    /// The config.json value (with `model_type`).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "model_type": MODEL_TYPE,
            "sizes": self.sizes,
            "activation": self.activation,
        })
    }

    /// Read a config.json value; `origin` names where it came from in errors.
    pub fn from_json(value: &serde_json::Value, origin: &Path) -> Result<Self> {
        let bad = |msg: String| Error::Config {
            path: origin.to_path_buf(),
            msg,
        };
        if value.get("model_type").and_then(|v| v.as_str()) != Some(MODEL_TYPE) {
            return Err(bad(format!(
                "`model_type` is not \"{MODEL_TYPE}\" (got {:?})",
                value.get("model_type")
            )));
        }
        let config: MlpConfig = serde_json::from_value(value.clone())
            .map_err(|e| bad(format!("not an MLP config: {e}")))?;
        if config.sizes.len() < 2 || config.sizes.contains(&0) {
            return Err(bad(format!(
                "`sizes` needs at least two non-zero entries, got {:?}",
                config.sizes
            )));
        }
        Ok(config)
    }

    /// `(name, shape)` of every tensor, in layer order.
    pub fn tensor_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let mut out = Vec::new();
        for i in 0..self.n_layers() {
            let (fan_in, fan_out) = (self.sizes[i], self.sizes[i + 1]);
            out.push((weight_name(i), vec![fan_out, fan_in]));
            out.push((bias_name(i), vec![fan_out]));
        }
        out
    }
}

/// `layers.{i}.weight`.
pub fn weight_name(i: usize) -> String {
    format!("layers.{i}.weight")
}

/// `layers.{i}.bias`.
pub fn bias_name(i: usize) -> String {
    format!("layers.{i}.bias")
}

/// Which optimiser [`Mlp::train`] uses.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Optim {
    /// Plain SGD (candle's has no momentum).
    Sgd,
    /// AdamW with decoupled weight decay.
    AdamW { weight_decay: f64 },
}

/// Hyper-parameters of [`Mlp::train`].
#[derive(Clone, Debug, PartialEq)]
pub struct TrainConfig {
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub optim: Optim,
    /// Seed of the mini-batch shuffling.
    pub seed: u64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            epochs: 20,
            batch_size: 32,
            lr: 1e-3,
            optim: Optim::AdamW { weight_decay: 0.0 },
            seed: 0,
        }
    }
}

/// The optimiser state of one training run.
enum Stepper {
    Sgd(candle_nn::SGD),
    AdamW(candle_nn::AdamW),
}

impl Stepper {
    fn step(&mut self, loss: &Tensor) -> Result<()> {
        match self {
            Stepper::Sgd(o) => o.backward_step(loss)?,
            Stepper::AdamW(o) => o.backward_step(loss)?,
        }
        Ok(())
    }
}

/// An MLP whose parameters are candle [`Var`]s (so the same object trains, runs, and yields
/// gradients for Fisher information).
pub struct Mlp {
    config: MlpConfig,
    /// `(weight [out, in], bias [out])` per layer.
    layers: Vec<(Var, Var)>,
}

impl Mlp {
    /// A freshly initialised MLP: weights and biases drawn from `U(-1/√in, 1/√in)` with a
    /// `StdRng` seeded by `seed`.
    pub fn init(config: &MlpConfig, seed: u64, device: &Device) -> Result<Mlp> {
        if config.sizes.len() < 2 || config.sizes.contains(&0) {
            return Err(Error::msg(format!(
                "MLP sizes need at least two non-zero entries, got {:?}",
                config.sizes
            )));
        }
        let mut rng = StdRng::seed_from_u64(seed);
        let mut layers = Vec::new();
        for i in 0..config.n_layers() {
            let (fan_in, fan_out) = (config.sizes[i], config.sizes[i + 1]);
            let bound = 1.0 / (fan_in as f32).sqrt();
            let mut draw = |n: usize| -> Vec<f32> {
                (0..n).map(|_| rng.random_range(-bound..bound)).collect()
            };
            let w = Tensor::from_vec(draw(fan_out * fan_in), (fan_out, fan_in), device)?;
            let b = Tensor::from_vec(draw(fan_out), fan_out, device)?;
            layers.push((Var::from_tensor(&w)?, Var::from_tensor(&b)?));
        }
        Ok(Mlp {
            config: config.clone(),
            layers,
        })
    }

    /// Build from named tensors (`layers.{i}.weight` / `.bias`); shapes are checked against
    /// `config`. `origin` names the source in errors.
    pub fn from_tensors(
        config: &MlpConfig,
        tensors: &TensorMap,
        origin: &Path,
        device: &Device,
    ) -> Result<Mlp> {
        let get = |name: &str, shape: &[usize]| -> Result<Var> {
            let t = tensors.get(name).ok_or_else(|| Error::MissingTensor {
                model: origin.to_path_buf(),
                tensor: name.to_string(),
            })?;
            if t.shape != shape {
                return Err(Error::BadTensor {
                    path: origin.to_path_buf(),
                    tensor: name.to_string(),
                    msg: format!("shape {:?}, the config needs {shape:?}", t.shape),
                });
            }
            Ok(Var::from_tensor(&t.to_candle(device)?)?)
        };
        let shapes = config.tensor_shapes();
        let mut layers = Vec::new();
        for pair in shapes.chunks(2) {
            layers.push((get(&pair[0].0, &pair[0].1)?, get(&pair[1].0, &pair[1].1)?));
        }
        Ok(Mlp {
            config: config.clone(),
            layers,
        })
    }

    /// Build from an in-memory model whose config.json is an MLP config.
    pub fn from_mem(model: &MemModel, device: &Device) -> Result<Mlp> {
        let origin = Path::new("<memory>");
        let config = MlpConfig::from_json(&model.config, origin)?;
        Mlp::from_tensors(&config, &model.tensors, origin, device)
    }

    /// The config.
    pub fn config(&self) -> &MlpConfig {
        &self.config
    }

    /// The trainable parameters, `[w0, b0, w1, b1, ...]`.
    pub fn vars(&self) -> Vec<Var> {
        self.layers
            .iter()
            .flat_map(|(w, b)| [w.clone(), b.clone()])
            .collect()
    }

    /// `(name, var)` of every parameter, in layer order.
    pub fn named_vars(&self) -> Vec<(String, Var)> {
        self.layers
            .iter()
            .enumerate()
            .flat_map(|(i, (w, b))| [(weight_name(i), w.clone()), (bias_name(i), b.clone())])
            .collect()
    }

    /// A deep copy (the copy's parameters do not share storage with `self`).
    pub fn snapshot(&self) -> Result<Mlp> {
        let mut layers = Vec::new();
        for (w, b) in &self.layers {
            layers.push((
                Var::from_tensor(&w.as_tensor().copy()?)?,
                Var::from_tensor(&b.as_tensor().copy()?)?,
            ));
        }
        Ok(Mlp {
            config: self.config.clone(),
            layers,
        })
    }

    /// Logits `[batch, classes]` for inputs `[batch, in]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.forward_with_inputs(x)?.0)
    }

    /// Logits, and the input of every linear layer (`inputs[i]` is what `layers.{i}` sees:
    /// `x` for the first, the previous activation after that). RegMean's Gram matrices are built
    /// from these.
    pub fn forward_with_inputs(&self, x: &Tensor) -> Result<(Tensor, Vec<Tensor>)> {
        let mut h = x.clone();
        let mut inputs = Vec::with_capacity(self.layers.len());
        for (i, (w, b)) in self.layers.iter().enumerate() {
            inputs.push(h.clone());
            h = h
                .matmul(&w.as_tensor().t()?)?
                .broadcast_add(b.as_tensor())?;
            if i + 1 < self.layers.len() {
                h = self.config.activation.apply(&h)?;
            }
        }
        Ok((h, inputs))
    }

    /// Predicted class per row of `x`.
    pub fn predict(&self, x: &Tensor) -> Result<Vec<u32>> {
        Ok(self.forward(x)?.argmax(D::Minus1)?.to_vec1::<u32>()?)
    }

    /// Fraction of rows of `x` whose predicted class equals `y`.
    pub fn accuracy(&self, x: &Tensor, y: &[u32]) -> Result<f64> {
        let pred = self.predict(x)?;
        if pred.len() != y.len() {
            return Err(Error::msg(format!(
                "{} inputs but {} labels",
                pred.len(),
                y.len()
            )));
        }
        if y.is_empty() {
            return Ok(0.0);
        }
        let hits = pred.iter().zip(y).filter(|(p, t)| p == t).count();
        Ok(hits as f64 / y.len() as f64)
    }

    /// Mean cross-entropy of `x` against labels `y`.
    pub fn loss(&self, x: &Tensor, y: &[u32]) -> Result<f64> {
        let target = Tensor::from_slice(y, y.len(), x.device())?;
        let loss = candle_nn::loss::cross_entropy(&self.forward(x)?, &target)?;
        Ok(f64::from(loss.to_scalar::<f32>()?))
    }

    /// Train on `x` `[n, in]` and labels `y` with mini-batch cross-entropy. `on_epoch(epoch, &self)`
    /// runs after every epoch (1-based), e.g. to keep checkpoints for SWA. Returns the mean training
    /// loss of the last epoch.
    pub fn train(
        &mut self,
        x: &Tensor,
        y: &[u32],
        config: &TrainConfig,
        mut on_epoch: impl FnMut(usize, &Mlp) -> Result<()>,
    ) -> Result<f64> {
        let n = y.len();
        if x.dim(0)? != n || n == 0 {
            return Err(Error::msg(format!(
                "training needs as many inputs as labels (and some): {} inputs, {n} labels",
                x.dim(0)?
            )));
        }
        let batch_size = config.batch_size.max(1);
        let labels = Tensor::from_slice(y, n, x.device())?;
        let mut optimizer = match config.optim {
            Optim::Sgd => Stepper::Sgd(candle_nn::SGD::new(self.vars(), config.lr)?),
            Optim::AdamW { weight_decay } => {
                let params = candle_nn::ParamsAdamW {
                    lr: config.lr,
                    weight_decay,
                    ..Default::default()
                };
                Stepper::AdamW(candle_nn::AdamW::new(self.vars(), params)?)
            }
        };
        let mut rng = StdRng::seed_from_u64(config.seed);
        let mut order: Vec<u32> = (0..n as u32).collect();
        let mut last = 0.0;
        for epoch in 1..=config.epochs {
            order.shuffle(&mut rng);
            let mut total = 0.0;
            for chunk in order.chunks(batch_size) {
                let idx = Tensor::from_slice(chunk, chunk.len(), x.device())?;
                let xb = x.index_select(&idx, 0)?;
                let yb = labels.index_select(&idx, 0)?;
                let loss = candle_nn::loss::cross_entropy(&self.forward(&xb)?, &yb)?;
                optimizer.step(&loss)?;
                total += f64::from(loss.to_scalar::<f32>()?) * chunk.len() as f64;
            }
            last = total / n as f64;
            on_epoch(epoch, self)?;
        }
        Ok(last)
    }

    /// The parameters as named `f32` tensors.
    pub fn tensors(&self) -> Result<TensorMap> {
        let mut out = BTreeMap::new();
        for (name, var) in self.named_vars() {
            let t = var.as_tensor();
            let data = t.flatten_all()?.to_vec1::<f32>()?;
            out.insert(name, TensorBuf::new(t.dims().to_vec(), data));
        }
        Ok(out)
    }

    /// The model as an in-memory model (config.json + tensors).
    pub fn to_mem(&self) -> Result<MemModel> {
        Ok(MemModel {
            config: self.config.to_json(),
            tensors: self.tensors()?,
        })
    }

    /// Write `dir/config.json` and `dir/model.safetensors` (creating `dir`).
    pub fn save(&self, dir: impl AsRef<Path>) -> Result<()> {
        save_mem(&self.to_mem()?, dir.as_ref())
    }

    /// Load a directory written by [`Mlp::save`] (or by a merge of MLPs).
    pub fn load(dir: impl AsRef<Path>, device: &Device) -> Result<Mlp> {
        let dir = dir.as_ref();
        let mem = load_mem(dir)?;
        let config = MlpConfig::from_json(&mem.config, &dir.join("config.json"))?;
        Mlp::from_tensors(
            &config,
            &mem.tensors,
            &dir.join("model.safetensors"),
            device,
        )
    }
}

/// Write a model directory: `config.json` and one `model.safetensors` (f32).
pub fn save_mem(model: &MemModel, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let config_path = dir.join("config.json");
    let text = serde_json::to_string_pretty(&model.config)
        .map_err(|e| Error::msg(format!("cannot serialise config.json: {e}")))?;
    std::fs::write(&config_path, text + "\n").map_err(|e| Error::io(&config_path, e))?;
    save_tensors(&dir.join("model.safetensors"), &model.tensors)
}

/// Read a model directory with `config.json` and one `model.safetensors`.
pub fn load_mem(dir: &Path) -> Result<MemModel> {
    let config_path = dir.join("config.json");
    let text = std::fs::read_to_string(&config_path).map_err(|e| Error::io(&config_path, e))?;
    let config = serde_json::from_str(&text).map_err(|e| Error::Config {
        path: config_path.clone(),
        msg: format!("not JSON: {e}"),
    })?;
    let tensors = load_tensors(&dir.join("model.safetensors"))?;
    Ok(MemModel { config, tensors })
}

/// Write named `f32` tensors to one safetensors file (Fisher diagonals, Gram matrices, models).
pub fn save_tensors(path: &Path, tensors: &TensorMap) -> Result<()> {
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(name, t)| {
            let mut b = vec![0u8; t.len() * 4];
            crate::tensor::DType::F32.encode_into(&t.values(), &mut b);
            (name.clone(), t.shape.clone(), b)
        })
        .collect();
    let mut views = Vec::with_capacity(bytes.len());
    for (name, shape, b) in &bytes {
        let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), b)
            .map_err(|e| Error::BadTensor {
                path: path.to_path_buf(),
                tensor: name.clone(),
                msg: e.to_string(),
            })?;
        views.push((name.clone(), view));
    }
    let data = safetensors::serialize(views, None).map_err(|e| Error::Safetensors {
        path: path.to_path_buf(),
        msg: e.to_string(),
    })?;
    let tmp: PathBuf = path.with_extension("safetensors.tmp");
    std::fs::write(&tmp, data).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// Read every tensor of a safetensors file as `f32` (F32, F16 and BF16 are accepted).
pub fn load_tensors(path: &Path) -> Result<TensorMap> {
    let buffer = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let st = safetensors::SafeTensors::deserialize(&buffer).map_err(|e| Error::Safetensors {
        path: path.to_path_buf(),
        msg: e.to_string(),
    })?;
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        let dtype = match view.dtype() {
            safetensors::Dtype::F32 => crate::tensor::DType::F32,
            safetensors::Dtype::F16 => crate::tensor::DType::F16,
            safetensors::Dtype::BF16 => crate::tensor::DType::BF16,
            other => {
                return Err(Error::BadTensor {
                    path: path.to_path_buf(),
                    tensor: name,
                    msg: format!("unsupported dtype {other:?}"),
                });
            }
        };
        let shape = view.shape().to_vec();
        let mut data = vec![0f32; shape.iter().product()];
        dtype.decode_into(view.data(), &mut data);
        out.insert(name, TensorBuf::new(shape, data));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forward_matches_hand_computation() {
        // One hidden ReLU unit pair: W0 = [[1, -1], [2, 0]], b0 = [0, -1]; W1 = [[1, 1]], b1 = [0.5].
        let mut t = TensorMap::new();
        t.insert(
            "layers.0.weight".into(),
            TensorBuf::new(vec![2, 2], vec![1., -1., 2., 0.]),
        );
        t.insert(
            "layers.0.bias".into(),
            TensorBuf::new(vec![2], vec![0., -1.]),
        );
        t.insert(
            "layers.1.weight".into(),
            TensorBuf::new(vec![1, 2], vec![1., 1.]),
        );
        t.insert("layers.1.bias".into(), TensorBuf::new(vec![1], vec![0.5]));
        let cfg = MlpConfig::relu(vec![2, 2, 1]);
        let mlp = Mlp::from_tensors(&cfg, &t, Path::new("t"), &Device::Cpu).unwrap();
        let x = Tensor::from_vec(vec![1f32, 2., 3., 1.], (2, 2), &Device::Cpu).unwrap();
        // x=[1,2]: h = relu([-1, 1]) = [0, 1] → 1.5.  x=[3,1]: h = relu([2, 5]) → 7.5.
        let out = mlp.forward(&x).unwrap().flatten_all().unwrap();
        assert_eq!(out.to_vec1::<f32>().unwrap(), vec![1.5, 7.5]);
    }

    #[test]
    fn init_is_seeded_and_round_trips_through_memory() {
        let cfg = MlpConfig::relu(vec![3, 4, 2]);
        let a = Mlp::init(&cfg, 7, &Device::Cpu).unwrap().tensors().unwrap();
        let b = Mlp::init(&cfg, 7, &Device::Cpu).unwrap().tensors().unwrap();
        let c = Mlp::init(&cfg, 8, &Device::Cpu).unwrap().tensors().unwrap();
        assert_eq!(a, b);
        assert_ne!(a, c);
        let bound = 1.0 / 3f32.sqrt();
        assert!(
            a["layers.0.weight"]
                .values()
                .iter()
                .all(|v| v.abs() <= bound)
        );
        let mem = MemModel {
            config: cfg.to_json(),
            tensors: a.clone(),
        };
        let back = Mlp::from_mem(&mem, &Device::Cpu)
            .unwrap()
            .tensors()
            .unwrap();
        assert_eq!(back, a);
    }

    #[test]
    fn save_and_load_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = MlpConfig::relu(vec![3, 5, 2]);
        let mlp = Mlp::init(&cfg, 1, &Device::Cpu).unwrap();
        mlp.save(dir.path().join("m")).unwrap();
        let back = Mlp::load(dir.path().join("m"), &Device::Cpu).unwrap();
        assert_eq!(back.config(), &cfg);
        assert_eq!(back.tensors().unwrap(), mlp.tensors().unwrap());
    }

    #[test]
    fn wrong_shape_names_the_tensor() {
        let cfg = MlpConfig::relu(vec![3, 5, 2]);
        let mut t = Mlp::init(&cfg, 1, &Device::Cpu).unwrap().tensors().unwrap();
        t.insert("layers.1.bias".into(), TensorBuf::new(vec![3], vec![0.; 3]));
        let err = Mlp::from_tensors(&cfg, &t, Path::new("m"), &Device::Cpu)
            .err()
            .unwrap();
        assert!(err.to_string().contains("layers.1.bias"), "{err}");
    }
}
