//! The scheduler's brain as a sans-IO state machine (the quinn-proto pattern).
//!
//! It owns jobs, the fair queues, CPU pools, agents and timers as data, and
//! changes them only in `Core::handle(now, input)`, which returns effects.
//! It must never read a clock, await, do IO, spawn, or draw randomness: the
//! same inputs give the same effects, byte for byte, in the server, in the
//! simulator and in a replay of a production journal.

mod agents;
mod config;
mod invariants;
mod io;
mod job;
mod machine;
mod queue;
mod snapshot;
mod spec;
mod timers;
mod types;

#[cfg(test)]
mod model_tests;
#[cfg(test)]
mod testkit;
#[cfg(test)]
pub(crate) mod testkit_public {
    //! Records for tests of other modules (the store).
    use std::sync::Arc;

    use super::*;

    pub fn sample_job(id: u64, user: &str, state: JobState) -> Job {
        let spec = spec::validate(
            &CoreConfig::default(),
            "basic",
            &CoreConfig::default().plans["basic"],
            SubmitSpec::command(["echo", "hi"]),
        )
        .expect("valid");
        Job {
            id: JobId(id),
            user: Arc::from(user),
            plan: Arc::from("basic"),
            priority: 0,
            spec: Arc::new(spec),
            state,
            submitted_at: Millis(1_000),
            finished_at: state.is_terminal().then_some(Millis(2_000)),
            attempts: Vec::new(),
            history: vec![Transition {
                at: Millis(1_000),
                state,
                reason: Arc::from("test"),
            }],
            exit_code: None,
            output_tail: String::new(),
            reason: Arc::from("test"),
        }
    }
}
#[cfg(test)]
mod tests;

pub use agents::{Agent, Link};
pub use config::{CoreConfig, KindLimits, Plan, SubmitLimits};
pub use io::{
    AgentMsg, AttemptReport, CancelError, CloseReason, Effect, Event, EventKind, FinishedReport,
    GoneReason, Input, JobAt, KillReason, Reply, Requester, ToAgent,
};
pub use job::{Attempt, Job, Outcome, Phase, StopReason, Transition};
pub use machine::{Core, RestoreError};
pub use snapshot::{AgentRecord, IdempotencyRecord, LevelRecord, Snapshot};
pub use spec::{tail, JobSpec, SubmitError, SubmitSpec};
pub use types::{AgentId, ConnId, JobId, JobState, Kind, Millis, RequestId};
