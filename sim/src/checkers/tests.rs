//! The checkers have teeth: each fails a trace that breaks its rule, named
//! like the incident it catches, and passes the same trace made right.

use std::collections::BTreeMap;

use foreman::core::{EventKind, JobState};

use super::{check, Violation};
use crate::scenario::{Action, Scenario};
use crate::trace::{Entry, Ev, ProcessEnd};

/// One job `j` (its program exits 0, after 1 s unless `job` says
/// otherwise) on two agents, short timings.
fn scenario(job: &str) -> Scenario {
    let duration = if job.contains("duration_ms") {
        ""
    } else {
        "duration_ms = 1000\n"
    };
    // These traces are made by hand, with no journal to replay.
    let text = format!(
        "[topology]\nagents = 2\njournal_segment_bytes = 0\n\n[[jobs]]\nname = \"j\"\n{duration}{job}\n"
    );
    Scenario::parse("test.toml", "test", &text).unwrap_or_else(|e| panic!("{e}"))
}

fn at(at: u64, ev: Ev) -> Entry {
    Entry { at, ev }
}

fn core(t: u64, kind: EventKind, attempt: Option<u32>, agent: Option<&str>, reason: &str) -> Entry {
    at(
        t,
        Ev::Core {
            kind,
            job: Some(1),
            attempt,
            agent: agent.map(String::from),
            reason: reason.to_string(),
        },
    )
}

fn fault(t: u64, action: Action, agent: &str) -> Entry {
    at(
        t,
        Ev::Fault {
            what: format!("{action:?} {agent}"),
            action: Some(action),
            agents: vec![agent.to_string()],
            latency_ms: None,
        },
    )
}

fn connected(t: u64, agent: &str) -> Entry {
    at(
        t,
        Ev::Core {
            kind: EventKind::AgentConnected,
            job: None,
            attempt: None,
            agent: Some(agent.into()),
            reason: "1 cpus".into(),
        },
    )
}

fn disconnected(t: u64, agent: &str, reason: &str) -> Entry {
    at(
        t,
        Ev::Core {
            kind: EventKind::AgentDisconnected,
            job: None,
            attempt: None,
            agent: Some(agent.into()),
            reason: reason.into(),
        },
    )
}

/// Job 1 runs attempt 1 on agent-0 from 100 ms.
fn runs() -> Vec<Entry> {
    vec![
        connected(0, "agent-0"),
        connected(0, "agent-1"),
        at(
            100,
            Ev::Acked {
                name: "j".into(),
                job: 1,
            },
        ),
        core(
            100,
            EventKind::Dispatched,
            Some(1),
            Some("agent-0"),
            "attempt 1",
        ),
        at(
            101,
            Ev::ProcessStarted {
                job: 1,
                attempt: 1,
                agent: "agent-0".into(),
                cpus: 1,
            },
        ),
        core(102, EventKind::Started, Some(1), Some("agent-0"), "started"),
    ]
}

fn ended(t: u64, end: ProcessEnd) -> Entry {
    at(
        t,
        Ev::ProcessEnded {
            job: 1,
            attempt: 1,
            agent: "agent-0".into(),
            end,
        },
    )
}

/// Job 1's process ends at 1,101 ms as `end` says; the core hears of it and
/// ends the job with `reason`.
fn process_over(end: ProcessEnd, reason: &str) -> Vec<Entry> {
    vec![
        ended(1101, end),
        core(1102, EventKind::Finished, Some(1), Some("agent-0"), "over"),
        core(1102, EventKind::Ended, Some(1), Some("agent-0"), reason),
    ]
}

/// The run settles and job 1 is listed as it ended.
fn finals(
    t: u64,
    state: JobState,
    attempts: usize,
    reason: &str,
    exit_code: Option<i32>,
) -> Vec<Entry> {
    vec![
        at(
            t,
            Ev::Settled {
                ok: true,
                detail: String::new(),
            },
        ),
        at(
            t,
            Ev::Final {
                job: 1,
                name: "j".into(),
                state,
                attempts,
                reason: reason.into(),
                exit_code,
                output_tail: String::new(),
            },
        ),
    ]
}

fn by(checker: &str, violations: &[Violation]) -> Vec<String> {
    violations
        .iter()
        .filter(|v| v.checker == checker)
        .map(|v| v.message.clone())
        .collect()
}

#[test]
fn outcome_a_job_whose_program_succeeded_killed_with_nobody_asking_fails_the_run() {
    let s = scenario("max_attempts = 2");
    let mut trace = runs();
    trace.extend(process_over(ProcessEnd::Killed, "killed on request"));
    trace.extend(finals(2000, JobState::Failed, 1, "killed on request", None));
    let found = by("outcome", &check(&s, &trace));
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(
        found[0].contains("failed by a kill nobody asked for"),
        "{}",
        found[0]
    );
    assert!(found[0].contains("allowed: {succeeded}"), "{}", found[0]);
    assert!(found[0].contains("no fault touched it"), "{}", found[0]);
}

/// A job that ran once and exited 0, as the trace tells it.
fn undisturbed_success() -> Vec<Entry> {
    let mut trace = runs();
    trace.extend(process_over(ProcessEnd::Exited, "exited with code 0"));
    trace.extend(finals(
        2000,
        JobState::Succeeded,
        1,
        "exited with code 0",
        Some(0),
    ));
    trace
}

#[test]
fn outcome_an_undisturbed_job_ends_as_its_program_says_in_one_attempt() {
    let s = scenario("");
    let trace = undisturbed_success();
    assert_eq!(check(&s, &trace), vec![]);
    // Two attempts with nothing touching it, a wrong exit code, a state
    // its program never gives: each named.
    for (state, attempts, code, want) in [
        (
            JobState::Succeeded,
            2,
            Some(0),
            "made 2 attempts though nothing touched it",
        ),
        (
            JobState::Succeeded,
            1,
            Some(3),
            "exit code Some(3), its program exits 0",
        ),
        (JobState::Lost, 1, None, "ended lost"),
        (JobState::Canceled, 1, None, "ended canceled"),
        (JobState::TimedOut, 1, None, "ended timed_out"),
    ] {
        let mut bad = trace.clone();
        bad.truncate(bad.len() - 2);
        bad.extend(finals(2000, state, attempts, "agent agent-0 lost", code));
        let found = by("outcome", &check(&s, &bad));
        assert!(
            found.iter().any(|m| m.contains(want)),
            "{state} x{attempts}: {found:?}"
        );
    }
}

#[test]
fn outcome_lost_only_to_a_fault_that_touched_it_and_only_with_no_attempt_left() {
    let once = scenario("");
    let mut trace = runs();
    trace.push(fault(500, Action::Partition, "agent-0"));
    trace.push(core(
        9000,
        EventKind::Ended,
        Some(1),
        Some("agent-0"),
        "agent agent-0 lost: ping timeout",
    ));
    trace.push(fault(9500, Action::Heal, "agent-0"));
    trace.extend(finals(
        20_000,
        JobState::Lost,
        1,
        "agent agent-0 lost: ping timeout",
        None,
    ));
    assert_eq!(by("outcome", &check(&once, &trace)), Vec::<String>::new());
    // The same with a second attempt allowed: it should have run again.
    let twice = scenario("max_attempts = 2");
    let found = by("outcome", &check(&twice, &trace));
    assert!(found[0].contains("lost after 1 of 2 attempts"), "{found:?}");
    // Lost with no agent named.
    let mut nameless = trace.clone();
    nameless.truncate(nameless.len() - 2);
    nameless.extend(finals(20_000, JobState::Lost, 1, "gone", None));
    let found = by("outcome", &check(&once, &nameless));
    assert!(found[0].contains("names no agent"), "{found:?}");
    // A fault on the other agent touches nothing of this job's.
    let mut elsewhere = trace.clone();
    elsewhere[6] = fault(500, Action::Partition, "agent-1");
    elsewhere[8] = fault(9500, Action::Heal, "agent-1");
    let found = by("outcome", &check(&once, &elsewhere));
    assert!(found[0].contains("ended lost"), "{found:?}");
    assert!(found[0].contains("no fault touched it"), "{found:?}");
}

#[test]
fn outcome_a_supervisor_outage_alone_never_loses_a_running_job() {
    let s = scenario("duration_ms = 600000");
    let mut trace = runs();
    trace.push(at(5_000, Ev::SupervisorDown));
    trace.push(connected(200_000, "agent-0"));
    trace.push(core(
        260_000,
        EventKind::Ended,
        Some(1),
        Some("agent-0"),
        "agent agent-0 lost: closed",
    ));
    trace.extend(finals(
        300_000,
        JobState::Lost,
        1,
        "agent agent-0 lost: closed",
        None,
    ));
    let found = by("outcome", &check(&s, &trace));
    assert!(found[0].contains("ended lost"), "{found:?}");
    assert!(
        found[0].contains("only supervisor outages touched it"),
        "{found:?}"
    );
    // Its agent cut off meanwhile: lost is allowed.
    trace.insert(7, fault(6_000, Action::Partition, "agent-0"));
    assert_eq!(by("outcome", &check(&s, &trace)), Vec::<String>::new());
}

#[test]
fn outcome_canceled_only_where_a_client_asked() {
    let s = scenario("duration_ms = 60000");
    let mut trace = runs();
    trace.push(core(
        3000,
        EventKind::Ended,
        Some(1),
        Some("agent-0"),
        "canceled",
    ));
    trace.extend(finals(4000, JobState::Canceled, 1, "canceled", None));
    let found = by("outcome", &check(&s, &trace));
    assert!(found[0].contains("ended canceled"), "{found:?}");
    trace.insert(
        6,
        at(
            2900,
            Ev::CancelIssued {
                name: "j".into(),
                job: 1,
            },
        ),
    );
    assert_eq!(by("outcome", &check(&s, &trace)), Vec::<String>::new());
}

#[test]
fn result_kept_a_result_its_agent_lived_to_send_must_be_heard() {
    let s = scenario("");
    let mut trace = runs();
    trace.push(ended(1101, ProcessEnd::Exited));
    trace.extend(finals(
        60_000,
        JobState::Lost,
        1,
        "agent agent-0 lost",
        None,
    ));
    let found = by("result-kept", &check(&s, &trace));
    assert!(found[0].contains("never heard of its result"), "{found:?}");
    // Its agent killed after the exit: the outbox died with it.
    trace.insert(7, fault(1200, Action::KillAgent, "agent-0"));
    assert_eq!(by("result-kept", &check(&s, &trace)), Vec::<String>::new());
    // Reported stale (the core had given it up): heard.
    trace[7] = core(
        1200,
        EventKind::StaleReport,
        Some(1),
        Some("agent-0"),
        "finished: not ours",
    );
    assert_eq!(by("result-kept", &check(&s, &trace)), Vec::<String>::new());
}

#[test]
fn cut_noticed_an_agent_silent_past_its_ping_timeout_is_declared_gone() {
    let s = scenario("");
    let mut trace = runs();
    trace.push(fault(1000, Action::DropPings, "agent-0"));
    trace.push(fault(9000, Action::RestorePings, "agent-0"));
    let found = by("cut-noticed", &check(&s, &trace));
    assert!(
        found[0].contains("silent to the supervisor for 8000 ms"),
        "{found:?}"
    );
    // Declared gone: fine.
    trace.insert(7, disconnected(3000, "agent-0", "ping timeout"));
    assert_eq!(by("cut-noticed", &check(&s, &trace)), Vec::<String>::new());
    // A heal ends a drop of pings too (it clears both directions), and a
    // short silence needs no notice.
    let mut short = runs();
    short.push(fault(1000, Action::DropPings, "agent-0"));
    short.push(fault(1500, Action::Heal, "agent-0"));
    short.push(fault(9000, Action::RestorePings, "agent-0"));
    assert_eq!(by("cut-noticed", &check(&s, &short)), Vec::<String>::new());
}

#[test]
fn no_flap_a_connection_drops_only_near_a_fault() {
    let s = scenario("");
    let mut trace = runs();
    trace.push(disconnected(30_000, "agent-1", "protocol error"));
    let found = by("no-flap", &check(&s, &trace));
    assert!(
        found[0].contains("agent-1 disconnected (protocol error) with no fault near it"),
        "{found:?}"
    );
    trace.insert(6, fault(29_000, Action::Partition, "agent-1"));
    assert_eq!(by("no-flap", &check(&s, &trace)), Vec::<String>::new());
}

#[test]
fn journal_the_replay_must_happen_end_where_the_run_did_and_read_every_segment() {
    let on = Scenario::parse("test.toml", "test", "[[jobs]]\nname = \"j\"").expect("valid");
    let trace = undisturbed_success();
    let never = by("journal", &check(&on, &trace));
    assert!(
        never.len() == 1 && never[0].contains("never replayed"),
        "{never:?}"
    );
    let replayed = |state: JobState, replayed: [u64; 3], errors: Vec<String>| {
        let mut t = trace.clone();
        t.push(at(
            2100,
            Ev::JournalReplayed {
                segments: 2,
                inputs: 40,
                ended: BTreeMap::from([(1, state)]),
                replayed: Some(replayed),
                committed: Some([0, 0, 2]),
                errors,
            },
        ));
        by("journal", &check(&on, &t))
    };
    assert_eq!(
        replayed(JobState::Succeeded, [0, 0, 2], vec![]),
        Vec::<String>::new()
    );
    let differs = replayed(
        JobState::Failed,
        [1, 1, 2],
        vec!["00000001.jsonl: no snapshot".into()],
    );
    assert_eq!(differs.len(), 3, "{differs:?}");
    assert!(differs[0].contains("no snapshot"), "{differs:?}");
    assert!(
        differs[1].contains("job 1 ends failed in the replay"),
        "{differs:?}"
    );
    assert!(differs[2].contains("[1, 1, 2]"), "{differs:?}");
}

#[test]
fn outcome_the_output_tail_is_the_last_bytes_from_the_first_whole_character() {
    use super::outcome::output_tail;
    assert_eq!(output_tail("", 4), "");
    assert_eq!(output_tail("abc", 4), "abc");
    assert_eq!(output_tail("abcdef", 4), "cdef");
    // "ok 🦀 done, é\n" is 17 bytes; its last 13 begin inside the crab.
    assert_eq!(
        output_tail("ok \u{1f980} done, \u{e9}\n", 13),
        " done, \u{e9}\n"
    );
    assert_eq!(
        output_tail("ok \u{1f980} done, \u{e9}\n", 14),
        "\u{1f980} done, \u{e9}\n"
    );
    assert_eq!(output_tail("\u{e9}", 1), "");
}

#[test]
fn fair_order_a_job_may_pass_an_older_one_only_while_no_connected_agent_fits_it() {
    let text = "[topology]\nagents = 2\nagent_cpus = [1, 2]\njournal_segment_bytes = 0\n\n\
        [[jobs]]\nname = \"wide\"\ncpus = 2\nduration_ms = 1000\n\n\
        [[jobs]]\nname = \"small\"\nat_ms = 10\nduration_ms = 1000\n";
    let s = Scenario::parse("test.toml", "test", text).unwrap_or_else(|e| panic!("{e}"));
    let event = |t: u64, kind: EventKind, job: u64| {
        at(
            t,
            Ev::Core {
                kind,
                job: Some(job),
                attempt: (kind == EventKind::Dispatched).then_some(1),
                agent: (kind == EventKind::Dispatched).then(|| "agent-0".to_string()),
                reason: String::new(),
            },
        )
    };
    // Wide (job 1) waits; small (job 2) is dispatched past it.
    let trace = |agents: &[&str]| {
        let mut trace: Vec<Entry> = agents.iter().map(|a| connected(1, a)).collect();
        trace.extend([
            event(5, EventKind::Submitted, 1),
            at(
                6,
                Ev::Acked {
                    name: "wide".into(),
                    job: 1,
                },
            ),
            event(10, EventKind::Submitted, 2),
            at(
                11,
                Ev::Acked {
                    name: "small".into(),
                    job: 2,
                },
            ),
            event(12, EventKind::Dispatched, 2),
        ]);
        trace
    };
    // Only the one-CPU agent is connected: wide fits nothing, may be passed.
    assert_eq!(
        by("fair-order", &check(&s, &trace(&["agent-0"]))),
        Vec::<String>::new()
    );
    // The two-CPU agent is connected: passing wide breaks FIFO.
    let found = by("fair-order", &check(&s, &trace(&["agent-0", "agent-1"])));
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(
        found[0].contains("job 2 dispatched before job 1, submitted earlier, whose 2 CPUs fit the largest connected agent's 2"),
        "{}",
        found[0]
    );
    // Connected, then gone again before the dispatch: may be passed.
    let mut gone = trace(&["agent-0", "agent-1"]);
    gone.insert(2, disconnected(2, "agent-1", "closed"));
    assert_eq!(by("fair-order", &check(&s, &gone)), Vec::<String>::new());
}
