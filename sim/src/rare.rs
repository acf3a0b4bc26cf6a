//! Rare events: the moments a race or fault scenario exists to produce,
//! named and counted from a run's trace. A scenario that never reached what
//! it is about passes for nothing, so each named scenario lists the events
//! it must reach (`expect.reached`), and every fuzz campaign says how often
//! each was reached and which never were.
//!
//! Each event is read from the trace alone (the core's committed events,
//! the processes, the clients), never from the supervisor's insides.

use std::collections::{BTreeMap, BTreeSet};

use foreman::core::EventKind;

use crate::scenario::Action;
use crate::trace::{Entry, Ev, ProcessEnd};

/// Every rare event, with what it means.
pub const ALL: [(&str, &str); 23] = [
    (
        "cancel-while-queued",
        "a cancel reached the core while the job waited for a slot",
    ),
    (
        "cancel-while-dispatched",
        "a cancel reached the core after the dispatch, before the start",
    ),
    (
        "cancel-while-running",
        "a cancel reached the core while the job ran",
    ),
    (
        "cancel-while-agent-away",
        "a cancel reached the core while the job's agent was disconnected",
    ),
    (
        "connection-replaced",
        "a new connection with an agent's id replaced its old one",
    ),
    (
        "fence-kill",
        "an agent killed a process on its own, at its fence (no stop or stale kill asked)",
    ),
    (
        "ping-timeout",
        "the supervisor declared an agent gone: nothing heard within the ping timeout",
    ),
    (
        "reconnected-within-grace",
        "an agent came back within its grace period and kept the attempts it ran",
    ),
    (
        "run-timeout-kill",
        "a job ran past its max_run_secs and its process was told to stop",
    ),
    (
        "stale-report",
        "a report about an attempt the core does not own was rejected",
    ),
    (
        "stale-process-killed",
        "a process the core does not own was killed after its agent reported it",
    ),
    (
        "reply-lost-after-commit",
        "a submission was committed, its reply lost, and its retry resolved by its key",
    ),
    (
        "submit-abandoned",
        "a client gave up on a submission it never saw acknowledged",
    ),
    (
        "requeue-after-grace",
        "an attempt was given up after its agent's grace period and the job requeued",
    ),
    (
        "lost-after-grace",
        "a job's last attempt was given up after its agent's grace period",
    ),
    (
        "kill-confirmed-after-reconnect",
        "a kill asked before an agent's disconnect was confirmed after its return",
    ),
    (
        "process-outlived-supervisor",
        "a process ran through a supervisor outage to its own end",
    ),
    (
        "lost-while-process-ran",
        "a job ended lost while its process still ran (cut off, not dead)",
    ),
    (
        "supervisor-restarted-with-live-jobs",
        "the supervisor went down while jobs held attempts",
    ),
    (
        "passed-a-job-set-aside",
        "a job was dispatched while an older one waited aside, larger than every connected agent",
    ),
    (
        "ran-after-set-aside",
        "a job set aside (larger than every connected agent) was dispatched once one fit it",
    ),
    (
        "result-kept-across-restart",
        "a result kept on disk by an agent that then crashed was heard from its restarted agent",
    ),
    (
        "decided-during-a-commit",
        "the core decided inputs while the batch before them was being committed (pipelined commit)",
    ),
];

pub fn is_known(name: &str) -> bool {
    ALL.iter().any(|(n, _)| *n == name)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    Queued,
    Dispatched,
    Running,
    Ended,
}

/// How many times each rare event happened in `trace` (events that never
/// happened are absent).
pub fn reached(trace: &[Entry]) -> BTreeMap<&'static str, usize> {
    let mut seen: BTreeMap<&'static str, usize> = BTreeMap::new();
    let mut hit = |name: &'static str| {
        debug_assert!(is_known(name), "{name} is not a rare event");
        *seen.entry(name).or_default() += 1;
    };
    let mut phase: BTreeMap<u64, Phase> = BTreeMap::new();
    let mut agent_of: BTreeMap<u64, String> = BTreeMap::new();
    let mut away: BTreeSet<String> = BTreeSet::new();
    // Kills asked on a connection since lost: (job, attempt) → agent.
    let mut stops: BTreeMap<(u64, u32), (String, bool)> = BTreeMap::new();
    let mut stale_running: BTreeSet<(u64, u32, String)> = BTreeSet::new();
    // Processes running, and how they stand to supervisor outages: 0 none
    // since they started, 1 one under way, 2 one over.
    let mut running: BTreeMap<(u64, u32, String), u8> = BTreeMap::new();
    let mut supervisor_down = false;
    let mut submitted_at: BTreeMap<u64, usize> = BTreeMap::new();
    let mut failed_submits: BTreeMap<String, usize> = BTreeMap::new();
    let mut ended_while_running: BTreeSet<u64> = BTreeSet::new();
    // The phase a job was in before it ended: a cancel that ends a job at
    // once is announced after its end.
    let mut before_end: BTreeMap<u64, Phase> = BTreeMap::new();
    // Processes the core asked to stop: a kill of any other is the agent's own.
    let mut asked: BTreeSet<(u64, u32, String)> = BTreeSet::new();
    // An agent back with attempts the core still holds on it: kept, unless
    // the same step gives them up.
    let mut kept_on: Option<String> = None;
    // Jobs set aside and not dispatched since.
    let mut aside: BTreeSet<u64> = BTreeSet::new();
    // Results kept on disk, not yet heard: (job, attempt, agent) → whether
    // the agent has restarted since.
    let mut kept: BTreeMap<(u64, u32, String), bool> = BTreeMap::new();
    for (i, e) in trace.iter().enumerate() {
        // The reconnect's own step is over when an entry of another kind,
        // or of another instant, comes: were its attempts kept?
        if let Some(agent) = kept_on.take() {
            let step_goes_on = matches!(&e.ev, Ev::Core { kind, .. }
                if *kind != EventKind::AgentConnected && e.at == trace[i - 1].at);
            let gave_up = matches!(&e.ev, Ev::Core { kind: EventKind::AttemptReleased, agent: Some(a), reason, .. }
                if *a == agent && reason.contains("came back without"));
            if gave_up {
                // Not kept: the agent came back without them.
            } else if step_goes_on {
                kept_on = Some(agent);
            } else {
                hit("reconnected-within-grace");
            }
        }
        match &e.ev {
            Ev::Core {
                kind,
                job,
                attempt,
                agent,
                reason,
            } => {
                if std::mem::take(&mut supervisor_down) {
                    // The supervisor is back.
                    for outage in running.values_mut().filter(|o| **o == 1) {
                        *outage = 2;
                    }
                }
                match (kind, job) {
                    (EventKind::Submitted, Some(job)) => {
                        phase.insert(*job, Phase::Queued);
                        submitted_at.insert(*job, i);
                    }
                    (EventKind::Requeued, Some(job)) => {
                        phase.insert(*job, Phase::Queued);
                        if reason.contains(" lost: ") {
                            hit("requeue-after-grace");
                        }
                    }
                    (EventKind::SetAside, Some(job)) => {
                        aside.insert(*job);
                    }
                    (EventKind::Dispatched, Some(job)) => {
                        if aside.remove(job) {
                            hit("ran-after-set-aside");
                        }
                        if !aside.is_empty() {
                            hit("passed-a-job-set-aside");
                        }
                        phase.insert(*job, Phase::Dispatched);
                        if let Some(agent) = agent {
                            agent_of.insert(*job, agent.clone());
                        }
                    }
                    (EventKind::Started, Some(job)) => {
                        phase.insert(*job, Phase::Running);
                    }
                    (EventKind::Ended, Some(job)) => {
                        aside.remove(job);
                        if let Some(before) = phase.insert(*job, Phase::Ended) {
                            before_end.insert(*job, before);
                        }
                        if reason.contains(" lost: ") {
                            hit("lost-after-grace");
                            if running.keys().any(|(j, _, _)| j == job) {
                                ended_while_running.insert(*job);
                            }
                        }
                    }
                    (EventKind::CancelRequested, Some(job)) => {
                        let now = match phase.get(job) {
                            Some(Phase::Ended) => before_end.get(job),
                            now => now,
                        };
                        match now {
                            Some(Phase::Queued) => hit("cancel-while-queued"),
                            Some(Phase::Dispatched) => hit("cancel-while-dispatched"),
                            Some(Phase::Running) => hit("cancel-while-running"),
                            _ => {}
                        }
                        let holds = matches!(now, Some(Phase::Dispatched | Phase::Running));
                        if holds && agent_of.get(job).is_some_and(|a| away.contains(a)) {
                            hit("cancel-while-agent-away");
                        }
                    }
                    (EventKind::AgentReplaced, _) => hit("connection-replaced"),
                    (EventKind::StaleReport, Some(job)) => {
                        hit("stale-report");
                        if let (Some(attempt), Some(agent)) = (attempt, agent) {
                            if !reason.starts_with("finished") {
                                stale_running.insert((*job, *attempt, agent.clone()));
                            }
                        }
                    }
                    (EventKind::AttemptReleased, Some(job)) => {
                        if let Some(attempt) = attempt {
                            if let Some((_, true)) = stops.remove(&(*job, *attempt)) {
                                hit("kill-confirmed-after-reconnect");
                            }
                        }
                    }
                    (EventKind::StopRequested, Some(job)) => {
                        if reason.starts_with("run timeout") {
                            hit("run-timeout-kill");
                        }
                        if let (Some(attempt), Some(agent)) = (attempt, agent) {
                            stops.insert((*job, *attempt), (agent.clone(), false));
                            asked.insert((*job, *attempt, agent.clone()));
                        }
                    }
                    (EventKind::AgentDisconnected | EventKind::AgentLost, _) => {
                        if reason.as_str() == "ping timeout" {
                            hit("ping-timeout");
                        }
                        if let Some(agent) = agent {
                            away.insert(agent.clone());
                        }
                    }
                    (EventKind::AgentConnected, _) => {
                        if let Some(agent) = agent {
                            let holds = |j: &u64| {
                                agent_of.get(j) == Some(agent)
                                    && matches!(
                                        phase.get(j),
                                        Some(Phase::Dispatched | Phase::Running)
                                    )
                            };
                            if away.contains(agent) && phase.keys().any(holds) {
                                kept_on = Some(agent.clone());
                            }
                            if away.remove(agent) {
                                for (a, returned) in stops.values_mut() {
                                    if a == agent {
                                        *returned = true;
                                    }
                                }
                            }
                        }
                    }
                    _ => {}
                }
            }
            Ev::ProcessStarted {
                job,
                attempt,
                agent,
                ..
            } => {
                running.insert((*job, *attempt, agent.clone()), 0);
            }
            Ev::ProcessEnded {
                job,
                attempt,
                agent,
                end,
            } => {
                let key = (*job, *attempt, agent.clone());
                let outage = running.remove(&key).unwrap_or(0);
                if outage == 2 && *end == ProcessEnd::Exited {
                    hit("process-outlived-supervisor");
                }
                if *end == ProcessEnd::Killed {
                    let stale = stale_running.remove(&key);
                    if stale {
                        hit("stale-process-killed");
                    }
                    if !stale && !asked.remove(&key) {
                        hit("fence-kill");
                    }
                }
                if ended_while_running.remove(job) {
                    hit("lost-while-process-ran");
                }
            }
            Ev::SupervisorDown => {
                if phase
                    .values()
                    .any(|p| matches!(p, Phase::Dispatched | Phase::Running))
                {
                    hit("supervisor-restarted-with-live-jobs");
                }
                supervisor_down = true;
                for outage in running.values_mut() {
                    *outage = (*outage).max(1);
                }
                for agent in agent_of.values() {
                    away.insert(agent.clone());
                }
            }
            Ev::SubmitFailed { name, .. } => {
                failed_submits.entry(name.clone()).or_insert(i);
            }
            Ev::Acked { name, job } => {
                // Committed before a try that failed: that try's reply was lost.
                if let (Some(&failed), Some(&committed)) =
                    (failed_submits.get(name), submitted_at.get(job))
                {
                    if committed < failed {
                        hit("reply-lost-after-commit");
                    }
                }
            }
            Ev::SubmitAbandoned { .. } => hit("submit-abandoned"),
            Ev::ResultKept {
                job,
                attempt,
                agent,
            } => {
                kept.insert((*job, *attempt, agent.clone()), false);
            }
            Ev::Fault {
                action: Some(Action::RestartAgent),
                agents,
                ..
            } => {
                for ((_, _, agent), restarted) in kept.iter_mut() {
                    *restarted |= agents.contains(agent);
                }
            }
            Ev::Pipelined { .. } => hit("decided-during-a-commit"),
            _ => {}
        }
        if let Ev::Core {
            kind: EventKind::Finished | EventKind::StaleReport,
            job: Some(job),
            attempt: Some(attempt),
            agent: Some(agent),
            ..
        } = &e.ev
        {
            if kept.remove(&(*job, *attempt, agent.clone())) == Some(true) {
                hit("result-kept-across-restart");
            }
        }
    }
    seen
}
