//! The simulated `Runner`: a job "runs" for a simulated duration and ends
//! with the exit code and output its environment names. Every start and end
//! goes into the trace, so checkers know what really ran where.
//!
//! Job environment read here:
//! - `SIM_DURATION_MS` (default 1000): how long the process runs;
//! - `SIM_EXIT_CODE` (default 0);
//! - `SIM_OUTPUT` (default empty): what it prints, written to its run
//!   dir's `output` in `SIM_OUTPUT_PARTS` (default 1) parts of equal bytes
//!   (so a part may end inside a character), spread over its duration, the
//!   last at its exit;
//! - `SIM_TERM_OUTPUT`: what it prints once killed, while it dies;
//! - `SIM_HANG=1`: it never ends by itself;
//! - `SIM_CRASH=1`: it dies of SIGSEGV at the end of its duration;
//! - `SIM_STOP_MS` (default 0): once killed, it takes this long to die (at
//!   most `KILL_GRACE_MS`, after which a real runner's SIGKILL ends it).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use foreman::agent::outbox::{kept_result, kept_result_key};
use foreman::agent::runner::{tail_of, RunControl, RunFuture, RunOrder, Runner};
use foreman::core::{FinishedReport, JobId, Outcome};

use crate::scenario::JobPlan;
use crate::trace::{Ev, ProcessEnd, Trace};

#[derive(Clone)]
pub struct SimRunner {
    pub agent: String,
    pub trace: Trace,
    /// Set when this runner's host is gone for good (a reboot): its
    /// processes were declared vanished then, and say nothing more.
    pub gone: Arc<AtomicBool>,
    /// The longest its processes take to die once killed (the scenario's
    /// largest `stop_ms`): the agent fences this much earlier.
    pub kill_grace_ms: u64,
    /// The output tail a report carries, in bytes (a real agent's 4096).
    pub output_tail_bytes: usize,
    /// The host's disk, as far as runs use it.
    pub disk: Disk,
}

/// The files of a host's runs: each run's output, by path. A run creates
/// (or truncates) `<run dir>/output` and appends to it while it runs and
/// while it dies; the agent's own capture code (`tail_of`) reads it back.
#[derive(Clone, Default)]
pub struct Disk(Arc<Mutex<BTreeMap<PathBuf, OutputFile>>>);

type OutputFile = Arc<Mutex<Vec<u8>>>;

impl Disk {
    fn create(&self, path: PathBuf) -> OutputFile {
        let mut files = self.0.lock().expect("disk lock");
        let file = files.entry(path).or_default().clone();
        file.lock().expect("file lock").clear();
        file
    }

    fn remove(&self, path: &std::path::Path) {
        self.0.lock().expect("disk lock").remove(path);
    }

    /// The files directly in `dir`: (name, bytes).
    fn list(&self, dir: &std::path::Path) -> Vec<(String, Vec<u8>)> {
        let files = self.0.lock().expect("disk lock");
        files
            .iter()
            .filter(|(path, _)| path.parent() == Some(dir))
            .map(|(path, file)| {
                let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
                (
                    name.unwrap_or_default(),
                    file.lock().expect("file lock").clone(),
                )
            })
            .collect()
    }
}

/// Where a simulated agent keeps the results it has not had acknowledged:
/// one file each, as the real runner does.
fn outbox_dir() -> PathBuf {
    PathBuf::from("/nonexistent/sim/outbox")
}

fn write(file: &OutputFile, bytes: &[u8]) {
    file.lock().expect("file lock").extend_from_slice(bytes);
}

/// Records the end of a process; if the process is dropped unfinished (its
/// node died), it vanished.
struct Running {
    gone: Arc<AtomicBool>,
    trace: Trace,
    job: u64,
    attempt: u32,
    agent: String,
    end: Option<ProcessEnd>,
}

impl Drop for Running {
    fn drop(&mut self) {
        if self.gone.load(Ordering::Relaxed) {
            return;
        }
        self.trace.push(Ev::ProcessEnded {
            job: self.job,
            attempt: self.attempt,
            agent: std::mem::take(&mut self.agent),
            end: self.end.unwrap_or(ProcessEnd::Vanished),
        });
    }
}

/// The longest a killed simulated process may take to die (a real runner
/// sends SIGKILL then).
pub const KILL_GRACE_MS: u64 = 300;

/// The job environment that describes a job's simulated process.
pub fn process_env(job: &JobPlan) -> BTreeMap<String, String> {
    let mut env = BTreeMap::from([("SIM_DURATION_MS".to_string(), job.duration_ms.to_string())]);
    let mut set = |key: &str, on: bool, value: String| {
        if on {
            env.insert(key.to_string(), value);
        }
    };
    set(
        "SIM_EXIT_CODE",
        job.exit_code != 0,
        job.exit_code.to_string(),
    );
    set("SIM_OUTPUT", !job.output.is_empty(), job.output.clone());
    set(
        "SIM_OUTPUT_PARTS",
        job.output_parts > 1,
        job.output_parts.to_string(),
    );
    set(
        "SIM_TERM_OUTPUT",
        !job.term_output.is_empty(),
        job.term_output.clone(),
    );
    set("SIM_HANG", job.hang, "1".into());
    set("SIM_CRASH", job.crash, "1".into());
    set("SIM_STOP_MS", job.stop_ms > 0, job.stop_ms.to_string());
    set("SIM_START_MS", job.start_ms > 0, job.start_ms.to_string());
    env
}

impl Runner for SimRunner {
    fn kill_grace_ms(&self) -> u64 {
        self.kill_grace_ms
    }

    /// On the host's disk, which a restart keeps and a reboot onto a new
    /// node does not; read back with the real runner's parser.
    fn keep_result(&self, job: JobId, attempt: u32, report: &FinishedReport) {
        let file = self
            .disk
            .create(outbox_dir().join(format!("{job}-{attempt}.json")));
        write(
            &file,
            &serde_json::to_vec(report).expect("a report serializes"),
        );
        self.trace.push(Ev::ResultKept {
            job: job.0,
            attempt,
            agent: self.agent.clone(),
        });
    }

    fn drop_result(&self, job: JobId, attempt: u32) {
        self.disk
            .remove(&outbox_dir().join(format!("{job}-{attempt}.json")));
    }

    fn kept_results(&self) -> Vec<(JobId, u32, FinishedReport)> {
        let mut kept: Vec<_> = self
            .disk
            .list(&outbox_dir())
            .into_iter()
            .filter_map(|(name, bytes)| {
                let (job, attempt) = kept_result_key(&name)?;
                Some((job, attempt, kept_result(&bytes).ok()?))
            })
            .collect();
        kept.sort_by_key(|(job, attempt, _)| (*job, *attempt));
        kept
    }

    fn run(&self, order: RunOrder, control: RunControl) -> RunFuture {
        let runner = self.clone();
        Box::pin(async move {
            let env = &order.spec.env;
            let number = |key: &str, default: i64| {
                env.get(key).and_then(|v| v.parse().ok()).unwrap_or(default)
            };
            let duration_ms = number("SIM_DURATION_MS", 1000).max(0) as u64;
            let code = number("SIM_EXIT_CODE", 0) as i32;
            let hang = number("SIM_HANG", 0) != 0;
            let crash = number("SIM_CRASH", 0) != 0;
            let stop_ms = (number("SIM_STOP_MS", 0).max(0) as u64).min(runner.kill_grace_ms);
            let output = env.get("SIM_OUTPUT").cloned().unwrap_or_default();
            let parts = number("SIM_OUTPUT_PARTS", 1).clamp(1, 64) as usize;
            let term_output = env.get("SIM_TERM_OUTPUT").cloned().unwrap_or_default();
            let start_ms = number("SIM_START_MS", 0).max(0) as u64;
            if start_ms > 0 {
                // Run dir, fork, exec: nothing runs yet, and nothing can be
                // killed until it does.
                tokio::time::sleep(Duration::from_millis(start_ms)).await;
            }
            let file = runner.disk.create(order.run_dir.join("output"));
            runner.trace.push(Ev::ProcessStarted {
                job: order.job.0,
                attempt: order.attempt,
                agent: runner.agent.clone(),
                cpus: order.spec.cpus,
            });
            let mut process = Running {
                gone: runner.gone.clone(),
                trace: runner.trace.clone(),
                job: order.job.0,
                attempt: order.attempt,
                agent: runner.agent.clone(),
                end: None,
            };
            let _ = control.started.send(());
            let began = foreman::seam::now();
            let mut kill = control.kill;
            let run = async {
                // Equal parts of its bytes at equal steps, the last at its exit.
                let bytes = output.as_bytes();
                let size = bytes.len().div_ceil(parts).max(1);
                let chunks: Vec<&[u8]> = bytes.chunks(size).collect();
                let step = duration_ms / chunks.len().max(1) as u64;
                let mut slept = 0;
                for (i, chunk) in chunks.iter().enumerate() {
                    let at = if i + 1 == chunks.len() {
                        duration_ms
                    } else {
                        step * (i as u64 + 1)
                    };
                    tokio::time::sleep(Duration::from_millis(at - slept)).await;
                    slept = at;
                    write(&file, chunk);
                }
                if duration_ms > slept {
                    tokio::time::sleep(Duration::from_millis(duration_ms - slept)).await;
                }
                if hang {
                    std::future::pending::<()>().await;
                }
            };
            let (outcome, end) = foreman::select! {
                () = run => if crash {
                    (Outcome::Signaled { signal: 11 }, ProcessEnd::Crashed)
                } else {
                    (Outcome::Exited { code }, ProcessEnd::Exited)
                },
                _ = &mut kill => (Outcome::Killed, ProcessEnd::Killed),
            };
            if end == ProcessEnd::Killed {
                write(&file, term_output.as_bytes());
                if stop_ms > 0 {
                    // Still dying: its CPUs are still in use.
                    tokio::time::sleep(Duration::from_millis(stop_ms)).await;
                }
            }
            process.end = Some(end);
            drop(process);
            // Read back once the process (and its group) has ended, as the
            // agent's runner does.
            let written = file.lock().expect("file lock").clone();
            FinishedReport {
                outcome,
                output_tail: tail_of(std::io::Cursor::new(written), runner.output_tail_bytes),
                run_ms: foreman::seam::now().ms_since(began),
            }
        })
    }
}
