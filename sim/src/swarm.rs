//! Swarm testing: a seed picks a scenario's shape — how many users, jobs and
//! CPUs, how the jobs behave, which fault kinds are on and how often — so
//! that a campaign covers many different worlds rather than one world many
//! times. The same seed always gives the same scenario (and the simulation
//! then runs on that seed too).

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use crate::runner::KILL_GRACE_MS;
use crate::scenario::{
    Action, Expect, Fault, JobPlan, Scenario, Situation, Target, Topology, UserSpec,
};

/// Simulated time over which the workload and the faults are spread.
pub const PLAN_MS: u64 = 60_000;
pub const AGENTS: usize = 4;

/// The fault kinds a seed can turn on, each with the action that undoes it.
const KINDS: [(&str, Action, Option<Action>); 6] = [
    ("kill", Action::KillAgent, Some(Action::RestartAgent)),
    ("pause", Action::PauseAgent, Some(Action::ResumeAgent)),
    ("partition", Action::Partition, Some(Action::Heal)),
    ("drop-pings", Action::DropPings, Some(Action::RestorePings)),
    (
        "supervisor-crash",
        Action::CrashSupervisor,
        Some(Action::RestartSupervisor),
    ),
    ("latency", Action::Latency, None),
];

/// Whether `undo` is what ends an agent fault `fault`.
fn undoes(fault: Action, undo: Action) -> bool {
    matches!(
        (fault, undo),
        (Action::KillAgent, Action::RestartAgent)
            | (Action::PauseAgent, Action::ResumeAgent)
            | (Action::Partition, Action::Heal)
            | (Action::DropPings, Action::RestorePings)
    )
}

/// The scenario seed `seed` stands for, and a one-line summary of its knobs.
pub fn scenario(seed: u64) -> (Scenario, String) {
    let mut rng = StdRng::seed_from_u64(seed);
    let cpus = rng.random_range(1..=4u32);
    let users: Vec<UserSpec> = (0..rng.random_range(1..=3))
        .map(|i| UserSpec {
            name: format!("u{i}"),
            plan: if rng.random_bool(0.5) {
                "basic"
            } else {
                "premium"
            }
            .to_string(),
        })
        .collect();
    let job_count = rng.random_range(1..=24usize);
    let hang_rate = if rng.random_bool(0.3) { 0.15 } else { 0.0 };
    let fail_rate = if rng.random_bool(0.5) { 0.2 } else { 0.0 };
    let retry_rate = rng.random_range(0.0..1.0);
    let long_rate = if rng.random_bool(0.3) { 0.3 } else { 0.05 };
    let mut jobs: Vec<JobPlan> = (0..job_count)
        .map(|i| {
            let hang = rng.random_bool(hang_rate);
            let failing = rng.random_bool(fail_rate);
            JobPlan {
                name: format!("j{i}"),
                user: users[rng.random_range(0..users.len())].name.clone(),
                at_ms: rng.random_range(0..PLAN_MS * 2 / 3),
                kind: if rng.random_bool(0.7) {
                    "sequential"
                } else {
                    "parallel"
                }
                .into(),
                cpus: rng.random_range(1..=cpus),
                duration_ms: if rng.random_bool(long_rate) {
                    rng.random_range(10_000..40_000)
                } else {
                    rng.random_range(10..5_000)
                },
                exit_code: if failing { rng.random_range(1..=3) } else { 0 },
                output: String::new(),
                hang,
                crash: failing && rng.random_bool(0.3),
                // A hanging job needs a run limit to end.
                max_run_secs: hang.then(|| rng.random_range(1..=20)),
                max_attempts: if rng.random_bool(retry_rate) {
                    rng.random_range(2..=3)
                } else {
                    1
                },
                output_parts: 1,
                term_output: String::new(),
                stop_ms: 0,
                // Not drawn, so that every seed keeps the world it had.
                start_ms: 0,
                client_timeout_ms: 0,
                no_retry: false,
            }
        })
        .collect();
    let mut faults = Vec::new();
    let mut on = Vec::new();
    for (label, action, undo) in KINDS {
        if !rng.random_bool(0.4) {
            continue;
        }
        let count = rng.random_range(1..=3);
        on.push(format!("{label}x{count}"));
        for _ in 0..count {
            let at_ms = rng.random_range(0..PLAN_MS - 20_000);
            let agent = (undo.is_some() && action != Action::CrashSupervisor).then(|| {
                if rng.random_bool(0.15) {
                    Target::All("all".into())
                } else {
                    Target::One(rng.random_range(0..AGENTS))
                }
            });
            faults.push(Fault {
                at_ms,
                action,
                agent: agent.clone(),
                job: None,
                when: None,
                latency_ms: (action == Action::Latency).then(|| {
                    let hi = rng.random_range(5..1_500);
                    [rng.random_range(1..=hi), hi]
                }),
            });
            match undo {
                Some(undo) => faults.push(Fault {
                    at_ms: at_ms + rng.random_range(100..15_000),
                    action: undo,
                    agent,
                    job: None,
                    when: None,
                    latency_ms: None,
                }),
                None => faults.push(Fault {
                    at_ms: at_ms + rng.random_range(100..15_000),
                    action: Action::Latency,
                    agent: None,
                    job: None,
                    when: None,
                    latency_ms: Some([1, 5]),
                }),
            }
        }
    }
    if rng.random_bool(0.5) {
        let count = rng.random_range(1..=job_count.min(6));
        on.push(format!("cancelx{count}"));
        for _ in 0..count {
            let job = &jobs[rng.random_range(0..jobs.len())];
            let when = match rng.random_range(0..5) {
                0 => Some(Situation::WaitingForSlot),
                1 => Some(Situation::Dispatched),
                2 => Some(Situation::Running),
                3 => Some(Situation::AgentReconnecting),
                _ => None,
            };
            faults.push(Fault {
                at_ms: job.at_ms + rng.random_range(0..3_000),
                action: Action::Cancel,
                agent: None,
                job: Some(job.name.clone()),
                when,
                latency_ms: None,
            });
        }
    }
    // Two cancels of one job are one cancel.
    let mut seen = std::collections::BTreeSet::new();
    faults.retain(|f| f.action != Action::Cancel || seen.insert(f.job.clone()));
    let topology = Topology {
        agents: AGENTS,
        cpus,
        agent_cpus: Vec::new(),
        ping_interval_ms: 500,
        ping_timeout_ms: 2_000,
        latency_ms: [1, 5],
        loss: 0.0,
        reconnect_max_ms: 2_000,
        commit_ms: 0,
        output_tail_bytes: 4096,
        journal_segment_bytes: 0,
        core: toml::Table::from_iter([(
            "agent_grace_ms".to_string(),
            toml::Value::Integer(rng.random_range(2_000..10_000)),
        )]),
    };
    // Drawn last, so that every other knob of a seed is what it was before
    // loss was a knob.
    let topology = Topology {
        loss: if rng.random_bool(0.3) {
            [0.001, 0.01, 0.05, 0.2][rng.random_range(0..4)]
        } else {
            0.0
        },
        ..topology
    };
    // Drawn after loss, for the same reason. The timings Foreman ships
    // (ping 5 s, timeout 15 s, grace 60 s, reconnect within 10 s), with
    // faults that last long enough to matter under them.
    let shipped = rng.random_bool(0.3);
    let mut topology = if shipped {
        // Jobs that run for minutes, as jobs under such timings do.
        for job in &mut jobs {
            job.duration_ms *= 20;
        }
        // Each undo follows its fault in the plan.
        for i in 1..faults.len() {
            if undoes(faults[i - 1].action, faults[i].action) {
                faults[i].at_ms = faults[i - 1].at_ms + rng.random_range(100..90_000);
            }
        }
        Topology {
            ping_interval_ms: 5_000,
            ping_timeout_ms: 15_000,
            reconnect_max_ms: 10_000,
            core: toml::Table::from_iter([(
                "agent_grace_ms".to_string(),
                toml::Value::Integer(60_000),
            )]),
            ..topology
        }
    } else {
        topology
    };
    // Supervisor outages as production has them: a slow restart or an
    // upgrade takes from seconds to minutes.
    let outages = rng.random_bool(0.4);
    if outages {
        for (at, restart) in faults
            .windows(2)
            .filter(|w| {
                w[0].action == Action::CrashSupervisor && w[1].action == Action::RestartSupervisor
            })
            .map(|w| (w[0].at_ms, w[1].at_ms))
            .collect::<Vec<_>>()
        {
            let long = at + rng.random_range(5_000..300_000);
            if let Some(f) = faults
                .iter_mut()
                .find(|f| f.action == Action::RestartSupervisor && f.at_ms == restart)
            {
                f.at_ms = long;
            }
        }
    }
    // Hosts that stop dead and boot again (their old connections left
    // half-open), and a host lost for good (its agent never comes back:
    // its work must fail over).
    let rebooting = rng.random_bool(0.25);
    if rebooting {
        for _ in 0..rng.random_range(1..=2) {
            faults.push(Fault {
                at_ms: rng.random_range(0..PLAN_MS - 20_000),
                action: Action::RebootAgent,
                agent: Some(Target::One(rng.random_range(0..AGENTS))),
                job: None,
                when: None,
                latency_ms: None,
            });
        }
    }
    let lost_for_good = rng.random_bool(0.2);
    if lost_for_good {
        if let Some(i) = (1..faults.len()).find(|&i| {
            faults[i - 1].action == Action::KillAgent
                && faults[i].action == Action::RestartAgent
                && matches!(faults[i].agent, Some(Target::One(_)))
        }) {
            faults.remove(i);
        }
    }
    // Commits that take a disk's time (fsyncs of 1 to 50 ms): crashes land
    // before a batch is durable and after, before its replies leave.
    let slow_disk = rng.random_bool(0.4);
    if slow_disk {
        topology.commit_ms = [1, 3, 10, 50][rng.random_range(0..4)];
    }
    // Clients that hang up mid-request (their retry must find the job the
    // first try made), that never retry, and that are cut off for a while.
    let client_faults = rng.random_bool(0.3);
    if client_faults {
        for job in &mut jobs {
            if rng.random_bool(0.3) {
                job.client_timeout_ms = rng.random_range(1..=50);
            }
            job.no_retry = rng.random_bool(0.1);
        }
        for _ in 0..rng.random_range(1..=2) {
            let at_ms = rng.random_range(0..PLAN_MS - 20_000);
            for (action, at_ms) in [
                (Action::PartitionClients, at_ms),
                (Action::HealClients, at_ms + rng.random_range(100..20_000)),
            ] {
                faults.push(Fault {
                    at_ms,
                    action,
                    agent: None,
                    job: None,
                    when: None,
                    latency_ms: None,
                });
            }
        }
    }
    // Processes that take time to die once killed, and that print.
    let slow_deaths = rng.random_bool(0.5);
    let printing = rng.random_bool(0.5);
    if slow_deaths {
        // The agent fences its kill grace earlier: the grace period must
        // leave it two ping intervals besides.
        let grace = topology.core["agent_grace_ms"].as_integer().unwrap_or(0);
        if grace < 2_500 {
            topology.core.insert(
                "agent_grace_ms".to_string(),
                toml::Value::Integer(grace + 1_000),
            );
        }
    }
    for job in &mut jobs {
        if slow_deaths {
            job.stop_ms = rng.random_range(0..=KILL_GRACE_MS);
        }
        if printing {
            job.output = format!("{} says {}\n", job.name, rng.random_range(0..1_000u32));
        }
    }
    // Output that tries the agent's capture: long, of characters up to four
    // bytes, printed in parts that may end inside a character, cut to a
    // small tail, and printed while dying too.
    let rich_output = rng.random_bool(0.4);
    if rich_output {
        const WORDS: [&str; 6] = ["ok ", "\u{e9}", "\u{2192} ", "\u{1f980}", "done\n", "x"];
        topology.output_tail_bytes = [7, 8, 13, 32, 64, 4096][rng.random_range(0..6)];
        for job in &mut jobs {
            job.output = (0..rng.random_range(1..=40))
                .map(|_| WORDS[rng.random_range(0..WORDS.len())])
                .collect();
            job.output_parts = rng.random_range(1..=6);
            if rng.random_bool(0.3) {
                job.term_output = "caught SIGTERM\n".into();
            }
        }
    }
    // The journal, in small segments (so that they rotate), replayed after
    // the run.
    let journal = rng.random_bool(0.3);
    if journal {
        topology.journal_segment_bytes = rng.random_range(4_096..=262_144);
    }
    // Agents of different sizes: a job larger than every agent still
    // connected steps aside, and goes back in line when a large one
    // returns. Two agents keep the largest size, so one lost for good
    // leaves every job somewhere to run.
    let mixed_sizes = cpus > 1 && rng.random_bool(0.3);
    if mixed_sizes {
        let mut sizes: Vec<u32> = (0..AGENTS)
            .map(|i| {
                if i < 2 {
                    cpus
                } else {
                    rng.random_range(1..cpus)
                }
            })
            .collect();
        sizes.shuffle(&mut rng);
        topology.agent_cpus = sizes;
    }
    let summary = format!(
        "SEED={seed} agents={AGENTS} cpus={cpus} users={} jobs={job_count} hang={hang_rate} fail={fail_rate} retry={retry_rate:.2} long={long_rate} faults=[{}] grace_ms={} loss={} timings={} outages={} slow_deaths={slow_deaths} printing={printing} rebooting={rebooting} lost_for_good={lost_for_good} commit_ms={} client_faults={client_faults} rich_output={rich_output} tail_bytes={} journal_bytes={} agent_cpus={:?}",
        users.len(),
        on.join(" "),
        topology.core["agent_grace_ms"],
        topology.loss,
        if shipped { "shipped" } else { "short" },
        if outages { "long" } else { "short" },
        topology.commit_ms,
        topology.output_tail_bytes,
        topology.journal_segment_bytes,
        topology.agent_cpus,
    );
    // Everything must settle within two minutes of the plan's end plus the
    // time the work would take run one job at a time (plan caps can
    // serialize it): a bound that only a real stall exceeds.
    let serial_ms: u64 = jobs
        .iter()
        .map(|j| {
            let one = match j.max_run_secs {
                Some(limit) if j.hang => limit * 1_000,
                _ => j.duration_ms,
            };
            one * u64::from(j.max_attempts)
        })
        .sum();
    // Under the shipped timings a lost agent's jobs wait a minute's grace.
    let recovery_ms = if shipped { 240_000 } else { 120_000 };
    let expect = Expect {
        settle_ms: recovery_ms + serial_ms,
        ..Expect::default()
    };
    let raw = Scenario {
        name: format!("swarm-{seed}"),
        description: summary.clone(),
        topology,
        users,
        jobs,
        faults,
        expect,
        core: Default::default(),
    };
    // Through the parser, so that a swarm scenario is exactly what its saved
    // file will say.
    let scenario = Scenario::parse(&raw.name, &raw.name, &raw.to_toml())
        .unwrap_or_else(|e| panic!("swarm seed {seed} made an invalid scenario: {e}"));
    (scenario, summary)
}
