//! Safe for many users: no job stalls the queue, each user's waiting jobs
//! are bounded, a reused idempotency key cannot stand for another job, and
//! accounts are checked when they are made.

use std::time::Duration;

use foreman::client::Client;
use foreman::core::{JobState, SubmitSpec};
use foreman::server::api::JobView;
use hyper::StatusCode;

use crate::harness::*;

const BOUND: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_users_a_job_larger_than_every_agent_blocks_no_one() {
    let sup = Supervisor::start(1).await;
    sup.wait_agents(1).await;
    let ana = sup.add_user("ana", "basic");
    let bob = sup.add_user("bob", "basic");
    // Larger than anything the configuration can grant: refused at once.
    let (status, message) = api_error(
        ana.submit(&SubmitSpec {
            cpus: 100_000,
            ..SubmitSpec::command(["true"])
        })
        .await,
    );
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{message}");
    assert!(message.contains("cpus must be between 1 and"), "{message}");
    // Larger than every connected agent: accepted, says why it waits, and
    // every later job (its user's and others') runs past it.
    let (ok, out, err) = sup.cli(&["submit", "--cpus", "64", "--", "true"]);
    assert!(ok, "{err}");
    let big = foreman::core::JobId(
        out.split_whitespace()
            .find_map(|w| w.parse().ok())
            .unwrap_or_else(|| panic!("a job id in {out:?}")),
    );
    let later = [
        ana.submit(&SubmitSpec::command(["true"])).await.unwrap(),
        bob.submit(&SubmitSpec::command(["true"])).await.unwrap(),
    ];
    for (client, view) in [(&ana, &later[0]), (&bob, &later[1])] {
        sup.wait_state(client, view.job.id, JobState::Succeeded, BOUND)
            .await;
    }
    let view = sup.admin.job(big).await.unwrap();
    assert_eq!(view.job.state, JobState::Queued);
    assert_eq!(
        view.situation.as_deref(),
        Some("needs 64 CPUs; the largest connected agent has 1: waiting out of line for one that fits")
    );
    // An agent that fits connects: the job runs there.
    let mut agent = std::process::Command::new(FOREMAN)
        .args(["agent", "--supervisor", &sup.agent, "--cpus", "64"])
        .args(["--id", "wide", "--token-file"])
        .arg(sup.agent_token("wide").1)
        .arg("--work-dir")
        .arg(sup.path().join("runs"))
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("an agent starts");
    let done = sup
        .wait_state(&sup.admin, big, JobState::Succeeded, BOUND)
        .await;
    assert_eq!(done.job.attempts[0].agent.as_str(), "wide");
    let _ = agent.kill();
    let _ = agent.wait();
}

const SMALL_PLAN: &str = r#"
[core.plans.basic]
priority = 0
max_queued = 3
sequential = { max_running = 1, max_run_secs_limit = 3600, default_run_secs = 3600 }
parallel = { max_running = 1, max_run_secs_limit = 3600, default_run_secs = 3600 }

[core.plans.premium]
priority = 10
sequential = { max_running = 8, max_run_secs_limit = 3600, default_run_secs = 3600 }
parallel = { max_running = 4, max_run_secs_limit = 3600, default_run_secs = 3600 }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_users_queued_jobs_are_bounded_and_keys_name_one_request() {
    // No agents: every job stays queued.
    let sup = Supervisor::start_with(0, Some(SMALL_PLAN)).await;
    let ana = sup.add_user("ana", "basic");
    let keyed = |argv: &str| SubmitSpec {
        idempotency_key: Some("nightly-1".into()),
        ..SubmitSpec::command(["sh", "-c", argv])
    };
    let first = ana.submit(&keyed("echo a")).await.unwrap().job.id;
    assert_eq!(ana.submit(&keyed("echo a")).await.unwrap().job.id, first);
    let (status, message) = api_error(ana.submit(&keyed("echo b")).await);
    assert_eq!(status, StatusCode::CONFLICT, "{message}");
    assert!(
        message.contains(&format!(
            "was used for job {first} with a different request"
        )),
        "{message}"
    );
    for _ in 0..2 {
        ana.submit(&SubmitSpec::command(["true"])).await.unwrap();
    }
    let (status, message) = api_error(ana.submit(&SubmitSpec::command(["true"])).await);
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{message}");
    assert_eq!(
        message,
        "you have 3 jobs waiting; plan basic allows 3: wait for some to start, or cancel some"
    );
    // Nothing was lost, and another user is not held back by ana's bound.
    assert_eq!(ana.jobs("").await.unwrap().len(), 3);
    let bob = sup.add_user("bob", "basic");
    bob.submit(&SubmitSpec::command(["true"])).await.unwrap();
    // A cancel makes room.
    ana.cancel(first).await.unwrap();
    ana.submit(&SubmitSpec::command(["true"])).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_users_accounts_are_checked_when_they_are_made() {
    let sup = Supervisor::start_with(0, Some(SMALL_PLAN)).await;
    let add = |name: &str, plan: &str| {
        sup.cli(&[
            "user",
            "add",
            name,
            "--plan",
            plan,
            "--config",
            &sup.path().join("config.toml").display().to_string(),
        ])
    };
    let refused = [
        ("", "basic", "not valid"),
        ("Ana", "basic", "not valid"),
        ("ana\u{1b}[31m", "basic", "not valid"),
        ("ana\nINFO admin logged in", "basic", "not valid"),
        ("9lives", "basic", "not valid"),
        (&"a".repeat(65), "basic", "not valid"),
        (
            "ana",
            "gold",
            "unknown plan \"gold\": the configuration has basic, premium",
        ),
    ];
    for (name, plan, expected) in refused {
        let (ok, out, err) = add(name, plan);
        assert!(!ok, "{name:?} on {plan} was accepted: {out}");
        assert!(err.contains(expected), "{name:?}: {err}");
        assert!(out.is_empty(), "no token printed for {name:?}");
    }
    for name in ["ana", "_svc", "j.doe-2", &"a".repeat(64)] {
        let (ok, out, err) = add(name, "premium");
        assert!(ok, "{name:?}: {err}");
        assert_eq!(out.trim().len(), 64, "{name:?} gets a token: {out}");
    }
    let (ok, _, err) = add("ana", "basic");
    assert!(!ok && err.contains("exists"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_users_an_agent_credential_is_revocable_and_ends_its_connection() {
    let sup = Supervisor::start(1).await;
    sup.wait_agents(1).await;
    let (_, token_file) = sup.agent_token("remote-1");
    let mut agent = std::process::Command::new(FOREMAN)
        .args(["agent", "--supervisor", &sup.agent, "--id", "remote-1"])
        .arg("--token-file")
        .arg(&token_file)
        .arg("--work-dir")
        .arg(sup.path().join("remote-runs"))
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("an agent starts");
    sup.wait_agents(2).await;
    let (ok, out, _) = sup.cli(&["agent-token", "list"]);
    assert!(ok && out.contains("remote-1\tissued at"), "{out}");
    // Revoked: its connection closes, and it cannot come back.
    let (ok, _, err) = sup.cli(&["agent-token", "revoke", "remote-1"]);
    assert!(ok, "{err}");
    sup.wait_agents(1).await;
    let (ok, out, _) = sup.cli(&["agent-token", "list"]);
    assert!(ok && out.contains("revoked at"), "{out}");
    let (ok, _, err) = sup.cli(&["agent-token", "revoke", "remote-1"]);
    assert!(!ok && err.contains("no credential in force"), "{err}");
    let (ok, _, err) = sup.cli(&["agent-token", "add", "bad id\n"]);
    assert!(!ok && err.contains("not valid"), "{err}");
    // The local agent's own was never shared: it works on.
    let job = submitted(&sup.admin, &SubmitSpec::command(["true"])).await;
    let done = sup
        .wait_state(&sup.admin, job, JobState::Succeeded, BOUND)
        .await;
    assert_eq!(done.job.attempts[0].agent.as_str(), "local-0");
    let agents = sup.admin.agents().await.unwrap();
    let remote = agents
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["id"] == "remote-1")
        .cloned();
    assert!(
        remote.is_none_or(|a| a["link"]["link"] != "connected"),
        "{agents}"
    );
    let _ = agent.kill();
    let _ = agent.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_users_jobs_run_as_their_mapped_user_and_cannot_read_the_supervisors_secrets() {
    let config = "[core.run_as]\nana = \"daemon\"\n";
    let sup = Supervisor::start_with(1, Some(config)).await;
    sup.wait_agents(1).await;
    let ana = sup.add_user("ana", "basic");
    let root = nix::unistd::geteuid().is_root();
    let anas = run(ana.clone(), "id -un".into()).await;
    if !root {
        // An agent that may not switch users says so, at the job's start.
        assert_eq!(anas.job.state, JobState::Failed, "{anas:?}");
        assert!(
            anas.job.reason.contains("may not switch users"),
            "{}",
            anas.job.reason
        );
        return;
    }
    assert_eq!(anas.job.output_tail, "daemon\n", "{anas:?}");
    // Not mapped: the agent's default for a root agent, nobody; and no job
    // reads the data dir's secrets.
    let admins = run(
        sup.admin.clone(),
        "id -un; echo made > here; cat here".into(),
    )
    .await;
    assert_eq!(admins.job.output_tail, "nobody\nmade\n", "{admins:?}");
    // Nor through its output: a job that swaps its output file for a
    // link to a secret gets back what it printed, never the secret.
    let admin_token = std::fs::read_to_string(sup.path().join("admin.token")).unwrap();
    let swapped = run(
        ana.clone(),
        format!(
            "rm -f output; ln -s '{}' output; echo printed",
            sup.path().join("admin.token").display()
        ),
    )
    .await;
    assert_eq!(swapped.job.output_tail, "printed\n", "{swapped:?}");
    assert!(!swapped.job.output_tail.contains(admin_token.trim()));
    for secret in ["admin.token", "agents/local-0.token", "foreman.db"] {
        let path = sup.path().join(secret);
        let tried = run(ana.clone(), format!("cat '{}'", path.display())).await;
        assert_eq!(tried.job.state, JobState::Failed, "{secret}: {tried:?}");
        assert!(
            tried.job.output_tail.contains("Permission denied"),
            "{secret}: {}",
            tried.job.output_tail
        );
    }
    // A data dir its job users may not pass through (as root's home would
    // be): the job fails at start, saying which directory and what to do.
    use std::os::unix::fs::PermissionsExt;
    let set =
        |mode| std::fs::set_permissions(sup.path(), std::fs::Permissions::from_mode(mode)).unwrap();
    set(0o700);
    let stopped = run(ana.clone(), "echo unreachable".into()).await;
    set(0o711);
    assert_eq!(stopped.job.state, JobState::Failed, "{stopped:?}");
    let expected = format!(
        ": {} is 700 and does not let daemon pass through",
        std::fs::canonicalize(sup.path()).unwrap().display()
    );
    assert!(
        stopped.job.reason.contains(&expected),
        "{}",
        stopped.job.reason
    );
    let again = run(ana, "echo reachable".into()).await;
    assert_eq!(again.job.output_tail, "reachable\n", "{again:?}");
}

/// Runs `sh -c script` as `client` and waits for it to end.
async fn run(client: Client, script: String) -> JobView {
    let job = submitted(&client, &SubmitSpec::command(["sh", "-c", &script])).await;
    wait_for("the job to end", BOUND, || {
        let client = client.clone();
        async move {
            let view = client.job(job).await.ok()?;
            view.job.state.is_terminal().then_some(view)
        }
    })
    .await
}
