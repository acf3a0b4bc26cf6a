//! Runs one scenario on one seed: a fresh madsim runtime on a fresh thread
//! (a second run on one thread would inherit its process-global state), a
//! fresh data dir, the trace, and the checkers' verdict.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::checkers::{check, Failure, Violation};
use crate::scenario::Scenario;
use crate::trace::Entry;

/// How a run ended; also the CLI's exit code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Pass = 0,
    Correctness = 1,
    Liveness = 2,
    Crash = 3,
    Nondeterminism = 4,
}

impl Verdict {
    /// Worst first: a crash, then a run that did not repeat itself, then a
    /// broken invariant, then a world that did not heal.
    pub fn severity(self) -> u8 {
        match self {
            Verdict::Pass => 0,
            Verdict::Liveness => 1,
            Verdict::Correctness => 2,
            Verdict::Nondeterminism => 3,
            Verdict::Crash => 4,
        }
    }

    /// The worse of two verdicts.
    pub fn worst(self, other: Verdict) -> Verdict {
        if other.severity() > self.severity() {
            other
        } else {
            self
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Pass => "pass",
            Verdict::Correctness => "correctness failure",
            Verdict::Liveness => "liveness failure",
            Verdict::Crash => "crash",
            Verdict::Nondeterminism => "nondeterminism",
        }
    }
}

#[derive(Debug)]
pub struct RunResult {
    pub seed: u64,
    pub trace: Vec<Entry>,
    pub violations: Vec<Violation>,
    /// The panic message, if the run crashed.
    pub crash: Option<String>,
    /// Simulated time the run covered.
    pub sim_ms: u64,
    /// Real time it took.
    pub wall: Duration,
}

impl RunResult {
    pub fn verdict(&self) -> Verdict {
        if self.crash.is_some() {
            Verdict::Crash
        } else if self
            .violations
            .iter()
            .any(|v| v.failure == Failure::Correctness)
        {
            Verdict::Correctness
        } else if self.violations.is_empty() {
            Verdict::Pass
        } else {
            Verdict::Liveness
        }
    }

    /// How the run ended, as the shrinker judges it: the crash first, then
    /// the violations in the order found.
    pub fn outcome(&self) -> crate::shrink::Outcome {
        let crash = self.crash.iter().map(|c| ("crash".to_string(), c.clone()));
        let violations = self
            .violations
            .iter()
            .map(|v| (v.checker.to_string(), v.message.clone()));
        crate::shrink::Outcome {
            verdict: self.verdict().as_str().to_string(),
            violations: crash.chain(violations).collect(),
        }
    }

    /// The trace as JSON lines.
    pub fn trace_jsonl(&self) -> String {
        self.trace.iter().map(|e| format!("{e}\n")).collect()
    }
}

/// Where runs keep their databases: memory-backed when the machine has it
/// (a run's SQLite file only has to outlive a simulated crash, not a real one).
fn scratch() -> std::io::Result<tempfile::TempDir> {
    let shm = PathBuf::from("/dev/shm");
    if shm.is_dir() {
        if let Ok(dir) = tempfile::Builder::new()
            .prefix("foreman-sim-")
            .tempdir_in(&shm)
        {
            return Ok(dir);
        }
    }
    tempfile::Builder::new().prefix("foreman-sim-").tempdir()
}

/// Runs `scenario` on `seed` on a thread of its own.
pub fn run(scenario: &Scenario, seed: u64) -> RunResult {
    let scenario = Arc::new(scenario.clone());
    #[allow(clippy::disallowed_methods)] // wall time of the run, outside the simulation
    let began = std::time::Instant::now();
    #[allow(clippy::disallowed_methods)] // each run needs fresh thread-local state
    let joined = std::thread::Builder::new()
        .name(format!("sim-{seed}"))
        .spawn(move || run_here(scenario, seed))
        .expect("a thread for the run")
        .join();
    #[allow(clippy::disallowed_methods)]
    let wall = began.elapsed();
    match joined {
        Ok(Ok(mut result)) => {
            result.wall = wall;
            result
        }
        Ok(Err(crash)) | Err(crash) => RunResult {
            seed,
            trace: Vec::new(),
            violations: Vec::new(),
            crash: Some(crate::trace::panic_message(&*crash)),
            sim_ms: 0,
            wall,
        },
    }
}

type Crash = Box<dyn std::any::Any + Send>;

fn run_here(scenario: Arc<Scenario>, seed: u64) -> Result<RunResult, Crash> {
    let dir = scratch().map_err(|e| Box::new(format!("scratch dir: {e}")) as Crash)?;
    let data_dir = dir.path().to_path_buf();
    let config = crate::world::madsim_config(&scenario);
    let mut runtime = madsim::runtime::Runtime::with_seed_and_config(seed, config);
    // A backstop far beyond any bound the scenario sets.
    let limit = scenario.plan_end_ms() + scenario.expect.settle_ms + 600_000;
    runtime.set_time_limit(Duration::from_millis(limit));
    let played = {
        let scenario = scenario.clone();
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
            runtime.block_on(crate::world::play(scenario, data_dir))
        }))
    };
    drop(dir);
    let trace = played?;
    let violations = check(&scenario, &trace);
    Ok(RunResult {
        seed,
        sim_ms: trace.last().map_or(0, |e| e.at),
        trace,
        violations,
        crash: None,
        wall: Duration::ZERO,
    })
}
