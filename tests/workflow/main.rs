//! The incident workflow end to end, as an operator walks it: a real
//! supervisor with local agents under a workload, an agent killed with
//! `kill -9` mid-job, a cancel racing a job's completion; the bundle
//! (`foreman incident`); `foreman replay --check` on it; the bundle
//! imported into the simulator (`foreman-sim import`), where the real
//! server and agent code reproduce every recorded end on several seeds.
//!
//! A test binary of its own: it builds the simulator (the simulation build,
//! release, as `cargo xtask sim` does) before the supervisor starts, and
//! cargo runs test binaries one after another, so the build never competes
//! for the cores with a test whose agents must answer pings in time.
#![cfg(not(madsim))]

#[allow(dead_code)]
#[path = "../e2e/harness.rs"]
mod harness;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use foreman::core::{JobId, JobState, SubmitSpec};
use harness::*;

const BOUND: Duration = Duration::from_secs(30);
const SEEDS: u64 = 5;

fn sh(script: &str) -> SubmitSpec {
    SubmitSpec::command(["sh", "-c", script])
}

/// The workspace's root.
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace holds the crate")
        .to_path_buf()
}

/// Builds `foreman-sim` as `cargo xtask sim` does; its path.
fn simulator() -> PathBuf {
    let target = root().join("target").join("sim");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .args(["build", "--release", "--quiet", "-p", "foreman-sim"])
        .current_dir(root())
        .env("RUSTFLAGS", "--cfg madsim")
        .env("RUSTDOCFLAGS", "--cfg madsim")
        .env("CARGO_TARGET_DIR", &target)
        .status()
        .expect("cargo runs");
    assert!(status.success(), "building the simulator failed");
    target.join("release").join("foreman-sim")
}

fn run(program: &Path, args: &[&str]) -> (bool, String) {
    let output = Command::new(program)
        .args(args)
        .output()
        .expect("the simulator runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

async fn running_on(sup: &Supervisor, job: JobId) -> String {
    let view = sup
        .wait_state(&sup.admin, job, JobState::Running, BOUND)
        .await;
    view.job
        .attempts
        .last()
        .expect("an attempt")
        .agent
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workflow_a_production_incident_is_bundled_imported_and_reproduced() {
    let sim = simulator();
    let sup = Supervisor::start(2).await;
    sup.wait_agents(2).await;
    // A job allowing two attempts; its agent is killed under it and the
    // supervisor's local driver starts the agent again.
    let retried = submitted(&sup.admin, &{
        let mut spec = sh("sleep 3; echo retried");
        spec.max_attempts = 2;
        spec
    })
    .await;
    let agent = running_on(&sup, retried).await;
    let pids = sup.agent_pids(&agent);
    assert!(!pids.is_empty(), "agent {agent}'s process");
    for pid in pids {
        let killed = Command::new("kill").args(["-9", &pid.to_string()]).status();
        assert!(killed.is_ok_and(|s| s.success()));
    }
    let one = submitted(&sup.admin, &sh("sleep 0.2; echo one")).await;
    let three = submitted(&sup.admin, &sh("echo three; exit 3")).await;
    // Canceled while it runs.
    let long = submitted(&sup.admin, &sh("sleep 30")).await;
    running_on(&sup, long).await;
    sup.admin.cancel(long).await.expect("canceled");
    // Canceled as it prints its last line and exits: the cancel and the
    // completion cross, and either may reach the supervisor first.
    let raced = submitted(&sup.admin, &sh("sleep 0.3; echo raced")).await;
    let on = running_on(&sup, raced).await;
    let output = sup
        .path()
        .join("runs")
        .join(&on)
        .join(format!("{}-1", raced.0))
        .join("output");
    wait_for("the raced job's last line", BOUND, || async {
        std::fs::read_to_string(&output)
            .is_ok_and(|o| o.contains("raced"))
            .then_some(())
    })
    .await;
    sup.admin.cancel(raced).await.expect("cancel answered");
    // How it all ended, in production.
    let mut recorded = Vec::new();
    for (job, want) in [
        (retried, Some(JobState::Succeeded)),
        (one, Some(JobState::Succeeded)),
        (three, Some(JobState::Failed)),
        (long, Some(JobState::Canceled)),
        (raced, None),
    ] {
        let view = wait_for("the job's end", BOUND, || async {
            let view = sup.admin.job(job).await.ok()?;
            view.job.state.is_terminal().then_some(view)
        })
        .await;
        if let Some(want) = want {
            assert_eq!(view.job.state, want, "{:?}", view.job);
        }
        recorded.push((job, view.job.state, view.job.attempts.len()));
    }
    let raced_end = recorded[4].1;
    assert!(
        matches!(raced_end, JobState::Canceled | JobState::Succeeded),
        "{raced_end}"
    );
    assert_eq!(recorded[0].2, 2, "the killed agent's job ran again");
    eprintln!("the cancel and the completion crossed: the job ended {raced_end}");
    // The bundle, and the core's decisions replayed from it.
    let bundle = sup.path().join("incident.jsonl").display().to_string();
    let (ok, out, err) = sup.cli(&["incident", "--since", "1h", "-o", &bundle]);
    assert!(ok && out.contains("5 jobs"), "{out}\n{err}");
    let (ok, out, err) = sup.cli(&["replay", "--check", &bundle]);
    assert!(
        ok && out.contains("decides as recorded at all"),
        "{out}\n{err}"
    );
    // Imported: the scenario reproduces every recorded end on every seed.
    let scenario = sup.path().join("regressions").join("incident.toml");
    let path = scenario.display().to_string();
    let seeds = SEEDS.to_string();
    let (ok, out) = run(&sim, &["import", &bundle, "-o", &path, "--seeds", &seeds]);
    let written = std::fs::read_to_string(&scenario).unwrap_or_default();
    assert!(ok, "{out}\n{written}");
    assert!(
        out.contains(&format!(
            "reproduced 5 of 5 ended jobs as recorded on every seed (1-{SEEDS})"
        )),
        "{out}\n{written}"
    );
    assert!(
        out.contains(&format!("it passes on seeds 1-{SEEDS}")),
        "{out}"
    );
    let text = std::fs::read_to_string(&scenario).unwrap();
    let name = |job: JobId| format!("job-{}", job.0);
    for (job, state, attempts) in &recorded {
        let states = format!("{} = \"{}\"", name(*job), state.as_str());
        let tries = format!("{} = {attempts}", name(*job));
        assert!(
            text.contains(&states) && text.contains(&tries),
            "{states} / {tries} not in\n{text}"
        );
    }
    // The fault plan read from the journal: the agent's loss and return,
    // aimed at the job it ran; both cancels, each in the situation it found.
    let raced_when = if raced_end == JobState::Canceled {
        "running"
    } else {
        "ended"
    };
    let parsed: toml::Table = text.parse().expect("the scenario is TOML");
    let faults: Vec<(String, String, String)> = parsed["faults"]
        .as_array()
        .expect("faults")
        .iter()
        .map(|f| {
            let field = |k: &str| f.get(k).and_then(|v| v.as_str()).unwrap_or("").to_string();
            (field("action"), field("job"), field("when"))
        })
        .collect();
    let fault =
        |action: &str, job: JobId, when: &str| (action.to_string(), name(job), when.to_string());
    assert_eq!(
        faults,
        [
            fault("kill_agent", retried, ""),
            fault("restart_agent", retried, ""),
            fault("cancel", long, "running"),
            fault("cancel", raced, raced_when),
        ],
        "{text}"
    );
    // Any other seed replays it the same way.
    let (ok, out) = run(&sim, &["run", &path, "--seed", "11"]);
    assert!(ok, "{out}");
    // A file that is not a bundle is refused, naming its line.
    let not_bundle = sup.path().join("journal").join("current.jsonl");
    let (ok, out) = run(
        &sim,
        &[
            "import",
            &not_bundle.display().to_string(),
            "-o",
            &sup.path().join("refused.toml").display().to_string(),
        ],
    );
    assert!(
        !ok && out.contains("current.jsonl:1: not a Foreman incident bundle"),
        "{out}"
    );
    assert!(!sup.path().join("refused.toml").exists());
}
