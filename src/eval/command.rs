//! The command evaluator: scores a candidate by running an external program (a benchmark
//! harness, a script) and reading one JSON object of metrics from its stdout.
//!
//! # Protocol
//!
//! For every evaluation the evaluator makes a fresh scratch directory and fills it with:
//!
//! - `recipe.yaml`: the candidate's recipe (mergekit YAML, or our DFS recipe), when it has one;
//! - `model/`: the candidate written as a Hugging Face model directory (safetensors shards,
//!   config.json, tokenizer files copied from `donor`), when the candidate is in memory and
//!   `write_model` is true (the default). A candidate that already is a directory is passed as
//!   is; a data-flow (routed) candidate cannot be written and needs `write_model = false`.
//!
//! The program gets them through placeholders in its argv (and in `env` values) and through
//! environment variables:
//!
//! | placeholder   | variable             | value                                        |
//! |---------------|----------------------|----------------------------------------------|
//! | `{recipe}`    | `EVOMERGE_RECIPE`    | path of the recipe file                      |
//! | `{model_dir}` | `EVOMERGE_MODEL_DIR` | the model directory                          |
//! | `{split}`     | `EVOMERGE_SPLIT`     | `dev` (search) or `test` (final report)      |
//! | `{work_dir}`  | `EVOMERGE_WORK_DIR`  | the scratch directory (write outputs here)   |
//!
//! A variable is unset when its value does not exist (no recipe, no model); a placeholder whose
//! value does not exist is an [`EvalError::Candidate`]. The program also gets
//! `EVOMERGE_OWNER=<host>:<pid>` ([`crate::procs::OWNER_ENV`]). Its stdin is empty, it runs in
//! its own process group, and its **last non-empty stdout line** must be one flat JSON object of
//! numbers, e.g. `{"primary": 0.61, "gsm8k/acc": 0.58, "mmlu/acc": 0.64}` (earlier lines are
//! free for logs). The fitness is the key named by `metric` (default `primary`). `NaN`,
//! `Infinity` (as Python's `json.dumps` prints them) and `null` are not finite. The scratch
//! directory, `evomerge-eval-<host>-<pid>-<n>-<nanos>` in `scratch_dir` (default: the system
//! temp dir), is removed afterwards.
//!
//! **Where it runs.** A local child process by default; with `[parallelism] launcher = "slurm"`
//! ([`CommandEvaluator::try_with_launcher`]) each evaluation is a Slurm job started with `srun`
//! (see [`crate::eval::slurm`]), and `scratch_dir` must be on a file system every node shares.
//!
//! **Interruptions** ([`crate::procs`]). Live evaluator process groups, Slurm jobs and scratch
//! directories are registered: on SIGINT / SIGTERM the `evomerge` binary kills, cancels and
//! removes them before it exits (130 / 143), and the evaluations cut short are not recorded.
//! After a SIGKILL, the direct child dies with evomerge (its parent-death signal: SIGKILL, or
//! SIGTERM for `srun`, which then cancels its job), and the next command evaluator made on the
//! same host removes what is left ([`crate::procs::sweep_leftovers`]).
//!
//! Failures are typed: exit status ≠ 0 → [`EvalError::Exit`]; past `timeout_s` → the whole
//! process group is killed and [`EvalError::Timeout`]; a last line that is not such an object,
//! or a missing fitness key → [`EvalError::BadOutput`]; a non-finite value →
//! [`EvalError::NotFinite`]. Each carries the tail of the child's stderr (at most
//! `max_stderr_bytes`).
//!
//! `timeout_s` (default 3600) must be a finite number of seconds, above 0 and at most
//! [`MAX_TIMEOUT_S`] (30 days); `max_stderr_bytes` (default 64 KiB) at most [`MAX_STDERR_BYTES`].
//!
//! ```toml
//! [evaluator]
//! kind = "command"
//! command = ["python", "scripts/lm_eval_json.py", "{model_dir}", "{split}", "{work_dir}"]
//! timeout_s = 3600
//! metric = "primary"
//! donor = "models/base"   # tokenizer files for the written model
//! ```

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::candidate::{Candidate, CandidateBody, MemModel};
use crate::error::{Error, Result};
use crate::eval::slurm::SlurmOptions;
use crate::eval::{EvalError, Evaluator, Score, Split};
use crate::store::{ModelWriter, TensorInfo, WriteConfig};
use crate::tensor::DType;

/// The placeholders a command may use.
pub const PLACEHOLDERS: [&str; 4] = ["recipe", "model_dir", "split", "work_dir"];

fn default_timeout() -> f64 {
    3600.0
}

/// The longest `timeout_s` accepted: 30 days.
pub const MAX_TIMEOUT_S: f64 = 30.0 * 24.0 * 3600.0;

/// The largest `max_stderr_bytes` accepted: 64 MiB.
pub const MAX_STDERR_BYTES: usize = 64 << 20;

fn default_true() -> bool {
    true
}

fn default_stderr_limit() -> usize {
    64 * 1024
}

/// How to run the external evaluator (embedded in a search TOML, hence `deny_unknown_fields`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandSpec {
    /// Program and arguments, with placeholders (`{recipe}`, `{model_dir}`, `{split}`,
    /// `{work_dir}`).
    pub command: Vec<String>,
    /// Seconds before the process group is killed. Default 3600.
    #[serde(default = "default_timeout")]
    pub timeout_s: f64,
    /// The output key that is the fitness. Default `primary`.
    #[serde(default)]
    pub metric: Option<String>,
    /// Extra environment variables (placeholders allowed in values).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Working directory of the program. Default: the current one.
    #[serde(default)]
    pub cwd: Option<PathBuf>,
    /// Write in-memory candidates to `{model_dir}` (default true). Set false for programs that
    /// only need the recipe.
    #[serde(default = "default_true")]
    pub write_model: bool,
    /// A model directory whose tokenizer / generation files are copied into written models.
    #[serde(default)]
    pub donor: Option<PathBuf>,
    /// Storage dtype of written models. Default: the candidate config's `torch_dtype`, else f32.
    #[serde(default)]
    pub dtype: Option<DType>,
    /// Where scratch directories go. Default: the system temp dir.
    #[serde(default)]
    pub scratch_dir: Option<PathBuf>,
    /// How much of the child's stderr (its tail) errors keep. Default 64 KiB.
    #[serde(default = "default_stderr_limit")]
    pub max_stderr_bytes: usize,
}

impl CommandSpec {
    /// A spec running `command` with the defaults.
    pub fn new<S: Into<String>>(command: impl IntoIterator<Item = S>) -> Self {
        CommandSpec {
            command: command.into_iter().map(Into::into).collect(),
            timeout_s: default_timeout(),
            metric: None,
            env: BTreeMap::new(),
            cwd: None,
            write_model: true,
            donor: None,
            dtype: None,
            scratch_dir: None,
            max_stderr_bytes: default_stderr_limit(),
        }
    }

    /// A non-empty command, only known placeholders, `0 < timeout_s ≤` [`MAX_TIMEOUT_S`],
    /// `max_stderr_bytes ≤` [`MAX_STDERR_BYTES`]. The error is the offending key and a message
    /// that starts with it.
    pub fn check(&self) -> std::result::Result<(), (&'static str, String)> {
        if self.command.is_empty() || self.command[0].is_empty() {
            return Err(("command", "command is empty".into()));
        }
        if !(self.timeout_s.is_finite() && self.timeout_s > 0.0 && self.timeout_s <= MAX_TIMEOUT_S)
        {
            return Err((
                "timeout_s",
                format!(
                    "timeout_s = {:?} must be > 0 and ≤ {MAX_TIMEOUT_S} (30 days)",
                    self.timeout_s
                ),
            ));
        }
        if self.max_stderr_bytes > MAX_STDERR_BYTES {
            return Err((
                "max_stderr_bytes",
                format!(
                    "max_stderr_bytes = {} must be ≤ {MAX_STDERR_BYTES} (64 MiB)",
                    self.max_stderr_bytes
                ),
            ));
        }
        for s in self.command.iter().chain(self.env.values()) {
            for p in placeholders_in(s) {
                if !PLACEHOLDERS.contains(&p) {
                    let key = if self.command.contains(s) {
                        "command"
                    } else {
                        "env"
                    };
                    return Err((
                        key,
                        format!(
                            "{key}: unknown placeholder `{{{p}}}` in {s:?} (known: {})",
                            PLACEHOLDERS.map(|p| format!("{{{p}}}")).join(", ")
                        ),
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Runs an external program per candidate; see the module docs for the protocol.
pub struct CommandEvaluator {
    spec: CommandSpec,
    name: String,
    /// Run each evaluation as a Slurm job ([`crate::eval::slurm`]) instead of a local child.
    slurm: Option<SlurmOptions>,
}

impl CommandEvaluator {
    /// Validate `spec` (see [`CommandSpec::check`]); evaluations run as local child processes.
    pub fn try_new(spec: CommandSpec) -> Result<Self> {
        CommandEvaluator::try_with_launcher(spec, None)
    }

    /// Validate `spec`; with `slurm`, each evaluation runs as a Slurm job (which needs
    /// `scratch_dir`, on a file system every node shares, and `srun` on the `PATH`). Removes what
    /// an evomerge killed outright on this host left behind ([`crate::procs::sweep_leftovers`]).
    pub fn try_with_launcher(spec: CommandSpec, slurm: Option<SlurmOptions>) -> Result<Self> {
        spec.check()
            .map_err(|(_, msg)| Error::Eval(format!("command evaluator: {msg}")))?;
        if let Some(options) = &slurm {
            options
                .check()
                .map_err(|(_, msg)| Error::Eval(format!("command evaluator on Slurm: {msg}")))?;
            if spec.scratch_dir.is_none() {
                return Err(Error::Eval(
                    "command evaluator on Slurm: set `scratch_dir` to a directory every node \
                     shares (the job reads the candidate there and writes its outputs there)"
                        .into(),
                ));
            }
            if !crate::eval::slurm::srun_available() {
                return Err(Error::Eval(
                    "command evaluator on Slurm: `srun --version` does not run; is this a \
                     Slurm login node (scripts/slurm-up.sh starts a local one)?"
                        .into(),
                ));
            }
        }
        let name = Path::new(&spec.command[0])
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "command".into());
        crate::procs::sweep_leftovers(
            &scratch_parent(spec.scratch_dir.as_deref())?,
            slurm.is_some(),
        );
        Ok(CommandEvaluator { spec, name, slurm })
    }

    /// The Slurm options, when evaluations run as Slurm jobs.
    pub fn slurm(&self) -> Option<&SlurmOptions> {
        self.slurm.as_ref()
    }

    /// The spec it runs.
    pub fn spec(&self) -> &CommandSpec {
        &self.spec
    }

    fn uses(&self, placeholder: &str) -> bool {
        self.spec
            .command
            .iter()
            .chain(self.spec.env.values())
            .any(|s| placeholders_in(s).contains(&placeholder))
    }

    /// Write `model` under `dir/model` as a Hugging Face directory.
    fn write_model(&self, model: &MemModel, dir: &Path) -> Result<PathBuf> {
        let dtype = self.spec.dtype.unwrap_or_else(|| {
            model
                .config
                .get("torch_dtype")
                .and_then(|v| v.as_str())
                .and_then(|s| s.parse().ok())
                .unwrap_or(DType::F32)
        });
        let infos: Vec<TensorInfo> = model
            .tensors
            .iter()
            .map(|(name, t)| TensorInfo {
                name: name.clone(),
                dtype,
                shape: t.shape.clone(),
            })
            .collect();
        let target = dir.join("model");
        let writer = ModelWriter::create(
            &target,
            &infos,
            &WriteConfig {
                max_shard_size: 5_000_000_000,
            },
        )?;
        for (name, t) in &model.tensors {
            writer.write(name, &t.values())?;
        }
        let mut config = model.config.clone();
        if let Some(obj) = config.as_object_mut() {
            obj.insert("torch_dtype".into(), dtype.torch_name().into());
        }
        writer.finish(
            &config,
            self.spec.donor.as_deref(),
            "Candidate written by evomerge for an external evaluator.\n",
        )
    }

    fn run(&self, candidate: &Candidate, split: Split) -> Result<Score, EvalError> {
        let scratch = ScratchDir::create(self.spec.scratch_dir.as_deref())?;
        let mut values: BTreeMap<&str, String> = BTreeMap::new();
        values.insert("work_dir", path_str(scratch.path()));
        values.insert("split", split.name().into());
        if let Some(recipe) = &candidate.recipe {
            let path = scratch.path().join("recipe.yaml");
            std::fs::write(&path, recipe).map_err(|e| Error::io(&path, e))?;
            values.insert("recipe", path_str(&path));
        }
        let model_dir = match &candidate.body {
            // Absolute, so a `cwd` of the command does not change what a relative path means.
            CandidateBody::Dir(dir) => {
                Some(std::path::absolute(dir).map_err(|e| Error::io(dir, e))?)
            }
            CandidateBody::Merged(model) if self.spec.write_model => Some(
                self.write_model(model, scratch.path())
                    .map_err(|e| EvalError::Candidate(format!("writing the model: {e}")))?,
            ),
            CandidateBody::Routed { .. } if self.spec.write_model => {
                return Err(EvalError::Candidate(
                    "a routed (data-flow) candidate cannot be written as a model directory; \
                     set `write_model = false` for a recipe-only command"
                        .into(),
                ));
            }
            _ => None,
        };
        if let Some(dir) = model_dir {
            values.insert("model_dir", path_str(&dir));
        }
        for p in PLACEHOLDERS {
            if self.uses(p) && !values.contains_key(p) {
                return Err(EvalError::Candidate(format!(
                    "the command uses {{{p}}} but the candidate has none"
                )));
            }
        }

        let argv: Vec<String> = self
            .spec
            .command
            .iter()
            .map(|a| substitute(a, &values))
            .collect();
        let job = self.slurm.as_ref().map(|_| crate::eval::slurm::job_name());
        let mut cmd = match (&self.slurm, &job) {
            (Some(options), Some(job)) => {
                let mut cmd = Command::new("srun");
                cmd.args(options.srun_args_for(job, self.spec.timeout_s, &argv));
                // Inside an allocation (evomerge itself run by sbatch / salloc), the inherited
                // job variables would make `srun` start a step of that allocation, and its
                // output variables would be read back as options: each evaluation is a job of
                // its own. `env` below may still set any of them.
                for (key, _) in std::env::vars_os() {
                    if key
                        .to_str()
                        .is_some_and(|k| k.starts_with("SLURM_") && k != "SLURM_CONF")
                    {
                        cmd.env_remove(key);
                    }
                }
                cmd
            }
            _ => {
                let mut cmd = Command::new(&argv[0]);
                cmd.args(&argv[1..]);
                cmd
            }
        };
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (p, var) in [
            ("recipe", "EVOMERGE_RECIPE"),
            ("model_dir", "EVOMERGE_MODEL_DIR"),
            ("split", "EVOMERGE_SPLIT"),
            ("work_dir", "EVOMERGE_WORK_DIR"),
        ] {
            match values.get(p) {
                Some(v) => cmd.env(var, v),
                None => cmd.env_remove(var),
            };
        }
        for (k, v) in &self.spec.env {
            cmd.env(k, substitute(v, &values));
        }
        if let Some(cwd) = &self.spec.cwd {
            cmd.current_dir(cwd);
        }
        let program = if job.is_some() { "srun" } else { &argv[0] };
        let out = run_with_timeout(
            cmd,
            program,
            Duration::try_from_secs_f64(self.spec.timeout_s).unwrap_or(Duration::MAX),
            self.spec.max_stderr_bytes,
            job.as_deref(),
        )?;
        match out.status {
            Outcome::TimedOut => Err(EvalError::Timeout {
                seconds: self.spec.timeout_s,
                stderr: out.stderr,
            }),
            Outcome::Exited(status) if !status.success() => match (&self.slurm, &job) {
                (Some(options), Some(job)) => Err(crate::eval::slurm::job_error(
                    job,
                    &status.to_string(),
                    options.time_limit_s(self.spec.timeout_s),
                    out.stderr,
                )),
                _ => Err(EvalError::Exit {
                    status: status.to_string(),
                    stderr: out.stderr,
                }),
            },
            Outcome::Exited(_) => {
                let key = self.spec.metric.as_deref().unwrap_or("primary");
                score_from_stdout(&out.stdout, key).map_err(|e| match e {
                    OutputError::Bad(reason) => EvalError::BadOutput {
                        reason,
                        stdout: tail_chars(&out.stdout, 2000),
                        stderr: out.stderr,
                    },
                    OutputError::NotFinite(metric, value) => EvalError::NotFinite { metric, value },
                })
            }
        }
    }
}

impl Evaluator for CommandEvaluator {
    fn name(&self) -> &str {
        &self.name
    }

    fn evaluate(&self, candidate: &Candidate, split: Split) -> Result<Score, EvalError> {
        self.run(candidate, split)
    }
}

fn path_str(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// The `{name}` placeholders in `s` (names of ASCII lowercase letters and `_`).
fn placeholders_in(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = s;
    while let Some(open) = rest.find('{') {
        let after = &rest[open + 1..];
        match after.find('}') {
            Some(close)
                if close > 0
                    && after[..close]
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b == b'_') =>
            {
                out.push(&after[..close]);
                rest = &after[close + 1..];
            }
            _ => rest = after,
        }
    }
    out
}

fn substitute(s: &str, values: &BTreeMap<&str, String>) -> String {
    let mut out = s.to_string();
    for (k, v) in values {
        out = out.replace(&format!("{{{k}}}"), v);
    }
    out
}

/// Why stdout could not be turned into a score.
#[derive(Debug, PartialEq)]
enum OutputError {
    Bad(String),
    NotFinite(String, f64),
}

const NAN: &str = "__evomerge_nan__";
const INF: &str = "__evomerge_inf__";
const NEG_INF: &str = "__evomerge_neg_inf__";

/// Replace the bare tokens `NaN`, `Infinity`, `-Infinity` (outside strings) with sentinel
/// strings, so Python's non-standard JSON parses and non-finite values can be reported as such.
fn quote_non_finite(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut in_string = false;
    let mut escaped = false;
    let mut i = 0;
    while i < line.len() {
        let rest = &line[i..];
        let c = rest.chars().next().expect("non-empty");
        if in_string {
            out.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
            i += c.len_utf8();
            continue;
        }
        let token = [("-Infinity", NEG_INF), ("Infinity", INF), ("NaN", NAN)]
            .into_iter()
            .find(|(t, _)| rest.starts_with(t));
        if let Some((t, sentinel)) = token {
            out.push('"');
            out.push_str(sentinel);
            out.push('"');
            i += t.len();
            continue;
        }
        if c == '"' {
            in_string = true;
        }
        out.push(c);
        i += c.len_utf8();
    }
    out
}

/// Parse the metrics on the last non-empty line of `stdout` and pick `key` as the fitness.
fn score_from_stdout(stdout: &str, key: &str) -> Result<Score, OutputError> {
    let line = stdout
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .ok_or_else(|| OutputError::Bad("empty output".into()))?;
    let value: serde_json::Value = serde_json::from_str(&quote_non_finite(line))
        .map_err(|e| OutputError::Bad(format!("last non-empty line is not JSON: {e}")))?;
    let serde_json::Value::Object(map) = value else {
        return Err(OutputError::Bad(
            "last non-empty line is not a JSON object".into(),
        ));
    };
    let mut metrics = BTreeMap::new();
    for (k, v) in &map {
        let x = match v {
            serde_json::Value::Number(n) => n
                .as_f64()
                .ok_or_else(|| OutputError::Bad(format!("metric `{k}` is not a number")))?,
            serde_json::Value::String(s) if s == NAN => f64::NAN,
            serde_json::Value::String(s) if s == INF => f64::INFINITY,
            serde_json::Value::String(s) if s == NEG_INF => f64::NEG_INFINITY,
            serde_json::Value::Null => f64::NAN,
            other => {
                return Err(OutputError::Bad(format!(
                    "metric `{k}` is not a number: {other}"
                )));
            }
        };
        metrics.insert(k.clone(), x);
    }
    if let Some((k, v)) = metrics.iter().find(|(_, v)| !v.is_finite()) {
        return Err(OutputError::NotFinite(k.clone(), *v));
    }
    let primary = *metrics
        .get(key)
        .ok_or_else(|| OutputError::Bad(format!("no `{key}` key among the metrics")))?;
    Ok(Score { primary, metrics })
}

fn tail_chars(s: &str, n: usize) -> String {
    let count = s.chars().count();
    if count <= n {
        s.to_string()
    } else {
        format!("…{}", s.chars().skip(count - n).collect::<String>())
    }
}

/// Where scratch directories go: `scratch_dir` (absolute), else the system temp dir.
fn scratch_parent(dir: Option<&Path>) -> Result<PathBuf> {
    match dir {
        Some(p) => std::path::absolute(p).map_err(|e| Error::io(p, e)),
        None => Ok(std::env::temp_dir()),
    }
}

/// A scratch directory, `evomerge-eval-<host>-<pid>-<n>-<nanos>` (so a later evomerge can tell
/// whose it was: [`crate::procs::scratch_owner`]), removed on drop and, through its registration,
/// when evomerge is interrupted.
struct ScratchDir {
    path: PathBuf,
    _live: crate::procs::Live,
}

impl ScratchDir {
    fn create(parent: Option<&Path>) -> Result<Self> {
        let parent = scratch_parent(parent)?;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        loop {
            let n = crate::procs::next_number();
            let path = parent.join(format!(
                "{}{}-{}-{n}-{nanos:08x}",
                crate::procs::SCRATCH_PREFIX,
                crate::procs::host(),
                std::process::id()
            ));
            match crate::procs::create_dir(&path) {
                Ok(live) => return Ok(ScratchDir { path, _live: live }),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(Error::io(path, e)),
            }
        }
    }

    fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        // Removed before `_live` unregisters it.
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// The last `cap` bytes read from a pipe, and how many were dropped before them.
#[derive(Default)]
struct Tail {
    bytes: Vec<u8>,
    dropped: usize,
}

impl Tail {
    fn text(&self) -> String {
        let s = String::from_utf8_lossy(&self.bytes);
        if self.dropped > 0 {
            format!("[… {} bytes cut …]{s}", self.dropped)
        } else {
            s.into_owned()
        }
    }
}

/// Read `r` to its end on a thread, keeping the last `cap` bytes. The receiver fires when done.
fn spawn_reader(mut r: impl Read + Send + 'static, cap: usize) -> (Arc<Mutex<Tail>>, Receiver<()>) {
    let tail = Arc::new(Mutex::new(Tail::default()));
    let (tx, rx) = mpsc::channel();
    let t = tail.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 8192];
        loop {
            match r.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let mut t = t.lock().unwrap_or_else(|e| e.into_inner());
                    t.bytes.extend_from_slice(&buf[..n]);
                    if t.bytes.len() > cap.saturating_mul(2).max(8192) {
                        let cut = t.bytes.len() - cap;
                        t.bytes.drain(..cut);
                        t.dropped += cut;
                    }
                }
            }
        }
        let _ = tx.send(());
    });
    (tail, rx)
}

fn finish_tail(tail: &Mutex<Tail>, cap: usize) -> String {
    let mut t = tail.lock().unwrap_or_else(|e| e.into_inner());
    if t.bytes.len() > cap {
        let cut = t.bytes.len() - cap;
        t.bytes.drain(..cut);
        t.dropped += cut;
    }
    t.text()
}

enum Outcome {
    Exited(std::process::ExitStatus),
    TimedOut,
}

struct Output {
    status: Outcome,
    stdout: String,
    stderr: String,
}

/// Kill the child's whole process group (it leads its own group), then the child itself.
fn kill_tree(child: &mut std::process::Child) {
    #[cfg(unix)]
    {
        if let Ok(pid) = libc::pid_t::try_from(child.id()) {
            // SAFETY: kill(2) with a negative pid signals the process group the child leads
            // (it was spawned with process_group(0)); it has no memory-safety preconditions.
            unsafe {
                libc::kill(-pid, libc::SIGKILL);
            }
        }
    }
    let _ = child.kill();
}

/// How long to wait for the pipes to close after the child is gone (a grandchild that left the
/// process group may still hold them).
const PIPE_GRACE: Duration = Duration::from_secs(2);

const STDOUT_CAP: usize = 1 << 20;

/// Run `cmd` (registered with [`crate::procs`]; `job`: the Slurm job `srun` starts) until it
/// exits or `timeout` passes; then the job is cancelled and the process group killed.
fn run_with_timeout(
    mut cmd: Command,
    program: &str,
    timeout: Duration,
    stderr_cap: usize,
    job: Option<&str>,
) -> Result<Output, EvalError> {
    // `srun` cancels its job on SIGTERM; a plain evaluator is killed.
    #[cfg(unix)]
    let death_signal = if job.is_some() {
        libc::SIGTERM
    } else {
        libc::SIGKILL
    };
    #[cfg(not(unix))]
    let death_signal = 9;
    let (mut child, live) =
        crate::procs::spawn(&mut cmd, job, death_signal).map_err(|e| Error::io(program, e))?;
    let cancel = || {
        if let Some(job) = job {
            crate::eval::slurm::scancel_names(&[job.to_string()]);
        }
    };
    let (out_tail, out_done) = spawn_reader(child.stdout.take().expect("piped"), STDOUT_CAP);
    let (err_tail, err_done) = spawn_reader(child.stderr.take().expect("piped"), stderr_cap);
    let start = Instant::now();
    let mut pause = Duration::from_millis(1);
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Outcome::Exited(status),
            Ok(None) => {}
            Err(e) => {
                cancel();
                kill_tree(&mut child);
                let _ = child.wait();
                live.finish();
                return Err(Error::io(program, e).into());
            }
        }
        let elapsed = start.elapsed();
        if elapsed >= timeout {
            cancel();
            kill_tree(&mut child);
            let _ = child.wait();
            break Outcome::TimedOut;
        }
        std::thread::sleep(pause.min(timeout - elapsed));
        pause = (pause * 2).min(Duration::from_millis(50));
    };
    // Leftover background processes of the evaluator die with it.
    #[cfg(unix)]
    if let Outcome::Exited(_) = status {
        kill_tree(&mut child);
    }
    // Blocks for good when a shutdown signal ended the child: it is no result.
    live.finish();
    let deadline = Instant::now() + PIPE_GRACE;
    for done in [&out_done, &err_done] {
        let _ = done.recv_timeout(deadline.saturating_duration_since(Instant::now()));
    }
    Ok(Output {
        status,
        stdout: finish_tail(&out_tail, STDOUT_CAP),
        stderr: finish_tail(&err_tail, stderr_cap),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeout_s_is_finite_and_at_most_30_days() {
        for t in [
            1e300,
            f64::INFINITY,
            f64::NAN,
            0.0,
            -1.0,
            MAX_TIMEOUT_S * 1.01,
        ] {
            let mut spec = CommandSpec::new(["sh", "-c", "true"]);
            spec.timeout_s = t;
            let e = CommandEvaluator::try_new(spec).err().unwrap().to_string();
            assert!(
                e.contains(&format!(
                    "timeout_s = {t:?} must be > 0 and ≤ 2592000 (30 days)"
                )),
                "{e}"
            );
        }
        let mut spec = CommandSpec::new(["sh", "-c", "true"]);
        spec.timeout_s = MAX_TIMEOUT_S;
        assert!(CommandEvaluator::try_new(spec).is_ok());
        let mut spec = CommandSpec::new(["sh", "-c", "true"]);
        spec.max_stderr_bytes = MAX_STDERR_BYTES + 1;
        let e = CommandEvaluator::try_new(spec).err().unwrap().to_string();
        assert!(e.contains("max_stderr_bytes"), "{e}");
    }

    #[test]
    fn finds_placeholders() {
        assert_eq!(
            placeholders_in("--a={model_dir},x={split}{}{\"k\": 1}"),
            vec!["model_dir", "split"]
        );
        let v: BTreeMap<&str, String> = [("split", "dev".to_string())].into();
        assert_eq!(substitute("s={split}/{split}", &v), "s=dev/dev");
        let e = CommandEvaluator::try_new(CommandSpec::new(["x", "{modeldir}"]))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("unknown placeholder `{modeldir}`"), "{e}");
    }

    #[test]
    fn parses_last_line_and_non_finite_values() {
        let s = score_from_stdout("log\n{\"primary\": 0.5, \"b\": 2}\n\n", "primary").unwrap();
        assert_eq!(s.primary, 0.5);
        assert_eq!(s.metrics["b"], 2.0);
        assert_eq!(score_from_stdout("{\"b\": 2}", "b").unwrap().primary, 2.0);
        assert!(matches!(
            score_from_stdout(r#"{"primary": 1, "x": NaN}"#, "primary"),
            Err(OutputError::NotFinite(k, v)) if k == "x" && v.is_nan()
        ));
        assert!(matches!(
            score_from_stdout(r#"{"primary": -Infinity}"#, "primary"),
            Err(OutputError::NotFinite(k, v)) if k == "primary" && v == f64::NEG_INFINITY
        ));
        // Inside strings the tokens are left alone (and then rejected as non-numbers).
        assert!(matches!(
            score_from_stdout(r#"{"primary": "NaN"}"#, "primary"),
            Err(OutputError::Bad(m)) if m.contains("not a number")
        ));
        assert!(matches!(
            score_from_stdout("{\"a\": 1}", "primary"),
            Err(OutputError::Bad(m)) if m.contains("no `primary` key")
        ));
        assert!(matches!(
            score_from_stdout("[1, 2]", "primary"),
            Err(OutputError::Bad(m)) if m.contains("not a JSON object")
        ));
        assert!(matches!(
            score_from_stdout("  \n", "primary"),
            Err(OutputError::Bad(m)) if m == "empty output"
        ));
    }
}
