//! Interrupting a search: SIGINT / SIGTERM to `evomerge search` end its `command` evaluators and
//! remove their scratch directories before it exits 130 / 143; after a SIGKILL the leftovers are
//! found and removed when the next `resume` starts.
#![cfg(target_os = "linux")]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use evomerge::procs::alive;

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_evomerge")
}

/// A test directory: a PS search over the toy world whose command evaluator records its pid and
/// that of a `sleep` it starts (while `slow` exists) in `pids`, then prints a fitness.
struct World {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
}

impl World {
    fn new() -> World {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let toy = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/toy");
        fs::create_dir(dir.join("scratch")).unwrap();
        fs::write(dir.join("slow"), "").unwrap();
        fs::write(
            dir.join("score.sh"),
            r#"echo partial > "$1/output.txt"
if [ -e "$SLOW" ]; then
  sleep 60 &
  echo "$$ $!" >> "$PIDS"
  wait
fi
echo '{"primary": 0.5}'
"#,
        )
        .unwrap();
        let text = format!(
            r#"name = "signals"
models = ["{toy}/add", "{toy}/cipher"]
base_model = "{toy}/base"
method = "ties"

[space]
kind = "ps"
granularity = "whole"
params = ["weight"]

[evaluator]
kind = "command"
command = ["sh", "{dir}/score.sh", "{{work_dir}}"]
write_model = false
scratch_dir = "{dir}/scratch"
timeout_s = 120
env = {{ PIDS = "{dir}/pids", SLOW = "{dir}/slow" }}

[optimizer]
population = 4
generations = 2
seed = 1

[parallelism]
slots = 2
"#,
            toy = toy.display(),
            dir = dir.display()
        );
        fs::write(dir.join("signals.toml"), text).unwrap();
        World { _tmp: tmp, dir }
    }

    fn run_dir(&self) -> PathBuf {
        self.dir.join("run")
    }

    fn start_search(&self) -> Child {
        Command::new(bin())
            .arg("search")
            .arg(self.dir.join("signals.toml"))
            .arg("--out")
            .arg(self.run_dir())
            .arg("--quiet")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }

    /// (shell, sleep) pids of the evaluators that started so far.
    fn pids(&self) -> Vec<(i32, i32)> {
        fs::read_to_string(self.dir.join("pids"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let (a, b) = l.trim().split_once(' ')?;
                Some((a.parse().ok()?, b.parse().ok()?))
            })
            .collect()
    }

    fn scratch_dirs(&self) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(self.dir.join("scratch"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    /// Wait until both slots' evaluators (a shell and its `sleep` each) are running.
    fn wait_for_evaluators(&self, child: &mut Child) {
        let start = Instant::now();
        while self.pids().len() < 2 {
            if let Some(status) = child.try_wait().unwrap() {
                panic!("evomerge ended early: {status}");
            }
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "the evaluators did not start; pids: {:?}",
                self.pids()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn history_errors(&self) -> Vec<String> {
        let text = fs::read_to_string(self.run_dir().join("history.jsonl")).unwrap_or_default();
        text.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter_map(|v| v["error"].as_str().map(str::to_string))
            .collect()
    }
}

fn signal(child: &Child, sig: i32) {
    // SAFETY: kill(2) on our own child's pid.
    let rc = unsafe { libc::kill(child.id() as i32, sig) };
    assert_eq!(rc, 0);
}

fn wait_with_deadline(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            panic!("evomerge did not exit within {limit:?} of the signal");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn stderr_of(child: &mut Child) -> String {
    use std::io::Read;
    let mut s = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut s);
    }
    s
}

/// Every pid in `pids` is gone within a second (killed processes may need a moment to be reaped).
fn assert_all_dead(pids: &[i32]) {
    let start = Instant::now();
    while pids.iter().any(|&p| alive(p)) && start.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let living: Vec<i32> = pids.iter().copied().filter(|&p| alive(p)).collect();
    assert!(
        living.is_empty(),
        "evaluator processes survived: {living:?}"
    );
}

fn interrupt_ends_evaluators_and_scratch(sig: i32, code: i32) {
    let world = World::new();
    let mut child = world.start_search();
    world.wait_for_evaluators(&mut child);
    assert_eq!(world.scratch_dirs().len(), 2, "one scratch dir per slot");
    let pids: Vec<i32> = world.pids().iter().flat_map(|&(a, b)| [a, b]).collect();
    signal(&child, sig);
    let status = wait_with_deadline(&mut child, Duration::from_secs(30));
    let stderr = stderr_of(&mut child);
    assert_eq!(status.code(), Some(code), "{status}; stderr:\n{stderr}");
    assert!(
        stderr.contains("2 evaluator process(es) killed") && stderr.contains("2 scratch"),
        "{stderr}"
    );
    assert_all_dead(&pids);
    assert_eq!(world.scratch_dirs(), Vec::<String>::new());
    // The evaluations cut short are not in the history as failures: a resume re-runs them.
    assert_eq!(world.history_errors(), Vec::<String>::new());
}

#[test]
fn sigint_kills_evaluators_removes_scratch_and_exits_130() {
    interrupt_ends_evaluators_and_scratch(libc::SIGINT, 130);
}

#[test]
fn sigterm_kills_evaluators_removes_scratch_and_exits_143() {
    interrupt_ends_evaluators_and_scratch(libc::SIGTERM, 143);
}

#[test]
fn after_sigkill_the_next_resume_removes_the_leftovers() {
    let world = World::new();
    let mut child = world.start_search();
    world.wait_for_evaluators(&mut child);
    signal(&child, libc::SIGKILL);
    let status = wait_with_deadline(&mut child, Duration::from_secs(30));
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(9)
    );

    // The `sleep`s the shells started and the scratch directories are left over (checked at
    // once: any command evaluator made on this host from now on may remove them); the shells
    // got their parent-death signal.
    let (shells, sleeps): (Vec<i32>, Vec<i32>) = world.pids().into_iter().unzip();
    assert!(
        sleeps.iter().all(|&p| alive(p)),
        "the sleeps {sleeps:?} should outlive a SIGKILLed evomerge"
    );
    assert_all_dead(&shells);
    let left = world.scratch_dirs();
    assert_eq!(left.len(), 2, "{left:?}");

    fs::remove_file(world.dir.join("slow")).unwrap();
    let out = Command::new(bin())
        .arg("resume")
        .arg(world.run_dir())
        .arg("--quiet")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "resume failed:\n{stderr}");
    // Only this resume looks into this scratch parent, so it removed both directories; the
    // sleeps may have been found by any command evaluator made on this host meanwhile.
    assert!(
        stderr.contains("left over by an evomerge that was killed")
            && stderr.contains("2 scratch directories removed"),
        "{stderr}"
    );
    assert_all_dead(&sleeps);
    let now = world.scratch_dirs();
    assert!(left.iter().all(|d| !now.contains(d)), "{now:?}");
    assert!(world.run_dir().join("best_recipe.yaml").exists());
}
