//! A randomized model test: random sequences of submits, cancels, agent
//! connects, losses, reconnects, duplicate connections, completions, stale
//! reports, time jumps and supervisor restarts, driven against a model of
//! the agents (what each runs, what its outbox holds). After every step the
//! core's own invariants are checked, and the test checks what no
//! implementation detail can hide: no job runs twice at once, a canceled job
//! never runs again, terminal states never change, every job is accounted
//! for, and dispatch keeps FIFO order within a user.
//!
//! A failure prints the seed; `FOREMAN_MODEL_SEED=<seed>` replays just it.

use std::collections::{BTreeMap, BTreeSet};
use std::panic::{catch_unwind, AssertUnwindSafe};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::testkit::*;
use super::*;

const SEQUENCES: u64 = 10_000;
const STEPS: usize = 80;
const AGENTS: [&str; 4] = ["a0", "a1", "a2", "a3"];
const USERS: [&str; 4] = ["ana", "bob", "cy", "dee"];

#[derive(Default)]
struct AgentModel {
    connected: bool,
    cpus: u32,
    /// Attempts the agent runs: started yet?
    running: BTreeMap<(JobId, u32), bool>,
    /// Results sent but not acknowledged.
    outbox: BTreeMap<(JobId, u32), FinishedReport>,
}

impl AgentModel {
    /// What the agent says in its hello: what it runs, and what it finished
    /// without an acknowledgement.
    fn hello_reports(&self) -> Vec<AttemptReport> {
        let running = self.running.keys().map(|(job, attempt)| AttemptReport {
            job: *job,
            attempt: *attempt,
            finished: None,
        });
        let finished = self.outbox.iter().map(|((job, attempt), f)| AttemptReport {
            job: *job,
            attempt: *attempt,
            finished: Some(f.clone()),
        });
        running.chain(finished).collect()
    }
}

struct World {
    h: Harness,
    rng: StdRng,
    agents: BTreeMap<&'static str, AgentModel>,
    submitted: BTreeSet<JobId>,
    /// Jobs whose cancel was accepted while they were live.
    canceled: BTreeSet<JobId>,
    /// The attempt of each job an agent was told to run and has not ended.
    live_runs: BTreeMap<JobId, (String, u32)>,
    restarts: u64,
    /// First dispatches that passed an older job of the same user set aside
    /// (larger than every connected agent).
    overtakes: u64,
    /// Off for replay tests: a restart is not an input.
    allow_restart: bool,
}

impl World {
    fn new(seed: u64) -> World {
        let mut rng = StdRng::seed_from_u64(seed);
        let config = CoreConfig {
            pool_sequential_cpus: rng.random_range(2..=8),
            pool_parallel_cpus: rng.random_range(2..=8),
            agent_cpus_max: 4,
            dispatch_ack_timeout_ms: 2_000,
            stop_timeout_ms: 3_000,
            agent_grace_ms: rng.random_range(1_000..=10_000),
            idempotency_window_secs: 60,
            ..CoreConfig::default()
        };
        World {
            h: Harness::new(config),
            rng,
            agents: AGENTS.iter().map(|a| (*a, AgentModel::default())).collect(),
            submitted: BTreeSet::new(),
            canceled: BTreeSet::new(),
            live_runs: BTreeMap::new(),
            restarts: 0,
            overtakes: 0,
            allow_restart: true,
        }
    }

    fn step(&mut self) {
        let effects = match self.rng.random_range(0..100) {
            0..=24 => self.submit(),
            25..=31 => self.cancel(),
            32..=41 => self.connect(),
            42..=47 => self.disconnect(),
            48..=62 => self.agent_starts(),
            63..=77 => self.agent_finishes(),
            78..=81 => self.stale_report(),
            82..=96 => {
                let ms = if self.rng.random_bool(0.8) {
                    self.rng.random_range(1..2_000)
                } else {
                    self.rng.random_range(2_000..20_000)
                };
                self.h.advance(ms)
            }
            _ if self.allow_restart => {
                self.restart();
                Vec::new()
            }
            _ => self.h.advance(1),
        };
        self.observe(&effects);
        self.check();
    }

    fn submit(&mut self) -> Vec<Effect> {
        let user = USERS[self.rng.random_range(0..USERS.len())];
        let plan = if self.rng.random_bool(0.3) {
            "premium"
        } else {
            "basic"
        };
        let kind = if self.rng.random_bool(0.5) {
            "parallel"
        } else {
            "sequential"
        };
        let spec = SubmitSpec {
            kind: kind.to_string(),
            cpus: self.rng.random_range(1..=3),
            max_run_secs: Some(self.rng.random_range(1..=30)),
            max_attempts: self.rng.random_range(1..=3),
            queue_timeout_secs: self
                .rng
                .random_bool(0.1)
                .then(|| self.rng.random_range(1..30)),
            idempotency_key: self
                .rng
                .random_bool(0.1)
                .then(|| format!("k{}", self.rng.random_range(0..3))),
            ..cmd(&["job"])
        };
        let before = self.h.log.len();
        if let Reply::Submitted { job, existing, .. } = self.h.try_submit(user, plan, spec) {
            assert!(
                existing || self.submitted.insert(job),
                "job id {job} handed out twice"
            );
        }
        self.h.log[before..].to_vec()
    }

    fn pick_job(&mut self) -> Option<JobId> {
        let n = self.submitted.len();
        (n > 0).then(|| {
            *self
                .submitted
                .iter()
                .nth(self.rng.random_range(0..n))
                .expect("in range")
        })
    }

    fn cancel(&mut self) -> Vec<Effect> {
        let Some(job) = self.pick_job() else {
            return Vec::new();
        };
        let owner = self.h.state_record(job).user.to_string();
        let (user, admin) = match self.rng.random_range(0..4) {
            0 => ("root".to_string(), true),
            1 => (
                USERS[self.rng.random_range(0..USERS.len())].to_string(),
                false,
            ),
            _ => (owner.clone(), false),
        };
        let was_live = self.h.core.job(job).is_some();
        let before = self.h.log.len();
        let reply = self.h.cancel_as(&user, admin, job);
        match reply {
            Reply::Cancel { state, .. } => {
                assert!(
                    admin || user == owner,
                    "{user} canceled {owner}'s job {job}"
                );
                if was_live && matches!(state, JobState::Canceling | JobState::Canceled) {
                    self.canceled.insert(job);
                }
            }
            Reply::CancelRejected { .. } => {
                assert!(
                    !was_live || (!admin && user != owner),
                    "cancel of live job {job} by {user} rejected"
                );
            }
            other => panic!("cancel got {other:?}"),
        }
        self.h.log[before..].to_vec()
    }

    fn pick_agent(&mut self) -> &'static str {
        AGENTS[self.rng.random_range(0..AGENTS.len())]
    }

    fn connect(&mut self) -> Vec<Effect> {
        let agent = self.pick_agent();
        let forget = self.rng.random_bool(0.1); // an agent restarted from scratch
        let cpus = if self.agents[agent].cpus == 0 || self.rng.random_bool(0.2) {
            self.rng.random_range(1..=4)
        } else {
            self.agents[agent].cpus
        };
        let model = self.agents.get_mut(agent).expect("agent");
        if forget {
            model.running.clear();
            model.outbox.clear();
        }
        model.connected = true;
        model.cpus = cpus;
        let reports = model.hello_reports();
        self.h.connect_with(agent, cpus, reports)
    }

    fn disconnect(&mut self) -> Vec<Effect> {
        let agent = self.pick_agent();
        if !self.agents[agent].connected {
            return Vec::new();
        }
        self.agents.get_mut(agent).expect("agent").connected = false;
        let reason = if self.rng.random_bool(0.5) {
            GoneReason::Closed
        } else {
            GoneReason::PingTimeout
        };
        self.h.gone(agent, reason)
    }

    fn agent_starts(&mut self) -> Vec<Effect> {
        let agent = self.pick_agent();
        let model = &self.agents[agent];
        let pending: Vec<(JobId, u32)> = model
            .running
            .iter()
            .filter(|(_, s)| !**s)
            .map(|(k, _)| *k)
            .collect();
        if !model.connected || pending.is_empty() {
            return Vec::new();
        }
        let (job, attempt) = pending[self.rng.random_range(0..pending.len())];
        self.start_run(agent, job, attempt)
    }

    /// The agent's process for `(job, attempt)` starts, and it says so.
    fn start_run(&mut self, agent: &'static str, job: JobId, attempt: u32) -> Vec<Effect> {
        let model = self.agents.get_mut(agent).expect("agent");
        model.running.insert((job, attempt), true);
        self.h.started(agent, job, attempt)
    }

    fn agent_finishes(&mut self) -> Vec<Effect> {
        let agent = self.pick_agent();
        let model = &self.agents[agent];
        if !model.connected || (model.running.is_empty() && model.outbox.is_empty()) {
            return Vec::new();
        }
        // Either a process ends, or the outbox re-sends an unacknowledged result.
        let resend =
            model.running.is_empty() || self.rng.random_bool(0.1) && !model.outbox.is_empty();
        let (key, report) = if resend {
            let (k, r) = model.outbox.iter().next().expect("outbox non-empty");
            (*k, r.clone())
        } else {
            let keys: Vec<(JobId, u32)> = model.running.keys().copied().collect();
            let key = keys[self.rng.random_range(0..keys.len())];
            let outcome = match self.rng.random_range(0..6) {
                0 => Outcome::Exited { code: 1 },
                1 => Outcome::Signaled { signal: 9 },
                2 => Outcome::SpawnFailed {
                    error: "no such file".into(),
                },
                _ => Outcome::Exited { code: 0 },
            };
            let report = FinishedReport {
                outcome,
                output_tail: "tail".into(),
                run_ms: 5,
            };
            let model = self.agents.get_mut(agent).expect("agent");
            model.running.remove(&key);
            model.outbox.insert(key, report.clone());
            self.end_run(key.0, agent, key.1);
            (key, report)
        };
        self.h.message(
            agent,
            AgentMsg::Finished {
                job: key.0,
                attempt: key.1,
                outcome: report.outcome,
                output_tail: report.output_tail,
                run_ms: report.run_ms,
            },
        )
    }

    fn stale_report(&mut self) -> Vec<Effect> {
        let agent = self.pick_agent();
        let Some(job) = self.pick_job() else {
            return Vec::new();
        };
        if !self.agents[agent].connected {
            return Vec::new();
        }
        let attempt = self.rng.random_range(1..=4);
        if self.agents[agent].running.contains_key(&(job, attempt)) {
            return Vec::new();
        }
        self.h.started(agent, job, attempt)
    }

    /// The supervisor dies: the core is rebuilt from the store and every
    /// connection is gone (agents keep running their processes).
    fn restart(&mut self) {
        self.restarts += 1;
        let records: Vec<Job> = self.h.store.values().cloned().collect();
        let next = self.h.core.next_job_id();
        let config = self.h.core.config().clone();
        self.h.now += 1_000;
        let core =
            Core::restore(config, Millis(self.h.now), records, next).expect("store restores");
        core.check_invariants();
        let store = std::mem::take(&mut self.h.store);
        let log = std::mem::take(&mut self.h.log);
        let conns = std::mem::take(&mut self.h.conns);
        self.h = Harness::from_core(core, self.h.now);
        self.h.store = store;
        self.h.log = log;
        self.h.conns = conns;
        for model in self.agents.values_mut() {
            model.connected = false;
        }
    }

    fn end_run(&mut self, job: JobId, agent: &str, attempt: u32) {
        if self.live_runs.get(&job) == Some(&(agent.to_string(), attempt)) {
            self.live_runs.remove(&job);
        }
    }

    /// Delivers the step's messages to the agent models, as a shell would:
    /// only to the agent's current connection.
    fn observe(&mut self, effects: &[Effect]) {
        for effect in effects {
            match effect {
                Effect::Send { agent, conn, msg } => {
                    let name = agent.to_string();
                    let current = self.h.conns.get(&name) == Some(conn);
                    let largest = self
                        .agents
                        .values()
                        .filter(|a| a.connected)
                        .map(|a| a.cpus)
                        .max()
                        .unwrap_or(0);
                    let model = self.agents.get_mut(name.as_str()).expect("known agent");
                    if !current || !model.connected {
                        continue;
                    }
                    match msg {
                        ToAgent::Run { job, attempt, .. } => {
                            assert!(
                                !self.canceled.contains(job),
                                "canceled job {job} dispatched again"
                            );
                            let redelivery = self.live_runs.contains_key(job);
                            if let Some((other, n)) = self.live_runs.get(job) {
                                // The same attempt to the same agent is a redelivery.
                                assert!(
                                    (other.as_str(), *n) == (name.as_str(), *attempt),
                                    "job {job} sent to {name} (attempt {attempt}) while attempt {n} lives on {other}"
                                );
                            }
                            self.live_runs.insert(*job, (name.clone(), *attempt));
                            let store = &self.h.store;
                            let record = &store[job];
                            if *attempt == 1 && !redelivery {
                                // FIFO within a user: no older job of the same user, kind and
                                // priority still waits without ever having run, unless it is
                                // larger than every connected agent (it stepped aside).
                                for older in store.values().filter(|j| j.id < *job) {
                                    let same = older.user == record.user
                                        && older.kind() == record.kind()
                                        && older.priority == record.priority;
                                    if older.spec.cpus > largest {
                                        self.overtakes +=
                                            u64::from(same && older.state == JobState::Queued);
                                        continue;
                                    }
                                    assert!(
                                        !(same
                                            && older.state == JobState::Queued
                                            && older.attempts.is_empty()),
                                        "job {job} dispatched before older job {} of the same user",
                                        older.id
                                    );
                                }
                            }
                            model.running.insert((*job, *attempt), false);
                        }
                        ToAgent::Kill { job, attempt, .. } => {
                            if model.running.remove(&(*job, *attempt)).is_some() {
                                model.outbox.insert(
                                    (*job, *attempt),
                                    FinishedReport {
                                        outcome: Outcome::Killed,
                                        output_tail: String::new(),
                                        run_ms: 1,
                                    },
                                );
                            }
                        }
                        ToAgent::Ack { job, attempt } => {
                            model.outbox.remove(&(*job, *attempt));
                        }
                    }
                }
                Effect::Close { agent, conn, .. } => {
                    let name = agent.to_string();
                    if self.h.conns.get(&name) == Some(conn) {
                        self.agents.get_mut(name.as_str()).expect("agent").connected = false;
                        let conn = *conn;
                        // The shell reports the closed socket back, as it would.
                        let gone = self.h.step(Input::AgentGone {
                            conn,
                            agent: agent.clone(),
                            reason: GoneReason::Closed,
                        });
                        self.observe(&gone);
                    }
                }
                Effect::Event(ev) if ev.kind == EventKind::AttemptReleased => {
                    let job = ev.job.expect("released event names its job");
                    let agent = ev.agent.as_ref().expect("names its agent").to_string();
                    self.end_run(job, &agent, ev.attempt.expect("names its attempt"));
                }
                _ => {}
            }
        }
    }

    fn check(&self) {
        for job in &self.submitted {
            match self.h.core.job(*job) {
                Some(live) => assert!(
                    !live.state.is_terminal() || live.held().is_some(),
                    "job {job} is over but still in the core"
                ),
                None => {
                    let record = self
                        .h
                        .store
                        .get(job)
                        .unwrap_or_else(|| panic!("job {job} forgotten"));
                    assert!(
                        record.state.is_terminal(),
                        "job {job} left the core in state {}",
                        record.state
                    );
                }
            }
        }
        for job in &self.canceled {
            let state = self.h.store[job].state;
            assert!(
                matches!(
                    state,
                    JobState::Canceling | JobState::Canceled | JobState::TimedOut
                ),
                "job {job} was canceled but is {state}"
            );
        }
    }

    /// Lets every agent come back and finish everything; every job must end.
    fn drain(&mut self) {
        for agent in AGENTS {
            let effects = self.connect_named(agent);
            self.observe(&effects);
        }
        for _ in 0..10_000 {
            if self.h.core.jobs().next().is_none() {
                return;
            }
            let busy: Vec<&'static str> = AGENTS
                .iter()
                .copied()
                .filter(|a| !self.agents[a].running.is_empty() || !self.agents[a].outbox.is_empty())
                .collect();
            let effects = match busy.first() {
                Some(agent) => {
                    let agent = *agent;
                    if let Some(((job, attempt), started)) = self.agents[agent]
                        .running
                        .iter()
                        .next()
                        .map(|(k, v)| (*k, *v))
                    {
                        if started {
                            let model = self.agents.get_mut(agent).expect("agent");
                            model.running.remove(&(job, attempt));
                            let report = FinishedReport {
                                outcome: Outcome::Exited { code: 0 },
                                output_tail: String::new(),
                                run_ms: 1,
                            };
                            model.outbox.insert((job, attempt), report);
                            self.end_run(job, agent, attempt);
                            self.h.exited(agent, job, attempt, 0)
                        } else {
                            self.start_run(agent, job, attempt)
                        }
                    } else {
                        let ((job, attempt), report) = self.agents[agent]
                            .outbox
                            .iter()
                            .next()
                            .map(|(k, r)| (*k, r.clone()))
                            .expect("outbox");
                        self.h.finished(agent, job, attempt, report.outcome)
                    }
                }
                None => self.h.advance(1_000),
            };
            self.observe(&effects);
            self.check();
        }
        let stuck: Vec<String> = self
            .h
            .core
            .jobs()
            .map(|j| format!("{} {} {:?}", j.id, j.state, self.h.core.situation(j.id)))
            .collect();
        panic!("jobs never ended after the faults stopped: {stuck:?}");
    }

    fn connect_named(&mut self, agent: &'static str) -> Vec<Effect> {
        let model = self.agents.get_mut(agent).expect("agent");
        model.connected = true;
        let cpus = model.cpus.max(3); // every job must fit somewhere in the end
        model.cpus = cpus;
        let reports = model.hello_reports();
        self.h.connect_with(agent, cpus, reports)
    }
}

/// How often each event kind and end state occurred, so that a generator
/// which stopped reaching a path fails the test instead of passing vacuously.
#[derive(Default)]
struct Coverage {
    events: BTreeMap<EventKind, u64>,
    ends: BTreeMap<JobState, u64>,
    restarts: u64,
    overtakes: u64,
}

fn run_sequence(seed: u64, coverage: &mut Coverage) {
    let mut world = World::new(seed);
    for _ in 0..STEPS {
        world.step();
    }
    world.drain();
    coverage.restarts += world.restarts;
    coverage.overtakes += world.overtakes;
    for effect in &world.h.log {
        match effect {
            Effect::Event(ev) => *coverage.events.entry(ev.kind).or_default() += 1,
            Effect::Persist { job } if job.state.is_terminal() && job.held().is_none() => {
                *coverage.ends.entry(job.state).or_default() += 1
            }
            _ => {}
        }
    }
}

#[test]
fn model_random_sequences_keep_every_invariant() {
    let mut coverage = Coverage::default();
    if let Ok(seed) = std::env::var("FOREMAN_MODEL_SEED") {
        run_sequence(
            seed.parse().expect("FOREMAN_MODEL_SEED is a number"),
            &mut coverage,
        );
        return;
    }
    let sequences = std::env::var("FOREMAN_MODEL_SEQUENCES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(SEQUENCES);
    for seed in 0..sequences {
        if catch_unwind(AssertUnwindSafe(|| run_sequence(seed, &mut coverage))).is_err() {
            panic!(
                "model sequence failed; replay it with: FOREMAN_MODEL_SEED={seed} cargo test -p foreman --lib model_random_sequences"
            );
        }
    }
    println!(
        "model coverage over {sequences} sequences: events {:?}, ends {:?}, restarts {}, overtakes of a job set aside {}",
        coverage.events, coverage.ends, coverage.restarts, coverage.overtakes
    );
    if sequences >= 1_000 {
        // Every kind but a refused hello, which this generator never sends.
        for kind in EventKind::ALL
            .into_iter()
            .filter(|k| *k != EventKind::AgentRefused)
        {
            assert!(
                coverage.events.get(&kind).copied().unwrap_or(0) > 0,
                "no sequence produced a {kind:?} event"
            );
        }
        assert!(
            coverage.restarts > 0,
            "no sequence restarted the supervisor"
        );
        assert!(
            coverage.overtakes > 0,
            "no job was dispatched past an older one set aside"
        );
        for state in [
            JobState::Succeeded,
            JobState::Failed,
            JobState::Canceled,
            JobState::TimedOut,
            JobState::Lost,
        ] {
            assert!(
                coverage.ends.get(&state).copied().unwrap_or(0) > 0,
                "no job ended {state}"
            );
        }
    }
}

fn effects_json(effects: &[Effect]) -> String {
    serde_json::to_string(effects).expect("effects serialize")
}

#[test]
fn model_replaying_inputs_reproduces_a_run_and_a_snapshot_continues_it_exactly() {
    for seed in 0..300u64 {
        let mut world = World::new(seed);
        world.allow_restart = false;
        for _ in 0..STEPS {
            world.step();
        }
        world.drain();
        let inputs = world.h.inputs.clone();
        let config = world.h.core.config().clone();
        // A: the whole run again, from its inputs alone.
        let mut a = Core::new(config.clone());
        let mut effects_a: Vec<Vec<Effect>> = Vec::new();
        for (now, input) in &inputs {
            effects_a.push(a.handle(Millis(*now), input.clone()).collect());
        }
        let all_a: Vec<Effect> = effects_a.iter().flatten().cloned().collect();
        assert_eq!(
            effects_json(&all_a),
            effects_json(&world.h.log),
            "seed {seed}: replay differs from the run"
        );
        // B: part of it, then through a snapshot (as JSON), then the rest.
        let cut = (seed as usize).wrapping_mul(7919) % inputs.len().max(1);
        let mut b = Core::new(config);
        for (now, input) in &inputs[..cut] {
            b.handle(Millis(*now), input.clone()).for_each(drop);
        }
        let text = serde_json::to_string(&b.snapshot()).expect("snapshot serializes");
        let snapshot: Snapshot = serde_json::from_str(&text).expect("snapshot parses");
        let b = Core::from_snapshot(snapshot).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        b.check_invariants();
        assert_eq!(
            serde_json::to_string(&b.snapshot()).unwrap(),
            text,
            "seed {seed}: snapshot round trip"
        );
        let mut b = b;
        for (i, (now, input)) in inputs.iter().enumerate().skip(cut) {
            let effects: Vec<Effect> = b.handle(Millis(*now), input.clone()).collect();
            assert_eq!(
                effects_json(&effects),
                effects_json(&effects_a[i]),
                "seed {seed}: input {i} after a snapshot taken at input {cut}"
            );
        }
    }
}

#[test]
fn model_a_snapshot_that_does_not_hold_together_is_an_error() {
    let mut world = World::new(3);
    world.allow_restart = false;
    for _ in 0..STEPS {
        world.step();
    }
    let good = world.h.core.snapshot();
    let mut twice = good.clone();
    twice.users.extend(good.users.first().cloned());
    let mut queues = good.clone();
    queues.queues.clear();
    let mut orphan = good.clone();
    orphan.agents.clear();
    let mut three = good.clone();
    three.queues.push(Vec::new());
    for (what, broken) in [
        ("a user twice", twice),
        ("no queues", queues),
        ("no agents", orphan),
        ("three queue kinds", three),
    ] {
        if broken == good {
            continue;
        }
        // Without queues, queued jobs have nowhere to be; without agents,
        // held attempts have nowhere to run.
        let needed = match what {
            "no queues" => good.jobs.iter().any(|j| j.state == JobState::Queued),
            "no agents" => good.jobs.iter().any(|j| j.held().is_some()),
            _ => true,
        };
        if !needed {
            continue;
        }
        assert!(Core::from_snapshot(broken).is_err(), "{what} was accepted");
    }
    assert!(Core::from_snapshot(good).is_ok());
}
