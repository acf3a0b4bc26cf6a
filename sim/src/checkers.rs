//! Passive checkers, one per invariant, fed by a run's trace in order. None
//! of them looks at the supervisor's insides: what they know is what the
//! trace says the core decided, what the processes did and what the clients
//! were told.

use std::collections::{BTreeMap, BTreeSet};

use foreman::core::{EventKind, JobState};

mod links;
mod outcome;

use crate::scenario::Scenario;
use crate::trace::{Entry, Ev, ProcessEnd};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Failure {
    /// Something that must never happen happened.
    Correctness,
    /// Something that must happen did not, in the time allowed.
    Liveness,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    pub checker: &'static str,
    pub failure: Failure,
    /// Simulated ms of the entry that broke it.
    pub at: u64,
    pub message: String,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "[{}] at {} ms: {}", self.checker, self.at, self.message)
    }
}

trait Checker {
    fn name(&self) -> &'static str;
    fn observe(&mut self, entry: &Entry, out: &mut Vec<Violation>);
    fn finish(&mut self, _end: u64, _out: &mut Vec<Violation>) {}
}

fn violation(checker: &'static str, at: u64, message: String) -> Violation {
    Violation {
        checker,
        failure: Failure::Correctness,
        at,
        message,
    }
}

/// Capacity is conserved: the core's own invariants hold after every step,
/// and no agent ever runs processes needing more CPUs than it has.
struct Capacity {
    /// Each agent's CPUs, by name.
    cpus: BTreeMap<String, u32>,
    running: BTreeMap<String, BTreeMap<(u64, u32), u32>>,
}

impl Checker for Capacity {
    fn name(&self) -> &'static str {
        "capacity"
    }
    fn observe(&mut self, e: &Entry, out: &mut Vec<Violation>) {
        match &e.ev {
            Ev::InvariantBroken { message } => out.push(violation(
                self.name(),
                e.at,
                format!("core invariant: {message}"),
            )),
            Ev::ProcessStarted {
                job,
                attempt,
                agent,
                cpus,
            } => {
                let on = self.running.entry(agent.clone()).or_default();
                on.insert((*job, *attempt), *cpus);
                let used: u32 = on.values().sum();
                let has = self.cpus.get(agent).copied().unwrap_or(0);
                if used > has {
                    out.push(violation(
                        "capacity",
                        e.at,
                        format!(
                            "agent {agent} runs {used} CPUs of processes, it has {has}: {:?}",
                            on.keys().collect::<Vec<_>>()
                        ),
                    ));
                }
            }
            Ev::ProcessEnded {
                job,
                attempt,
                agent,
                ..
            } => {
                if let Some(on) = self.running.get_mut(agent) {
                    on.remove(&(*job, *attempt));
                }
            }
            _ => {}
        }
    }
}

/// A job never runs on two agents (or as two attempts) at once. One
/// exception, which no agent can prevent: a process on a frozen host (a
/// paused node) is given up and run elsewhere; when the host thaws, the old
/// process may go on for the moment it takes its agent to notice and kill
/// it. It must be gone within `thaw_ms` of the thaw.
struct SingleRun {
    thaw_ms: u64,
    running: BTreeMap<u64, BTreeSet<(u32, String)>>,
    frozen: BTreeSet<String>,
    thawed_at: BTreeMap<String, u64>,
    /// Overlaps excused while frozen: (job, attempt, agent) → must end by.
    excused: BTreeMap<(u64, u32, String), Option<u64>>,
}

impl Checker for SingleRun {
    fn name(&self) -> &'static str {
        "single-run"
    }
    fn observe(&mut self, e: &Entry, out: &mut Vec<Violation>) {
        match &e.ev {
            Ev::Frozen { agent } => {
                self.frozen.insert(agent.clone());
            }
            Ev::Thawed { agent } => {
                self.frozen.remove(agent);
                self.thawed_at.insert(agent.clone(), e.at);
                for ((_, _, a), by) in self.excused.iter_mut() {
                    if a == agent && by.is_none() {
                        *by = Some(e.at.saturating_add(self.thaw_ms));
                    }
                }
            }
            Ev::ProcessStarted {
                job,
                attempt,
                agent,
                ..
            } => {
                let set = self.running.entry(*job).or_default();
                for (other_attempt, other_agent) in set.iter() {
                    let key = (*job, *other_attempt, other_agent.clone());
                    let thawing = self
                        .thawed_at
                        .get(other_agent)
                        .map(|at| at.saturating_add(self.thaw_ms))
                        .filter(|by| e.at <= *by);
                    if self.frozen.contains(other_agent) {
                        self.excused.insert(key, None);
                    } else if let Some(by) = thawing {
                        // Thawed a moment ago: its agent has yet to notice.
                        self.excused.insert(key, Some(by));
                    } else {
                        out.push(violation(
                            "single-run",
                            e.at,
                            format!(
                                "job {job} attempt {attempt} starts on {agent} while attempt {other_attempt} still runs on {other_agent}"
                            ),
                        ));
                    }
                }
                set.insert((*attempt, agent.clone()));
            }
            Ev::ProcessEnded {
                job,
                attempt,
                agent,
                ..
            } => {
                if let Some(set) = self.running.get_mut(job) {
                    set.remove(&(*attempt, agent.clone()));
                }
                let key = (*job, *attempt, agent.clone());
                if let Some(Some(by)) = self.excused.remove(&key) {
                    if e.at > by {
                        out.push(violation(
                            "single-run",
                            e.at,
                            format!(
                                "job {job} attempt {attempt} on {agent}, run elsewhere while its host was frozen, ended only {} ms after the thaw",
                                e.at + self.thaw_ms - by
                            ),
                        ));
                    }
                }
            }
            _ => {}
        }
    }
    fn finish(&mut self, end: u64, out: &mut Vec<Violation>) {
        for ((job, attempt, agent), by) in &self.excused {
            if by.is_some_and(|by| end > by) {
                out.push(violation(
                    "single-run",
                    end,
                    format!("job {job} attempt {attempt} on {agent}, run elsewhere while its host was frozen, never ended"),
                ));
            }
        }
    }
}

/// Terminal states never change: after a job's `ended` event nothing moves
/// it again, and the API's final view agrees with it.
struct TerminalFinal {
    ended: BTreeMap<u64, String>,
    settled: bool,
}

impl Checker for TerminalFinal {
    fn name(&self) -> &'static str {
        "terminal-final"
    }
    fn observe(&mut self, e: &Entry, out: &mut Vec<Violation>) {
        match &e.ev {
            Ev::Core {
                kind,
                job: Some(job),
                reason,
                ..
            } => {
                // What moves a job (attempt-level events, such as the kill
                // of a timed-out job's process, may follow its end).
                let moves = matches!(
                    kind,
                    EventKind::Dispatched
                        | EventKind::Started
                        | EventKind::Requeued
                        | EventKind::Ended
                );
                if let (true, Some(first)) = (moves, self.ended.get(job)) {
                    out.push(violation(
                        self.name(),
                        e.at,
                        format!("job {job} ended ({first}) and then {kind:?}: {reason}"),
                    ));
                }
                if *kind == EventKind::Ended {
                    self.ended.entry(*job).or_insert_with(|| reason.clone());
                }
            }
            Ev::Settled { ok, .. } => self.settled = *ok,
            // A run that did not settle is the liveness checker's to report.
            Ev::Final { job, state, .. } if self.settled && !state.is_terminal() => {
                out.push(violation(
                    self.name(),
                    e.at,
                    format!("job {job} ends the run {state}"),
                ));
            }
            _ => {}
        }
    }
}

/// A canceled job never runs again, and a kill is honoured: no attempt is
/// dispatched after the cancel; no process of a canceled job is left
/// running; and a process told to stop (cancel, timeout) does not run on to
/// its natural end while its agent stays connected: once the kill had time
/// to arrive (`kill_window_ms` after the stop, or after the process started
/// if the run message was still on its way), it must die. An agent that
/// lost its connection meanwhile could not be told, and is excused (it is
/// told again when it returns, or fences itself).
struct CancelFinal {
    kill_window_ms: u64,
    canceled_at: BTreeMap<u64, u64>,
    stops: BTreeMap<(u64, u32, String), u64>,
    started: BTreeMap<(u64, u32, String), u64>,
    connected: BTreeSet<String>,
    gone_at: BTreeMap<String, u64>,
    frozen: BTreeSet<String>,
    settled: bool,
    states: BTreeMap<u64, JobState>,
}

impl Checker for CancelFinal {
    fn name(&self) -> &'static str {
        "cancel-final"
    }
    fn observe(&mut self, e: &Entry, out: &mut Vec<Violation>) {
        match &e.ev {
            Ev::Core {
                kind: EventKind::CancelRequested,
                job: Some(job),
                ..
            } => {
                self.canceled_at.entry(*job).or_insert(e.at);
            }
            Ev::Core {
                kind: EventKind::Dispatched,
                job: Some(job),
                attempt,
                reason,
                ..
            } if self.canceled_at.contains_key(job) => out.push(violation(
                self.name(),
                e.at,
                format!("job {job} attempt {attempt:?} dispatched after its cancel: {reason}"),
            )),
            Ev::Core {
                kind: EventKind::StopRequested,
                job: Some(job),
                attempt: Some(attempt),
                agent: Some(agent),
                ..
            } if self.connected.contains(agent) => {
                // Sent on a live connection (else it is sent on the return).
                self.stops
                    .entry((*job, *attempt, agent.clone()))
                    .or_insert(e.at);
            }
            Ev::Core {
                kind: EventKind::AgentConnected,
                agent: Some(agent),
                ..
            } => {
                self.connected.insert(agent.clone());
            }
            // A frozen agent cannot act on a kill until it thaws.
            Ev::Frozen { agent } => {
                self.gone_at.insert(agent.clone(), e.at);
                self.frozen.insert(agent.clone());
            }
            Ev::Thawed { agent } => {
                self.frozen.remove(agent);
            }
            Ev::Settled { ok, .. } => self.settled = *ok,
            // A supervisor that dies takes every connection with it.
            Ev::SupervisorDown => {
                for agent in std::mem::take(&mut self.connected) {
                    self.gone_at.insert(agent, e.at);
                }
            }
            Ev::Core {
                kind: EventKind::AgentDisconnected | EventKind::AgentLost | EventKind::AgentReplaced,
                agent: Some(agent),
                ..
            } => {
                self.connected.remove(agent);
                self.gone_at.insert(agent.clone(), e.at);
            }
            Ev::ProcessStarted {
                job,
                attempt,
                agent,
                ..
            } => {
                self.started.insert((*job, *attempt, agent.clone()), e.at);
            }
            Ev::ProcessEnded {
                job,
                attempt,
                agent,
                end,
            } => {
                let key = (*job, *attempt, agent.clone());
                let started = self.started.remove(&key).unwrap_or(0);
                let Some(&stop) = self.stops.get(&key) else {
                    return;
                };
                let natural = matches!(end, ProcessEnd::Exited | ProcessEnd::Crashed);
                let told_by = stop.max(started).saturating_add(self.kill_window_ms);
                let agent_left = self
                    .gone_at
                    .get(agent)
                    .is_some_and(|gone| *gone >= stop && *gone <= e.at);
                if natural && e.at > told_by && !agent_left {
                    out.push(violation(
                        self.name(),
                        e.at,
                        format!(
                            "job {job} attempt {attempt} on {agent} was told to stop at {stop} ms and ran on to its end ({end:?}), its agent connected throughout"
                        ),
                    ));
                }
            }
            Ev::Final { job, state, .. } => {
                self.states.insert(*job, *state);
            }
            _ => {}
        }
    }
    fn finish(&mut self, end: u64, out: &mut Vec<Violation>) {
        if !self.settled {
            return;
        }
        for ((job, attempt, agent), at) in &self.started {
            // A process on a host frozen to the end cannot have been killed.
            if self.frozen.contains(agent) {
                continue;
            }
            if self.states.get(job) == Some(&JobState::Canceled) {
                out.push(violation(
                    self.name(),
                    end,
                    format!(
                        "job {job} attempt {attempt}, canceled, still runs on {agent} (started at {at} ms)"
                    ),
                ));
            }
        }
    }
}

/// No acknowledged submission is lost, across supervisor crashes too: every
/// job a client was given an id for is in the final listing, and a retried
/// submission (same idempotency key) never made two jobs.
struct AckedKept {
    acked: BTreeMap<u64, String>,
    names: BTreeMap<String, u64>,
    finals: BTreeMap<u64, String>,
    settled: bool,
}

impl Checker for AckedKept {
    fn name(&self) -> &'static str {
        "acked-kept"
    }
    fn observe(&mut self, e: &Entry, out: &mut Vec<Violation>) {
        match &e.ev {
            Ev::Acked { name, job } => {
                if let Some(other) = self.names.get(name).filter(|o| *o != job) {
                    out.push(violation(
                        self.name(),
                        e.at,
                        format!("{name} acknowledged as job {other} and as job {job}"),
                    ));
                }
                self.names.insert(name.clone(), *job);
                self.acked.insert(*job, name.clone());
            }
            Ev::Final { job, name, .. } => {
                if let Some(other) = self.finals.insert(*job, name.clone()) {
                    out.push(violation(
                        self.name(),
                        e.at,
                        format!("job {job} listed twice ({other}, {name})"),
                    ));
                }
                if self.finals.values().filter(|n| *n == name).count() > 1 {
                    out.push(violation(
                        self.name(),
                        e.at,
                        format!("{name} was made into more than one job"),
                    ));
                }
            }
            // Judged only on a run that settled and was listed.
            Ev::Settled { ok, .. } => self.settled = *ok,
            _ => {}
        }
    }
    fn finish(&mut self, end: u64, out: &mut Vec<Violation>) {
        if !self.settled {
            return;
        }
        for (job, name) in &self.acked {
            if !self.finals.contains_key(job) {
                out.push(violation(
                    self.name(),
                    end,
                    format!("{name} was acknowledged as job {job} and is gone"),
                ));
            }
        }
    }
}

/// Fair-queue order within a user: a user's jobs of one kind start their
/// first attempt in the order they were submitted (FIFO, no backfill),
/// except that a job larger than every connected agent may be passed. The
/// checker follows the agents' connections from the core's events and
/// their sizes from the topology; it does not take the core's word for
/// which jobs were set aside.
struct FairOrder {
    owner: BTreeMap<u64, (String, String)>,
    /// CPUs each job asks for, by id.
    cpus: BTreeMap<u64, u32>,
    /// Each agent's CPUs, by name.
    agent_cpus: BTreeMap<String, u32>,
    /// Agents connected as the core's events tell it.
    connected: BTreeMap<String, u32>,
    /// Per (user, kind), jobs submitted and never dispatched, not ended.
    waiting: BTreeMap<(String, String), BTreeSet<u64>>,
    dispatched: BTreeSet<u64>,
}

impl Checker for FairOrder {
    fn name(&self) -> &'static str {
        "fair-order"
    }
    fn observe(&mut self, e: &Entry, out: &mut Vec<Violation>) {
        let Ev::Core {
            kind, job, agent, ..
        } = &e.ev
        else {
            if matches!(e.ev, Ev::SupervisorDown) {
                self.connected.clear();
            }
            return;
        };
        match (kind, job, agent) {
            (EventKind::AgentConnected, _, Some(agent)) => {
                let cpus = self.agent_cpus.get(agent).copied().unwrap_or(0);
                self.connected.insert(agent.clone(), cpus);
            }
            (
                EventKind::AgentDisconnected | EventKind::AgentLost | EventKind::AgentClosed,
                _,
                Some(agent),
            ) => {
                self.connected.remove(agent);
            }
            (EventKind::Submitted, Some(job), _) => {
                if let Some(key) = self.owner.get(job) {
                    self.waiting.entry(key.clone()).or_default().insert(*job);
                }
            }
            (EventKind::Ended, Some(job), _) => {
                if let Some(key) = self.owner.get(job) {
                    self.waiting.entry(key.clone()).or_default().remove(job);
                }
            }
            (EventKind::Dispatched, Some(job), _) => {
                // A redelivery or a later attempt is not a new decision.
                let Some(key) = self.owner.get(job) else {
                    return;
                };
                if !self.dispatched.insert(*job) {
                    return;
                }
                let waiting = self.waiting.entry(key.clone()).or_default();
                waiting.remove(job);
                // An older job of the same user and kind may only be passed
                // while it is larger than every connected agent.
                let largest = self.connected.values().copied().max().unwrap_or(0);
                for older in waiting.range(..*job) {
                    let cpus = self.cpus.get(older).copied().unwrap_or(0);
                    if cpus <= largest {
                        out.push(violation(
                            "fair-order",
                            e.at,
                            format!(
                                "{} {} job {job} dispatched before job {older}, submitted earlier, whose {cpus} CPUs fit the largest connected agent's {largest}",
                                key.0, key.1
                            ),
                        ));
                    }
                }
            }
            _ => {}
        }
    }
}

/// After the fault plan, everything heals within the scenario's bound.
struct Liveness {
    settled: Option<(u64, bool, String)>,
}

impl Checker for Liveness {
    fn name(&self) -> &'static str {
        "liveness"
    }
    fn observe(&mut self, e: &Entry, _out: &mut Vec<Violation>) {
        if let Ev::Settled { ok, detail } = &e.ev {
            self.settled = Some((e.at, *ok, detail.clone()));
        }
    }
    fn finish(&mut self, end: u64, out: &mut Vec<Violation>) {
        let (at, message) = match &self.settled {
            Some((_, true, _)) => return,
            Some((at, false, detail)) => (*at, format!("did not settle: {detail}")),
            None => (end, "the run ended before the world settled".to_string()),
        };
        out.push(Violation {
            checker: self.name(),
            failure: Failure::Liveness,
            at,
            message,
        });
    }
}

/// How a job ended, as its final trace entry says.
struct Ended {
    state: JobState,
    attempts: usize,
    reason: String,
    exit_code: Option<i32>,
    output_tail: String,
}

/// The scenario's own expectations: end states, attempts, exit codes,
/// output tails, reasons, dispatch order, the rare events it must reach.
struct Expectations<'a> {
    scenario: &'a Scenario,
    reached: BTreeMap<&'static str, usize>,
    finals: BTreeMap<String, Ended>,
    /// Jobs by first dispatch (a job is dispatched before its client hears
    /// its id, so names are matched at the end).
    dispatched: Vec<u64>,
    names: BTreeMap<u64, String>,
}

impl Checker for Expectations<'_> {
    fn name(&self) -> &'static str {
        "expectations"
    }
    fn observe(&mut self, e: &Entry, _out: &mut Vec<Violation>) {
        match &e.ev {
            Ev::Acked { name, job } => {
                self.names.insert(*job, name.clone());
            }
            Ev::Core {
                kind: EventKind::Dispatched,
                job: Some(job),
                attempt: Some(1),
                ..
            } if !self.dispatched.contains(job) => self.dispatched.push(*job),
            Ev::Final {
                name,
                state,
                attempts,
                reason,
                exit_code,
                output_tail,
                ..
            } => {
                let ended = Ended {
                    state: *state,
                    attempts: *attempts,
                    reason: reason.clone(),
                    exit_code: *exit_code,
                    output_tail: output_tail.clone(),
                };
                self.finals.insert(name.clone(), ended);
            }
            _ => {}
        }
    }
    fn finish(&mut self, end: u64, out: &mut Vec<Violation>) {
        let expect = &self.scenario.expect;
        for name in &expect.reached {
            if !self.reached.contains_key(name.as_str()) {
                out.push(violation(
                    self.name(),
                    end,
                    format!(
                        "never reached {name:?}, which this scenario exists to produce (reached: {:?})",
                        self.reached.keys().collect::<Vec<_>>()
                    ),
                ));
            }
        }
        let finals = &self.finals;
        let mut judge = |name: &String, want: String, got: Option<String>, ok: bool| {
            if !ok {
                let got = got.unwrap_or_else(|| "no end".to_string());
                out.push(violation(
                    "expectations",
                    end,
                    format!("{name}: expected {want}, got {got}"),
                ));
            }
        };
        // Each expectation as words, compared with the same words of how
        // the job ended.
        let mut same = |name: &String, want: String, show: &dyn Fn(&Ended) -> String| {
            let got = finals.get(name).map(show);
            let ok = got.as_deref() == Some(want.as_str());
            judge(name, want, got, ok);
        };
        for (name, want) in &expect.states {
            same(name, want.to_string(), &|g| g.state.to_string());
        }
        for (name, want) in &expect.attempts {
            same(name, format!("{want} attempts"), &|g| {
                format!("{} attempts", g.attempts)
            });
        }
        for (name, want) in &expect.exit_codes {
            same(name, format!("exit code {want}"), &|g| {
                g.exit_code
                    .map_or("no exit code".into(), |c| format!("exit code {c}"))
            });
        }
        for (name, want) in &expect.outputs {
            same(name, format!("output {want:?}"), &|g| {
                format!("output {:?}", g.output_tail)
            });
        }
        for (name, want) in &expect.reasons {
            let got = finals.get(name);
            let ok = got.is_some_and(|g| g.reason.contains(want.as_str()));
            let got = got.map(|g| format!("reason {:?}", g.reason));
            judge(name, format!("a reason with {want:?}"), got, ok);
        }
        let order: Vec<&String> = self
            .dispatched
            .iter()
            .filter_map(|job| self.names.get(job))
            .filter(|n| expect.dispatch_order.contains(n))
            .collect();
        if !expect.dispatch_order.is_empty()
            && order != expect.dispatch_order.iter().collect::<Vec<_>>()
        {
            out.push(violation(
                self.name(),
                end,
                format!(
                    "dispatch order {order:?}, expected {:?}",
                    expect.dispatch_order
                ),
            ));
        }
    }
}

/// The supervisor's journal replays: every segment on its own, and the
/// newest to where the supervisor ended (the jobs it ended, ended the same
/// way; the same live jobs, CPUs in use and connected agents as the core
/// last committed).
struct JournalReplays {
    on: bool,
    finals: BTreeMap<u64, JobState>,
    replayed: Option<Entry>,
}

impl Checker for JournalReplays {
    fn name(&self) -> &'static str {
        "journal"
    }
    fn observe(&mut self, e: &Entry, _out: &mut Vec<Violation>) {
        match &e.ev {
            Ev::Final { job, state, .. } => {
                self.finals.insert(*job, *state);
            }
            Ev::JournalReplayed { .. } => self.replayed = Some(e.clone()),
            _ => {}
        }
    }
    fn finish(&mut self, end: u64, out: &mut Vec<Violation>) {
        let Some(entry) = self.replayed.take() else {
            if self.on {
                out.push(violation(
                    self.name(),
                    end,
                    "the journal was never replayed".into(),
                ));
            }
            return;
        };
        let Ev::JournalReplayed {
            ended,
            replayed,
            committed,
            errors,
            ..
        } = entry.ev
        else {
            return;
        };
        let mut wrong = errors;
        for (job, state) in &ended {
            match self.finals.get(job) {
                Some(last) if last == state => {}
                last => wrong.push(format!(
                    "job {job} ends {state} in the replay, {last:?} in the run"
                )),
            }
        }
        if committed.is_some() && replayed != committed {
            wrong.push(format!(
                "the replayed core ends with {replayed:?}, the supervisor's with {committed:?} (live jobs, CPUs used, connected agents)"
            ));
        }
        for what in wrong {
            out.push(violation(self.name(), entry.at, what));
        }
    }
}

/// The slowest a message can be in the scenario: its topology's latency or
/// any latency fault's.
fn max_latency_ms(scenario: &Scenario) -> u64 {
    scenario
        .faults
        .iter()
        .filter_map(|f| f.latency_ms.map(|[_, hi]| hi))
        .chain([scenario.topology.latency_ms[1]])
        .max()
        .unwrap_or(0)
}

/// Runs every checker over a trace; returns the violations in trace order.
pub fn check(scenario: &Scenario, trace: &[Entry]) -> Vec<Violation> {
    // Who submitted what, for the fairness check: (user, kind) per job id.
    let by_name: BTreeMap<&str, (String, String)> = scenario
        .jobs
        .iter()
        .map(|j| (j.name.as_str(), (j.user.clone(), j.kind.clone())))
        .collect();
    let owner = trace
        .iter()
        .filter_map(|e| match &e.ev {
            Ev::Acked { name, job } => by_name.get(name.as_str()).map(|k| (*job, k.clone())),
            _ => None,
        })
        .collect();
    let cpus_by_name: BTreeMap<&str, u32> = scenario
        .jobs
        .iter()
        .map(|j| (j.name.as_str(), j.cpus))
        .collect();
    let max_latency_ms = max_latency_ms(scenario);
    let mut checkers: Vec<Box<dyn Checker + '_>> = vec![
        Box::new(Capacity {
            cpus: (0..scenario.topology.agents)
                .map(|a| (crate::scenario::agent_name(a), scenario.topology.cpus_of(a)))
                .collect(),
            running: BTreeMap::new(),
        }),
        Box::new(SingleRun {
            // A thawed agent past its fence kills at once; one whose fence
            // is still ahead (a short freeze) kills when it comes, within a
            // ping timeout or so, or hears the supervisor's kill.
            thaw_ms: scenario.topology.ping_timeout_ms.saturating_mul(2),
            running: BTreeMap::new(),
            frozen: BTreeSet::new(),
            thawed_at: BTreeMap::new(),
            excused: BTreeMap::new(),
        }),
        Box::new(TerminalFinal {
            ended: BTreeMap::new(),
            settled: false,
        }),
        Box::new(CancelFinal {
            // A kill on a live link arrives within the worst latency; a
            // link that dies meanwhile is noticed within a ping timeout and
            // interval, and reported (which excuses the agent).
            kill_window_ms: scenario
                .topology
                .ping_timeout_ms
                .saturating_add(scenario.topology.ping_interval_ms)
                .saturating_add(2 * max_latency_ms),
            canceled_at: BTreeMap::new(),
            stops: BTreeMap::new(),
            started: BTreeMap::new(),
            connected: BTreeSet::new(),
            gone_at: BTreeMap::new(),
            frozen: BTreeSet::new(),
            settled: false,
            states: BTreeMap::new(),
        }),
        Box::new(AckedKept {
            acked: BTreeMap::new(),
            names: BTreeMap::new(),
            finals: BTreeMap::new(),
            settled: false,
        }),
        Box::new(FairOrder {
            owner,
            cpus: trace
                .iter()
                .filter_map(|e| match &e.ev {
                    Ev::Acked { name, job } => cpus_by_name.get(name.as_str()).map(|c| (*job, *c)),
                    _ => None,
                })
                .collect(),
            agent_cpus: (0..scenario.topology.agents)
                .map(|a| (crate::scenario::agent_name(a), scenario.topology.cpus_of(a)))
                .collect(),
            connected: BTreeMap::new(),
            waiting: BTreeMap::new(),
            dispatched: BTreeSet::new(),
        }),
        Box::new(Liveness { settled: None }),
        Box::new(outcome::Outcome::new(scenario, max_latency_ms)),
        Box::new(links::ResultKept::new()),
        Box::new(links::CutNoticed::new(scenario, max_latency_ms)),
        Box::new(links::NoFlap::new(scenario, max_latency_ms)),
        Box::new(JournalReplays {
            on: scenario.topology.journal_segment_bytes > 0,
            finals: BTreeMap::new(),
            replayed: None,
        }),
        Box::new(Expectations {
            scenario,
            reached: crate::rare::reached(trace),
            finals: BTreeMap::new(),
            dispatched: Vec::new(),
            names: BTreeMap::new(),
        }),
    ];
    let mut out = Vec::new();
    for entry in trace {
        for checker in &mut checkers {
            checker.observe(entry, &mut out);
        }
    }
    let end = trace.last().map_or(0, |e| e.at);
    for checker in &mut checkers {
        checker.finish(end, &mut out);
    }
    out
}

#[cfg(test)]
mod tests;
