//! The core's rules, one test each, named like the incident they prevent.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::testkit::*;
use super::*;

fn harness() -> Harness {
    Harness::new(basic_config())
}

// ---- submit --------------------------------------------------------------

#[test]
fn submit_limits_are_inclusive_exactly_at_each_bound_is_accepted() {
    let mut h = harness();
    let limits = SubmitLimits::default();
    let cpus_max = h
        .core
        .config()
        .agent_cpus_max
        .min(h.core.config().pool_cpus(Kind::Sequential));
    let argv: Vec<String> = (0..limits.argv_items_max)
        .map(|i| format!("a{i}"))
        .collect();
    let at_bounds = [
        SubmitSpec {
            argv: argv.clone(),
            ..cmd(&[])
        },
        SubmitSpec {
            cpus: cpus_max,
            ..cmd(&["x"])
        },
        SubmitSpec {
            max_attempts: limits.attempts_max,
            ..cmd(&["x"])
        },
        SubmitSpec {
            argv: vec!["x".repeat(limits.argv_bytes_max)],
            ..cmd(&[])
        },
        SubmitSpec {
            env: BTreeMap::from([("K".to_string(), "v".repeat(limits.env_bytes_max - 1))]),
            ..cmd(&["x"])
        },
        SubmitSpec {
            queue_timeout_secs: Some(limits.queue_timeout_secs_max),
            ..cmd(&["x"])
        },
        SubmitSpec {
            labels: BTreeMap::from([("k".to_string(), "v".repeat(limits.label_bytes_max - 1))]),
            ..cmd(&["x"])
        },
    ];
    for spec in at_bounds {
        let reply = h.try_submit("ana", "premium", spec.clone());
        assert!(
            matches!(reply, Reply::Submitted { .. }),
            "{reply:?} for argv {} cpus {} attempts {}",
            spec.argv.len(),
            spec.cpus,
            spec.max_attempts
        );
    }
    let over = [
        SubmitSpec {
            argv: argv
                .iter()
                .cloned()
                .chain(["one more".to_string()])
                .collect(),
            ..cmd(&[])
        },
        SubmitSpec {
            cpus: cpus_max + 1,
            ..cmd(&["x"])
        },
        SubmitSpec {
            max_attempts: limits.attempts_max + 1,
            ..cmd(&["x"])
        },
        SubmitSpec {
            argv: vec!["x".repeat(limits.argv_bytes_max + 1)],
            ..cmd(&[])
        },
        SubmitSpec {
            env: BTreeMap::from([("K".to_string(), "v".repeat(limits.env_bytes_max))]),
            ..cmd(&["x"])
        },
        SubmitSpec {
            queue_timeout_secs: Some(limits.queue_timeout_secs_max + 1),
            ..cmd(&["x"])
        },
        SubmitSpec {
            labels: BTreeMap::from([("k".to_string(), "v".repeat(limits.label_bytes_max))]),
            ..cmd(&["x"])
        },
    ];
    for spec in over {
        let reply = h.try_submit("ana", "premium", spec);
        assert!(matches!(reply, Reply::Rejected { .. }), "{reply:?}");
    }
    // A user name of up to 128 bytes.
    let queued = h.core.queued(Kind::Sequential);
    assert!(matches!(
        h.try_submit(&"u".repeat(128), "basic", cmd(&["x"])),
        Reply::Submitted { .. }
    ));
    assert_eq!(
        h.core.queued(Kind::Sequential),
        queued + 1,
        "no agent: it waits"
    );
    assert!(matches!(
        h.try_submit(&"u".repeat(129), "basic", cmd(&["x"])),
        Reply::Rejected {
            error: SubmitError::BadUser
        }
    ));
    assert_eq!(h.core.queued(Kind::Sequential), queued + 1);
}

#[test]
fn output_tails_and_reasons_are_cut_to_their_bounds_on_character_boundaries() {
    assert_eq!(spec::tail("\u{e9}\u{e9}", 3), "\u{e9}");
    assert_eq!(spec::tail("abc", 3), "abc");
    assert_eq!(spec::tail("abcd", 3), "bcd");
    assert_eq!(spec::tail("abcdefgh", 3), "fgh");
    let mut h = harness();
    h.connect("a1", 1);
    let job = h.submit("ana", "basic", cmd(&["x"]));
    h.started("a1", job, 1);
    let error = "\u{e9}".repeat(10_000);
    h.finished("a1", job, 1, Outcome::SpawnFailed { error });
    let record = h.state_record(job);
    let max = h.core.config().reason_bytes_max;
    assert!(
        record.reason.len() <= max,
        "{} > {max}",
        record.reason.len()
    );
    assert!(
        record.reason.len() > max / 2,
        "cut too much: {}",
        record.reason.len()
    );
}

#[test]
fn submit_bad_input_gets_a_typed_error_and_nothing_is_queued() {
    let mut h = harness();
    let limits = SubmitLimits::default();
    let cases: Vec<(SubmitSpec, &str)> = vec![
        (cmd(&[]), "argv is empty"),
        (cmd(&[""]), "argv[0] is empty"),
        (
            SubmitSpec {
                argv: vec!["x".into(); limits.argv_items_max + 1],
                ..cmd(&["x"])
            },
            "argv has",
        ),
        (
            cmd(&["echo", &"a".repeat(limits.argv_bytes_max)]),
            "argv is",
        ),
        (cmd(&["echo", "a\0b"]), "NUL"),
        (
            SubmitSpec {
                env: BTreeMap::from([("A=B".into(), "1".into())]),
                ..cmd(&["x"])
            },
            "env name",
        ),
        (
            SubmitSpec {
                env: BTreeMap::from([(String::new(), "1".into())]),
                ..cmd(&["x"])
            },
            "env name",
        ),
        (
            SubmitSpec {
                env: (0..=limits.env_items_max)
                    .map(|i| (format!("K{i}"), "v".into()))
                    .collect(),
                ..cmd(&["x"])
            },
            "env has",
        ),
        (
            SubmitSpec {
                labels: (0..=limits.labels_max)
                    .map(|i| (format!("l{i}"), "v".into()))
                    .collect(),
                ..cmd(&["x"])
            },
            "labels has",
        ),
        (
            SubmitSpec {
                labels: BTreeMap::from([("k".into(), "v".repeat(300))]),
                ..cmd(&["x"])
            },
            "label is",
        ),
        (
            SubmitSpec {
                kind: "gpu".into(),
                ..cmd(&["x"])
            },
            "unknown kind \"gpu\"",
        ),
        (
            SubmitSpec {
                cpus: 0,
                ..cmd(&["x"])
            },
            "cpus must be between 1 and 256",
        ),
        (
            SubmitSpec {
                cpus: 257,
                ..cmd(&["x"])
            },
            "cpus must be",
        ),
        (
            SubmitSpec {
                max_run_secs: Some(0),
                ..cmd(&["x"])
            },
            "max_run_secs",
        ),
        (
            SubmitSpec {
                max_run_secs: Some(3601),
                ..cmd(&["x"])
            },
            "max_run_secs must be between 1 and 3600",
        ),
        (retried(0, &["x"]), "max_attempts"),
        (retried(11, &["x"]), "max_attempts"),
        (
            SubmitSpec {
                queue_timeout_secs: Some(0),
                ..cmd(&["x"])
            },
            "queue_timeout_secs",
        ),
        (
            SubmitSpec {
                cwd: Some("/\0".into()),
                ..cmd(&["x"])
            },
            "cwd contains a NUL",
        ),
        (
            SubmitSpec {
                idempotency_key: Some("k".repeat(257)),
                ..cmd(&["x"])
            },
            "idempotency_key is",
        ),
    ];
    for (spec, expected) in cases {
        match h.try_submit("ana", "basic", spec) {
            Reply::Rejected { error } => {
                assert!(
                    error.to_string().contains(expected),
                    "{error} should mention {expected:?}"
                )
            }
            other => panic!("expected a rejection mentioning {expected:?}, got {other:?}"),
        }
    }
    match h.try_submit("ana", "gold", cmd(&["x"])) {
        Reply::Rejected {
            error: SubmitError::UnknownPlan { plan },
        } => assert_eq!(plan, "gold"),
        other => panic!("{other:?}"),
    }
    for user in ["", "a\nb", &"u".repeat(129)] {
        assert!(matches!(
            h.try_submit(user, "basic", cmd(&["x"])),
            Reply::Rejected {
                error: SubmitError::BadUser
            }
        ));
    }
    assert!(h.store.is_empty(), "a rejected submission wrote nothing");
    assert_eq!(
        h.core.queued(Kind::Sequential) + h.core.queued(Kind::Parallel),
        0
    );
}

#[test]
fn submit_a_kind_the_plan_does_not_allow_is_rejected_instead_of_waiting_forever() {
    let mut config = basic_config();
    config.plans.get_mut("basic").unwrap().parallel.max_running = 0;
    let mut h = Harness::new(config);
    match h.try_submit("ana", "basic", parallel(1)) {
        Reply::Rejected { error } => {
            assert_eq!(error.to_string(), "plan basic allows no parallel jobs")
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        h.try_submit("ana", "basic", cmd(&["x"])),
        Reply::Submitted { .. }
    ));
}

#[test]
fn submit_a_repeated_idempotency_key_returns_the_first_job_until_the_window_ends() {
    let mut h = harness();
    let spec = SubmitSpec {
        idempotency_key: Some("run-42".into()),
        ..cmd(&["sim"])
    };
    let first = h.submit("ana", "basic", spec.clone());
    assert_eq!(
        answered(h.try_submit("ana", "basic", spec.clone())),
        Some((first, true))
    );
    // Another user's identical key is their own.
    let bob = h.submit("bob", "basic", spec.clone());
    assert_ne!(bob, first);
    // Still the first job after it ended and left the core.
    h.cancel(first);
    assert_eq!(
        answered(h.try_submit("ana", "basic", spec.clone())),
        Some((first, true))
    );
    h.advance(h.core.config().idempotency_window_secs * 1000);
    match h.try_submit("ana", "basic", spec) {
        Reply::Submitted {
            job,
            existing: false,
            ..
        } => assert!(job > bob),
        other => panic!("{other:?}"),
    }
}

#[test]
fn submit_a_repeated_idempotency_key_with_a_different_request_is_a_conflict() {
    let mut h = harness();
    let keyed = |argv: &[&str]| SubmitSpec {
        idempotency_key: Some("nightly".into()),
        ..cmd(argv)
    };
    let first = h.submit("ana", "basic", keyed(&["sim", "--a"]));
    let conflict = Reply::Rejected {
        error: SubmitError::IdempotencyConflict {
            key: "nightly".into(),
            job: first,
        },
    };
    assert_eq!(
        h.try_submit("ana", "basic", keyed(&["sim", "--b"])),
        conflict
    );
    // Still a conflict after the first job ended, and after a restart
    // from the store, and from a snapshot.
    h.cancel(first);
    assert_eq!(
        h.try_submit("ana", "basic", keyed(&["sim", "--b"])),
        conflict
    );
    let mut restored = h.crash_and_restore(basic_config(), 1_000);
    assert_eq!(
        restored.try_submit("ana", "basic", keyed(&["sim", "--b"])),
        conflict
    );
    let mut copy = Harness::from_core(
        Core::from_snapshot(restored.core.snapshot()).expect("restores"),
        restored.now,
    );
    assert_eq!(
        copy.try_submit("ana", "basic", keyed(&["sim", "--b"])),
        conflict
    );
    // The same request is the first job, as always.
    assert_eq!(
        answered(copy.try_submit("ana", "basic", keyed(&["sim", "--a"]))),
        Some((first, true))
    );
    assert!(h.core.situation(first).is_none(), "nothing new was queued");
}

#[test]
fn submit_past_the_plans_queued_bound_is_refused_and_loses_nothing() {
    let mut config = basic_config();
    config.plans.get_mut("basic").unwrap().max_queued = 3;
    let mut h = Harness::new(config);
    let queued: Vec<JobId> = (0..3)
        .map(|_| h.submit("ana", "basic", retried(2, &["a"])))
        .collect();
    let refused = h.try_submit("ana", "basic", parallel(1));
    assert_eq!(
        refused,
        Reply::Rejected {
            error: SubmitError::TooManyQueued {
                queued: 3,
                max: 3,
                plan: "basic".into()
            }
        }
    );
    assert_eq!(
        refused_message(&refused),
        "you have 3 jobs waiting; plan basic allows 3: wait for some to start, or cancel some"
    );
    // Another user's bound is their own; ana's queued jobs are all there.
    h.submit("bob", "basic", cmd(&["b"]));
    assert_eq!(h.core.queued(Kind::Sequential), 4);
    // A job that starts makes room (running jobs do not count), and so
    // does a cancel.
    h.connect("a1", 1);
    assert_eq!(h.state(queued[0]), JobState::Dispatched);
    let fourth = h.submit("ana", "basic", cmd(&["a"]));
    assert!(matches!(
        h.try_submit("ana", "basic", cmd(&["a"])),
        Reply::Rejected { .. }
    ));
    h.cancel(fourth);
    h.submit("ana", "basic", cmd(&["a"]));
    // A requeued job is never refused, even past the bound.
    h.gone("a1", GoneReason::Closed);
    h.advance(h.core.config().agent_grace_ms);
    assert_eq!(h.state(queued[0]), JobState::Queued);
    assert!(h
        .core
        .situation(queued[0])
        .unwrap()
        .starts_with("waiting for a sequential CPU slot"));
    assert!(matches!(
        h.try_submit("ana", "basic", cmd(&["a"])),
        Reply::Rejected { .. }
    ));
}

fn refused_message(reply: &Reply) -> String {
    match reply {
        Reply::Rejected { error } => error.to_string(),
        other => panic!("not refused: {other:?}"),
    }
}

#[test]
fn submit_a_job_runs_as_the_operating_system_user_its_user_is_mapped_to() {
    let mut config = basic_config();
    config.run_as = BTreeMap::from([
        ("ana".to_string(), "ana_os".to_string()),
        ("*".to_string(), "nobody".to_string()),
    ]);
    let mut h = Harness::new(config);
    let ana = h.submit("ana", "basic", cmd(&["a"]));
    let bob = h.submit("bob", "basic", cmd(&["b"]));
    assert_eq!(h.state_record(ana).spec.run_as.as_deref(), Some("ana_os"));
    assert_eq!(h.state_record(bob).spec.run_as.as_deref(), Some("nobody"));
    // Without a mapping, the agent decides.
    let mut h = harness();
    let job = h.submit("ana", "basic", cmd(&["a"]));
    assert_eq!(h.state_record(job).spec.run_as, None);
}

// ---- fair queue ------------------------------------------------------------

#[test]
fn queue_premium_plan_is_served_before_basic() {
    let mut h = harness();
    let basic = h.submit("ana", "basic", cmd(&["a"]));
    let premium = h.submit("bob", "premium", cmd(&["b"]));
    assert_eq!(h.core.queue_position(premium), Some(1));
    assert_eq!(h.core.queue_position(basic), Some(2));
    let effects = h.connect("a1", 1);
    assert_eq!(runs(&effects), vec![("a1".to_string(), premium, 1)]);
}

#[test]
fn queue_round_robin_across_users_fifo_within_a_user() {
    let mut h = harness();
    let a1 = h.submit("ana", "basic", cmd(&["a1"]));
    let a2 = h.submit("ana", "basic", cmd(&["a2"]));
    let a3 = h.submit("ana", "basic", cmd(&["a3"]));
    let b1 = h.submit("bob", "basic", cmd(&["b1"]));
    let c1 = h.submit("cy", "basic", cmd(&["c1"]));
    let expected = [a1, b1, c1, a2, a3];
    for (i, job) in expected.iter().enumerate() {
        assert_eq!(
            h.core.queue_position(*job),
            Some(i + 1),
            "position of {job}"
        );
    }
    h.connect("w", 1);
    let mut order = Vec::new();
    for _ in 0..expected.len() {
        let (agent, job, attempt) = runs(&h.log).last().cloned().expect("a run");
        order.push(job);
        h.started(&agent, job, attempt);
        h.exited(&agent, job, attempt, 0);
    }
    assert_eq!(order, expected);
}

#[test]
fn queue_situation_names_the_slot_and_the_position() {
    let mut h = harness();
    h.connect("a1", 2);
    let running = h.submit("ana", "basic", parallel(2));
    let waiting: Vec<JobId> = ["bob", "cy", "dee"]
        .iter()
        .map(|u| h.submit(u, "basic", parallel(1)))
        .collect();
    assert_eq!(h.core.situation(running).unwrap(), "starting on agent a1");
    assert_eq!(
        h.core.situation(waiting[2]).unwrap(),
        "waiting for a parallel CPU slot, position 3"
    );
    // Ana's second parallel job waits for her own: basic allows one.
    let second = h.submit("ana", "basic", parallel(1));
    h.exited("a1", waiting[0], 1, 0); // stale: not dispatched, ignored
    assert!(h
        .core
        .situation(second)
        .unwrap()
        .starts_with("waiting for a parallel CPU slot"));
}

#[test]
fn grant_is_all_or_nothing_and_a_large_job_is_not_overtaken() {
    let mut h = harness();
    h.connect("a1", 4);
    let small = h.submit("ana", "premium", parallel(1));
    let big = h.submit("bob", "premium", parallel(4));
    let later = h.submit("cy", "premium", parallel(1));
    let placed: Vec<JobId> = runs(&h.log).iter().map(|r| r.1).collect();
    assert_eq!(
        placed,
        vec![small],
        "the 4-cpu job takes no partial grant; the later one does not jump it"
    );
    assert_eq!(h.state(big), JobState::Queued);
    assert_eq!(h.state(later), JobState::Queued);
    assert_eq!(
        h.core.situation(big).unwrap(),
        "waiting for a parallel CPU slot, position 1"
    );
    // The small job ends: the big job goes first, whole.
    h.started("a1", small, 1);
    let effects = h.exited("a1", small, 1, 0);
    assert_eq!(runs(&effects), vec![("a1".to_string(), big, 1)]);
    assert_eq!(h.core.agent(&AgentId::new("a1")).unwrap().used_cpus, 4);
}

#[test]
fn a_job_larger_than_every_connected_agent_steps_aside_until_one_fits() {
    let mut h = harness();
    h.connect("a1", 2);
    h.connect("a2", 2);
    let small = h.submit("ana", "premium", parallel(2));
    let big = h.submit("bob", "premium", parallel(4));
    let later = h.submit("cy", "premium", parallel(1));
    // The big job fits no connected agent: it does not block the later one.
    assert_eq!(
        runs(&h.log).iter().map(|r| r.1).collect::<Vec<_>>(),
        vec![small, later]
    );
    assert_eq!(h.state(big), JobState::Queued);
    assert_eq!(
        h.core.situation(big).unwrap(),
        "needs 4 CPUs; the largest connected agent has 2: waiting out of line for one that fits"
    );
    assert_eq!(h.core.queued(Kind::Parallel), 1, "still counted as queued");
    // It survives a snapshot exactly.
    let copy = Core::from_snapshot(h.core.snapshot()).expect("the snapshot restores");
    assert_eq!(copy.snapshot(), h.core.snapshot());
    assert_eq!(copy.situation(big), h.core.situation(big));
    // Capacity that fits arrives while small jobs hold part of it: the big
    // job is back in line and holds its place against a stream of small ones.
    h.connect("big", 4);
    let streamed = h.submit("dee", "premium", parallel(1));
    let filler = h.submit("eve", "premium", parallel(1));
    assert_eq!(
        h.state(big),
        JobState::Dispatched,
        "an empty 4-CPU agent fits it"
    );
    assert_eq!(h.placed(big).0, "big");
    assert_eq!(h.state(streamed), JobState::Dispatched);
    assert_eq!(h.state(filler), JobState::Queued, "every CPU is held");
}

#[test]
fn a_large_job_back_in_line_is_not_starved_by_small_ones() {
    let mut h = harness();
    h.connect("a1", 1);
    let big = h.submit("bob", "premium", parallel(2));
    assert!(h.core.situation(big).unwrap().starts_with("needs 2 CPUs"));
    // A 2-CPU agent connects, busy with one small job.
    h.connect("a2", 2);
    assert_eq!(
        h.state(big),
        JobState::Dispatched,
        "whole on the empty agent"
    );
    assert_eq!(h.placed(big).0, "a2");
    // The same with the big agent half used when the big job comes back:
    // a1 reconnects with 2 CPUs, still running a small job.
    let mut h = harness();
    h.connect("a1", 1);
    let busy = h.submit("ana", "premium", parallel(1));
    h.started("a1", busy, 1);
    let big = h.submit("bob", "premium", parallel(2));
    h.gone("a1", GoneReason::Closed);
    h.connect_with(
        "a1",
        2,
        vec![AttemptReport {
            job: busy,
            attempt: 1,
            finished: None,
        }],
    );
    assert_eq!(
        h.core.situation(big).unwrap(),
        "waiting for a parallel CPU slot, position 1",
        "back in line on the agent that grew"
    );
    let small = h.submit("cy", "premium", parallel(1));
    assert_eq!(
        h.state(small),
        JobState::Queued,
        "the big job holds its place"
    );
    h.started("a1", busy, 1);
    let effects = h.exited("a1", busy, 1, 0);
    assert_eq!(runs(&effects), vec![("a1".to_string(), big, 1)]);
}

#[test]
fn a_job_set_aside_can_be_canceled_or_time_out_in_the_queue() {
    let mut h = harness();
    h.connect("a1", 1);
    let big = h.submit("bob", "premium", parallel(2));
    let timed = h.submit(
        "bob",
        "premium",
        SubmitSpec {
            queue_timeout_secs: Some(10),
            ..parallel(2)
        },
    );
    assert!(matches!(
        h.cancel(big),
        Reply::Cancel {
            state: JobState::Canceled,
            ..
        }
    ));
    h.advance(10_000);
    assert_eq!(h.state(timed), JobState::TimedOut);
    assert_eq!(h.core.queued(Kind::Parallel), 0);
}

#[test]
fn plan_cap_parks_the_user_and_the_next_user_gets_the_slot() {
    let mut h = harness();
    h.connect("a1", 8);
    let ana1 = h.submit("ana", "basic", parallel(1));
    let ana2 = h.submit("ana", "basic", parallel(1));
    let bob = h.submit("bob", "basic", parallel(1));
    assert_eq!(h.state(ana1), JobState::Dispatched);
    assert_eq!(
        h.state(ana2),
        JobState::Queued,
        "basic allows one parallel job at a time"
    );
    assert_eq!(
        h.state(bob),
        JobState::Dispatched,
        "ana's cap does not block bob"
    );
    assert!(h
        .core
        .situation(ana2)
        .unwrap()
        .contains("plan basic allows 1"));
    h.started("a1", ana1, 1);
    let effects = h.exited("a1", ana1, 1, 0);
    assert_eq!(runs(&effects), vec![("a1".to_string(), ana2, 1)]);
}

#[test]
fn pool_size_bounds_each_kind_independently() {
    let mut h = Harness::new(CoreConfig {
        pool_parallel_cpus: 2,
        ..basic_config()
    });
    h.connect("a1", 8);
    let jobs: Vec<JobId> = ["a", "b", "c"]
        .iter()
        .map(|u| h.submit(u, "basic", parallel(1)))
        .collect();
    let seq = h.submit("d", "basic", cmd(&["s"]));
    assert_eq!(h.core.pool_used(Kind::Parallel), 2);
    assert_eq!(h.state(jobs[2]), JobState::Queued);
    assert_eq!(
        h.state(seq),
        JobState::Dispatched,
        "the sequential pool is separate"
    );
}

// ---- cancel -----------------------------------------------------------------

#[test]
fn cancel_while_waiting_for_a_cpu_slot_the_slot_goes_to_the_next_job() {
    let mut h = harness();
    h.connect("a1", 1);
    let running = h.submit("ana", "basic", cmd(&["r"]));
    let waiting = h.submit("bob", "basic", cmd(&["w"]));
    let next = h.submit("cy", "basic", cmd(&["n"]));
    assert_eq!(
        h.cancel(waiting),
        Reply::Cancel {
            job: waiting,
            state: JobState::Canceled
        }
    );
    assert!(
        h.core.job(waiting).is_none(),
        "its queue entry and record left the core"
    );
    assert_eq!(h.core.queue_position(next), Some(1));
    h.started("a1", running, 1);
    let effects = h.exited("a1", running, 1, 0);
    assert_eq!(runs(&effects), vec![("a1".to_string(), next, 1)]);
    assert!(
        runs(&h.log).iter().all(|r| r.1 != waiting),
        "a canceled job never runs"
    );
}

#[test]
fn cancel_is_idempotent_and_names_the_state() {
    let mut h = harness();
    let job = h.submit("ana", "basic", cmd(&["x"]));
    assert_eq!(
        h.cancel(job),
        Reply::Cancel {
            job,
            state: JobState::Canceled
        }
    );
    // Over and gone from the core: the shell answers from the store.
    assert_eq!(
        h.cancel(job),
        Reply::CancelRejected {
            job,
            error: CancelError::NotFound
        }
    );
    assert_eq!(h.state(job), JobState::Canceled);
}

#[test]
fn cancel_running_job_is_canceling_until_the_agent_confirms_and_holds_its_slot() {
    let mut h = harness();
    h.connect("a1", 1);
    let job = h.submit("ana", "basic", cmd(&["x"]));
    let other = h.submit("bob", "basic", cmd(&["y"]));
    h.started("a1", job, 1);
    assert_eq!(
        h.cancel(job),
        Reply::Cancel {
            job,
            state: JobState::Canceling
        }
    );
    assert_eq!(
        kills(&h.log),
        vec![(
            "a1".to_string(),
            job,
            1,
            KillReason::Stop(StopReason::Cancel)
        )]
    );
    assert_eq!(
        h.cancel(job),
        Reply::Cancel {
            job,
            state: JobState::Canceling
        },
        "idempotent"
    );
    assert_eq!(
        kills(&h.log).len(),
        1,
        "one kill, however often cancel is asked"
    );
    assert_eq!(
        h.state(other),
        JobState::Queued,
        "the slot is held until the kill is confirmed"
    );
    let effects = h.finished("a1", job, 1, Outcome::Killed);
    assert_eq!(h.state(job), JobState::Canceled);
    assert_eq!(acks(&effects), vec![(job, 1)]);
    assert_eq!(runs(&effects), vec![("a1".to_string(), other, 1)]);
}

#[test]
fn cancel_races_completion_cancel_wins_and_the_exit_code_is_kept() {
    let mut h = harness();
    h.connect("a1", 1);
    let job = h.submit("ana", "basic", cmd(&["x"]));
    h.started("a1", job, 1);
    h.cancel(job);
    h.exited("a1", job, 1, 0);
    let record = h.state_record(job);
    assert_eq!(record.state, JobState::Canceled);
    assert_eq!(record.exit_code, Some(0));
    assert_eq!(record.output_tail, format!("output of {job}\n"));
}

#[test]
fn cancel_on_a_disconnected_agent_holds_the_slot_until_it_returns_and_kills() {
    let mut h = harness();
    h.connect("a1", 1);
    let job = h.submit("ana", "basic", cmd(&["x"]));
    h.started("a1", job, 1);
    h.gone("a1", GoneReason::PingTimeout);
    assert_eq!(
        h.cancel(job),
        Reply::Cancel {
            job,
            state: JobState::Canceling
        }
    );
    assert!(kills(&h.log).is_empty(), "nobody to tell yet");
    assert_eq!(
        h.core.pool_used(Kind::Sequential),
        1,
        "the process may still run: its cpu stays held"
    );
    // The agent returns still running it: it is told to kill it, and the
    // job is canceled once it confirms.
    let effects = h.connect_with(
        "a1",
        1,
        vec![AttemptReport {
            job,
            attempt: 1,
            finished: None,
        }],
    );
    assert_eq!(
        kills(&effects),
        vec![(
            "a1".to_string(),
            job,
            1,
            KillReason::Stop(StopReason::Cancel)
        )]
    );
    h.finished("a1", job, 1, Outcome::Killed);
    assert_eq!(h.state(job), JobState::Canceled);
    assert_eq!(h.core.pool_used(Kind::Sequential), 0);
}

#[test]
fn cancel_on_an_agent_that_never_returns_ends_canceled_after_its_grace() {
    let mut h = harness();
    h.connect("a1", 1);
    let job = h.submit("ana", "basic", cmd(&["x"]));
    h.started("a1", job, 1);
    h.gone("a1", GoneReason::Closed);
    h.cancel(job);
    h.advance(29_999);
    assert_eq!(h.state(job), JobState::Canceling);
    h.advance(1);
    assert_eq!(h.state(job), JobState::Canceled);
    assert!(h.state_record(job).reason.contains("agent a1 lost"));
}

#[test]
fn cancel_another_users_job_is_not_found_but_an_admin_may() {
    let mut h = harness();
    let job = h.submit("ana", "basic", cmd(&["x"]));
    assert_eq!(
        h.cancel_as("bob", false, job),
        Reply::CancelRejected {
            job,
            error: CancelError::NotFound
        }
    );
    assert_eq!(h.state(job), JobState::Queued);
    assert_eq!(
        h.cancel_as("root", true, job),
        Reply::Cancel {
            job,
            state: JobState::Canceled
        }
    );
    assert!(h.state_record(job).reason.contains("admin root"));
}

// ---- timeouts ----------------------------------------------------------------

#[test]
fn timeout_run_time_counts_from_running_not_from_queued() {
    let mut h = harness();
    let job = h.submit(
        "ana",
        "basic",
        SubmitSpec {
            max_run_secs: Some(60),
            ..cmd(&["x"])
        },
    );
    h.advance(600_000); // ten minutes queued: does not count
    h.connect("a1", 1);
    h.advance(1_000);
    h.started("a1", job, 1);
    h.advance(59_999);
    assert_eq!(h.state(job), JobState::Running);
    let effects = h.advance(1);
    assert_eq!(h.state(job), JobState::TimedOut);
    assert_eq!(
        kills(&effects),
        vec![(
            "a1".to_string(),
            job,
            1,
            KillReason::Stop(StopReason::RunTimeout)
        )]
    );
}

#[test]
fn timeout_ends_only_its_own_job_and_holds_the_slot_until_the_kill_is_confirmed() {
    let mut h = harness();
    h.connect("a1", 2);
    let short = h.submit(
        "ana",
        "basic",
        SubmitSpec {
            max_run_secs: Some(10),
            ..cmd(&["x"])
        },
    );
    let long = h.submit("bob", "basic", cmd(&["y"]));
    let waiting = h.submit("cy", "basic", cmd(&["z"]));
    h.started("a1", short, 1);
    h.started("a1", long, 1);
    h.advance(10_000);
    assert_eq!(h.state(short), JobState::TimedOut);
    assert_eq!(
        h.state(long),
        JobState::Running,
        "another user's job is untouched"
    );
    assert_eq!(
        h.state(waiting),
        JobState::Queued,
        "killed process still holds its cpu"
    );
    assert!(h
        .core
        .situation(short)
        .unwrap()
        .contains("stopping attempt 1"));
    let effects = h.finished("a1", short, 1, Outcome::Killed);
    assert_eq!(
        h.state(short),
        JobState::TimedOut,
        "terminal states never change"
    );
    assert_eq!(runs(&effects), vec![("a1".to_string(), waiting, 1)]);
}

#[test]
fn timeout_dispatch_not_acknowledged_requeues_when_attempts_remain_else_lost() {
    let mut h = harness();
    h.connect("mute", 1);
    let retry = h.submit("ana", "basic", retried(2, &["x"]));
    h.advance(5_000);
    assert_eq!(
        kills(&h.log),
        vec![(
            "mute".to_string(),
            retry,
            1,
            KillReason::Stop(StopReason::DispatchTimeout)
        )]
    );
    assert_eq!(h.state(retry), JobState::Dispatched);
    assert!(h.core.situation(retry).unwrap().contains("did not start"));
    // The agent confirms the kill: the job goes back to the queue and straight out again.
    h.finished("mute", retry, 1, Outcome::Killed);
    assert_eq!(h.placed(retry), ("mute".to_string(), 2));
    assert_eq!(
        h.state_record(retry)
            .history
            .iter()
            .filter(|t| t.state == JobState::Queued)
            .count(),
        2
    );
    h.advance(5_000);
    h.finished("mute", retry, 2, Outcome::Killed);
    assert_eq!(h.state(retry), JobState::Lost);
    assert!(h
        .state_record(retry)
        .reason
        .contains("dispatch not acknowledged"));
}

#[test]
fn a_process_that_ran_to_its_end_counts_though_its_start_was_acknowledged_too_late() {
    let mut h = harness();
    h.connect("slow", 1);
    let late = h.submit("ana", "basic", retried(2, &["x"]));
    h.advance(5_000);
    assert_eq!(kills(&h.log).len(), 1, "the dispatch timed out");
    // The process had run to its end before the kill reached it.
    h.exited("slow", late, 1, 0);
    assert_eq!(h.state(late), JobState::Succeeded);
    assert_eq!(h.state_record(late).attempts.len(), 1, "not run again");

    // A process killed that nobody asked to stop did not succeed, and is
    // not run again either: it failed.
    let killed = h.submit("bob", "basic", retried(2, &["y"]));
    h.started("slow", killed, 1);
    h.finished("slow", killed, 1, Outcome::Killed);
    assert_eq!(h.state(killed), JobState::Failed);
    assert_eq!(h.state_record(killed).attempts.len(), 1);
}

#[test]
fn an_attempt_its_agent_killed_at_the_fence_is_run_again_or_lost_never_failed() {
    // The supervisor was away (an outage, a cut link) past the agent's
    // fence: the agent killed what the supervisor might run elsewhere.
    let mut h = harness();
    h.connect("a1", 2);
    let retry = h.submit("ana", "basic", retried(2, &["x"]));
    h.started("a1", retry, 1);
    h.finished("a1", retry, 1, Outcome::Fenced);
    assert_eq!(h.state(retry), JobState::Dispatched, "run again at once");
    assert_eq!(h.placed(retry), ("a1".to_string(), 2));
    let reason = &h
        .state_record(retry)
        .history
        .iter()
        .rev()
        .nth(1)
        .unwrap()
        .reason;
    assert!(
        reason.starts_with("requeued: agent a1 lost contact with the supervisor"),
        "{reason}"
    );
    // Its last attempt fenced too (an agent of another version may fence
    // it): lost, naming the agent and the lost contact.
    h.started("a1", retry, 2);
    h.finished("a1", retry, 2, Outcome::Fenced);
    assert_eq!(h.state(retry), JobState::Lost);
    let reason = h.state_record(retry).reason.clone();
    assert!(reason.contains("agent a1 lost contact"), "{reason}");
    assert!(!reason.contains("on request"), "{reason}");
    // Fenced while being canceled: canceled, as asked.
    let canceled = h.submit("ana", "basic", retried(2, &["y"]));
    h.started("a1", canceled, 1);
    h.cancel(canceled);
    h.finished("a1", canceled, 1, Outcome::Fenced);
    assert_eq!(h.state(canceled), JobState::Canceled);
}

#[test]
fn a_killed_attempt_the_core_does_not_own_keeps_its_cpus_until_it_is_dead() {
    // The agent comes back with attempt 1 of a job the core gave up; the
    // kill takes the process a while, and the next job must not start on
    // the CPUs it still uses.
    let mut h = harness();
    h.connect("a1", 2);
    let old = h.submit("ana", "premium", parallel(2));
    h.started("a1", old, 1);
    h.gone("a1", GoneReason::PingTimeout);
    h.advance(60_000);
    assert_eq!(h.state(old), JobState::Lost);
    let next = h.submit("bob", "premium", parallel(2));
    let effects = h.connect_with(
        "a1",
        2,
        vec![AttemptReport {
            job: old,
            attempt: 1,
            finished: None,
        }],
    );
    assert_eq!(
        kills(&effects),
        vec![("a1".to_string(), old, 1, KillReason::NotOwned)]
    );
    assert!(
        runs(&effects).is_empty(),
        "dispatched onto a dying process's CPUs"
    );
    assert_eq!(h.state(next), JobState::Queued);
    assert_eq!(h.core.agent(&AgentId::new("a1")).unwrap().used_cpus, 2);
    // Reported twice (a started again): still one hold.
    h.started("a1", old, 1);
    assert_eq!(h.core.agent(&AgentId::new("a1")).unwrap().used_cpus, 2);
    // Dead: its CPUs go to the next job in the same step.
    let effects = h.finished("a1", old, 1, Outcome::Killed);
    assert_eq!(acks(&effects), vec![(old, 1)]);
    assert_eq!(runs(&effects), vec![("a1".to_string(), next, 1)]);
    assert_eq!(
        h.state(old),
        JobState::Lost,
        "a stale report changes nothing"
    );
    // A new connection says afresh what runs: a hold of the old one is
    // dropped, and one the hello repeats is held again.
    let effects = h.connect_with(
        "a1",
        2,
        vec![
            AttemptReport {
                job: next,
                attempt: 1,
                finished: None,
            },
            AttemptReport {
                job: JobId(999),
                attempt: 1,
                finished: None,
            },
        ],
    );
    assert_eq!(
        kills(&effects),
        vec![("a1".to_string(), JobId(999), 1, KillReason::NotOwned)]
    );
    // An unknown job's size is unknown: the whole agent waits.
    assert_eq!(h.core.agent(&AgentId::new("a1")).unwrap().used_cpus, 4);
    h.gone("a1", GoneReason::Closed);
    assert_eq!(h.core.agent(&AgentId::new("a1")).unwrap().used_cpus, 2);
}

#[test]
fn a_requeued_job_waits_its_queue_timeout_again_from_the_requeue() {
    let mut h = harness();
    h.connect("mute", 1);
    let job = h.submit(
        "ana",
        "basic",
        SubmitSpec {
            max_attempts: 2,
            queue_timeout_secs: Some(30),
            ..cmd(&["x"])
        },
    );
    h.advance(5_000); // its dispatch is not acknowledged
    let other = h.submit("bob", "basic", cmd(&["y"]));
    h.finished("mute", job, 1, Outcome::Killed);
    assert_eq!(h.state(job), JobState::Queued, "back in line, behind bob");
    assert_eq!(h.placed(other).0, "mute");
    // 30 s after the submission, but only 25 s after the requeue.
    h.advance(25_000);
    assert_eq!(h.state(job), JobState::Queued);
    h.advance(5_000);
    assert_eq!(h.state(job), JobState::TimedOut);
}

#[test]
fn timeout_in_the_queue_ends_timed_out() {
    let mut h = harness();
    let job = h.submit(
        "ana",
        "basic",
        SubmitSpec {
            queue_timeout_secs: Some(30),
            ..cmd(&["x"])
        },
    );
    let patient = h.submit("bob", "basic", cmd(&["y"]));
    assert_eq!(h.core.next_deadline(), Some(Millis(h.now + 30_000)));
    h.fire_next_deadline();
    assert_eq!(h.state(job), JobState::TimedOut);
    assert!(h.state_record(job).reason.contains("queue"));
    assert_eq!(h.state(patient), JobState::Queued);
    assert_eq!(h.core.next_deadline(), None);
}

#[test]
fn timeout_stop_not_confirmed_closes_the_agent_as_unresponsive() {
    let mut h = harness();
    h.connect("a1", 1);
    let job = h.submit("ana", "basic", cmd(&["x"]));
    h.started("a1", job, 1);
    h.cancel(job);
    let effects = h.advance(10_000);
    assert!(effects.iter().any(|e| matches!(
        e,
        Effect::Close {
            reason: CloseReason::Unresponsive,
            ..
        }
    )));
    // Closed, it gets the grace period every lost agent gets, slot held.
    assert_eq!(h.state(job), JobState::Canceling);
    assert_eq!(h.core.pool_used(Kind::Sequential), 1);
    h.advance(30_000);
    assert_eq!(h.state(job), JobState::Canceled);
    assert_eq!(h.core.pool_used(Kind::Sequential), 0);
}

#[test]
fn stale_report_for_an_older_attempt_is_rejected_and_killed() {
    let mut h = harness();
    h.connect("a1", 1);
    h.connect("a2", 1);
    let job = h.submit("ana", "basic", retried(2, &["x"]));
    let (first, _) = h.placed(job);
    h.started(&first, job, 1);
    // a1 goes silent and is declared lost; the job is requeued to the other agent.
    h.gone(&first, GoneReason::PingTimeout);
    h.advance(30_000);
    let (second, attempt) = h.placed(job);
    assert_eq!(attempt, 2);
    assert_ne!(second, first);
    // The silent agent comes back and reports attempt 1 still running.
    let effects = h.connect_with(
        &first,
        1,
        vec![AttemptReport {
            job,
            attempt: 1,
            finished: None,
        }],
    );
    assert_eq!(
        kills(&effects),
        vec![(first.clone(), job, 1, KillReason::NotOwned)]
    );
    // ... and then finished: acknowledged (so its outbox drains) but ignored.
    let effects = h.exited(&first, job, 1, 0);
    assert_eq!(acks(&effects), vec![(job, 1)]);
    assert_eq!(events(&effects, EventKind::StaleReport).len(), 1);
    assert_eq!(h.state(job), JobState::Dispatched);
    // A report from the right attempt on the wrong agent is stale too.
    let effects = h.started(&first, job, 2);
    assert_eq!(kills(&effects), vec![(first, job, 2, KillReason::NotOwned)]);
    h.started(&second, job, 2);
    assert_eq!(h.state(job), JobState::Running);
}

// ---- agents -------------------------------------------------------------------

#[test]
fn agent_lost_after_grace_its_jobs_end_lost_with_the_reason() {
    let mut h = harness();
    h.connect("a1", 2);
    let job = h.submit("ana", "basic", cmd(&["x"]));
    let retried = h.submit("bob", "basic", retried(3, &["y"]));
    h.started("a1", job, 1);
    h.gone("a1", GoneReason::PingTimeout);
    assert!(h
        .core
        .situation(job)
        .unwrap()
        .contains("waiting for agent a1 to reconnect"));
    h.advance(29_999);
    assert_eq!(
        h.state(job),
        JobState::Running,
        "still within the grace period"
    );
    h.advance(1);
    let record = h.state_record(job);
    assert_eq!(record.state, JobState::Lost);
    assert_eq!(&*record.reason, "agent a1 lost: ping timeout");
    assert_eq!(
        h.state(retried),
        JobState::Queued,
        "a job that allows retries is requeued"
    );
    assert!(h.core.agent(&AgentId::new("a1")).is_none());
    h.connect("a2", 1);
    assert_eq!(h.placed(retried), ("a2".to_string(), 2));
}

#[test]
fn agent_back_within_grace_reporting_the_job_keeps_it() {
    let mut h = harness();
    h.connect("a1", 1);
    let job = h.submit("ana", "basic", cmd(&["x"]));
    h.started("a1", job, 1);
    h.gone("a1", GoneReason::Closed);
    h.advance(10_000);
    h.connect_with(
        "a1",
        1,
        vec![AttemptReport {
            job,
            attempt: 1,
            finished: None,
        }],
    );
    h.advance(60_000);
    assert_eq!(h.state(job), JobState::Running);
    assert_eq!(h.core.situation(job).unwrap(), "running on agent a1");
}

#[test]
fn agent_back_without_the_job_ends_it_lost() {
    let mut h = harness();
    h.connect("a1", 1);
    let job = h.submit("ana", "basic", cmd(&["x"]));
    h.started("a1", job, 1);
    h.gone("a1", GoneReason::Closed);
    h.connect("a1", 1);
    assert_eq!(h.state(job), JobState::Lost);
    assert!(h
        .state_record(job)
        .reason
        .contains("came back without attempt 1"));
}

#[test]
fn agent_a_run_lost_in_a_supervisor_crash_is_sent_again_not_given_up() {
    // Incident pattern: the supervisor committed a dispatch and died before
    // the run reached the agent; after the restart the agent, truthfully,
    // does not have it. It never ran: it must run, not end lost.
    let mut h = harness();
    h.connect("a1", 1);
    let job = h.submit("ana", "basic", cmd(&["x"]));
    let mut r = h.crash_and_restore(basic_config(), 1_000);
    let effects = r.connect("a1", 1);
    assert_eq!(
        runs(&effects),
        vec![("a1".to_string(), job, 1)],
        "the same attempt, sent again"
    );
    assert_eq!(r.state(job), JobState::Dispatched);
    r.started("a1", job, 1);
    r.exited("a1", job, 1, 0);
    assert_eq!(r.state(job), JobState::Succeeded);
    assert_eq!(r.state_record(job).attempts.len(), 1);
}

#[test]
fn agent_back_with_a_finished_result_in_its_hello_completes_the_job() {
    let mut h = harness();
    h.connect("a1", 1);
    let job = h.submit("ana", "basic", cmd(&["x"]));
    h.started("a1", job, 1);
    h.gone("a1", GoneReason::Closed);
    let finished = FinishedReport {
        outcome: Outcome::Exited { code: 3 },
        output_tail: "boom".into(),
        run_ms: 5,
    };
    let effects = h.connect_with(
        "a1",
        1,
        vec![AttemptReport {
            job,
            attempt: 1,
            finished: Some(finished),
        }],
    );
    assert_eq!(h.state(job), JobState::Failed);
    assert_eq!(h.state_record(job).exit_code, Some(3));
    assert_eq!(acks(&effects), vec![(job, 1)]);
}

#[test]
fn agent_duplicate_id_replaces_the_first_connection() {
    let mut h = harness();
    h.connect("a1", 1);
    let old = h.conns["a1"];
    let job = h.submit("ana", "basic", cmd(&["x"]));
    let effects = h.connect_with(
        "a1",
        1,
        vec![AttemptReport {
            job,
            attempt: 1,
            finished: None,
        }],
    );
    assert!(effects.contains(&Effect::Close {
        agent: AgentId::new("a1"),
        conn: old,
        reason: CloseReason::Replaced
    }));
    assert_eq!(
        h.state(job),
        JobState::Running,
        "the new connection's report counts"
    );
    // The old connection's late news harms nothing.
    h.step(Input::AgentGone {
        conn: old,
        agent: AgentId::new("a1"),
        reason: GoneReason::Closed,
    });
    h.step(Input::AgentMessage {
        conn: old,
        agent: AgentId::new("a1"),
        msg: AgentMsg::Finished {
            job,
            attempt: 1,
            outcome: Outcome::Exited { code: 1 },
            output_tail: String::new(),
            run_ms: 1,
        },
    });
    assert_eq!(h.state(job), JobState::Running);
    assert!(matches!(
        h.core.agent(&AgentId::new("a1")).unwrap().link,
        Link::Connected { .. }
    ));
}

#[test]
fn agent_hello_out_of_bounds_is_refused_and_harms_nothing() {
    let mut h = harness();
    for (name, cpus) in [
        ("a1", 0),
        ("a1", 257),
        ("", 1),
        ("a1\nINFO admin logged in", 1),
        ("a1\u{1b}[2J", 1),
        ("a1/../../etc", 1),
        ("agent one", 1),
        ("agent-é", 1),
    ] {
        let effects = h.connect(name, cpus);
        assert!(effects.iter().any(|e| matches!(
            e,
            Effect::Close {
                reason: CloseReason::Refused,
                ..
            }
        )));
        assert_eq!(events(&effects, EventKind::AgentRefused).len(), 1);
    }
    let id_max = h.core.config().agent_id_bytes_max;
    let long = "x".repeat(id_max + 1);
    assert!(h
        .connect(&long, 1)
        .iter()
        .any(|e| matches!(e, Effect::Close { .. })));
    let longest = "x".repeat(id_max);
    assert!(events(&h.connect(&longest, 1), EventKind::AgentRefused).is_empty());
    h.gone(&longest, GoneReason::PingTimeout);
    h.advance(h.core.config().agent_grace_ms + 1);
    assert_eq!(h.core.agents().count(), 0);
    // The bound itself is allowed, and every allowed character.
    let effects = h.connect("a2", 256);
    assert!(events(
        &h.connect("Node_7.rack-2:slot@site", 1),
        EventKind::AgentRefused
    )
    .is_empty());
    h.gone("Node_7.rack-2:slot@site", GoneReason::Closed);
    h.advance(h.core.config().agent_grace_ms + 1);
    assert!(events(&effects, EventKind::AgentRefused).is_empty());
    assert_eq!(h.core.agents().count(), 1);
    // Labels: as many as a job may carry, each as large as a job's may be,
    // no more.
    let limits = h.core.config().submit.clone();
    let many = |count: usize| {
        (0..count)
            .map(|i| (format!("k{i}"), "v".to_string()))
            .collect::<BTreeMap<_, _>>()
    };
    let large = |bytes: usize| BTreeMap::from([("k".to_string(), "v".repeat(bytes - 1))]);
    let cases = [
        ("as many as allowed", many(limits.labels_max), false),
        ("one too many", many(limits.labels_max + 1), true),
        (
            "one as large as allowed",
            large(limits.label_bytes_max),
            false,
        ),
        (
            "one a byte too large",
            large(limits.label_bytes_max + 1),
            true,
        ),
    ];
    for (i, (what, labels, refused)) in cases.into_iter().enumerate() {
        let effects = h.step(Input::AgentConnected {
            conn: ConnId(900 + i as u64),
            agent: AgentId::new(&format!("labelled-{i}")),
            cpus: 1,
            labels,
            attempts: Vec::new(),
        });
        assert_eq!(
            events(&effects, EventKind::AgentRefused).len(),
            usize::from(refused),
            "labels: {what}"
        );
    }
}

#[test]
fn core_clock_reads_the_time_of_the_latest_input() {
    let mut h = harness();
    h.advance(1_234);
    assert_eq!(h.core.now(), Millis(h.now));
    h.connect("a1", 1);
    assert_eq!(h.core.now(), Millis(h.now));
}

#[test]
fn agent_report_about_a_job_that_left_the_core_is_acknowledged() {
    let mut h = harness();
    h.connect("a1", 1);
    let job = h.submit("ana", "basic", cmd(&["x"]));
    h.started("a1", job, 1);
    h.exited("a1", job, 1, 0);
    // The ack was lost; the agent's outbox sends the result again.
    let effects = h.exited("a1", job, 1, 0);
    assert_eq!(acks(&effects), vec![(job, 1)]);
    assert_eq!(h.state(job), JobState::Succeeded);
}

// ---- effects, events, restore ------------------------------------------------

#[test]
fn every_transition_is_persisted_before_the_reply_and_carries_an_event() {
    let mut h = harness();
    h.connect("a1", 1);
    let request = RequestId(999);
    let effects = h.step(Input::Submit {
        request,
        user: "ana".into(),
        plan: "basic".into(),
        spec: cmd(&["x"]),
    });
    // One persist for the job (queued then dispatched in one step: one record).
    let persists: Vec<&Job> = effects
        .iter()
        .filter_map(|e| match e {
            Effect::Persist { job } => Some(&**job),
            _ => None,
        })
        .collect();
    assert_eq!(persists.len(), 1);
    assert_eq!(persists[0].state, JobState::Dispatched);
    assert!(matches!(effects[0], Effect::Persist { .. }));
    let job = persists[0].id;
    let kinds: Vec<EventKind> = effects
        .iter()
        .filter_map(|e| match e {
            Effect::Event(ev) if ev.job == Some(job) => Some(ev.kind),
            _ => None,
        })
        .collect();
    assert_eq!(kinds, vec![EventKind::Submitted, EventKind::Dispatched]);
    h.started("a1", job, 1);
    h.exited("a1", job, 1, 0);
    let states: Vec<JobState> = h
        .state_record(job)
        .history
        .iter()
        .map(|t| t.state)
        .collect();
    assert_eq!(
        states,
        vec![
            JobState::Queued,
            JobState::Dispatched,
            JobState::Running,
            JobState::Succeeded
        ]
    );
    assert!(
        h.core.job(job).is_none(),
        "a finished job leaves the core once persisted"
    );
    let ended = events(&h.log, EventKind::Ended);
    assert_eq!(ended.len(), 1);
    assert_eq!(
        (ended[0].job, ended[0].attempt, ended[0].agent.clone()),
        (Some(job), Some(1), Some(AgentId::new("a1")))
    );
}

#[test]
fn restore_after_a_crash_keeps_every_acknowledged_job() {
    let mut h = harness();
    h.connect("a1", 1);
    h.connect("a2", 1);
    let running = h.submit("ana", "basic", cmd(&["r"]));
    let dispatched = h.submit("bob", "basic", cmd(&["d"]));
    let q1 = h.submit("cy", "basic", cmd(&["q1"]));
    let q2 = h.submit("dee", "basic", cmd(&["q2"]));
    let done = h.submit(
        "eve",
        "basic",
        SubmitSpec {
            idempotency_key: Some("k".into()),
            ..cmd(&["x"])
        },
    );
    let (agent_r, _) = h.placed(running);
    h.started(&agent_r, running, 1);
    h.cancel(done);

    // Crash: only the store survives.
    let next = h.core.next_job_id();
    let mut r = h.crash_and_restore(basic_config(), 5_000);
    r.core.check_invariants();
    assert_eq!(r.core.queue_position(q1), Some(1));
    assert_eq!(r.core.queue_position(q2), Some(2));
    assert_eq!(r.core.job(running).unwrap().state, JobState::Running);
    assert!(r
        .core
        .situation(running)
        .unwrap()
        .contains("waiting for agent"));
    // The idempotency key survives, and ids are never reused.
    assert_eq!(
        r.try_submit(
            "eve",
            "basic",
            SubmitSpec {
                idempotency_key: Some("k".into()),
                ..cmd(&["x"])
            }
        ),
        Reply::Submitted {
            job: done,
            existing: true,
            at: None,
        },
        "a job no longer in the core is answered by id alone"
    );
    let fresh = r.submit("fay", "basic", cmd(&["f"]));
    assert!(fresh.0 >= next);
    // The agent running a job reconnects and keeps it; the other never comes back.
    r.connect_with(
        &agent_r,
        1,
        vec![AttemptReport {
            job: running,
            attempt: 1,
            finished: None,
        }],
    );
    r.advance(30_000);
    assert_eq!(r.state(running), JobState::Running);
    assert_eq!(r.state(dispatched), JobState::Lost);
    r.started(&agent_r, running, 1);
    r.exited(&agent_r, running, 1, 0);
    assert_eq!(r.state(running), JobState::Succeeded);
    assert_eq!(r.placed(q1).0, agent_r, "the queue resumes where it was");
}

#[test]
fn restore_gives_an_agent_still_away_the_cpus_its_attempts_hold() {
    let mut h = harness();
    h.connect("a1", 3);
    let jobs: Vec<JobId> = ["ana", "bob", "cy"]
        .into_iter()
        .map(|user| h.submit(user, "basic", cmd(&["x"])))
        .collect();
    for &job in &jobs {
        assert_eq!(h.placed(job).0, "a1");
    }
    // Only the jobs' records survive: the agent is known from its attempts.
    let r = h.crash_and_restore(basic_config(), 1_000);
    r.core.check_invariants();
    let a1 = r
        .core
        .agents()
        .find(|a| a.id.as_str() == "a1")
        .expect("the agent holding them is remembered");
    assert!(a1.conn().is_none(), "it has not said hello yet");
    assert_eq!(
        (a1.cpus, a1.used_cpus, a1.jobs.len()),
        (3, 3, 3),
        "as many CPUs as its three attempts use"
    );
}

#[test]
fn restore_an_old_dispatch_waits_for_its_agent_instead_of_timing_out_at_once() {
    let mut h = harness();
    h.connect("a1", 1);
    let job = h.submit("ana", "basic", retried(2, &["x"]));
    // The supervisor was down far longer than the dispatch timeout.
    let mut r = h.crash_and_restore(basic_config(), 3_600_000);
    r.connect_with(
        "a1",
        1,
        vec![AttemptReport {
            job,
            attempt: 1,
            finished: None,
        }],
    );
    assert_eq!(
        r.state(job),
        JobState::Running,
        "the agent's hello keeps it"
    );
    assert!(runs(&r.log).is_empty());
}

#[test]
fn restore_refuses_jobs_the_configuration_can_no_longer_serve() {
    let mut h = harness();
    h.connect("a1", 8);
    let running = h.submit("ana", "premium", parallel(4));
    let records: Vec<Job> = h.store.values().cloned().collect();
    let next = h.core.next_job_id();
    let now = Millis(h.now);
    let mut no_premium = basic_config();
    no_premium.plans.remove("premium");
    let err = Core::restore(no_premium, now, records.clone(), next)
        .err()
        .unwrap();
    assert!(
        err.to_string()
            .contains("plan the configuration no longer has"),
        "{err}"
    );
    let small_pool = CoreConfig {
        pool_parallel_cpus: 2,
        ..basic_config()
    };
    let err = Core::restore(small_pool, now, records.clone(), next)
        .err()
        .unwrap();
    assert!(
        err.to_string()
            .contains("more cpus than an agent or its pool"),
        "{err}"
    );
    let mut tight = basic_config();
    tight.plans.get_mut("premium").unwrap().parallel.max_running = 0;
    assert!(Core::restore(tight, now, records.clone(), next).is_err());
    let mut zero = records[0].clone();
    Arc::make_mut(&mut zero.spec).max_attempts = 0;
    assert!(Core::restore(basic_config(), now, vec![zero], next).is_err());
    assert!(Core::restore(basic_config(), now, records, next).is_ok());
    let _ = running;
    // A job still waiting in the queue is held to the same rules.
    let mut h = harness();
    let queued = h.submit("ana", "premium", cmd(&["x"]));
    assert_eq!(h.state(queued), JobState::Queued);
    let records: Vec<Job> = h.store.values().cloned().collect();
    let mut no_premium = basic_config();
    no_premium.plans.remove("premium");
    assert!(
        Core::restore(no_premium, Millis(h.now), records, h.core.next_job_id()).is_err(),
        "a queued job naming a missing plan was restored"
    );
}

#[test]
fn restore_refuses_running_work_over_a_shrunk_pool_naming_a_job_that_holds_it() {
    let mut h = harness();
    h.connect("a1", 8);
    let first = h.submit("ana", "premium", parallel(3));
    let second = h.submit("bob", "premium", parallel(3));
    let waiting = h.submit("cy", "premium", parallel(3));
    assert_eq!(h.state(waiting), JobState::Queued, "2 cpus are left");
    assert_ne!(h.state(first), JobState::Queued);
    assert_ne!(h.state(second), JobState::Queued);
    let records: Vec<Job> = h.store.values().cloned().collect();
    // Each job fits the new pool; together the two placed ones do not.
    let small_pool = CoreConfig {
        pool_parallel_cpus: 4,
        ..basic_config()
    };
    let err = Core::restore(small_pool, Millis(h.now), records, h.core.next_job_id())
        .err()
        .expect("6 cpus held in a pool of 4");
    assert_eq!(
        err.job, second,
        "the latest job holding cpus, not the queued one"
    );
    assert!(
        err.to_string().contains("over the configured pool of 4"),
        "{err}"
    );
}

#[test]
fn restore_rejects_a_record_it_cannot_trust_naming_the_job() {
    let mut h = harness();
    h.connect("a1", 1);
    let job = h.submit("ana", "basic", cmd(&["x"]));
    let mut record = h.state_record(job).clone();
    record.state = JobState::Queued; // but it holds an attempt
    let err = Core::restore(basic_config(), Millis(h.now), vec![record.clone()], 100)
        .err()
        .expect("rejected");
    assert_eq!(err.job, job);
    assert!(
        err.to_string().contains("does not match its attempts"),
        "{err}"
    );
    record.state = JobState::Dispatched;
    assert!(
        Core::restore(basic_config(), Millis(h.now), vec![record.clone()], 1).is_err(),
        "id past next id"
    );
    // Queued, but still stopping an attempt (it was being canceled).
    let canceling = h.submit("bob", "basic", cmd(&["y"]));
    h.connect("a2", 1);
    assert_eq!(h.placed(canceling).0, "a2");
    h.cancel(canceling);
    let mut stopping = h.state_record(canceling).clone();
    assert_eq!(stopping.state, JobState::Canceling);
    stopping.state = JobState::Queued;
    let err = Core::restore(basic_config(), Millis(h.now), vec![stopping], 100)
        .err()
        .expect("a queued job holds nothing");
    assert!(
        err.to_string().contains("does not match its attempts"),
        "{err}"
    );
    assert!(
        Core::restore(
            basic_config(),
            Millis(h.now),
            vec![record.clone(), record],
            100
        )
        .is_err(),
        "duplicate"
    );
    // Attempt counts outside max_attempts, on a job that has none yet and
    // on one that has more than it allows.
    let waiting = h.submit("cy", "basic", cmd(&["w"]));
    assert_eq!(h.state(waiting), JobState::Queued);
    let mut zero = h.state_record(waiting).clone();
    Arc::make_mut(&mut zero.spec).max_attempts = 0;
    let mut over = h.state_record(job).clone();
    over.attempts.insert(0, over.attempts[0].clone());
    over.attempts[0].number = 1;
    over.attempts[1].number = 2;
    Arc::make_mut(&mut over.spec).max_attempts = 1;
    // Canceling, but holding nothing to stop.
    let mut idle = h.state_record(waiting).clone();
    idle.state = JobState::Canceling;
    for (record, problem) in [
        (zero, "outside its max_attempts"),
        (over, "outside its max_attempts"),
        (idle, "does not match its attempts"),
    ] {
        let err = Core::restore(basic_config(), Millis(h.now), vec![record], 100)
            .err()
            .expect(problem);
        assert!(err.to_string().contains(problem), "{err}");
    }
}

#[test]
fn identical_inputs_give_identical_effects() {
    fn run() -> String {
        let mut h = harness();
        h.connect("a1", 2);
        h.connect("a2", 3);
        let jobs: Vec<JobId> = (0..6)
            .map(|i| h.submit(&format!("u{}", i % 3), "basic", parallel(1 + i % 2)))
            .collect();
        h.cancel(jobs[1]);
        h.gone("a2", GoneReason::PingTimeout);
        h.advance(40_000);
        serde_json::to_string(&h.log).expect("effects serialize")
    }
    assert_eq!(run(), run());
}

#[test]
fn the_invariant_check_catches_a_core_out_of_step() {
    // Each corruption, made through the hooks restore uses, must be named.
    type Corruption = (&'static str, fn(&mut Core));
    let corruptions: [Corruption; 4] = [
        ("agent ghost used cpus", |core| {
            core.insert_agent(Agent {
                id: AgentId::new("ghost"),
                link: Link::Connected {
                    conn: ConnId(77),
                    since: Millis(0),
                },
                cpus: 2,
                labels: BTreeMap::new(),
                used_cpus: 1,
                jobs: Default::default(),
                dying: BTreeMap::new(),
            })
        }),
        ("agent away is away and holds dying processes", |core| {
            core.insert_agent(Agent {
                id: AgentId::new("away"),
                link: Link::Disconnected {
                    since: Millis(0),
                    reason: GoneReason::Closed,
                },
                cpus: 2,
                labels: BTreeMap::new(),
                used_cpus: 1,
                jobs: Default::default(),
                dying: BTreeMap::from([((JobId(99), 1), 1)]),
            });
            core.arm(
                timers::TimerKey::Agent(AgentId::new("away")),
                Some(Millis(0).plus_ms(core.config().agent_grace_ms)),
            )
        }),
        ("connected agent a1 has a grace timer", |core| {
            core.arm(timers::TimerKey::Agent(AgentId::new("a1")), Some(Millis(1)))
        }),
        ("job 1 timer", |core| {
            core.arm(timers::TimerKey::Job(JobId(1)), Some(Millis(u64::MAX - 1)))
        }),
    ];
    for (what, corrupt) in corruptions {
        let mut h = harness();
        h.connect("a1", 1);
        h.submit("ana", "basic", cmd(&["x"]));
        h.core.check_invariants();
        corrupt(&mut h.core);
        let message = panic_message(what, || h.core.check_invariants());
        assert!(message.contains(what), "{what}: {message}");
    }
}

#[test]
fn agents_past_the_bound_are_refused_but_a_known_agent_comes_back() {
    let mut h = Harness::new(CoreConfig {
        agents_max: 2,
        ..basic_config()
    });
    h.connect("a1", 1);
    h.connect("a2", 1);
    let effects = h.connect("a3", 1);
    let refused = events(&effects, EventKind::AgentRefused);
    assert_eq!(refused.len(), 1, "a third agent is one too many");
    assert_eq!(h.core.agents().count(), 2);
    h.gone("a1", GoneReason::PingTimeout);
    let effects = h.connect("a1", 1);
    assert!(
        events(&effects, EventKind::AgentRefused).is_empty(),
        "an agent the core knows is no new agent"
    );
}

#[test]
fn job_states_parse_from_their_names_and_nothing_else() {
    for state in JobState::ALL {
        assert_eq!(JobState::parse(state.as_str()), Some(state));
        assert_eq!(JobState::parse(&state.as_str().to_uppercase()), None);
    }
    for name in ["", "done", "queued ", "timed-out"] {
        assert_eq!(JobState::parse(name), None, "{name:?}");
    }
}

#[test]
fn a_submit_is_answered_with_the_job_as_its_step_left_it() {
    let mut h = Harness::new(basic_config());
    h.connect("a1", 1);
    // Dispatched in the same step as its submit: the answer says so.
    let reply = h.try_submit("ana", "basic", cmd(&["first"]));
    let Reply::Submitted {
        job: first,
        existing: false,
        at: Some(at),
    } = reply
    else {
        panic!("{reply:?}");
    };
    assert_eq!(at.record.id, first);
    assert_eq!(at.record.state, JobState::Dispatched);
    assert_eq!(at.queue_position, None);
    assert_eq!(at.situation, h.core.situation(first));
    // The only CPU is taken: the next waits, and its answer says where.
    let reply = h.try_submit("ana", "basic", cmd(&["second"]));
    let Reply::Submitted {
        job: second,
        at: Some(at),
        ..
    } = reply
    else {
        panic!("{reply:?}");
    };
    assert_eq!(at.record.state, JobState::Queued);
    assert_eq!(at.queue_position, Some(1));
    let situation = at.situation.expect("a queued job has a situation");
    assert_eq!(Some(situation), h.core.situation(second));
}
