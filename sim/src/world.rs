//! The composer: builds a madsim world of one supervisor node (the real
//! server, with its SQLite store on a per-run file), agent nodes (the real
//! agent with the simulated runner) and client nodes (the real HTTP
//! client). Addresses are simulated (the documentation range 192.0.2.0/24);
//! nothing leaves the process.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use foreman::agent::{Agent, AgentOptions};
use foreman::client::Client;
use foreman::core::CoreConfig;
use foreman::server::{self, auth, AgentEndpoint, ServerOptions};
use foreman::store::User;
use madsim::runtime::{Handle, NodeHandle};

use crate::runner::{Processes, SimRunner};

pub const ADMIN_TOKEN: &str = "sim-admin-token";
pub const AGENT_TOKEN: &str = "sim-agent-token";
pub const API_PORT: u16 = 8470;
pub const AGENT_PORT: u16 = 8471;

pub fn ip(host: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(192, 0, 2, host))
}

pub struct WorldConfig {
    pub agents: usize,
    pub cpus_per_agent: u32,
    pub core: CoreConfig,
    pub ping_interval_ms: u64,
    pub ping_timeout_ms: u64,
    /// Where this run's database lives (it survives a supervisor restart).
    pub data_dir: PathBuf,
}

pub struct World {
    pub supervisor: NodeHandle,
    pub agents: Vec<NodeHandle>,
    pub processes: Processes,
    pub api: String,
}

impl World {
    /// Creates the nodes; they start at once (in simulated time).
    pub fn build(config: WorldConfig) -> World {
        let handle = Handle::current();
        let server_options = ServerOptions {
            data_dir: config.data_dir.clone(),
            core: config.core.clone(),
            api_addr: SocketAddr::new(ip(1), API_PORT),
            agent_addr: SocketAddr::new(ip(1), AGENT_PORT),
            endpoint: AgentEndpoint {
                token_sha256: auth::sha256_hex(AGENT_TOKEN).into(),
                ping_interval_ms: config.ping_interval_ms,
                ping_timeout_ms: config.ping_timeout_ms,
                hello_timeout_ms: 5_000,
            },
            bootstrap_users: vec![(
                User {
                    name: "admin".into(),
                    plan: "premium".into(),
                    admin: true,
                },
                auth::sha256_hex(ADMIN_TOKEN),
            )],
            journal_segment_bytes_max: 0,
            journal_segments_max: 0,
        };
        let supervisor = handle
            .create_node()
            .name("supervisor")
            .ip(ip(1))
            .init(move || {
                let options = server_options.clone();
                async move {
                    let running = server::start(options).await.expect("the supervisor starts");
                    let _ = running.actor.await;
                }
            })
            .build();
        let processes = Processes::default();
        let agents = (0..config.agents)
            .map(|i| {
                let name = format!("agent-{i}");
                let options = AgentOptions {
                    supervisor: SocketAddr::new(ip(1), AGENT_PORT).to_string(),
                    token: AGENT_TOKEN.to_string(),
                    agent_id: name.clone(),
                    cpus: config.cpus_per_agent,
                    labels: Default::default(),
                    work_dir: PathBuf::from("/nonexistent/sim"),
                    reconnect_min_ms: 100,
                    reconnect_max_ms: 2_000,
                    reconnect_attempts_max: None,
                };
                let runner = SimRunner {
                    agent: name.clone(),
                    processes: processes.clone(),
                };
                handle
                    .create_node()
                    .name(name)
                    .ip(ip(11 + i as u8))
                    .init(move || {
                        let agent = Agent::new(options.clone(), Arc::new(runner.clone()));
                        async move {
                            let _ = agent.run().await;
                        }
                    })
                    .build()
            })
            .collect();
        World {
            supervisor,
            agents,
            processes,
            api: SocketAddr::new(ip(1), API_PORT).to_string(),
        }
    }

    pub fn admin(&self) -> Client {
        Client {
            timeout: Duration::from_secs(10),
            ..Client::new(self.api.clone(), ADMIN_TOKEN)
        }
    }

    /// A node for client code to run on.
    pub fn client_node(&self, host: u8) -> NodeHandle {
        Handle::current()
            .create_node()
            .name(format!("client-{host}"))
            .ip(ip(20 + host))
            .build()
    }
}
