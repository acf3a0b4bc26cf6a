//! How an agent runs a job: the `Runner` trait, and the production runner
//! that starts the command as a process in its own process group.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;

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
pub trait Runner: Send + Sync + 'static {
    fn run(&self, order: RunOrder, control: RunControl) -> RunFuture;
}

/// Runs commands as real processes: in the attempt's run dir (or the job's
/// `cwd`), with stdout and stderr into `output` there, in a process group of
/// their own so that a kill reaches every child and grandchild.
#[derive(Clone, Debug)]
pub struct ProcessRunner {
    /// After SIGTERM, how long the group has before SIGKILL.
    pub kill_grace_ms: u64,
    pub output_tail_bytes: usize,
}

impl Default for ProcessRunner {
    fn default() -> Self {
        ProcessRunner {
            kill_grace_ms: 5_000,
            output_tail_bytes: 4096,
        }
    }
}

impl Runner for ProcessRunner {
    fn run(&self, order: RunOrder, control: RunControl) -> RunFuture {
        let runner = self.clone();
        Box::pin(async move { runner.run_process(order, control).await })
    }
}

impl ProcessRunner {
    async fn run_process(self, order: RunOrder, control: RunControl) -> FinishedReport {
        let began = tokio::time::Instant::now();
        let spawn_failed = |error: String| FinishedReport {
            outcome: Outcome::SpawnFailed { error },
            output_tail: String::new(),
            run_ms: 0,
        };
        if let Err(e) = std::fs::create_dir_all(&order.run_dir) {
            return spawn_failed(format!("run dir {}: {e}", order.run_dir.display()));
        }
        let output_path = order.run_dir.join("output");
        let output = match std::fs::File::create(&output_path) {
            Ok(file) => file,
            Err(e) => return spawn_failed(format!("{}: {e}", output_path.display())),
        };
        let errors = match output.try_clone() {
            Ok(file) => file,
            Err(e) => return spawn_failed(format!("{}: {e}", output_path.display())),
        };
        let spec = &order.spec;
        let mut command = tokio::process::Command::new(&spec.argv[0]);
        command
            .args(&spec.argv[1..])
            .envs(&spec.env)
            .env("FOREMAN_JOB_ID", order.job.to_string())
            .env("FOREMAN_ATTEMPT", order.attempt.to_string())
            .current_dir(
                spec.cwd
                    .as_ref()
                    .map_or(order.run_dir.clone(), PathBuf::from),
            )
            .stdin(std::process::Stdio::null())
            .stdout(output)
            .stderr(errors)
            .process_group(0)
            .kill_on_drop(false);
        let mut child = match command.spawn() {
            Ok(child) => child,
            Err(e) => return spawn_failed(format!("{}: {e}", spec.argv[0])),
        };
        let group = child.id().map(|pid| nix::unistd::Pid::from_raw(pid as i32));
        // Left behind if this agent dies, so that its successor can reap the group.
        let marker = order.run_dir.join(GROUP_FILE);
        if let Some(pid) = child.id() {
            let _ = std::fs::write(&marker, format!("{pid} {}\n", start_time(pid).unwrap_or(0)));
        }
        let _ = control.started.send(());
        let mut kill = control.kill;
        let (status, killed) = tokio::select! {
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
        let _ = std::fs::remove_file(&marker);
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
            output_tail: read_tail(&output_path, self.output_tail_bytes),
            run_ms: began.elapsed().as_millis() as u64,
        }
    }
}

/// The file in a run dir that names a live process group: "<pgid> <start time>".
pub const GROUP_FILE: &str = "process-group";

/// A process's start time (clock ticks since boot), from /proc: with the pid
/// it names one process, even after the pid is reused.
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces and parentheses).
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Kills the process groups a previous agent left running in `work_dir`
/// (it died without killing them: they would otherwise run on, unowned,
/// beside their own re-run). Returns how many it killed.
pub fn reap_orphans(work_dir: &std::path::Path) -> usize {
    let Ok(entries) = std::fs::read_dir(work_dir) else {
        return 0;
    };
    let mut reaped = 0;
    for entry in entries.flatten() {
        let marker = entry.path().join(GROUP_FILE);
        let Ok(text) = std::fs::read_to_string(&marker) else {
            continue;
        };
        let mut fields = text.split_whitespace().map(|f| f.parse::<u64>().ok());
        if let (Some(Some(pid)), Some(Some(started))) = (fields.next(), fields.next()) {
            if pid > 1 && start_time(pid as u32) == Some(started) {
                tracing::warn!(pid, run_dir = %entry.path().display(), "killing a process group left by a previous agent");
                signal_group(
                    Some(nix::unistd::Pid::from_raw(pid as i32)),
                    nix::sys::signal::Signal::SIGKILL,
                );
                reaped += 1;
            }
        }
        let _ = std::fs::remove_file(&marker);
    }
    reaped
}

fn signal_group(group: Option<nix::unistd::Pid>, signal: nix::sys::signal::Signal) {
    if let Some(pgid) = group {
        // ESRCH (the group is already gone) is the expected, harmless case.
        let _ = nix::sys::signal::killpg(pgid, signal);
    }
}

/// The last `max` bytes of a file, as text (invalid UTF-8 replaced).
pub fn read_tail(path: &std::path::Path, max: usize) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut file) = std::fs::File::open(path) else {
        return String::new();
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(max as u64);
    if file.seek(SeekFrom::Start(start)).is_err() {
        return String::new();
    }
    let mut bytes = Vec::with_capacity(max);
    let _ = file.take(max as u64).read_to_end(&mut bytes);
    let text = String::from_utf8_lossy(&bytes).into_owned();
    crate::core::tail(&text, max)
}
