use super::*;

const GOOD: &str = r#"
description = "two jobs"

[topology]
agents = 2
cpus = 2

[topology.core]
agent_grace_ms = 3000

[[users]]
name = "alice"
plan = "basic"

[[jobs]]
name = "a"
user = "alice"
duration_ms = 10

[[faults]]
at_ms = 5
action = "kill_agent"
agent = 1

[[faults]]
action = "cancel"
job = "a"
when = "running"

[expect.states]
a = "canceled"
"#;

fn parse(text: &str) -> Result<Scenario, ScenarioError> {
    Scenario::parse("test.toml", "test", text)
}

#[test]
fn a_good_scenario_parses_with_its_overrides() {
    let s = parse(GOOD).unwrap();
    assert_eq!(s.core.agent_grace_ms, 3000);
    assert_eq!(s.jobs[0].user, "alice");
    assert_eq!(s.faults[1].when, Some(Situation::Running));
    assert_eq!(s.expect.states["a"], JobState::Canceled);
    // What it writes back parses to the same scenario.
    let again = parse(&s.to_toml()).unwrap();
    assert_eq!(again.jobs, s.jobs);
    assert_eq!(again.faults, s.faults);
    assert_eq!(again.core, s.core);
}

#[test]
fn errors_name_the_file_line_and_field() {
    let cases: &[(&str, &str, usize, &str)] = &[
        // (replace, with, line, field)
        (
            "duration_ms = 10",
            "duration_ms = \"ten\"",
            18,
            "duration_ms",
        ),
        ("cpus = 2\n", "cpus = 2\nbogus = 1\n", 7, "bogus"),
        ("user = \"alice\"", "user = \"mallory\"", 15, "jobs[0].user"),
        ("agent = 1", "agent = 9", 20, "faults[0].agent"),
        ("plan = \"basic\"", "plan = \"gold\"", 11, "users[0].plan"),
        ("job = \"a\"", "job = \"zzz\"", 25, "faults[1].job"),
        (
            "agent_grace_ms = 3000",
            "agent_grace_ms = \"x\"",
            8,
            "topology.core",
        ),
        ("a = \"canceled\"", "a = \"exploded\"", 31, "a"),
    ];
    for (from, to, line, field) in cases {
        let text = GOOD.replacen(from, to, 1);
        let e = parse(&text).expect_err(to);
        assert_eq!(e.file, "test.toml");
        assert_eq!((e.line, e.field.as_str()), (*line, *field), "{to}: {e}");
        assert!(
            e.to_string().starts_with(&format!("test.toml:{line}: ")),
            "{e}"
        );
    }
}

#[test]
fn loss_is_a_fraction_up_to_its_bound() {
    let lossy = parse("[topology]\nloss = 0.5").expect("at the bound");
    assert_eq!(lossy.topology.loss, LOSS_MAX);
    let e = parse("\n[topology]\nloss = 0.51").expect_err("past the bound");
    assert_eq!((e.line, e.field.as_str()), (2, "topology.loss"), "{e}");
    assert_eq!(parse("").expect("empty").topology.loss, 0.0);
}

#[test]
fn hostile_and_oversized_input_is_refused() {
    for text in [
        "",                       // empty: a valid, empty scenario (defaults)
        "[topology]\nagents = 0", // no agents
        "[topology]\nagents = 100000",
        "[topology]\ncpus = 0",
        "[topology]\nping_interval_ms = 5000\nping_timeout_ms = 100",
        "[topology]\nlatency_ms = [10, 1]",
        "[topology]\nloss = 0.6",
        "[topology]\nloss = -0.1",
        "[topology]\nloss = nan",
        "[topology]\nloss = inf",
        "[topology]\nloss = 1",
        "[[jobs]]\nname = \"x\"\ncpus = 64",
        "[[jobs]]\nname = \"x\"\n[[jobs]]\nname = \"x\"",
        "[[jobs]]\nname = \"x\"\nmax_attempts = 0",
        "[[faults]]\naction = \"kill_agent\"",
        "[[faults]]\naction = \"crash_supervisor\"\nagent = 0",
        "[[faults]]\naction = \"latency\"",
        "[[faults]]\naction = \"kill_agent\"\nagent = \"some\"",
        "[[faults]]\naction = \"explode\"",
        "[[users]]\nname = \"../../etc\"\nplan = \"basic\"",
        "[[users]]\nname = \"admin\"\nplan = \"basic\"",
        "[expect]\nstates = { ghost = \"succeeded\" }",
        "[expect]\noutputs = { ghost = \"\" }",
        "[expect]\nexit_codes = { ghost = 0 }",
        "[expect]\nreasons = { ghost = \"agent\" }",
        "[topology]\noutput_tail_bytes = 0",
        "[topology]\noutput_tail_bytes = 1099511627776",
        "[[jobs]]\nname = \"x\"\noutput_parts = 0",
        "[[jobs]]\nname = \"x\"\noutput_parts = 65",
        "[[jobs]]\nname = \"x\"\noutput_parts = -1",
        "not toml at all [[[",
        "a = \"\u{0}\"",
    ] {
        let parsed = parse(text);
        if text.is_empty() {
            assert!(parsed.is_ok(), "{parsed:?}");
        } else {
            assert!(parsed.is_err(), "accepted: {text:?}");
        }
    }
    let huge = format!("description = \"{}\"", "x".repeat(FILE_BYTES_MAX));
    let e = parse(&huge).unwrap_err();
    assert!(e.message.contains("at most"), "{e}");
    let many: String = (0..=JOBS_MAX)
        .map(|i| format!("[[jobs]]\nname = \"j{i}\"\n"))
        .collect();
    assert!(parse(&many).unwrap_err().message.contains("at most"));
}

#[test]
fn every_scenario_file_in_the_repository_parses() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scenarios");
    let mut count = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|x| x == "toml") {
            Scenario::load(&path).unwrap_or_else(|e| panic!("{e}"));
            count += 1;
        }
    }
    assert!(count >= 11, "{count} scenarios");
}

#[test]
fn swarm_scenarios_are_valid_and_a_function_of_the_seed() {
    for seed in 0..200 {
        let (a, summary) = crate::swarm::scenario(seed);
        let (b, _) = crate::swarm::scenario(seed);
        assert_eq!(a, b);
        assert!(summary.starts_with(&format!("SEED={seed} ")));
    }
    assert_ne!(
        crate::swarm::scenario(1).0.jobs,
        crate::swarm::scenario(2).0.jobs
    );
}
