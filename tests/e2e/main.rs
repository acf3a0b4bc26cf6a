//! End-to-end: the real `foreman` binary as supervisor, local agents and
//! CLI, running real commands on loopback.
#![cfg(not(madsim))]

mod agents;
mod bounds;
mod harness;
mod hostile;
mod lifecycle;
mod many_users;
mod tls;

use std::time::Duration;

use foreman::core::{JobState, SubmitSpec};
use harness::*;

const BOUND: Duration = Duration::from_secs(30);

fn sh(script: &str) -> SubmitSpec {
    SubmitSpec::command(["sh", "-c", script])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2e_real_commands_report_output_and_exit_codes() {
    let sup = Supervisor::start(2).await;
    let ok = sup
        .admin
        .submit(&sh("echo to-stdout; echo to-stderr >&2"))
        .await
        .unwrap();
    let failing = sup.admin.submit(&sh("echo partial; exit 7")).await.unwrap();
    let missing = sup
        .admin
        .submit(&SubmitSpec::command(["/no/such/program"]))
        .await
        .unwrap();
    let ok = sup
        .wait_state(&sup.admin, ok.job.id, JobState::Succeeded, BOUND)
        .await;
    assert_eq!(ok.job.exit_code, Some(0));
    assert!(ok.job.output_tail.contains("to-stdout") && ok.job.output_tail.contains("to-stderr"));
    let failing = sup
        .wait_state(&sup.admin, failing.job.id, JobState::Failed, BOUND)
        .await;
    assert_eq!(failing.job.exit_code, Some(7));
    assert_eq!(failing.job.output_tail, "partial\n");
    let missing = sup
        .wait_state(&sup.admin, missing.job.id, JobState::Failed, BOUND)
        .await;
    assert!(
        missing.job.reason.contains("could not start"),
        "{}",
        missing.job.reason
    );
    // The CLI sees the same, as text and as JSON.
    let (success, out, _) = sup.cli(&["status", &failing.job.id.to_string()]);
    assert!(
        success && out.contains("failed") && out.contains("exit code: 7"),
        "{out}"
    );
    let (success, out, _) = sup.cli(&["jobs", "--json"]);
    assert!(success);
    let listed: serde_json::Value = serde_json::from_str(&out).expect("jobs --json is JSON");
    assert_eq!(listed.as_array().map(Vec::len), Some(3));
    let (success, out, err) = sup.cli(&["submit", "--json", "--", "echo", "via-cli"]);
    assert!(success, "{err}");
    let submitted: serde_json::Value = serde_json::from_str(&out).expect("submit --json is JSON");
    let id = submitted["id"].as_u64().expect("id");
    let (success, out, _) = sup.cli(&["watch", &id.to_string()]);
    assert!(success, "watch exits 0 for a job that succeeds: {out}");
    assert!(
        out.contains("succeeded") && out.contains("via-cli"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2e_cancel_kills_the_whole_process_tree() {
    let sup = Supervisor::start(1).await;
    let marker = unique_sleep(1);
    let script = format!("sh -c 'sleep {marker}' & sleep {marker}; wait");
    let job = sup.admin.submit(&sh(&script)).await.unwrap().job.id;
    sup.wait_state(&sup.admin, job, JobState::Running, BOUND)
        .await;
    let procs = wait_for("child and grandchild to start", BOUND, || async {
        let pids = pids_matching(&format!("sleep {marker}"));
        (pids.len() >= 2).then_some(pids)
    })
    .await;
    assert!(procs.len() >= 2);
    let (success, out, _) = sup.cli(&["cancel", &job.to_string()]);
    assert!(success && out.contains("cancel"), "{out}");
    sup.wait_state(&sup.admin, job, JobState::Canceled, BOUND)
        .await;
    wait_for("every process of the job to be gone", BOUND, || async {
        pids_matching(&format!("sleep {marker}"))
            .is_empty()
            .then_some(())
    })
    .await;
    // Cancel again: idempotent, and says how it ended.
    let again = sup.admin.cancel(job).await.unwrap();
    assert_eq!(again.job.state, JobState::Canceled);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2e_run_timeout_ends_its_job_only_and_kills_it() {
    let sup = Supervisor::start(2).await;
    let bob = sup.add_user("bob", "basic");
    let marker = unique_sleep(2);
    let slow = SubmitSpec {
        max_run_secs: Some(1),
        ..sh(&format!("sleep {marker}"))
    };
    let slow = sup.admin.submit(&slow).await.unwrap().job.id;
    let bobs = bob
        .submit(&sh("sleep 2; echo bob-done"))
        .await
        .unwrap()
        .job
        .id;
    let timed_out = sup
        .wait_state(&sup.admin, slow, JobState::TimedOut, BOUND)
        .await;
    assert!(
        timed_out.job.reason.contains("max_run_secs=1"),
        "{}",
        timed_out.job.reason
    );
    wait_for("the timed-out process to be killed", BOUND, || async {
        pids_matching(&format!("sleep {marker}"))
            .is_empty()
            .then_some(())
    })
    .await;
    let bobs = sup.wait_state(&bob, bobs, JobState::Succeeded, BOUND).await;
    assert_eq!(bobs.job.output_tail, "bob-done\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2e_agent_killed_mid_job_is_replaced_and_the_job_retried_or_lost() {
    let sup = Supervisor::start(1).await;
    sup.wait_agents(1).await;
    let marker = unique_sleep(3);
    let retry = SubmitSpec {
        max_attempts: 2,
        ..sh(&format!("sleep {marker}; echo second-try"))
    };
    let job = sup.admin.submit(&retry).await.unwrap().job.id;
    sup.wait_state(&sup.admin, job, JobState::Running, BOUND)
        .await;
    let agents = sup.agent_pids("local-0");
    assert_eq!(agents.len(), 1, "one local agent");
    std::process::Command::new("kill")
        .args(["-9", &agents[0].to_string()])
        .status()
        .unwrap();
    // The local driver starts a replacement; it reaps the orphaned process
    // and the supervisor reruns the job as attempt 2.
    let rerun = wait_for("attempt 2 to run", BOUND, || async {
        sup.admin
            .job(job)
            .await
            .ok()
            .filter(|v| v.job.attempts.len() == 2 && v.job.state == JobState::Running)
    })
    .await;
    assert!(rerun
        .job
        .history
        .iter()
        .any(|t| t.reason.contains("came back without attempt 1")));
    let replacement = sup.agent_pids("local-0");
    assert!(
        replacement.len() == 1 && replacement != agents,
        "a new local agent runs"
    );
    assert_eq!(
        sleeps(&marker).len(),
        1,
        "the orphan of attempt 1 was reaped; only attempt 2 runs"
    );
    sup.admin.cancel(job).await.unwrap();
    sup.wait_state(&sup.admin, job, JobState::Canceled, BOUND)
        .await;
    // Without retries, the same loss ends the job lost.
    let once = sup
        .admin
        .submit(&sh(&format!("sleep {}", unique_sleep(4))))
        .await
        .unwrap()
        .job
        .id;
    sup.wait_state(&sup.admin, once, JobState::Running, BOUND)
        .await;
    for pid in sup.agent_pids("local-0") {
        std::process::Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status()
            .unwrap();
    }
    let lost = sup
        .wait_state(&sup.admin, once, JobState::Lost, BOUND)
        .await;
    assert!(lost.job.reason.contains("local-0"), "{}", lost.job.reason);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2e_supervisor_kill_9_under_load_forgets_no_acknowledged_job() {
    let mut sup = Supervisor::start(2).await;
    sup.wait_agents(2).await;
    let long = sup
        .admin
        .submit(&sh("sleep 3; echo across-the-crash"))
        .await
        .unwrap()
        .job
        .id;
    // Submissions in flight while the supervisor dies: every one that was
    // acknowledged must be there afterwards.
    let client = sup.admin.clone();
    let submitter = tokio::spawn(async move {
        let mut acknowledged = Vec::new();
        for i in 0..400 {
            match client.submit(&sh(&format!("echo {i}"))).await {
                Ok(view) => acknowledged.push(view.job.id),
                Err(_) => break,
            }
        }
        acknowledged
    });
    wait_for("some submissions to be acknowledged", BOUND, || async {
        let jobs = sup.admin.jobs("limit=50").await.ok()?;
        (jobs.len() >= 20).then_some(())
    })
    .await;
    sup.kill_9();
    let acknowledged = submitter.await.unwrap();
    assert!(!acknowledged.is_empty());
    // Restart without new local agents: the old ones reconnect and reconcile.
    sup.restart(0).await;
    for id in acknowledged.iter().chain([&long]) {
        let view = sup
            .wait_state(&sup.admin, *id, JobState::Succeeded, BOUND)
            .await;
        assert_eq!(view.job.id, *id);
    }
    let view = sup.admin.job(long).await.unwrap();
    assert_eq!(
        view.job.output_tail, "across-the-crash\n",
        "the job ran on across the crash"
    );
    assert_eq!(view.job.attempts.len(), 1, "and was not run twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2e_the_journal_replays_a_real_run_to_the_states_in_the_store() {
    let mut sup = Supervisor::start(2).await;
    let ok = sup.admin.submit(&sh("echo fine")).await.unwrap().job.id;
    let bad = sup.admin.submit(&sh("exit 4")).await.unwrap().job.id;
    let long = sup
        .admin
        .submit(&sh(&format!("sleep {}", unique_sleep(5))))
        .await
        .unwrap()
        .job
        .id;
    sup.wait_state(&sup.admin, ok, JobState::Succeeded, BOUND)
        .await;
    sup.wait_state(&sup.admin, bad, JobState::Failed, BOUND)
        .await;
    sup.wait_state(&sup.admin, long, JobState::Running, BOUND)
        .await;
    sup.admin.cancel(long).await.unwrap();
    sup.wait_state(&sup.admin, long, JobState::Canceled, BOUND)
        .await;
    let stored: Vec<(u64, String)> = sup
        .admin
        .jobs("")
        .await
        .unwrap()
        .iter()
        .map(|j| (j.id.0, j.state.to_string()))
        .collect();
    sup.kill_9();
    let journal = sup.path().join("journal").join("current.jsonl");
    let mut replayed: std::collections::BTreeMap<u64, String> = Default::default();
    let mut steps = 0;
    foreman::server::journal::replay(&journal, |step| {
        steps += 1;
        // Every step recorded what the core decided, and today's core,
        // the same code, decides the same.
        assert_eq!(
            step.recorded.as_deref(),
            Some(foreman::server::journal::decisions_digest(&step.effects).as_str()),
            "line {}",
            step.line
        );
        for effect in step.effects {
            if let foreman::core::Effect::Persist { job } = effect {
                replayed.insert(job.id.0, job.state.to_string());
            }
        }
    })
    .expect("the journal replays");
    assert!(steps > 0);
    // Killed: its start is there, and no end.
    let text = std::fs::read_to_string(&journal).unwrap();
    assert!(text.contains("\"supervisor\":{\"event\":\"started\""));
    assert!(!text.contains("\"event\":\"stopped\""));
    for (id, state) in &stored {
        assert_eq!(
            replayed.get(id),
            Some(state),
            "job {id} replays to what the store holds"
        );
    }
    let (success, out, err) = sup.cli(&["replay", &journal.display().to_string()]);
    assert!(success, "{err}");
    assert!(
        out.contains("Ended") && err.contains("replayed"),
        "{out}\n{err}"
    );
    // Piped into a reader that is gone (`| head`), it ends quietly.
    let mut piped = std::process::Command::new(FOREMAN)
        .args(["replay", "--json", &journal.display().to_string()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(piped.stdout.take());
    let ended = piped.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&ended.stderr);
    assert_eq!(ended.status.code(), Some(141), "as if by SIGPIPE: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    // Today's scheduler decides as the one that wrote it did...
    let (success, out, err) = sup.cli(&["replay", "--check", &journal.display().to_string()]);
    assert!(success, "{out}\n{err}");
    assert!(out.contains("decides as recorded at all"), "{out}");
    // ...and where a step recorded other decisions (as if other code had
    // made them), the check names its line and shows the inputs around it.
    let text = std::fs::read_to_string(&journal).unwrap();
    let mut lines: Vec<String> = text.lines().map(String::from).collect();
    let (n, _) = lines
        .iter()
        .enumerate()
        .filter(|(_, l)| l.starts_with("{\"decided\":"))
        .nth(2)
        .expect("three steps");
    lines[n] = format!("{{\"decided\":\"{}\"}}", "f".repeat(32));
    let other = sup.path().join("other.jsonl");
    std::fs::write(&other, lines.join("\n") + "\n").unwrap();
    let (success, out, _) = sup.cli(&["replay", "--check", &other.display().to_string()]);
    assert!(!success, "{out}");
    assert!(
        out.contains(&format!("other.jsonl:{n}: at ")) && out.contains(&"f".repeat(32)),
        "{out}"
    );
    assert!(
        out.contains("inputs around it:") && out.contains(&format!("> {n:>7}")),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn e2e_an_incident_bundle_holds_the_window_and_no_secret() {
    let mut sup = Supervisor::start(1).await;
    sup.wait_agents(1).await;
    let mut spec = sh("echo \"a value of ${#DB_URL} characters\"");
    spec.env.insert("DB_URL".into(), "s3cret-value".into());
    let job = sup.admin.submit(&spec).await.unwrap().job.id;
    sup.wait_state(&sup.admin, job, JobState::Succeeded, BOUND)
        .await;
    let bundle = sup.path().join("incident.jsonl");
    let path = bundle.display().to_string();
    let (success, out, err) = sup.cli(&["incident", "--since", "1h", "-o", &path]);
    assert!(success, "{out}\n{err}");
    assert!(
        out.contains("1 jobs") && out.contains("current.jsonl"),
        "{out}"
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&bundle).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let text = std::fs::read_to_string(&bundle).unwrap();
    // Nothing secret: not the job's environment, not the admin's token.
    // (A job's output is its own: one that prints its secrets shows them.)
    let admin_token = std::fs::read_to_string(sup.path().join("admin.token")).unwrap();
    assert!(!text.contains(admin_token.trim()), "the admin token leaked");
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("every line is JSON"))
        .collect();
    for line in &lines {
        let spec_env = [
            line.pointer("/input/spec/env/DB_URL"),
            line.pointer("/spec/env/DB_URL"),
        ];
        for value in spec_env.into_iter().flatten() {
            assert_eq!(value, "<redacted>");
        }
    }
    let header = &lines[0];
    assert_eq!(header["bundle"], "foreman-incident");
    assert_eq!(header["foreman_version"], env!("CARGO_PKG_VERSION"));
    let jobs = header["jobs"].as_array().unwrap();
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0]["id"], job.0);
    assert_eq!(jobs[0]["spec"]["env"]["DB_URL"], "<redacted>");
    assert!(
        header["config"]["plans"].is_object(),
        "{}",
        header["config"]
    );
    let start = &header["supervisor"][0];
    assert_eq!(start["event"], "started", "{}", header["supervisor"]);
    assert_eq!(start["version"], env!("CARGO_PKG_VERSION"));
    assert!(
        start["settings"]["ping_timeout_ms"].as_u64() > Some(0),
        "{start}"
    );
    assert!(
        header["agents"]["local-0"].is_array(),
        "{}",
        header["agents"]
    );
    // Each segment whole, from its snapshot, its submit included.
    assert_eq!(lines[1]["segment"], "current.jsonl");
    assert!(lines[2].get("snapshot").is_some());
    let submit = lines
        .iter()
        .find(|l| l.pointer("/input/input") == Some(&"submit".into()))
        .expect("the submit");
    assert_eq!(submit["input"]["spec"]["env"]["DB_URL"], "<redacted>");
    assert!(
        !text.contains("s3cret-value"),
        "an environment value leaked"
    );
    assert!(
        text.contains("a value of 12 characters"),
        "the job ran with it"
    );
    // The bundle's inputs, redacted, replay through today's scheduler to
    // the decisions recorded when they were made.
    let (success, out, err) = sup.cli(&["replay", "--check", &path]);
    assert!(success, "{out}\n{err}");
    assert!(
        out.contains("[current.jsonl]: today's scheduler decides as recorded at all"),
        "{out}"
    );
    // The job's life alone; and what cannot be bundled is refused, clearly,
    // leaving nothing behind.
    let by_job = sup.path().join("by-job.jsonl").display().to_string();
    let (success, out, err) = sup.cli(&["incident", "--job", &job.0.to_string(), "-o", &by_job]);
    assert!(success && out.contains("1 jobs"), "{out}\n{err}");
    for (args, says) in [
        (vec!["--since", "5x"], "a number and s, m, h or d"),
        (vec!["--job", "999999"], "no job 999999"),
        (vec![], "--since, or --job"),
    ] {
        let refused = sup.path().join("refused.jsonl").display().to_string();
        let mut all = vec!["incident", "-o", refused.as_str()];
        all.extend(args);
        let (success, _, err) = sup.cli(&all);
        assert!(!success && err.contains(says), "{all:?}: {err}");
        assert!(!std::path::Path::new(&refused).exists());
        assert!(!sup.path().join("refused.partial").exists());
    }
    // The journal tells a stop from a crash: a clean stop writes its end.
    assert!(sup.stop().await);
    let journal = std::fs::read_to_string(sup.path().join("journal/current.jsonl")).unwrap();
    let ends: Vec<&str> = journal
        .lines()
        .filter(|l| l.contains("\"supervisor\":{\"event\":\"stopped\""))
        .collect();
    assert_eq!(ends.len(), 1, "{journal}");
    assert!(journal.lines().last().unwrap().contains("\"stopped\""));
    // A bundle of a stopped supervisor's data dir, read without changing it.
    let before = std::fs::metadata(sup.path().join("foreman.db"))
        .unwrap()
        .modified()
        .unwrap();
    let (success, out, err) = sup.cli(&["incident", "--since", "1h", "-o", &path]);
    assert!(success && out.contains("1 jobs"), "{out}\n{err}");
    let after = std::fs::metadata(sup.path().join("foreman.db"))
        .unwrap()
        .modified()
        .unwrap();
    assert_eq!(before, after);
}
