use super::*;

/// A scenario of `jobs` jobs and `faults` faults over 4 agents and 3 users,
/// where only "victim" and the cancel that hits it matter to a wrong
/// expectation (it says the victim succeeds). The other faults are agent
/// kills and restarts, pauses, latency and cancels of other jobs.
pub fn big_scenario(jobs: usize, faults: usize) -> Scenario {
    let mut text = String::from(
        "description = \"a big scenario whose failure needs two of its parts\"\n\
         [topology]\nagents = 4\ncpus = 4\n\
         [expect]\nsettle_ms = 120000\n\
         [expect.states]\nvictim = \"succeeded\"\n",
    );
    for user in ["alice", "bob", "carol"] {
        text.push_str(&format!("[[users]]\nname = \"{user}\"\nplan = \"basic\"\n"));
    }
    for i in 0..jobs {
        let name = if i == jobs / 2 {
            "victim".to_string()
        } else {
            format!("job-{i}")
        };
        let user = ["alice", "bob", "carol"][i % 3];
        text.push_str(&format!(
            "[[jobs]]\nname = \"{name}\"\nuser = \"{user}\"\nat_ms = {}\nduration_ms = {}\n",
            i * 37 % 5_000,
            200 + i * 53 % 1_500
        ));
    }
    for i in 0..faults {
        let at = 300 + i * 211 % 6_000;
        let fault = match i % 5 {
            _ if i == faults / 2 => {
                "action = \"cancel\"\njob = \"victim\"\nwhen = \"running\"\n".to_string()
            }
            0 => format!("action = \"kill_agent\"\nagent = {}\n", i % 4),
            1 => format!("action = \"restart_agent\"\nagent = {}\n", (i - 1) % 4),
            2 => format!("action = \"pause_agent\"\nagent = {}\n", i % 4),
            3 => format!("action = \"resume_agent\"\nagent = {}\n", (i - 1) % 4),
            _ => {
                let k = (i * 7) % jobs.max(1);
                let k = if k == jobs / 2 { 0 } else { k };
                format!("action = \"cancel\"\njob = \"job-{k}\"\n")
            }
        };
        text.push_str(&format!("[[faults]]\nat_ms = {at}\n{fault}"));
    }
    Scenario::parse("big.toml", "big", &text).expect("a valid scenario")
}

/// Stands in for the simulator: the victim ends canceled (the wrong
/// expectation fails) if it and its cancel are both there; a kill of an
/// agent with no restart after it leaves the world unhealed (a liveness
/// failure, which is not the same bug).
fn oracle(s: &Scenario) -> Outcome {
    let victim = s.jobs.iter().any(|j| j.name == "victim");
    let cancel = s.faults.iter().any(|f| f.job.as_deref() == Some("victim"));
    let unhealed = s.faults.iter().any(|f| {
        f.action == crate::scenario::Action::KillAgent
            && !s.faults.iter().any(|g| {
                g.action == crate::scenario::Action::RestartAgent
                    && g.agent == f.agent
                    && g.at_ms >= f.at_ms
            })
    });
    let mut violations = Vec::new();
    if victim && cancel && s.expect.states.contains_key("victim") {
        violations.push((
            "expectations".to_string(),
            "victim: expected succeeded, got canceled".to_string(),
        ));
    }
    if unhealed {
        violations.insert(
            0,
            ("settle".to_string(), "agent-0 never came back".to_string()),
        );
        return Outcome {
            verdict: "liveness failure".into(),
            violations,
        };
    }
    Outcome {
        verdict: if violations.is_empty() {
            "pass".into()
        } else {
            "correctness failure".into()
        },
        violations,
    }
}

#[test]
fn a_failure_that_needs_two_of_two_hundred_jobs_and_twenty_faults_shrinks_to_them() {
    let big = big_scenario(200, 20);
    assert!(big.jobs.len() >= 200 && big.faults.len() >= 20);
    let first = oracle(&big);
    let signature = Signature::of(&big, &first).expect("it fails");
    assert_eq!(signature.checker, "expectations");
    assert_eq!(signature.jobs, ["victim"]);
    let shrink_once = || {
        let mut steps = Vec::new();
        let shrunk = shrink(
            &big,
            &signature,
            &mut |s: &Scenario| Some(oracle(s)),
            &mut |what: &str, s: &Scenario| steps.push(format!("{what}: {}", size(s))),
        );
        (shrunk, steps)
    };
    let (shrunk, steps) = shrink_once();
    let s = &shrunk.scenario;
    assert!(s.jobs.len() <= 5 && s.faults.len() <= 3, "{}", size(s));
    assert_eq!(s.jobs.len(), 1, "{steps:#?}");
    assert_eq!(s.jobs[0].name, "victim");
    assert_eq!(s.faults.len(), 1);
    assert_eq!(s.faults[0].job.as_deref(), Some("victim"));
    // Simplified too: one agent, one user, short, times together.
    assert_eq!((s.topology.agents, s.users.len()), (1, 1), "{}", size(s));
    assert_eq!(s.jobs[0].duration_ms, 1);
    assert_eq!((s.jobs[0].at_ms, s.faults[0].at_ms), (0, 0));
    assert_eq!(s.expect.settle_ms, 1_000);
    assert!(!shrunk.cut_short);
    assert!(
        signature.matches(s, &oracle(s)),
        "it still fails the same way"
    );
    // Bounded: far fewer runs than subsets.
    assert!(shrunk.runs < 300, "{} runs", shrunk.runs);
    // Deterministic: the same steps again.
    let (again, steps_again) = shrink_once();
    assert_eq!(steps, steps_again);
    assert_eq!(again.scenario, shrunk.scenario);
    assert_eq!(again.runs, shrunk.runs);
}

#[test]
fn a_candidate_that_fails_another_way_is_not_kept() {
    let mut big = big_scenario(20, 10);
    // The first agent's restart last, far from its kill: a chunk removes
    // one without the other.
    let restart = big.faults.remove(1);
    assert_eq!(restart.action, crate::scenario::Action::RestartAgent);
    big.faults.push(restart);
    let signature = Signature::of(&big, &oracle(&big)).unwrap();
    let mut seen_other = 0;
    let shrunk = shrink(
        &big,
        &signature,
        &mut |s: &Scenario| {
            let outcome = oracle(s);
            seen_other += usize::from(outcome.verdict == "liveness failure");
            Some(outcome)
        },
        &mut |_: &str, _: &Scenario| {},
    );
    // It met candidates that failed otherwise (a kill left unhealed), and
    // kept none of them.
    assert!(seen_other > 0, "the search never met another failure");
    assert_eq!(oracle(&shrunk.scenario).verdict, "correctness failure");
    assert_eq!(shrunk.scenario.jobs.len(), 1);
}

#[test]
fn a_spent_budget_stops_with_the_smallest_failure_so_far() {
    let big = big_scenario(50, 10);
    let signature = Signature::of(&big, &oracle(&big)).unwrap();
    let mut runs = 0;
    let mut kept = 0;
    let shrunk = shrink(
        &big,
        &signature,
        &mut |s: &Scenario| {
            runs += 1;
            (runs <= 5).then(|| oracle(s))
        },
        &mut |_: &str, _: &Scenario| kept += 1,
    );
    assert!(shrunk.cut_short);
    assert_eq!(shrunk.runs, 6, "five runs, and the one refused");
    assert!(kept > 0 && shrunk.scenario.jobs.len() < 50);
    assert!(signature.matches(&shrunk.scenario, &oracle(&shrunk.scenario)));
}

#[test]
fn the_jobs_a_failure_names_are_whole_words_of_its_message() {
    let s = big_scenario(20, 0);
    let outcome = Outcome {
        verdict: "correctness failure".into(),
        violations: vec![(
            "outcome".into(),
            "job 11 (job-1): failed; not job-10x nor xjob-12; victim.".into(),
        )],
    };
    let signature = Signature::of(&s, &outcome).unwrap();
    assert_eq!(
        signature.jobs,
        ["job-1", "victim"],
        "in the scenario's order"
    );
    assert!(signature.matches(&s, &outcome));
    let other = Outcome {
        violations: vec![("outcome".into(), "job 11 (job-1): failed".into())],
        ..outcome.clone()
    };
    assert!(!signature.matches(&s, &other), "victim is not named");
    // The first violation decides: the same one behind another is another failure.
    let behind = Outcome {
        violations: vec![
            ("settle".into(), "agent-0 never came back".into()),
            outcome.violations[0].clone(),
        ],
        ..outcome.clone()
    };
    assert!(!signature.matches(&s, &behind));
    // A crash is the same crash but for its numbers.
    let crash = |message: &str| Outcome {
        verdict: "crash".into(),
        violations: vec![("crash".into(), message.into())],
    };
    let crashed = Signature::of(&s, &crash("job 12 attempt 3: state 4 at 1200 ms")).unwrap();
    assert!(crashed.matches(&s, &crash("job 7 attempt 1: state 4 at 35 ms")));
    assert!(!crashed.matches(&s, &crash("job 7 attempt 1: no record")));
    let pass = Outcome {
        verdict: "pass".into(),
        violations: vec![],
    };
    assert_eq!(Signature::of(&s, &pass), None);
}

/// The same, with the real supervisor and agents in the simulator.
#[cfg(madsim)]
#[test]
fn a_failure_in_the_simulator_shrinks_to_the_job_and_the_cancel_that_make_it() {
    let big = big_scenario(200, 20);
    let seed = 7;
    let mut runs = |s: &Scenario| Some(crate::play::run(s, seed).outcome());
    let first = runs(&big).unwrap();
    let signature = Signature::of(&big, &first).expect("it fails");
    assert_eq!(
        (signature.checker.as_str(), signature.jobs.as_slice()),
        ("expectations", ["victim".to_string()].as_slice()),
        "{first:#?}"
    );
    let mut steps = Vec::new();
    let shrunk = shrink(
        &big,
        &signature,
        &mut runs,
        &mut |what: &str, s: &Scenario| steps.push(format!("{what}: {}", size(s))),
    );
    let s = &shrunk.scenario;
    eprintln!("{} runs:\n{}", shrunk.runs, steps.join("\n"));
    assert!(s.jobs.len() <= 5 && s.faults.len() <= 3, "{steps:#?}");
    assert!(s.jobs.iter().any(|j| j.name == "victim"));
    assert!(s.faults.iter().any(|f| f.job.as_deref() == Some("victim")));
    let again = crate::play::run(s, seed).outcome();
    assert!(signature.matches(s, &again), "{again:#?}");
}
