//! `[parallelism] launcher = "slurm"` against a real Slurm: run `scripts/slurm-up.sh` first
//! (CI does), then `cargo test --test slurm`. Not part of plain `cargo test`.
//!
//! A small search whose command evaluator runs every candidate as a Slurm job (each prints its
//! `$SLURM_JOB_ID` among its metrics), one job failing and one hitting its time limit (logged
//! failures; the search completes); and Ctrl-C of a search with jobs running (no job left in
//! `squeue`, no scratch directory left); SIGKILL of a search (its `srun`s cancel their jobs, the
//! next `resume` removes the scratch directories); jobs of a dead evomerge cancelled by the sweep.
#![cfg(target_os = "linux")]

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The node has few CPUs: the tests run one at a time.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_evomerge")
}

fn slurm_is_up() {
    // The node may still be completing the previous test's cancelled jobs (`comp`): wait.
    let usable = || {
        Command::new("sinfo")
            .args(["--noheader", "--format=%t"])
            .output()
            .is_ok_and(|o| {
                o.status.success()
                    && String::from_utf8_lossy(&o.stdout)
                        .lines()
                        .any(|l| matches!(l.trim(), "idle" | "mix" | "alloc"))
            })
    };
    let start = Instant::now();
    while !usable() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no idle Slurm node: start the local cluster with scripts/slurm-up.sh"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// `squeue` lines `id|name|state` of this user's jobs whose name starts with `prefix`.
fn jobs(prefix: &str, all_states: bool) -> Vec<(String, String, String)> {
    let mut cmd = Command::new("squeue");
    cmd.args(["--noheader", "--format=%i|%j|%T"]);
    if all_states {
        cmd.arg("--states=all");
    }
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "squeue failed");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let mut f = l.trim().split('|');
            Some((
                f.next()?.to_string(),
                f.next()?.to_string(),
                f.next()?.to_string(),
            ))
        })
        .filter(|(_, name, _)| name.starts_with(prefix))
        .collect()
}

/// The job-name prefix of an evomerge process: `evomerge-<host>-<pid>-`.
fn prefix_of(pid: u32) -> String {
    format!("evomerge-{}-{pid}-", evomerge::procs::host())
}

/// A PS search over the toy world with a Slurm-launched command evaluator running `script`.
fn search_dir(script: &str, time: &str, generations: usize) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let toy = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/toy");
    fs::create_dir(dir.join("scratch")).unwrap();
    fs::write(dir.join("score.sh"), script).unwrap();
    let text = format!(
        r#"name = "slurm"
models = ["{toy}/add", "{toy}/cipher"]
base_model = "{toy}/base"
method = "ties"

[space]
kind = "ps"
granularity = "whole"
params = ["weight"]

[evaluator]
kind = "command"
command = ["sh", "{dir}/score.sh", "{{work_dir}}", "{{recipe}}"]
write_model = false
scratch_dir = "{dir}/scratch"
timeout_s = 600
env = {{ STATE = "{dir}" }}

[optimizer]
population = 4
generations = {generations}
seed = 1

[parallelism]
slots = 2
launcher = "slurm"
time = "{time}"
"#,
        toy = toy.display(),
        dir = dir.display()
    );
    fs::write(dir.join("slurm.toml"), text).unwrap();
    (tmp, dir)
}

fn history(dir: &Path) -> Vec<serde_json::Value> {
    fs::read_to_string(dir.join("run/history.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The first evaluation to get there fails (exit 3), the next one sleeps past the job's time
/// limit; the others print a fitness that depends on the recipe, and their job id.
const SCRIPT: &str = r#"echo "job $SLURM_JOB_ID on $(hostname)" >&2
test -n "$SLURM_JOB_ID" || { echo "not in a Slurm job" >&2; exit 9; }
if mkdir "$STATE/failed" 2>/dev/null; then echo "failing on purpose" >&2; exit 3; fi
if mkdir "$STATE/slept" 2>/dev/null; then sleep 600; fi
n=$(cksum < "$2" | cut -d' ' -f1)
echo "{\"primary\": $((n % 1000)), \"slurm_job_id\": $SLURM_JOB_ID}"
"#;

#[test]
fn candidates_run_as_slurm_jobs_and_failures_and_timeouts_are_logged() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    slurm_is_up();
    let (_tmp, dir) = search_dir(SCRIPT, "1", 2);
    let start = Instant::now();
    let out = Command::new(bin())
        .arg("search")
        .arg(dir.join("slurm.toml"))
        .arg("--out")
        .arg(dir.join("run"))
        .arg("--quiet")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "search failed:\n{stderr}");
    eprintln!(
        "slurm search: {:.1} s\n{stderr}",
        start.elapsed().as_secs_f64()
    );

    let records = history(&dir);
    assert_eq!(records.len(), 8, "2 generations of 4");
    let errors: Vec<&str> = records.iter().filter_map(|r| r["error"].as_str()).collect();
    eprintln!("logged failures: {errors:#?}");
    assert_eq!(errors.len(), 2, "{errors:#?}");
    assert!(
        errors
            .iter()
            .any(|e| e.contains("exited with exit status: 3")
                && e.contains("FAILED")
                && e.contains("failing on purpose")),
        "{errors:#?}"
    );
    assert!(
        errors
            .iter()
            .any(|e| e.contains("timed out after 60 s") && e.contains("hit its time limit")),
        "{errors:#?}"
    );
    // Every other evaluation ran in a job of its own.
    let ids: Vec<f64> = records
        .iter()
        .filter(|r| r["error"].is_null())
        .map(|r| {
            r["metrics"]["slurm_job_id"]
                .as_f64()
                .unwrap_or_else(|| panic!("no job id in {r}"))
        })
        .collect();
    assert_eq!(ids.len(), 6);
    let distinct: BTreeSet<u64> = ids.iter().map(|&x| x as u64).collect();
    assert_eq!(distinct.len(), ids.len(), "{ids:?}");
    assert!(ids.iter().all(|&x| x > 0.0));
    // Slurm knows them: the evaluations and the final report's test-split runs.
    let pid_prefix = format!("evomerge-{}-", evomerge::procs::host());
    let known: BTreeSet<u64> = jobs(&pid_prefix, true)
        .iter()
        .filter_map(|(id, _, _)| id.parse().ok())
        .collect();
    assert!(distinct.is_subset(&known), "{distinct:?} vs {known:?}");
    assert!(dir.join("run/best_recipe.yaml").exists());
    assert_eq!(fs::read_dir(dir.join("scratch")).unwrap().count(), 0);
}

fn wait_for_running(child: &mut Child, prefix: &str, n: usize) {
    let start = Instant::now();
    loop {
        let running = jobs(prefix, false)
            .iter()
            .filter(|(_, _, state)| state == "RUNNING")
            .count();
        if running >= n {
            return;
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("evomerge ended early: {status}");
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "{n} jobs did not start: {:?}",
            jobs(prefix, true)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn ctrl_c_cancels_the_running_jobs_and_removes_the_scratch_dirs() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    slurm_is_up();
    let (_tmp, dir) = search_dir(
        "echo started > \"$1/started\"\nsleep 300\necho '{\"primary\": 1}'\n",
        "10",
        1,
    );
    let mut child = Command::new(bin())
        .arg("search")
        .arg(dir.join("slurm.toml"))
        .arg("--out")
        .arg(dir.join("run"))
        .arg("--quiet")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let prefix = prefix_of(child.id());
    wait_for_running(&mut child, &prefix, 2);
    assert_eq!(fs::read_dir(dir.join("scratch")).unwrap().count(), 2);

    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "no exit");
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert_eq!(status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("2 Slurm job(s) cancelled"), "{stderr}");
    assert_eq!(fs::read_dir(dir.join("scratch")).unwrap().count(), 0);
    // Gone from the queue (a cancelled job is listed while its processes end).
    let start = Instant::now();
    while !jobs(&prefix, false).is_empty() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "jobs left: {:?}",
            jobs(&prefix, false)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let ended = jobs(&prefix, true);
    assert_eq!(ended.len(), 2, "{ended:?}");
    assert!(
        ended.iter().all(|(_, _, state)| state == "CANCELLED"),
        "{ended:?}"
    );
    // Nothing was recorded for the cut-short evaluations.
    assert!(history(&dir).is_empty());
}

#[test]
fn sigkill_of_evomerge_ends_its_jobs_and_resume_removes_the_scratch_dirs() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    slurm_is_up();
    let (_tmp, dir) = search_dir(
        "if [ -e \"$STATE/slow\" ]; then sleep 300; fi\necho '{\"primary\": 1}'\n",
        "10",
        1,
    );
    fs::write(dir.join("slow"), "").unwrap();
    let mut child = Command::new(bin())
        .arg("search")
        .arg(dir.join("slurm.toml"))
        .arg("--out")
        .arg(dir.join("run"))
        .arg("--quiet")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let prefix = prefix_of(child.id());
    wait_for_running(&mut child, &prefix, 2);
    child.kill().unwrap();
    child.wait().unwrap();
    // Each `srun` got SIGTERM from the kernel as its parent died, and cancelled its job.
    let start = Instant::now();
    while !jobs(&prefix, false).is_empty() {
        assert!(
            start.elapsed() < Duration::from_secs(90),
            "jobs left after SIGKILL: {:?}",
            jobs(&prefix, false)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(fs::read_dir(dir.join("scratch")).unwrap().count(), 2);

    fs::remove_file(dir.join("slow")).unwrap();
    let out = Command::new(bin())
        .arg("resume")
        .arg(dir.join("run"))
        .arg("--quiet")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "resume failed:\n{stderr}");
    assert!(stderr.contains("2 scratch directories removed"), "{stderr}");
    assert_eq!(fs::read_dir(dir.join("scratch")).unwrap().count(), 0);
}

/// A job named by an evomerge of this host that is no longer alive is cancelled by the sweep a
/// command evaluator makes when it starts; a job of a live owner is left alone.
#[test]
fn jobs_of_a_dead_evomerge_are_cancelled_and_others_kept() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    slurm_is_up();
    let mut gone = Command::new("true").spawn().unwrap();
    let dead = gone.id();
    gone.wait().unwrap();
    let dead_name = format!("{}0", prefix_of(dead));
    let live_name = format!("{}0", prefix_of(std::process::id()));
    for name in [&dead_name, &live_name] {
        let out = Command::new("sbatch")
            .args([
                &format!("--job-name={name}"),
                "--time=5",
                "--output=/dev/null",
                "--wrap=sleep 300",
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let swept = evomerge::eval::slurm::cancel_orphan_jobs();
    let state = |name: &str| {
        let start = Instant::now();
        loop {
            let found = jobs(name, true);
            let s = found.first().map(|j| j.2.clone()).unwrap_or_default();
            if (s != "PENDING" && s != "RUNNING") || start.elapsed() > Duration::from_secs(10) {
                return s;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    // At least ours (a dead evomerge of an earlier run may have left more).
    assert!(swept >= 1, "{swept}");
    assert_eq!(state(&dead_name), "CANCELLED");
    let kept = jobs(&live_name, false);
    assert_eq!(kept.len(), 1, "{kept:?}");
    let cancel = Command::new("scancel")
        .arg(format!("--name={live_name}"))
        .status()
        .unwrap();
    assert!(cancel.success());
}
