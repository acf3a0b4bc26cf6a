//! The simulated `Runner`: a job "runs" for a simulated duration and ends
//! with the exit code and output its environment names. Every run and kill
//! is recorded, so checkers can ask what really ran where.
//!
//! Job environment read here:
//! - `SIM_DURATION_MS` (default 1000): how long the process runs;
//! - `SIM_EXIT_CODE` (default 0);
//! - `SIM_OUTPUT` (default empty): the output tail.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use foreman::agent::runner::{RunControl, RunFuture, RunOrder, Runner};
use foreman::core::{FinishedReport, JobId, Outcome};

/// What happened to one simulated process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProcessEnd {
    Running,
    Exited(i32),
    Killed,
}

/// One simulated process: (job, attempt, agent).
pub type ProcessKey = (JobId, u32, String);

/// Every simulated process of a world.
#[derive(Clone, Default)]
pub struct Processes(Arc<Mutex<BTreeMap<ProcessKey, ProcessEnd>>>);

impl Processes {
    pub fn snapshot(&self) -> BTreeMap<ProcessKey, ProcessEnd> {
        self.0.lock().expect("processes lock").clone()
    }

    fn set(&self, key: ProcessKey, end: ProcessEnd) {
        self.0.lock().expect("processes lock").insert(key, end);
    }
}

#[derive(Clone)]
pub struct SimRunner {
    pub agent: String,
    pub processes: Processes,
}

impl Runner for SimRunner {
    fn run(&self, order: RunOrder, control: RunControl) -> RunFuture {
        let runner = self.clone();
        Box::pin(async move {
            let env = &order.spec.env;
            let number = |key: &str, default: i64| {
                env.get(key).and_then(|v| v.parse().ok()).unwrap_or(default)
            };
            let duration_ms = number("SIM_DURATION_MS", 1000).max(0) as u64;
            let code = number("SIM_EXIT_CODE", 0) as i32;
            let output = env.get("SIM_OUTPUT").cloned().unwrap_or_default();
            let key = (order.job, order.attempt, runner.agent.clone());
            runner.processes.set(key.clone(), ProcessEnd::Running);
            let _ = control.started.send(());
            let began = foreman::seam::now();
            let mut kill = control.kill;
            let (outcome, end) = tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(duration_ms)) => (Outcome::Exited { code }, ProcessEnd::Exited(code)),
                _ = &mut kill => (Outcome::Killed, ProcessEnd::Killed),
            };
            runner.processes.set(key, end);
            FinishedReport {
                outcome,
                output_tail: output,
                run_ms: foreman::seam::now().ms_since(began),
            }
        })
    }
}
