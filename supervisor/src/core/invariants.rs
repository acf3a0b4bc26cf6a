//! `Core::check_invariants`: recomputes from scratch everything the core keeps
//! incrementally and panics on the first disagreement. O(jobs + agents); tests
//! and the simulator call it after every step.

use std::collections::{BTreeMap, BTreeSet};

use super::agents::Link;
use super::job::Phase;
use super::machine::Core;
use super::timers::TimerKey;
use super::types::{JobId, JobState, Kind};

impl Core {
    pub fn check_invariants(&self) {
        let p = self.parts();
        for queue in p.queues {
            queue.check();
        }
        p.agents.check();

        // Every job is accounted for exactly once: queued jobs in their queue,
        // jobs holding an attempt on their agent, nothing over and idle kept.
        let mut queued: BTreeSet<JobId> = BTreeSet::new();
        for (k, queue) in p.queues.iter().enumerate() {
            for (priority, user, id) in queue.entries() {
                let job = p
                    .jobs
                    .get(&id)
                    .unwrap_or_else(|| panic!("queued job {id} unknown"));
                assert_eq!(
                    job.state,
                    JobState::Queued,
                    "job {id} in the queue is {}",
                    job.state
                );
                assert_eq!(job.kind().index(), k, "job {id} in the wrong kind's queue");
                assert_eq!(job.priority, priority, "job {id} at the wrong priority");
                assert_eq!(job.user_key, user, "job {id} under the wrong user");
                assert!(queued.insert(id), "job {id} queued twice");
            }
        }
        let mut agent_used: BTreeMap<&str, u32> = BTreeMap::new();
        let mut agent_jobs: BTreeMap<&str, BTreeSet<JobId>> = BTreeMap::new();
        let mut pool_used = [0u32; 2];
        let mut held = vec![[0u32; 2]; p.held.len()];
        let mut caps = vec![[0u32; 2]; p.held.len()];
        for (id, job) in p.jobs {
            assert_eq!(*id, job.id);
            assert_eq!(
                p.user_names.get(job.user_key.index()),
                Some(&job.user),
                "job {id}'s user key names another user"
            );
            let held_attempt = job.held();
            let held_count = job.attempts.iter().filter(|a| a.holds()).count();
            assert!(
                held_count <= 1,
                "job {id} holds {held_count} attempts: it would run on two agents"
            );
            match job.state {
                JobState::Queued => {
                    assert!(held_attempt.is_none(), "queued job {id} holds an attempt");
                    assert!(queued.contains(id), "queued job {id} is not in its queue");
                }
                JobState::Dispatched => {
                    let a =
                        held_attempt.unwrap_or_else(|| panic!("dispatched job {id} holds nothing"));
                    assert!(
                        a.started_at.is_none(),
                        "dispatched job {id} already started"
                    );
                }
                JobState::Running => {
                    let a =
                        held_attempt.unwrap_or_else(|| panic!("running job {id} holds nothing"));
                    assert_eq!(a.phase, Phase::Active, "running job {id}");
                    assert!(a.started_at.is_some(), "running job {id} never started");
                }
                JobState::Canceling => {
                    let a =
                        held_attempt.unwrap_or_else(|| panic!("canceling job {id} holds nothing"));
                    assert!(
                        matches!(a.phase, Phase::Stopping { .. }),
                        "canceling job {id} is not being stopped"
                    );
                }
                terminal => {
                    let a = held_attempt
                        .unwrap_or_else(|| panic!("{terminal} job {id} kept in the core"));
                    assert!(
                        matches!(a.phase, Phase::Stopping { .. }),
                        "{terminal} job {id} still active"
                    );
                }
            }
            assert!(
                job.attempts.len() as u32 <= job.spec.max_attempts,
                "job {id} over its attempts"
            );
            if let Some(a) = held_attempt {
                let agent = p
                    .agents
                    .get(&a.agent)
                    .unwrap_or_else(|| panic!("job {id} held on unknown agent {}", a.agent));
                *agent_used.entry(agent.id.as_str()).or_default() += a.cpus;
                agent_jobs.entry(agent.id.as_str()).or_default().insert(*id);
                pool_used[job.kind().index()] += a.cpus;
                let (u, k) = (job.user_key.index(), job.kind().index());
                held[u][k] += 1;
                let plan_cap = p
                    .config
                    .plans
                    .get(&*job.plan)
                    .map_or(0, |plan| plan.limits(job.kind()).max_running);
                caps[u][k] = caps[u][k].max(plan_cap);
            }
            let deadline = job.deadline(p.config, self.holder_connected(job));
            assert_eq!(
                p.timers.get(&TimerKey::Job(*id)),
                deadline,
                "job {id} timer"
            );
        }

        // Capacity is conserved: what agents, pools and users hold is exactly
        // what attempts hold; nothing leaked, nothing granted twice.
        for agent in p.agents.iter() {
            let used = agent_used.get(agent.id.as_str()).copied().unwrap_or(0)
                + agent.dying.values().sum::<u32>();
            assert_eq!(agent.used_cpus, used, "agent {} used cpus", agent.id);
            assert!(
                agent.conn().is_some() || agent.dying.is_empty(),
                "agent {} is away and holds dying processes",
                agent.id
            );
            let jobs = agent_jobs.remove(agent.id.as_str()).unwrap_or_default();
            assert_eq!(agent.jobs, jobs, "agent {} job list", agent.id);
            let timer = p.timers.get(&TimerKey::Agent(agent.id.clone()));
            match agent.link {
                Link::Connected { .. } => assert_eq!(
                    timer, None,
                    "connected agent {} has a grace timer",
                    agent.id
                ),
                Link::Disconnected { since, .. } => assert_eq!(
                    timer,
                    Some(since.plus_ms(p.config.agent_grace_ms)),
                    "disconnected agent {} grace timer",
                    agent.id
                ),
            }
        }
        assert!(
            agent_jobs.is_empty(),
            "attempts held on agents the core does not know"
        );
        for kind in Kind::ALL {
            assert_eq!(
                p.pool_used[kind.index()],
                pool_used[kind.index()],
                "{kind} pool used"
            );
            assert!(
                pool_used[kind.index()] <= p.config.pool_cpus(kind),
                "{kind} pool over its size"
            );
        }
        assert_eq!(p.held, &held[..], "per-user holdings");
        for (u, (held, caps)) in held.iter().zip(&caps).enumerate() {
            for kind in Kind::ALL {
                let (h, cap) = (held[kind.index()], caps[kind.index()]);
                assert!(
                    h <= cap,
                    "user {} holds {h} {kind} jobs, plan allows {cap}",
                    p.user_names[u]
                );
            }
        }
        let timers_expected = p
            .jobs
            .values()
            .filter(|j| j.deadline(p.config, self.holder_connected(j)).is_some())
            .count()
            + p.agents
                .iter()
                .filter(|a| matches!(a.link, Link::Disconnected { .. }))
                .count();
        assert_eq!(
            p.timers.len(),
            timers_expected,
            "timers for things that are gone"
        );

        // Each user's count of waiting jobs is the count of its queued jobs.
        let mut waiting = vec![0u32; p.waiting.len()];
        for job in p.jobs.values().filter(|j| j.state == JobState::Queued) {
            waiting[job.user_key.index()] += 1;
        }
        assert_eq!(waiting, p.waiting, "waiting jobs per user out of step");

        // Fair and work-conserving: after a step the head of each queue is a
        // user under its cap whose job does not fit, and parked users are at
        // their cap.
        for kind in Kind::ALL {
            let queue = &p.queues[kind.index()];
            if let Some(head) = queue.head() {
                let job = &p.jobs[&head.job];
                let cap = p
                    .config
                    .plans
                    .get(&*job.plan)
                    .map_or(0, |plan| plan.limits(kind).max_running);
                let held = held[head.user.index()][kind.index()];
                assert!(
                    held < cap,
                    "head user {:?} at its cap was not parked",
                    head.user
                );
                let pool_free = p.config.pool_cpus(kind) - pool_used[kind.index()];
                let fits = pool_free >= job.spec.cpus && p.agents.best_fit(job.spec.cpus).is_some();
                assert!(
                    !fits,
                    "{kind} head job {} fits but was left waiting",
                    head.job
                );
            }
            // A job set aside is larger than every connected agent; one
            // that an agent fits went back in line.
            if let (Some((cpus, id)), Some(largest)) = (queue.smallest_aside(), p.agents.largest())
            {
                assert!(
                    cpus > largest,
                    "{kind} job {id} needs {cpus} CPUs, fits a connected agent of {largest}, and was left aside"
                );
            }
            for id in queue.aside_jobs() {
                assert_eq!(
                    queue.aside_cpus(id),
                    Some(p.jobs[&id].spec.cpus),
                    "job {id} set aside under the wrong size"
                );
            }
            for (priority, user, id) in queue.entries() {
                if queue.is_parked(priority, user) {
                    let job = &p.jobs[&id];
                    let cap = p
                        .config
                        .plans
                        .get(&*job.plan)
                        .map_or(0, |plan| plan.limits(kind).max_running);
                    let held = held[user.index()][kind.index()];
                    assert!(held >= cap, "user {user:?} parked below its cap");
                }
            }
        }
    }
}
