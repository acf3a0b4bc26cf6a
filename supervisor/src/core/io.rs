//! What goes into the core (`Input`) and what comes out (`Effect`). The shell
//! turns bytes and time into inputs and effects into bytes; nothing else
//! crosses this boundary.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::job::{Job, Outcome, StopReason};
use super::spec::{JobSpec, SubmitError, SubmitSpec};
use super::types::{AgentId, ConnId, JobId, JobState, Millis, RequestId};

/// Who is asking: a user, or an admin who may act on every job.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Requester {
    pub user: Arc<str>,
    pub admin: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "input", rename_all = "snake_case")]
pub enum Input {
    /// Fires due timers; carries nothing else.
    Tick,
    Submit {
        request: RequestId,
        user: Arc<str>,
        plan: Arc<str>,
        spec: SubmitSpec,
    },
    Cancel {
        request: RequestId,
        by: Requester,
        job: JobId,
    },
    /// An agent said hello on a new connection, with what it still runs or
    /// has finished without an acknowledgement.
    AgentConnected {
        conn: ConnId,
        agent: AgentId,
        cpus: u32,
        labels: BTreeMap<String, String>,
        attempts: Vec<AttemptReport>,
    },
    AgentMessage {
        conn: ConnId,
        agent: AgentId,
        msg: AgentMsg,
    },
    AgentGone {
        conn: ConnId,
        agent: AgentId,
        reason: GoneReason,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GoneReason {
    Closed,
    PingTimeout,
    ProtocolError,
    /// The core closed it: a kill was not confirmed within `stop_timeout_ms`.
    Unresponsive,
    /// Its credential was revoked while it was connected.
    Revoked,
}

impl GoneReason {
    pub fn as_str(self) -> &'static str {
        match self {
            GoneReason::Closed => "connection closed",
            GoneReason::PingTimeout => "ping timeout",
            GoneReason::ProtocolError => "protocol error",
            GoneReason::Unresponsive => "kill not confirmed in time",
            GoneReason::Revoked => "credential revoked",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum AgentMsg {
    Started {
        job: JobId,
        attempt: u32,
    },
    Finished {
        job: JobId,
        attempt: u32,
        outcome: Outcome,
        output_tail: String,
        run_ms: u64,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttemptReport {
    pub job: JobId,
    pub attempt: u32,
    /// `None` while the process still runs.
    pub finished: Option<FinishedReport>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FinishedReport {
    pub outcome: Outcome,
    pub output_tail: String,
    pub run_ms: u64,
}

/// What the supervisor tells an agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ToAgent {
    Run {
        job: JobId,
        attempt: u32,
        spec: Arc<JobSpec>,
    },
    /// Kill the attempt's process group and report it finished.
    Kill {
        job: JobId,
        attempt: u32,
        reason: KillReason,
    },
    /// The result of this attempt is durable: drop it from the outbox.
    Ack { job: JobId, attempt: u32 },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KillReason {
    Stop(StopReason),
    /// The supervisor does not own this attempt (stale, or unknown job).
    NotOwned,
}

/// A job as one step of the core left it: its record, and where it stands.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobAt {
    pub record: Arc<Job>,
    pub situation: Option<String>,
    pub queue_position: Option<usize>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum Reply {
    /// `existing` is true when an idempotency key matched an earlier job.
    /// `at` is the job as the step that answered left it (none for an
    /// earlier job no longer in the core): the reply leaves once that step
    /// is durable, so it is a durable state, and the answer needs no second
    /// trip to the core.
    Submitted {
        job: JobId,
        existing: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        at: Option<Box<JobAt>>,
    },
    Rejected {
        error: SubmitError,
    },
    /// The job's state after the cancel (canceling, canceled, or a terminal
    /// state it had already reached: cancel is idempotent).
    Cancel {
        job: JobId,
        state: JobState,
    },
    CancelRejected {
        job: JobId,
        error: CancelError,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CancelError {
    /// Unknown to the core, or another user's (which must not be told apart).
    #[error("no such live job")]
    NotFound,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "effect", rename_all = "snake_case")]
pub enum Effect {
    /// Upsert this job's record. All persists of one `handle` call belong to
    /// one transaction, committed before any reply or message after them.
    Persist {
        job: Arc<Job>,
    },
    Send {
        agent: AgentId,
        conn: ConnId,
        msg: ToAgent,
    },
    Close {
        agent: AgentId,
        conn: ConnId,
        reason: CloseReason,
    },
    Reply {
        request: RequestId,
        reply: Reply,
    },
    Event(Event),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CloseReason {
    /// A newer connection with the same agent id took over.
    Replaced,
    /// The agent did not confirm a kill within the stop timeout.
    Unresponsive,
    /// The hello was out of bounds (cpus, id, too many agents).
    Refused,
}

/// Every state change, with the ids that let one grep follow one job.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub at: Millis,
    pub job: Option<JobId>,
    pub attempt: Option<u32>,
    pub agent: Option<AgentId>,
    pub kind: EventKind,
    pub reason: Arc<str>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    Submitted,
    Rejected,
    Dispatched,
    Started,
    Finished,
    StopRequested,
    AttemptReleased,
    Requeued,
    /// A queued job stepped out of line: no connected agent is large enough.
    SetAside,
    Ended,
    CancelRequested,
    StaleReport,
    AgentConnected,
    AgentReplaced,
    AgentRefused,
    AgentDisconnected,
    AgentLost,
    AgentClosed,
}

impl EventKind {
    pub const ALL: [EventKind; 18] = [
        EventKind::Submitted,
        EventKind::Rejected,
        EventKind::Dispatched,
        EventKind::Started,
        EventKind::Finished,
        EventKind::StopRequested,
        EventKind::AttemptReleased,
        EventKind::Requeued,
        EventKind::SetAside,
        EventKind::Ended,
        EventKind::CancelRequested,
        EventKind::StaleReport,
        EventKind::AgentConnected,
        EventKind::AgentReplaced,
        EventKind::AgentRefused,
        EventKind::AgentDisconnected,
        EventKind::AgentLost,
        EventKind::AgentClosed,
    ];
}
