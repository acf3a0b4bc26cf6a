//! The simulated `Runner`: a job "runs" for a simulated duration and ends
//! with the exit code and output its environment names. Every start and end
//! goes into the trace, so checkers know what really ran where.
//!
//! Job environment read here:
//! - `SIM_DURATION_MS` (default 1000): how long the process runs;
//! - `SIM_EXIT_CODE` (default 0);
//! - `SIM_OUTPUT` (default empty): the output tail;
//! - `SIM_HANG=1`: it never ends by itself;
//! - `SIM_CRASH=1`: it dies of SIGSEGV at the end of its duration;
//! - `SIM_STOP_MS` (default 0): once killed, it takes this long to die (at
//!   most `KILL_GRACE_MS`, after which a real runner's SIGKILL ends it).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use foreman::agent::runner::{RunControl, RunFuture, RunOrder, Runner};
use foreman::core::{FinishedReport, Outcome};

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

/// The job environment that describes a simulated process.
pub fn process_env(
    stop_ms: u64,
    duration_ms: u64,
    exit_code: i32,
    output: &str,
    hang: bool,
    crash: bool,
) -> BTreeMap<String, String> {
    let mut env = BTreeMap::from([("SIM_DURATION_MS".to_string(), duration_ms.to_string())]);
    if exit_code != 0 {
        env.insert("SIM_EXIT_CODE".into(), exit_code.to_string());
    }
    if !output.is_empty() {
        env.insert("SIM_OUTPUT".into(), output.to_string());
    }
    if hang {
        env.insert("SIM_HANG".into(), "1".into());
    }
    if crash {
        env.insert("SIM_CRASH".into(), "1".into());
    }
    if stop_ms > 0 {
        env.insert("SIM_STOP_MS".into(), stop_ms.to_string());
    }
    env
}

impl Runner for SimRunner {
    fn kill_grace_ms(&self) -> u64 {
        self.kill_grace_ms
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
                if hang {
                    std::future::pending::<()>().await;
                }
                tokio::time::sleep(Duration::from_millis(duration_ms)).await;
            };
            let (outcome, end) = foreman::select! {
                () = run => if crash {
                    (Outcome::Signaled { signal: 11 }, ProcessEnd::Crashed)
                } else {
                    (Outcome::Exited { code }, ProcessEnd::Exited)
                },
                _ = &mut kill => (Outcome::Killed, ProcessEnd::Killed),
            };
            if end == ProcessEnd::Killed && stop_ms > 0 {
                // Still dying: its CPUs are still in use.
                tokio::time::sleep(Duration::from_millis(stop_ms)).await;
            }
            process.end = Some(end);
            drop(process);
            FinishedReport {
                outcome,
                output_tail: output,
                run_ms: foreman::seam::now().ms_since(began),
            }
        })
    }
}
