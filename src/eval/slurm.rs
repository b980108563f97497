//! The Slurm launcher of the command evaluator: `[parallelism] launcher = "slurm"` runs each
//! candidate's command as a Slurm job instead of a local child process.
//!
//! ```toml
//! [evaluator]
//! kind = "command"
//! command = ["python", "scripts/lm_eval_json.py", "{model_dir}", "{split}", "{work_dir}"]
//! scratch_dir = "/shared/scratch/evomerge"   # required: a path every node sees
//! timeout_s = 7200                           # evomerge's own limit, queue wait included
//!
//! [parallelism]
//! slots = 8                                  # jobs in flight
//! launcher = "slurm"
//! partition = "gpu"                          # default: the cluster's default partition
//! gpus_per_task = 1                          # srun --gpus-per-task
//! time = "01:00:00"                          # srun --time; default: timeout_s in whole minutes
//! srun_args = ["--account=myproj", "--cpus-per-task=8", "--mem=64G"]
//! ```
//!
//! **Why `srun`, not `sbatch --wait`.** `srun` runs the job in the foreground: the program's
//! stdout and stderr come back over `srun`'s own pipes, so the evaluator protocol (the last
//! stdout line is the metrics, the stderr tail goes into errors) is the same as for a local
//! child, with no output files to find on the shared file system; `srun`'s exit status is the
//! program's; and the job lives only as long as its `srun` — when `srun` dies the step and its
//! allocation are cancelled, which an `sbatch` job would not be. An interactive allocation is
//! never requeued, so a preempted job ends (and is scored as a failure) instead of silently
//! starting over.
//!
//! Each evaluation is one `srun --job-name=evomerge-<host>-<pid>-<n> --nodes=1 --ntasks=1
//! [--partition] [--gpus-per-task] --time=… [srun_args…] <command…>` started from the
//! `slots` evaluation threads (so at most `slots` jobs are queued or running), with the
//! command's environment (`EVOMERGE_*`, `env`) exported to the job (Slurm's default
//! `--export=ALL`) and the command's `cwd` as the job's working directory. The scratch directory
//! (`{work_dir}`, the written `{model_dir}`) must be on a file system every node shares: with
//! this launcher `scratch_dir` is required.
//!
//! **Failures.** When `srun` exits non-zero the job's final state is read back
//! (`squeue --states=all`, else `sacct`, else `srun`'s own messages): a job that hit its Slurm
//! time limit is an [`EvalError::Timeout`]; a failed, preempted, cancelled, out-of-memory or
//! node-failed job is an [`EvalError::Exit`] whose status names the job and its state
//! (`Slurm job 17 NODE_FAIL`). Like any evaluator error they are logged in the history and
//! penalised; the search goes on. Past `timeout_s` (which counts the time the job waits in the
//! queue) evomerge cancels the job itself (`scancel`) and reports a timeout.
//!
//! **Interruptions.** On SIGINT / SIGTERM evomerge cancels every live job (`scancel --name`)
//! before it exits ([`crate::procs`]); if evomerge is killed outright, `srun` gets SIGTERM from
//! the kernel (parent-death signal) and cancels its job, and the next search or resume on this
//! host cancels any job of the dead process that is still queued.
//!
//! `time` takes Slurm's formats: `M`, `M:S`, `H:M:S`, `D-H`, `D-H:M`, `D-H:M:S`, at most
//! 365 days. `srun_args` may not set the job name (`-J` / `--job-name`): evomerge names jobs to
//! find and cancel them.

use std::process::Command;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::eval::EvalError;

/// The longest `time` accepted: 365 days, in seconds.
pub const MAX_TIME_S: u64 = 365 * 24 * 3600;

/// The most `gpus_per_task` accepted.
pub const MAX_GPUS_PER_TASK: u32 = 1024;

/// How a command evaluator's jobs are submitted (the Slurm keys of `[parallelism]`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlurmOptions {
    /// `srun --partition`; default: the cluster's default partition.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition: Option<String>,
    /// `srun --gpus-per-task`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpus_per_task: Option<u32>,
    /// `srun --time` in Slurm's formats; default: the evaluator's `timeout_s` in whole minutes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<String>,
    /// Further `srun` arguments, e.g. `["--account=proj", "--mem=64G"]`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub srun_args: Vec<String>,
}

impl SlurmOptions {
    /// A non-empty partition without spaces, `gpus_per_task` in 1..=[`MAX_GPUS_PER_TASK`], a
    /// `time` Slurm reads (above 0, at most [`MAX_TIME_S`]), no empty `srun_args` and no job name
    /// among them. The error is the offending key and a message that starts with it.
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        if let Some(p) = &self.partition
            && (p.is_empty() || p.chars().any(char::is_whitespace))
        {
            return Err((
                "partition",
                format!("partition = {p:?} must be a partition name (no spaces)"),
            ));
        }
        if let Some(g) = self.gpus_per_task
            && !(1..=MAX_GPUS_PER_TASK).contains(&g)
        {
            return Err((
                "gpus_per_task",
                format!("gpus_per_task = {g} must be in 1..={MAX_GPUS_PER_TASK}"),
            ));
        }
        if let Some(t) = &self.time {
            parse_time(t).map_err(|e| ("time", format!("time = {t:?}: {e}")))?;
        }
        for a in &self.srun_args {
            if a.trim().is_empty() {
                return Err(("srun_args", "srun_args: an argument is empty".into()));
            }
            if a == "-J" || a.starts_with("-J") || a.starts_with("--job-name") {
                return Err((
                    "srun_args",
                    format!(
                        "srun_args: {a:?} sets the job name, which evomerge sets itself (to find \
                         and cancel its jobs)"
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The job's time limit in seconds: `time`, else `timeout_s` rounded up to whole minutes.
    pub fn time_limit_s(&self, timeout_s: f64) -> u64 {
        match self.time.as_deref().map(parse_time) {
            Some(Ok(s)) => s,
            _ => minutes_of(timeout_s) * 60,
        }
    }

    /// The `srun` argv (without the program `srun` itself) that runs `argv` as job `job`.
    pub fn srun_args_for(&self, job: &str, timeout_s: f64, argv: &[String]) -> Vec<String> {
        let mut out = vec![
            format!("--job-name={job}"),
            "--nodes=1".into(),
            "--ntasks=1".into(),
        ];
        if let Some(p) = &self.partition {
            out.push(format!("--partition={p}"));
        }
        if let Some(g) = self.gpus_per_task {
            out.push(format!("--gpus-per-task={g}"));
        }
        match &self.time {
            Some(t) => out.push(format!("--time={t}")),
            None => out.push(format!("--time={}", minutes_of(timeout_s))),
        }
        out.extend(self.srun_args.iter().cloned());
        out.extend(argv.iter().cloned());
        out
    }
}

/// `seconds` rounded up to whole minutes, at least 1.
fn minutes_of(seconds: f64) -> u64 {
    ((seconds / 60.0).ceil() as u64).max(1)
}

/// Seconds of a Slurm time limit: `M`, `M:S`, `H:M:S`, `D-H`, `D-H:M`, `D-H:M:S`.
pub fn parse_time(s: &str) -> Result<u64, String> {
    let bad = || {
        format!("not a Slurm time (M, M:S, H:M:S, D-H, D-H:M or D-H:M:S, at most 365 days): {s:?}")
    };
    let num = |p: &str| -> Result<u64, String> {
        if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) || p.len() > 9 {
            return Err(bad());
        }
        p.parse().map_err(|_| bad())
    };
    let s = s.trim();
    let seconds = match s.split_once('-') {
        Some((days, rest)) => {
            let d = num(days)?;
            let parts: Vec<&str> = rest.split(':').collect();
            let (h, m, sec) = match parts.as_slice() {
                [h] => (num(h)?, 0, 0),
                [h, m] => (num(h)?, num(m)?, 0),
                [h, m, sec] => (num(h)?, num(m)?, num(sec)?),
                _ => return Err(bad()),
            };
            ((d * 24 + h) * 60 + m) * 60 + sec
        }
        None => {
            let parts: Vec<&str> = s.split(':').collect();
            match parts.as_slice() {
                [m] => num(m)? * 60,
                [m, sec] => num(m)? * 60 + num(sec)?,
                [h, m, sec] => (num(h)? * 60 + num(m)?) * 60 + num(sec)?,
                _ => return Err(bad()),
            }
        }
    };
    if seconds == 0 {
        return Err(format!("{s:?} is no time at all; give a limit above 0"));
    }
    if seconds > MAX_TIME_S {
        return Err(bad());
    }
    Ok(seconds)
}

/// A fresh job name of this process: `evomerge-<host>-<pid>-<n>`.
pub fn job_name() -> String {
    format!(
        "{}{}-{}-{}",
        crate::procs::JOB_PREFIX,
        crate::procs::host(),
        std::process::id(),
        crate::procs::next_number()
    )
}

/// Run a Slurm client command with a time limit, returning its stdout when it succeeded.
fn client(program: &str, args: &[&str], limit: Duration) -> Option<String> {
    use std::io::Read;
    let mut child = Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .ok()?;
    let mut stdout = child.stdout.take()?;
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let start = std::time::Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if start.elapsed() < limit => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
        }
    };
    let out = reader.join().ok()?;
    status.success().then_some(out)
}

/// How long a Slurm client call may take before it is given up.
const CLIENT_LIMIT: Duration = Duration::from_secs(15);

/// `scancel --name` each of `names` (jobs of this user); how many calls succeeded.
pub fn scancel_names(names: &[String]) -> usize {
    names
        .iter()
        .filter(|n| client("scancel", &[&format!("--name={n}")], CLIENT_LIMIT).is_some())
        .count()
}

/// Cancel this user's queued or running jobs named by an evomerge of this host that is no longer
/// alive ([`crate::procs::job_owner`]); how many.
pub fn cancel_orphan_jobs() -> usize {
    #[cfg(unix)]
    // SAFETY: getuid has no preconditions.
    let user = unsafe { libc::getuid() }.to_string();
    #[cfg(not(unix))]
    let user = String::new();
    let Some(list) = client(
        "squeue",
        &["--noheader", "--user", &user, "--format=%i|%j"],
        CLIENT_LIMIT,
    ) else {
        return 0;
    };
    let ids: Vec<&str> = list
        .lines()
        .filter_map(|l| l.trim().split_once('|'))
        .filter(|(_, name)| {
            crate::procs::job_owner(name).is_some_and(|pid| {
                u32::try_from(pid).ok() != Some(std::process::id()) && !crate::procs::alive(pid)
            })
        })
        .map(|(id, _)| id)
        .collect();
    if ids.is_empty() {
        return 0;
    }
    match client("scancel", &ids, CLIENT_LIMIT) {
        Some(_) => ids.len(),
        None => 0,
    }
}

/// A finished job as Slurm reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobEnd {
    pub id: String,
    /// `COMPLETED`, `FAILED`, `TIMEOUT`, `CANCELLED`, `PREEMPTED`, `NODE_FAIL`,
    /// `OUT_OF_MEMORY`, … (`COMPLETING` while its processes are still being ended).
    pub state: String,
    /// Slurm's reason, e.g. `TimeLimit`, `NonZeroExitCode` (may be empty).
    pub reason: String,
}

impl JobEnd {
    /// Whether the job ended at its time limit.
    pub fn timed_out(&self) -> bool {
        self.state.starts_with("TIMEOUT") || self.reason == "TimeLimit"
    }
}

/// The state of the job named `name` of this user: from `squeue --states=all` (jobs that ended in
/// the last `MinJobAge` seconds), else from `sacct` (clusters with accounting). Waits up to a few
/// seconds for a job that is still `COMPLETING` to reach its final state.
pub fn job_end(name: &str) -> Option<JobEnd> {
    let mut last = None;
    for attempt in 0..10 {
        if attempt > 0 {
            std::thread::sleep(Duration::from_millis(300));
        }
        let Some(out) = client(
            "squeue",
            &[
                "--noheader",
                "--states=all",
                &format!("--name={name}"),
                "--format=%i|%T|%r",
            ],
            CLIENT_LIMIT,
        ) else {
            break;
        };
        let Some(end) = out.lines().find_map(parse_end) else {
            break;
        };
        let settled = !matches!(end.state.as_str(), "COMPLETING" | "RUNNING" | "CONFIGURING");
        let found = end.timed_out() || settled;
        last = Some(end);
        if found {
            return last;
        }
    }
    if last.is_some() {
        return last;
    }
    let out = client(
        "sacct",
        &[
            "--noheader",
            "--allocations",
            "--parsable2",
            &format!("--name={name}"),
            "--format=JobID,State,Reason",
        ],
        CLIENT_LIMIT,
    )?;
    out.lines().last().and_then(parse_end)
}

fn parse_end(line: &str) -> Option<JobEnd> {
    let mut f = line.trim().split('|');
    let id = f.next()?.trim().to_string();
    let state = f.next()?.trim().to_string();
    let reason = f.next().unwrap_or("").trim().to_string();
    (!id.is_empty() && !state.is_empty()).then_some(JobEnd { id, state, reason })
}

/// The evaluator error for a job whose `srun` exited with `status` (not success): a timeout when
/// Slurm ended it at its time limit (`limit_s`), else an exit naming the job's state.
pub fn job_error(name: &str, status: &str, limit_s: u64, stderr: String) -> EvalError {
    let end = job_end(name);
    let srun_says_timeout = stderr.contains("DUE TO TIME LIMIT");
    match end {
        Some(end) if end.timed_out() => EvalError::Timeout {
            seconds: limit_s as f64,
            stderr: format!("Slurm job {} hit its time limit\n{stderr}", end.id),
        },
        None if srun_says_timeout => EvalError::Timeout {
            seconds: limit_s as f64,
            stderr,
        },
        Some(end) => EvalError::Exit {
            status: format!(
                "{status} (Slurm job {} {}{})",
                end.id,
                end.state,
                if end.reason.is_empty() || end.reason == "None" {
                    String::new()
                } else {
                    format!(", {}", end.reason)
                }
            ),
            stderr,
        },
        None => EvalError::Exit {
            status: format!("{status} (Slurm job {name}: state unknown)"),
            stderr,
        },
    }
}

/// Whether `srun` can be started (for a clear error before a search begins).
pub fn srun_available() -> bool {
    client("srun", &["--version"], CLIENT_LIMIT).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slurm_time_formats() {
        assert_eq!(parse_time("5"), Ok(300));
        assert_eq!(parse_time("5:30"), Ok(330));
        assert_eq!(parse_time("01:00:00"), Ok(3600));
        assert_eq!(parse_time("2-0"), Ok(2 * 86400));
        assert_eq!(parse_time("1-02:03"), Ok(86400 + 2 * 3600 + 3 * 60));
        assert_eq!(parse_time("1-02:03:04"), Ok(86400 + 2 * 3600 + 3 * 60 + 4));
        for bad in [
            "", "0", "0:00", "x", "1:2:3:4", "1-", "-1", "1h", "366-0", "1.5",
        ] {
            assert!(parse_time(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn options_are_checked_and_become_srun_arguments() {
        let o = SlurmOptions {
            partition: Some("gpu".into()),
            gpus_per_task: Some(2),
            time: None,
            srun_args: vec!["--account=p".into()],
        };
        o.check().unwrap();
        let argv = o.srun_args_for("evomerge-h-1-0", 61.0, &["python".into(), "x.py".into()]);
        assert_eq!(
            argv,
            [
                "--job-name=evomerge-h-1-0",
                "--nodes=1",
                "--ntasks=1",
                "--partition=gpu",
                "--gpus-per-task=2",
                "--time=2",
                "--account=p",
                "python",
                "x.py"
            ]
        );
        assert_eq!(o.time_limit_s(61.0), 120);
        let timed = SlurmOptions {
            time: Some("0:45".into()),
            ..SlurmOptions::default()
        };
        assert_eq!(timed.time_limit_s(3600.0), 45);
        for (o, key) in [
            (
                SlurmOptions {
                    partition: Some("a b".into()),
                    ..Default::default()
                },
                "partition",
            ),
            (
                SlurmOptions {
                    gpus_per_task: Some(0),
                    ..Default::default()
                },
                "gpus_per_task",
            ),
            (
                SlurmOptions {
                    time: Some("soon".into()),
                    ..Default::default()
                },
                "time",
            ),
            (
                SlurmOptions {
                    srun_args: vec!["--job-name=mine".into()],
                    ..Default::default()
                },
                "srun_args",
            ),
        ] {
            let (k, msg) = o.check().unwrap_err();
            assert_eq!(k, key);
            assert!(msg.starts_with(key), "{msg}");
        }
    }

    const SEARCH: &str = r#"name = "t"
models = ["a", "b"]
base_model = "base"
method = "ties"
[space]
kind = "ps"
[evaluator]
kind = "command"
command = ["sh", "score.sh", "{recipe}"]
scratch_dir = "/shared/scratch"
[optimizer]
generations = 2
[parallelism]
slots = 4
launcher = "slurm"
"#;

    fn load(text: &str) -> crate::Result<crate::search::def::SearchDef> {
        crate::search::def::SearchDef::from_toml(
            text,
            std::path::Path::new("/x"),
            std::path::Path::new("/x/t.toml"),
        )
    }

    #[test]
    fn parallelism_settings_are_validated_with_key_and_line() {
        let d = load(&format!(
            "{SEARCH}partition = \"gpu\"\ngpus_per_task = 2\ntime = \"2:00:00\"\n\
             srun_args = [\"--mem=8G\"]\n"
        ))
        .unwrap();
        let o = d.parallelism.slurm().unwrap();
        assert_eq!(o.partition.as_deref(), Some("gpu"));
        assert_eq!(o.gpus_per_task, Some(2));
        assert_eq!(o.time_limit_s(1.0), 7200);
        assert_eq!(o.srun_args, ["--mem=8G"]);
        // The default launcher has no Slurm options and keeps search.toml as it was.
        let local = load(&SEARCH.replace("launcher = \"slurm\"\n", "")).unwrap();
        assert!(local.parallelism.slurm().is_none());
        assert!(
            !toml::to_string(&local).unwrap().contains("launcher"),
            "the default launcher is not written"
        );
        for (extra, want) in [
            (
                "time = \"soon\"",
                "line 16: parallelism.time = \"soon\": not a Slurm time",
            ),
            (
                "gpus_per_task = 0",
                "line 16: parallelism.gpus_per_task = 0 must be in 1..=1024",
            ),
            (
                "partition = \"a b\"",
                "line 16: parallelism.partition = \"a b\"",
            ),
            (
                "srun_args = [\"-J\", \"x\"]",
                "line 16: parallelism.srun_args: \"-J\" sets the job name",
            ),
        ] {
            let e = load(&format!("{SEARCH}{extra}\n")).unwrap_err().to_string();
            assert!(e.contains(want), "{extra}: {e}");
        }
        let e = load(&SEARCH.replace("\"slurm\"", "\"ray\""))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("line 15") && e.contains("unknown variant `ray`"),
            "{e}"
        );
        let e = load(&SEARCH.replace("scratch_dir = \"/shared/scratch\"\n", ""))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("line 14: parallelism.launcher = \"slurm\" needs evaluator.scratch_dir"),
            "{e}"
        );
        let e = load(&SEARCH.replace("launcher = \"slurm\"", "time = \"5\""))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("line 15: parallelism.time is a Slurm setting: it needs"),
            "{e}"
        );
        let lm = SEARCH.replace(
            "kind = \"command\"\ncommand = [\"sh\", \"score.sh\", \"{recipe}\"]\n\
             scratch_dir = \"/shared/scratch\"",
            "kind = \"lm\"\ntasks = [{ name = \"t\", path = \"t\", metric = \"exact_match\" }]",
        );
        let e = load(&lm).unwrap_err().to_string();
        assert!(
            e.contains("parallelism.launcher = \"slurm\" runs `command` evaluators"),
            "{e}"
        );
    }

    /// The README's cluster recipe is a valid search file.
    #[test]
    fn the_readme_cluster_recipe_validates() {
        let readme =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
        let section = readme
            .split("### Running on a Slurm cluster")
            .nth(1)
            .expect("README has the Slurm section");
        let block = section
            .split("```toml\n")
            .nth(1)
            .and_then(|b| b.split("```").next())
            .expect("a TOML block");
        let d = load(block).unwrap_or_else(|e| panic!("{e}\n{block}"));
        let o = d.parallelism.slurm().expect("launcher = slurm");
        assert_eq!(o.gpus_per_task, Some(1));
        assert_eq!(o.time_limit_s(0.0), 5400);
    }

    #[test]
    fn job_states_parse() {
        let end = parse_end("17|TIMEOUT|TimeLimit").unwrap();
        assert!(end.timed_out());
        let end = parse_end("18|COMPLETING|TimeLimit").unwrap();
        assert!(end.timed_out());
        let end = parse_end("19|NODE_FAIL|None").unwrap();
        assert!(!end.timed_out());
        assert_eq!(end.id, "19");
        assert_eq!(parse_end(""), None);
    }
}
