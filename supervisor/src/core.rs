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
mod spec;
mod timers;
mod types;

#[cfg(test)]
mod model_tests;
#[cfg(test)]
mod testkit;
#[cfg(test)]
mod tests;

pub use agents::{Agent, Link};
pub use config::{CoreConfig, KindLimits, Plan, SubmitLimits};
pub use io::{
    AgentMsg, AttemptReport, CancelError, CloseReason, Effect, Event, EventKind, FinishedReport,
    GoneReason, Input, KillReason, Reply, Requester, ToAgent,
};
pub use job::{Attempt, Job, Outcome, Phase, StopReason, Transition};
pub use machine::{Core, RestoreError};
pub use spec::{JobSpec, SubmitError, SubmitSpec};
pub use types::{AgentId, ConnId, JobId, JobState, Kind, Millis, RequestId};
