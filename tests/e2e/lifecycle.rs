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
    let job = submitted(&sup.admin, &SubmitSpec::command(["sleep", "2"])).await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_old_run_dirs_are_removed_by_age_and_by_size() {
    let config = "[run_dirs]\nkeep_hours = 24\nmax_mib = 1\n";
    let sup = Supervisor::start_with(1, Some(config)).await;
    sup.wait_agents(1).await;
    let work = sup.path().join("runs").join("local-0");
    let day = Duration::from_secs(24 * 3600);
    let made = |name: &str, bytes: usize, age: Duration| {
        let dir = work.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("output"), vec![b'x'; bytes]).unwrap();
        let at = std::time::UNIX_EPOCH + Duration::from_millis(foreman::seam::now().0) - age;
        for path in [dir.join("output"), dir.clone()] {
            std::fs::File::open(&path)
                .unwrap()
                .set_modified(at)
                .unwrap();
        }
        dir
    };
    let ancient = made("9001-1", 10, 3 * day);
    let large = made("9002-1", 2 * 1024 * 1024, Duration::from_secs(60));
    let small = made("9003-1", 10, Duration::from_secs(30));
    // The agent's first run sweeps its work dir.
    let job = submitted(&sup.admin, &SubmitSpec::command(["echo", "swept"])).await;
    sup.wait_state(&sup.admin, job, JobState::Succeeded, BOUND)
        .await;
    wait_for(
        "the old and the over-size run dirs removed",
        BOUND,
        || async { (!ancient.exists() && !large.exists()).then_some(()) },
    )
    .await;
    assert!(small.exists(), "within both bounds, kept");
    let own = work.join(format!("{}-1", job.0));
    assert_eq!(
        std::fs::read_to_string(own.join("output")).unwrap(),
        "swept\n"
    );
    assert!(
        work.join("agent.lock").exists(),
        "the agent's own files stay"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_a_result_outlives_its_agents_crash() {
    let mut sup = Supervisor::start(1).await;
    sup.wait_agents(1).await;
    let job = submitted(
        &sup.admin,
        &SubmitSpec::command(["sh", "-c", "sleep 1; echo kept; exit 3"]),
    )
    .await;
    sup.wait_state(&sup.admin, job, JobState::Running, BOUND)
        .await;
    // The supervisor dies; the job ends meanwhile, its result unacknowledged;
    // then the agent dies too.
    sup.kill_9();
    let outbox = sup.path().join("runs").join("local-0").join("outbox.log");
    let kept = || kept_in(&outbox, &format!("{} 1", job.0));
    wait_for("the result kept on disk", BOUND, || async {
        kept().then_some(())
    })
    .await;
    for pid in sup.agent_pids("local-0") {
        let _ = std::process::Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status();
    }
    wait_for("the agent gone", BOUND, || async {
        sup.agent_pids("local-0").is_empty().then_some(())
    })
    .await;
    // A new supervisor and a new agent on the same work dir: the result is
    // heard, the job ends as its program did, in one attempt.
    sup.restart(1).await;
    let done = sup
        .wait_state(&sup.admin, job, JobState::Failed, BOUND)
        .await;
    assert_eq!(done.job.exit_code, Some(3));
    assert_eq!(done.job.output_tail, "kept\n");
    assert_eq!(done.job.attempts.len(), 1);
    wait_for(
        "the kept result dropped once acknowledged",
        BOUND,
        || async { (!kept()).then_some(()) },
    )
    .await;
}

/// Whether the agent's outbox log at `path` holds a result for `key`
/// ("<job> <attempt>") kept and not yet dropped.
fn kept_in(path: &std::path::Path, key: &str) -> bool {
    let log = std::fs::read_to_string(path).unwrap_or_default();
    let mut kept = false;
    for line in log.lines() {
        if line.starts_with(&format!("keep {key} ")) {
            kept = true;
        } else if line == format!("drop {key}") {
            kept = false;
        }
    }
    kept
}
