//! The real server, agent and HTTP client in a madsim world: one supervisor
//! node, two agent nodes (simulated runner), a client node: submit, complete,
//! cancel, and an agent node killed mid-job.
#![cfg(madsim)]

use foreman_sim::play::{run, Verdict};
use foreman_sim::scenario::Scenario;
use foreman_sim::trace::{Ev, ProcessEnd};

const WORLD: &str = r#"
[topology]
agents = 2
cpus = 1

[topology.core]
agent_grace_ms = 5000

[[jobs]]
name = "done"
duration_ms = 2000
output = "simulated output"

[[jobs]]
name = "canceled"
at_ms = 3000
duration_ms = 600000

[[jobs]]
name = "retried"
at_ms = 3000
duration_ms = 3000
max_attempts = 2

[[faults]]
at_ms = 3000
action = "cancel"
job = "canceled"
when = "running"

[[faults]]
at_ms = 4000
action = "kill_agent"
job = "retried"

[expect.states]
done = "succeeded"
canceled = "canceled"
retried = "succeeded"

[expect.attempts]
done = 1
canceled = 1
retried = 2
"#;

#[test]
fn sim_full_stack_submit_complete_cancel_and_an_agent_killed_mid_job() {
    let scenario = Scenario::parse("full-stack", "full-stack", WORLD).unwrap();
    let result = run(&scenario, 42);
    assert_eq!(result.verdict(), Verdict::Pass, "{:#?}", result.violations);
    // The canceled job's simulated process was killed.
    let canceled = result
        .trace
        .iter()
        .find_map(|e| match &e.ev {
            Ev::Acked { name, job } if name == "canceled" => Some(*job),
            _ => None,
        })
        .unwrap();
    assert!(result.trace.iter().any(|e| matches!(
        &e.ev,
        Ev::ProcessEnded { job, end: ProcessEnd::Killed, .. } if *job == canceled
    )));
    // The job of the killed agent vanished with it and ran again elsewhere.
    assert!(result.trace.iter().any(|e| matches!(
        &e.ev,
        Ev::ProcessEnded {
            end: ProcessEnd::Vanished,
            ..
        }
    )));
}
