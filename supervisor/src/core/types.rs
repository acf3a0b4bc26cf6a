//! The core's vocabulary: identifiers, time, kinds and job states.
//! Plain data; no behaviour beyond naming and ordering.

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// Milliseconds since the Unix epoch, as handed to the core by its caller.
/// The core never reads a clock: every input comes with its `now`.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Millis(pub u64);

impl Millis {
    pub fn plus_ms(self, ms: u64) -> Millis {
        Millis(self.0.saturating_add(ms))
    }
    pub fn plus_secs(self, secs: u64) -> Millis {
        self.plus_ms(secs.saturating_mul(1000))
    }
    pub fn ms_since(self, earlier: Millis) -> u64 {
        self.0.saturating_sub(earlier.0)
    }
}

/// A job's number, assigned by the core from a counter; never reused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct JobId(pub u64);

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A user as the scheduler counts them: a dense number the core interns from
/// the user's name, so queues and caps compare integers, not strings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct UserKey(pub u32);

impl UserKey {
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

/// An agent's name, chosen by the agent (or its driver) and stable across reconnects.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct AgentId(pub Arc<str>);

impl AgentId {
    pub fn new(name: &str) -> AgentId {
        AgentId(Arc::from(name))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `id` may name an agent: 1 to `max` bytes of ASCII letters,
    /// digits and `. _ - : @`, so that it can reach a log, a path or a
    /// terminal as it is.
    pub fn is_valid(id: &str, max: usize) -> bool {
        !id.is_empty()
            && id.len() <= max
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-:@".contains(&b))
    }
}

impl fmt::Display for AgentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One websocket connection of an agent. A reconnect gets a new one, so a late
/// "closed" from an old connection can never harm the new one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ConnId(pub u64);

/// The caller's handle for a request whose reply comes back as an effect.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RequestId(pub u64);

/// Which CPU pool a job draws from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Sequential,
    Parallel,
}

impl Kind {
    pub const ALL: [Kind; 2] = [Kind::Sequential, Kind::Parallel];

    pub fn parse(name: &str) -> Option<Kind> {
        match name {
            "sequential" => Some(Kind::Sequential),
            "parallel" => Some(Kind::Parallel),
            _ => None,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Sequential => "sequential",
            Kind::Parallel => "parallel",
        }
    }
    pub fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a user sees of a job. `Canceling` is the only non-terminal state after
/// a cancel; the five terminal states never change.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Queued,
    Dispatched,
    Running,
    Canceling,
    Succeeded,
    Failed,
    Canceled,
    TimedOut,
    Lost,
}

impl JobState {
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobState::Succeeded
                | JobState::Failed
                | JobState::Canceled
                | JobState::TimedOut
                | JobState::Lost
        )
    }
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Dispatched => "dispatched",
            JobState::Running => "running",
            JobState::Canceling => "canceling",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Canceled => "canceled",
            JobState::TimedOut => "timed_out",
            JobState::Lost => "lost",
        }
    }
    pub const ALL: [JobState; 9] = [
        JobState::Queued,
        JobState::Dispatched,
        JobState::Running,
        JobState::Canceling,
        JobState::Succeeded,
        JobState::Failed,
        JobState::Canceled,
        JobState::TimedOut,
        JobState::Lost,
    ];

    pub fn parse(name: &str) -> Option<JobState> {
        JobState::ALL.into_iter().find(|s| s.as_str() == name)
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
