//! A clean lifecycle: SIGTERM and SIGINT stop the supervisor with
//! everything it accepted committed; a restart takes running jobs back;
//! stopped for good, it leaves no agent reconnecting forever.

use std::time::Duration;

use foreman::core::{JobState, SubmitSpec};

use crate::harness::*;

const BOUND: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_a_stop_keeps_running_jobs_for_a_restart_and_a_stop_for_good_ends_the_agents() {
    let mut sup = Supervisor::start_with(1, Some("local_agent_leave_secs = 2\n")).await;
    sup.wait_agents(1).await;
    let agent = sup.agent_pids("local-0");
    assert_eq!(agent.len(), 1, "{agent:?}");
    let job = sup
        .admin
        .submit(&SubmitSpec::command(["sleep", "2"]))
        .await
        .unwrap()
        .job
        .id;
    sup.wait_state(&sup.admin, job, JobState::Running, BOUND)
        .await;
    // Stopped: it says what becomes of the running job, and exits 0.
    assert!(sup.stop().await, "a clean stop exits 0");
    let log = sup.log();
    assert!(log.contains("SIGTERM: stopping"), "{log}");
    assert!(log.contains("1 jobs hold attempts on 1 agents"), "{log}");
    assert!(!sup.path().join("server.json").exists());
    // Started again: the job is taken back and ends as its program does.
    sup.restart(1).await;
    let done = sup
        .wait_state(&sup.admin, job, JobState::Succeeded, BOUND)
        .await;
    assert_eq!(done.job.attempts.len(), 1, "{:?}", done.job.attempts);
    // Stopped for good (SIGINT this time): the local agent, idle, leaves.
    let mut child = sup.process.take().unwrap();
    let pid = child.id().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap()
        .success());
    let status = wait_for("the supervisor to exit", BOUND, || {
        let status = child.try_wait().unwrap();
        async move { status }
    })
    .await;
    assert!(status.success());
    assert!(sup.log().contains("SIGINT: stopping"));
    wait_for("the local agents to leave", BOUND, || async {
        sup.agent_pids("local-0").is_empty().then_some(())
    })
    .await;
}
