//! Classification: labelled data sets, the UCI handwritten digits bundled with the crate, fixed
//! stratified train / dev / test splits, and [`ClassifyEvaluator`] (accuracy of an MLP candidate).
//!
//! ```no_run
//! use evomerge::eval::classify::{ClassifyEvaluator, Splits};
//! # fn main() -> evomerge::Result<()> {
//! let splits = Splits::digits(0)?; // 60 / 20 / 20 of every class, fixed by the seed
//! let evaluator = ClassifyEvaluator::new("digits", splits.dev.clone(), splits.test.clone());
//! # Ok(()) }
//! ```
//!
//! The digits (E. Alpaydin, C. Kaynak 1998, UCI, CC BY 4.0; `assets/digits/SOURCE.md`) are 1797
//! 8×8 images with pixels in 0..=16, scaled here to [0, 1].

use std::io::Read;
use std::path::Path;

use candle_core::{Device, Tensor};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;

use crate::candidate::{Candidate, CandidateBody};
use crate::error::{Error, Result};
use crate::eval::{EvalError, Evaluator, Score, Split};
use crate::model::mlp::Mlp;

/// The bundled `assets/digits/digits.csv.gz`.
const DIGITS_GZ: &[u8] = include_bytes!("../../assets/digits/digits.csv.gz");

/// Rows of features with one class label each.
#[derive(Clone, Debug, PartialEq)]
pub struct Dataset {
    /// Row-major `[n, dim]`.
    pub x: Vec<f32>,
    pub y: Vec<u32>,
    pub dim: usize,
}

impl Dataset {
    /// Number of rows.
    pub fn len(&self) -> usize {
        self.y.len()
    }

    /// True when there are no rows.
    pub fn is_empty(&self) -> bool {
        self.y.is_empty()
    }

    /// The rows at `indices`, in that order.
    pub fn select(&self, indices: &[usize]) -> Dataset {
        let mut x = Vec::with_capacity(indices.len() * self.dim);
        let mut y = Vec::with_capacity(indices.len());
        for &i in indices {
            x.extend_from_slice(&self.x[i * self.dim..(i + 1) * self.dim]);
            y.push(self.y[i]);
        }
        Dataset {
            x,
            y,
            dim: self.dim,
        }
    }

    /// The rows whose label is in `classes`.
    pub fn with_classes(&self, classes: &[u32]) -> Dataset {
        let idx: Vec<usize> = (0..self.len())
            .filter(|&i| classes.contains(&self.y[i]))
            .collect();
        self.select(&idx)
    }

    /// The first `n` rows of a seeded shuffle (a random subset of size `min(n, len)`).
    pub fn sample(&self, n: usize, seed: u64) -> Dataset {
        let mut idx: Vec<usize> = (0..self.len()).collect();
        idx.shuffle(&mut StdRng::seed_from_u64(seed));
        idx.truncate(n);
        self.select(&idx)
    }

    /// Features as a `[n, dim]` candle tensor.
    pub fn x_tensor(&self, device: &Device) -> Result<Tensor> {
        Ok(Tensor::from_slice(&self.x, (self.len(), self.dim), device)?)
    }

    /// Split into train / dev / test with the given fractions of every class (stratified): each
    /// class's rows are shuffled by a `StdRng` seeded with `seed`, and cut at
    /// `round(frac_train·n_c)` and `round((frac_train + frac_dev)·n_c)`.
    pub fn stratified_split(&self, frac_train: f64, frac_dev: f64, seed: u64) -> Result<Splits> {
        if !(0.0..=1.0).contains(&frac_train)
            || !(0.0..=1.0).contains(&frac_dev)
            || frac_train + frac_dev > 1.0
        {
            return Err(Error::msg(format!(
                "split fractions train={frac_train}, dev={frac_dev} must be in [0, 1] and sum to at most 1"
            )));
        }
        let mut rng = StdRng::seed_from_u64(seed);
        let mut classes: Vec<u32> = self.y.clone();
        classes.sort_unstable();
        classes.dedup();
        let (mut tr, mut dv, mut te) = (Vec::new(), Vec::new(), Vec::new());
        for c in classes {
            let mut idx: Vec<usize> = (0..self.len()).filter(|&i| self.y[i] == c).collect();
            idx.shuffle(&mut rng);
            let n = idx.len() as f64;
            let a = (frac_train * n).round() as usize;
            let b = ((frac_train + frac_dev) * n).round() as usize;
            tr.extend_from_slice(&idx[..a]);
            dv.extend_from_slice(&idx[a..b]);
            te.extend_from_slice(&idx[b..]);
        }
        // Sort so that each split keeps the file's order (only membership depends on the seed).
        for v in [&mut tr, &mut dv, &mut te] {
            v.sort_unstable();
        }
        Ok(Splits {
            train: self.select(&tr),
            dev: self.select(&dv),
            test: self.select(&te),
        })
    }
}

/// Train / dev / test parts of a data set.
#[derive(Clone, Debug, PartialEq)]
pub struct Splits {
    pub train: Dataset,
    pub dev: Dataset,
    pub test: Dataset,
}

/// The UCI handwritten digits.
pub struct Digits;

impl Digits {
    /// Pixel dimension (8×8).
    pub const DIM: usize = 64;
    /// Number of classes.
    pub const CLASSES: usize = 10;

    /// The copy bundled in the crate (`assets/digits/digits.csv.gz`).
    pub fn bundled() -> Result<Dataset> {
        parse_digits_gz(DIGITS_GZ, Path::new("assets/digits/digits.csv.gz"))
    }

    /// Read a `digits.csv.gz` file (64 pixel values in 0..=16, then the label, per row).
    pub fn load(path: &Path) -> Result<Dataset> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        parse_digits_gz(&bytes, path)
    }

    /// The project's fixed split: 60 % train, 20 % dev, 20 % test of every class.
    pub fn split(data: &Dataset, seed: u64) -> Result<Splits> {
        data.stratified_split(0.6, 0.2, seed)
    }
}

/// Parse the gzip'd CSV; pixels are divided by 16.
fn parse_digits_gz(bytes: &[u8], path: &Path) -> Result<Dataset> {
    let mut text = String::new();
    flate2::read::GzDecoder::new(bytes)
        .read_to_string(&mut text)
        .map_err(|e| Error::io(path, e))?;
    let bad = |line: usize, msg: String| Error::Config {
        path: path.to_path_buf(),
        msg: format!("line {line}: {msg}"),
    };
    let (mut x, mut y) = (Vec::new(), Vec::new());
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let fields: Vec<&str> = line.trim().split(',').collect();
        if fields.len() != Digits::DIM + 1 {
            return Err(bad(
                i + 1,
                format!("{} fields, expected {}", fields.len(), Digits::DIM + 1),
            ));
        }
        for f in &fields[..Digits::DIM] {
            let v: f32 = f
                .parse()
                .map_err(|_| bad(i + 1, format!("pixel `{f}` is not a number")))?;
            x.push(v / 16.0);
        }
        let label: u32 = fields[Digits::DIM]
            .parse()
            .map_err(|_| bad(i + 1, format!("label `{}` is not an integer", fields[64])))?;
        if label as usize >= Digits::CLASSES {
            return Err(bad(i + 1, format!("label {label} is not a digit")));
        }
        y.push(label);
    }
    Ok(Dataset {
        x,
        y,
        dim: Digits::DIM,
    })
}

impl Splits {
    /// The splits of the bundled digits with the project's fractions.
    pub fn digits(seed: u64) -> Result<Splits> {
        Digits::split(&Digits::bundled()?, seed)
    }
}

/// Scores an MLP candidate by accuracy on a labelled dev or test set. The primary score is the
/// accuracy; metrics are `accuracy` and `loss` (mean cross-entropy).
pub struct ClassifyEvaluator {
    name: String,
    dev: Dataset,
    test: Dataset,
    device: Device,
}

impl ClassifyEvaluator {
    /// An evaluator over the given dev and test sets, on the CPU.
    pub fn new(name: impl Into<String>, dev: Dataset, test: Dataset) -> Self {
        ClassifyEvaluator {
            name: name.into(),
            dev,
            test,
            device: Device::Cpu,
        }
    }

    /// The data of a split.
    pub fn data(&self, split: Split) -> &Dataset {
        match split {
            Split::Dev => &self.dev,
            Split::Test => &self.test,
        }
    }

    /// Score an already built MLP.
    pub fn score_mlp(&self, mlp: &Mlp, split: Split) -> Result<Score> {
        let data = self.data(split);
        let x = data.x_tensor(&self.device)?;
        let accuracy = mlp.accuracy(&x, &data.y)?;
        let loss = mlp.loss(&x, &data.y)?;
        let mut score = Score {
            primary: accuracy,
            ..Default::default()
        };
        score.metrics.insert("accuracy".into(), accuracy);
        score.metrics.insert("loss".into(), loss);
        Ok(score)
    }
}

impl Evaluator for ClassifyEvaluator {
    fn name(&self) -> &str {
        &self.name
    }

    fn evaluate(&self, candidate: &Candidate, split: Split) -> Result<Score, EvalError> {
        let mlp = match &candidate.body {
            CandidateBody::Merged(model) => Mlp::from_mem(model, &self.device)?,
            CandidateBody::Dir(dir) => Mlp::load(dir, &self.device)?,
            CandidateBody::Routed { .. } => {
                return Err(EvalError::Candidate(
                    "the classification evaluator runs MLPs; a layer route is not one".into(),
                ));
            }
        };
        let score = self.score_mlp(&mlp, split)?;
        for (metric, value) in &score.metrics {
            if !value.is_finite() {
                return Err(EvalError::NotFinite {
                    metric: metric.clone(),
                    value: *value,
                });
            }
        }
        Ok(score)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bundled_digits_parse_and_split_stratified() {
        let data = Digits::bundled().unwrap();
        assert_eq!(data.len(), 1797);
        assert_eq!(data.x.len(), 1797 * 64);
        assert!(data.x.iter().all(|v| (0.0..=1.0).contains(v)));
        // First row of the file: label 0, third pixel 5/16.
        assert_eq!(data.y[0], 0);
        assert_eq!(data.x[2], 5.0 / 16.0);
        let s = Digits::split(&data, 0).unwrap();
        assert_eq!(s.train.len() + s.dev.len() + s.test.len(), 1797);
        for c in 0..10u32 {
            let n = data.y.iter().filter(|&&y| y == c).count() as f64;
            let nd = s.dev.y.iter().filter(|&&y| y == c).count() as f64;
            assert!((nd - 0.2 * n).abs() <= 1.0, "class {c}: {nd} of {n}");
        }
        assert_eq!(s, Digits::split(&data, 0).unwrap());
        assert_ne!(s.dev, Digits::split(&data, 1).unwrap().dev);
    }

    #[test]
    fn with_classes_keeps_only_those_labels() {
        let d = Dataset {
            x: vec![0., 1., 2., 3., 4., 5.],
            y: vec![0, 1, 2],
            dim: 2,
        };
        let sub = d.with_classes(&[0, 2]);
        assert_eq!(sub.y, vec![0, 2]);
        assert_eq!(sub.x, vec![0., 1., 4., 5.]);
    }
}
