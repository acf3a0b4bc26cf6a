//! How an agent runs a job: the `Runner` trait, and the production runner
//! that starts the command as a process in its own process group.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;

use super::outbox::{AppendLog, Outbox};
use super::retention::{Retention, RunDirs};
use crate::core::{FinishedReport, JobId, JobSpec, Outcome};

/// One attempt to run.
#[derive(Clone, Debug)]
pub struct RunOrder {
    pub job: JobId,
    pub attempt: u32,
    pub spec: Arc<JobSpec>,
    /// A directory of this attempt's own (created by the agent).
    pub run_dir: PathBuf,
}

/// What a runner is handed besides the order: where to say the process
/// started, and where a kill request arrives.
pub struct RunControl {
    pub started: oneshot::Sender<()>,
    pub kill: oneshot::Receiver<()>,
}

pub type RunFuture = Pin<Box<dyn Future<Output = FinishedReport> + Send>>;

/// Runs attempts. A runner must end the process it started when `kill`
/// fires, and report how it ended; it never panics on a bad command.
/// `kill` fires on a kill request and also when its sender is dropped, which
/// is what happens to every run of an agent that goes away (its future
/// dropped): its processes do not outlive it unwatched.
pub trait Runner: Send + Sync + 'static {
    fn run(&self, order: RunOrder, control: RunControl) -> RunFuture;

    /// The longest a process takes to die once killed (a SIGTERM grace):
    /// the agent fences this much earlier, so a killed run is gone by the
    /// time the supervisor may start it elsewhere.
    fn kill_grace_ms(&self) -> u64 {
        0
    }

    /// Keeps a result the supervisor has not acknowledged where the agent's
    /// own crash does not lose it (the host's disk), so that the next agent
    /// on this work dir reports it. By default nowhere: it lives as long as
    /// the agent does.
    fn keep_result(&self, _job: JobId, _attempt: u32, _report: &FinishedReport) {}

    /// The supervisor acknowledged the result: it need not be kept.
    fn drop_result(&self, _job: JobId, _attempt: u32) {}

    /// The results kept by an earlier agent and never acknowledged.
    fn kept_results(&self) -> Vec<(JobId, u32, FinishedReport)> {
        Vec::new()
    }
}

/// Makes `command` run as operating-system user `name`, its run dir that
/// user's: never as root, and only from an agent allowed to switch users
/// (running as root) unless `name` is the agent's own user.
fn run_as(
    command: &mut tokio::process::Command,
    name: &str,
    run_dir: &std::path::Path,
    output: &std::fs::File,
) -> Result<Option<Switched>, String> {
    use nix::unistd::{chown, fchown, geteuid, User};
    use std::os::unix::fs::PermissionsExt;
    let user = User::from_name(name)
        .map_err(|e| format!("run as {name}: {e}"))?
        .ok_or_else(|| format!("run as {name}: no such operating-system user"))?;
    if user.uid.is_root() {
        return Err(format!("run as {name}: jobs never run as root"));
    }
    let me = geteuid();
    if user.uid == me {
        return Ok(None);
    }
    if !me.is_root() {
        return Err(format!(
            "run as {name}: this agent runs as uid {me} and may not switch users (run it as root, or map this user to the agent's own)"
        ));
    }
    // The run dir and its output are the job user's, and nobody else's.
    chown(run_dir, Some(user.uid), Some(user.gid))
        .and_then(|()| fchown(output, Some(user.uid), Some(user.gid)))
        .map_err(|e| format!("run dir {}: {e}", run_dir.display()))?;
    std::fs::set_permissions(run_dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| format!("run dir {}: {e}", run_dir.display()))?;
    command
        .uid(user.uid.as_raw())
        .gid(user.gid.as_raw())
        .env("HOME", &user.dir)
        .env("USER", name)
        .env("LOGNAME", name);
    Ok(Some(Switched {
        name: name.to_string(),
        uid: user.uid.as_raw(),
        gid: user.gid.as_raw(),
    }))
}

/// The user a job was switched to (with its primary group only: the
/// process keeps no supplementary groups).
struct Switched {
    name: String,
    uid: u32,
    gid: u32,
}

impl Switched {
    /// Why the job's user could not start in `cwd`, if a directory on the
    /// way stops it; checked after the start failed ("Permission denied"),
    /// so that access granted otherwise (ACLs) is never refused here.
    fn stopped_at(&self, cwd: &std::path::Path) -> Option<String> {
        let real = std::fs::canonicalize(cwd).ok()?;
        let (dir, mode) = blocked_ancestor(&real, self.uid, &[self.gid])?;
        Some(format!(
            "run as {name}: {name} cannot reach {}: {} is {mode:o} and does not let {name} pass through. Put the agent's work dir (a local agent's is in the supervisor's data dir) under directories others may pass through, such as /var/lib/foreman",
            real.display(),
            dir.display(),
            name = self.name
        ))
    }
}

/// The first of `path` (absolute, with no symbolic links: canonical) and the
/// directories above it that a user (`uid`, in `groups`) may not pass
/// through, by their mode bits, and that mode: a job run as that user could
/// not reach `path`. None if every one lets it through.
pub fn blocked_ancestor(
    path: &std::path::Path,
    uid: u32,
    groups: &[u32],
) -> Option<(std::path::PathBuf, u32)> {
    use std::os::unix::fs::MetadataExt;
    path.ancestors().find_map(|dir| {
        let meta = std::fs::metadata(dir).ok()?;
        let mode = meta.mode() & 0o7777;
        let passes = if meta.uid() == uid {
            mode & 0o100 != 0
        } else if groups.contains(&meta.gid()) {
            mode & 0o010 != 0
        } else {
            mode & 0o001 != 0
        };
        (!passes).then(|| (dir.to_path_buf(), mode))
    })
}

/// Creates `dir` (and its parents) and gives it `mode`.
pub fn create_dir_with_mode(dir: &std::path::Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))
}

/// Runs commands as real processes: in the attempt's run dir (or the job's
/// `cwd`), with stdout and stderr into `output` there, in a process group of
/// their own so that a kill reaches every child and grandchild.
#[derive(Clone, Debug)]
pub struct ProcessRunner {
    /// After SIGTERM, how long the group has before SIGKILL.
    pub kill_grace_ms: u64,
    pub output_tail_bytes: usize,
    /// Where live process groups are recorded, so that the next agent on
    /// this work dir can reap what this one leaves behind if it dies.
    pub groups: Option<Arc<GroupLog>>,
    /// How long and how much of finished runs' dirs are kept.
    pub retention: Retention,
    pub run_dirs: Arc<RunDirs>,
    /// Where unacknowledged results are kept (`None`: not kept).
    pub outbox: Option<Arc<Outbox>>,
    /// Run dirs made ahead (`None`: each made when its run starts).
    pub spares: Option<Arc<SpareDirs>>,
    /// The operating-system user a job with no `run_as` of its own runs as
    /// (`None`: the agent's own user).
    pub default_run_as: Option<String>,
}

impl Default for ProcessRunner {
    fn default() -> Self {
        ProcessRunner {
            kill_grace_ms: 5_000,
            output_tail_bytes: 4096,
            groups: None,
            retention: Retention::default(),
            run_dirs: Arc::default(),
            outbox: None,
            spares: None,
            default_run_as: None,
        }
    }
}

impl Runner for ProcessRunner {
    fn kill_grace_ms(&self) -> u64 {
        self.kill_grace_ms
    }

    fn keep_result(&self, job: JobId, attempt: u32, report: &FinishedReport) {
        if let Some(outbox) = &self.outbox {
            outbox.keep(job, attempt, report);
        }
    }

    fn drop_result(&self, job: JobId, attempt: u32) {
        if let Some(outbox) = &self.outbox {
            outbox.drop_result(job, attempt);
        }
    }

    fn kept_results(&self) -> Vec<(JobId, u32, FinishedReport)> {
        self.outbox.as_ref().map_or_else(Vec::new, |o| o.kept())
    }

    fn run(&self, order: RunOrder, control: RunControl) -> RunFuture {
        let runner = self.clone();
        Box::pin(async move { runner.run_process(order, control).await })
    }
}

impl ProcessRunner {
    async fn run_process(self, order: RunOrder, control: RunControl) -> FinishedReport {
        let began = crate::seam::now();
        let spawn_failed = |error: String| FinishedReport {
            outcome: Outcome::SpawnFailed { error },
            output_tail: String::new(),
            run_ms: 0,
        };
        // In use before it exists, so that no sweep can take it.
        let _in_use = self.run_dirs.enter(&order.run_dir);
        if let Some(work_dir) = order.run_dir.parent() {
            let (dirs, work_dir) = (self.run_dirs.clone(), work_dir.to_path_buf());
            let retention = self.retention.clone();
            tokio::spawn(async move { dirs.maybe_sweep(&work_dir, &retention, began).await });
        }
        let spare = self.spares.as_ref().and_then(|s| s.take(&order.run_dir));
        let output_path = order.run_dir.join("output");
        let output = match spare {
            Some(output) => output,
            None => match fresh_run_dir(&order.run_dir, &output_path) {
                Ok(output) => output,
                Err(why) => return spawn_failed(why),
            },
        };
        // The tail is read from this handle, never by path again: whatever
        // the job does to its run dir, the tail is what it printed.
        let (errors, tail) = match (output.try_clone(), output.try_clone()) {
            (Ok(errors), Ok(tail)) => (errors, tail),
            (Err(e), _) | (_, Err(e)) => {
                return spawn_failed(format!("{}: {e}", output_path.display()))
            }
        };
        let spec = &order.spec;
        let mut command = tokio::process::Command::new(&spec.argv[0]);
        // A job sees a small, known environment plus its own, never the
        // agent's (which may hold its token).
        command.env_clear();
        for name in INHERITED_ENV {
            if let Some(value) = std::env::var_os(name) {
                command.env(name, value);
            }
        }
        let mut switched = None;
        if let Some(name) = spec.run_as.as_ref().or(self.default_run_as.as_ref()) {
            match run_as(&mut command, name, &order.run_dir, &output) {
                Ok(user) => switched = user,
                Err(why) => return spawn_failed(why),
            }
        }
        let cwd = spec
            .cwd
            .as_ref()
            .map_or(order.run_dir.clone(), PathBuf::from);
        command
            .args(&spec.argv[1..])
            .envs(&spec.env)
            .env("FOREMAN_JOB_ID", order.job.to_string())
            .env("FOREMAN_ATTEMPT", order.attempt.to_string())
            .current_dir(&cwd)
            .stdin(std::process::Stdio::null())
            .stdout(output)
            .stderr(errors)
            .process_group(0)
            .kill_on_drop(false);
        let mut child = match command.spawn() {
            Ok(child) => child,
            Err(e) => {
                let stopped = switched
                    .as_ref()
                    .filter(|_| e.kind() == std::io::ErrorKind::PermissionDenied)
                    .and_then(|user| user.stopped_at(&cwd));
                return spawn_failed(match (&spec.cwd, stopped) {
                    (_, Some(why)) => why,
                    (Some(cwd), None) if !std::path::Path::new(cwd).is_dir() => {
                        format!("cwd {cwd}: not a directory")
                    }
                    _ => format!("{}: {e}", spec.argv[0]),
                });
            }
        };
        let group = child.id().map(|pid| nix::unistd::Pid::from_raw(pid as i32));
        let name = format!("{}-{}", order.job, order.attempt);
        if let (Some(groups), Some(pid)) = (&self.groups, child.id()) {
            groups.started(&name, pid);
        }
        let _ = control.started.send(());
        if let Some(spares) = self.spares.clone().filter(|s| s.wanted()) {
            tokio::spawn(crate::seam::blocking(move || spares.replenish()));
        }
        let mut kill = control.kill;
        let (status, killed) = crate::select! {
            status = child.wait() => (status, false),
            _ = &mut kill => {
                signal_group(group, nix::sys::signal::Signal::SIGTERM);
                let grace = Duration::from_millis(self.kill_grace_ms);
                match tokio::time::timeout(grace, child.wait()).await {
                    Ok(status) => (status, true),
                    Err(_) => {
                        signal_group(group, nix::sys::signal::Signal::SIGKILL);
                        (child.wait().await, true)
                    }
                }
            }
        };
        // Whatever the leader left behind in its group ends with it.
        signal_group(group, nix::sys::signal::Signal::SIGKILL);
        if let Some(groups) = &self.groups {
            groups.ended(&name);
        }
        let outcome = match status {
            _ if killed => Outcome::Killed,
            Ok(status) => match (
                status.code(),
                std::os::unix::process::ExitStatusExt::signal(&status),
            ) {
                (Some(code), _) => Outcome::Exited { code },
                (None, Some(signal)) => Outcome::Signaled { signal },
                (None, None) => Outcome::Exited { code: -1 },
            },
            Err(e) => Outcome::SpawnFailed {
                error: format!("waiting for the process: {e}"),
            },
        };
        FinishedReport {
            outcome,
            output_tail: tail_of(tail, self.output_tail_bytes),
            run_ms: crate::seam::now().ms_since(began),
        }
    }
}

/// Makes `run_dir` (if it is not there) with a fresh, empty output file.
fn fresh_run_dir(run_dir: &Path, output_path: &Path) -> Result<std::fs::File, String> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::create_dir_all(run_dir).map_err(|e| format!("run dir {}: {e}", run_dir.display()))?;
    // A fresh file, never one a job left there (a symlink to a secret
    // would be written through, and read back into the tail as root).
    let _ = std::fs::remove_file(output_path);
    std::fs::OpenOptions::new()
        .write(true)
        .read(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(output_path)
        .map_err(|e| format!("{}: {e}", output_path.display()))
}

/// How many run dirs an agent keeps made ahead.
const SPARE_DIRS: usize = 4;
/// Where, in the work dir: not a run dir's name, so never swept.
pub const SPARE_DIRS_DIR: &str = ".spare-run-dirs";

/// Empty run dirs made ahead, each with its empty output file open, so that
/// making them (two inodes: the slowest file system work of a short run) is
/// off a run's critical path: a run takes one by renaming it into place,
/// and another is made once the run has started.
#[derive(Debug)]
pub struct SpareDirs {
    root: PathBuf,
    spares: std::sync::Mutex<Vec<(PathBuf, std::fs::File)>>,
    next: std::sync::atomic::AtomicU64,
    /// Set once spares cannot be used here.
    off: std::sync::atomic::AtomicBool,
}

impl SpareDirs {
    /// Spares in `work_dir`; what an earlier agent left there is removed
    /// (its open files went with it). Makes the first ones.
    pub fn new(work_dir: &Path) -> std::io::Result<Arc<SpareDirs>> {
        let root = work_dir.join(SPARE_DIRS_DIR);
        match std::fs::remove_dir_all(&root) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        create_dir_with_mode(&root, 0o700)?;
        let spares = Arc::new(SpareDirs {
            root,
            spares: Default::default(),
            next: Default::default(),
            off: Default::default(),
        });
        spares.replenish();
        Ok(spares)
    }

    /// A spare renamed to `run_dir`, its output file's handle; `None` if
    /// there is none, or `run_dir` is already there (a run dir is never
    /// replaced: the caller makes it as it would have).
    pub(crate) fn take(&self, run_dir: &Path) -> Option<std::fs::File> {
        let (spare, output) = self.spares.lock().expect("spares lock").pop()?;
        if let Err(e) = rename_no_replace(&spare, run_dir) {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                // Still a good spare for the next run.
                self.spares
                    .lock()
                    .expect("spares lock")
                    .push((spare, output));
            } else {
                tracing::warn!(spare = %spare.display(), error = %e, "a spare run dir cannot be used");
                let _ = std::fs::remove_dir_all(&spare);
                if matches!(
                    e.raw_os_error(),
                    Some(nix::libc::EINVAL | nix::libc::ENOSYS)
                ) {
                    // A file system that cannot rename without replacing:
                    // run dirs are made on the run's path from now on.
                    self.off.store(true, std::sync::atomic::Ordering::Relaxed);
                    self.spares.lock().expect("spares lock").clear();
                }
            }
            return None;
        }
        // Its age counts from its run, not from when it was made (the
        // kernel's clock: the agent reads none of its own here).
        let now = nix::sys::time::TimeSpec::UTIME_NOW;
        let _ = nix::sys::stat::futimens(&output, &now, &now);
        Some(output)
    }

    fn wanted(&self) -> bool {
        !self.off.load(std::sync::atomic::Ordering::Relaxed)
            && self.spares.lock().expect("spares lock").len() < SPARE_DIRS
    }

    /// Makes spares until there are enough (file system work: call it off
    /// the async threads).
    pub fn replenish(&self) {
        while self.wanted() {
            let n = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let spare = self.root.join(n.to_string());
            let made = std::fs::create_dir(&spare)
                .map_err(|e| e.to_string())
                .and_then(|()| fresh_run_dir(&spare, &spare.join("output")));
            match made {
                Ok(output) => self
                    .spares
                    .lock()
                    .expect("spares lock")
                    .push((spare, output)),
                Err(why) => {
                    tracing::warn!(spare = %spare.display(), %why, "a spare run dir cannot be made");
                    return;
                }
            }
        }
    }
}

/// Renames `from` to `to`, failing (`AlreadyExists`) rather than replacing
/// what is there.
fn rename_no_replace(from: &Path, to: &Path) -> std::io::Result<()> {
    nix::fcntl::renameat2(
        nix::fcntl::AT_FDCWD,
        from,
        nix::fcntl::AT_FDCWD,
        to,
        nix::fcntl::RenameFlags::RENAME_NOREPLACE,
    )
    .map_err(std::io::Error::from)
}

/// An append-only log, one per work dir, of the process groups this agent
/// runs: "start <run> <pgid> <start time>" and "end <run>" lines. One file
/// for every run: creating and deleting a marker per run costs more, in
/// inode churn, than spawning the process itself. Compacted to the live
/// entries when it grows past `GROUP_LOG_BYTES_MAX`.
#[derive(Debug)]
pub struct GroupLog {
    state: std::sync::Mutex<GroupLogState>,
    /// The work dir's lock, held for as long as the log is.
    _lock: nix::fcntl::Flock<std::fs::File>,
}

#[derive(Debug)]
struct GroupLogState {
    log: AppendLog,
    live: std::collections::BTreeMap<String, (u32, u64)>,
}

pub const GROUP_LOG: &str = "process-groups.log";
/// Held (flock) by the one agent that owns a work dir.
pub const AGENT_LOCK: &str = "agent.lock";

/// Environment variables a job inherits from its agent; everything else it
/// gets from its own spec.
pub const INHERITED_ENV: [&str; 8] = [
    "PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "TZ", "TMPDIR",
];
const GROUP_LOG_BYTES_MAX: u64 = 1024 * 1024;

impl GroupLog {
    /// Reaps what a previous agent left in `work_dir` (see `reap_orphans`)
    /// and starts an empty log. Returns the log and how many groups it killed.
    /// Fails if another live agent holds the work dir: two agents on one
    /// work dir would reap each other's jobs.
    pub fn open(work_dir: &std::path::Path) -> std::io::Result<(GroupLog, usize)> {
        // Jobs run as other users pass through it to their run dirs; none
        // may list it.
        create_dir_with_mode(work_dir, 0o711)?;
        let lock_file = std::fs::File::create(work_dir.join(AGENT_LOCK))?;
        let lock = nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusiveNonblock)
            .map_err(|_| {
                std::io::Error::new(
                    std::io::ErrorKind::WouldBlock,
                    "another agent is running on this work dir",
                )
            })?;
        let path = work_dir.join(GROUP_LOG);
        let reaped = reap_orphans(&path);
        let state = GroupLogState {
            log: AppendLog::create(&path, "")?,
            live: Default::default(),
        };
        Ok((
            GroupLog {
                state: std::sync::Mutex::new(state),
                _lock: lock,
            },
            reaped,
        ))
    }

    fn started(&self, run: &str, pid: u32) {
        let started = start_time(pid).unwrap_or(0);
        let mut state = self.state.lock().expect("group log lock");
        state.live.insert(run.to_string(), (pid, started));
        let _ = state.log.append(&format!("start {run} {pid} {started}\n"));
    }

    fn ended(&self, run: &str) {
        let mut state = self.state.lock().expect("group log lock");
        state.live.remove(run);
        let _ = state.log.append(&format!("end {run}\n"));
        if state.log.bytes() > GROUP_LOG_BYTES_MAX {
            let text: String = state
                .live
                .iter()
                .map(|(run, (pid, t))| format!("start {run} {pid} {t}\n"))
                .collect();
            let _ = state.log.rewrite(&text);
        }
    }
}

/// A process's start time (clock ticks since boot), from /proc: with the pid
/// it names one process, even after the pid is reused.
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces and parentheses).
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Kills the process groups a group log records as started and not ended: a
/// previous agent died without killing them, and they would run on, unowned,
/// beside their own re-run. A group is killed only if its leader is still the
/// process that was started (same pid and start time). Returns how many.
pub fn reap_orphans(log: &std::path::Path) -> usize {
    let Ok(text) = std::fs::read_to_string(log) else {
        return 0;
    };
    let mut live: std::collections::BTreeMap<&str, (u64, u64)> = Default::default();
    for line in text.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        match fields.as_slice() {
            ["start", run, pid, started] => {
                if let (Ok(pid), Ok(started)) = (pid.parse(), started.parse()) {
                    live.insert(run, (pid, started));
                }
            }
            ["end", run] => {
                live.remove(run);
            }
            _ => {} // a torn last line, or garbage: nothing to act on
        }
    }
    let mut reaped = 0;
    for (run, (pid, started)) in live {
        if pid > 1 && pid <= i32::MAX as u64 && start_time(pid as u32) == Some(started) {
            tracing::warn!(pid, run, "killing a process group left by a previous agent");
            signal_group(
                Some(nix::unistd::Pid::from_raw(pid as i32)),
                nix::sys::signal::Signal::SIGKILL,
            );
            reaped += 1;
        }
    }
    reaped
}

fn signal_group(group: Option<nix::unistd::Pid>, signal: nix::sys::signal::Signal) {
    if let Some(pgid) = group {
        // ESRCH (the group is already gone) is the expected, harmless case.
        let _ = nix::sys::signal::killpg(pgid, signal);
    }
}

/// The tail a report carries: the last `max` bytes of what a run wrote, as
/// text starting on a character boundary (invalid UTF-8 replaced). Every
/// runner reads its output back through this, the simulator's too (from the
/// bytes its simulated process wrote), so the capture is tested there.
pub fn tail_of<R: std::io::Read + std::io::Seek>(mut output: R, max: usize) -> String {
    use std::io::{Read, SeekFrom};
    let Ok(len) = output.seek(SeekFrom::End(0)) else {
        return String::new();
    };
    let start = len.saturating_sub(max as u64);
    if output.seek(SeekFrom::Start(start)).is_err() {
        return String::new();
    }
    let mut bytes = Vec::with_capacity(max.min(len as usize));
    let _ = output.take(max as u64).read_to_end(&mut bytes);
    // A cut inside a character leaves up to three of its continuation
    // bytes (`10xxxxxx`) in front. Drop them before decoding: each would
    // become a replacement character, and cutting the decoded text back to
    // `max` bytes keeps one of them where three were left.
    let partial = if start > 0 {
        bytes
            .iter()
            .take(3)
            .take_while(|b| **b & 0xC0 == 0x80)
            .count()
    } else {
        0
    };
    let text = String::from_utf8_lossy(&bytes[partial..]);
    crate::core::tail(&text, max)
}
