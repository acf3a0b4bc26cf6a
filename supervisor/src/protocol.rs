//! The agent protocol, version 1: JSON text frames over a websocket, one
//! message per frame. `supervisor/PROTOCOL.md` is the prose description;
//! this module is the definition. Decoding never panics: anything that is
//! not a well-formed message of this version is a `ProtocolError`, and the
//! connection that sent it is closed.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::core::{AgentMsg, AttemptReport, JobId, JobSpec, KillReason, Outcome, ToAgent};

pub const VERSION: u32 = 1;

/// The largest frame either side accepts (a run carries argv and env, which
/// the core bounds well below this).
pub const FRAME_BYTES_MAX: usize = 1024 * 1024;

/// Agent → supervisor.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum FromAgent {
    /// The first message on every connection.
    Hello {
        v: u32,
        agent: String,
        token: String,
        cpus: u32,
        #[serde(default)]
        labels: BTreeMap<String, String>,
        /// Attempts still running, and finished ones not yet acknowledged.
        #[serde(default)]
        attempts: Vec<AttemptReport>,
    },
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

/// Supervisor → agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ToAgentMsg {
    /// The answer to a hello that was accepted.
    Welcome {
        v: u32,
        ping_interval_ms: u64,
        ping_timeout_ms: u64,
        /// The agent kills its runs once this long has passed since it sent
        /// the latest pong (or hello) the supervisor confirms it heard: by
        /// then the supervisor may have given them up. Absent: the agent
        /// never fences.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        fence_ms: Option<u64>,
    },
    Run {
        job: JobId,
        attempt: u32,
        spec: Arc<JobSpec>,
    },
    Kill {
        job: JobId,
        attempt: u32,
        reason: KillReason,
    },
    Ack {
        job: JobId,
        attempt: u32,
    },
}

impl From<ToAgent> for ToAgentMsg {
    fn from(msg: ToAgent) -> ToAgentMsg {
        match msg {
            ToAgent::Run { job, attempt, spec } => ToAgentMsg::Run { job, attempt, spec },
            ToAgent::Kill {
                job,
                attempt,
                reason,
            } => ToAgentMsg::Kill {
                job,
                attempt,
                reason,
            },
            ToAgent::Ack { job, attempt } => ToAgentMsg::Ack { job, attempt },
        }
    }
}

impl FromAgent {
    /// The core's view of a message after the hello; `None` for a hello.
    pub fn into_core(self) -> Option<AgentMsg> {
        match self {
            FromAgent::Hello { .. } => None,
            FromAgent::Started { job, attempt } => Some(AgentMsg::Started { job, attempt }),
            FromAgent::Finished {
                job,
                attempt,
                outcome,
                output_tail,
                run_ms,
            } => Some(AgentMsg::Finished {
                job,
                attempt,
                outcome,
                output_tail,
                run_ms,
            }),
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtocolError {
    #[error("frame of {bytes} bytes is over the limit of {max}")]
    TooLarge { bytes: usize, max: usize },
    #[error("not a message of protocol v{VERSION}: {0}")]
    Malformed(String),
    #[error("protocol version {0} is not supported (this side speaks v{VERSION})")]
    Version(u32),
    #[error("expected a hello first")]
    NoHello,
    #[error("a second hello on one connection")]
    HelloAgain,
    #[error("binary frames are not part of the protocol")]
    Binary,
}

fn check_size(text: &str) -> Result<(), ProtocolError> {
    if text.len() > FRAME_BYTES_MAX {
        return Err(ProtocolError::TooLarge {
            bytes: text.len(),
            max: FRAME_BYTES_MAX,
        });
    }
    Ok(())
}

/// Decodes one frame: size, JSON, then the version of a first message.
fn decode<T: serde::de::DeserializeOwned>(
    text: &str,
    version: impl Fn(&T) -> Option<u32>,
) -> Result<T, ProtocolError> {
    check_size(text)?;
    let msg: T = serde_json::from_str(text).map_err(|e| ProtocolError::Malformed(e.to_string()))?;
    match version(&msg) {
        Some(v) if v != VERSION => Err(ProtocolError::Version(v)),
        _ => Ok(msg),
    }
}

pub fn decode_from_agent(text: &str) -> Result<FromAgent, ProtocolError> {
    decode(text, |msg| match msg {
        FromAgent::Hello { v, .. } => Some(*v),
        _ => None,
    })
}

pub fn decode_to_agent(text: &str) -> Result<ToAgentMsg, ProtocolError> {
    decode(text, |msg| match msg {
        ToAgentMsg::Welcome { v, .. } => Some(*v),
        _ => None,
    })
}

pub fn encode<T: Serialize>(msg: &T) -> String {
    serde_json::to_string(msg).expect("protocol messages serialize")
}

/// The payload of the supervisor's websocket pings: its ping number and the
/// number of the latest ping whose pong it has received (0: none yet), each
/// a big-endian u64. The agent's websocket layer echoes it in the pong. An
/// agent learns from it which of its pongs, sent when, the supervisor has
/// heard: the base of its fence.
pub fn ping_payload(seq: u64, acked: u64) -> Vec<u8> {
    let mut payload = Vec::with_capacity(16);
    payload.extend_from_slice(&seq.to_be_bytes());
    payload.extend_from_slice(&acked.to_be_bytes());
    payload
}

/// (ping number, latest acknowledged) from a ping or pong payload; `None`
/// for any other payload (an empty ping from another implementation).
pub fn parse_ping_payload(payload: &[u8]) -> Option<(u64, u64)> {
    let seq = u64::from_be_bytes(payload.get(0..8)?.try_into().ok()?);
    let acked = u64::from_be_bytes(payload.get(8..16)?.try_into().ok()?);
    (payload.len() == 16).then_some((seq, acked))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ping_payloads_round_trip_and_anything_else_is_no_ping_of_ours() {
        assert_eq!(parse_ping_payload(&ping_payload(7, 6)), Some((7, 6)));
        assert_eq!(
            parse_ping_payload(&ping_payload(u64::MAX, 0)),
            Some((u64::MAX, 0))
        );
        for bad in [&[][..], &[1; 8], &[1; 15], &[1; 17], &[0xff; 125]] {
            assert_eq!(parse_ping_payload(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn protocol_messages_round_trip() {
        let hello = FromAgent::Hello {
            v: 1,
            agent: "a1".into(),
            token: "t".into(),
            cpus: 4,
            labels: BTreeMap::new(),
            attempts: vec![AttemptReport {
                job: JobId(3),
                attempt: 1,
                finished: None,
            }],
        };
        assert_eq!(decode_from_agent(&encode(&hello)), Ok(hello));
        let finished = FromAgent::Finished {
            job: JobId(3),
            attempt: 1,
            outcome: Outcome::Exited { code: 2 },
            output_tail: "x".into(),
            run_ms: 5,
        };
        let text = encode(&finished);
        assert_eq!(
            text,
            r#"{"type":"finished","job":3,"attempt":1,"outcome":{"type":"exited","code":2},"output_tail":"x","run_ms":5}"#
        );
        assert_eq!(decode_from_agent(&text), Ok(finished));
        let kill = ToAgentMsg::Kill {
            job: JobId(1),
            attempt: 2,
            reason: KillReason::NotOwned,
        };
        assert_eq!(
            encode(&kill),
            r#"{"type":"kill","job":1,"attempt":2,"reason":"not_owned"}"#
        );
        assert_eq!(decode_to_agent(&encode(&kill)), Ok(kill));
    }

    #[test]
    fn protocol_malformed_and_hostile_frames_are_errors_not_panics() {
        let cases = [
            "",
            "null",
            "[]",
            "{",
            r#"{"type":"nope"}"#,
            r#"{"type":"started"}"#,
            r#"{"type":"started","job":-1,"attempt":1}"#,
            r#"{"type":"started","job":1,"attempt":1,"extra":true}"#,
            r#"{"type":"finished","job":1,"attempt":1,"outcome":{"type":"exploded"},"output_tail":"","run_ms":0}"#,
            r#"{"type":"hello","v":1}"#,
            "\u{0}\u{1}garbage",
        ];
        for text in cases {
            assert!(
                matches!(decode_from_agent(text), Err(ProtocolError::Malformed(_))),
                "{text:?} should be malformed"
            );
        }
        let future = r#"{"type":"hello","v":2,"agent":"a","token":"t","cpus":1}"#;
        assert_eq!(decode_from_agent(future), Err(ProtocolError::Version(2)));
        let huge = format!(
            r#"{{"type":"started","job":1,"attempt":1,"pad":"{}"}}"#,
            "x".repeat(FRAME_BYTES_MAX)
        );
        assert!(matches!(
            decode_from_agent(&huge),
            Err(ProtocolError::TooLarge { .. })
        ));
        let deep = "[".repeat(100_000);
        assert!(
            decode_from_agent(&deep).is_err(),
            "deep nesting is refused, not a stack overflow"
        );
    }
}
