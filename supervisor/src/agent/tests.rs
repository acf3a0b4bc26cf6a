//! The agent's own rules, without a supervisor: when it fences, what a
//! ping confirms, what it runs, keeps and forgets, and how it backs off.
//! The whole agent against the real server is tested in the simulator
//! (`foreman-sim`) and end to end (`tests/`).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use super::*;
use crate::agent::outbox::{self, Outbox};
use crate::core::{JobSpec, KillReason, StopReason};
use crate::protocol::ping_payload;

/// Counts the runs it is given. Each run starts, waits for its kill and
/// ends `Killed`.
#[derive(Default)]
struct Counting {
    runs: AtomicUsize,
}

impl Runner for Counting {
    fn run(&self, _order: RunOrder, control: RunControl) -> runner::RunFuture {
        self.runs.fetch_add(1, Ordering::SeqCst);
        Box::pin(async move {
            let _ = control.started.send(());
            let _ = control.kill.await;
            FinishedReport {
                outcome: Outcome::Killed,
                output_tail: String::new(),
                run_ms: 0,
            }
        })
    }
}

fn options() -> AgentOptions {
    AgentOptions {
        // Nothing listens on port 1.
        supervisor: "127.0.0.1:1".into(),
        token: "t".into(),
        agent_id: "a1".into(),
        cpus: 2,
        labels: BTreeMap::new(),
        work_dir: PathBuf::from("work"),
        reconnect_min_ms: 4,
        reconnect_max_ms: 64,
        reconnect_attempts_max: None,
        leave_alone_ms: None,
        tls: None,
    }
}

fn new_agent() -> (Agent, Arc<Counting>) {
    let runner = Arc::new(Counting::default());
    (Agent::new(options(), runner.clone()), runner)
}

/// The first attempt of a job allowed one.
fn run(job: u64) -> ToAgentMsg {
    run_of(job, 1, 1)
}

fn run_of(job: u64, attempt: u32, max_attempts: u32) -> ToAgentMsg {
    ToAgentMsg::Run {
        job: JobId(job),
        attempt,
        spec: Arc::new(JobSpec::for_test(&["sleep", "60"], max_attempts)),
    }
}

fn keys_in_hello(agent: &Agent) -> Vec<(u64, u32)> {
    match agent.hello() {
        FromAgent::Hello { attempts, .. } => attempts
            .iter()
            .map(|a| {
                assert!(a.finished.is_none(), "a hello names attempts by key only");
                (a.job.0, a.attempt)
            })
            .collect(),
        other => panic!("not a hello: {other:?}"),
    }
}

#[test]
fn the_fence_falls_a_fence_after_the_latest_confirmation_and_fires_once() {
    let (mut agent, _) = new_agent();
    assert_eq!(agent.fence_due(), None, "nothing confirmed yet");
    agent.confirm(Millis(1_000));
    assert_eq!(agent.fence_due(), None, "a supervisor that sets no fence");
    assert!(!agent.past_fence(Millis(u64::MAX)));

    agent.fence_ms = Some(300);
    assert_eq!(agent.fence_due(), Some(Millis(1_300)));
    assert!(!agent.past_fence(Millis(1_299)));
    assert!(agent.past_fence(Millis(1_300)), "due at the instant itself");

    agent.confirm(Millis(900));
    assert_eq!(
        agent.fence_due(),
        Some(Millis(1_300)),
        "an older one moves nothing"
    );
    agent.confirm(Millis(1_200));
    assert_eq!(agent.fence_due(), Some(Millis(1_500)));

    assert_eq!(agent.fence(), 0, "nothing runs");
    assert!(agent.fenced);
    assert_eq!(agent.fence_due(), None, "fenced once, not again and again");
    assert!(!agent.past_fence(Millis(u64::MAX)));
    agent.confirm(Millis(1_200));
    assert!(agent.fenced, "the same confirmation again is nothing new");

    agent.confirm(Millis(1_600));
    assert!(!agent.fenced, "a newer confirmation arms it again");
    assert_eq!(agent.fence_due(), Some(Millis(1_900)));
}

#[test]
fn a_ping_confirms_the_pong_of_the_ping_it_acknowledges_within_a_bounded_window() {
    let (mut agent, _) = new_agent();
    agent.pinged(&ping_payload(1, 0), Millis(100));
    assert_eq!(agent.confirmed_at, None, "no pong of ours was numbered 0");
    agent.pinged(&ping_payload(2, 1), Millis(200));
    assert_eq!(
        agent.confirmed_at,
        Some(Millis(100)),
        "ping 1's pong left at 100"
    );
    agent.pinged(b"not ours", Millis(250));
    assert_eq!(agent.pings.len(), 2, "a payload of another kind is no ping");

    // The window holds the latest PINGS_KEPT pings: 64 of them.
    let (mut agent, _) = new_agent();
    for seq in 1..=64 {
        agent.pinged(&ping_payload(seq, 0), Millis(1_000 + seq));
    }
    assert_eq!(agent.pings.len(), PINGS_KEPT);
    // Ping 65 pushes ping 1 out before its acknowledgement is looked up.
    agent.pinged(&ping_payload(65, 1), Millis(1_065));
    assert_eq!(agent.confirmed_at, None, "ping 1 is forgotten");
    assert_eq!(agent.pings.len(), PINGS_KEPT);
    agent.pinged(&ping_payload(66, 3), Millis(1_066));
    assert_eq!(
        agent.confirmed_at,
        Some(Millis(1_003)),
        "ping 3 is the oldest kept"
    );
}

#[tokio::test]
async fn it_runs_an_attempt_once_keeps_its_result_until_acknowledged_and_kills_on_request() {
    let (mut agent, runner) = new_agent();
    assert_eq!(agent.obey(run(1)), None);
    assert_eq!(agent.obey(run(1)), None, "told twice");
    assert_eq!(runner.runs.load(Ordering::SeqCst), 1, "it runs once");

    let started = agent.events.recv().await.expect("an event");
    assert_eq!(
        agent.absorb(started),
        Some(FromAgent::Started {
            job: JobId(1),
            attempt: 1
        })
    );
    assert!(agent.running[&(JobId(1), 1)].started);
    assert_eq!(
        keys_in_hello(&agent),
        vec![(1, 1)],
        "a running attempt is named"
    );

    let kill = ToAgentMsg::Kill {
        job: JobId(1),
        attempt: 1,
        reason: KillReason::Stop(StopReason::Cancel),
    };
    assert_eq!(agent.obey(kill), None);
    let finished = agent.events.recv().await.expect("an event");
    match agent.absorb(finished) {
        Some(FromAgent::Finished {
            job: JobId(1),
            attempt: 1,
            outcome: Outcome::Killed,
            ..
        }) => {}
        other => panic!("expected its killed result, got {other:?}"),
    }
    assert!(agent.running.is_empty());
    assert_eq!(
        keys_in_hello(&agent),
        vec![(1, 1)],
        "an unacknowledged result is named"
    );

    // Its result is kept; the same order again is not a new run.
    assert_eq!(agent.obey(run(1)), None);
    assert_eq!(
        runner.runs.load(Ordering::SeqCst),
        1,
        "a finished attempt is not run again"
    );

    assert_eq!(
        agent.obey(ToAgentMsg::Ack {
            job: JobId(1),
            attempt: 1
        }),
        None
    );
    assert!(agent.outbox.is_empty());
    assert_eq!(keys_in_hello(&agent), vec![]);

    // An event for an attempt it no longer holds says nothing.
    assert_eq!(agent.absorb(RunEvent::Started((JobId(1), 1))), None);
    // Neither does a kill for one it never had.
    let stray = ToAgentMsg::Kill {
        job: JobId(9),
        attempt: 1,
        reason: KillReason::NotOwned,
    };
    assert_eq!(agent.obey(stray), None);
}

#[tokio::test]
async fn the_fence_kills_the_runs_that_may_run_elsewhere_and_reports_them_fenced() {
    let (mut agent, _) = new_agent();
    // Attempts 1 of 2 and 2 of 3: the supervisor may start another of each.
    agent.obey(run_of(1, 1, 2));
    agent.obey(run_of(2, 2, 3));
    // A job's last attempt: no other attempt of it can start anywhere.
    agent.obey(run_of(3, 1, 1));
    agent.obey(run_of(4, 3, 3));
    assert_eq!(agent.fence(), 2, "only the two that may run elsewhere");
    assert!(agent.fenced);
    assert!(agent.running[&(JobId(3), 1)].kill.is_some(), "runs on");
    assert!(agent.running[&(JobId(4), 3)].kill.is_some(), "runs on");
    let mut finished = Vec::new();
    while finished.len() < 2 {
        let event = agent.events.recv().await.expect("an event");
        if let Some(FromAgent::Finished { job, outcome, .. }) = agent.absorb(event) {
            assert_eq!(outcome, Outcome::Fenced, "job {job}: not a kill on request");
            finished.push(job.0);
        }
    }
    finished.sort();
    assert_eq!(finished, vec![1, 2]);
    assert_eq!(
        keys_in_hello(&agent),
        vec![(3, 1), (4, 3), (1, 1), (2, 2)],
        "the others still run; the fenced results wait in the outbox"
    );
    // A kill the supervisor asks for is a kill on request.
    agent.obey(ToAgentMsg::Kill {
        job: JobId(3),
        attempt: 1,
        reason: KillReason::Stop(StopReason::Cancel),
    });
    loop {
        let event = agent.events.recv().await.expect("an event");
        if let Some(FromAgent::Finished { job, outcome, .. }) = agent.absorb(event) {
            assert_eq!((job, outcome), (JobId(3), Outcome::Killed));
            break;
        }
    }
}

#[tokio::test]
async fn the_fence_comes_the_runners_kill_grace_early() {
    struct Slow;
    impl Runner for Slow {
        fn run(&self, order: RunOrder, control: RunControl) -> runner::RunFuture {
            Counting::default().run(order, control)
        }
        fn kill_grace_ms(&self) -> u64 {
            700
        }
    }
    let mut agent = Agent::new(options(), Arc::new(Slow));
    agent.fence_ms = Some(5_000);
    agent.confirm(Millis(1_000));
    assert_eq!(agent.fence_due(), Some(Millis(5_300)));
    assert!(!agent.past_fence(Millis(5_299)));
    assert!(agent.past_fence(Millis(5_300)));
    // A grace period too short for the kill grace: the fence stays three
    // ping intervals after the confirmation, where a healthy link keeps it.
    agent.ping_interval_ms = 1_500;
    assert_eq!(agent.fence_due(), Some(Millis(5_500)));
    agent.ping_interval_ms = 2_000;
    assert_eq!(agent.fence_due(), Some(Millis(6_000)), "nothing taken off");
}

#[tokio::test]
async fn reconnects_back_off_exponentially_within_bounds_with_jitter_over_the_upper_half() {
    let options = options(); // 4 ms doubling to at most 64 ms
    for (failures, exp) in [(1, 4), (2, 8), (3, 16), (5, 64), (6, 64), (40, 64)] {
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..2_000 {
            let wait = backoff_ms(&options, failures);
            assert!(
                (exp / 2..=exp).contains(&wait),
                "after {failures} failures: {wait} ms is outside {}..={exp}",
                exp / 2
            );
            seen.insert(wait);
        }
        if exp == 4 {
            // Every value of the range is drawn, both ends included.
            assert_eq!(seen.into_iter().collect::<Vec<_>>(), vec![2, 3, 4]);
        } else {
            assert!(
                seen.len() > 2,
                "after {failures} failures: no jitter: {seen:?}"
            );
        }
    }
}

#[tokio::test]
async fn an_agent_that_cannot_connect_gives_up_after_its_bound() {
    let options = AgentOptions {
        reconnect_attempts_max: Some(3),
        leave_alone_ms: None,
        tls: None,
        ..options()
    };
    let agent = Agent::new(options, Arc::new(Counting::default()));
    match agent.run().await {
        Err(AgentError::GaveUp(failures)) => assert_eq!(failures, 3),
        Ok(()) => panic!("it cannot succeed with nobody to connect to"),
    }
}

#[tokio::test]
async fn an_agent_alone_with_nothing_to_run_leaves_and_one_with_a_run_stays() {
    let options = AgentOptions {
        leave_alone_ms: Some(50),
        tls: None,
        ..options()
    };
    // Nothing running: it leaves, having tried more than once.
    let agent = Agent::new(options.clone(), Arc::new(Counting::default()));
    let left = tokio::time::timeout(Duration::from_secs(20), agent.run()).await;
    assert!(matches!(left, Ok(Ok(()))), "{left:?}");
    // A run in progress (the counting runner never ends one): it stays.
    let mut agent = Agent::new(options, Arc::new(Counting::default()));
    agent.obey(run(1));
    let stayed = tokio::time::timeout(Duration::from_millis(500), agent.run()).await;
    assert!(stayed.is_err(), "an agent with a run left it: {stayed:?}");
}

#[tokio::test]
async fn a_failed_send_kills_the_runs_only_at_the_fence() {
    let (mut agent, _) = new_agent();
    agent.obey(run_of(1, 1, 2));
    let key = (JobId(1), 1);
    for why in [SendFailed::Closed, SendFailed::Stalled] {
        let _ = agent.send_failed(why);
        assert!(!agent.fenced);
        assert!(
            agent.running[&key].kill.is_some(),
            "a lost connection alone kills nothing"
        );
    }
    let _ = agent.send_failed(SendFailed::Fence);
    assert!(agent.fenced);
    assert!(agent.running[&key].kill.is_none(), "its kill was sent");
}

/// A supervisor that welcomes each connection and hangs up at once.
async fn welcome_and_hang_up(listener: &tokio::net::TcpListener) {
    let (stream, _) = listener.accept().await.expect("accept");
    let mut ws = tokio_tungstenite::accept_async(stream)
        .await
        .expect("websocket");
    let hello = ws.next().await;
    assert!(matches!(hello, Some(Ok(Message::Text(_)))), "{hello:?}");
    let welcome = ToAgentMsg::Welcome {
        v: protocol::VERSION,
        ping_interval_ms: 1_000,
        ping_timeout_ms: 10_000,
        fence_ms: None,
    };
    ws.send(Message::text(protocol::encode(&welcome)))
        .await
        .expect("welcome");
}

#[tokio::test]
async fn sessions_cut_short_do_not_reset_the_backoff() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("listen");
    let options = AgentOptions {
        supervisor: listener.local_addr().expect("address").to_string(),
        reconnect_min_ms: 10,
        reconnect_max_ms: 10_000,
        ..options()
    };
    let agent = tokio::spawn(Agent::new(options, Arc::new(Counting::default())).run());
    let mut welcomed = Vec::new();
    for _ in 0..5 {
        welcome_and_hang_up(&listener).await;
        welcomed.push(crate::seam::now());
    }
    agent.abort();
    // The waits before connects 2..=5 follow 1..=4 failures in a row: at
    // least 5, 10, 20 and 40 ms (the upper half of 10 ms doubling).
    let gaps: Vec<u64> = welcomed.windows(2).map(|w| w[1].ms_since(w[0])).collect();
    assert!(
        gaps[2] >= 20 && gaps[3] >= 40,
        "the backoff did not grow: {gaps:?} ms"
    );
}

/// The output tail of `text` cut to `max` bytes, as a report carries it.
fn tail(text: &[u8], max: usize) -> String {
    runner::tail_of(std::io::Cursor::new(text), max)
}

#[test]
fn output_tails_start_on_the_first_whole_character_of_their_last_bytes() {
    assert_eq!(tail(b"", 8), "");
    assert_eq!(tail(b"short\n", 8), "short\n");
    assert_eq!(tail(b"exactly8", 8), "exactly8");
    assert_eq!(tail(b"more than eight", 8), "an eight");
    // The cut lands one, two and three bytes into a character of two,
    // three and four bytes: what is left of it is dropped, never shown as
    // a replacement character.
    for (text, want) in [
        ("\u{e9}abc", "abc"),   // é is 2 bytes: 1 of them left
        ("\u{2192}abc", "abc"), // → is 3 bytes: 1 or 2 left
        ("x\u{2192}abc", "abc"),
        ("\u{1f980}abc", "abc"), // the crab is 4 bytes: 1, 2 or 3 left
        ("x\u{1f980}abc", "abc"),
        ("xy\u{1f980}abc", "abc"),
    ] {
        let bytes = text.as_bytes();
        for max in 4..bytes.len() {
            let got = tail(bytes, max);
            let whole = std::str::from_utf8(&bytes[bytes.len() - max..]).is_ok();
            if !whole {
                assert_eq!(got, want, "{text:?} cut to its last {max} bytes");
            }
            assert!(
                got.len() <= max && text.ends_with(&got),
                "{text:?} to {max}: {got:?}"
            );
        }
    }
    // Bytes that are not UTF-8 inside the tail are replaced, and the tail
    // still keeps to its bound.
    let got = tail(b"ok \xff\xfe done", 9);
    assert!(
        got.contains('\u{fffd}') && got.ends_with(" done") && got.len() <= 9,
        "{got:?}"
    );
}

#[test]
fn a_result_kept_on_disk_outlives_the_agent_and_goes_once_acknowledged() {
    let work = tempfile::tempdir().unwrap();
    let disk = || {
        Arc::new(ProcessRunner {
            outbox: Some(Arc::new(Outbox::open(work.path()).unwrap())),
            ..ProcessRunner::default()
        })
    };
    // A result finished and never acknowledged; then the agent dies.
    let mut agent = Agent::new(options(), disk());
    let report = FinishedReport {
        outcome: Outcome::Exited { code: 4 },
        output_tail: "partial\n".into(),
        run_ms: 9,
    };
    let sent = agent.absorb(RunEvent::Finished((JobId(7), 1), report.clone()));
    assert!(matches!(sent, Some(FromAgent::Finished { .. })), "{sent:?}");
    drop(agent);
    // The next agent on the work dir names it in its hello, and sends it.
    let mut next = Agent::new(options(), disk());
    assert_eq!(keys_in_hello(&next), vec![(7, 1)]);
    assert_eq!(next.outbox[&(JobId(7), 1)], report);
    // Acknowledged: no longer kept.
    next.obey(ToAgentMsg::Ack {
        job: JobId(7),
        attempt: 1,
    });
    assert!(next.outbox.is_empty());
    assert!(keys_in_hello(&Agent::new(options(), disk())).is_empty());
}

#[test]
fn results_an_earlier_version_kept_a_file_each_are_imported_and_the_rest_moved_aside() {
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().join(outbox::OUTBOX_DIR);
    std::fs::create_dir_all(&dir).unwrap();
    let good = FinishedReport {
        outcome: Outcome::Exited { code: 3 },
        output_tail: "done\n".into(),
        run_ms: 12,
    };
    std::fs::write(dir.join("5-2.json"), serde_json::to_vec(&good).unwrap()).unwrap();
    let hostile: [(&str, Vec<u8>); 7] = [
        ("6-1.json", b"{not json".to_vec()),
        (
            "7-1.json",
            br#"{"outcome":{"type":"exploded"},"output_tail":"","run_ms":0}"#.to_vec(),
        ),
        (
            "8-1.json",
            vec![b' '; (outbox::KEPT_RESULT_BYTES_MAX + 1) as usize],
        ),
        ("0-1.json", serde_json::to_vec(&good).unwrap()),
        ("9-01.json", serde_json::to_vec(&good).unwrap()),
        ("notes.txt", b"hello".to_vec()),
        ("../escape.json", b"{}".to_vec()),
    ];
    for (name, bytes) in &hostile {
        if !name.contains('/') {
            std::fs::write(dir.join(name), bytes).unwrap();
        }
    }
    // A half-written one of a crash mid-write is a hidden temporary: skipped.
    std::fs::write(dir.join(".4-1.json.new"), b"{\"outc").unwrap();
    let outbox = Outbox::open(work.path()).unwrap();
    assert_eq!(outbox.kept(), vec![(JobId(5), 2, good.clone())]);
    for (name, _) in hostile.iter().filter(|(n, _)| !n.contains('/')) {
        assert!(
            dir.join(format!("{name}.bad")).exists(),
            "{name} moved aside"
        );
    }
    assert!(!dir.join("5-2.json").exists(), "imported into the log");
    drop(outbox);
    let again = Outbox::open(work.path()).unwrap();
    assert_eq!(
        again.kept(),
        vec![(JobId(5), 2, good)],
        "the next read is the same"
    );
    assert_eq!(outbox::kept_result_key("12-3.json"), Some((JobId(12), 3)));
}

#[test]
fn an_outbox_log_line_that_cannot_be_read_whole_is_never_trusted() {
    let work = tempfile::tempdir().unwrap();
    let report = |code| FinishedReport {
        outcome: Outcome::Exited { code },
        output_tail: "line one\nline two\n".into(),
        run_ms: 5,
    };
    let json = |code| serde_json::to_string(&report(code)).unwrap();
    let mut log = Vec::new();
    for line in [
        format!("keep 1 1 {}", json(1)),
        format!("keep 2 1 {}", json(2)),
        "drop 2 1".to_string(),
        "keep 3 1 {not json".to_string(),
        format!("keep 03 1 {}", json(3)),
        format!("keep 4 0 {}", json(4)),
        format!("keep 0 1 {}", json(4)),
        format!("send 5 1 {}", json(5)),
        "drop 1".to_string(),
        "drop 9 1 extra".to_string(),
        String::new(),
        format!(
            "keep 6 1 {}",
            " ".repeat(outbox::KEPT_RESULT_BYTES_MAX as usize + 10)
        ),
        format!("keep 7 2 {}", json(7)),
    ] {
        log.extend_from_slice(line.as_bytes());
        log.push(b'\n');
    }
    log.extend_from_slice(b"keep 8 1 \xff\xfe\n");
    // Torn: the agent stopped mid-write.
    log.extend_from_slice(format!("keep 9 1 {}", json(9)).as_bytes());
    let path = work.path().join(outbox::OUTBOX_LOG);
    std::fs::write(&path, &log).unwrap();
    let outbox = Outbox::open(work.path()).unwrap();
    assert_eq!(
        outbox.kept(),
        vec![(JobId(1), 1, report(1)), (JobId(7), 2, report(7))]
    );
    assert_eq!(
        std::fs::read(path.with_extension("log.bad")).unwrap(),
        log,
        "kept aside as it was"
    );
    // The log now holds only what it trusts, and goes on from there.
    outbox.keep(JobId(10), 1, &report(10));
    outbox.drop_result(JobId(1), 1);
    drop(outbox);
    let again = Outbox::open(work.path()).unwrap();
    assert_eq!(
        again.kept(),
        vec![(JobId(7), 2, report(7)), (JobId(10), 1, report(10))]
    );
}

#[test]
fn the_outbox_log_stays_small_however_many_results_pass_through_it() {
    let work = tempfile::tempdir().unwrap();
    let outbox = Outbox::open(work.path()).unwrap();
    let report = FinishedReport {
        outcome: Outcome::Exited { code: 0 },
        output_tail: "x".repeat(2000),
        run_ms: 1,
    };
    // One result waits throughout; 5,000 come and go (10 MB of lines).
    outbox.keep(JobId(1), 1, &report);
    for job in 2..5_002 {
        outbox.keep(JobId(job), 1, &report);
        outbox.drop_result(JobId(job), 1);
    }
    let bytes = std::fs::metadata(work.path().join(outbox::OUTBOX_LOG))
        .unwrap()
        .len();
    assert!(bytes <= 2 * 1024 * 1024, "{bytes} bytes");
    drop(outbox);
    let again = Outbox::open(work.path()).unwrap();
    assert_eq!(again.kept(), vec![(JobId(1), 1, report)]);
}

#[test]
fn a_directory_a_job_user_may_not_pass_through_is_found_by_its_bits() {
    use crate::agent::runner::blocked_ancestor;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let dir = tempfile::tempdir().expect("tempdir");
    let closed = dir.path().join("closed");
    let run = closed.join("runs").join("1-1");
    std::fs::create_dir_all(&run).expect("dirs");
    // Whatever the umask: only `closed` is ever shut to anyone.
    for open in [dir.path(), &closed.join("runs"), &run] {
        std::fs::set_permissions(open, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }

    let owner = std::fs::metadata(&closed).expect("meta");
    let (uid, gid) = (owner.uid(), owner.gid());
    let stranger = uid.wrapping_add(12_345);
    let set = |mode: u32| {
        std::fs::set_permissions(&closed, std::fs::Permissions::from_mode(mode)).expect("chmod")
    };
    // 0700: a stranger is stopped at `closed`; its owner passes.
    set(0o700);
    assert_eq!(
        blocked_ancestor(&run, stranger, &[]),
        Some((closed.clone(), 0o700))
    );
    assert_eq!(blocked_ancestor(&run, uid, &[]), None);
    // 0710: a member of its group passes, others do not.
    set(0o710);
    assert_eq!(blocked_ancestor(&run, stranger, &[gid]), None);
    assert!(blocked_ancestor(&run, stranger, &[]).is_some());
    // 0711: everyone passes; an owner without its own x bit does not.
    set(0o711);
    assert_eq!(blocked_ancestor(&run, stranger, &[]), None);
    set(0o011);
    assert_eq!(
        blocked_ancestor(&run, uid, &[gid]),
        Some((closed.clone(), 0o011)),
        "the owner's bits alone count for the owner"
    );
    set(0o755);
}

fn spare_names(work: &std::path::Path) -> Vec<String> {
    names_in(&work.join(runner::SPARE_DIRS_DIR))
}

fn names_in(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

// (Runs of real processes through the spares are the end-to-end tests':
// every job there starts in one.)
#[test]
fn a_run_takes_a_run_dir_made_ahead_and_another_is_made_in_its_place() {
    use std::io::{Read, Seek, Write};
    use std::os::unix::fs::MetadataExt;
    let work = tempfile::tempdir().unwrap();
    let spares = runner::SpareDirs::new(work.path()).unwrap();
    let made = spare_names(work.path());
    assert_eq!(made.len(), 4, "{made:?}");
    let spare_root = work.path().join(runner::SPARE_DIRS_DIR);
    let inode = |dir: &std::path::Path| std::fs::metadata(dir.join("output")).unwrap().ino();
    let made_inodes: Vec<u64> = made.iter().map(|n| inode(&spare_root.join(n))).collect();
    let run_dir = work.path().join("3-1");
    let mut output = spares.take(&run_dir).expect("a spare");
    // One of the spares, renamed into place, holding its output alone.
    let taken = made_inodes.iter().position(|&i| i == inode(&run_dir));
    assert!(taken.is_some(), "the run dir is a spare");
    assert_eq!(names_in(&run_dir), ["output"]);
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &std::path::Path| std::fs::symlink_metadata(p).unwrap().permissions().mode();
    assert_eq!(mode(&run_dir.join("output")) & 0o777, 0o600);
    // The handle is the file's: what the job writes is read back from it.
    output.write_all(b"hello\n").unwrap();
    output.rewind().unwrap();
    let mut read = String::new();
    output.read_to_string(&mut read).unwrap();
    assert_eq!(read, "hello\n");
    assert_eq!(
        std::fs::read_to_string(run_dir.join("output")).unwrap(),
        "hello\n"
    );
    // Its age counts from its run, not from when it was made.
    let age = std::fs::metadata(run_dir.join("output"))
        .unwrap()
        .modified()
        .unwrap()
        .elapsed();
    // (an mtime a little ahead of this clock reads as an error: young too)
    assert!(age.as_ref().map_or(true, |a| a.as_secs() < 60), "{age:?}");
    let left = spare_names(work.path());
    assert_eq!(left.len(), 3, "{left:?}");
    assert!(!left.contains(&made[taken.unwrap()]));
    spares.replenish();
    let now = spare_names(work.path());
    assert_eq!(now.len(), 4, "{now:?}");
    assert!(now.iter().any(|n| !made.contains(n)), "a new one: {now:?}");
}

#[test]
fn a_run_dir_already_there_is_used_as_it_is_and_the_spare_kept_for_the_next() {
    let work = tempfile::tempdir().unwrap();
    let spares = runner::SpareDirs::new(work.path()).unwrap();
    let existing = work.path().join("4-1");
    std::fs::create_dir(&existing).unwrap();
    std::fs::write(existing.join("left"), "from before").unwrap();
    assert!(spares.take(&existing).is_none(), "never replaced");
    assert_eq!(names_in(&existing), ["left"]);
    assert_eq!(spare_names(work.path()).len(), 4, "the spare is kept");
    // A spare that cannot be renamed (its parent is gone) is given up.
    assert!(spares.take(&work.path().join("no/such/5-1")).is_none());
    assert_eq!(spare_names(work.path()).len(), 3);
}

#[test]
fn an_agent_starts_its_spare_run_dirs_afresh() {
    let work = tempfile::tempdir().unwrap();
    let root = work.path().join(runner::SPARE_DIRS_DIR);
    std::fs::create_dir_all(root.join("0")).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", root.join("0/output")).unwrap();
    std::fs::write(root.join("stray"), "x").unwrap();
    runner::SpareDirs::new(work.path()).unwrap();
    let names = spare_names(work.path());
    assert_eq!(names, ["0", "1", "2", "3"]);
    for name in names {
        let output = std::fs::symlink_metadata(root.join(name).join("output")).unwrap();
        assert!(output.is_file() && output.len() == 0);
    }
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&root).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o700, "the agent's own");
    // Never swept as a run dir.
    let swept = retention::sweep(
        work.path(),
        |_| false,
        &retention::Retention {
            keep_hours: 0,
            max_mib: 0,
        },
        crate::core::Millis(u64::MAX / 2),
    )
    .unwrap();
    assert_eq!(swept.removed, 0);
    assert!(root.join("0").is_dir());
}
