//! The outcome oracle: every job ends the way the job model says it may,
//! given what its program does and which faults actually touched it.
//!
//! It is written from the job model (README, PROTOCOL.md), not from the
//! core: it never asks the core what it would decide. For each job it reads
//! the scenario's plan of the job (exit code, hang, crash, duration, run
//! limit, attempts allowed) and the world's facts from the trace (which
//! agents its attempts went to, which of those agents were cut off, killed,
//! frozen or restarted while it was live, whether the supervisor went down
//! meanwhile, whether a client asked for its cancel), derives the end states
//! and reasons those facts permit, and fails the run when the job's final
//! state, attempt count, exit code, output or reason falls outside them.
//!
//! The rules:
//! - a job's program decides its end unless something else intervened: it
//!   exits 0 → `succeeded`; exits non-zero or crashes → `failed`; hangs, or
//!   runs past its `max_run_secs` → `timed_out`;
//! - `canceled` only where a client asked for the cancel;
//! - `failed` only where the program itself failed: a kill nobody asked for
//!   ("killed on request" with no cancel and no timeout) is never a failure
//!   of the job;
//! - `lost` only where an attempt's agent was cut off, killed, frozen or
//!   restarted while the job was live (a supervisor outage alone is
//!   survived, where the grace period leaves the agents time to come back),
//!   only once no attempt is left (an attempt lost while others remain is
//!   run again), and its reason names the agent;
//! - `timed_out` besides the program's own also where a fault delayed its
//!   run and it had a run limit;
//! - a job nothing touched ends exactly as its program says, in one attempt;
//! - never more attempts than allowed;
//! - a job that ended by its program's exit carries that exit code and
//!   the tail of what it printed: its last N bytes from the first whole
//!   character, N the smaller of the agent's and the supervisor's bounds.

use std::collections::{BTreeMap, BTreeSet};

use foreman::core::{EventKind, JobState};

use super::links::Links;
use super::{violation, Checker, Violation};
use crate::scenario::{Action, JobPlan, Scenario};
use crate::trace::{Entry, Ev};

pub(super) struct Outcome<'a> {
    plans: BTreeMap<&'a str, &'a JobPlan>,
    ping_interval_ms: u64,
    ping_timeout_ms: u64,
    /// The output tail's bound: the agent's or the supervisor's, whichever
    /// is smaller.
    tail_bytes: usize,
    /// How long after its latest confirmed pong an agent fences: the grace
    /// period less one ping interval and its kill grace (PROTOCOL.md).
    fence_ms: u64,
    /// How far a run's end, as the supervisor sees it, may be from its
    /// program's duration without any fault (messages in flight).
    run_slack_ms: u64,
    /// Agents each job's attempts went to.
    agents_of: BTreeMap<u64, BTreeSet<String>>,
    /// Jobs dispatched and not yet ended.
    live: BTreeSet<u64>,
    /// What the faults have done to each agent's link and host.
    links: Links,
    /// When a fault last touched each agent: its effects outlast it (the
    /// agent's fence counts from its last confirmed pong, before the fault).
    last_fault: BTreeMap<String, u64>,
    /// Since when the network has been slow enough to cost connections.
    slow_since: Option<u64>,
    /// A slow spell's effects outlast it: a connection made during it is
    /// fenced from its hello (sent slowly) up to a fence later.
    slow_after: Option<(u64, u64)>,
    /// What touched each job, in words.
    touched: BTreeMap<u64, Vec<String>>,
    /// Jobs touched by more than supervisor outages: a link or host fault.
    cut_off: BTreeSet<u64>,
    /// Whether a supervisor outage alone can never cost a running job: its
    /// agent is back (within its longest reconnect wait) well inside the
    /// grace period the restarted supervisor gives it.
    outages_survivable: bool,
    canceled: BTreeMap<u64, u64>,
    settled: bool,
}

impl<'a> Outcome<'a> {
    pub(super) fn new(scenario: &'a Scenario, max_latency_ms: u64) -> Outcome<'a> {
        let topology = &scenario.topology;
        Outcome {
            plans: scenario.jobs.iter().map(|j| (j.name.as_str(), j)).collect(),
            ping_interval_ms: topology.ping_interval_ms.max(1),
            ping_timeout_ms: topology.ping_timeout_ms,
            tail_bytes: topology
                .output_tail_bytes
                .min(scenario.core.output_tail_bytes_max),
            fence_ms: {
                let fence = scenario
                    .core
                    .agent_grace_ms
                    .saturating_sub(topology.ping_interval_ms);
                let kill_grace = scenario.kill_grace_ms();
                let room = fence.saturating_sub(3 * topology.ping_interval_ms);
                fence - kill_grace.min(room)
            },
            run_slack_ms: 4 * max_latency_ms + topology.ping_interval_ms,
            agents_of: BTreeMap::new(),
            live: BTreeSet::new(),
            links: Links::default(),
            last_fault: BTreeMap::new(),
            slow_since: None,
            slow_after: None,
            touched: BTreeMap::new(),
            cut_off: BTreeSet::new(),
            outages_survivable: scenario.core.agent_grace_ms
                > topology.reconnect_max_ms + 2 * topology.ping_timeout_ms + 4 * max_latency_ms,
            canceled: BTreeMap::new(),
            settled: false,
        }
    }

    /// Whether a one-way delay of `hi` ms may cost an agent its connection:
    /// the supervisor hears nothing within its ping timeout, or the agent
    /// sees no pong confirmed within its fence. A pong is confirmed by the
    /// first ping sent after it arrived, so a confirmation is at most one
    /// interval plus the intervals a round trip spans, plus the last leg,
    /// behind the pong it confirms.
    fn costs_connections(&self, hi: u64) -> bool {
        let interval = self.ping_interval_ms;
        let lag = interval * (1 + (2 * hi).div_ceil(interval)) + hi;
        2 * hi + interval >= self.ping_timeout_ms || lag >= self.fence_ms
    }

    /// Notes `what` on every live job that has had an attempt on `agent`
    /// (on every live job, for `None`).
    fn touch(&mut self, agent: Option<&str>, what: String) {
        self.touch_by(agent, what, false);
    }

    /// `touch`, by a supervisor outage (`outage`) or by anything else.
    fn touch_by(&mut self, agent: Option<&str>, what: String, outage: bool) {
        for job in &self.live {
            let hit = match agent {
                None => true,
                Some(agent) => self
                    .agents_of
                    .get(job)
                    .is_some_and(|agents| agents.contains(agent)),
            };
            if hit {
                self.touched.entry(*job).or_default().push(what.clone());
                if !outage {
                    self.cut_off.insert(*job);
                }
            }
        }
    }

    fn judge(&self, at: u64, job: u64, plan: &JobPlan, fin: Final<'_>, out: &mut Vec<Violation>) {
        let touched = self.touched.get(&job).map(Vec::as_slice).unwrap_or(&[]);
        let disturbed = !touched.is_empty();
        let cancel = self.canceled.get(&job).copied();
        let limit_ms = plan.max_run_secs.map(|s| s.saturating_mul(1_000));
        // What the program alone decides.
        let mut natural = BTreeSet::new();
        if plan.hang {
            if limit_ms.is_some() {
                natural.insert(JobState::TimedOut);
            }
        } else {
            let own = if plan.crash || plan.exit_code != 0 {
                JobState::Failed
            } else {
                JobState::Succeeded
            };
            match limit_ms {
                Some(limit) if plan.duration_ms > limit.saturating_add(self.run_slack_ms) => {
                    natural.insert(JobState::TimedOut);
                }
                Some(limit) if plan.duration_ms.saturating_add(self.run_slack_ms) >= limit => {
                    natural.insert(JobState::TimedOut);
                    natural.insert(own);
                }
                _ => {
                    natural.insert(own);
                }
            }
        }
        let mut allowed = natural.clone();
        if cancel.is_some() {
            allowed.insert(JobState::Canceled);
        }
        // An outage alone is survived: the job's last attempt runs on, one
        // the agent fenced is run again.
        let cut_off = self.cut_off.contains(&job) || !self.outages_survivable;
        if disturbed && cut_off {
            allowed.insert(JobState::Lost);
        }
        if disturbed && limit_ms.is_some() {
            allowed.insert(JobState::TimedOut);
        }
        let mut wrong = Vec::new();
        if !allowed.contains(&fin.state) {
            wrong.push(format!("ended {}", fin.state));
        }
        if fin.attempts > plan.max_attempts as usize {
            wrong.push(format!(
                "made {} attempts, {} allowed",
                fin.attempts, plan.max_attempts
            ));
        }
        if !disturbed && cancel.is_none() && fin.attempts > 1 {
            wrong.push(format!(
                "made {} attempts though nothing touched it",
                fin.attempts
            ));
        }
        match fin.state {
            JobState::Lost if fin.attempts < plan.max_attempts as usize => wrong.push(format!(
                "lost after {} of {} attempts: an attempt lost while others remain is run again",
                fin.attempts, plan.max_attempts
            )),
            JobState::Lost if !fin.reason.contains("agent") => {
                wrong.push("lost, and its reason names no agent".to_string())
            }
            JobState::Failed if fin.reason.contains("on request") => {
                wrong.push("failed by a kill nobody asked for".to_string())
            }
            _ => {}
        }
        let by_exit = matches!(fin.state, JobState::Succeeded | JobState::Failed) && !plan.crash;
        if by_exit && fin.exit_code != Some(plan.exit_code) {
            wrong.push(format!(
                "exit code {:?}, its program exits {}",
                fin.exit_code, plan.exit_code
            ));
        }
        let printed = output_tail(&plan.output, self.tail_bytes);
        if by_exit && fin.output_tail != printed {
            wrong.push(format!(
                "output {:?}, its program prints {:?}, whose last {} bytes are {printed:?}",
                fin.output_tail, plan.output, self.tail_bytes
            ));
        }
        if wrong.is_empty() {
            return;
        }
        let mut facts = vec![describe(plan)];
        if let Some(at) = cancel {
            facts.push(format!("cancel asked at {at} ms"));
        }
        if let Some(agents) = self.agents_of.get(&job) {
            facts.push(format!(
                "ran on {}",
                agents.iter().cloned().collect::<Vec<_>>().join(", ")
            ));
        }
        facts.extend(touched.iter().cloned());
        if disturbed && !cut_off {
            facts.push(
                "only supervisor outages touched it, and a running job survives those".into(),
            );
        }
        if !disturbed {
            facts.push("no fault touched it".to_string());
        }
        let allowed: Vec<String> = allowed.iter().map(|s| s.to_string()).collect();
        out.push(violation(
            "outcome",
            at,
            format!(
                "job {job} ({}): {} (after {} attempts: {:?}); allowed: {{{}}}; facts: {}",
                plan.name,
                wrong.join("; "),
                fin.attempts,
                fin.reason,
                allowed.join(", "),
                facts.join("; ")
            ),
        ));
    }
}

/// A job's end as the API lists it.
struct Final<'e> {
    state: JobState,
    attempts: usize,
    reason: &'e str,
    exit_code: Option<i32>,
    output_tail: &'e str,
}

fn describe(plan: &JobPlan) -> String {
    let mut s = if plan.hang {
        "program hangs".to_string()
    } else if plan.crash {
        format!("program crashes after {} ms", plan.duration_ms)
    } else {
        format!(
            "program exits {} after {} ms",
            plan.exit_code, plan.duration_ms
        )
    };
    if let Some(secs) = plan.max_run_secs {
        s.push_str(&format!(", max_run_secs {secs}"));
    }
    s.push_str(&format!(", {} attempts allowed", plan.max_attempts));
    s
}

impl Checker for Outcome<'_> {
    fn name(&self) -> &'static str {
        "outcome"
    }

    fn observe(&mut self, e: &Entry, out: &mut Vec<Violation>) {
        match &e.ev {
            Ev::Core {
                kind: EventKind::Dispatched,
                job: Some(job),
                agent: Some(agent),
                ..
            } => {
                self.agents_of
                    .entry(*job)
                    .or_default()
                    .insert(agent.clone());
                self.live.insert(*job);
                let touched_before = self.touched.get(job).map_or(0, Vec::len);
                if self.links.cut(agent) {
                    self.touched.entry(*job).or_default().push(format!(
                        "dispatched to {agent} at {} ms while it was cut off",
                        e.at
                    ));
                }
                if let Some(&last) = self
                    .last_fault
                    .get(agent)
                    .filter(|t| e.at <= **t + self.fence_ms + self.ping_timeout_ms)
                {
                    self.touched.entry(*job).or_default().push(format!(
                        "dispatched to {agent} at {} ms, soon after a fault on it at {last} ms",
                        e.at
                    ));
                }
                if let Some(since) = self.slow_since {
                    self.touched.entry(*job).or_default().push(format!(
                        "dispatched at {} ms on a network slow since {since} ms",
                        e.at
                    ));
                }
                if let Some((from, to)) = self.slow_after.filter(|(_, to)| e.at <= *to) {
                    self.touched.entry(*job).or_default().push(format!(
                        "dispatched at {} ms, soon after a slow network ({from} ms to {to} ms)",
                        e.at
                    ));
                }
                if self.touched.get(job).map_or(0, Vec::len) > touched_before {
                    self.cut_off.insert(*job);
                }
            }
            Ev::ProcessStarted { job, agent, .. } => {
                self.agents_of
                    .entry(*job)
                    .or_default()
                    .insert(agent.clone());
            }
            Ev::Core {
                kind: EventKind::Ended,
                job: Some(job),
                ..
            } => {
                self.live.remove(job);
            }
            Ev::Fault {
                action: Some(action),
                agents,
                latency_ms,
                ..
            } => {
                for agent in agents {
                    self.touch(Some(agent), format!("{action:?} {agent} at {} ms", e.at));
                    self.links.apply(*action, agent);
                    self.last_fault.insert(agent.clone(), e.at);
                }
                if *action == Action::Latency {
                    let slow = latency_ms.is_some_and(|[_, hi]| self.costs_connections(hi));
                    if slow {
                        self.touch(None, format!("latency {latency_ms:?} ms from {} ms", e.at));
                        self.slow_since.get_or_insert(e.at);
                    } else if let Some(since) = self.slow_since.take() {
                        // Back to fast: what was slow until now was touched.
                        self.touch(None, format!("slow network from {since} to {} ms", e.at));
                        let lasts = self.fence_ms.max(self.ping_timeout_ms);
                        self.slow_after = Some((since, e.at + lasts));
                    }
                }
            }
            Ev::SupervisorDown => {
                self.touch_by(None, format!("supervisor down at {} ms", e.at), true);
            }
            Ev::CancelIssued { job, .. } => {
                self.canceled.entry(*job).or_insert(e.at);
            }
            Ev::Settled { ok, .. } => self.settled = *ok,
            Ev::Final {
                job,
                name,
                state,
                attempts,
                reason,
                exit_code,
                output_tail,
            } if self.settled && state.is_terminal() => {
                let Some(plan) = self.plans.get(name.as_str()) else {
                    return;
                };
                let fin = Final {
                    state: *state,
                    attempts: *attempts,
                    reason,
                    exit_code: *exit_code,
                    output_tail,
                };
                self.judge(e.at, *job, plan, fin, out);
            }
            _ => {}
        }
    }
}

/// What the job model says a job's output tail is: the last `max` bytes of
/// what it printed, from the first byte that begins a character (a UTF-8
/// continuation byte is `10xxxxxx`).
pub(super) fn output_tail(printed: &str, max: usize) -> &str {
    let bytes = printed.as_bytes();
    let mut start = bytes.len().saturating_sub(max);
    while bytes.get(start).is_some_and(|b| b & 0xC0 == 0x80) {
        start += 1;
    }
    &printed[start..]
}
