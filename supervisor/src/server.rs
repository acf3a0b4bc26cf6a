//! The supervisor service: the composition root that opens the store,
//! restores the core from it, starts the actor that owns the core, and
//! serves the HTTP API and the agent endpoint on the seam's listeners.

pub mod agents;
pub mod api;
pub mod auth;
pub mod executor;
pub mod http;
pub mod hub;
pub mod incident;
pub mod journal;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::net::TcpListener;
use tracing::info;

use crate::core::{Core, CoreConfig, Millis, RestoreError};
use crate::seam;
use crate::shell::actor::{self, CoreHandle};
use crate::store::{Store, StoreError, User};

pub use agents::AgentEndpoint;

#[derive(Clone, Debug)]
pub struct ServerOptions {
    /// Where the database lives (`foreman.db`).
    pub data_dir: PathBuf,
    pub core: CoreConfig,
    pub api_addr: SocketAddr,
    pub agent_addr: SocketAddr,
    pub endpoint: AgentEndpoint,
    /// Accounts to create if they do not exist yet: (user, token SHA-256).
    pub bootstrap_users: Vec<(User, String)>,
    /// Agent credentials to set (the supervisor's own local agents):
    /// (agent id, token SHA-256).
    pub bootstrap_agents: Vec<(String, String)>,
    /// The journal's bounds: bytes per segment, and old segments kept (0: no journal).
    pub journal_segment_bytes_max: u64,
    pub journal_segments_max: usize,
    /// Bounds on the API's connections and event streams.
    pub http: http::HttpLimits,
    /// TLS for both listeners (`crate::tls::server_config`); none: plaintext.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// A tap on the core (the simulator's trace and checks); none in production.
    pub observer: Option<Arc<dyn executor::Observer>>,
    /// Extra time every commit takes, half before it is durable and half
    /// after (a slow disk's fsync): for the simulator, whose commits are
    /// otherwise instant, and for benchmarks. 0 in production.
    pub commit_delay_ms: u64,
    /// Commits that do not wait for the disk: benchmarks only (what
    /// durability costs). False in production.
    pub commit_without_fsync: bool,
    /// Added to every commit's fsync, on the commit's own thread:
    /// benchmarks only (a slower disk). 0 in production.
    pub fsync_delay_us: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("data dir {0}: {1}")]
    DataDir(PathBuf, std::io::Error),
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("restore: {0}")]
    Restore(#[from] RestoreError),
    #[error("listen on {0}: {1}")]
    Listen(SocketAddr, std::io::Error),
    #[error("configuration: {0}")]
    Config(String),
}

pub struct Running {
    pub api_addr: SocketAddr,
    pub agent_addr: SocketAddr,
    pub core: CoreHandle,
    /// Ends if the actor stops (for instance on a store failure).
    pub actor: tokio::task::JoinHandle<()>,
    /// The HTTP API as a service, and the hub between connections and the
    /// executor: for driving handlers directly (the simulator's
    /// cancellation-point exploration).
    pub router: axum::Router,
    pub hub: Arc<hub::Hub>,
    pub fence_ms: u64,
    pub credentials: agents::Credentials,
}

/// The next connection on `listener`, with Nagle off (small frames go out at
/// once, not after a delayed ACK). An accept error (out of file descriptors,
/// say) is logged and waited out briefly rather than spun on.
pub(crate) async fn accept(
    listener: &TcpListener,
    what: &str,
) -> (tokio::net::TcpStream, SocketAddr) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                return (stream, peer);
            }
            Err(e) => {
                tracing::warn!(error = %e, "{what} listener accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

pub async fn start(options: ServerOptions) -> Result<Running, StartError> {
    agents::check_fence(options.core.agent_grace_ms, &options.endpoint)
        .map_err(StartError::Config)?;
    options.http.check().map_err(StartError::Config)?;
    std::fs::create_dir_all(&options.data_dir)
        .map_err(|e| StartError::DataDir(options.data_dir.clone(), e))?;
    let db = options.data_dir.join("foreman.db");
    let mut writer = Store::open(&db)?;
    if options.commit_without_fsync {
        tracing::warn!("commits do not wait for the disk (a benchmark setting): a crash may lose acknowledged jobs");
        writer.without_fsync()?;
    }
    if options.fsync_delay_us > 0 {
        tracing::warn!(
            us = options.fsync_delay_us,
            "every commit takes longer (a benchmark setting)"
        );
        writer.with_fsync_delay(std::time::Duration::from_micros(options.fsync_delay_us));
    }
    let reader = Store::open(&db)?;
    let now = seam::now();
    for (user, token_sha256) in &options.bootstrap_users {
        match writer.add_user(user, token_sha256, now) {
            Ok(()) | Err(StoreError::UserExists(_)) => {}
            Err(e) => return Err(e.into()),
        }
    }
    for (agent, token_sha256) in &options.bootstrap_agents {
        writer.set_agent_credential(agent, token_sha256, now)?;
    }
    let credentials = agents::Credentials::new(Store::open(&db)?);
    let window_ms = options.core.idempotency_window_secs.saturating_mul(1000);
    let (records, next_job_id) =
        writer.load_for_restore(Millis(now.0.saturating_sub(window_ms)))?;
    let restored = records.len();
    let core = Core::restore(options.core.clone(), now, records, next_job_id)?;
    info!(restored, next_job_id, "core restored from the store");
    let hub = Arc::new(hub::Hub::default());
    let journal = if options.journal_segments_max > 0 {
        let dir = options.data_dir.join("journal");
        match journal::Journal::open(
            &dir,
            options.journal_segment_bytes_max,
            options.journal_segments_max,
        ) {
            Ok(mut journal) => {
                journal.started(serde_json::json!({
                    "ping_interval_ms": options.endpoint.ping_interval_ms,
                    "ping_timeout_ms": options.endpoint.ping_timeout_ms,
                    "hello_timeout_ms": options.endpoint.hello_timeout_ms,
                    "journal_segment_bytes_max": options.journal_segment_bytes_max,
                    "journal_segments_max": options.journal_segments_max,
                    "tls": options.tls.is_some(),
                    "local_agents": options
                        .bootstrap_agents
                        .iter()
                        .map(|(id, _)| id.as_str())
                        .collect::<Vec<_>>(),
                    "restored_jobs": restored,
                }));
                Some(journal)
            }
            Err(e) => {
                tracing::warn!(error = %e, dir = %dir.display(), "no journal: it cannot be opened");
                None
            }
        }
    } else {
        None
    };
    let recorder = executor::ServerRecorder {
        journal,
        observer: options.observer.clone(),
    };
    let executor = executor::ServerExecutor {
        store: Some(writer),
        hub: hub.clone(),
        observer: options.observer.clone(),
        commit_delay_ms: options.commit_delay_ms,
    };
    let (core_handle, actor) = actor::spawn(core, recorder, executor, 4096);
    let api_listener = TcpListener::bind(options.api_addr)
        .await
        .map_err(|e| StartError::Listen(options.api_addr, e))?;
    let agent_listener = TcpListener::bind(options.agent_addr)
        .await
        .map_err(|e| StartError::Listen(options.agent_addr, e))?;
    let api_addr = api_listener
        .local_addr()
        .map_err(|e| StartError::Listen(options.api_addr, e))?;
    let agent_addr = agent_listener
        .local_addr()
        .map_err(|e| StartError::Listen(options.agent_addr, e))?;
    let tls = options.tls.clone().map(crate::tls::TlsAcceptor::from);
    let state = api::ApiState::new(
        core_handle.clone(),
        hub.clone(),
        reader,
        options.http.clone(),
    );
    let router = api::router(state);
    tokio::spawn(api::serve(
        api_listener,
        router.clone(),
        options.http.clone(),
        tls.clone(),
    ));
    let fence_ms = agents::fence_ms(options.core.agent_grace_ms, &options.endpoint);
    tokio::spawn(agents::serve(
        agent_listener,
        tls,
        options.endpoint.clone(),
        credentials.clone(),
        fence_ms,
        core_handle.clone(),
        hub.clone(),
    ));
    info!(%api_addr, %agent_addr, tls = options.tls.is_some(), "supervisor listening");
    Ok(Running {
        api_addr,
        agent_addr,
        core: core_handle,
        actor,
        router,
        hub,
        fence_ms,
        credentials,
    })
}
