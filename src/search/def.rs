//! Search definitions: the `searches/*.toml` files. Unknown keys are refused everywhere, so a typo
//! is an error that names the key, never a silently ignored setting.
//!
//! ```toml
//! name = "toy-ps"
//! models = ["../assets/toy/add", "../assets/toy/cipher"]   # relative to this file's folder
//! base_model = "../assets/toy/base"                        # PS only
//! method = "ties"                                          # a merge-method registry key (PS only)
//! output = "../runs/toy-ps"                                # default: runs/<name> beside searches/
//!
//! [space]
//! kind = "ps"                  # "ps" | "dfs" | "ps_dfs"
//! granularity = "per_layer"    # "whole" | "per_layer" | "every:K"
//! split_attn_mlp = false       # separate genes for `self_attn` and `mlp` tensors
//! embeddings = true            # embeddings / final norm / head as their own layer group
//! params = ["weight", "density"]   # default: every Float parameter the method declares, but numerical guards (`eps`, `tol`)
//! ranges = { density = [0.1, 1.0] }  # narrow a declared range (never widen)
//! defaults = { weight = 0.5 }        # the "default merge" and the initial mean
//!
//! [evaluator]
//! kind = "lm"                  # "lm" | "command"
//! fitness_split = "dev"        # "test" is refused: it is held out for the report
//! tasks = [                    # crate::eval::tasks::TaskSpec, paths relative to this file
//!   { name = "add", path = "../assets/toy/tasks/add", metric = "exact_match" },
//! ]
//! device = "cpu"               # lm: "cpu" | "cuda" (every GPU; slot i on GPU i mod n) | "cuda:N"
//! dtype = "f32"                # lm: the forward's compute dtype, "f32" | "bf16" | "f16"
//! batch_size = 32              # lm: sequences per forward call
//! max_length = 64              # lm: longest sequence; default max_position_embeddings
//! subsample = 0.125            # lm: race in slices of 1/8 of each task's dev examples
//!
//! [optimizer]
//! sigma0 = 0.2                 # in gene units (a PS gene's whole range is 1.0); (0, 10]
//! population = 8               # 2..=10000; default 4 + ⌊3 ln n⌋ for n genes
//! generations = 12             # 1..=1000000; and/or max_evaluations = 96 (≥ population)
//! seed = 1
//! restarts = "none"            # "none" | "ipop" | "bipop"
//!
//! [parallelism]
//! slots = 2                    # candidates evaluated at once; 1..=1024
//! launcher = "local"           # "local" | "slurm": a `command` evaluator's runs as Slurm jobs
//! # Slurm only (crate::eval::slurm): partition = "gpu", gpus_per_task = 1, time = "01:00:00",
//! # srun_args = ["--account=proj"]; needs evaluator.scratch_dir on a shared file system
//! ```
//!
//! Every number must be finite and within the bounds of [`limits`]: `population` 2..=10 000,
//! `generations` 1..=1 000 000, `max_evaluations` from one generation (the population, when
//! set) to 10⁸, `sigma0` in (0, 10], `slots` 1..=1024, DFS `repeats` 1..=16, `scale_range`
//! within [−100, 100], `ranges` / `defaults` / `indicator_threshold` finite, `batch_size`
//! 1..=65 536, `max_length` 1..=2²⁰, `subsample` in (0, 1) (`lm` only), and the command
//! evaluator's `timeout_s` in (0, 30 days]
//! ([`crate::eval::command::MAX_TIMEOUT_S`]); with `launcher = "slurm"` (a `command` evaluator
//! with `scratch_dir` only), `time` in Slurm's formats up to 365 days, `gpus_per_task`
//! 1..=1024, a partition name without spaces, no job name in `srun_args`; the Slurm keys
//! without `launcher = "slurm"` are refused. Anything else is refused when the file is read,
//! with the key and its line ([`SearchDef::validate_in`]).
//!
//! A DFS space (`kind = "dfs"`) takes `repeats` (r), `scale_range` (the scaling matrix's range),
//! `indicator_threshold` (a slot is used when its gene is above it) and `embed_model` (index into
//! `models`). `kind = "ps_dfs"` adds `ps_search` (a PS search definition, relative to this file):
//! that search's best recipe is merged in memory and joins the DFS pool as the last model, which
//! is also the default embedding model.
//!
//! **Where a PS+DFS search keeps its PS run**: in `<out>/ps/`, where `<out>` is the PS+DFS
//! search's own output directory (`--out`, else `output`, else `runs/<name>`); nothing is written
//! outside `<out>` ([`crate::search::run::ps_run`]). A finished run there
//! (`<out>/ps/best_recipe.yaml`) is reused and an unfinished one resumed; else a finished run in
//! the PS definition's own output directory is reused read-only, its `best_recipe.yaml` copied
//! into `<out>/ps/`; else the PS search runs into `<out>/ps/`. The search prints which.
//!
//! **Hub ids.** A model written `owner/name` that is no path under this file's folder is read
//! from the local Hugging Face cache ([`crate::store::hub`]); one that is not cached is refused
//! when the file is read.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::device::DeviceSpec;
use crate::error::{Error, Result};
use crate::eval::Split;
use crate::eval::command::CommandSpec;
use crate::eval::tasks::TaskSpec;
use crate::tensor::DType;

/// A whole search definition.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SearchDef {
    pub name: String,
    /// Source models (PS: merged with the base; DFS: the layer pool).
    pub models: Vec<PathBuf>,
    /// The base model of a PS merge.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_model: Option<PathBuf>,
    /// The merge method's registry key (PS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// Output directory; default `runs/<name>` next to the definition's folder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<PathBuf>,
    /// Seed for random merge methods (DARE, DELLA); fixed for the whole search.
    #[serde(default)]
    pub merge_seed: u64,
    pub space: SpaceDef,
    pub evaluator: EvaluatorDef,
    pub optimizer: OptimizerDef,
    #[serde(default)]
    pub parallelism: ParallelismDef,
}

/// Which search space.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum SpaceDef {
    /// Parameter space: per-layer-group coefficients of the merge method.
    Ps(PsDef),
    /// Data-flow space: which layer of which model at each hop.
    Dfs(DfsDef),
    /// A PS result (from another search definition) joins the DFS pool.
    PsDfs {
        /// The PS search definition, relative to this file.
        ps_search: PathBuf,
        #[serde(flatten)]
        dfs: DfsDef,
    },
}

/// Layer grouping of a PS space.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Granularity {
    /// One group for all layers.
    Whole,
    /// One group per layer.
    PerLayer,
    /// One group per `k` consecutive layers (the last group may be shorter).
    Every(usize),
}

impl Granularity {
    /// Layer groups `[start, end)` for `n_layers` layers.
    pub fn groups(self, n_layers: usize) -> Vec<(usize, usize)> {
        let k = match self {
            Granularity::Whole => n_layers.max(1),
            Granularity::PerLayer => 1,
            Granularity::Every(k) => k,
        };
        (0..n_layers)
            .step_by(k)
            .map(|s| (s, (s + k).min(n_layers)))
            .collect()
    }
}

impl fmt::Display for Granularity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Granularity::Whole => write!(f, "whole"),
            Granularity::PerLayer => write!(f, "per_layer"),
            Granularity::Every(k) => write!(f, "every:{k}"),
        }
    }
}

impl std::str::FromStr for Granularity {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "whole" => Ok(Granularity::Whole),
            "per_layer" => Ok(Granularity::PerLayer),
            _ => {
                let k = s
                    .strip_prefix("every:")
                    .and_then(|k| k.trim().parse::<usize>().ok())
                    .filter(|k| *k > 0);
                k.map(Granularity::Every).ok_or_else(|| {
                    format!(
                        "granularity `{s}`: expected \"whole\", \"per_layer\" or \"every:K\" (K ≥ 1)"
                    )
                })
            }
        }
    }
}

impl Serialize for Granularity {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for Granularity {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

fn default_granularity() -> Granularity {
    Granularity::PerLayer
}
fn yes() -> bool {
    true
}

/// Parameter-space settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PsDef {
    #[serde(default = "default_granularity")]
    pub granularity: Granularity,
    #[serde(default)]
    pub split_attn_mlp: bool,
    /// Embeddings, final norm and head as their own group.
    #[serde(default = "yes")]
    pub embeddings: bool,
    /// Which declared parameters get genes; `None` = every Float parameter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub params: Option<Vec<String>>,
    /// Narrowed ranges `[min, max]` per parameter name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub ranges: BTreeMap<String, [f64; 2]>,
    /// Values for the default genome (overrides the declared defaults).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub defaults: BTreeMap<String, f64>,
}

fn default_repeats() -> usize {
    2
}
fn default_scale_range() -> [f64; 2] {
    [0.5, 1.5]
}

/// Data-flow-space settings (Akiba et al. 2024, "Evolutionary Optimization of Model Merging
/// Recipes", §3.2).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DfsDef {
    /// r: how many times the layer sequence of all models is repeated.
    #[serde(default = "default_repeats")]
    pub repeats: usize,
    /// Range of the scaling matrix W's entries.
    #[serde(default = "default_scale_range")]
    pub scale_range: [f64; 2],
    /// A slot is used when its indicator gene is above this.
    #[serde(default)]
    pub indicator_threshold: f64,
    /// Index (into the pool) of the model whose embeddings, first and last layer and head are
    /// kept; default 0 for `dfs`, the PS model for `ps_dfs`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub embed_model: Option<usize>,
}

fn dev() -> Split {
    Split::Dev
}

/// The evaluator and its tasks.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum EvaluatorDef {
    /// Held-out language-model tasks (task directories, relative to the definition).
    Lm {
        tasks: Vec<TaskSpec>,
        /// Sequences per forward call (default 32).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        batch_size: Option<usize>,
        /// Where the forward runs (default `cpu`); `cuda` spreads the slots over every visible
        /// GPU (see [`crate::device`]).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        device: Option<DeviceSpec>,
        /// The forward's compute dtype (default `f32`). Candidates stay in their storage dtype
        /// either way; each weight is cast when the model is built.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        dtype: Option<DType>,
        /// The longest sequence an example may need (context + generated tokens, ...); longer
        /// ones are refused when the evaluator is made. Default: the model's config.json
        /// `max_position_embeddings`, when it has one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        max_length: Option<usize>,
        #[serde(default = "dev")]
        fitness_split: Split,
        /// Racing: score each candidate a slice of this share of every task's dev examples at
        /// a time and stop once it cannot reach the previous generation's μ-th best
        /// ([`crate::eval::subsample`]); `(0, 1)`. Default: every example.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        subsample: Option<f64>,
        /// With `subsample`: also stop on a statistical bound ([`crate::eval::subsample`]), at
        /// most `1 − confidence` likely to stop a candidate that would reach the bar; `(0, 1)`.
        /// Default: only the exact bound.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        subsample_confidence: Option<f64>,
    },
    /// An external command (see [`crate::eval::command`] for the protocol and the keys).
    Command {
        #[serde(flatten)]
        spec: CommandSpec,
        #[serde(default = "dev")]
        fitness_split: Split,
        /// Refused (read only to say so): a command scores a candidate in one run.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        subsample: Option<f64>,
        /// Refused, as `subsample`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        subsample_confidence: Option<f64>,
    },
}

impl EvaluatorDef {
    /// Run the `lm` evaluator's forward on `device` instead of the definition's (the `--device`
    /// flag of `search` and `resume`). A `command` evaluator runs no model of ours: an error.
    pub fn set_device(&mut self, spec: DeviceSpec) -> Result<()> {
        match self {
            EvaluatorDef::Lm { device, .. } => {
                *device = Some(spec);
                Ok(())
            }
            EvaluatorDef::Command { .. } => Err(Error::Search(format!(
                "--device {spec}: the `command` evaluator runs its own program; set the device \
                 there (only `kind = \"lm\"` runs our forward)"
            ))),
        }
    }

    /// The split the search's fitness is computed on.
    pub fn fitness_split(&self) -> Split {
        match self {
            EvaluatorDef::Lm { fitness_split, .. }
            | EvaluatorDef::Command { fitness_split, .. } => *fitness_split,
        }
    }

    /// `subsample`: the share of each task's dev examples per racing slice, if racing.
    pub fn subsample(&self) -> Option<f64> {
        match self {
            EvaluatorDef::Lm { subsample, .. } | EvaluatorDef::Command { subsample, .. } => {
                *subsample
            }
        }
    }

    /// `subsample_confidence`, if set.
    pub fn subsample_confidence(&self) -> Option<f64> {
        match self {
            EvaluatorDef::Lm {
                subsample_confidence,
                ..
            }
            | EvaluatorDef::Command {
                subsample_confidence,
                ..
            } => *subsample_confidence,
        }
    }

    /// The race each evaluation runs (its bar set per generation by the search), when
    /// `subsample` is set.
    pub fn race(&self) -> Option<crate::eval::subsample::Race> {
        self.subsample()
            .map(|fraction| crate::eval::subsample::Race {
                fraction,
                bound: None,
                confidence: self.subsample_confidence(),
            })
    }
}

/// Restart strategy of the optimizer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Restarts {
    #[default]
    None,
    /// Restart with doubled population (Auger & Hansen 2005).
    Ipop,
    /// Alternate large- and small-population restarts (Hansen 2009).
    Bipop,
}

fn default_sigma0() -> f64 {
    0.2
}

/// CMA-ES settings and the budget.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimizerDef {
    #[serde(default = "default_sigma0")]
    pub sigma0: f64,
    /// λ; default 4 + ⌊3 ln n⌋.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub population: Option<usize>,
    /// Stop after this many generations (all restarts together).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generations: Option<usize>,
    /// Stop before a generation that would exceed this many evaluations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_evaluations: Option<usize>,
    #[serde(default)]
    pub seed: u64,
    #[serde(default)]
    pub restarts: Restarts,
}

fn one() -> usize {
    1
}

/// Where a `command` evaluator's programs run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Launcher {
    /// A child process of evomerge (the default).
    #[default]
    Local,
    /// A Slurm job per evaluation (`srun`; see [`crate::eval::slurm`]).
    Slurm,
}

impl Launcher {
    fn is_local(&self) -> bool {
        *self == Launcher::Local
    }
}

/// How many candidates are evaluated at once, and where (`launcher` and its Slurm keys:
/// [`crate::eval::slurm`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParallelismDef {
    #[serde(default = "one")]
    pub slots: usize,
    /// `local` (default) or `slurm` (a `command` evaluator only).
    #[serde(default, skip_serializing_if = "Launcher::is_local")]
    pub launcher: Launcher,
    /// Slurm: `srun --partition`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition: Option<String>,
    /// Slurm: `srun --gpus-per-task`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpus_per_task: Option<u32>,
    /// Slurm: `srun --time` (default: the evaluator's `timeout_s` in whole minutes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<String>,
    /// Slurm: further `srun` arguments.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub srun_args: Vec<String>,
}

impl Default for ParallelismDef {
    fn default() -> Self {
        ParallelismDef {
            slots: 1,
            launcher: Launcher::Local,
            partition: None,
            gpus_per_task: None,
            time: None,
            srun_args: Vec::new(),
        }
    }
}

impl ParallelismDef {
    /// The Slurm options when `launcher = "slurm"`.
    pub fn slurm(&self) -> Option<crate::eval::slurm::SlurmOptions> {
        (self.launcher == Launcher::Slurm).then(|| crate::eval::slurm::SlurmOptions {
            partition: self.partition.clone(),
            gpus_per_task: self.gpus_per_task,
            time: self.time.clone(),
            srun_args: self.srun_args.clone(),
        })
    }
}

impl SearchDef {
    /// Parse a definition from TOML text; relative paths are resolved against `dir`.
    pub fn from_toml(text: &str, dir: &Path, path: &Path) -> Result<SearchDef> {
        let mut def: SearchDef = toml::from_str(text).map_err(|e| Error::Config {
            path: path.to_path_buf(),
            msg: e.to_string(),
        })?;
        // A model written as a hub id (`owner/name`) that is neither under `dir` nor in the
        // local Hugging Face cache is refused here, saying why, before anything loads.
        for m in def.models.iter().chain(&def.base_model) {
            if let Some(id) = m
                .to_str()
                .filter(|s| crate::store::hub::looks_like_hub_id(s))
                && !dir.join(id).exists()
                && let Some(e) = crate::store::hub::missing(&dir.join(id))
            {
                return Err(e);
            }
        }
        def.resolve(dir);
        if def.output.is_none() {
            let root = dir.parent().unwrap_or(dir);
            def.output = Some(root.join("runs").join(&def.name));
        }
        def.validate_in(text, path)?;
        Ok(def)
    }

    /// Read and validate `path`.
    pub fn load(path: &Path) -> Result<SearchDef> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let dir = path.parent().unwrap_or(Path::new("."));
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        // Absolute, so `output` defaults to `<parent of the definition's folder>/runs/<name>`
        // and the paths saved in `search.toml` work from any directory.
        let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
        SearchDef::from_toml(&text, &dir, path)
    }

    fn resolve(&mut self, dir: &Path) {
        let join = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = dir.join(&*p);
            }
        };
        // Model references: both sides of `BASE+ADAPTER` resolve against the file's directory.
        let join_model = |p: &mut PathBuf| *p = crate::store::lora::resolve_ref(p, Some(dir));
        self.models.iter_mut().for_each(join_model);
        if let Some(b) = self.base_model.as_mut() {
            join_model(b);
        }
        if let Some(o) = self.output.as_mut() {
            join(o);
        }
        if let SpaceDef::PsDfs { ps_search, .. } = &mut self.space {
            join(ps_search);
        }
        match &mut self.evaluator {
            EvaluatorDef::Lm { tasks, .. } => {
                for t in tasks.iter_mut() {
                    *t = t.relative_to(dir);
                }
            }
            EvaluatorDef::Command { spec, .. } => {
                for p in [&mut spec.cwd, &mut spec.donor, &mut spec.scratch_dir]
                    .into_iter()
                    .flatten()
                {
                    join(p);
                }
            }
        }
    }

    /// The output directory (always set after loading).
    pub fn output_dir(&self) -> PathBuf {
        self.output
            .clone()
            .unwrap_or_else(|| PathBuf::from("runs").join(&self.name))
    }

    /// Check the settings that serde cannot (a message naming the key).
    pub fn validate(&self) -> std::result::Result<(), String> {
        self.check().map_err(|e| e.msg)
    }

    /// [`SearchDef::validate`] for a definition parsed from `text` (read from `path`): the error
    /// names the file and, when the key can be found in `text`, its line.
    pub fn validate_in(&self, text: &str, path: &Path) -> Result<()> {
        self.check().map_err(|e| Error::Config {
            path: path.to_path_buf(),
            msg: match line_of(text, &e.key) {
                Some(n) => format!("line {n}: {}", e.msg),
                None => e.msg,
            },
        })
    }

    fn check(&self) -> std::result::Result<(), Invalid> {
        let bad = |key: &str, msg: String| Invalid {
            key: key.to_string(),
            msg,
        };
        if self.models.is_empty() {
            return Err(bad("models", "`models` is empty".into()));
        }
        if self.evaluator.fitness_split() == Split::Test {
            return Err(bad(
                "evaluator.fitness_split",
                "evaluator.fitness_split = \"test\" is refused: the test split is held out \
                 for the final report; use \"dev\""
                    .into(),
            ));
        }
        match &self.space {
            SpaceDef::Ps(ps) => {
                if self.method.is_none() {
                    return Err(bad("method", "a `ps` space needs `method`".into()));
                }
                for (name, [lo, hi]) in &ps.ranges {
                    if !(lo.is_finite() && hi.is_finite() && lo <= hi) {
                        return Err(bad(
                            &format!("space.ranges.{name}"),
                            format!("space.ranges.{name}: [{lo:?}, {hi:?}] is not a range"),
                        ));
                    }
                }
                for (name, v) in &ps.defaults {
                    if !v.is_finite() {
                        return Err(bad(
                            &format!("space.defaults.{name}"),
                            format!("space.defaults.{name} = {v:?} is not a finite number"),
                        ));
                    }
                }
            }
            SpaceDef::Dfs(d) | SpaceDef::PsDfs { dfs: d, .. } => {
                if !(1..=limits::REPEATS).contains(&d.repeats) {
                    return Err(bad(
                        "space.repeats",
                        format!(
                            "space.repeats = {} must be in 1..={}",
                            d.repeats,
                            limits::REPEATS
                        ),
                    ));
                }
                let [lo, hi] = d.scale_range;
                let s = limits::SCALE;
                if !(lo.is_finite() && hi.is_finite() && lo <= hi) {
                    return Err(bad(
                        "space.scale_range",
                        format!("space.scale_range [{lo:?}, {hi:?}] is not a range"),
                    ));
                }
                if lo < -s || hi > s {
                    return Err(bad(
                        "space.scale_range",
                        format!("space.scale_range [{lo:?}, {hi:?}] must lie within [-{s}, {s}]"),
                    ));
                }
                if !d.indicator_threshold.is_finite() {
                    return Err(bad(
                        "space.indicator_threshold",
                        format!(
                            "space.indicator_threshold = {:?} is not a finite number",
                            d.indicator_threshold
                        ),
                    ));
                }
                let pool =
                    self.models.len() + usize::from(matches!(self.space, SpaceDef::PsDfs { .. }));
                if let Some(e) = d.embed_model
                    && e >= pool
                {
                    return Err(bad(
                        "space.embed_model",
                        format!("space.embed_model = {e}, but the pool has {pool} models"),
                    ));
                }
            }
        }
        let o = &self.optimizer;
        if !(o.sigma0.is_finite() && o.sigma0 > 0.0 && o.sigma0 <= limits::SIGMA0) {
            return Err(bad(
                "optimizer.sigma0",
                format!(
                    "optimizer.sigma0 = {:?} must be > 0 and ≤ {} (gene units: a PS gene's range \
                     is 1)",
                    o.sigma0,
                    limits::SIGMA0
                ),
            ));
        }
        if let Some(p) = o.population
            && !(2..=limits::POPULATION).contains(&p)
        {
            return Err(bad(
                "optimizer.population",
                format!(
                    "optimizer.population = {p} must be in 2..={}",
                    limits::POPULATION
                ),
            ));
        }
        if o.generations.is_none() && o.max_evaluations.is_none() {
            return Err(bad(
                "optimizer",
                "the optimizer needs a budget: `generations` and/or `max_evaluations`".into(),
            ));
        }
        if let Some(g) = o.generations
            && !(1..=limits::GENERATIONS).contains(&g)
        {
            return Err(bad(
                "optimizer.generations",
                format!(
                    "optimizer.generations = {g} must be in 1..={}",
                    limits::GENERATIONS
                ),
            ));
        }
        if let Some(m) = o.max_evaluations {
            let least = o.population.unwrap_or(2);
            if !(least..=limits::MAX_EVALUATIONS).contains(&m) {
                return Err(bad(
                    "optimizer.max_evaluations",
                    format!(
                        "optimizer.max_evaluations = {m} must be in {least}..={} (at least one \
                         generation of the population)",
                        limits::MAX_EVALUATIONS
                    ),
                ));
            }
        }
        let slots = self.parallelism.slots;
        if !(1..=limits::SLOTS).contains(&slots) {
            return Err(bad(
                "parallelism.slots",
                format!(
                    "parallelism.slots = {slots} must be in 1..={}",
                    limits::SLOTS
                ),
            ));
        }
        let par = &self.parallelism;
        match par.slurm() {
            None => {
                let set = [
                    ("partition", par.partition.is_some()),
                    ("gpus_per_task", par.gpus_per_task.is_some()),
                    ("time", par.time.is_some()),
                    ("srun_args", !par.srun_args.is_empty()),
                ];
                if let Some((key, _)) = set.iter().find(|(_, on)| *on) {
                    return Err(bad(
                        &format!("parallelism.{key}"),
                        format!(
                            "parallelism.{key} is a Slurm setting: it needs \
                             parallelism.launcher = \"slurm\""
                        ),
                    ));
                }
            }
            Some(slurm) => {
                slurm.check().map_err(|(key, msg)| {
                    bad(&format!("parallelism.{key}"), format!("parallelism.{msg}"))
                })?;
                match &self.evaluator {
                    EvaluatorDef::Lm { .. } => {
                        return Err(bad(
                            "parallelism.launcher",
                            "parallelism.launcher = \"slurm\" runs `command` evaluators as \
                             Slurm jobs; an `lm` evaluator runs inside evomerge"
                                .into(),
                        ));
                    }
                    EvaluatorDef::Command { spec, .. } if spec.scratch_dir.is_none() => {
                        return Err(bad(
                            "parallelism.launcher",
                            "parallelism.launcher = \"slurm\" needs evaluator.scratch_dir: a \
                             directory every node shares (jobs read the candidate there)"
                                .into(),
                        ));
                    }
                    EvaluatorDef::Command { .. } => {}
                }
            }
        }
        if let Some(f) = self.evaluator.subsample() {
            if let EvaluatorDef::Command { .. } = self.evaluator {
                return Err(bad(
                    "evaluator.subsample",
                    "evaluator.subsample needs kind = \"lm\": a `command` evaluator scores a \
                     candidate in one run of its program, which cannot be stopped part way"
                        .into(),
                ));
            }
            crate::eval::subsample::check_fraction(f)
                .map_err(|e| bad("evaluator.subsample", format!("evaluator.subsample = {e}")))?;
        }
        if let Some(c) = self.evaluator.subsample_confidence() {
            let key = "evaluator.subsample_confidence";
            if self.evaluator.subsample().is_none() {
                return Err(bad(
                    key,
                    format!("{key} bounds the race of evaluator.subsample, which is not set"),
                ));
            }
            crate::eval::subsample::check_confidence(c)
                .map_err(|e| bad(key, format!("{key} = {e}")))?;
        }
        match &self.evaluator {
            EvaluatorDef::Lm {
                batch_size,
                max_length,
                ..
            } => {
                if let Some(b) = *batch_size
                    && !(1..=limits::BATCH_SIZE).contains(&b)
                {
                    return Err(bad(
                        "evaluator.batch_size",
                        format!(
                            "evaluator.batch_size = {b} must be in 1..={}",
                            limits::BATCH_SIZE
                        ),
                    ));
                }
                if let Some(l) = *max_length
                    && !(1..=limits::MAX_LENGTH).contains(&l)
                {
                    return Err(bad(
                        "evaluator.max_length",
                        format!(
                            "evaluator.max_length = {l} must be in 1..={}",
                            limits::MAX_LENGTH
                        ),
                    ));
                }
            }
            EvaluatorDef::Command { spec, .. } => {
                spec.check().map_err(|(key, msg)| {
                    bad(&format!("evaluator.{key}"), format!("evaluator.{msg}"))
                })?;
            }
        }
        Ok(())
    }
}

/// The upper bounds of a definition's numeric settings (refused above them, naming the key).
/// They are far above any useful value; they stop a typo from allocating a population of a
/// billion or starting a thousand threads. The command evaluator's `timeout_s` is bounded by
/// [`crate::eval::command::MAX_TIMEOUT_S`].
pub mod limits {
    /// `optimizer.population` (λ), at least 2.
    pub const POPULATION: usize = 10_000;
    /// `optimizer.generations`, at least 1.
    pub const GENERATIONS: usize = 1_000_000;
    /// `optimizer.max_evaluations`, at least one generation (the population, when set).
    pub const MAX_EVALUATIONS: usize = 100_000_000;
    /// `optimizer.sigma0` (in gene units, a PS gene's range is 1), above 0.
    pub const SIGMA0: f64 = 10.0;
    /// `space.repeats` (DFS r), at least 1.
    pub const REPEATS: usize = 16;
    /// `space.scale_range` lies within [-SCALE, SCALE].
    pub const SCALE: f64 = 100.0;
    /// `parallelism.slots`, at least 1.
    pub const SLOTS: usize = 1024;
    /// `evaluator.batch_size` (lm), at least 1.
    pub const BATCH_SIZE: usize = 65_536;
    /// `evaluator.max_length` (lm), at least 1.
    pub const MAX_LENGTH: usize = 1 << 20;
}

/// A refused setting: its dotted key (to find its line) and the message.
struct Invalid {
    key: String,
    msg: String,
}

/// The 1-based line of the dotted `key` (e.g. `optimizer.population`, `space.defaults.weight`)
/// in a TOML text: the line that sets it, else the line of its closest enclosing key (an inline
/// table), else the table's header. A plain scan (no TOML parser): `None` when not found.
fn line_of(text: &str, key: &str) -> Option<usize> {
    let want: Vec<&str> = key.split('.').collect();
    let parts = |s: &str| -> Vec<String> {
        s.split('.')
            .map(|p| p.trim().trim_matches(|c| c == '"' || c == '\'').to_string())
            .collect()
    };
    let mut table: Vec<String> = Vec::new();
    let mut best: Option<(usize, usize)> = None; // (matched parts, line)
    for (i, line) in text.lines().enumerate() {
        let t = line.trim();
        if t.starts_with('#') || t.is_empty() {
            continue;
        }
        let full = if let Some(h) = t.strip_prefix('[') {
            let h = h.trim_start_matches('[');
            let Some(end) = h.find(']') else { continue };
            table = parts(&h[..end]);
            table.clone()
        } else {
            let Some(eq) = t.find('=') else { continue };
            let mut k = table.clone();
            k.extend(parts(&t[..eq]));
            k
        };
        let n = full.len();
        if n <= want.len()
            && full.iter().zip(&want).all(|(a, b)| a == b)
            && best.is_none_or(|(m, _)| n > m)
        {
            best = Some((n, i + 1));
        }
    }
    best.map(|(_, line)| line)
}
