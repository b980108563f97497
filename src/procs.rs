//! What evomerge leaves running or lying around while it evaluates — external evaluator
//! processes, Slurm jobs, scratch directories — registered while they live, ended and removed
//! when evomerge is interrupted, and found again after it was killed outright.
//!
//! **While running.** [`spawn`] starts an evaluator in its own process group, with
//! `EVOMERGE_OWNER=<host>:<pid>` ([`OWNER_ENV`]) in its environment and a parent-death signal
//! (`PR_SET_PDEATHSIG`: the direct child gets it when evomerge dies, however it dies), and
//! records the group (and the Slurm job name, if any) until [`Live::finish`]. [`create_dir`]
//! records a scratch directory until its [`Live`] is dropped.
//!
//! **On SIGINT / SIGTERM / SIGHUP.** [`install_signal_cleanup`] (called first thing in `main`,
//! before any thread exists) blocks those signals in every thread and waits for them on a thread
//! of its own. When one comes it takes the registry for good (no evaluator starts after that, and
//! no evaluation that was cut short is reported as a result), cancels the live Slurm jobs
//! (`scancel --name`), kills every live evaluator process group (SIGKILL), removes the scratch
//! directories, and exits with 128 + the signal (130 for SIGINT, 143 for SIGTERM, 129 for
//! SIGHUP). A SIGHUP that was ignored when evomerge started (`nohup`) stays ignored.
//!
//! **After a SIGKILL** nothing can run. The next command evaluator made on the same host
//! ([`sweep_leftovers`], from [`crate::eval::command`]) finds what the dead process left:
//! processes whose environment carries `EVOMERGE_OWNER=<this host>:<pid>` for a pid that is no
//! longer alive (read from `/proc/<pid>/environ`, so nothing of anyone else is touched),
//! scratch directories named `evomerge-eval-<host>-<pid>-…` of such a pid, and (with the Slurm
//! launcher) the user's jobs named `evomerge-<host>-<pid>-<n>` of such a pid. It kills,
//! removes and cancels them, and says so on stderr. A process that replaced its environment
//! (`env -i`) is not found this way.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

/// The environment variable every evaluator process gets: `<host>:<pid>` of the evomerge
/// process that started it.
pub const OWNER_ENV: &str = "EVOMERGE_OWNER";

/// The prefix of scratch directory names: `evomerge-eval-<host>-<pid>-<n>-<nanos>`.
pub const SCRATCH_PREFIX: &str = "evomerge-eval-";

/// The prefix of Slurm job names: `evomerge-<host>-<pid>-<n>`.
pub const JOB_PREFIX: &str = "evomerge-";

/// This host's name as it appears in owner tags, scratch directory and job names: the
/// hostname's letters, digits, `.` and `-` (anything else becomes `_`).
pub fn host() -> &'static str {
    static HOST: OnceLock<String> = OnceLock::new();
    HOST.get_or_init(|| {
        let raw = read_hostname().unwrap_or_else(|| "localhost".into());
        raw.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect()
    })
}

#[cfg(unix)]
fn read_hostname() -> Option<String> {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for `len` bytes; gethostname NUL-terminates within it when the
    // name fits (and we stop at the first NUL or the end either way).
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return None;
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    let s = String::from_utf8_lossy(&buf[..end]).into_owned();
    (!s.is_empty()).then_some(s)
}

#[cfg(not(unix))]
fn read_hostname() -> Option<String> {
    std::env::var("COMPUTERNAME").ok()
}

/// `<host>:<pid>` of this process: the value of [`OWNER_ENV`] in its evaluators.
pub fn owner_tag() -> String {
    format!("{}:{}", host(), std::process::id())
}

/// A fresh number for names (scratch directories, Slurm jobs), unique within this process.
pub fn next_number() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// The live things of this process.
#[derive(Default)]
struct Registry {
    next: u64,
    /// Set by the signal thread: nothing new may start.
    terminating: bool,
    /// Process-group ids of live evaluators.
    groups: BTreeMap<u64, i32>,
    /// Names of live Slurm jobs.
    jobs: BTreeMap<u64, String>,
    /// Live scratch directories.
    dirs: BTreeMap<u64, PathBuf>,
}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry {
    next: 0,
    terminating: false,
    groups: BTreeMap::new(),
    jobs: BTreeMap::new(),
    dirs: BTreeMap::new(),
});

fn registry() -> MutexGuard<'static, Registry> {
    REGISTRY.lock().unwrap_or_else(|e| e.into_inner())
}

fn shutting_down() -> io::Error {
    io::Error::new(io::ErrorKind::Interrupted, "evomerge is shutting down")
}

/// A registered process group / Slurm job / scratch directory; unregistered by
/// [`Live::finish`] or on drop.
#[must_use]
pub struct Live {
    id: u64,
}

impl Live {
    /// Unregister. Called once the child has been waited for; while evomerge is being shut
    /// down by a signal this never returns (the process exits first), so an evaluation that was
    /// cut short is never reported as a result.
    pub fn finish(self) {
        drop(self);
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        let mut r = registry();
        r.groups.remove(&self.id);
        r.jobs.remove(&self.id);
        r.dirs.remove(&self.id);
    }
}

/// Spawn `cmd` in its own process group with [`OWNER_ENV`] set and `death_signal` as its
/// parent-death signal (Linux; `SIGKILL` for a plain evaluator, `SIGTERM` for `srun`, which then
/// cancels its job), and register the group (and `job`, a Slurm job name) until the returned
/// [`Live`] is finished. Refused once a shutdown signal has arrived.
pub fn spawn(cmd: &mut Command, job: Option<&str>, death_signal: i32) -> io::Result<(Child, Live)> {
    cmd.env(OWNER_ENV, owner_tag());
    #[cfg(unix)]
    {
        use std::os::unix::process::CommandExt;
        cmd.process_group(0);
        #[cfg(target_os = "linux")]
        {
            let parent = std::process::id();
            // SAFETY: the closure runs in the forked child before exec and only calls
            // async-signal-safe functions (prctl, getppid); it allocates nothing.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::prctl(libc::PR_SET_PDEATHSIG, death_signal as libc::c_ulong) != 0 {
                        return Err(io::Error::last_os_error());
                    }
                    // The parent died before the prctl: nobody would kill this child.
                    if u32::try_from(libc::getppid()).ok() != Some(parent) {
                        return Err(io::Error::other("evomerge exited"));
                    }
                    Ok(())
                });
            }
        }
        #[cfg(not(target_os = "linux"))]
        let _ = death_signal;
    }
    #[cfg(not(unix))]
    let _ = death_signal;
    // Spawning under the lock: the signal thread either sees the group registered or stops the
    // spawn from happening at all.
    let mut r = registry();
    if r.terminating {
        return Err(shutting_down());
    }
    let child = cmd.spawn()?;
    let id = r.next;
    r.next += 1;
    if let Ok(pid) = i32::try_from(child.id()) {
        r.groups.insert(id, pid);
    }
    if let Some(job) = job {
        r.jobs.insert(id, job.to_string());
    }
    Ok((child, Live { id }))
}

/// Create the directory `path` (its parent must exist) and register it for removal on a shutdown
/// signal until the returned [`Live`] is dropped (the caller removes it normally).
pub fn create_dir(path: &Path) -> io::Result<Live> {
    let mut r = registry();
    if r.terminating {
        return Err(shutting_down());
    }
    std::fs::create_dir(path)?;
    let id = r.next;
    r.next += 1;
    r.dirs.insert(id, path.to_path_buf());
    Ok(Live { id })
}

/// What a cleanup ended.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Cleaned {
    /// Evaluator process groups (or, after a SIGKILL, processes) killed.
    pub processes: usize,
    /// Slurm jobs cancelled.
    pub jobs: usize,
    /// Scratch directories removed.
    pub dirs: usize,
}

impl Cleaned {
    fn is_empty(&self) -> bool {
        *self == Cleaned::default()
    }
}

impl std::fmt::Display for Cleaned {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} evaluator process(es) killed, {} Slurm job(s) cancelled, {} scratch \
             director{} removed",
            self.processes,
            self.jobs,
            self.dirs,
            if self.dirs == 1 { "y" } else { "ies" }
        )
    }
}

/// End everything registered and refuse anything new; returns with the registry still locked
/// (so no thread reports a cut-short evaluation before the process exits).
fn cleanup_locked() -> (MutexGuard<'static, Registry>, Cleaned) {
    let mut r = registry();
    r.terminating = true;
    let mut done = Cleaned::default();
    // Jobs first: `scancel` ends them wherever they run, then the local `srun`s go.
    let jobs: Vec<String> = r.jobs.values().cloned().collect();
    done.jobs = crate::eval::slurm::scancel_names(&jobs);
    for &pgid in r.groups.values() {
        #[cfg(unix)]
        // SAFETY: kill(2) with a negative pid signals the process group; no memory is involved.
        unsafe {
            libc::kill(-pgid, libc::SIGKILL);
        }
        done.processes += 1;
    }
    for dir in r.dirs.values() {
        if remove_dir_patiently(dir) {
            done.dirs += 1;
        }
    }
    (r, done)
}

/// `remove_dir_all`, retried for up to 2 s while a dying writer may still add files.
fn remove_dir_patiently(dir: &Path) -> bool {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        match std::fs::remove_dir_all(dir) {
            Ok(()) => return true,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return false,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => {
                eprintln!("evomerge: could not remove {}: {e}", dir.display());
                return false;
            }
        }
    }
}

/// Block SIGINT, SIGTERM and SIGHUP (unless ignored) in this thread and every thread it starts
/// later, and handle them on a thread of their own: clean up (see the module docs) and exit with
/// 128 + the signal. Call it first in `main`, before any thread exists. Does nothing off Unix.
pub fn install_signal_cleanup() {
    #[cfg(unix)]
    // SAFETY: plain libc signal-set manipulation on local, initialised sigset_t values; called
    // before any other thread exists, so the mask is inherited by all of them.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        let mut old: libc::sigaction = std::mem::zeroed();
        if libc::sigaction(libc::SIGHUP, std::ptr::null(), &mut old) == 0
            && old.sa_sigaction != libc::SIG_IGN
        {
            libc::sigaddset(&mut set, libc::SIGHUP);
        }
        if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            return;
        }
        let spawned = std::thread::Builder::new()
            .name("evomerge-signals".into())
            .spawn(move || {
                loop {
                    let mut sig: libc::c_int = 0;
                    if libc::sigwait(&set, &mut sig) != 0 {
                        continue;
                    }
                    let name = match sig {
                        libc::SIGINT => "SIGINT",
                        libc::SIGTERM => "SIGTERM",
                        _ => "SIGHUP",
                    };
                    let (_held, done) = cleanup_locked();
                    if done.is_empty() {
                        eprintln!("\nevomerge: {name}, stopping");
                    } else {
                        eprintln!("\nevomerge: {name}, stopping: {done}");
                    }
                    std::process::exit(128 + sig);
                }
            });
        if spawned.is_err() {
            // No handler thread: let the signals act as before.
            libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
        }
    }
}

/// Whether process `pid` is alive (a zombie is not).
pub fn alive(pid: i32) -> bool {
    #[cfg(target_os = "linux")]
    {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            // The state follows the command name, which ends with the last `)`.
            Ok(stat) => stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next())
                .is_some_and(|state| state != "Z" && state != "X"),
            Err(_) => false,
        }
    }
    #[cfg(all(unix, not(target_os = "linux")))]
    {
        // SAFETY: kill(2) with signal 0 only checks that the process exists.
        let rc = unsafe { libc::kill(pid, 0) };
        rc == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
    }
    #[cfg(not(unix))]
    {
        let _ = pid;
        true
    }
}

/// The owner pid in a name `<prefix><host>-<pid>-<rest…>` when `<host>` is this host and
/// `rest_fields` dash-separated fields follow the pid.
fn owner_in_name(name: &str, prefix: &str, rest_fields: usize) -> Option<i32> {
    let body = name.strip_prefix(prefix)?;
    let mut parts = body.rsplitn(rest_fields + 2, '-');
    for _ in 0..rest_fields {
        parts.next()?;
    }
    let pid: i32 = parts.next()?.parse().ok()?;
    (parts.next()? == host()).then_some(pid)
}

/// The owner pid of a scratch directory name of this host (`evomerge-eval-<host>-<pid>-<n>-<x>`).
pub fn scratch_owner(name: &str) -> Option<i32> {
    owner_in_name(name, SCRATCH_PREFIX, 2)
}

/// The owner pid of a Slurm job name of this host (`evomerge-<host>-<pid>-<n>`).
pub fn job_owner(name: &str) -> Option<i32> {
    owner_in_name(name, JOB_PREFIX, 1)
}

fn dead_owner(pid: i32) -> bool {
    u32::try_from(pid).ok() != Some(std::process::id()) && !alive(pid)
}

/// What [`sweep_leftovers`] already did in this process.
struct Swept {
    processes: bool,
    slurm: bool,
    parents: std::collections::BTreeSet<PathBuf>,
}

static SWEPT: Mutex<Swept> = Mutex::new(Swept {
    processes: false,
    slurm: false,
    parents: std::collections::BTreeSet::new(),
});

/// Find and end what evomerge processes killed outright on this host left behind (see the module
/// docs): their evaluator processes, their scratch directories in `scratch_parent`, and, when
/// `slurm`, their Slurm jobs. Each once per process (leftovers only come from before it
/// started). Prints what it did on stderr when it did anything.
pub fn sweep_leftovers(scratch_parent: &Path, slurm: bool) -> Cleaned {
    let mut swept = SWEPT.lock().unwrap_or_else(|e| e.into_inner());
    let mut done = Cleaned::default();
    if !std::mem::replace(&mut swept.processes, true) {
        done.processes = kill_orphans();
    }
    if slurm && !std::mem::replace(&mut swept.slurm, true) {
        done.jobs = crate::eval::slurm::cancel_orphan_jobs();
    }
    if !swept.parents.insert(scratch_parent.to_path_buf()) {
        return done;
    }
    if let Ok(entries) = std::fs::read_dir(scratch_parent) {
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(owner) = name.to_str().and_then(scratch_owner) else {
                continue;
            };
            if dead_owner(owner) && entry.path().is_dir() && remove_dir_patiently(&entry.path()) {
                done.dirs += 1;
            }
        }
    }
    if !done.is_empty() {
        eprintln!("evomerge: left over by an evomerge that was killed: {done}");
    }
    done
}

/// SIGKILL every process of this host whose [`OWNER_ENV`] names a dead evomerge of this host.
fn kill_orphans() -> usize {
    #[cfg(target_os = "linux")]
    {
        let Ok(procs) = std::fs::read_dir("/proc") else {
            return 0;
        };
        let want = format!("{OWNER_ENV}={}:", host());
        let mut killed = 0;
        for entry in procs.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<i32>().ok())
            else {
                continue;
            };
            let Ok(environ) = std::fs::read(entry.path().join("environ")) else {
                continue;
            };
            let owner = environ
                .split(|&b| b == 0)
                .filter_map(|var| std::str::from_utf8(var).ok())
                .find_map(|var| var.strip_prefix(&want))
                .and_then(|pid| pid.parse::<i32>().ok());
            if let Some(owner) = owner
                && dead_owner(owner)
                && alive(pid)
            {
                // SAFETY: kill(2) on a pid that carries our marker; no memory is involved.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
                killed += 1;
            }
        }
        killed
    }
    #[cfg(not(target_os = "linux"))]
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_carry_the_owner_of_this_host_only() {
        let h = host();
        assert_eq!(
            scratch_owner(&format!("evomerge-eval-{h}-4242-7-0badf00d")),
            Some(4242)
        );
        assert_eq!(
            scratch_owner("evomerge-eval-otherhost-4242-7-0badf00d"),
            None
        );
        // The older name without a host is not ours to judge.
        assert_eq!(scratch_owner("evomerge-eval-4242-7-0badf00d"), None);
        assert_eq!(job_owner(&format!("evomerge-{h}-99-3")), Some(99));
        assert_eq!(job_owner(&format!("evomerge-{h}-x-3")), None);
        assert_eq!(job_owner("evomerge-elsewhere-99-3"), None);
        // A host with dashes parses from the right.
        assert_eq!(owner_in_name("p-a-b-c-12-3", "p-", 1), None);
    }

    #[test]
    fn this_process_is_alive_and_a_reaped_child_is_not() {
        assert!(alive(std::process::id() as i32));
        let mut child = Command::new("true").spawn().unwrap();
        let pid = child.id() as i32;
        child.wait().unwrap();
        assert!(!alive(pid));
        assert!(!dead_owner(std::process::id() as i32));
    }

    #[test]
    fn spawned_children_carry_the_owner_and_are_registered_until_finished() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo \"$EVOMERGE_OWNER\""])
            .stdout(std::process::Stdio::piped());
        let (child, live) = spawn(&mut cmd, Some("job-x"), libc::SIGKILL).unwrap();
        let pid = child.id() as i32;
        {
            let r = registry();
            assert!(r.groups.values().any(|&g| g == pid));
            assert!(r.jobs.values().any(|j| j == "job-x"));
        }
        let out = child.wait_with_output().unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), owner_tag());
        live.finish();
        let r = registry();
        assert!(!r.groups.values().any(|&g| g == pid));
        assert!(!r.jobs.values().any(|j| j == "job-x"));
    }

    /// `main` blocks SIGINT / SIGTERM in every thread; evaluators must not inherit that mask
    /// (std's spawn resets it), or they could not be interrupted themselves.
    #[cfg(target_os = "linux")]
    #[test]
    fn children_do_not_inherit_the_blocked_signals() {
        // SAFETY: signal-mask calls on local sigset_t values, for this test thread only.
        let blocked = |how| unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGINT);
            libc::sigaddset(&mut set, libc::SIGTERM);
            libc::pthread_sigmask(how, &set, std::ptr::null_mut())
        };
        assert_eq!(blocked(libc::SIG_BLOCK), 0);
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "grep SigBlk /proc/self/status"])
            .stdout(std::process::Stdio::piped());
        let result = spawn(&mut cmd, None, libc::SIGKILL);
        assert_eq!(blocked(libc::SIG_UNBLOCK), 0);
        let (child, live) = result.unwrap();
        let out = child.wait_with_output().unwrap();
        live.finish();
        let line = String::from_utf8_lossy(&out.stdout);
        let mask = u64::from_str_radix(line.trim().trim_start_matches("SigBlk:").trim(), 16)
            .unwrap_or_else(|_| panic!("{line:?}"));
        let int_term = (1 << (libc::SIGINT - 1)) | (1 << (libc::SIGTERM - 1));
        assert_eq!(mask & int_term, 0, "{line}");
    }
}
