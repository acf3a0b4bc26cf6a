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

/// A process that takes time to start (`start_ms`) starts that much after
/// its agent is told to run it, and runs its whole duration from there; a
/// cancel sent meanwhile kills it once it has started.
#[test]
fn sim_a_slow_start_delays_the_process_and_a_kill_waits_for_it() {
    let world = r#"
[topology]
agents = 1
cpus = 2

[[jobs]]
name = "slow"
duration_ms = 1000
start_ms = 700

[[jobs]]
name = "killed-starting"
hang = true
start_ms = 2000

[[faults]]
at_ms = 500
action = "cancel"
job = "killed-starting"
when = "dispatched"

[expect.states]
slow = "succeeded"
killed-starting = "canceled"
"#;
    let scenario = Scenario::parse("slow-start", "slow-start", world).unwrap();
    let result = run(&scenario, 3);
    assert_eq!(result.verdict(), Verdict::Pass, "{:#?}", result.violations);
    let id = |name: &str| {
        result
            .trace
            .iter()
            .find_map(|e| match &e.ev {
                Ev::Acked { name: n, job } if n == name => Some(*job),
                _ => None,
            })
            .expect("acknowledged")
    };
    // When the process of `name` started, and when it ended.
    let span = |name: &str| {
        let id = id(name);
        let at = |started: bool| {
            result
                .trace
                .iter()
                .find(|e| match &e.ev {
                    Ev::ProcessStarted { job, .. } => started && *job == id,
                    Ev::ProcessEnded { job, .. } => !started && *job == id,
                    _ => false,
                })
                .map(|e| e.at)
                .expect("in the trace")
        };
        (at(true), at(false))
    };
    // Dispatched within a few ms of 0, started 700 ms on.
    let (slow_start, slow_end) = span("slow");
    assert!((700..750).contains(&slow_start), "{slow_start}");
    assert_eq!(slow_end - slow_start, 1000);
    // Canceled while it was starting, killed as soon as it started.
    let (start, end) = span("killed-starting");
    assert!((2000..2050).contains(&start), "{start}");
    assert_eq!(end, start, "killed at once");
    let killed_id = id("killed-starting");
    let killed = result.trace.iter().any(|e| {
        matches!(&e.ev, Ev::ProcessEnded { job, end: ProcessEnd::Killed, .. } if *job == killed_id)
    });
    assert!(killed, "the process was killed, not run to its end");
}
