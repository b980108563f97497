//! The search loop: [`run_search`] runs a definition to the end, [`resume`] continues a killed
//! run from its output directory to the identical result. The search returns what the report
//! needs ([`RunSummary`], with the test-split rows) and knows nothing of the report itself;
//! [`crate::pipeline::run_search`] runs a search and then the report and the plots (what
//! `evomerge search` does):
//!
//! ```no_run
//! use evomerge::search::{SearchDef, run::RunOptions};
//! # fn main() -> evomerge::Result<()> {
//! let def = SearchDef::load("searches/toy-ps.toml".as_ref())?;
//! let summary = evomerge::pipeline::run_search(&def, &def.output_dir(), &RunOptions::default())?;
//! println!("best dev fitness {:?}", summary.best.fitness);
//! # Ok(()) }
//! ```
//!
//! Each generation: the optimizer proposes λ genomes; each is decoded by the [`Space`], built
//! into an in-memory [`Candidate`] by a [`CandidateBuilder`] (a merge into memory for PS, a
//! route over in-memory models for DFS), scored by the [`Evaluator`] on the dev split, and
//! appended to the history at once. A failure (decode, merge, evaluator error or panic, a
//! non-finite score) is logged with its message and told to CMA-ES as the finite
//! [`FAILURE_FITNESS`]; the search goes on.
//!
//! Candidates stay in the inputs' dtype: a PS recipe merges in `f32` and stores each tensor in
//! the base model's dtype (`dtype: float32`, `out_dtype: bfloat16` for bf16 inputs), and the DFS
//! pool is read in its stored dtype; the evaluator casts weights to its compute dtype
//! (`[evaluator] dtype`) when it builds the model.
//!
//! # Slots and devices
//!
//! The optimizer evaluates a generation on a rayon pool of `parallelism.slots` threads. With
//! `[evaluator] device = "cuda"` and several GPUs, [`build_evaluator`] makes one LM evaluator per
//! GPU (at most one per slot) and a [`PerSlot`] evaluator that sends the evaluation running on
//! pool thread `i` to GPU `i mod n` ([`crate::device::slot_device`]). Inside an evaluation,
//! batches and candle's matmuls use the same pool's threads, so `slots` caps the CPU threads of
//! the whole search.
//!
//! Output directory:
//!
//! | file | what |
//! |---|---|
//! | `search.toml` | the definition with resolved paths (what [`resume`] re-reads) |
//! | `.lock` | the lock a running search or resume holds ([`RunLock`]), with its pid |
//! | `space.json` | the space's genes and groups (what the plots label them by) |
//! | `history.jsonl`, `generations.csv` | see [`crate::search::history`] |
//! | `best_genome.json` | the best record (genome, recipe, dev metrics) |
//! | `best_recipe.yaml` | PS: the best recipe as mergekit YAML (runnable by `evomerge merge` and mergekit) |
//! | `best_route.json` | DFS: the best route, see [`RouteFile`] |
//! | `model/` | PS: the best recipe merged to disk in Hugging Face layout, in the inputs' dtype (the recipe's `out_dtype`; config.json's `torch_dtype` / `dtype` say the same) |
//! | `ps/` | PS+DFS: the PS run (or the copied best recipe of a finished one), see [`ps_run`] |
//! | `report.json`, `report.md` | written by the report after the search ([`crate::pipeline`]): test-split scores of the sources, the default and the evolved candidate ([`RunSummary::test_rows`]); the search's summary (dev fitness, evaluations, wall time, result file) |
//! | `plots/*.png`, `plots/*.svg` | drawn after the search ([`crate::pipeline`]), see [`crate::report::plots`] |
//!
//! The model paths in `best_recipe.yaml`, `best_genome.json`, `best_route.json` and the model
//! card (`model/README.md`) are relative to the file's own directory (a cached hub model: its
//! id), so an output directory moved together with its inputs still merges and can be shared;
//! `search.toml` and `history.jsonl` keep the absolute paths the run used.
//!
//! # Crash safety
//!
//! A run directory survives a kill at any moment (SIGKILL included) and resumes to the result
//! an uninterrupted run gives, bit for bit (`tests/overnight.rs` kills `search` and `resume` at
//! random moments to check it):
//!
//! - `history.jsonl` is only appended to; a torn last line is ignored and cut off
//!   ([`crate::search::history`]). Every other file (`search.toml`, `space.json`,
//!   `generations.csv`, the best files, the report, the plots) is replaced atomically, through
//!   a temporary beside it ([`crate::store::writer::write_atomic`]); `model/` is merged into a
//!   temporary directory renamed into place. Temporaries a killed run left are removed when the
//!   next run starts ([`crate::store::writer::remove_stale_temps`]).
//! - [`run_search`], [`resume`] and [`Search::run`] hold the directory's [`RunLock`] while they
//!   run: a second search or resume of it refuses at once, naming the holder's pid.
//! - Floats read back exactly (serde_json's `float_roundtrip`), so a resumed CMA-ES is told the
//!   very values the original run was.
//!
//! # Progress
//!
//! With [`RunOptions::progress`] (not `--quiet`), a terminal gets a bar (evaluations, best so
//! far, seconds per evaluation, ETA); when stderr is not a terminal (nohup, Slurm, a pipe),
//! each finished generation prints one line: `NAME: generation 3 · evaluations 32/80 ·
//! failures 1 · best 0.7083 · mean 0.6021 · sigma 0.2412 · elapsed 12.3s · ETA 28.1s` (best so
//! far, the generation's mean; `· replayed` when answered from the history). The ETA is the
//! evaluations left of the budget at the wall time per evaluation of the generations this
//! process evaluated.

use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::candidate::{Candidate, CandidateBody, MemModel, Route};
use crate::device::DeviceSpec;
use crate::error::{Error, Result};
use crate::eval::{Evaluator, Split};
use crate::search::def::{EvaluatorDef, SearchDef, SpaceDef};
use crate::search::history::{self, GenerationRow, GenerationsCsv, HistoryWriter, Record, Replay};
use crate::search::optimizer::{Objective, Optimizer, OptimizerConfig};
use crate::search::space::{Decoded, DfsSpace, PsModels, PsSpace, Space};
use crate::store::writer::write_atomic;
use crate::store::{ModelSet, TensorSource};

/// The fitness a failed evaluation counts as (finite, so CMA-ES keeps running; it ranks below
/// every real score).
pub const FAILURE_FITNESS: f64 = -1e12;

/// Turns a decoded genome into a candidate to score.
pub trait CandidateBuilder: Send + Sync {
    fn build(&self, decoded: &Decoded) -> Result<Candidate>;
}

/// The real builder: PS recipes are merged in memory from memory-mapped models (opened once,
/// shared by every candidate), DFS routes run over the in-memory pool.
pub struct MergeBuilder {
    pub models: ModelSet,
    pub seed: u64,
    pub pool: Vec<Arc<MemModel>>,
}

/// Parse mergekit YAML produced by the PS decoder (model paths are absolute).
pub fn parse_recipe(text: &str) -> Result<crate::recipe::Recipe> {
    crate::recipe::Recipe::from_str(text, None)
}

impl CandidateBuilder for MergeBuilder {
    fn build(&self, decoded: &Decoded) -> Result<Candidate> {
        match decoded {
            Decoded::Recipe(yaml) => {
                let recipe = parse_recipe(yaml)?;
                let mut models = self.models.clone();
                let merged =
                    crate::merge::executor::merge_in_memory(&recipe, &mut models, self.seed)?;
                Ok(Candidate {
                    body: CandidateBody::Merged(Arc::new(merged)),
                    recipe: Some(yaml.clone()),
                })
            }
            Decoded::Route(route) => Ok(Candidate {
                body: CandidateBody::Routed {
                    models: self.pool.clone(),
                    route: route.clone(),
                },
                recipe: Some(decoded.text()),
            }),
        }
    }
}

/// The DFS / PS+DFS result file (`best_route.json`): the pool (model directories, and for
/// PS+DFS the PS recipe file whose merge is the last pool model) and the route through it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RouteFile {
    /// Pool models in order: a model directory, or `ps:<recipe.yaml>` for a PS merge; relative
    /// paths are relative to the route file's directory (a hub id is written as such).
    pub models: Vec<String>,
    pub route: Route,
}

/// Options of a run (everything a test or the CLI may want to change that is not part of the
/// search definition).
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// Show progress on stderr: a bar with an ETA on a terminal, else one line per generation
    /// (nohup, Slurm, a pipe).
    pub progress: bool,
    /// Write the best PS recipe to `model/` at the end.
    pub write_model: bool,
    /// Score the report rows on the test split at the end ([`RunSummary::test_rows`]).
    pub report: bool,
    /// Draw the plots at the end (done by [`RunOptions::finish`]: the search draws nothing).
    pub plots: bool,
    /// Test hook: behave as if killed once this many new evaluations have started (the
    /// generation in flight is abandoned; nothing after it is written).
    pub stop_after_evals: Option<usize>,
    /// Run the LM evaluator on this device instead of the definition's `[evaluator] device`
    /// (the `--device` flag); recorded in the output's `search.toml`.
    pub device: Option<DeviceSpec>,
    /// Run after a search has finished and written its outputs (not after an interruption),
    /// in its output directory. [`crate::pipeline`] installs the report and the plots here: the
    /// search hands over what the report needs and names no later stage. A PS+DFS search passes
    /// its options (hook included) to its PS run ([`ps_run`]).
    pub finish: Option<Finish>,
}

/// The hook of [`RunOptions::finish`]: output directory, what the run did, its options.
#[derive(Clone)]
pub struct Finish(pub Arc<FinishFn>);

/// The function behind a [`Finish`] hook.
pub type FinishFn = dyn Fn(&Path, &RunSummary, &RunOptions) -> Result<()> + Send + Sync;

impl Finish {
    /// A hook from a function or closure.
    pub fn new(
        f: impl Fn(&Path, &RunSummary, &RunOptions) -> Result<()> + Send + Sync + 'static,
    ) -> Finish {
        Finish(Arc::new(f))
    }
}

impl std::fmt::Debug for Finish {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Finish(..)")
    }
}

/// One candidate scored on the test split at the end of a search: a row of the report
/// (`report.json`'s `rows`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ScoredRow {
    pub name: String,
    /// The evaluator's primary value on the report split (mean over tasks); `None` on failure.
    pub primary: Option<f64>,
    pub metrics: std::collections::BTreeMap<String, f64>,
    /// Dev-split fitness from the search (the evolved row only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dev_fitness: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub seconds: f64,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            progress: true,
            write_model: true,
            report: true,
            plots: true,
            stop_after_evals: None,
            device: None,
            finish: None,
        }
    }
}

/// What a run did.
#[derive(Clone, Debug)]
pub struct RunSummary {
    /// The best record (highest dev fitness).
    pub best: Record,
    /// Generations run (replayed included).
    pub generations: usize,
    /// Evaluations run now / answered from the history.
    pub evaluated: usize,
    pub replayed: usize,
    pub failures: usize,
    /// True when stopped by [`RunOptions::stop_after_evals`].
    pub interrupted: bool,
    /// Wall time of the optimisation loop, and the part of it spent building and scoring
    /// candidates (summed over evaluations; divide by slots for wall-clock share).
    pub loop_seconds: f64,
    pub eval_seconds: f64,
    /// The search's name (its definition's `name`).
    pub search: String,
    /// The result file in the output directory (`best_recipe.yaml`, `best_route.json`); `None`
    /// when interrupted.
    pub result_file: Option<String>,
    /// The sources, the default and the evolved candidate scored on the test split, when
    /// [`RunOptions::report`] (what the report shows; [`crate::report::from_run`]).
    pub test_rows: Option<Vec<ScoredRow>>,
}

/// A prepared search: the space, how candidates are built and scored, and the report rows.
pub struct Search {
    pub def: SearchDef,
    pub space: Space,
    pub builder: Arc<dyn CandidateBuilder>,
    pub evaluator: Arc<dyn Evaluator>,
    /// Report rows scored as they are: the source models (and the PS model for PS+DFS).
    pub sources: Vec<(String, Candidate)>,
    /// Pool model names for the route file (DFS).
    pub pool_names: Vec<String>,
    /// The recipe merged to disk at the end (PS), `None` for DFS.
    pub merge_models: Option<ModelSet>,
}

/// The error of a search none of whose candidates scored: how many failed and the first one's
/// error (the rest are in history.jsonl).
fn every_evaluation_failed(all: &[Record]) -> String {
    let first = all
        .iter()
        .min_by_key(|r| (r.run, r.generation, r.index))
        .and_then(|r| r.error.as_deref())
        .unwrap_or("(no error recorded)");
    format!(
        "every evaluation failed ({} of {}); the first candidate's error: {first} (all of them \
         are in {})",
        all.len(),
        all.len(),
        history::HISTORY_FILE
    )
}

/// The folder of a PS+DFS search's output directory that holds its PS run.
pub const PS_RUN_DIR: &str = "ps";

/// The definition a run writes into its output directory (what [`resume`] re-reads).
pub const SEARCH_FILE: &str = "search.toml";

/// The lock file of an output directory ([`RunLock`]).
pub const LOCK_FILE: &str = ".lock";

/// The exclusive lock a search or resume holds on its output directory while it runs, so two
/// processes never interleave one history. It is an advisory lock (`flock(2)` on Unix) on
/// `<out>/.lock`, which also holds the holder's pid; the kernel releases it when the holder
/// ends in any way (SIGKILL included), so a lock is never stale: the file left behind by a
/// killed run means nothing. Dropping the guard releases it.
#[derive(Debug)]
pub struct RunLock {
    _file: std::fs::File,
}

impl RunLock {
    /// Take the lock of `out_dir` (which must exist), or refuse at once with an error naming
    /// the pid of the process that holds it.
    pub fn acquire(out_dir: &Path) -> Result<RunLock> {
        use std::io::{Read, Seek, Write};
        let path = out_dir.join(LOCK_FILE);
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                // The holder writes its pid right after locking: until then the file is
                // empty or names an earlier, dead holder. Give it a moment.
                let mut holder = None;
                for _ in 0..50 {
                    let mut text = String::new();
                    let _ = file.rewind();
                    let _ = file.read_to_string(&mut text);
                    holder = text
                        .strip_suffix('\n')
                        .and_then(|t| t.parse::<u32>().ok())
                        .filter(|&pid| crate::store::writer::pid_alive(pid));
                    if holder.is_some() {
                        break;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                let who = match holder {
                    Some(pid) => format!("another process (pid {pid})"),
                    None => "another process".to_string(),
                };
                return Err(Error::Search(format!(
                    "{dir} is in use: {who} is running a search or resume in it (it holds the \
                     lock {lock}); a second one would interleave its history. Wait for it to \
                     end, or stop it, then `evomerge resume {dir}`",
                    dir = out_dir.display(),
                    lock = path.display()
                )));
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(Error::io(&path, e)),
        }
        let pid = format!("{}\n", std::process::id());
        file.set_len(0)
            .and_then(|()| file.rewind())
            .and_then(|()| file.write_all(pid.as_bytes()))
            .map_err(|e| Error::io(&path, e))?;
        Ok(RunLock { _file: file })
    }
}

/// The best recipe of a PS+DFS search's PS stage, run first if needed. Nothing is written
/// outside the PS+DFS search's output directory `<out>` ([`SearchDef::output_dir`]; `--out`):
///
/// 1. `<out>/ps/best_recipe.yaml` exists: reused;
/// 2. `<out>/ps/` holds an unfinished PS run: resumed there;
/// 3. the PS definition's own output directory holds a finished run: its `best_recipe.yaml` is
///    reused, copied into `<out>/ps/` (model paths made relative to it), so a resume and the
///    route file see the same recipe even if that run is redone later;
/// 4. otherwise the PS search runs into `<out>/ps/`.
///
/// Which of these happened is printed to stderr.
pub fn ps_run(def: &SearchDef, ps_def: &SearchDef, options: &RunOptions) -> Result<PathBuf> {
    let own = def.output_dir().join(PS_RUN_DIR);
    let recipe_path = own.join("best_recipe.yaml");
    let ps_opts = RunOptions {
        stop_after_evals: None,
        ..options.clone()
    };
    if recipe_path.exists() {
        eprintln!(
            "PS+DFS: reusing the PS run's best recipe {}",
            recipe_path.display()
        );
    } else if own.join(history::HISTORY_FILE).exists() {
        eprintln!(
            "PS+DFS: resuming the unfinished PS run in {}",
            own.display()
        );
        resume_with(&own, &ps_opts)?;
    } else if let Some(theirs) =
        Some(ps_def.output_dir().join("best_recipe.yaml")).filter(|p| p.exists())
    {
        let recipe = crate::recipe::Recipe::from_path(&theirs)?;
        std::fs::create_dir_all(&own).map_err(|e| Error::io(&own, e))?;
        write_atomic(&recipe_path, recipe.relative_to(&own).to_yaml().as_bytes())?;
        eprintln!(
            "PS+DFS: reusing the finished PS run of {} ({}), copied to {}",
            ps_def.name,
            theirs.display(),
            recipe_path.display()
        );
    } else {
        eprintln!(
            "PS+DFS: no finished PS run of {} (looked in {} and {}): running it into {}",
            ps_def.name,
            own.display(),
            ps_def.output_dir().display(),
            own.display()
        );
        run_search(ps_def, &own, &ps_opts)?;
    }
    if !recipe_path.exists() {
        return Err(Error::Search(format!(
            "the PS run in {} left no best_recipe.yaml",
            own.display()
        )));
    }
    Ok(recipe_path)
}

fn layers_of(model: &dyn TensorSource) -> Result<usize> {
    let infos = model.tensor_infos();
    crate::arch::layer_count(model.config())
        .or_else(|| crate::arch::layer_count_from_names(infos.iter().map(|i| i.name.as_str())))
        .ok_or_else(|| {
            Error::Search(format!(
                "{}: cannot tell how many layers it has",
                model.label()
            ))
        })
}

fn path_name(p: &Path) -> String {
    std::fs::canonicalize(p)
        .unwrap_or_else(|_| p.to_path_buf())
        .display()
        .to_string()
}

/// The `max_position_embeddings` of the model directory's config.json (a `base+adapter`
/// reference: the base's), if it states one: the default `max_length` of the LM evaluator.
pub fn model_max_length(dir: &Path) -> Option<usize> {
    let dir = crate::store::lora::base_dir_of(dir);
    let text = std::fs::read_to_string(dir.join("config.json")).ok()?;
    let config: serde_json::Value = serde_json::from_str(&text).ok()?;
    config
        .get("max_position_embeddings")?
        .as_u64()
        .and_then(|n| usize::try_from(n).ok())
        .filter(|&n| n > 0)
}

/// Scores each candidate with the evaluator of the slot it runs on: the evaluation on thread `i`
/// of the current rayon pool (the search's pool of `slots` threads) goes to
/// `evaluators[i mod n]` ([`crate::device::slot_device`]); off any pool, to the first. The
/// search builds one LM evaluator per GPU, so slots spread over the GPUs.
pub struct PerSlot {
    evaluators: Vec<Arc<dyn Evaluator>>,
}

impl PerSlot {
    /// Route over `evaluators` (at least one).
    pub fn try_new(evaluators: Vec<Arc<dyn Evaluator>>) -> Result<PerSlot> {
        if evaluators.is_empty() {
            return Err(Error::Search("no evaluator to route slots to".into()));
        }
        Ok(PerSlot { evaluators })
    }

    /// The evaluator the calling thread's slot uses.
    pub fn current(&self) -> &Arc<dyn Evaluator> {
        let slot = rayon::current_thread_index().unwrap_or(0);
        &self.evaluators[crate::device::slot_device(slot, self.evaluators.len())]
    }
}

impl Evaluator for PerSlot {
    fn name(&self) -> &str {
        self.evaluators[0].name()
    }

    fn evaluate(
        &self,
        candidate: &Candidate,
        split: Split,
    ) -> std::result::Result<crate::eval::Score, crate::eval::EvalError> {
        self.current().evaluate(candidate, split)
    }

    fn evaluate_subsampled(
        &self,
        candidate: &Candidate,
        split: Split,
        race: &crate::eval::subsample::Race,
    ) -> Option<std::result::Result<crate::eval::subsample::Raced, crate::eval::EvalError>> {
        self.current().evaluate_subsampled(candidate, split, race)
    }
}

/// Build the evaluator a definition names. For `lm`: the tokenizer of the base (or first)
/// model, `max_length` defaulting to its `max_position_embeddings`, and one evaluator per
/// device of `[evaluator] device` (up to `parallelism.slots` of them, behind a [`PerSlot`]).
pub fn build_evaluator(def: &SearchDef) -> Result<Arc<dyn Evaluator>> {
    match &def.evaluator {
        EvaluatorDef::Lm {
            tasks,
            batch_size,
            device,
            dtype,
            max_length,
            ..
        } => {
            let tasks = tasks
                .iter()
                .map(crate::eval::tasks::Task::load)
                .collect::<Result<Vec<_>>>()?;
            let donor = def.base_model.as_ref().unwrap_or(&def.models[0]);
            let tokenizer: Arc<dyn crate::tokenizer::TextTokenizer> =
                Arc::from(crate::tokenizer::load_tokenizer(donor)?);
            let spec = device.clone().unwrap_or_default();
            let devices = spec.open_all().map_err(|e| {
                Error::Search(format!(
                    "[evaluator] device = \"{spec}\" (or --device): {e}"
                ))
            })?;
            let config = crate::eval::lm::LmConfig {
                device: candle_core::Device::Cpu,
                dtype: dtype.unwrap_or(crate::tensor::DType::F32).into(),
                batch_size: batch_size.unwrap_or(32),
                max_length: max_length.or_else(|| model_max_length(donor)),
            };
            let mut evaluators = devices
                .into_iter()
                .take(def.parallelism.slots.max(1))
                .map(|device| {
                    let config = crate::eval::lm::LmConfig {
                        device,
                        ..config.clone()
                    };
                    let e = crate::eval::lm::LmEvaluator::try_new(
                        tasks.clone(),
                        tokenizer.clone(),
                        config,
                    )?;
                    Ok(Arc::new(e) as Arc<dyn Evaluator>)
                })
                .collect::<Result<Vec<_>>>()?;
            if evaluators.len() == 1 {
                return Ok(evaluators.remove(0));
            }
            Ok(Arc::new(PerSlot::try_new(evaluators)?))
        }
        EvaluatorDef::Command { spec, .. } => Ok(Arc::new(
            crate::eval::command::CommandEvaluator::try_with_launcher(
                spec.clone(),
                def.parallelism.slurm(),
            )?,
        )),
    }
}

impl Search {
    /// Open the models, build the space and the evaluator (PS+DFS: run or reuse the PS search).
    pub fn prepare(def: &SearchDef, options: &RunOptions) -> Result<Search> {
        Search::prepare_with(def, build_evaluator(def)?, options)
    }

    /// [`Search::prepare`] with an evaluator of your own (the definition's `evaluator` section
    /// then only supplies the fitness split).
    pub fn prepare_with(
        def: &SearchDef,
        evaluator: Arc<dyn Evaluator>,
        options: &RunOptions,
    ) -> Result<Search> {
        let mut models = ModelSet::new();
        match &def.space {
            SpaceDef::Ps(ps) => {
                let method_name = def.method.as_deref().unwrap_or_default();
                let method = crate::merge::method(method_name)?;
                let base = def.base_model.as_ref();
                let probe_path = base.unwrap_or(&def.models[0]);
                // Opened under the same (canonical) paths the decoded recipes name, so every
                // candidate reuses these memory maps.
                let probe = models.get_or_open(Path::new(&path_name(probe_path)))?;
                for m in def.models.iter().chain(base) {
                    models.get_or_open(Path::new(&path_name(m)))?;
                }
                // A PS merge combines layer i of every model with layer i of the others (the
                // `models` form of a recipe): every model needs the probe's layer count, as
                // `merge` requires.
                let n_layers = layers_of(probe.as_ref())?;
                for m in def.models.iter().chain(base) {
                    let model = models.get_or_open(Path::new(&path_name(m)))?;
                    let n = layers_of(model.as_ref())?;
                    if n != n_layers {
                        return Err(Error::Search(format!(
                            "models: `{}` has {n} layers but `{}` has {n_layers}; a PS search \
                             merges layer i with layer i and needs equal layer counts (a DFS \
                             search, `kind = \"dfs\"`, can route across models of different \
                             depth)",
                            m.display(),
                            probe_path.display()
                        )));
                    }
                }
                let names: Vec<String> = probe.tensor_infos().into_iter().map(|i| i.name).collect();
                let pos = |p: crate::arch::Position| -> Vec<String> {
                    names
                        .iter()
                        .filter(|n| crate::arch::position(n) == p)
                        .cloned()
                        .collect()
                };
                let info = PsModels {
                    method: method_name.to_string(),
                    decls: method.params().to_vec(),
                    models: def.models.iter().map(|p| path_name(p)).collect(),
                    base: base.map(|b| path_name(b)),
                    n_layers,
                    pre_tensors: pos(crate::arch::Position::Pre),
                    post_tensors: pos(crate::arch::Position::Post),
                };
                // Merge in f32, store in the inputs' dtype (the base's, else the first model's).
                let in_dtype = probe
                    .tensor_infos()
                    .first()
                    .map_or(crate::tensor::DType::F32, |i| i.dtype);
                let space = Space::Ps(PsSpace::new(info, ps)?.with_out_dtype(in_dtype));
                let sources = def
                    .models
                    .iter()
                    .chain(base)
                    .map(|p| {
                        (
                            display_name(p),
                            Candidate {
                                body: CandidateBody::Dir(p.clone()),
                                recipe: None,
                            },
                        )
                    })
                    .collect();
                Ok(Search {
                    def: def.clone(),
                    space,
                    builder: Arc::new(MergeBuilder {
                        models: models.clone(),
                        seed: def.merge_seed,
                        pool: Vec::new(),
                    }),
                    evaluator,
                    sources,
                    pool_names: Vec::new(),
                    merge_models: Some(models),
                })
            }
            SpaceDef::Dfs(dfs) | SpaceDef::PsDfs { dfs, .. } => {
                let mut pool = Vec::new();
                let mut pool_names = Vec::new();
                let mut sources = Vec::new();
                for p in &def.models {
                    pool.push(Arc::new(MemModel::read_dir(p)?));
                    pool_names.push(path_name(p));
                    sources.push((
                        display_name(p),
                        Candidate {
                            body: CandidateBody::Dir(p.clone()),
                            recipe: None,
                        },
                    ));
                }
                let mut embed = dfs.embed_model.unwrap_or(0);
                if let SpaceDef::PsDfs { ps_search, .. } = &def.space {
                    let ps_def = SearchDef::load(ps_search)?;
                    let recipe_path = ps_run(def, &ps_def, options)?;
                    let yaml = std::fs::read_to_string(&recipe_path)
                        .map_err(|e| Error::io(&recipe_path, e))?;
                    let recipe = crate::recipe::Recipe::from_str(&yaml, Some(&recipe_path))?;
                    let merged = crate::merge::executor::merge_in_memory(
                        &recipe,
                        &mut models,
                        ps_def.merge_seed,
                    )?;
                    let merged = Arc::new(merged);
                    pool.push(merged.clone());
                    pool_names.push(format!("ps:{}", path_name(&recipe_path)));
                    sources.push((
                        "PS merge".to_string(),
                        Candidate {
                            body: CandidateBody::Merged(merged),
                            recipe: Some(yaml),
                        },
                    ));
                    embed = dfs.embed_model.unwrap_or(pool.len() - 1);
                }
                // Routes may cross models of different depth (each hop runs a layer of its own
                // model), but the hidden state passed between them must have one width.
                let width = |m: &MemModel| m.config().get("hidden_size").and_then(|v| v.as_u64());
                if let Some(w0) = width(&pool[0]) {
                    for (m, name) in pool.iter().zip(&pool_names).skip(1) {
                        if let Some(w) = width(m)
                            && w != w0
                        {
                            return Err(Error::Search(format!(
                                "models: `{name}` has hidden_size {w} but `{}` has {w0}; a DFS \
                                 route passes the hidden state between their layers and needs \
                                 one width",
                                pool_names[0]
                            )));
                        }
                    }
                }
                let layers = pool
                    .iter()
                    .map(|m| layers_of(m.as_ref()))
                    .collect::<Result<Vec<_>>>()?;
                let space = Space::Dfs(DfsSpace::new(layers, embed, dfs)?);
                Ok(Search {
                    def: def.clone(),
                    space,
                    builder: Arc::new(MergeBuilder {
                        models,
                        seed: def.merge_seed,
                        pool,
                    }),
                    evaluator,
                    sources,
                    pool_names,
                    merge_models: None,
                })
            }
        }
    }

    /// Run (or, with a history present, continue) the search into `out_dir`, holding its lock
    /// ([`RunLock`]) throughout.
    pub fn run(&self, out_dir: &Path, options: &RunOptions) -> Result<RunSummary> {
        std::fs::create_dir_all(out_dir).map_err(|e| Error::io(out_dir, e))?;
        let _lock = RunLock::acquire(out_dir)?;
        self.run_locked(out_dir, options)
    }

    /// [`Search::run`] with `out_dir`'s lock already held by the caller.
    fn run_locked(&self, out_dir: &Path, options: &RunOptions) -> Result<RunSummary> {
        // Temporaries of a killed earlier run (an atomic write, the merge of `model/`).
        crate::store::writer::remove_stale_temps(out_dir);
        crate::store::writer::remove_stale_temps(&out_dir.join("plots"));
        let def_path = out_dir.join(SEARCH_FILE);
        let def_text = toml::to_string(&self.def)
            .map_err(|e| Error::Search(format!("cannot write {}: {e}", def_path.display())))?;
        write_atomic(&def_path, def_text.as_bytes())?;

        let names: Vec<String> = match &self.space {
            Space::Ps(_) => self.def.models.iter().map(|p| display_name(p)).collect(),
            Space::Dfs(_) => self.sources.iter().map(|(n, _)| n.clone()).collect(),
        };
        let space_path = out_dir.join("space.json");
        let space_text = serde_json::to_string_pretty(&self.space.describe(names))
            .map_err(|e| Error::Search(format!("cannot encode space.json: {e}")))?;
        write_atomic(&space_path, space_text.as_bytes())?;

        let replay = Replay::new(history::load(out_dir)?);
        let replayed_available = replay.len();
        let ctx = Arc::new(Ctx {
            space: self.space.clone(),
            builder: self.builder.clone(),
            evaluator: self.evaluator.clone(),
            split: self.def.evaluator.fitness_split(),
            history: HistoryWriter::open(out_dir)?,
            replay,
            generation: AtomicUsize::new(0),
            run: AtomicUsize::new(0),
            index: AtomicUsize::new(0),
            started: AtomicUsize::new(0),
            stop_after: options.stop_after_evals,
            stopped: AtomicBool::new(false),
            records: Mutex::new(Vec::new()),
            counters: Mutex::new(Counters::default()),
            write_error: Mutex::new(None),
            race: self.def.evaluator.race(),
            bound: Mutex::new(None),
        });
        // Slot utilisation of generations a resume answers wholly from the history: as the
        // run that evaluated them measured it (unreadable: unknown).
        let old_rows = history::load_generations(out_dir).unwrap_or_default();
        let mut csv = GenerationsCsv::create(out_dir)?;
        let o = &self.def.optimizer;
        let cfg = OptimizerConfig {
            sigma0: o.sigma0,
            population: o.population,
            generations: o.generations,
            max_evaluations: o.max_evaluations,
            seed: o.seed,
            restarts: o.restarts,
            slots: self.def.parallelism.slots,
        };
        let c2 = ctx.clone();
        let objective: Objective = Arc::new(move |x: &[f64]| c2.objective(x));
        let space = self.space.clone();
        let mut opt = Optimizer::new(
            self.space.initial_mean(o.sigma0),
            cfg,
            objective,
            Box::new(move |rng| space.random_genome(rng)),
        )?;

        let mut progress = Progress::new(options.progress, opt.budget_evals(), &self.def.name);
        let start = Instant::now();
        let mut all: Vec<Record> = Vec::new();
        let mut generations = 0;
        let mut interrupted = false;
        // (run, bar) from the last finished generation: the bar holds within its CMA-ES run.
        let mut last_bar: Option<(usize, Option<f64>)> = None;
        loop {
            let (run, generation) = opt.next_generation();
            ctx.run.store(run, Ordering::SeqCst);
            ctx.generation.store(generation, Ordering::SeqCst);
            ctx.index.store(0, Ordering::SeqCst);
            *ctx.bound.lock().unwrap_or_else(|p| p.into_inner()) =
                last_bar.filter(|(r, _)| *r == run).and_then(|(_, b)| b);
            let before = *ctx.counters.lock().unwrap_or_else(|p| p.into_inner());
            let generation_start = Instant::now();
            let Some(info) = opt.step()? else { break };
            let wall = generation_start.elapsed().as_secs_f64();
            if let Some(e) = ctx
                .write_error
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take()
            {
                return Err(e);
            }
            let mut records =
                std::mem::take(&mut *ctx.records.lock().unwrap_or_else(|p| p.into_inner()));
            if ctx.stopped.load(Ordering::SeqCst) {
                interrupted = true;
                break;
            }
            // A fixed order (by genome bits), so the generation's mean is summed the same way
            // whatever order parallel evaluations finished in.
            records.sort_by_cached_key(|r| history::key(r.generation, &r.genome));
            last_bar = Some((
                info.run,
                crate::eval::subsample::generation_bound(records.iter().map(|r| r.fitness)),
            ));
            let c = *ctx.counters.lock().unwrap_or_else(|p| p.into_inner());
            let fresh = c.evaluated - before.evaluated;
            let mut row = GenerationRow::from_records(
                info.generation,
                info.run,
                info.evals,
                info.sigma,
                &records,
            )
            .with_utilisation(
                c.eval_seconds - before.eval_seconds,
                self.def.parallelism.slots,
                wall,
            );
            if fresh == 0 {
                row.utilisation = old_rows
                    .iter()
                    .find(|r| r.generation == info.generation && r.run == info.run)
                    .and_then(|r| r.utilisation);
            }
            csv.write(&row)?;
            all.extend(records);
            generations += 1;
            let best = history::best(&all).and_then(|r| r.fitness);
            progress.generation(&row, best, fresh, wall, &c);
        }
        progress.finish();
        let loop_seconds = start.elapsed().as_secs_f64();
        let c = *ctx.counters.lock().unwrap_or_else(|p| p.into_inner());
        let _ = replayed_available;

        let best = history::best(&all).cloned().ok_or_else(|| {
            Error::Search(if interrupted {
                "interrupted before any generation finished".into()
            } else if all.is_empty() {
                format!(
                    "the budget allows no generation: max_evaluations = {} is below the \
                     population (λ = {})",
                    o.max_evaluations.unwrap_or(0),
                    opt.lambda()
                )
            } else {
                every_evaluation_failed(&all)
            })
        })?;
        let mut summary = RunSummary {
            best: best.clone(),
            generations,
            evaluated: c.evaluated,
            replayed: c.replayed,
            failures: all.iter().filter(|r| r.fitness.is_none()).count(),
            interrupted,
            loop_seconds,
            eval_seconds: c.eval_seconds,
            search: self.def.name.clone(),
            result_file: None,
            test_rows: None,
        };
        if interrupted {
            return Ok(summary);
        }
        self.write_outputs(out_dir, &best, options, &mut summary)?;
        if let Some(finish) = &options.finish {
            (finish.0)(out_dir, &summary, options)?;
        }
        Ok(summary)
    }

    fn write_outputs(
        &self,
        out_dir: &Path,
        best: &Record,
        options: &RunOptions,
        summary: &mut RunSummary,
    ) -> Result<()> {
        let write = |name: &str, text: &str| write_atomic(&out_dir.join(name), text.as_bytes());
        // Model paths in what is written here are relative to the file's directory (hub ids
        // as such), so the output directory can be moved together with its inputs and shared.
        let out_abs = std::fs::canonicalize(out_dir).map_err(|e| Error::io(out_dir, e))?;
        let decoded = self.space.decode(&best.genome)?;
        let mut best_out = best.clone();
        if let Decoded::Recipe(yaml) = &decoded {
            best_out.recipe = parse_recipe(yaml)?.relative_to(&out_abs).to_yaml();
        }
        write(
            "best_genome.json",
            &serde_json::to_string_pretty(&best_out).unwrap_or_default(),
        )?;
        match &decoded {
            Decoded::Recipe(yaml) => {
                write("best_recipe.yaml", &best_out.recipe)?;
                if options.write_model
                    && let Some(models) = &self.merge_models
                {
                    let target = out_dir.join("model");
                    if target.exists() {
                        std::fs::remove_dir_all(&target).map_err(|e| Error::io(&target, e))?;
                    }
                    // The model card's recipe names the models relative to `model/`.
                    let recipe = parse_recipe(yaml)?.relative_to(&out_abs.join("model"));
                    let merge_options = crate::merge::executor::MergeOptions {
                        seed: self.def.merge_seed,
                        ..Default::default()
                    };
                    crate::merge::executor::merge_to_disk(
                        &recipe,
                        &mut models.clone(),
                        &target,
                        &merge_options,
                    )?;
                }
            }
            Decoded::Route(route) => {
                let file = RouteFile {
                    models: self
                        .pool_names
                        .iter()
                        .map(|n| match n.strip_prefix("ps:") {
                            Some(p) => format!(
                                "ps:{}",
                                crate::recipe::relative_path(Path::new(p), &out_abs).display()
                            ),
                            None => crate::recipe::relative_ref(Path::new(n), n, &out_abs),
                        })
                        .collect(),
                    route: route.clone(),
                };
                write(
                    "best_route.json",
                    &serde_json::to_string_pretty(&file).unwrap_or_default(),
                )?;
            }
        }
        summary.result_file = Some(
            match decoded {
                Decoded::Recipe(_) => "best_recipe.yaml",
                Decoded::Route(_) => "best_route.json",
            }
            .to_string(),
        );
        if options.report {
            summary.test_rows = Some(self.score_test_rows(best)?);
        }
        Ok(())
    }

    /// Score the sources, the default genome and the best genome on the test split.
    pub fn score_test_rows(&self, best: &Record) -> Result<Vec<ScoredRow>> {
        let mut rows: Vec<(String, Candidate, Option<f64>)> = self
            .sources
            .iter()
            .map(|(n, c)| (n.clone(), c.clone(), None))
            .collect();
        let default_label = match self.space {
            Space::Ps(_) => "default merge",
            Space::Dfs(_) => "default route (embedding model)",
        };
        let default = self.space.decode(&self.space.default_genome())?;
        rows.push((default_label.into(), self.builder.build(&default)?, None));
        let evolved_label = match &self.def.space {
            SpaceDef::Ps(_) => "evolved (PS)",
            SpaceDef::Dfs(_) => "evolved (DFS)",
            SpaceDef::PsDfs { .. } => "evolved (PS+DFS)",
        };
        let decoded = self.space.decode(&best.genome)?;
        rows.push((
            evolved_label.into(),
            self.builder.build(&decoded)?,
            best.fitness,
        ));
        let mut out = Vec::with_capacity(rows.len());
        for (name, candidate, dev) in rows {
            let t = Instant::now();
            let row = match self.evaluator.evaluate(&candidate, Split::Test) {
                Ok(score) => ScoredRow {
                    name,
                    primary: Some(score.primary),
                    metrics: score.metrics,
                    dev_fitness: dev,
                    error: None,
                    seconds: t.elapsed().as_secs_f64(),
                },
                Err(e) => ScoredRow {
                    name,
                    primary: None,
                    metrics: Default::default(),
                    dev_fitness: dev,
                    error: Some(e.to_string()),
                    seconds: t.elapsed().as_secs_f64(),
                },
            };
            out.push(row);
        }
        Ok(out)
    }
}

fn display_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| p.display().to_string())
}

/// A run's progress on stderr: a bar on a terminal; one line per generation when stderr is not
/// a terminal (nohup, Slurm, a pipe: [`progress_line`]); nothing when [`RunOptions::progress`]
/// is off (`--quiet`). Both show an ETA ([`eta_seconds`]).
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    lines: bool,
    name: String,
    budget: Option<usize>,
    start: Instant,
    /// Wall time of the generations that evaluated something in this process, and how many
    /// evaluations they ran (replayed generations take no time and would flatter the ETA).
    fresh_wall: f64,
    fresh_evals: usize,
    failures: usize,
}

impl Progress {
    fn new(show: bool, budget: Option<usize>, name: &str) -> Progress {
        use std::io::IsTerminal;
        let terminal = std::io::stderr().is_terminal();
        let bar = (show && terminal).then(|| {
            let bar = match budget {
                Some(n) => indicatif::ProgressBar::new(n as u64),
                None => indicatif::ProgressBar::no_length(),
            };
            let style = indicatif::ProgressStyle::with_template(
                "{elapsed_precise} [{bar:30}] {pos}/{len} evals · {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> ");
            bar.set_style(style);
            bar
        });
        Progress {
            bar,
            lines: show && !terminal,
            name: name.to_string(),
            budget,
            start: Instant::now(),
            fresh_wall: 0.0,
            fresh_evals: 0,
            failures: 0,
        }
    }

    /// A generation finished: `fresh` of its evaluations ran now, in `wall` seconds.
    fn generation(
        &mut self,
        row: &GenerationRow,
        best: Option<f64>,
        fresh: usize,
        wall: f64,
        c: &Counters,
    ) {
        self.failures += row.failures;
        if fresh > 0 {
            self.fresh_wall += wall;
            self.fresh_evals += fresh;
        }
        let eta = eta_seconds(self.budget, row.evals, self.fresh_wall, self.fresh_evals);
        if let Some(bar) = &self.bar {
            bar.set_position(row.evals as u64);
            bar.set_message(format!(
                "gen {} · best {} · {:.2} s/eval · ETA {}{}",
                row.generation,
                best.map_or("–".into(), |b| format!("{b:.4}")),
                if c.evaluated > 0 {
                    c.eval_seconds / c.evaluated as f64
                } else {
                    0.0
                },
                eta.map_or("–".into(), duration),
                if c.replayed > 0 {
                    format!(" · {} replayed", c.replayed)
                } else {
                    String::new()
                },
            ));
        }
        if self.lines {
            eprintln!(
                "{}",
                progress_line(&ProgressLine {
                    search: &self.name,
                    row,
                    budget: self.budget,
                    failures: self.failures,
                    best,
                    elapsed: self.start.elapsed().as_secs_f64(),
                    eta,
                    replayed: fresh == 0,
                })
            );
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// What one progress line shows ([`progress_line`]).
struct ProgressLine<'a> {
    search: &'a str,
    row: &'a GenerationRow,
    budget: Option<usize>,
    /// Failed evaluations so far (replayed ones included).
    failures: usize,
    /// The best fitness so far.
    best: Option<f64>,
    elapsed: f64,
    eta: Option<f64>,
    /// The generation was answered wholly from the history.
    replayed: bool,
}

/// One generation as a line of text, e.g. `toy-ps: generation 3 · evaluations 32/80 ·
/// failures 1 · best 0.7083 · mean 0.6021 · sigma 0.2412 · elapsed 12.3s · ETA 28.1s`
/// (generation numbers as in `generations.csv`; `best` is the best so far, `mean` the
/// generation's; `–` where unknown).
fn progress_line(p: &ProgressLine) -> String {
    let num = |v: Option<f64>| match v {
        Some(v) if v.is_finite() => format!("{v:.4}"),
        _ => "–".to_string(),
    };
    format!(
        "{}: generation {} · evaluations {}{} · failures {} · best {} · mean {} · sigma {} · \
         elapsed {} · ETA {}{}",
        p.search,
        p.row.generation,
        p.row.evals,
        p.budget.map_or(String::new(), |b| format!("/{b}")),
        p.failures,
        num(p.best),
        num(Some(p.row.mean)),
        num(Some(p.row.sigma)),
        duration(p.elapsed),
        p.eta.map_or("–".to_string(), duration),
        if p.replayed { " · replayed" } else { "" },
    )
}

/// Seconds left: the evaluations left of the budget at the wall time per evaluation of this
/// process's evaluated generations; `None` with no budget or nothing evaluated yet.
fn eta_seconds(
    budget: Option<usize>,
    evals: usize,
    fresh_wall: f64,
    fresh_evals: usize,
) -> Option<f64> {
    let left = budget?.saturating_sub(evals);
    if left == 0 {
        return Some(0.0);
    }
    (fresh_evals > 0).then(|| left as f64 * fresh_wall / fresh_evals as f64)
}

/// `42.0s`, `12m05s`, `3h07m`.
fn duration(seconds: f64) -> String {
    let s = seconds.max(0.0);
    if s < 60.0 {
        format!("{s:.1}s")
    } else if s < 3600.0 {
        let s = s.round() as u64;
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        let m = (s / 60.0).round() as u64;
        format!("{}h{:02}m", m / 60, m % 60)
    }
}

#[derive(Clone, Copy, Debug, Default)]
struct Counters {
    evaluated: usize,
    replayed: usize,
    eval_seconds: f64,
}

/// Everything the objective needs; shared by the evaluation threads.
struct Ctx {
    space: Space,
    builder: Arc<dyn CandidateBuilder>,
    evaluator: Arc<dyn Evaluator>,
    split: Split,
    history: HistoryWriter,
    replay: Replay,
    run: AtomicUsize,
    generation: AtomicUsize,
    index: AtomicUsize,
    started: AtomicUsize,
    stop_after: Option<usize>,
    stopped: AtomicBool,
    records: Mutex<Vec<Record>>,
    counters: Mutex<Counters>,
    write_error: Mutex<Option<Error>>,
    /// `[evaluator] subsample`'s race and the bar of the generation in flight
    /// ([`crate::eval::subsample`]: the previous generation's μ-th best, `None` in a run's first).
    race: Option<crate::eval::subsample::Race>,
    bound: Mutex<Option<f64>>,
}

fn objective_value(r: &Record) -> f64 {
    -r.fitness.unwrap_or(FAILURE_FITNESS)
}

fn panic_message(p: Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".into()
    }
}

impl Ctx {
    fn objective(&self, x: &[f64]) -> f64 {
        let generation = self.generation.load(Ordering::SeqCst);
        if let Some(r) = self.replay.get(generation, x) {
            let mut r = r.clone();
            r.genome = x.to_vec();
            let v = objective_value(&r);
            self.counters
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .replayed += 1;
            self.records
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(r);
            return v;
        }
        if self.stopped.load(Ordering::SeqCst) {
            return 0.0;
        }
        let n = self.started.fetch_add(1, Ordering::SeqCst);
        if self.stop_after.is_some_and(|k| n >= k) {
            self.stopped.store(true, Ordering::SeqCst);
            return 0.0;
        }
        let index = self.index.fetch_add(1, Ordering::SeqCst);
        let t = Instant::now();
        let decoded = self.space.decode(x);
        let recipe = decoded.as_ref().map(Decoded::text).unwrap_or_default();
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(
            || -> std::result::Result<crate::eval::Score, String> {
                let decoded = decoded.map_err(|e| e.to_string())?;
                let candidate = self
                    .builder
                    .build(&decoded)
                    .map_err(|e| format!("building the candidate: {e}"))?;
                let race = self.race.map(|r| crate::eval::subsample::Race {
                    bound: *self.bound.lock().unwrap_or_else(|p| p.into_inner()),
                    ..r
                });
                let score = crate::eval::subsample::evaluate(
                    self.evaluator.as_ref(),
                    &candidate,
                    self.split,
                    race,
                )
                .map_err(|e| e.to_string())?;
                if !score.primary.is_finite() {
                    return Err(format!("the fitness is not finite ({})", score.primary));
                }
                Ok(score)
            },
        ))
        .unwrap_or_else(|p| Err(format!("the evaluation panicked: {}", panic_message(p))));
        let seconds = t.elapsed().as_secs_f64();
        let record = match outcome {
            Ok(score) => Record {
                run: self.run.load(Ordering::SeqCst),
                generation,
                index,
                genome: x.to_vec(),
                recipe,
                fitness: Some(score.primary),
                metrics: score.metrics,
                seconds,
                error: None,
            },
            Err(e) => Record {
                run: self.run.load(Ordering::SeqCst),
                generation,
                index,
                genome: x.to_vec(),
                recipe,
                fitness: None,
                metrics: Default::default(),
                seconds,
                error: Some(e),
            },
        };
        if let Err(e) = self.history.append(&record) {
            *self.write_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
        }
        {
            let mut c = self.counters.lock().unwrap_or_else(|p| p.into_inner());
            c.evaluated += 1;
            c.eval_seconds += seconds;
        }
        let v = objective_value(&record);
        self.records
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(record);
        v
    }
}

/// Run `def` into `out_dir` (which must not hold a history yet; use [`resume`] for that).
pub fn run_search(def: &SearchDef, out_dir: &Path, options: &RunOptions) -> Result<RunSummary> {
    std::fs::create_dir_all(out_dir).map_err(|e| Error::io(out_dir, e))?;
    let lock = RunLock::acquire(out_dir)?;
    if out_dir.join(history::HISTORY_FILE).exists() {
        return Err(Error::Search(format!(
            "{} already holds a search history: resume it with `evomerge resume {}`, or choose \
             another output directory",
            out_dir.display(),
            out_dir.display()
        )));
    }
    let def = with_out(with_device(def, options)?, out_dir);
    let summary = Search::prepare(&def, options)?.run_locked(out_dir, options);
    drop(lock);
    summary
}

/// `def` writing into `out_dir` (where a PS+DFS search keeps its PS run, [`ps_run`]).
fn with_out(mut def: SearchDef, out_dir: &Path) -> SearchDef {
    def.output = Some(out_dir.to_path_buf());
    def
}

/// `def` with [`RunOptions::device`] applied.
fn with_device(def: &SearchDef, options: &RunOptions) -> Result<SearchDef> {
    let mut def = def.clone();
    if let Some(spec) = &options.device {
        def.evaluator.set_device(spec.clone())?;
    }
    Ok(def)
}

/// Continue the search recorded in `out_dir` (re-read from its `search.toml`): the run is
/// repeated with the same seed and every proposal already in the history is answered from it.
/// Writes no report or plots ([`crate::pipeline::resume`] does).
pub fn resume(out_dir: &Path) -> Result<RunSummary> {
    resume_with(out_dir, &RunOptions::default())
}

/// [`resume`] with options.
pub fn resume_with(out_dir: &Path, options: &RunOptions) -> Result<RunSummary> {
    // Locked before anything is read, so a second resume refuses at once (also while a search
    // there has not written its definition yet); a directory no run has used gets no lock file
    // (load_saved_def says what is missing).
    let used = out_dir.join(SEARCH_FILE).is_file() || out_dir.join(LOCK_FILE).is_file();
    let lock = used.then(|| RunLock::acquire(out_dir)).transpose()?;
    let def = with_out(with_device(&load_saved_def(out_dir)?, options)?, out_dir);
    let summary = Search::prepare(&def, options)?.run_locked(out_dir, options);
    drop(lock);
    summary
}

/// The definition saved in `out_dir/search.toml` (paths already resolved).
pub fn load_saved_def(out_dir: &Path) -> Result<SearchDef> {
    let path: PathBuf = out_dir.join(SEARCH_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let def: SearchDef = toml::from_str(&text).map_err(|e| Error::Config {
        path: path.clone(),
        msg: e.to_string(),
    })?;
    def.validate_in(&text, &path)?;
    Ok(def)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_lines_carry_every_field_and_an_eta() {
        let row = GenerationRow {
            generation: 3,
            run: 0,
            evals: 32,
            best: 0.71,
            mean: 0.602083,
            worst: 0.5,
            sigma: 0.24125,
            failures: 1,
            utilisation: Some(0.9),
        };
        // 24 evaluations ran in 12 s: 48 left take 24 s.
        let eta = eta_seconds(Some(80), 32, 12.0, 24);
        assert_eq!(eta, Some(24.0));
        let line = progress_line(&ProgressLine {
            search: "toy-ps",
            row: &row,
            budget: Some(80),
            failures: 2,
            best: Some(0.7083333),
            elapsed: 12.34,
            eta,
            replayed: false,
        });
        assert_eq!(
            line,
            "toy-ps: generation 3 · evaluations 32/80 · failures 2 · best 0.7083 · mean 0.6021 \
             · sigma 0.2412 · elapsed 12.3s · ETA 24.0s"
        );
        let all_failed = GenerationRow {
            mean: f64::NAN,
            ..row.clone()
        };
        let line = progress_line(&ProgressLine {
            search: "s",
            row: &all_failed,
            budget: None,
            failures: 8,
            best: None,
            elapsed: 4000.0,
            eta: eta_seconds(None, 32, 12.0, 24),
            replayed: true,
        });
        assert_eq!(
            line,
            "s: generation 3 · evaluations 32 · failures 8 · best – · mean – · sigma 0.2412 · \
             elapsed 1h07m · ETA – · replayed"
        );
        // nothing evaluated yet (all replayed): unknown; the budget spent: none left
        assert_eq!(eta_seconds(Some(80), 32, 0.0, 0), None);
        assert_eq!(eta_seconds(Some(80), 80, 0.0, 0), Some(0.0));
        assert_eq!(duration(725.4), "12m05s");
        assert_eq!(duration(59.94), "59.9s");
    }

    #[test]
    fn a_second_lock_on_a_run_directory_names_the_holder() {
        let dir = tempfile::tempdir().unwrap();
        let held = RunLock::acquire(dir.path()).unwrap();
        let lock = dir.path().join(LOCK_FILE);
        assert_eq!(
            std::fs::read_to_string(&lock).unwrap(),
            format!("{}\n", std::process::id())
        );
        let err = RunLock::acquire(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains(&format!("(pid {})", std::process::id())) && err.contains("in use"),
            "{err}"
        );
        drop(held);
        // released with its holder; the file left behind means nothing
        let again = RunLock::acquire(dir.path()).unwrap();
        drop(again);
        assert!(lock.exists());
    }
}
