//! Cancellation-point exploration: run a path of the shell or agent code,
//! drop its future at its 1st, 2nd, … Nth poll, and check that nothing leaked
//! (reply waiters, hub connections, agents the core thinks connected, queue
//! entries, processes left running) and that the state stayed consistent.
//! Each cut runs in a fresh simulation on its own thread; the path is cut at
//! every poll until it completes on its own.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use foreman::agent::{Agent, AgentOptions};
use foreman::core::{CoreConfig, JobState};
use foreman::server::{self, auth, AgentEndpoint, Running, ServerOptions};
use foreman::store::User;
use madsim::runtime::Handle;
use tower_service::Service;

use crate::runner::SimRunner;
use crate::trace::{Ev, Trace};
use crate::world::{agent_token, ip, ADMIN_TOKEN, AGENT_PORT, API_PORT};

/// Polls the inner future at most `limit` times; if it is still pending
/// then, drops it (as a cancelled task would be) and yields `None`.
pub struct DropAt<F> {
    inner: Option<Pin<Box<F>>>,
    limit: usize,
    polls: usize,
}

impl<F: Future> DropAt<F> {
    pub fn new(inner: F, limit: usize) -> Self {
        DropAt {
            inner: Some(Box::pin(inner)),
            limit,
            polls: 0,
        }
    }
}

impl<F: Future> Future for DropAt<F> {
    /// `Some((output, polls it took))`, or `None` if it was dropped.
    type Output = Option<(F::Output, usize)>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        // Every field is Unpin (the inner future is boxed).
        let this = self.get_mut();
        if this.inner.is_none() {
            return Poll::Ready(None);
        }
        if this.polls >= this.limit {
            this.inner = None;
            return Poll::Ready(None);
        }
        this.polls += 1;
        let inner = this.inner.as_mut().expect("checked above");
        match inner.as_mut().poll(cx) {
            Poll::Ready(out) => {
                this.inner = None;
                Poll::Ready(Some((out, this.polls)))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

/// The paths explored.
pub const PATHS: [&str; 4] = [
    "http-submit",
    "http-cancel",
    "agent-connection",
    "agent-run-loop",
];

/// What exploring one path found.
#[derive(Debug)]
pub struct PathReport {
    pub path: &'static str,
    /// Cuts made: the future was dropped at polls 1..=cuts.
    pub cuts: usize,
    /// The poll at which it completed on its own (if it did within the bound).
    pub completed_at: Option<usize>,
    /// "cut at poll N: what leaked or broke".
    pub findings: Vec<String>,
}

/// Explores `path`, cutting at every poll up to `max_polls`.
pub fn explore(path: &'static str, max_polls: usize) -> PathReport {
    let mut report = PathReport {
        path,
        cuts: 0,
        completed_at: None,
        findings: Vec::new(),
    };
    for limit in 1..=max_polls {
        // One seed for every cut, so that poll N is the same await point
        // in each run.
        let outcome = in_simulation(SEED, move || cut(path, limit));
        match outcome {
            Ok(Cut::Completed(polls, problems)) => {
                report.findings.extend(
                    problems
                        .into_iter()
                        .map(|p| format!("run to completion ({polls} polls): {p}")),
                );
                report.completed_at = Some(polls);
                break;
            }
            Ok(Cut::Dropped(problems)) => {
                report.cuts = limit;
                report.findings.extend(
                    problems
                        .into_iter()
                        .map(|p| format!("cut at poll {limit}: {p}")),
                );
            }
            Err(crash) => {
                report.cuts = limit;
                report
                    .findings
                    .push(format!("cut at poll {limit}: crash: {crash}"));
            }
        }
    }
    report
}

const SEED: u64 = 1;

enum Cut {
    /// The path finished before the cut: its poll count, and any problems.
    Completed(usize, Vec<String>),
    /// The path was dropped; the problems found after.
    Dropped(Vec<String>),
}

type Work = Pin<Box<dyn Future<Output = Cut>>>;

fn in_simulation(seed: u64, work: impl FnOnce() -> Work + Send + 'static) -> Result<Cut, String> {
    #[allow(clippy::disallowed_methods)] // a fresh thread per simulation
    let joined = std::thread::spawn(move || {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let data_dir = dir.path().to_path_buf();
        DATA_DIR.with(|d| *d.borrow_mut() = Some(data_dir));
        let runtime =
            madsim::runtime::Runtime::with_seed_and_config(seed, madsim::Config::default());
        let out = runtime.block_on(work());
        Ok::<Cut, String>(out)
    })
    .join();
    match joined {
        Ok(result) => result,
        Err(panic) => Err(crate::trace::panic_message(&*panic)),
    }
}

thread_local! {
    static DATA_DIR: std::cell::RefCell<Option<std::path::PathBuf>> = const { std::cell::RefCell::new(None) };
}

fn endpoint() -> AgentEndpoint {
    AgentEndpoint {
        ping_interval_ms: 200,
        ping_timeout_ms: 1_000,
        hello_timeout_ms: 1_000,
    }
}

/// Starts the supervisor on its node and hands back its handles.
async fn supervisor(trace: &Trace) -> (madsim::runtime::NodeHandle, Running) {
    let options = ServerOptions {
        data_dir: DATA_DIR.with(|d| d.borrow().clone()).expect("data dir"),
        core: CoreConfig {
            agent_grace_ms: 2_000,
            ..CoreConfig::default()
        },
        api_addr: SocketAddr::new(ip(1), API_PORT),
        agent_addr: SocketAddr::new(ip(1), AGENT_PORT),
        endpoint: endpoint(),
        bootstrap_users: vec![(
            User {
                name: "admin".into(),
                plan: "premium".into(),
                admin: true,
            },
            auth::sha256_hex(ADMIN_TOKEN),
        )],
        bootstrap_agents: vec![(
            "agent-0".to_string(),
            auth::sha256_hex(&agent_token("agent-0")),
        )],
        journal_segment_bytes_max: 0,
        journal_segments_max: 0,
        observer: Some(Arc::new(trace.clone())),
        commit_delay_ms: 0,
        commit_without_fsync: false,
        fsync_delay_us: 0,
        tls: None,
        http: Default::default(),
    };
    let node = Handle::current()
        .create_node()
        .name("supervisor")
        .ip(ip(1))
        .build();
    let running = node
        .spawn(async move { server::start(options).await })
        .await
        .expect("the supervisor node")
        .expect("the supervisor starts");
    (node, running)
}

fn request(method: Method, uri: &str, body: &str) -> Request<Body> {
    Request::builder()
        .method(method)
        .uri(uri)
        .header("authorization", format!("Bearer {ADMIN_TOKEN}"))
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .expect("request")
}

const JOB: &str = r#"{"argv":["simulated"],"env":{"SIM_DURATION_MS":"3000"}}"#;

/// The checks every path ends with: nothing waits for a reply, no
/// connection is left in the hub, the core's invariants held throughout,
/// and the core and the store agree on which jobs are live.
async fn common_checks(running: &Running, trace: &Trace, problems: &mut Vec<String>) {
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (conns, replies) = running.hub.open_counts();
    if replies > 0 {
        problems.push(format!("{replies} reply waiters left in the hub"));
    }
    let connected = running
        .core
        .query(|c| c.agents().filter(|a| a.conn().is_some()).count())
        .await
        .unwrap_or(0);
    if conns > connected {
        problems.push(format!(
            "{conns} connections open in the hub, {connected} agents connected in the core"
        ));
    }
    for e in trace.entries() {
        if let Ev::InvariantBroken { message } = e.ev {
            problems.push(format!("core invariant: {message}"));
        }
    }
    let live: Vec<(u64, JobState)> = running
        .core
        .query(|c| {
            let mut v: Vec<_> = c
                .jobs()
                .filter(|j| !j.state.is_terminal())
                .map(|j| (j.id.0, j.state))
                .collect();
            v.sort();
            v
        })
        .await
        .unwrap_or_default();
    let mut router = running.router.clone();
    let listed = router
        .call(request(Method::GET, "/v1/jobs?limit=1000", ""))
        .await
        .ok()
        .map(|r| r.into_body());
    let stored: Vec<(u64, JobState)> = match listed {
        Some(body) => {
            let bytes = axum::body::to_bytes(body, 1 << 20)
                .await
                .unwrap_or_default();
            let jobs: Vec<foreman::core::Job> = serde_json::from_slice(&bytes).unwrap_or_default();
            let mut v: Vec<_> = jobs
                .into_iter()
                .filter(|j| !j.state.is_terminal())
                .map(|j| (j.id.0, j.state))
                .collect();
            v.sort();
            v
        }
        None => Vec::new(),
    };
    if live != stored {
        problems.push(format!(
            "the core's live jobs {live:?} and the store's {stored:?} differ"
        ));
    }
}

fn cut(path: &'static str, limit: usize) -> Work {
    Box::pin(async move {
        let trace = Trace::new();
        let (node, running) = supervisor(&trace).await;
        let mut problems = Vec::new();
        let completed = match path {
            "http-submit" => {
                let mut router = running.router.clone();
                let call = async move { router.call(request(Method::POST, "/v1/jobs", JOB)).await };
                node.spawn(DropAt::new(call, limit))
                    .await
                    .expect("node")
                    .map(|(r, polls)| {
                        if !r.as_ref().is_ok_and(|r| r.status().is_success()) {
                            problems.push(format!("submit answered {:?}", r.map(|r| r.status())));
                        }
                        polls
                    })
            }
            "http-cancel" => {
                let mut router = running.router.clone();
                let _ = router.call(request(Method::POST, "/v1/jobs", JOB)).await;
                let mut router = running.router.clone();
                let call = async move {
                    router
                        .call(request(Method::POST, "/v1/jobs/1/cancel", ""))
                        .await
                };
                let polls = node
                    .spawn(DropAt::new(call, limit))
                    .await
                    .expect("node")
                    .map(|(_, polls)| polls);
                // Cancel is idempotent: asked again, the job ends canceled.
                let mut router = running.router.clone();
                let again = router
                    .call(request(Method::POST, "/v1/jobs/1/cancel", ""))
                    .await
                    .map(|r| r.status());
                if !matches!(again, Ok(StatusCode::OK)) {
                    problems.push(format!("a second cancel answered {again:?}"));
                }
                polls
            }
            "agent-connection" => {
                // The explorer's own listener, served by the real connection
                // handler, cut; an agent connects to it once.
                let listener_addr = SocketAddr::new(ip(1), AGENT_PORT + 1);
                let (core, hub, fence) =
                    (running.core.clone(), running.hub.clone(), running.fence_ms);
                let credentials = running.credentials.clone();
                let served = node.spawn(async move {
                    let listener = tokio::net::TcpListener::bind(listener_addr)
                        .await
                        .expect("bind");
                    let (stream, _) = listener.accept().await.expect("accept");
                    DropAt::new(
                        server::agents::connection(
                            stream,
                            None,
                            endpoint(),
                            credentials,
                            fence,
                            core,
                            hub,
                        ),
                        limit,
                    )
                    .await
                    .map(|((), polls)| polls)
                });
                let agent = agent_node(&trace, listener_addr, Some(1));
                let polls = served.await.expect("node");
                // Long enough for any ping timeout to have passed.
                tokio::time::sleep(Duration::from_millis(3_000)).await;
                let connected = running
                    .core
                    .query(|c| c.agents().filter(|a| a.conn().is_some()).count())
                    .await
                    .unwrap_or(0);
                if polls.is_none() && connected > 0 {
                    problems.push(format!(
                        "its connection was dropped, yet the core holds {connected} agent(s) connected"
                    ));
                }
                drop(agent);
                polls
            }
            "agent-run-loop" => {
                // A job runs on the agent whose run loop is cut; then a new
                // agent with the same id takes over.
                let mut router = running.router.clone();
                let _ = router
                    .call(request(
                        Method::POST,
                        "/v1/jobs",
                        r#"{"argv":["simulated"],"env":{"SIM_DURATION_MS":"3000"},"max_attempts":2}"#,
                    ))
                    .await;
                let agent_node = Handle::current()
                    .create_node()
                    .name("agent-0")
                    .ip(ip(11))
                    .build();
                let options = agent_options(SocketAddr::new(ip(1), AGENT_PORT), None);
                let runner = SimRunner {
                    agent: "agent-0".into(),
                    trace: trace.clone(),
                    kill_grace_ms: 0,
                    output_tail_bytes: 4096,
                    gone: Default::default(),
                    disk: Default::default(),
                };
                let polls = agent_node
                    .spawn(DropAt::new(
                        Agent::new(options.clone(), Arc::new(runner.clone())).run(),
                        limit,
                    ))
                    .await
                    .expect("node")
                    .map(|(_, polls)| polls);
                tokio::time::sleep(Duration::from_millis(10)).await;
                let orphans = trace.running_processes().len();
                if orphans > 0 {
                    problems.push(format!(
                        "{orphans} simulated process(es) still run after their agent was dropped"
                    ));
                }
                // A successor with the same id: the job must still end.
                agent_node.spawn(Agent::new(options, Arc::new(runner)).run());
                let deadline = trace.now() + 30_000;
                loop {
                    let live = running
                        .core
                        .query(|c| c.jobs().filter(|j| !j.state.is_terminal()).count())
                        .await
                        .unwrap_or(1);
                    if live == 0 {
                        break;
                    }
                    if trace.now() > deadline {
                        problems.push("the job never ended after the agent was replaced".into());
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                polls
            }
            _ => unreachable!("unknown path {path}"),
        };
        common_checks(&running, &trace, &mut problems).await;
        match completed {
            Some(polls) => Cut::Completed(polls, problems),
            None => Cut::Dropped(problems),
        }
    })
}

fn agent_options(addr: SocketAddr, attempts: Option<u32>) -> AgentOptions {
    AgentOptions {
        supervisor: addr.to_string(),
        token: agent_token("agent-0"),
        agent_id: "agent-0".into(),
        cpus: 1,
        labels: Default::default(),
        work_dir: "/nonexistent/sim".into(),
        reconnect_min_ms: 100,
        reconnect_max_ms: 500,
        reconnect_attempts_max: attempts,
        leave_alone_ms: None,
        tls: None,
    }
}

fn agent_node(
    trace: &Trace,
    addr: SocketAddr,
    attempts: Option<u32>,
) -> madsim::runtime::NodeHandle {
    let node = Handle::current()
        .create_node()
        .name("agent-0")
        .ip(ip(11))
        .build();
    let runner = SimRunner {
        agent: "agent-0".into(),
        trace: trace.clone(),
        kill_grace_ms: 0,
        output_tail_bytes: 4096,
        gone: Default::default(),
        disk: Default::default(),
    };
    node.spawn(Agent::new(agent_options(addr, attempts), Arc::new(runner)).run());
    node
}
