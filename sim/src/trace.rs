//! The structured trace of one run: what the core decided (its events), what
//! the simulated processes did, what the clients were told, which faults
//! fired, and the end state. Checkers read nothing else.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex};

use foreman::core::{Event, EventKind, JobState};
use serde::{Deserialize, Serialize};

use crate::scenario::Action;

/// How a simulated process ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProcessEnd {
    Exited,
    Crashed,
    Killed,
    /// Its node died with it (killed or restarted).
    Vanished,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "ev", rename_all = "snake_case")]
pub enum Ev {
    /// A decision of the core, once committed.
    Core {
        kind: EventKind,
        #[serde(skip_serializing_if = "Option::is_none")]
        job: Option<u64>,
        #[serde(skip_serializing_if = "Option::is_none")]
        attempt: Option<u32>,
        #[serde(skip_serializing_if = "Option::is_none")]
        agent: Option<String>,
        reason: String,
    },
    /// A simulated process started on an agent.
    ProcessStarted {
        job: u64,
        attempt: u32,
        agent: String,
        cpus: u32,
    },
    ProcessEnded {
        job: u64,
        attempt: u32,
        agent: String,
        end: ProcessEnd,
    },
    /// A batch handed to the commit stage held inputs the core decided
    /// while the batch before it was being committed (pipelined commit).
    Pipelined {
        inputs: usize,
    },
    /// An agent kept a result on its host's disk, unacknowledged.
    ResultKept {
        job: u64,
        attempt: u32,
        agent: String,
    },
    /// A submission was acknowledged to its client.
    Acked {
        name: String,
        job: u64,
    },
    /// A submission attempt got no acknowledgement (it is retried).
    SubmitFailed {
        name: String,
        error: String,
    },
    /// The client gave up on a submission it never saw acknowledged (the
    /// job may exist, once, or not at all).
    SubmitAbandoned {
        name: String,
    },
    /// A cancel request was answered.
    CancelSent {
        name: String,
        job: u64,
    },
    Fault {
        what: String,
        /// The fault plan's action, where this entry is one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        action: Option<Action>,
        /// The agents it hit.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        agents: Vec<String>,
        /// A latency fault's new range.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        latency_ms: Option<[u64; 2]>,
    },
    /// A client is about to ask for a job's cancel (it may or may not be
    /// answered; the core may or may not hear it).
    CancelIssued {
        name: String,
        job: u64,
    },
    /// An agent's node is paused, and resumed (or killed or restarted,
    /// which end the freeze too).
    Frozen {
        agent: String,
    },
    Thawed {
        agent: String,
    },
    /// The supervisor node died (crashed, or restarted): every connection
    /// went with it.
    SupervisorDown,
    /// The core's own invariant check failed after a step.
    InvariantBroken {
        message: String,
    },
    /// The fault plan ended and everything settled (or did not).
    Settled {
        ok: bool,
        detail: String,
    },
    /// The supervisor's journal, replayed after the run (`journal`):
    /// segments and inputs replayed, the jobs the newest segment ended and
    /// how, the core it ended with and the one last committed (live jobs,
    /// CPUs used, connected agents), and the segments that did not replay.
    JournalReplayed {
        segments: usize,
        inputs: usize,
        ended: BTreeMap<u64, JobState>,
        replayed: Option<[u64; 3]>,
        committed: Option<[u64; 3]>,
        errors: Vec<String>,
    },
    /// A job as the API shows it at the end.
    Final {
        job: u64,
        name: String,
        state: JobState,
        attempts: usize,
        /// Why it is in its state, as the API says.
        reason: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        exit_code: Option<i32>,
        #[serde(default, skip_serializing_if = "String::is_empty")]
        output_tail: String,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Simulated ms since the world started.
    pub at: u64,
    #[serde(flatten)]
    pub ev: Ev,
}

impl fmt::Display for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = serde_json::to_string(self).map_err(|_| fmt::Error)?;
        f.write_str(&text)
    }
}

/// What the supervisor's core looked like after its latest step.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CoreView {
    pub connected_agents: usize,
    pub cpus_used: u32,
    pub live_jobs: usize,
}

impl CoreView {
    pub fn of(core: &foreman::core::Core) -> CoreView {
        CoreView {
            connected_agents: core.agents().filter(|a| a.conn().is_some()).count(),
            cpus_used: core.agents().map(|a| a.used_cpus).sum(),
            live_jobs: core.jobs().filter(|j| !j.state.is_terminal()).count(),
        }
    }

    /// Live jobs, CPUs used, connected agents.
    pub fn numbers(&self) -> [u64; 3] {
        [
            self.live_jobs as u64,
            u64::from(self.cpus_used),
            self.connected_agents as u64,
        ]
    }
}

#[derive(Debug, Default)]
struct Inner {
    entries: Vec<Entry>,
    /// The core as of its latest committed batch.
    core: Option<CoreView>,
    /// The core as last handled, its batch not yet sealed.
    pending: Option<CoreView>,
    /// Batches handed to the commit stage, oldest first: the core as each
    /// left it (none if it handled no input).
    sealed: std::collections::VecDeque<Option<CoreView>>,
    /// Inputs handled since the last seal while a batch was committing.
    decided_during_commit: usize,
}

/// A run's trace, shared by every node of the world (they all run on the
/// simulator's one thread).
#[derive(Clone, Debug)]
pub struct Trace {
    inner: Arc<Mutex<Inner>>,
    changed: Arc<tokio::sync::Notify>,
    start: foreman::core::Millis,
}

impl Trace {
    pub fn new() -> Trace {
        Trace {
            inner: Arc::default(),
            changed: Arc::default(),
            start: foreman::seam::now(),
        }
    }

    pub fn now(&self) -> u64 {
        foreman::seam::now().ms_since(self.start)
    }

    pub fn push(&self, ev: Ev) {
        let at = self.now();
        self.inner
            .lock()
            .expect("trace lock")
            .entries
            .push(Entry { at, ev });
        self.changed.notify_waiters();
    }

    /// Waits until something is added or the core's view changes, or until
    /// `deadline_ms` passes.
    /// (The simulation is single-threaded: nothing is added between a
    /// caller's check and this wait.)
    pub async fn changed(&self, deadline_ms: u64) {
        let wait = std::time::Duration::from_millis(deadline_ms.saturating_sub(self.now()));
        let _ = tokio::time::timeout(wait, self.changed.notified()).await;
    }

    pub fn entries(&self) -> Vec<Entry> {
        self.inner.lock().expect("trace lock").entries.clone()
    }

    /// The core after its latest committed step; none since the supervisor
    /// went down.
    pub fn core_view(&self) -> Option<CoreView> {
        self.inner.lock().expect("trace lock").core.clone()
    }

    /// The supervisor went down: what its core showed is no longer true.
    pub fn forget_core(&self) {
        let mut inner = self.inner.lock().expect("trace lock");
        inner.core = None;
        inner.pending = None;
        inner.sealed.clear();
        inner.decided_during_commit = 0;
    }

    /// The simulated processes started and not yet ended: (job, attempt, agent).
    pub fn running_processes(&self) -> std::collections::BTreeSet<(u64, u32, String)> {
        self.with(|entries| {
            let mut running = std::collections::BTreeSet::new();
            for e in entries {
                match &e.ev {
                    Ev::ProcessStarted {
                        job,
                        attempt,
                        agent,
                        ..
                    } => {
                        running.insert((*job, *attempt, agent.clone()));
                    }
                    Ev::ProcessEnded {
                        job,
                        attempt,
                        agent,
                        ..
                    } => {
                        running.remove(&(*job, *attempt, agent.clone()));
                    }
                    _ => {}
                }
            }
            running
        })
    }

    /// Reads the trace so far without copying it.
    pub fn with<T>(&self, f: impl FnOnce(&[Entry]) -> T) -> T {
        f(&self.inner.lock().expect("trace lock").entries)
    }
}

impl Default for Trace {
    fn default() -> Self {
        Trace::new()
    }
}

impl foreman::server::executor::Observer for Trace {
    fn handled(&self, core: &foreman::core::Core) {
        let checked =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| core.check_invariants()));
        if let Err(panic) = checked {
            let message = panic_message(&*panic);
            self.push(Ev::InvariantBroken { message });
        }
        let view = CoreView::of(core);
        let mut inner = self.inner.lock().expect("trace lock");
        inner.pending = Some(view);
        if !inner.sealed.is_empty() {
            inner.decided_during_commit += 1;
        }
    }

    fn sealed(&self) {
        let inputs = {
            let mut inner = self.inner.lock().expect("trace lock");
            let pending = inner.pending.take();
            inner.sealed.push_back(pending);
            std::mem::take(&mut inner.decided_during_commit)
        };
        if inputs > 0 {
            self.push(Ev::Pipelined { inputs });
        }
    }

    fn committed(&self) {
        let changed = {
            let mut inner = self.inner.lock().expect("trace lock");
            let pending = inner.sealed.pop_front().flatten();
            let changed = pending.is_some() && inner.core != pending;
            if pending.is_some() {
                inner.core = pending;
            }
            changed
        };
        if changed {
            self.changed.notify_waiters();
        }
    }

    fn event(&self, event: &Event) {
        self.push(Ev::Core {
            kind: event.kind,
            job: event.job.map(|j| j.0),
            attempt: event.attempt,
            agent: event.agent.as_ref().map(|a| a.to_string()),
            reason: event.reason.to_string(),
        });
    }
}

/// The first place two traces of one seed differ, with the entries around it.
pub fn first_divergence(a: &[Entry], b: &[Entry], context: usize) -> Option<String> {
    let at = a
        .iter()
        .zip(b)
        .position(|(x, y)| x != y)
        .or((a.len() != b.len()).then(|| a.len().min(b.len())))?;
    let from = at.saturating_sub(context);
    let mut out = format!("the runs diverge at entry {at}\n");
    for (label, trace) in [("first run", a), ("second run", b)] {
        out.push_str(&format!("{label}:\n"));
        for (i, entry) in trace.iter().enumerate().skip(from).take(2 * context + 1) {
            let mark = if i == at { ">>" } else { "  " };
            out.push_str(&format!("{mark} {i:5} {entry}\n"));
        }
        if trace.len() <= at {
            out.push_str(&format!(">> {at:5} (the run ends here)\n"));
        }
    }
    Some(out)
}

/// A run's trace in short: one line per entry, for snapshots and reading.
pub fn summary(entries: &[Entry]) -> String {
    let mut out = String::new();
    for e in entries {
        let line = match &e.ev {
            Ev::Core {
                kind,
                job,
                attempt,
                agent,
                reason,
            } => {
                let mut s = format!("core {kind:?}");
                if let Some(job) = job {
                    s.push_str(&format!(" job {job}"));
                }
                if let Some(attempt) = attempt {
                    s.push_str(&format!("/{attempt}"));
                }
                if let Some(agent) = agent {
                    s.push_str(&format!(" on {agent}"));
                }
                format!("{s}: {reason}")
            }
            Ev::ProcessStarted {
                job,
                attempt,
                agent,
                cpus,
            } => format!("process {job}/{attempt} starts on {agent} ({cpus} cpus)"),
            Ev::ProcessEnded {
                job,
                attempt,
                agent,
                end,
            } => format!("process {job}/{attempt} on {agent}: {end:?}"),
            Ev::Pipelined { inputs } => {
                format!("a batch of {inputs} inputs decided while the one before it committed")
            }
            Ev::ResultKept {
                job,
                attempt,
                agent,
            } => format!("{agent} keeps the result of {job}/{attempt} on disk"),
            Ev::Acked { name, job } => format!("client: {name} is job {job}"),
            Ev::SubmitFailed { name, error } => format!("client: {name} not submitted: {error}"),
            Ev::SubmitAbandoned { name } => format!("client: gives up submitting {name}"),
            Ev::CancelSent { name, job } => {
                format!("client: cancel of {name} (job {job}) answered")
            }
            Ev::Fault { what, .. } => format!("fault: {what}"),
            Ev::CancelIssued { name, job } => format!("client: cancels {name} (job {job})"),
            Ev::Frozen { agent } => format!("{agent} frozen"),
            Ev::Thawed { agent } => format!("{agent} thawed"),
            Ev::SupervisorDown => "supervisor down".to_string(),
            Ev::InvariantBroken { message } => format!("INVARIANT BROKEN: {message}"),
            Ev::Settled { ok, detail } => format!("settled {ok}: {detail}"),
            Ev::JournalReplayed {
                segments,
                inputs,
                ended,
                replayed,
                errors,
                ..
            } => format!(
                "journal: {segments} segments, {inputs} inputs replayed, {} jobs ended in the newest, its core ends with {replayed:?} (live jobs, cpus, agents){}",
                ended.len(),
                if errors.is_empty() { String::new() } else { format!("; errors: {errors:?}") }
            ),
            Ev::Final {
                job,
                name,
                state,
                attempts,
                reason,
                exit_code,
                output_tail,
            } => {
                let mut s =
                    format!("final: job {job} ({name}) {state}, {attempts} attempts: {reason}");
                if let Some(code) = exit_code {
                    s.push_str(&format!(", exit {code}"));
                }
                if !output_tail.is_empty() {
                    s.push_str(&format!(", output {output_tail:?}"));
                }
                s
            }
        };
        out.push_str(&format!("{:>7} {line}\n", e.at));
    }
    out
}

/// What a panic said.
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "panic".into())
}
