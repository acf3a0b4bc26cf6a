//! A job as the core keeps it and as the store persists it: the whole record
//! (spec, state, attempts, history) in one serializable value, so a restart
//! rebuilds exactly what was acknowledged.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::config::CoreConfig;
use super::spec::JobSpec;
use super::types::{AgentId, JobId, JobState, Kind, Millis};

/// How a process ended, as the agent saw it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Outcome {
    /// The process exited by itself with this code.
    Exited { code: i32 },
    /// A signal the agent did not send ended it.
    Signaled { signal: i32 },
    /// The agent killed it because the supervisor asked.
    Killed,
    /// The agent killed it on its own: it had been out of contact with the
    /// supervisor past its fence, and the supervisor may run it elsewhere.
    Fenced,
    /// It never started: the program could not be executed.
    SpawnFailed { error: String },
}

/// Why the supervisor asked an agent to stop an attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    Cancel,
    RunTimeout,
    DispatchTimeout,
}

impl StopReason {
    pub fn as_str(self) -> &'static str {
        match self {
            StopReason::Cancel => "cancel",
            StopReason::RunTimeout => "run timeout",
            StopReason::DispatchTimeout => "dispatch not acknowledged",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "snake_case")]
pub enum Phase {
    /// Dispatched or running; holds its CPUs.
    Active,
    /// The agent was told to kill it; still holds its CPUs until it confirms.
    Stopping { reason: StopReason, since: Millis },
    /// Over; holds nothing.
    Ended,
}

/// One dispatch of a job to an agent. Numbers start at 1; a report naming
/// another number is stale.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attempt {
    pub number: u32,
    pub agent: AgentId,
    pub cpus: u32,
    pub dispatched_at: Millis,
    pub started_at: Option<Millis>,
    pub ended_at: Option<Millis>,
    pub phase: Phase,
    pub outcome: Option<Outcome>,
    pub run_ms: Option<u64>,
}

impl Attempt {
    /// Whether it still holds CPUs on its agent, in its pool and in its user's cap.
    pub fn holds(&self) -> bool {
        !matches!(self.phase, Phase::Ended)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transition {
    pub at: Millis,
    pub state: JobState,
    pub reason: Arc<str>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    pub id: JobId,
    pub user: Arc<str>,
    pub plan: Arc<str>,
    /// The plan's priority when the job was submitted; kept so that a restart
    /// under a changed configuration does not reorder the queue.
    pub priority: u8,
    pub spec: Arc<JobSpec>,
    pub state: JobState,
    pub submitted_at: Millis,
    pub finished_at: Option<Millis>,
    pub attempts: Vec<Attempt>,
    pub history: Vec<Transition>,
    pub exit_code: Option<i32>,
    pub output_tail: String,
    /// Why the job is in its state, in words ("agent a1 lost: ping timeout").
    pub reason: Arc<str>,
}

impl Job {
    pub fn kind(&self) -> Kind {
        self.spec.kind
    }

    /// The attempt holding resources, if any: only the last attempt can.
    pub fn held(&self) -> Option<&Attempt> {
        self.attempts.last().filter(|a| a.holds())
    }

    pub fn held_mut(&mut self) -> Option<&mut Attempt> {
        self.attempts.last_mut().filter(|a| a.holds())
    }

    /// The number the next dispatch will carry.
    pub fn next_attempt_number(&self) -> u32 {
        self.attempts.len() as u32 + 1
    }

    pub fn attempts_left(&self) -> bool {
        (self.attempts.len() as u32) < self.spec.max_attempts
    }

    /// The one instant at which something happens to this job by itself, if
    /// any. Derived from the record and whether the held attempt's agent is
    /// connected, so a restored job gets its timer back. While the agent is
    /// away, neither the dispatch acknowledgement nor a stop confirmation can
    /// arrive, so only the agent's grace period decides; the job's own run
    /// limit still applies.
    pub fn deadline(&self, config: &CoreConfig, agent_connected: bool) -> Option<Millis> {
        if let Some(attempt) = self.held() {
            return match attempt.phase {
                Phase::Stopping { since, .. } => {
                    agent_connected.then(|| since.plus_ms(config.stop_timeout_ms))
                }
                Phase::Active if self.state.is_terminal() => None,
                Phase::Active => match attempt.started_at {
                    Some(started) => Some(started.plus_secs(self.spec.max_run_secs)),
                    None => agent_connected.then(|| {
                        attempt
                            .dispatched_at
                            .plus_ms(config.dispatch_ack_timeout_ms)
                    }),
                },
                Phase::Ended => None,
            };
        }
        if self.state == JobState::Queued {
            return self
                .spec
                .queue_timeout_secs
                .map(|secs| self.queued_since().plus_secs(secs));
        }
        None
    }

    /// When the job last entered the queue (submission, or a requeue).
    pub fn queued_since(&self) -> Millis {
        self.history
            .iter()
            .rev()
            .find(|t| t.state == JobState::Queued)
            .map_or(self.submitted_at, |t| t.at)
    }
}
