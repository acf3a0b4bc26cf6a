//! Checkers of agents' links and results, from the trace alone:
//!
//! - `result-kept`: a result a process produced reaches the supervisor. A
//!   process that ended by itself while its agent lived on (not killed,
//!   restarted or rebooted after) is reported: the core records it as
//!   finished, or, if it had given the attempt up meanwhile, rejects it as
//!   stale. Never silence.
//! - `cut-noticed`: an agent cut off (partitioned, frozen, its pongs
//!   dropped) for longer than the ping timeout allows is declared gone.
//! - `no-flap`: no connection drops without a fault near it: an agent
//!   disconnects only when a fault touched it (or the supervisor, or the
//!   network) within the time it takes to notice and recover.

use std::collections::{BTreeMap, BTreeSet};

use foreman::core::EventKind;

use super::{violation, Checker, Violation};
use crate::scenario::{Action, Scenario};
use crate::trace::{Entry, Ev, ProcessEnd};

/// What the fault plan has done to each agent's link and host, as the
/// world applies it: `partition` clogs both directions and `heal` clears
/// both; `drop_pings` clogs the agent-to-supervisor one and `restore_pings`
/// clears that one; a pause freezes the host; a kill stops it.
#[derive(Default)]
pub(super) struct Links {
    to_supervisor_clogged: BTreeSet<String>,
    from_supervisor_clogged: BTreeSet<String>,
    paused: BTreeSet<String>,
    dead: BTreeSet<String>,
}

impl Links {
    pub(super) fn apply(&mut self, action: Action, agent: &str) {
        let a = agent.to_string();
        match action {
            Action::Partition => {
                self.to_supervisor_clogged.insert(a.clone());
                self.from_supervisor_clogged.insert(a);
            }
            Action::Heal => {
                self.to_supervisor_clogged.remove(&a);
                self.from_supervisor_clogged.remove(&a);
            }
            Action::DropPings => {
                self.to_supervisor_clogged.insert(a);
            }
            Action::RestorePings => {
                self.to_supervisor_clogged.remove(&a);
            }
            Action::PauseAgent => {
                self.paused.insert(a);
            }
            Action::ResumeAgent => {
                self.paused.remove(&a);
            }
            Action::KillAgent => {
                self.paused.remove(&a);
                self.dead.insert(a);
            }
            // A new boot: neither frozen nor dead (a reboot also comes back
            // on a new node, whose links nothing clogs).
            Action::RestartAgent => {
                self.paused.remove(&a);
                self.dead.remove(&a);
            }
            Action::RebootAgent => {
                self.paused.remove(&a);
                self.dead.remove(&a);
                self.to_supervisor_clogged.remove(&a);
                self.from_supervisor_clogged.remove(&a);
            }
            _ => {}
        }
    }

    /// The supervisor hears nothing from it (its host may be alive).
    pub(super) fn silent(&self, agent: &str) -> bool {
        self.to_supervisor_clogged.contains(agent) || self.paused.contains(agent)
    }

    /// Anything at all stands between it and the supervisor.
    pub(super) fn cut(&self, agent: &str) -> bool {
        self.silent(agent)
            || self.from_supervisor_clogged.contains(agent)
            || self.dead.contains(agent)
    }
}

pub(super) struct ResultKept {
    /// Results produced and not yet heard of or kept on disk:
    /// (job, attempt, agent) → when.
    produced: BTreeMap<(u64, u32, String), u64>,
    /// Results kept on their host's disk, not yet heard of.
    kept: BTreeMap<(u64, u32, String), u64>,
    /// Kept on the disk of a host that is down (killed, not yet restarted).
    dormant: BTreeMap<(u64, u32, String), u64>,
    settled: bool,
}

impl ResultKept {
    pub(super) fn new() -> ResultKept {
        ResultKept {
            produced: BTreeMap::new(),
            kept: BTreeMap::new(),
            dormant: BTreeMap::new(),
            settled: false,
        }
    }
}

impl Checker for ResultKept {
    fn name(&self) -> &'static str {
        "result-kept"
    }

    fn observe(&mut self, e: &Entry, _out: &mut Vec<Violation>) {
        match &e.ev {
            Ev::ProcessEnded {
                job,
                attempt,
                agent,
                end: ProcessEnd::Exited | ProcessEnd::Crashed,
            } => {
                self.produced.insert((*job, *attempt, agent.clone()), e.at);
            }
            Ev::ResultKept {
                job,
                attempt,
                agent,
            } => {
                let key = (*job, *attempt, agent.clone());
                if let Some(at) = self.produced.remove(&key) {
                    self.kept.insert(key, at);
                }
            }
            Ev::Core {
                kind: EventKind::Finished | EventKind::StaleReport,
                job: Some(job),
                attempt: Some(attempt),
                agent: Some(agent),
                ..
            } => {
                let key = (*job, *attempt, agent.clone());
                self.produced.remove(&key);
                self.kept.remove(&key);
                self.dormant.remove(&key);
            }
            // What was only in memory died with the agent; what it kept on
            // disk waits for the host to come back (a restart), or is gone
            // with it (a reboot onto a new node).
            Ev::Fault {
                action:
                    Some(action @ (Action::KillAgent | Action::RestartAgent | Action::RebootAgent)),
                agents,
                ..
            } => {
                let on = |key: &(u64, u32, String)| agents.contains(&key.2);
                self.produced.retain(|key, _| !on(key));
                let (down, up): (BTreeMap<_, _>, BTreeMap<_, _>) = std::mem::take(&mut self.kept)
                    .into_iter()
                    .partition(|(k, _)| on(k));
                self.kept = up;
                self.dormant.extend(down);
                match action {
                    Action::RestartAgent => {
                        let (back, still): (BTreeMap<_, _>, BTreeMap<_, _>) =
                            std::mem::take(&mut self.dormant)
                                .into_iter()
                                .partition(|(k, _)| on(k));
                        self.dormant = still;
                        self.kept.extend(back);
                    }
                    Action::RebootAgent => self.dormant.retain(|key, _| !on(key)),
                    _ => {}
                }
            }
            Ev::Settled { ok, .. } => self.settled = *ok,
            _ => {}
        }
    }

    fn finish(&mut self, end: u64, out: &mut Vec<Violation>) {
        if !self.settled {
            return;
        }
        for ((job, attempt, agent), at) in &self.produced {
            out.push(violation(
                self.name(),
                end,
                format!(
                    "job {job} attempt {attempt} ended on {agent} at {at} ms and the supervisor never heard of its result"
                ),
            ));
        }
        for ((job, attempt, agent), at) in &self.kept {
            out.push(violation(
                self.name(),
                end,
                format!(
                    "job {job} attempt {attempt} ended on {agent} at {at} ms, its result was kept on disk, and the supervisor never heard of it"
                ),
            ));
        }
    }
}

pub(super) struct CutNoticed {
    /// Longest a cut may last unnoticed: the ping timeout, a ping interval
    /// and two trips at the worst latency.
    notice_ms: u64,
    links: Links,
    connected: BTreeSet<String>,
    /// Agents the supervisor hears nothing from: since when, and whether it
    /// has declared them gone since.
    silent: BTreeMap<String, (u64, bool)>,
    supervisor_up: bool,
}

impl CutNoticed {
    pub(super) fn new(scenario: &Scenario, max_latency_ms: u64) -> CutNoticed {
        let topology = &scenario.topology;
        CutNoticed {
            notice_ms: topology.ping_timeout_ms + topology.ping_interval_ms + 2 * max_latency_ms,
            links: Links::default(),
            connected: BTreeSet::new(),
            silent: BTreeMap::new(),
            supervisor_up: true,
        }
    }

    fn judge(&self, agent: &str, since: u64, noticed: bool, now: u64, out: &mut Vec<Violation>) {
        let lasted = now - since;
        if !noticed && lasted > self.notice_ms {
            out.push(violation(
                "cut-noticed",
                now,
                format!(
                    "{agent} was silent to the supervisor for {lasted} ms from {since} ms and never declared gone (the ping timeout and its slack allow {} ms)",
                    self.notice_ms
                ),
            ));
        }
    }
}

impl Checker for CutNoticed {
    fn name(&self) -> &'static str {
        "cut-noticed"
    }

    fn observe(&mut self, e: &Entry, out: &mut Vec<Violation>) {
        match &e.ev {
            Ev::Core {
                kind: EventKind::AgentConnected,
                agent: Some(agent),
                ..
            } => {
                self.supervisor_up = true;
                self.connected.insert(agent.clone());
            }
            Ev::Core {
                kind: EventKind::AgentDisconnected | EventKind::AgentLost | EventKind::AgentReplaced,
                agent: Some(agent),
                ..
            } => {
                self.connected.remove(agent);
                if let Some((_, noticed)) = self.silent.get_mut(agent) {
                    *noticed = true;
                }
            }
            Ev::Core { .. } => self.supervisor_up = true,
            Ev::SupervisorDown => {
                // A supervisor that is down notices nothing: judge no
                // silence that spans its outage.
                self.supervisor_up = false;
                self.connected.clear();
                self.silent.clear();
            }
            Ev::Fault {
                action: Some(action),
                agents,
                ..
            } => {
                for agent in agents {
                    let was = self.links.silent(agent);
                    self.links.apply(*action, agent);
                    let is = self.links.silent(agent);
                    let restarted = matches!(
                        action,
                        Action::KillAgent | Action::RestartAgent | Action::RebootAgent
                    );
                    if restarted {
                        // Another story now: its connection closes or is replaced.
                        self.silent.remove(agent);
                        continue;
                    }
                    if !was && is && self.supervisor_up && self.connected.contains(agent) {
                        self.silent.insert(agent.clone(), (e.at, false));
                    } else if was && !is {
                        if let Some((since, noticed)) = self.silent.remove(agent) {
                            self.judge(agent, since, noticed, e.at, out);
                        }
                    }
                }
            }
            _ => {}
        }
    }

    fn finish(&mut self, end: u64, out: &mut Vec<Violation>) {
        for (agent, (since, noticed)) in &self.silent {
            self.judge(agent, *since, *noticed, end, out);
        }
    }
}

pub(super) struct NoFlap {
    /// How long after a fault its effects may still drop a connection: the
    /// grace period (the fence comes within it), a ping timeout, the longest
    /// reconnect wait, and trips at the worst latency.
    window_ms: u64,
    /// When each agent was last touched by a fault, or the world was.
    touched: BTreeMap<String, u64>,
    everyone_touched: Option<u64>,
    /// Faults under way: agents cut, the network slow.
    links: Links,
    slow: bool,
    latency_cuts_ms: u64,
}

impl NoFlap {
    pub(super) fn new(scenario: &Scenario, max_latency_ms: u64) -> NoFlap {
        let topology = &scenario.topology;
        NoFlap {
            window_ms: scenario.core.agent_grace_ms
                + topology.ping_timeout_ms
                + topology.reconnect_max_ms
                + 4 * max_latency_ms,
            touched: BTreeMap::new(),
            everyone_touched: None,
            links: Links::default(),
            slow: false,
            // A latency past a few percent of the ping interval can make
            // confirmations late: count it as a fault of the network.
            latency_cuts_ms: topology.ping_interval_ms / 10,
        }
    }
}

impl Checker for NoFlap {
    fn name(&self) -> &'static str {
        "no-flap"
    }

    fn observe(&mut self, e: &Entry, out: &mut Vec<Violation>) {
        match &e.ev {
            Ev::Fault {
                action: Some(action),
                agents,
                latency_ms,
                ..
            } => {
                for agent in agents {
                    self.touched.insert(agent.clone(), e.at);
                    self.links.apply(*action, agent);
                }
                if *action == Action::Latency {
                    self.everyone_touched = Some(e.at);
                    self.slow = latency_ms.is_some_and(|[_, hi]| hi > self.latency_cuts_ms);
                }
                if matches!(action, Action::CrashSupervisor | Action::RestartSupervisor) {
                    self.everyone_touched = Some(e.at);
                }
            }
            Ev::SupervisorDown => self.everyone_touched = Some(e.at),
            Ev::Core {
                kind: EventKind::AgentDisconnected,
                agent: Some(agent),
                reason,
                ..
            } => {
                let recent = |at: Option<&u64>| at.is_some_and(|at| e.at <= at + self.window_ms);
                let excused = self.slow
                    || self.links.cut(agent)
                    || recent(self.touched.get(agent))
                    || recent(self.everyone_touched.as_ref());
                if !excused {
                    out.push(violation(
                        self.name(),
                        e.at,
                        format!(
                            "{agent} disconnected ({reason}) with no fault near it (none within {} ms)",
                            self.window_ms
                        ),
                    ));
                }
            }
            _ => {}
        }
    }
}
