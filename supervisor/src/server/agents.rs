//! The agent endpoint: one task per websocket connection. It reads the
//! hello, checks the token, then turns frames into core inputs and the
//! core's messages into frames, pings on a fixed interval, and declares the
//! agent gone when nothing arrives within the ping timeout. Whatever ends
//! the connection (close, error, timeout, a frame out of protocol), the core
//! hears `AgentGone` exactly once, and nothing else is harmed.

use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::error::ProtocolError as WsProtocolError;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tracing::{info, warn, Instrument};

use crate::core::{AgentId, GoneReason, Input};
use crate::protocol::{self, FromAgent, ProtocolError, ToAgentMsg};
use crate::seam;
use crate::shell::actor::CoreHandle;
use crate::store::Store;
use crate::tls::{self, Accepted, TlsAcceptor};

use super::hub::{Hub, Outgoing};

#[derive(Clone, Debug)]
pub struct AgentEndpoint {
    pub ping_interval_ms: u64,
    pub ping_timeout_ms: u64,
    pub hello_timeout_ms: u64,
}

/// How long after sending the latest pong (or hello) that the supervisor
/// confirms it received an agent may keep running its jobs. The supervisor
/// heard that pong at the earliest when it was sent, and gives the agent's
/// jobs up `agent_grace_ms` after it loses the agent: after a ping timeout
/// (later still) or a restart of its own (which comes after the pong too).
/// A ping interval of margin covers the kill and the new attempt's dispatch.
/// A pong is confirmed up to two ping intervals (and a round trip) after it
/// leaves, so the fence needs three intervals to stay quiet on a healthy
/// link: `check_fence` refuses settings that leave it less.
pub fn fence_ms(agent_grace_ms: u64, endpoint: &AgentEndpoint) -> u64 {
    agent_grace_ms.saturating_sub(endpoint.ping_interval_ms)
}

/// `agent_grace_ms` must be at least four ping intervals (see `fence_ms`):
/// a pong is confirmed up to two intervals and a round trip after it left,
/// so a fence of three intervals stays quiet on a healthy link. (Three,
/// the old bound, left a fence of two: a healthy idle link flapped.)
pub fn check_fence(agent_grace_ms: u64, endpoint: &AgentEndpoint) -> Result<(), String> {
    if agent_grace_ms < endpoint.ping_interval_ms.saturating_mul(4) {
        return Err(format!(
            "agent_grace_ms ({agent_grace_ms}) must be at least four ping intervals ({} ms): \
             an agent out of touch kills its jobs a ping interval before the grace ends, \
             and a healthy link confirms a pong up to two intervals after it left",
            endpoint.ping_interval_ms.saturating_mul(4)
        ));
    }
    Ok(())
}

/// Who may connect as which agent: each agent id has a credential of its
/// own (`foreman agent-token add`), so a token lets its holder be that one
/// agent and no other. Looked up at each hello and again every
/// `CREDENTIAL_CHECK_MS`, so a revoked credential ends the connection that
/// uses it.
#[derive(Clone)]
pub struct Credentials {
    store: Arc<std::sync::Mutex<Store>>,
}

impl Credentials {
    pub fn new(store: Store) -> Credentials {
        Credentials {
            store: Arc::new(std::sync::Mutex::new(store)),
        }
    }

    pub fn valid(&self, agent: &str, token: &str) -> bool {
        let hash = super::auth::sha256_hex(token);
        let store = self.store.lock().expect("credentials lock");
        store
            .agent_credential_valid(agent, &hash)
            .unwrap_or_else(|e| {
                warn!(error = %e, "agent credentials cannot be read; refusing");
                false
            })
    }
}

/// How often a connected agent's credential is looked up again (at the
/// first ping after this long): a revocation ends its connection within
/// this and a ping interval.
const CREDENTIAL_CHECK_MS: u64 = 5_000;

/// Tells the hub and the core that a connection is over, when dropped.
struct Departure {
    hub: Arc<Hub>,
    core: CoreHandle,
    conn: crate::core::ConnId,
    agent: AgentId,
    /// The core was told the agent connected.
    announced: bool,
    reason: GoneReason,
}

impl Drop for Departure {
    fn drop(&mut self) {
        self.hub.close_conn(self.conn);
        if self.announced {
            self.core.input_detached(Input::AgentGone {
                conn: self.conn,
                agent: self.agent.clone(),
                reason: self.reason,
            });
        }
    }
}

/// The websocket settings of both ends. The read buffer is small because
/// tungstenite zero-fills the whole of it before every read: at its default
/// (128 KiB) that memset was the largest single cost of a simulated run, and
/// the same cost per frame in production. Larger frames are still read, in
/// several reads.
pub fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER_BYTES)
        .max_message_size(Some(protocol::FRAME_BYTES_MAX))
        .max_frame_size(Some(protocol::FRAME_BYTES_MAX))
}

const READ_BUFFER_BYTES: usize = 8 * 1024;

pub async fn serve(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    endpoint: AgentEndpoint,
    credentials: Credentials,
    fence_ms: u64,
    core: CoreHandle,
    hub: Arc<Hub>,
) {
    loop {
        let (stream, peer) = super::accept(&listener, "agent").await;
        let (endpoint, core, hub) = (endpoint.clone(), core.clone(), hub.clone());
        let credentials = credentials.clone();
        let tls = tls.clone();
        let span = tracing::info_span!("agent_conn", peer = %peer);
        tokio::spawn(
            connection(stream, tls, endpoint, credentials, fence_ms, core, hub).instrument(span),
        );
    }
}

/// Serves one agent connection, from handshake to departure (public for the
/// simulator's cancellation-point exploration).
pub async fn connection(
    stream: TcpStream,
    tls: Option<TlsAcceptor>,
    endpoint: AgentEndpoint,
    credentials: Credentials,
    fence_ms: u64,
    core: CoreHandle,
    hub: Arc<Hub>,
) {
    // The TLS handshake and the websocket upgrade share hello_timeout_ms.
    let handshake = async {
        match tls::accept(stream, tls.as_ref()).await {
            Ok(Accepted::Ready(stream)) => {
                tokio_tungstenite::accept_async_with_config(stream, Some(ws_config()))
                    .await
                    .map_err(|e| e.to_string())
            }
            Ok(Accepted::Plaintext(_)) => Err(
                "plaintext on the TLS agent endpoint: the agent must use TLS (wss://, or --tls-ca)"
                    .to_string(),
            ),
            Err(e) => Err(format!("TLS: {e}")),
        }
    };
    let ws = match tokio::time::timeout(Duration::from_millis(endpoint.hello_timeout_ms), handshake)
        .await
    {
        Ok(Ok(ws)) => ws,
        Ok(Err(e)) => {
            info!(error = %e, "websocket handshake failed");
            return;
        }
        Err(_) => {
            info!("no websocket handshake within hello_timeout_ms");
            return;
        }
    };
    let (mut sink, mut frames) = ws.split();
    let hello_wait = Duration::from_millis(endpoint.hello_timeout_ms);
    let hello = match tokio::time::timeout(hello_wait, frames.next()).await {
        Ok(Some(Ok(Message::Text(text)))) => protocol::decode_from_agent(text.as_str()),
        Ok(Some(Ok(Message::Binary(_)))) => Err(ProtocolError::Binary),
        Ok(_) => Err(ProtocolError::NoHello),
        Err(_) => {
            info!("no hello within hello_timeout_ms");
            return;
        }
    };
    let (agent, cpus, labels, attempts, token) = match hello {
        Ok(FromAgent::Hello {
            agent,
            token,
            cpus,
            labels,
            attempts,
            ..
        }) => {
            // Its characters here, before anything logs it; its length is the
            // core's to bound (agent_id_bytes_max).
            if !AgentId::is_valid(&agent, usize::MAX) {
                let shown: String = agent.chars().take(64).collect();
                warn!(agent.id = ?shown, "agent id not valid (letters, digits and . _ - : @); closing");
                let _ = sink.send(Message::Close(None)).await;
                return;
            }
            if !credentials.valid(&agent, &token) {
                warn!(agent.id = %agent, "agent presented no credential of its own; closing");
                let _ = sink.send(Message::Close(None)).await;
                return;
            }
            (AgentId::new(&agent), cpus, labels, attempts, token)
        }
        Ok(_) => {
            warn!("first message was not a hello; closing");
            let _ = sink.send(Message::Close(None)).await;
            return;
        }
        Err(e) => {
            warn!(error = %e, "bad hello; closing");
            let _ = sink.send(Message::Close(None)).await;
            return;
        }
    };
    let (conn, mut outgoing) = hub.open_conn();
    let span = tracing::info_span!("agent", agent.id = %agent, conn = conn.0);
    // However this task ends, dropped at any await included, the hub forgets
    // the connection and the core hears the agent is gone.
    let mut departure = Departure {
        hub: hub.clone(),
        core: core.clone(),
        conn,
        agent: agent.clone(),
        announced: false,
        reason: GoneReason::Closed,
    };
    async {
        let welcome = ToAgentMsg::Welcome {
            v: protocol::VERSION,
            ping_interval_ms: endpoint.ping_interval_ms,
            ping_timeout_ms: endpoint.ping_timeout_ms,
            fence_ms: Some(fence_ms),
        };
        let reason = if sink.send(Message::text(protocol::encode(&welcome))).await.is_err() {
            GoneReason::Closed
        } else if core
            .input(Input::AgentConnected { conn, agent: agent.clone(), cpus, labels, attempts })
            .await
            .is_err()
        {
            return;
        } else {
            departure.announced = true;
            info!(cpus, "agent connected");
            let mut ping = tokio::time::interval(Duration::from_millis(endpoint.ping_interval_ms));
            let mut last_heard = seam::now();
            // When the credential was last found in force.
            let mut checked = seam::now();
            // Ping numbers, and the latest one whose pong came back.
            let (mut ping_seq, mut pong_seq) = (0u64, 0u64);
            loop {
                crate::select! {
                    frame = frames.next() => {
                        last_heard = seam::now();
                        match frame {
                            Some(Ok(Message::Text(text))) => match protocol::decode_from_agent(text.as_str()) {
                                Ok(msg) => match msg.into_core() {
                                    Some(msg) => {
                                        let input = Input::AgentMessage { conn, agent: agent.clone(), msg };
                                        if core.input(input).await.is_err() {
                                            return;
                                        }
                                    }
                                    None => {
                                        warn!(error = %ProtocolError::HelloAgain, "closing");
                                        break GoneReason::ProtocolError;
                                    }
                                },
                                Err(e) => {
                                    warn!(error = %e, "frame out of protocol; closing");
                                    break GoneReason::ProtocolError;
                                }
                            },
                            Some(Ok(Message::Binary(_))) => {
                                warn!(error = %ProtocolError::Binary, "closing");
                                break GoneReason::ProtocolError;
                            }
                            Some(Ok(Message::Pong(payload))) => {
                                if let Some((seq, _)) = protocol::parse_ping_payload(&payload) {
                                    // Only a pong for a ping really sent counts.
                                    if seq <= ping_seq {
                                        pong_seq = pong_seq.max(seq);
                                    }
                                }
                            }
                            Some(Ok(Message::Ping(_) | Message::Frame(_))) => {}
                            Some(Ok(Message::Close(_))) | None => break GoneReason::Closed,
                            Some(Err(e)) => {
                                info!(error = %e, "websocket error");
                                break match e {
                                    // A peer that went away without a close
                                    // frame (a crash, a reset) closed it too.
                                    WsError::Io(_)
                                    | WsError::ConnectionClosed
                                    | WsError::AlreadyClosed
                                    | WsError::Protocol(WsProtocolError::ResetWithoutClosingHandshake) => GoneReason::Closed,
                                    _ => GoneReason::ProtocolError,
                                };
                            }
                        }
                    }
                    out = outgoing.recv() => match out {
                        Some(Outgoing::Msg(msg)) => {
                            // An agent that stops reading must not stall this task
                            // past its ping timeout.
                            let send = sink.send(Message::text(protocol::encode(&msg)));
                            match tokio::time::timeout(Duration::from_millis(endpoint.ping_timeout_ms), send).await {
                                Ok(Ok(())) => {}
                                Ok(Err(_)) => break GoneReason::Closed,
                                Err(_) => break GoneReason::PingTimeout,
                            }
                        }
                        Some(Outgoing::Close(why)) => {
                            info!(?why, "closing as the core asked");
                            break GoneReason::Closed;
                        }
                        None => break GoneReason::Closed,
                    },
                    _ = ping.tick() => {
                        if seam::now().ms_since(checked) >= CREDENTIAL_CHECK_MS {
                            checked = seam::now();
                            if !credentials.valid(agent.as_str(), &token) {
                                warn!("the agent's credential was revoked; closing");
                                break GoneReason::Revoked;
                            }
                        }
                        if seam::now().ms_since(last_heard) > endpoint.ping_timeout_ms {
                            warn!(ping_timeout_ms = endpoint.ping_timeout_ms, "nothing heard within the ping timeout");
                            break GoneReason::PingTimeout;
                        }
                        ping_seq += 1;
                        let payload = protocol::ping_payload(ping_seq, pong_seq);
                        let send = sink.send(Message::Ping(payload.into()));
                        match tokio::time::timeout(Duration::from_millis(endpoint.ping_timeout_ms), send).await {
                            Ok(Ok(())) => {}
                            Ok(Err(_)) => break GoneReason::Closed,
                            Err(_) => break GoneReason::PingTimeout,
                        }
                    }
                }
            }
        };
        hub.close_conn(conn);
        departure.reason = reason;
        let _ = tokio::time::timeout(Duration::from_millis(endpoint.hello_timeout_ms), sink.send(Message::Close(None))).await;
        info!(?reason, "agent connection ended");
    }
    .instrument(span)
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_grace_period_under_four_ping_intervals_is_refused_for_a_flapping_fence() {
        let endpoint = AgentEndpoint {
            ping_interval_ms: 500,
            ping_timeout_ms: 2_000,
            hello_timeout_ms: 5_000,
        };
        let refused = check_fence(1_999, &endpoint).expect_err("a fence of 1,499 ms");
        assert!(
            refused.contains("at least four ping intervals (2000 ms)"),
            "{refused}"
        );
        assert_eq!(check_fence(2_000, &endpoint), Ok(()));
        assert_eq!(fence_ms(2_000, &endpoint), 1_500, "three intervals");
        assert_eq!(check_fence(60_000, &endpoint), Ok(()));
    }

    /// An agent's frame over the bound is refused while it is read, never
    /// buffered whole first (the decoder's own check comes after that).
    #[tokio::test]
    async fn a_frame_over_the_bound_is_refused_while_it_is_read() {
        use tokio_tungstenite::tungstenite::error::CapacityError;
        use tokio_tungstenite::tungstenite::protocol::Role;
        use tokio_tungstenite::WebSocketStream;
        let (near, far) = tokio::io::duplex(64 * 1024);
        let mut server =
            WebSocketStream::from_raw_socket(near, Role::Server, Some(ws_config())).await;
        let unbounded = WebSocketConfig::default()
            .max_message_size(None)
            .max_frame_size(None);
        let mut client = WebSocketStream::from_raw_socket(far, Role::Client, Some(unbounded)).await;
        let sender = tokio::spawn(async move {
            let big = Message::text("x".repeat(protocol::FRAME_BYTES_MAX + 1));
            let _ = client.send(big).await;
            client
        });
        match server.next().await {
            Some(Err(WsError::Capacity(CapacityError::MessageTooLong { .. }))) => {}
            other => panic!(
                "an oversized frame was read: {:?}",
                other.map(|r| r.map(|m| m.len()))
            ),
        }
        drop(server);
        let _ = sender.await;
    }
}
