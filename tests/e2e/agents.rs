//! The agent's own guarantees: a runner that panics still ends its attempt,
//! jobs do not see the agent's environment, one agent per work dir.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use foreman::agent::runner::{RunControl, RunFuture, RunOrder, Runner};
use foreman::agent::{Agent, AgentOptions};
use foreman::client::Client;
use foreman::core::{CoreConfig, JobState, SubmitSpec};
use foreman::server::{self, auth, AgentEndpoint, ServerOptions};
use foreman::store::User;

use crate::harness::*;

const BOUND: Duration = Duration::from_secs(30);

struct PanickingRunner;

impl Runner for PanickingRunner {
    fn run(&self, _order: RunOrder, _control: RunControl) -> RunFuture {
        Box::pin(async { panic!("this runner is broken") })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_a_panicking_runner_ends_its_attempt_failed() {
    let dir = tempfile::tempdir().unwrap();
    let running = server::start(ServerOptions {
        data_dir: dir.path().to_path_buf(),
        core: CoreConfig::default(),
        api_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        agent_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        endpoint: AgentEndpoint {
            ping_interval_ms: 200,
            ping_timeout_ms: 2_000,
            hello_timeout_ms: 2_000,
        },
        bootstrap_users: vec![(
            User {
                name: "admin".into(),
                plan: "premium".into(),
                admin: true,
            },
            auth::sha256_hex("admin-secret"),
        )],
        bootstrap_agents: vec![("broken".to_string(), auth::sha256_hex("agent-secret"))],
        journal_segment_bytes_max: 0,
        journal_segments_max: 0,
        observer: None,
        commit_delay_ms: 0,
        commit_without_fsync: false,
        fsync_delay_us: 0,
        tls: None,
        http: Default::default(),
    })
    .await
    .unwrap();
    let options = AgentOptions {
        supervisor: running.agent_addr.to_string(),
        token: "agent-secret".into(),
        agent_id: "broken".into(),
        cpus: 1,
        labels: BTreeMap::new(),
        work_dir: dir.path().join("runs"),
        reconnect_min_ms: 50,
        reconnect_max_ms: 500,
        reconnect_attempts_max: Some(100),
        leave_alone_ms: None,
        tls: None,
    };
    tokio::spawn(Agent::new(options, Arc::new(PanickingRunner)).run());
    let admin = Client::new(running.api_addr.to_string(), "admin-secret");
    let job = admin
        .submit(&SubmitSpec::command(["anything"]))
        .await
        .unwrap()
        .job
        .id;
    let view = wait_for("the job to end", BOUND, || async {
        admin
            .job(job)
            .await
            .ok()
            .filter(|v| v.job.state.is_terminal())
    })
    .await;
    assert_eq!(view.job.state, JobState::Failed);
    assert!(
        view.job.reason.contains("the runner failed"),
        "{}",
        view.job.reason
    );
    // The agent's CPU is free again: the next job is dispatched too.
    let next = admin
        .submit(&SubmitSpec::command(["anything"]))
        .await
        .unwrap()
        .job
        .id;
    wait_for("the next job to end", BOUND, || async {
        admin
            .job(next)
            .await
            .ok()
            .filter(|v| v.job.state.is_terminal())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_jobs_do_not_inherit_the_agents_environment() {
    let sup = Supervisor::start(1).await;
    let spec = SubmitSpec {
        env: BTreeMap::from([("MINE".to_string(), "given".to_string())]),
        ..SubmitSpec::command(["sh", "-c", "env | sort"])
    };
    let job = sup.admin.submit(&spec).await.unwrap().job.id;
    let view = sup
        .wait_state(&sup.admin, job, JobState::Succeeded, BOUND)
        .await;
    let env = view.job.output_tail;
    assert!(env.contains("MINE=given"), "{env}");
    assert!(env.contains("FOREMAN_JOB_ID="), "{env}");
    assert!(
        !env.contains("FOREMAN_LOG"),
        "the agent's environment leaked: {env}"
    );
    assert!(!env.contains("FOREMAN_DATA_DIR"), "{env}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_a_second_agent_on_one_work_dir_refuses_to_start() {
    let sup = Supervisor::start(1).await;
    sup.wait_agents(1).await;
    let intruder = tokio::process::Command::new(FOREMAN)
        .args([
            "agent",
            "--supervisor",
            &sup.agent,
            "--id",
            "intruder",
            "--token-file",
        ])
        .arg(sup.agent_token("intruder").1)
        .arg("--work-dir")
        .arg(sup.path().join("runs").join("local-0"))
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(BOUND, intruder)
        .await
        .expect("the second agent exits instead of running")
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("another agent is running on this work dir"),
        "{stderr}"
    );
}
