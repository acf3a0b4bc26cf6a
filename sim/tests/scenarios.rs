//! The named scenarios on fixed seeds, their trace summaries as snapshots,
//! and the determinism self-check.
#![cfg(madsim)]

use std::path::PathBuf;

use foreman_sim::play::{run, Verdict};
use foreman_sim::scenario::Scenario;
use foreman_sim::trace::{first_divergence, summary};

const NAMED: [&str; 15] = [
    "agent-loss",
    "agent-pause",
    "cancel-during-allocation",
    "cancel-races-completion",
    "crash-during-commit",
    "duplicate-agent",
    "job-larger-than-every-agent",
    "lossy-network",
    "output-capture",
    "reconnect-storm",
    "slot-fairness",
    "slow-network",
    "supervisor-crash-restart",
    "timeout-isolation",
    "ws-ping-timeout",
];

fn load(name: &str) -> Scenario {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../scenarios")
        .join(format!("{name}.toml"));
    Scenario::load(&path).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn the_scenario_network_is_the_simulated_network() {
    let lossy = load("lossy-network");
    let config = foreman_sim::world::madsim_config(&lossy);
    assert_eq!(config.net.packet_loss_rate, lossy.topology.loss);
    assert!(lossy.topology.loss > 0.0);
    let [lo, hi] = lossy.topology.latency_ms;
    assert_eq!(
        config.net.send_latency,
        std::time::Duration::from_millis(lo)..std::time::Duration::from_millis(hi + 1)
    );
}

/// What failed of `scenario` on seeds 1 to 5, one line per failing seed.
fn failures_on_seeds_1_to_5(scenario: &Scenario) -> Vec<String> {
    (1..=5)
        .map(|seed| run(scenario, seed))
        .filter(|result| result.verdict() != Verdict::Pass)
        .map(|result| {
            format!(
                "{} seed {}: {} {:?} {:?}",
                scenario.name,
                result.seed,
                result.verdict().as_str(),
                result.crash,
                result.violations
            )
        })
        .collect()
}

#[test]
fn every_named_scenario_passes_on_fixed_seeds() {
    let failures: Vec<String> = NAMED
        .iter()
        .flat_map(|name| failures_on_seeds_1_to_5(&load(name)))
        .collect();
    assert!(failures.is_empty(), "{failures:#?}");
}

/// Every regression scenario (`scenarios/regressions/`, each a failure
/// once found and fixed) passes on fixed seeds, reaching the rare events it
/// names.
#[test]
fn every_regression_scenario_passes_on_fixed_seeds() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scenarios/regressions");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("a directory entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    assert!(files.len() >= 3, "the regressions are gone: {files:?}");
    let failures: Vec<String> = files
        .iter()
        .flat_map(|file| {
            failures_on_seeds_1_to_5(&Scenario::load(file).unwrap_or_else(|e| panic!("{e}")))
        })
        .collect();
    assert!(failures.is_empty(), "{failures:#?}");
}

/// The outage regression really is an outage longer than the fence, with a
/// job's last attempt running through it to its own end.
#[test]
fn a_last_attempt_outlives_a_supervisor_outage_longer_than_the_fence() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../scenarios/regressions/supervisor-outage-keeps-running-jobs.toml");
    let scenario = Scenario::load(&path).unwrap_or_else(|e| panic!("{e}"));
    let result = run(&scenario, 1);
    assert_eq!(result.verdict(), Verdict::Pass, "{:?}", result.violations);
    let fence_ms = scenario.core.agent_grace_ms - scenario.topology.ping_interval_ms;
    let at = |action| {
        scenario
            .faults
            .iter()
            .find(|f| f.action == action)
            .map(|f| f.at_ms)
            .expect("the fault")
    };
    use foreman_sim::scenario::Action;
    let outage_ms = at(Action::RestartSupervisor) - at(Action::CrashSupervisor);
    assert!(outage_ms > 3 * fence_ms, "{outage_ms} ms is no long outage");
    let reached = foreman_sim::rare::reached(&result.trace);
    assert!(
        reached.contains_key("process-outlived-supervisor"),
        "{reached:?}"
    );
    assert!(reached.contains_key("fence-kill"), "{reached:?}");
}

#[test]
fn named_scenario_traces_match_their_snapshots() {
    for name in NAMED {
        let result = run(&load(name), 1);
        insta::assert_snapshot!(name, summary(&result.trace));
    }
}

#[test]
fn a_seed_replays_exactly_and_another_seed_differs() {
    for name in [
        "supervisor-crash-restart",
        "agent-pause",
        "cancel-races-completion",
    ] {
        let scenario = load(name);
        let first = run(&scenario, 7);
        let second = run(&scenario, 7);
        if let Some(diff) = first_divergence(&first.trace, &second.trace, 5) {
            panic!("{name}: {diff}");
        }
        let other = run(&scenario, 8);
        assert_ne!(first.trace, other.trace, "{name}: seeds 7 and 8 ran alike");
    }
}

#[test]
fn a_divergence_is_reported_with_its_context() {
    let scenario = load("cancel-during-allocation");
    let first = run(&scenario, 3).trace;
    let mut second = first.clone();
    second[10].at += 1;
    let report = first_divergence(&first, &second, 2).expect("a divergence");
    assert!(report.contains("diverge at entry 10"), "{report}");
    assert!(report.contains(">>    10"), "{report}");
    second.truncate(10);
    let report = first_divergence(&first, &second, 2).expect("a shorter run");
    assert!(report.contains("(the run ends here)"), "{report}");
}

/// Cancellation-point exploration: each path is dropped at every poll (up to
/// a bound for paths that never end by themselves) and nothing may leak.
#[test]
fn dropping_shell_and_agent_paths_at_any_poll_leaks_nothing() {
    for path in foreman_sim::explore::PATHS {
        let report = foreman_sim::explore::explore(path, 40);
        assert!(report.findings.is_empty(), "{path}: {:#?}", report.findings);
        // A submit's or cancel's handler awaits once the input is in (its
        // answer carries the job, no second trip to the core): dropping it
        // there, answer pending, is the cut that matters. Loops have more.
        let least = if path.starts_with("http-") { 1 } else { 2 };
        assert!(report.cuts >= least, "{path}: only {} cuts", report.cuts);
        match path {
            // Request handlers end by themselves, after a few polls.
            "http-submit" | "http-cancel" => assert!(report.completed_at.is_some(), "{report:?}"),
            // Connection and run loops run until something ends them.
            _ => assert_eq!(report.completed_at, None, "{report:?}"),
        }
    }
}
