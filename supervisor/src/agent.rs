//! The agent: the other end of the supervisor's websocket. It says hello
//! with what it still runs and what it finished without an acknowledgement,
//! runs what it is told through a `Runner`, kills what it is told to kill,
//! and keeps every result in an outbox until the supervisor acknowledges it,
//! so no completion is lost across a reconnect, nor (kept on disk by its
//! runner) across the agent's own crash. Reconnects back off
//! exponentially with jitter, within bounds.

pub mod outbox;
pub mod retention;
pub mod runner;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::Message;
use tracing::{info, warn, Instrument};

use crate::core::{AttemptReport, FinishedReport, JobId, Millis, Outcome};
use crate::protocol::{self, FromAgent, ToAgentMsg};

pub use runner::{ProcessRunner, RunControl, RunOrder, Runner};

#[derive(Clone, Debug)]
pub struct AgentOptions {
    /// The supervisor's agent endpoint, `host:port`.
    pub supervisor: String,
    /// TLS to it (whom to trust, the name to verify); none: plaintext.
    pub tls: Option<crate::tls::ClientTls>,
    pub token: String,
    pub agent_id: String,
    pub cpus: u32,
    pub labels: BTreeMap<String, String>,
    /// Where run dirs are made: `<work_dir>/<job>-<attempt>`.
    pub work_dir: PathBuf,
    pub reconnect_min_ms: u64,
    pub reconnect_max_ms: u64,
    /// Give up after this many failed connects in a row (`None`: never).
    pub reconnect_attempts_max: Option<u32>,
    /// Leave (return from `run`) once the supervisor has been out of reach
    /// this long with nothing running here (`None`: never). A supervisor
    /// stopped for good then leaves no agent reconnecting forever; one
    /// restarted sooner finds its agents, and agents with runs stay for them.
    pub leave_alone_ms: Option<u64>,
}

type Key = (JobId, u32);

/// What a run task tells the agent.
enum RunEvent {
    Started(Key),
    Finished(Key, FinishedReport),
}

struct Running {
    kill: Option<oneshot::Sender<()>>,
    started: bool,
    /// The job allows another attempt after this one: the supervisor may
    /// run it elsewhere once it gives this agent up, so the fence kills it.
    retryable: bool,
    /// Killed at the fence: reported `fenced`, not `killed`.
    fenced: bool,
}

pub struct Agent {
    options: AgentOptions,
    runner: Arc<dyn Runner>,
    running: BTreeMap<Key, Running>,
    /// Results not yet acknowledged, re-sent in every hello.
    outbox: BTreeMap<Key, FinishedReport>,
    events_tx: mpsc::UnboundedSender<RunEvent>,
    events: mpsc::UnboundedReceiver<RunEvent>,
    /// From the latest welcome: how long runs may outlive a lost connection.
    fence_ms: Option<u64>,
    /// From the latest welcome: how often the supervisor pings.
    ping_interval_ms: u64,
    /// When the agent sent the latest hello or pong that the supervisor
    /// confirms it received: a pong by a later ping's acknowledgement, a
    /// hello by the first message of the core on that connection (a welcome
    /// alone is not enough: the core may still refuse the agent). Receipt
    /// times of frames prove nothing: a frozen host, thawed, reads frames
    /// that waited in its buffers for as long as it was frozen.
    confirmed_at: Option<Millis>,
    /// The runs were killed at the fence since the latest confirmation.
    fenced: bool,
    /// When this connection's recent pings arrived (their pongs left then).
    pings: BTreeMap<u64, Millis>,
}

/// Pings remembered per connection (a pong is confirmed within a few).
const PINGS_KEPT: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("gave up after {0} failed connects in a row")]
    GaveUp(u32),
}

enum Ended {
    /// The connection was lost or refused; try again.
    Lost(String),
}

impl Agent {
    /// An agent; results an earlier agent kept and never had acknowledged
    /// (`Runner::kept_results`) start in its outbox.
    pub fn new(options: AgentOptions, runner: Arc<dyn Runner>) -> Agent {
        let (events_tx, events) = mpsc::unbounded_channel();
        let outbox: BTreeMap<Key, FinishedReport> = runner
            .kept_results()
            .into_iter()
            .map(|(job, attempt, report)| ((job, attempt), report))
            .collect();
        if !outbox.is_empty() {
            info!(
                results = outbox.len(),
                "results kept by an earlier agent, not yet acknowledged"
            );
        }
        Agent {
            options,
            runner,
            running: BTreeMap::new(),
            outbox,
            events_tx,
            events,
            fence_ms: None,
            ping_interval_ms: 0,
            confirmed_at: None,
            fenced: false,
            pings: BTreeMap::new(),
        }
    }

    /// When the runs must be killed, if the connection is lost.
    fn fence_due(&self) -> Option<Millis> {
        if self.fenced {
            return None;
        }
        // Early enough for a killed process to be dead by the fence, but
        // never within three ping intervals of the confirmation: a pong is
        // confirmed up to two intervals after it left, and a fence closer
        // than that would fire on a healthy link. A grace period too short
        // for the runner's kill grace loses that much of it (a process that
        // ignores SIGTERM may then overlap its successor by the rest).
        let kill_grace = self.runner.kill_grace_ms();
        self.confirmed_at.zip(self.fence_ms).map(|(since, fence)| {
            let room = fence.saturating_sub(3 * self.ping_interval_ms);
            since.plus_ms(fence - kill_grace.min(room))
        })
    }

    fn past_fence(&self, now: Millis) -> bool {
        self.fence_due().is_some_and(|due| now >= due)
    }

    /// The supervisor heard what the agent sent at `sent`.
    fn confirm(&mut self, sent: Millis) {
        if self.confirmed_at.is_none_or(|c| c < sent) {
            self.confirmed_at = Some(sent);
            self.fenced = false;
        }
    }

    /// The supervisor may have given up this agent's runs by now (or is
    /// about to): kill those it may run elsewhere (their job allows another
    /// attempt), so that none runs beside its replacement. A job's last
    /// attempt runs on: no other attempt of it can start, and a supervisor
    /// that was only down (a restart, an upgrade) finds it still running.
    /// Their results go to the outbox, as `fenced`. Returns how many it killed.
    fn fence(&mut self) -> usize {
        let mut killed = 0;
        for run in self.running.values_mut().filter(|r| r.retryable) {
            if let Some(kill) = run.kill.take() {
                let _ = kill.send(());
                run.fenced = true;
                killed += 1;
            }
        }
        warn!(
            fence_ms = self.fence_ms,
            killed, "supervisor out of reach past the fence; killing the runs it has given up"
        );
        self.fenced = true;
        killed
    }

    /// A ping arrived at `now`: note when (its pong leaves then) and what it
    /// confirms.
    fn pinged(&mut self, payload: &[u8], now: Millis) {
        let Some((seq, acked)) = protocol::parse_ping_payload(payload) else {
            return;
        };
        self.pings.insert(seq, now);
        while self.pings.len() > PINGS_KEPT {
            self.pings.pop_first();
        }
        if let Some(&sent) = self.pings.get(&acked) {
            self.confirm(sent);
        }
    }

    /// Connects, serves, reconnects; returns only when it gives up.
    pub async fn run(mut self) -> Result<(), AgentError> {
        let span = tracing::info_span!("agent", agent.id = %self.options.agent_id);
        async move {
            let mut failures: u32 = 0;
            // Since when the supervisor has been out of reach.
            let mut alone_since: Option<Millis> = None;
            loop {
                let began = crate::seam::now();
                match self.session().await {
                    Ok(Ended::Lost(why)) => {
                        info!(%why, "connection lost; reconnecting");
                        let now = crate::seam::now();
                        let steady = now.ms_since(began) >= SESSION_STEADY_MS;
                        failures = if steady { 1 } else { failures + 1 };
                        alone_since = Some(now);
                    }
                    Err(why) => {
                        failures += 1;
                        info!(%why, failures, "could not connect");
                        if let Some(max) = self.options.reconnect_attempts_max {
                            if failures >= max {
                                return Err(AgentError::GaveUp(failures));
                            }
                        }
                        let alone = *alone_since.get_or_insert(began);
                        if let Some(leave) = self.options.leave_alone_ms {
                            let away = crate::seam::now().ms_since(alone);
                            if away >= leave && self.running.is_empty() {
                                info!(away_ms = away, "no supervisor and nothing to run; leaving");
                                return Ok(());
                            }
                        }
                    }
                }
                let wait = backoff_ms(&self.options, failures);
                // Results keep arriving while we wait: they go to the outbox.
                let sleep = tokio::time::sleep(Duration::from_millis(wait));
                tokio::pin!(sleep);
                loop {
                    let fence = self.fence_due();
                    crate::select! {
                        () = &mut sleep => break,
                        Some(event) = self.events.recv() => {
                            self.absorb(event);
                        }
                        () = crate::seam::sleep_until(fence.unwrap_or_default()), if fence.is_some() => {
                            self.fence();
                        }
                    }
                }
            }
        }
        .instrument(span)
        .await
    }

    fn absorb(&mut self, event: RunEvent) -> Option<FromAgent> {
        match event {
            RunEvent::Started(key) => {
                let running = self.running.get_mut(&key)?;
                running.started = true;
                Some(FromAgent::Started {
                    job: key.0,
                    attempt: key.1,
                })
            }
            RunEvent::Finished(key, mut report) => {
                let fenced = self.running.remove(&key).is_some_and(|r| r.fenced);
                if fenced && report.outcome == Outcome::Killed {
                    report.outcome = Outcome::Fenced;
                }
                self.runner.keep_result(key.0, key.1, &report);
                self.outbox.insert(key, report.clone());
                Some(finished_msg(key, report))
            }
        }
    }

    /// The hello names every attempt the agent still has, running or
    /// finished and unacknowledged, by key only (so its size is bounded by
    /// the attempt count, not by their output); finished results follow as
    /// `finished` frames once welcomed.
    fn hello(&self) -> FromAgent {
        let attempts = self
            .running
            .keys()
            .chain(self.outbox.keys())
            .map(|(job, attempt)| AttemptReport {
                job: *job,
                attempt: *attempt,
                finished: None,
            })
            .collect();
        FromAgent::Hello {
            v: protocol::VERSION,
            agent: self.options.agent_id.clone(),
            token: self.options.token.clone(),
            cpus: self.options.cpus,
            labels: self.options.labels.clone(),
            attempts,
        }
    }

    /// One connection, from connect to loss. `Err` if it never got welcomed.
    async fn session(&mut self) -> Result<Ended, String> {
        let connect = connect(
            self.options.supervisor.clone(),
            self.options.tls.clone(),
            self.hello(),
        );
        let (mut sink, mut frames, welcome, hello_at) = match self.fence_due() {
            Some(due) => crate::select! {
                connected = connect => connected?,
                () = crate::seam::sleep_until(due) => {
                    self.fence();
                    return Err("still connecting at the fence".into());
                }
            },
            None => connect.await?,
        };
        let Welcome {
            ping_interval_ms,
            ping_timeout_ms: silence_ms,
            fence_ms,
        } = welcome;
        self.fence_ms = fence_ms;
        self.ping_interval_ms = ping_interval_ms;
        self.pings.clear();
        info!("connected");
        let bound = Duration::from_millis(silence_ms);
        // Results finished while away go now, one frame each.
        for (key, report) in self.outbox.clone() {
            let msg = finished_msg(key, report);
            if let Err(why) = send_within(&mut sink, &msg, self.fence_due(), bound).await {
                return self.send_failed(why);
            }
        }
        // The supervisor pings every ping_interval_ms: silence longer than its
        // ping timeout means the connection is dead even if TCP says nothing.
        let mut last_heard = crate::seam::now();
        let mut watchdog = tokio::time::interval(Duration::from_millis((silence_ms / 4).max(10)));
        loop {
            // Past the fence nothing else may happen (outside a simulation
            // `select!` starts at a random branch: check first).
            if self.past_fence(crate::seam::now()) {
                self.fence();
                return Ok(Ended::Lost("no pong confirmed within the fence".into()));
            }
            let fence = self.fence_due();
            crate::select! {
                // First: past the fence, nothing else may start.
                () = crate::seam::sleep_until(fence.unwrap_or_default()), if fence.is_some() => {
                    self.fence();
                    return Ok(Ended::Lost("no pong confirmed within the fence".into()));
                }
                frame = frames.next() => {
                    last_heard = crate::seam::now();
                    match frame {
                        Some(Ok(Message::Text(text))) => match protocol::decode_to_agent(text.as_str()) {
                            Ok(msg) => {
                                // The core sends only to an agent it accepted,
                                // after it heard the hello.
                                if !matches!(msg, ToAgentMsg::Welcome { .. }) {
                                    self.confirm(hello_at);
                                }
                                // A message that waited past the fence (in a
                                // frozen host's buffers, say) is not obeyed: a
                                // run it orders has been given up already.
                                if self.past_fence(crate::seam::now()) {
                                    self.fence();
                                    return Ok(Ended::Lost("no pong confirmed within the fence".into()));
                                }
                                if let Some(reply) = self.obey(msg) {
                                    if let Err(why) = send_within(&mut sink, &reply, self.fence_due(), bound).await {
                                        return self.send_failed(why);
                                    }
                                }
                            }
                            Err(e) => {
                                warn!(error = %e, "frame out of protocol; reconnecting");
                                return Ok(Ended::Lost(e.to_string()));
                            }
                        },
                        Some(Ok(Message::Close(_))) | None => return Ok(Ended::Lost("closed".into())),
                        // The websocket layer answers it with a pong.
                        Some(Ok(Message::Ping(payload))) => self.pinged(&payload, crate::seam::now()),
                        Some(Ok(_)) => {}
                        Some(Err(e)) => return Ok(Ended::Lost(e.to_string())),
                    }
                }
                Some(event) = self.events.recv() => {
                    if let Some(msg) = self.absorb(event) {
                        if let Err(why) = send_within(&mut sink, &msg, self.fence_due(), bound).await {
                            return self.send_failed(why);
                        }
                    }
                }
                _ = watchdog.tick() => {
                    if crate::seam::now().ms_since(last_heard) > silence_ms {
                        return Ok(Ended::Lost(format!("nothing heard for {silence_ms} ms")));
                    }
                }
            }
        }
    }

    /// A send did not go through: at the fence, the runs die first.
    fn send_failed(&mut self, why: SendFailed) -> Result<Ended, String> {
        if why == SendFailed::Fence {
            self.fence();
        }
        Ok(Ended::Lost(format!("send failed: {why:?}")))
    }

    /// Carries out one supervisor message; returns what to answer at once.
    fn obey(&mut self, msg: ToAgentMsg) -> Option<FromAgent> {
        match msg {
            ToAgentMsg::Welcome { .. } => None,
            ToAgentMsg::Run { job, attempt, spec } => {
                let key = (job, attempt);
                if self.running.contains_key(&key) || self.outbox.contains_key(&key) {
                    return None; // told twice: it is already ours
                }
                let (started_tx, started_rx) = oneshot::channel();
                let (kill_tx, kill_rx) = oneshot::channel();
                let retryable = attempt < spec.max_attempts;
                let order = RunOrder {
                    job,
                    attempt,
                    spec,
                    run_dir: self.options.work_dir.join(format!("{job}-{attempt}")),
                };
                let run = self.runner.run(
                    order,
                    RunControl {
                        started: started_tx,
                        kill: kill_rx,
                    },
                );
                let events = self.events_tx.clone();
                let span = tracing::info_span!("run", job.id = job.0, attempt);
                tokio::spawn(
                    async move {
                        let watch_start = {
                            let events = events.clone();
                            async move {
                                if started_rx.await.is_ok() {
                                    let _ = events.send(RunEvent::Started(key));
                                }
                            }
                        };
                        // Its own task: a runner that panics still ends the attempt.
                        let (report, ()) = tokio::join!(tokio::spawn(run), watch_start);
                        let report = report.unwrap_or_else(|e| FinishedReport {
                            outcome: Outcome::SpawnFailed {
                                error: format!("the runner failed: {e}"),
                            },
                            output_tail: String::new(),
                            run_ms: 0,
                        });
                        let _ = events.send(RunEvent::Finished(key, report));
                    }
                    .instrument(span),
                );
                self.running.insert(
                    key,
                    Running {
                        kill: Some(kill_tx),
                        started: false,
                        retryable,
                        fenced: false,
                    },
                );
                None
            }
            ToAgentMsg::Kill {
                job,
                attempt,
                reason,
            } => {
                match self.running.get_mut(&(job, attempt)) {
                    Some(running) => {
                        info!(
                            job.id = job.0,
                            attempt,
                            ?reason,
                            started = running.started,
                            "killing"
                        );
                        if let Some(kill) = running.kill.take() {
                            let _ = kill.send(());
                        }
                    }
                    None => info!(
                        job.id = job.0,
                        attempt, "kill for an attempt not running here"
                    ),
                }
                None
            }
            ToAgentMsg::Ack { job, attempt } => {
                if self.outbox.remove(&(job, attempt)).is_some() {
                    self.runner.drop_result(job, attempt);
                }
                None
            }
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum SendFailed {
    Closed,
    /// The supervisor did not take it within its ping timeout.
    Stalled,
    /// The fence came first.
    Fence,
}

/// Sends `msg`, giving up at the fence or after `bound` (a peer that stops
/// reading must not hold the agent past either).
async fn send_within(
    sink: &mut WsSink,
    msg: &FromAgent,
    fence: Option<Millis>,
    bound: Duration,
) -> Result<(), SendFailed> {
    let send = tokio::time::timeout(bound, sink.send(Message::text(protocol::encode(msg))));
    crate::select! {
        () = crate::seam::sleep_until(fence.unwrap_or_default()), if fence.is_some() => Err(SendFailed::Fence),
        sent = send => match sent {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(SendFailed::Closed),
            Err(_) => Err(SendFailed::Stalled),
        },
    }
}

/// What the agent keeps of a welcome.
struct Welcome {
    ping_interval_ms: u64,
    ping_timeout_ms: u64,
    fence_ms: Option<u64>,
}

type WsStream = tokio_tungstenite::WebSocketStream<crate::tls::Stream>;
type WsSink = futures_util::stream::SplitSink<WsStream, Message>;
type WsFrames = futures_util::stream::SplitStream<WsStream>;

/// Connects, upgrades, says hello and waits for the welcome, each step
/// bounded.
async fn connect(
    supervisor: String,
    tls: Option<crate::tls::ClientTls>,
    hello: FromAgent,
) -> Result<(WsSink, WsFrames, Welcome, Millis), String> {
    let bound = Duration::from_millis(CONNECT_TIMEOUT_MS);
    let stream = tokio::time::timeout(bound, crate::tls::connect(&supervisor, tls.as_ref()))
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|e| e.to_string())?;
    let scheme = if tls.is_some() { "wss" } else { "ws" };
    let url = format!("{scheme}://{supervisor}/agent");
    let handshake = tokio_tungstenite::client_async_with_config(
        url,
        stream,
        Some(crate::server::agents::ws_config()),
    );
    let (ws, _) = tokio::time::timeout(bound, handshake)
        .await
        .map_err(|_| "websocket handshake timed out".to_string())?
        .map_err(|e| e.to_string())?;
    let (mut sink, mut frames) = ws.split();
    // The hello leaves after this instant: the supervisor hears it later.
    let hello_at = crate::seam::now();
    sink.send(Message::text(protocol::encode(&hello)))
        .await
        .map_err(|e| e.to_string())?;
    let welcome = match tokio::time::timeout(bound, frames.next()).await {
        Ok(Some(Ok(Message::Text(text)))) => match protocol::decode_to_agent(text.as_str()) {
            Ok(ToAgentMsg::Welcome {
                ping_interval_ms,
                ping_timeout_ms,
                fence_ms,
                ..
            }) => Welcome {
                ping_interval_ms,
                ping_timeout_ms,
                fence_ms,
            },
            Ok(other) => return Err(format!("expected a welcome, got {other:?}")),
            Err(e) => return Err(e.to_string()),
        },
        Ok(other) => return Err(format!("no welcome: {other:?}")),
        Err(_) => return Err("no welcome in time".to_string()),
    };
    Ok((sink, frames, welcome, hello_at))
}

fn finished_msg(key: Key, report: FinishedReport) -> FromAgent {
    FromAgent::Finished {
        job: key.0,
        attempt: key.1,
        outcome: report.outcome,
        output_tail: report.output_tail,
        run_ms: report.run_ms,
    }
}

/// How long a connect, a handshake or the wait for the welcome may take.
const CONNECT_TIMEOUT_MS: u64 = 10_000;
/// A session shorter than this does not reset the reconnect backoff (an
/// agent the supervisor keeps refusing must not hammer it).
const SESSION_STEADY_MS: u64 = 10_000;

/// The wait before the next connect after `failures` failures in a row:
/// exponential from `reconnect_min_ms`, capped at `reconnect_max_ms`, with
/// up to half of it drawn at random so that agents do not reconnect in step.
pub fn backoff_ms(options: &AgentOptions, failures: u32) -> u64 {
    let exp = options
        .reconnect_min_ms
        .saturating_mul(1u64 << failures.saturating_sub(1).min(20))
        .min(options.reconnect_max_ms);
    let jitter = crate::seam::random_u64() % (exp / 2 + 1);
    exp / 2 + jitter
}

#[cfg(test)]
mod tests;
