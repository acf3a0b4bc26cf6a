use super::*;

use foreman::core::{
    AgentId, AgentMsg, AttemptReport, ConnId, Core, JobId, Millis, RequestId, Requester,
};
use foreman::server::journal::SupervisorFact;

use crate::scenario::Scenario;

/// A bundle `foreman incident` wrote from a real supervisor with two local
/// agents: five jobs; `local-0` killed with `kill -9` while it ran job 3
/// (which allows two attempts), restarted by the supervisor; job 4 canceled
/// while running; job 5 exits 3.
const REAL: &str = include_str!("kill-and-cancel.jsonl");

fn read_text(text: &str) -> Result<Draft, String> {
    read(
        "bundle.jsonl",
        std::io::Cursor::new(text.as_bytes().to_vec()),
    )
}

fn scenario_of(draft: &Draft) -> Scenario {
    let text = draft.to_toml();
    Scenario::parse("imported.toml", "imported", &text).unwrap_or_else(|e| panic!("{e}\n{text}"))
}

fn job<'a>(scenario: &'a Scenario, name: &str) -> &'a JobPlan {
    scenario
        .jobs
        .iter()
        .find(|j| j.name == name)
        .unwrap_or_else(|| panic!("no {name}"))
}

#[test]
fn import_a_real_bundle_becomes_its_workload_faults_and_ends() {
    let draft = read_text(REAL).unwrap();
    let scenario = scenario_of(&draft);
    let t = &scenario.topology;
    assert_eq!((t.agents, t.cpus), (2, 1));
    assert_eq!((t.ping_interval_ms, t.ping_timeout_ms), (200, 1_500));
    assert_eq!(
        scenario.core.agent_grace_ms, 3_000,
        "from the configuration"
    );
    assert_eq!(scenario.jobs.len(), 5);
    let retried = job(&scenario, "job-3");
    assert_eq!(
        (retried.max_attempts, retried.duration_ms, retried.exit_code),
        (2, 2_004, 0)
    );
    assert_eq!(retried.output, "retried\n");
    let canceled = job(&scenario, "job-4");
    assert!(canceled.hang, "killed, never seen to end by itself");
    let failed = job(&scenario, "job-5");
    assert_eq!((failed.exit_code, failed.hang), (3, false));
    // Submissions keep their order and spacing.
    let at: Vec<u64> = scenario.jobs.iter().map(|j| j.at_ms).collect();
    assert_eq!(at, [1_986, 1_997, 4_214, 4_222, 4_228]);
    // The kill -9 of the agent running job 3, its restart, the cancel.
    let faults: Vec<(u64, Action, Option<&str>, Option<Situation>)> = scenario
        .faults
        .iter()
        .map(|f| (f.at_ms, f.action, f.job.as_deref(), f.when))
        .collect();
    assert_eq!(
        faults,
        [
            (4_762, Action::KillAgent, Some("job-3"), None),
            (4_873, Action::RestartAgent, Some("job-3"), None),
            (
                5_067,
                Action::Cancel,
                Some("job-4"),
                Some(Situation::Running)
            ),
        ]
    );
    let states: Vec<(&str, JobState, usize)> = scenario
        .expect
        .states
        .iter()
        .map(|(name, state)| (name.as_str(), *state, scenario.expect.attempts[name]))
        .collect();
    assert_eq!(
        states,
        [
            ("job-1", JobState::Succeeded, 1),
            ("job-2", JobState::Succeeded, 1),
            ("job-3", JobState::Succeeded, 2),
            ("job-4", JobState::Canceled, 1),
            ("job-5", JobState::Failed, 1),
        ]
    );
    assert_eq!(scenario.expect.exit_codes["job-5"], 3);
    // What the bundle could not say is said, in the file.
    let text = draft.to_toml();
    for says in [
        "local-0 is agent 0",
        "local-1 is agent 1",
        "network's latency",
        "its connection closed at 4762 ms",
        "admin canceled job-4 at 5067 ms; it was running",
        "job 4: sh -c sleep 5",
    ] {
        assert!(text.contains(says), "{says:?} not in\n{text}");
    }
}

#[test]
fn import_an_expectation_dropped_says_why_in_the_file() {
    let mut draft = read_text(REAL).unwrap();
    draft.drop_expectation("job-3", "the simulator differs".into());
    let scenario = scenario_of(&draft);
    assert!(!scenario.expect.states.contains_key("job-3"));
    assert!(!scenario.expect.attempts.contains_key("job-3"));
    assert!(scenario.expect.states.contains_key("job-4"));
    assert!(draft
        .to_toml()
        .contains("# job-3: no expectation: the simulator differs"));
}

/// A bundle made from a core driven here: segments of journal lines.
struct Maker {
    core: Core,
    segments: Vec<Vec<String>>,
    request: u64,
}

impl Maker {
    fn new() -> Maker {
        let mut maker = Maker {
            core: Core::new(CoreConfig::default()),
            segments: Vec::new(),
            request: 0,
        };
        maker.segment(1_000, true);
        maker
    }

    /// A new segment at `at`: its snapshot, and a supervisor start if asked.
    fn segment(&mut self, at: u64, start: bool) {
        let mut lines = vec![serde_json::to_string(&Line::Snapshot {
            at: Millis(at),
            snapshot: Box::new(self.core.snapshot()),
        })
        .unwrap()];
        if start {
            lines.push(
                serde_json::to_string(&Line::Supervisor {
                    at: Millis(at),
                    supervisor: SupervisorFact {
                        event: "started".into(),
                        version: "0.1.0".into(),
                        settings: serde_json::json!({
                            "ping_interval_ms": 1_000, "ping_timeout_ms": 4_000,
                        }),
                    },
                })
                .unwrap(),
            );
        }
        self.segments.push(lines);
    }

    fn input(&mut self, at: u64, input: Input) {
        self.core.handle(Millis(at), input.clone()).for_each(drop);
        let line = serde_json::to_string(&Line::Input {
            at: Millis(at),
            input,
        })
        .unwrap();
        self.segments.last_mut().unwrap().push(line);
    }

    fn connect(&mut self, at: u64, agent: &str, conn: u64, runs: &[(u64, u32)]) {
        let attempts = runs
            .iter()
            .map(|&(job, attempt)| AttemptReport {
                job: JobId(job),
                attempt,
                finished: None,
            })
            .collect();
        self.input(
            at,
            Input::AgentConnected {
                conn: ConnId(conn),
                agent: AgentId(agent.into()),
                cpus: 2,
                labels: Default::default(),
                attempts,
            },
        );
    }

    fn submit(&mut self, at: u64, user: &str, plan: &str, argv: &[&str]) {
        self.submit_tries(at, user, plan, argv, 2);
    }

    fn submit_tries(&mut self, at: u64, user: &str, plan: &str, argv: &[&str], tries: u32) {
        self.request += 1;
        let mut spec = SubmitSpec::command(argv.iter().copied());
        spec.max_attempts = tries;
        self.input(
            at,
            Input::Submit {
                request: RequestId(self.request),
                user: user.into(),
                plan: plan.into(),
                spec,
            },
        );
    }

    fn message(&mut self, at: u64, agent: &str, conn: u64, msg: AgentMsg) {
        self.input(
            at,
            Input::AgentMessage {
                conn: ConnId(conn),
                agent: AgentId(agent.into()),
                msg,
            },
        );
    }

    fn text(&self, format: u64) -> String {
        self.text_from(0, format)
    }

    /// The bundle of the segments from `first` on.
    fn text_from(&self, first: usize, format: u64) -> String {
        let mut out = serde_json::json!({
            "bundle": "foreman-incident", "format": format, "foreman_version": "0.1.0",
            "created_at": 90_000,
        })
        .to_string();
        out.push('\n');
        for (i, lines) in self.segments.iter().enumerate().skip(first) {
            out.push_str(&format!("{{\"segment\":\"{i}.jsonl\"}}\n"));
            for line in lines {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    }
}

#[test]
fn import_infers_partitions_crashes_late_agents_and_renamed_users() {
    let mut m = Maker::new();
    m.connect(1_000, "a", 1, &[]);
    m.submit(1_500, "ana.b@lab", "basic", &["sleep", "60"]);
    m.message(
        1_510,
        "a",
        1,
        AgentMsg::Started {
            job: JobId(1),
            attempt: 1,
        },
    );
    // Silent past its ping timeout, back with its run.
    m.input(
        20_000,
        Input::AgentGone {
            conn: ConnId(1),
            agent: AgentId("a".into()),
            reason: GoneReason::PingTimeout,
        },
    );
    m.connect(21_000, "a", 2, &[(1, 1)]);
    // An agent that joins late.
    m.connect(9_000 + 21_000, "late", 3, &[]);
    m.submit(31_000, "admin", "premium", &["true"]);
    // The supervisor dies after its line at 31 s and starts at 40 s; its
    // agents connect again (not faults of their own).
    m.segment(40_000, true);
    m.connect(40_100, "a", 4, &[(1, 1)]);
    m.connect(40_200, "late", 5, &[]);
    m.submit(41_000, "ana_b@lab", "basic", &["true"]);
    let draft = read_text(&m.text(BUNDLE_FORMAT)).unwrap();
    let scenario = scenario_of(&draft);
    let faults: Vec<(u64, Action, Option<Target>, Option<&str>)> = scenario
        .faults
        .iter()
        .map(|f| (f.at_ms, f.action, f.agent.clone(), f.job.as_deref()))
        .collect();
    assert_eq!(
        faults,
        [
            (0, Action::KillAgent, Some(Target::One(1)), None),
            // A ping timeout at 19 s (from the start at 1 s), 4 s after
            // the silence began; aimed at the job it ran.
            (15_000, Action::Partition, None, Some("job-1")),
            (20_000, Action::Heal, None, Some("job-1")),
            (29_000, Action::RestartAgent, Some(Target::One(1)), None),
            // Its last line at 30 s: written to crash 50 ms after.
            (30_050, Action::CrashSupervisor, None, None),
            (39_000, Action::RestartSupervisor, None, None),
        ]
    );
    assert_eq!(
        (
            scenario.topology.ping_interval_ms,
            scenario.topology.ping_timeout_ms
        ),
        (1_000, 4_000)
    );
    assert_eq!((scenario.topology.agents, scenario.topology.cpus), (2, 2));
    // Two users whose names the scenario cannot hold, kept apart.
    let users: Vec<(&str, &str)> = scenario
        .users
        .iter()
        .map(|u| (u.name.as_str(), u.plan.as_str()))
        .collect();
    assert_eq!(users, [("ana-b-lab", "basic"), ("ana-b-lab-2", "basic")]);
    assert_eq!(job(&scenario, "job-1").user, "ana-b-lab");
    assert_eq!(job(&scenario, "job-3").user, "ana-b-lab-2");
    assert_eq!(job(&scenario, "job-2").user, "admin");
    let text = draft.to_toml();
    assert!(
        text.contains("User \"ana.b@lab\" is \"ana-b-lab\""),
        "{text}"
    );
    assert!(
        text.contains("the supervisor crashed (no end written)"),
        "{text}"
    );
    assert!(
        text.contains("Still running when the bundle was taken"),
        "{text}"
    );
    // Nothing ended: nothing expected.
    assert!(scenario.expect.states.is_empty());
}

#[test]
fn import_refuses_what_is_not_a_whole_bundle_naming_the_line() {
    let mut m = Maker::new();
    m.connect(1_000, "a", 1, &[]);
    m.submit(1_500, "ana", "basic", &["true"]);
    let good = m.text(BUNDLE_FORMAT);
    let lines: Vec<&str> = good.lines().collect();
    let cases: Vec<(String, &str)> = vec![
        (String::new(), "empty"),
        (
            "{\"at\":1,\"snapshot\":{}}\n".into(),
            "bundle.jsonl:1: not a Foreman incident bundle",
        ),
        (
            "PK\u{3}\u{4} a zip\n".into(),
            "bundle.jsonl:1: not a Foreman",
        ),
        (m.text(BUNDLE_FORMAT + 1), "bundle.jsonl:1: bundle format 2"),
        (m.text(0), "bundle.jsonl:1: bundle format 0"),
        (format!("{}\n", lines[0]), "no journal segment"),
        (
            format!("{}\nstray\n", lines[0]),
            "bundle.jsonl:2: a line before the first segment",
        ),
        // Cut inside its last line.
        (good[..good.len() - 20].to_string(), "bundle.jsonl:6:"),
        // A line of the journal corrupted.
        (
            good.replace("\"agent_connected\"", "\"agent_connec"),
            "bundle.jsonl:5:",
        ),
        // An input before its segment's snapshot.
        (
            format!("{}\n{}\n{}\n", lines[0], lines[1], lines[5]),
            "bundle.jsonl:3: an input before the snapshot",
        ),
    ];
    for (text, says) in cases {
        match read_text(&text) {
            Ok(_) => panic!("accepted {text:?}"),
            Err(e) => assert!(e.contains(says), "{says:?} not in {e:?}"),
        }
    }
    let mut bytes = good.clone().into_bytes();
    bytes[good.find("\"ana\"").unwrap() + 2] = 0xff;
    let err = read("bundle.jsonl", std::io::Cursor::new(bytes)).unwrap_err();
    assert!(err.contains("bundle.jsonl:6: not UTF-8"), "{err}");
}

#[test]
fn import_never_panics_on_a_bundle_cut_or_flipped_anywhere() {
    // Every prefix of a real bundle, and a byte flipped every few bytes:
    // each is read or refused with a line named, and never panics.
    let bytes = REAL.as_bytes();
    let named = |e: &str| e.starts_with("bundle.jsonl") && e.contains(':');
    for cut in (0..bytes.len()).step_by(7) {
        let result = read("bundle.jsonl", std::io::Cursor::new(bytes[..cut].to_vec()));
        if let Err(e) = result {
            assert!(named(&e), "cut at {cut}: {e}");
        }
    }
    for at in (0..bytes.len()).step_by(13) {
        let mut flipped = bytes.to_vec();
        flipped[at] ^= 0x5a;
        if let Err(e) = read("bundle.jsonl", std::io::Cursor::new(flipped)) {
            assert!(named(&e), "flipped at {at}: {e}");
        }
    }
}

#[test]
fn import_refuses_a_line_longer_than_its_bound() {
    let text = format!("{}\n", "x".repeat(100));
    let err = lines_up_to("bundle.jsonl", std::io::Cursor::new(text), 50)
        .find_map(Result::err)
        .unwrap();
    assert_eq!(err, "bundle.jsonl:1: a line longer than 50 bytes");
}

#[test]
fn import_a_race_between_cancel_and_completion_goes_the_recorded_way() {
    let mut m = Maker::new();
    m.connect(1_000, "a", 1, &[]);
    m.submit(1_100, "admin", "premium", &["won", "by", "the", "cancel"]);
    m.submit(1_100, "admin", "premium", &["won", "by", "its", "end"]);
    let (admin, exited) = (
        Requester {
            user: "admin".into(),
            admin: true,
        },
        Outcome::Exited { code: 0 },
    );
    // Their processes took 200 ms to start.
    for job in [1, 2] {
        m.message(
            1_300,
            "a",
            1,
            AgentMsg::Started {
                job: JobId(job),
                attempt: 1,
            },
        );
    }
    // Job 1: the cancel reaches the supervisor first; the process had
    // exited 0 already, and its report comes after.
    m.input(
        2_000,
        Input::Cancel {
            request: RequestId(90),
            by: admin.clone(),
            job: JobId(1),
        },
    );
    // Job 2: its end first, then the cancel.
    for job in [1, 2] {
        m.message(
            2_001,
            "a",
            1,
            AgentMsg::Finished {
                job: JobId(job),
                attempt: 1,
                outcome: exited.clone(),
                output_tail: String::new(),
                run_ms: 890,
            },
        );
    }
    m.input(
        2_002,
        Input::Cancel {
            request: RequestId(91),
            by: admin,
            job: JobId(2),
        },
    );
    let draft = read_text(&m.text(BUNDLE_FORMAT)).unwrap();
    let scenario = scenario_of(&draft);
    let cancels: Vec<(&str, Option<Situation>)> = scenario
        .faults
        .iter()
        .map(|f| (f.job.as_deref().unwrap_or(""), f.when))
        .collect();
    assert_eq!(
        cancels,
        [
            ("job-1", Some(Situation::Running)),
            ("job-2", Some(Situation::Ended))
        ]
    );
    // The cancel decided job 1: its process outlasts the cancel here, so
    // that it decides again, whatever the seed does to the timing.
    let won = job(&scenario, "job-1");
    assert!(won.hang, "{won:?}");
    assert_eq!(scenario.expect.states["job-1"], JobState::Canceled);
    assert!(!scenario.expect.exit_codes.contains_key("job-1"));
    let ended = job(&scenario, "job-2");
    assert_eq!((ended.hang, ended.duration_ms), (false, 890));
    // Less the two messages the simulated network carries meanwhile.
    assert_eq!((won.start_ms, ended.start_ms), (194, 194));
    assert_eq!(scenario.expect.states["job-2"], JobState::Succeeded);
    assert!(draft.to_toml().contains("(the cancel changed nothing)"));
}

#[test]
fn import_a_window_that_opens_mid_run_starts_from_its_snapshot() {
    let mut m = Maker::new();
    m.connect(1_000, "a", 1, &[]);
    m.connect(1_000, "b", 2, &[]);
    m.submit(1_500, "admin", "premium", &["sleep", "600"]);
    m.message(
        1_510,
        "a",
        1,
        AgentMsg::Started {
            job: JobId(1),
            attempt: 1,
        },
    );
    m.input(
        2_000,
        Input::AgentGone {
            conn: ConnId(2),
            agent: AgentId("b".into()),
            reason: GoneReason::Closed,
        },
    );
    // The journal rotated: the bundle's window opens with this segment.
    m.segment(5_000, false);
    m.input(
        25_000,
        Input::AgentGone {
            conn: ConnId(1),
            agent: AgentId("a".into()),
            reason: GoneReason::PingTimeout,
        },
    );
    let draft = read_text(&m.text_from(1, BUNDLE_FORMAT)).unwrap();
    let scenario = scenario_of(&draft);
    let faults: Vec<(u64, Action, Option<Target>, Option<&str>)> = scenario
        .faults
        .iter()
        .map(|f| (f.at_ms, f.action, f.agent.clone(), f.job.as_deref()))
        .collect();
    assert_eq!(
        faults,
        [
            // Gone before the window: down from the start.
            (0, Action::KillAgent, Some(Target::One(1)), None),
            // Connected in the snapshot, silent a (default) ping timeout
            // before it was dropped, running the job.
            (5_000, Action::Partition, None, Some("job-1")),
        ]
    );
    let live = job(&scenario, "job-1");
    assert_eq!(live.at_ms, 0);
    let text = draft.to_toml();
    for says in [
        "Submitted before the window",
        "No supervisor start in the window",
        "agent b was gone when the window opened (connection closed)",
        "Still running when the bundle was taken, after 88490 ms",
    ] {
        assert!(text.contains(says), "{says:?} not in\n{text}");
    }
}

#[test]
fn import_keeps_what_every_seed_reproduces_and_leaves_the_rest_to_the_checkers() {
    let mut draft = read_text(REAL).unwrap();
    let as_recorded: BTreeMap<String, End> = draft
        .recorded
        .iter()
        .map(|(name, r)| (name.clone(), (r.state, r.attempts, r.exit_code)))
        .collect();
    let seed = |seed: u64, reached: &[&'static str]| SeedRun {
        seed,
        ends: as_recorded.clone(),
        rejected: BTreeMap::new(),
        reached: reached.iter().copied().collect(),
    };
    let mut runs = vec![
        seed(1, &["cancel-while-running", "ping-timeout"]),
        seed(2, &["cancel-while-running"]),
        seed(3, &["cancel-while-running", "ping-timeout"]),
    ];
    // Seed 2 runs the killed agent's job to its end in one attempt.
    runs[1]
        .ends
        .insert("job-3".into(), (JobState::Succeeded, 1, Some(0)));
    // The outcome checker rejects job 5's end (as recorded) on seed 3.
    runs[2].rejected.insert(
        "job-5".into(),
        "job 5 (job-5): ended failed; allowed: {lost}".into(),
    );
    let judged = draft.judge(&runs);
    assert_eq!(judged.reproduced, 3);
    assert_eq!(
        judged.lines,
        [
            "job-3: recorded succeeded after 2 attempts, exit code 0; the simulator differs \
             (seed 2: succeeded after 1 attempts, exit code 0)",
            "job-5: recorded failed after 1 attempts, exit code 3; the outcome checker rejects \
             how it ends on seeds [3]: job 5 (job-5): ended failed; allowed: {lost}",
        ]
    );
    let scenario = scenario_of(&draft);
    let expected: Vec<&str> = scenario.expect.states.keys().map(String::as_str).collect();
    assert_eq!(expected, ["job-1", "job-2", "job-4"]);
    assert!(!scenario.expect.exit_codes.contains_key("job-5"));
    assert_eq!(scenario.expect.reached, ["cancel-while-running"]);
    let text = draft.to_toml();
    assert!(
        text.contains("# job-5: no expectation: recorded failed"),
        "{text}"
    );
    assert!(
        text.contains("Checked on seeds 1-3 when imported: 3 of 5 ended jobs"),
        "{text}"
    );
}

#[test]
fn import_a_job_lost_with_its_agent_runs_on_until_the_bundle_was_taken() {
    let mut m = Maker::new();
    m.connect(1_000, "a", 1, &[]);
    m.submit_tries(1_000, "admin", "premium", &["sleep", "600"], 1);
    m.message(
        1_100,
        "a",
        1,
        AgentMsg::Started {
            job: JobId(1),
            attempt: 1,
        },
    );
    m.input(
        2_000,
        Input::AgentGone {
            conn: ConnId(1),
            agent: AgentId("a".into()),
            reason: GoneReason::Closed,
        },
    );
    // Its grace runs out: the job is lost (its only attempt).
    m.input(70_000, Input::Tick);
    let draft = read_text(&m.text(BUNDLE_FORMAT)).unwrap();
    let scenario = scenario_of(&draft);
    let lost = job(&scenario, "job-1");
    // Nobody knows when its program would have ended: at least when the
    // bundle was taken (90 s), 88.9 s after it started.
    assert_eq!((lost.hang, lost.duration_ms), (false, 88_900));
    assert_eq!(scenario.expect.states["job-1"], JobState::Lost);
    let faults: Vec<(u64, Action, Option<&str>)> = scenario
        .faults
        .iter()
        .map(|f| (f.at_ms, f.action, f.job.as_deref()))
        .collect();
    assert_eq!(
        faults,
        [(1_000, Action::KillAgent, Some("job-1"))],
        "never back"
    );
    assert!(draft.to_toml().contains("its own end is unknown"));
}
