//! The composer and the driver. A world is one supervisor node (the real
//! server, with its SQLite store on a per-run file that survives a crash),
//! agent nodes (the real agent with the simulated runner) and a control node
//! that plays the scenario's workload and fault plan through the real HTTP
//! client, waits for the world to settle, and lists the end state. Addresses
//! are simulated (the documentation range 192.0.2.0/24); nothing leaves the
//! process.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use foreman::agent::{Agent, AgentOptions};
use foreman::client::Client;
use foreman::core::{JobId, SubmitSpec};
use foreman::server::{self, auth, AgentEndpoint, ServerOptions};
use foreman::store::User;
use madsim::net::NetSim;
use madsim::runtime::{Handle, NodeHandle};

use crate::runner::{process_env, Disk, SimRunner};
use crate::scenario::{Action, Fault, JobPlan, Scenario, Situation, Target};
use crate::trace::{CoreView, Entry, Ev, ProcessEnd, Trace};

pub const ADMIN_TOKEN: &str = "sim-admin-token";
pub const AGENT_TOKEN: &str = "sim-agent-token";

/// Agent `name`'s own token: each agent has a credential of its own.
pub fn agent_token(name: &str) -> String {
    format!("{AGENT_TOKEN}-{name}")
}
pub const API_PORT: u16 = 8470;
pub const AGENT_PORT: u16 = 8471;

pub fn ip(host: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(192, 0, 2, host))
}

pub fn user_token(user: &str) -> String {
    if user == "admin" {
        ADMIN_TOKEN.to_string()
    } else {
        format!("sim-token-{user}")
    }
}

/// madsim's settings for a scenario: its network latency and loss.
pub fn madsim_config(scenario: &Scenario) -> madsim::Config {
    let mut config = madsim::Config::default();
    let [lo, hi] = scenario.topology.latency_ms;
    config.net.send_latency = Duration::from_millis(lo)..Duration::from_millis(hi.max(lo) + 1);
    config.net.packet_loss_rate = scenario.topology.loss;
    config
}

pub struct World {
    pub supervisor: NodeHandle,
    /// The node the clients run on, once made.
    control: Mutex<Option<madsim::task::NodeId>>,
    /// Each agent's current node, and the flag that retires its runner (a
    /// reboot moves an agent to a new node).
    pub agents: Mutex<Vec<(NodeHandle, Arc<AtomicBool>)>>,
    /// How each agent's node is made.
    agent_makers: Vec<AgentMaker>,
    /// Nodes of agents before their reboot: frozen for good.
    retired: Mutex<Vec<NodeHandle>>,
    pub api: String,
}

#[derive(Clone)]
struct AgentMaker {
    name: String,
    options: AgentOptions,
    runner: SimRunner,
}

impl AgentMaker {
    /// A node for the agent; each has a runner of its own.
    fn node(&self, host: u8) -> (NodeHandle, Arc<AtomicBool>) {
        let runner = SimRunner {
            gone: Arc::default(),
            disk: Disk::default(),
            ..self.runner.clone()
        };
        let gone = runner.gone.clone();
        let options = self.options.clone();
        let node = Handle::current()
            .create_node()
            .name(self.name.clone())
            .ip(ip(host))
            .init(move || {
                let agent = Agent::new(options.clone(), Arc::new(runner.clone()));
                async move {
                    let _ = agent.run().await;
                }
            })
            .build();
        (node, gone)
    }
}

impl World {
    /// Creates the nodes; they start at once (in simulated time).
    pub fn build(scenario: &Scenario, trace: &Trace, data_dir: PathBuf) -> World {
        let handle = Handle::current();
        let topology = &scenario.topology;
        let mut users = vec![(
            User {
                name: "admin".into(),
                plan: "premium".into(),
                admin: true,
            },
            auth::sha256_hex(ADMIN_TOKEN),
        )];
        for user in &scenario.users {
            users.push((
                User {
                    name: user.name.as_str().into(),
                    plan: user.plan.as_str().into(),
                    admin: false,
                },
                auth::sha256_hex(&user_token(&user.name)),
            ));
        }
        let server_options = ServerOptions {
            data_dir,
            core: scenario.core.clone(),
            api_addr: SocketAddr::new(ip(1), API_PORT),
            agent_addr: SocketAddr::new(ip(1), AGENT_PORT),
            endpoint: AgentEndpoint {
                ping_interval_ms: topology.ping_interval_ms,
                ping_timeout_ms: topology.ping_timeout_ms,
                hello_timeout_ms: 5_000,
            },
            bootstrap_users: users,
            bootstrap_agents: (0..topology.agents)
                .map(|i| {
                    (
                        agent_name(i),
                        auth::sha256_hex(&agent_token(&agent_name(i))),
                    )
                })
                .collect(),
            journal_segment_bytes_max: topology.journal_segment_bytes,
            journal_segments_max: if topology.journal_segment_bytes > 0 {
                JOURNAL_SEGMENTS
            } else {
                0
            },
            observer: Some(Arc::new(trace.clone())),
            commit_delay_ms: topology.commit_ms,
            commit_without_fsync: false,
            fsync_delay_us: 0,
            tls: None,
            http: Default::default(),
        };
        let supervisor = handle
            .create_node()
            .name("supervisor")
            .ip(ip(1))
            .init(move || {
                let options = server_options.clone();
                async move {
                    // A restart can come before the simulator has dropped the
                    // dead node's listeners: retry the bind briefly.
                    let mut tries = 0;
                    let running = loop {
                        match server::start(options.clone()).await {
                            Ok(running) => break running,
                            Err(server::StartError::Listen(..)) if tries < 50 => {
                                tries += 1;
                                tokio::time::sleep(Duration::from_millis(100)).await;
                            }
                            Err(e) => panic!("the supervisor does not start: {e}"),
                        }
                    };
                    let _ = running.actor.await;
                }
            })
            .build();
        let agent_makers: Vec<AgentMaker> = (0..topology.agents)
            .map(|i| {
                let name = agent_name(i);
                let options = AgentOptions {
                    supervisor: SocketAddr::new(ip(1), AGENT_PORT).to_string(),
                    token: agent_token(&name),
                    agent_id: name.clone(),
                    cpus: topology.cpus_of(i),
                    labels: Default::default(),
                    work_dir: PathBuf::from("/nonexistent/sim"),
                    reconnect_min_ms: 100,
                    reconnect_max_ms: topology.reconnect_max_ms,
                    reconnect_attempts_max: None,
                    leave_alone_ms: None,
                    tls: None,
                };
                let runner = SimRunner {
                    agent: name.clone(),
                    trace: trace.clone(),
                    kill_grace_ms: scenario.kill_grace_ms(),
                    output_tail_bytes: topology.output_tail_bytes,
                    gone: Default::default(),
                    disk: Default::default(),
                };
                AgentMaker {
                    name,
                    options,
                    runner,
                }
            })
            .collect();
        let agents = agent_makers
            .iter()
            .enumerate()
            .map(|(i, maker)| maker.node(11 + i as u8))
            .collect();
        World {
            supervisor,
            agents: Mutex::new(agents),
            agent_makers,
            retired: Mutex::default(),
            control: Mutex::default(),
            api: SocketAddr::new(ip(1), API_PORT).to_string(),
        }
    }

    /// The node agent `i` runs on now.
    pub fn agent_node(&self, i: usize) -> madsim::task::NodeId {
        self.agents.lock().expect("agents")[i].0.id()
    }

    pub fn agent_count(&self) -> usize {
        self.agents.lock().expect("agents").len()
    }

    /// Every node of the world but the clients'.
    pub fn nodes(&self) -> Vec<madsim::task::NodeId> {
        let agents = self.agents.lock().expect("agents");
        let retired = self.retired.lock().expect("retired");
        std::iter::once(self.supervisor.id())
            .chain(agents.iter().map(|a| a.0.id()))
            .chain(retired.iter().map(|n| n.id()))
            .collect()
    }

    /// Agent `i`'s host stops dead and boots again: the old node freezes
    /// for good, its connections left half-open, its processes gone; the
    /// agent starts afresh, with the same id, on a new node.
    fn reboot(&self, i: usize, trace: &Trace) {
        let mut agents = self.agents.lock().expect("agents");
        let mut retired = self.retired.lock().expect("retired");
        let (old, gone) = agents[i].clone();
        Handle::current().pause(old.id());
        gone.store(true, Ordering::Relaxed);
        let name = agent_name(i);
        for (job, attempt, agent) in trace.running_processes() {
            if agent == name {
                trace.push(Ev::ProcessEnded {
                    job,
                    attempt,
                    agent,
                    end: ProcessEnd::Vanished,
                });
            }
        }
        retired.push(old);
        // Hosts 11.. are first boots; reboots take 100.. (clients use 200..).
        let host = 100 + u8::try_from(retired.len()).expect("at most 99 reboots");
        assert!(host < 200, "at most 99 reboots in a run");
        agents[i] = self.agent_makers[i].node(host);
    }

    pub fn client(&self, user: &str) -> Client {
        Client {
            timeout: Duration::from_secs(10),
            ..Client::new(self.api.clone(), user_token(user))
        }
    }

    /// A node for client code to run on.
    pub fn client_node(&self, host: u8) -> NodeHandle {
        Handle::current()
            .create_node()
            .name(format!("client-{host}"))
            .ip(ip(200 + host))
            .build()
    }
}

pub use crate::scenario::agent_name;

/// Old journal segments the simulated supervisor keeps.
const JOURNAL_SEGMENTS: usize = 8;

/// Plays a scenario in the current madsim runtime and returns its trace.
pub async fn play(scenario: Arc<Scenario>, data_dir: PathBuf) -> Vec<Entry> {
    let trace = Trace::new();
    let journal = data_dir.join("journal");
    let journal_on = scenario.topology.journal_segment_bytes > 0;
    let world = Arc::new(World::build(&scenario, &trace, data_dir));
    let control = world.client_node(0);
    *world.control.lock().expect("control") = Some(control.id());
    let driven = trace.clone();
    let result = control.spawn(drive(world.clone(), scenario, driven)).await;
    let nodes: Vec<_> = world.nodes().into_iter().chain([control.id()]).collect();
    if let Err(e) = result {
        trace.push(Ev::Settled {
            ok: false,
            detail: format!("the control node failed: {e}"),
        });
    }
    if journal_on {
        // What is on disk now, with the supervisor still up: what a kill
        // would leave.
        trace.push(crate::journal::replayed(&journal, trace.core_view()));
    } else if journal.exists() {
        trace.push(crate::journal::kept_though_off(&journal));
    }
    let entries = trace.entries();
    // The simulator does not drop a node's tasks when the run ends: kill the
    // nodes and let it drop them, or every run would leave its database
    // open (thousands of runs in one campaign would run out of files).
    let handle = Handle::current();
    for node in nodes {
        handle.kill(node);
    }
    tokio::time::sleep(Duration::from_millis(1)).await;
    entries
}

/// Shared between the control node's tasks: the ids the clients were given.
type Ids = Arc<Mutex<BTreeMap<String, JobId>>>;

async fn sleep_until_ms(trace: &Trace, at_ms: u64) {
    let now = trace.now();
    if at_ms > now {
        tokio::time::sleep(Duration::from_millis(at_ms - now)).await;
    }
}

async fn drive(world: Arc<World>, scenario: Arc<Scenario>, trace: Trace) {
    let ids: Ids = Arc::default();
    let mut tasks = Vec::new();
    for job in scenario.jobs.clone() {
        let (world, trace, ids) = (world.clone(), trace.clone(), ids.clone());
        tasks.push(tokio::spawn(async move {
            sleep_until_ms(&trace, job.at_ms).await;
            submit(&world, &trace, &ids, &job).await;
        }));
    }
    // Faults on nodes and links fire in the plan's order; cancels each wait
    // for their own moment.
    let mut plan: Vec<Fault> = scenario
        .faults
        .iter()
        .filter(|f| f.action != Action::Cancel)
        .cloned()
        .collect();
    plan.sort_by_key(|f| f.at_ms);
    let down = Arc::new(Mutex::new(Down::default()));
    {
        let (world, trace, down, ids) = (world.clone(), trace.clone(), down.clone(), ids.clone());
        let bound = scenario.expect.settle_ms;
        tasks.push(tokio::spawn(async move {
            for mut fault in plan {
                sleep_until_ms(&trace, fault.at_ms).await;
                if let Some(job) = fault.job.take() {
                    match agent_of(&trace, &ids, &job, bound).await {
                        Some(agent) => fault.agent = Some(Target::One(agent)),
                        None => {
                            trace.push(Ev::Fault {
                                what: format!(
                                    "{:?} on {job}'s agent: {job} never ran",
                                    fault.action
                                ),
                                action: None,
                                agents: Vec::new(),
                                latency_ms: None,
                            });
                            continue;
                        }
                    }
                }
                apply(&world, &trace, &down, &fault);
            }
        }));
    }
    for fault in scenario
        .faults
        .iter()
        .filter(|f| f.action == Action::Cancel)
    {
        let (world, trace, ids, fault) = (world.clone(), trace.clone(), ids.clone(), fault.clone());
        let owner = scenario
            .jobs
            .iter()
            .find(|j| Some(&j.name) == fault.job.as_ref())
            .map(|j| j.user.clone())
            .unwrap_or_else(|| "admin".into());
        let bound = scenario.expect.settle_ms;
        tasks.push(tokio::spawn(async move {
            sleep_until_ms(&trace, fault.at_ms).await;
            cancel(&world, &trace, &ids, &fault, &owner, bound).await;
        }));
    }
    for task in tasks {
        let _ = task.await;
    }
    settle(&world, &scenario, &trace, &ids, &down).await;
    finals(&world, &trace).await;
}

/// Retries a submission (with the job's name as idempotency key, as a
/// careful client would) until it is acknowledged, for at most a minute.
async fn submit(world: &World, trace: &Trace, ids: &Ids, job: &JobPlan) {
    let mut client = world.client(&job.user);
    if job.client_timeout_ms > 0 {
        client.timeout = Duration::from_millis(job.client_timeout_ms);
    }
    let mut env = process_env(job);
    env.insert("SIM_NAME".into(), job.name.clone());
    let spec = SubmitSpec {
        env,
        kind: job.kind.clone(),
        cpus: job.cpus,
        max_run_secs: job.max_run_secs,
        max_attempts: job.max_attempts,
        idempotency_key: Some(job.name.clone()),
        ..SubmitSpec::command(["simulated"])
    };
    let deadline = trace.now() + 60_000;
    loop {
        match client.submit(&spec).await {
            Ok(view) => {
                ids.lock()
                    .expect("ids")
                    .insert(job.name.clone(), view.job.id);
                trace.push(Ev::Acked {
                    name: job.name.clone(),
                    job: view.job.id.0,
                });
                return;
            }
            Err(e) => {
                trace.push(Ev::SubmitFailed {
                    name: job.name.clone(),
                    error: e.to_string(),
                });
                if trace.now() >= deadline || job.no_retry {
                    trace.push(Ev::SubmitAbandoned {
                        name: job.name.clone(),
                    });
                    return;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

/// The agent that runs `job`'s latest attempt, once it has started (waiting
/// for at most `bound` ms).
async fn agent_of(trace: &Trace, ids: &Ids, job: &str, bound: u64) -> Option<usize> {
    let deadline = trace.now() + bound;
    loop {
        let id = ids.lock().expect("ids").get(job).copied();
        if let Some(id) = id {
            let agent = trace.with(|entries| {
                entries.iter().rev().find_map(|e| match &e.ev {
                    Ev::ProcessStarted { job, agent, .. } if *job == id.0 => Some(agent.clone()),
                    _ => None,
                })
            });
            if let Some(agent) = agent {
                return agent.strip_prefix("agent-").and_then(|n| n.parse().ok());
            }
        }
        if trace.now() >= deadline {
            return None;
        }
        trace.changed(deadline).await;
    }
}

/// What the job looks like in the trace so far.
fn situation_of(trace: &Trace, job: JobId) -> Option<Situation> {
    use foreman::core::EventKind as K;
    trace.with(|entries| {
        let mut now = None;
        let mut agent: Option<String> = None;
        let mut agent_away = false;
        for e in entries {
            match &e.ev {
                Ev::Core {
                    kind,
                    job: Some(j),
                    agent: a,
                    ..
                } if *j == job.0 => match kind {
                    K::Submitted | K::Requeued => {
                        now = Some(Situation::WaitingForSlot);
                        agent = None;
                    }
                    K::Dispatched => {
                        now = Some(Situation::Dispatched);
                        agent = a.clone();
                        agent_away = false;
                    }
                    K::Started => now = Some(Situation::Running),
                    K::Ended => return Some(Situation::Ended),
                    _ => {}
                },
                Ev::Core {
                    kind: K::AgentDisconnected | K::AgentLost,
                    agent: Some(a),
                    ..
                } if agent.as_ref() == Some(a) => agent_away = true,
                Ev::Core {
                    kind: K::AgentConnected,
                    agent: Some(a),
                    ..
                } if agent.as_ref() == Some(a) => agent_away = false,
                _ => {}
            }
        }
        if agent_away && matches!(now, Some(Situation::Dispatched | Situation::Running)) {
            return Some(Situation::AgentReconnecting);
        }
        now
    })
}

async fn cancel(world: &World, trace: &Trace, ids: &Ids, fault: &Fault, owner: &str, bound: u64) {
    let name = fault.job.clone().unwrap_or_default();
    let deadline = trace.now() + bound;
    // Wait for the job to be acknowledged and, if asked, in its situation.
    let job = loop {
        let id = ids.lock().expect("ids").get(&name).copied();
        if let Some(id) = id {
            match fault.when {
                None => break id,
                Some(want) if situation_of(trace, id) == Some(want) => break id,
                Some(_) => {}
            }
        }
        if trace.now() >= deadline {
            trace.push(Ev::Fault {
                what: format!("cancel {name}: its moment never came"),
                action: None,
                agents: Vec::new(),
                latency_ms: None,
            });
            return;
        }
        trace.changed(deadline).await;
    };
    trace.push(Ev::Fault {
        what: match fault.when {
            Some(when) => format!("cancel {name} ({when:?})"),
            None => format!("cancel {name}"),
        },
        action: Some(Action::Cancel),
        agents: Vec::new(),
        latency_ms: None,
    });
    trace.push(Ev::CancelIssued {
        name: name.clone(),
        job: job.0,
    });
    let client = world.client(owner);
    while trace.now() < deadline {
        if client.cancel(job).await.is_ok() {
            trace.push(Ev::CancelSent {
                name: name.clone(),
                job: job.0,
            });
            return;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Nodes that are down, so that settling knows which agents to wait for.
#[derive(Default)]
struct Down {
    killed: std::collections::BTreeSet<usize>,
    paused: std::collections::BTreeSet<usize>,
    supervisor: bool,
}

fn apply(world: &World, trace: &Trace, down: &Mutex<Down>, fault: &Fault) {
    let handle = Handle::current();
    let net = NetSim::current();
    let sup = world.supervisor.id();
    let mut down = down.lock().expect("down");
    let targets = fault
        .agent
        .as_ref()
        .map(|t| t.agents(world.agent_count()))
        .unwrap_or_default();
    for &i in &targets {
        let node = world.agent_node(i);
        match fault.action {
            Action::PauseAgent if !down.paused.contains(&i) => trace.push(Ev::Frozen {
                agent: agent_name(i),
            }),
            // A killed or restarted node is no longer frozen either.
            Action::ResumeAgent
            | Action::KillAgent
            | Action::RestartAgent
            | Action::RebootAgent
                if down.paused.contains(&i) =>
            {
                trace.push(Ev::Thawed {
                    agent: agent_name(i),
                })
            }
            _ => {}
        }
        match fault.action {
            Action::KillAgent => {
                handle.kill(node);
                down.killed.insert(i);
                down.paused.remove(&i);
            }
            Action::RestartAgent => {
                // madsim's restart alone keeps a live node's sockets; a
                // restart is a crash and a fresh start.
                handle.kill(node);
                handle.restart(node);
                down.killed.remove(&i);
                down.paused.remove(&i);
            }
            Action::RebootAgent => {
                if down.killed.contains(&i) {
                    handle.kill(node); // no half-open links of a dead node
                }
                world.reboot(i, trace);
                down.killed.remove(&i);
                down.paused.remove(&i);
            }
            Action::PauseAgent => {
                handle.pause(node);
                down.paused.insert(i);
            }
            Action::ResumeAgent => {
                handle.resume(node);
                down.paused.remove(&i);
            }
            Action::Partition => {
                net.clog_link(node, sup);
                net.clog_link(sup, node);
            }
            Action::Heal => {
                net.unclog_link(node, sup);
                net.unclog_link(sup, node);
            }
            Action::DropPings => net.clog_link(node, sup),
            Action::RestorePings => net.unclog_link(node, sup),
            _ => {}
        }
    }
    match fault.action {
        Action::Latency => {
            let [lo, hi] = fault.latency_ms.unwrap_or([1, 5]);
            net.update_config(|c| {
                c.send_latency = Duration::from_millis(lo)..Duration::from_millis(hi + 1);
            });
        }
        Action::PartitionClients | Action::HealClients => {
            if let Some(control) = *world.control.lock().expect("control") {
                if fault.action == Action::PartitionClients {
                    net.clog_link(control, sup);
                    net.clog_link(sup, control);
                } else {
                    net.unclog_link(control, sup);
                    net.unclog_link(sup, control);
                }
            }
        }
        Action::CrashSupervisor => {
            handle.kill(sup);
            trace.forget_core();
            trace.push(Ev::SupervisorDown);
            down.supervisor = true;
        }
        Action::RestartSupervisor => {
            handle.kill(sup);
            trace.forget_core();
            trace.push(Ev::SupervisorDown);
            handle.restart(sup);
            down.supervisor = false;
        }
        _ => {}
    }
    let on = if targets.len() == world.agent_count() && targets.len() > 1 {
        " all agents".to_string()
    } else {
        targets
            .iter()
            .map(|i| format!(" {}", agent_name(*i)))
            .collect()
    };
    trace.push(Ev::Fault {
        what: format!("{:?}{on}", fault.action),
        action: Some(fault.action),
        agents: targets.iter().map(|i| agent_name(*i)).collect(),
        latency_ms: (fault.action == Action::Latency).then(|| fault.latency_ms.unwrap_or([1, 5])),
    });
}

/// Waits, for at most the scenario's bound, until every job is terminal,
/// every agent that is up is connected and idle, and no process runs on
/// one.
async fn settle(world: &World, scenario: &Scenario, trace: &Trace, ids: &Ids, down: &Mutex<Down>) {
    let began = trace.now();
    let deadline = began + scenario.expect.settle_ms;
    loop {
        let (up, supervisor_down, up_names) = {
            let down = down.lock().expect("down");
            let up: Vec<usize> = (0..world.agent_count())
                .filter(|i| !down.killed.contains(i) && !down.paused.contains(i))
                .collect();
            let names: Vec<String> = up.iter().map(|i| agent_name(*i)).collect();
            (up.len(), down.supervisor, names)
        };
        let view = trace.core_view().unwrap_or(CoreView {
            connected_agents: 0,
            cpus_used: u32::MAX,
            live_jobs: usize::MAX,
        });
        let acked = ids.lock().expect("ids").len();
        let abandoned = trace.with(|entries| {
            entries
                .iter()
                .filter(|e| matches!(e.ev, Ev::SubmitAbandoned { .. }))
                .count()
        });
        let running = running_processes(trace, &up_names);
        let submitted = acked + abandoned == scenario.jobs.len();
        let ok = !supervisor_down
            && submitted
            && view.live_jobs == 0
            && view.cpus_used == 0
            && view.connected_agents == up
            && running == 0;
        if ok || trace.now() >= deadline {
            trace.push(Ev::Settled {
                ok,
                detail: format!(
                    "after {} ms: acked {acked}/{} jobs ({abandoned} given up), {} live in the core, {} cpus used, {}/{up} agents connected, {running} processes running{}",
                    trace.now() - began,
                    scenario.jobs.len(),
                    view.live_jobs,
                    view.cpus_used,
                    view.connected_agents,
                    if supervisor_down { ", supervisor down" } else { "" }
                ),
            });
            return;
        }
        // Nothing changes what settling looks at but the trace and the
        // core (the fault plan is over): wait for either.
        trace.changed(deadline).await;
    }
}

fn running_processes(trace: &Trace, agents: &[String]) -> usize {
    trace
        .running_processes()
        .iter()
        .filter(|(_, _, a)| agents.contains(a))
        .count()
}

/// Every job as the API lists it, into the trace.
async fn finals(world: &World, trace: &Trace) {
    let admin = world.client("admin");
    let mut before: Option<u64> = None;
    let mut jobs = Vec::new();
    loop {
        let query = match before {
            Some(b) => format!("limit=1000&before={b}"),
            None => "limit=1000".to_string(),
        };
        // The supervisor may have just restarted: retry for a while.
        let deadline = trace.now() + 30_000;
        let page = loop {
            match admin.jobs(&query).await {
                Ok(page) => break page,
                Err(e) if trace.now() >= deadline => {
                    trace.push(Ev::Settled {
                        ok: false,
                        detail: format!("the final listing failed: {e}"),
                    });
                    return;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
            }
        };
        let Some(last) = page.iter().map(|j| j.id.0).min() else {
            break;
        };
        let full = page.len() == 1000;
        jobs.extend(page);
        if !full {
            break;
        }
        before = Some(last);
    }
    jobs.sort_by_key(|j| j.id);
    for job in jobs {
        trace.push(Ev::Final {
            job: job.id.0,
            name: job.spec.env.get("SIM_NAME").cloned().unwrap_or_default(),
            state: job.state,
            attempts: job.attempts.len(),
            reason: job.reason.to_string(),
            exit_code: job.exit_code,
            output_tail: job.output_tail.clone(),
        });
    }
}
