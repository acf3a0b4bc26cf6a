//! An exact copy of the core's state, as data: what `restore` cannot give
//! (connected agents, the round-robin ring order, parked users, idempotency
//! keys) included. `Core::from_snapshot(core.snapshot())` then behaves
//! exactly as `core` would for every later input: the journal starts each
//! segment with one, so a segment replays exactly on its own.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::agents::{Agent, Link};
use super::config::CoreConfig;
use super::job::Job;
use super::machine::{Core, Live, RestoreError};
use super::queue::{FairQueue, LevelOrder};
use super::timers::TimerKey;
use super::types::{AgentId, JobId, JobState, Kind, Millis, UserKey};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    pub config: CoreConfig,
    pub now: Millis,
    pub next_job: u64,
    /// Users in the order the core met them.
    pub users: Vec<Arc<str>>,
    /// Live jobs, by id.
    pub jobs: Vec<Job>,
    pub agents: Vec<AgentRecord>,
    /// Per kind (sequential, parallel), each level's order.
    pub queues: Vec<Vec<LevelRecord>>,
    /// Per kind, the queued jobs set aside: larger than every connected agent.
    #[serde(default, skip_serializing_if = "no_aside")]
    pub aside: Vec<Vec<JobId>>,
    /// In expiry order.
    pub idempotency: Vec<IdempotencyRecord>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AgentRecord {
    pub id: AgentId,
    pub link: Link,
    pub cpus: u32,
    pub labels: BTreeMap<String, String>,
    /// Dying processes of attempts the core does not own: (job, attempt, CPUs).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dying: Vec<(JobId, u32, u32)>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LevelRecord {
    pub priority: u8,
    pub ring: Vec<Arc<str>>,
    pub parked: Vec<Arc<str>>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct IdempotencyRecord {
    pub user: Arc<str>,
    pub key: String,
    pub job: JobId,
    pub expires: Millis,
    /// The digest of the first job's spec (absent in older snapshots).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<u64>,
}

fn no_aside(aside: &[Vec<JobId>]) -> bool {
    aside.iter().all(Vec::is_empty)
}

impl Core {
    pub fn snapshot(&self) -> Snapshot {
        let p = self.parts();
        let name = |key: &UserKey| p.user_names[key.index()].clone();
        let mut jobs: Vec<Job> = p.jobs.values().map(|l| (*l.job).clone()).collect();
        jobs.sort_by_key(|j| j.id);
        Snapshot {
            config: p.config.clone(),
            now: self.now(),
            next_job: self.next_job_id(),
            users: p.user_names.to_vec(),
            jobs,
            agents: p
                .agents
                .iter()
                .map(|a| AgentRecord {
                    id: a.id.clone(),
                    link: a.link,
                    cpus: a.cpus,
                    labels: a.labels.clone(),
                    dying: a.dying.iter().map(|(&(j, n), &c)| (j, n, c)).collect(),
                })
                .collect(),
            queues: p
                .queues
                .iter()
                .map(|q| {
                    q.orders()
                        .iter()
                        .map(|o| LevelRecord {
                            priority: o.priority,
                            ring: o.ring.iter().map(name).collect(),
                            parked: o.parked.iter().map(name).collect(),
                        })
                        .collect()
                })
                .collect(),
            aside: p.queues.iter().map(|q| q.aside_jobs().collect()).collect(),
            idempotency: p
                .idempotency_expiry
                .iter()
                .filter(|(expires, user, key)| {
                    p.idempotency
                        .get(&(user.clone(), key.clone()))
                        .is_some_and(|(_, e, _)| e == expires)
                })
                .map(|(expires, user, key)| {
                    let (job, _, digest) = p.idempotency[&(user.clone(), key.clone())];
                    IdempotencyRecord {
                        user: user.clone(),
                        key: key.clone(),
                        job,
                        expires: *expires,
                        digest,
                    }
                })
                .collect(),
        }
    }

    /// Rebuilds the core a snapshot was taken of; an error names what does
    /// not hold together.
    pub fn from_snapshot(snapshot: Snapshot) -> Result<Core, RestoreError> {
        let bad = |problem: &str| RestoreError {
            job: JobId(0),
            problem: format!("snapshot: {problem}"),
        };
        let mut core = Core::new(snapshot.config);
        core.set_clock(snapshot.now, snapshot.next_job);
        for user in &snapshot.users {
            if core.intern(user).index() + 1 != core.user_count() {
                return Err(bad("a user appears twice"));
            }
        }
        let grace_ms = core.config().agent_grace_ms;
        for record in snapshot.agents {
            if core.agent(&record.id).is_some() {
                return Err(bad("an agent appears twice"));
            }
            if let Link::Disconnected { since, .. } = record.link {
                core.arm(
                    TimerKey::Agent(record.id.clone()),
                    Some(since.plus_ms(grace_ms)),
                );
            }
            let dying: BTreeMap<(JobId, u32), u32> = record
                .dying
                .iter()
                .map(|&(job, attempt, cpus)| ((job, attempt), cpus))
                .collect();
            if dying.len() != record.dying.len() || dying.values().any(|&c| c == 0) {
                return Err(bad("an agent's dying processes repeat or hold nothing"));
            }
            core.insert_agent(Agent {
                id: record.id,
                link: record.link,
                cpus: record.cpus,
                labels: record.labels,
                used_cpus: dying.values().sum(),
                jobs: BTreeSet::new(),
                dying,
            });
        }
        let mut waiting: [BTreeMap<(u8, UserKey), VecDeque<JobId>>; 2] = Default::default();
        let set_aside: [BTreeSet<JobId>; 2] = std::array::from_fn(|k| {
            snapshot
                .aside
                .get(k)
                .into_iter()
                .flatten()
                .copied()
                .collect()
        });
        for job in snapshot.jobs {
            let user = core
                .user_key(&job.user)
                .ok_or_else(|| bad("a job's user is not among the users"))?;
            if job.state == JobState::Queued && !set_aside[job.kind().index()].contains(&job.id) {
                waiting[job.kind().index()]
                    .entry((job.priority, user))
                    .or_default()
                    .push_back(job.id);
            }
            core.insert_live(Live {
                job: Arc::new(job),
                user_key: user,
            })?;
        }
        for (k, levels) in snapshot.queues.iter().enumerate().take(2) {
            let mut orders = Vec::new();
            for level in levels {
                let keys = |names: &Vec<Arc<str>>| -> Result<Vec<UserKey>, RestoreError> {
                    names
                        .iter()
                        .map(|n| {
                            core.user_key(n)
                                .ok_or_else(|| bad("a queued user is not among the users"))
                        })
                        .collect()
                };
                orders.push(LevelOrder {
                    priority: level.priority,
                    ring: keys(&level.ring)?,
                    parked: keys(&level.parked)?,
                });
            }
            let mut jobs = std::mem::take(&mut waiting[k]);
            for queue in jobs.values_mut() {
                queue.make_contiguous().sort();
            }
            let mut queue = FairQueue::from_orders(&orders, jobs)
                .ok_or_else(|| bad("queue orders do not match the queued jobs"))?;
            for &id in snapshot.aside.get(k).into_iter().flatten() {
                let job = core
                    .job(id)
                    .filter(|j| j.state == JobState::Queued && j.kind().index() == k)
                    .ok_or_else(|| bad("a job set aside is not a queued job of its kind"))?;
                let (priority, cpus) = (job.priority, job.spec.cpus);
                let user = core.user_key(&job.user).expect("interned above");
                if queue.aside_cpus(id).is_some() {
                    return Err(bad("a job is set aside twice"));
                }
                queue.put_aside(priority, user, id, cpus);
            }
            core.set_queue(Kind::ALL[k], queue);
        }
        if snapshot.queues.len() != 2
            || snapshot.aside.len() > 2
            || waiting.iter().any(|w| !w.is_empty())
        {
            return Err(bad("queues do not match the queued jobs"));
        }
        for record in snapshot.idempotency {
            core.remember_idempotency(
                record.user,
                record.key,
                record.job,
                record.expires,
                record.digest,
            );
        }
        core.rearm_all();
        Ok(core)
    }
}
