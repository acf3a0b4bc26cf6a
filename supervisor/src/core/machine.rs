//! `Core`: the scheduler's whole state and every rule that changes it.
//!
//! One owner, no `await`: nothing can change between two lines of this file.
//! Each `handle(now, input)` first fires the timers due by `now`, then applies
//! the input, then schedules, and returns the effects in the order the shell
//! must honour: every `Persist` of the step first (one transaction), then the
//! messages, closes, replies and events that depend on them.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

use super::agents::{Agent, Agents, Link};
use super::config::CoreConfig;
use super::io::{
    AgentMsg, AttemptReport, CancelError, CloseReason, Effect, Event, EventKind, FinishedReport,
    GoneReason, Input, JobAt, KillReason, Reply, Requester, ToAgent,
};
use super::job::{Attempt, Job, Outcome, Phase, StopReason, Transition};
use super::queue::FairQueue;
use super::spec::{self, SubmitError, SubmitSpec};
use super::timers::{TimerKey, Timers};
use super::types::{AgentId, ConnId, JobId, JobState, Kind, Millis, RequestId, UserKey};

/// Live jobs by id. Looked up many times per step and never iterated where
/// order matters, so a hash map; with std's fixed-key SipHash its order is a
/// function of the inputs alone, so the core stays deterministic.
#[allow(clippy::disallowed_types)]
pub(super) type JobTable = std::collections::HashMap<
    JobId,
    Live,
    std::hash::BuildHasherDefault<std::collections::hash_map::DefaultHasher>,
>;

/// A live job: its record (copy-on-write: a persisted version is shared with
/// the shell until it commits, so persisting costs a reference count) and the
/// scheduler's key for its user.
#[derive(Clone, Debug)]
pub(super) struct Live {
    pub job: Arc<Job>,
    pub user_key: UserKey,
}

impl std::ops::Deref for Live {
    type Target = Job;
    fn deref(&self) -> &Job {
        &self.job
    }
}

/// Why an attempt stopped holding its resources.
enum Release {
    /// The agent reported the process over.
    Finished(FinishedReport),
    /// The attempt is given up without a report (agent lost, forgotten, or it
    /// never acknowledged the dispatch).
    Abandoned(String),
}

pub struct Core {
    config: CoreConfig,
    now: Millis,
    /// Live jobs: not terminal, or terminal with an attempt still being stopped.
    jobs: JobTable,
    queues: [FairQueue; 2],
    pool_used: [u32; 2],
    /// Users by name; a user's key is its index in `user_names` and `held`.
    users: BTreeMap<Arc<str>, UserKey>,
    user_names: Vec<Arc<str>>,
    /// Attempts each user holds, by kind.
    held: Vec<[u32; 2]>,
    /// Jobs each user has waiting in the queue, both kinds.
    waiting: Vec<u32>,
    agents: Agents,
    timers: Timers,
    idempotency: Idempotency,
    idempotency_expiry: VecDeque<(Millis, Arc<str>, String)>,
    next_job: u64,
    /// Jobs whose record changed in this step, each once.
    dirty: Vec<JobId>,
    out: Vec<Effect>,
    effects: Vec<Effect>,
    /// Shared by every new job's first transition.
    submitted_reason: Arc<str>,
    /// Where reasons are formatted before they become one shared `Arc<str>`.
    scratch: String,
    finished_reason: Arc<str>,
}

impl Core {
    pub fn new(config: CoreConfig) -> Core {
        Core {
            config,
            now: Millis(0),
            jobs: JobTable::default(),
            queues: [FairQueue::default(), FairQueue::default()],
            pool_used: [0, 0],
            users: BTreeMap::new(),
            user_names: Vec::new(),
            held: Vec::new(),
            waiting: Vec::new(),
            agents: Agents::default(),
            timers: Timers::default(),
            idempotency: BTreeMap::new(),
            idempotency_expiry: VecDeque::new(),
            next_job: 1,
            dirty: Vec::new(),
            out: Vec::new(),
            effects: Vec::new(),
            submitted_reason: Arc::from("submitted"),
            scratch: String::new(),
            finished_reason: Arc::from("the agent reported the attempt over"),
        }
    }

    pub fn config(&self) -> &CoreConfig {
        &self.config
    }

    pub fn now(&self) -> Millis {
        self.now
    }

    /// A live job (terminal jobs leave the core once persisted; the store keeps them).
    pub fn job(&self, id: JobId) -> Option<&Job> {
        self.jobs.get(&id).map(|j| &*j.job)
    }

    /// Every live job, in no particular order (sort by id to list them).
    pub fn jobs(&self) -> impl Iterator<Item = &Job> {
        self.jobs.values().map(|j| &*j.job)
    }

    pub fn agents(&self) -> impl Iterator<Item = &Agent> {
        self.agents.iter()
    }

    pub fn agent(&self, id: &AgentId) -> Option<&Agent> {
        self.agents.get(id)
    }

    pub fn queued(&self, kind: Kind) -> usize {
        self.queues[kind.index()].len()
    }

    pub fn pool_used(&self, kind: Kind) -> u32 {
        self.pool_used[kind.index()]
    }

    pub fn next_job_id(&self) -> u64 {
        self.next_job
    }

    /// The earliest instant at which the core has something to do by itself.
    pub fn next_deadline(&self) -> Option<Millis> {
        self.timers.next()
    }

    /// The job's place in its queue, 1 being next.
    pub fn queue_position(&self, id: JobId) -> Option<usize> {
        let job = self.jobs.get(&id)?;
        if job.state != JobState::Queued {
            return None;
        }
        self.queues[job.kind().index()].position(job.priority, job.user_key, id)
    }

    /// What the job is doing or waiting for, in words a user understands.
    pub fn situation(&self, id: JobId) -> Option<String> {
        let job = self.jobs.get(&id)?;
        let agent_link = |agent: &AgentId| {
            self.agents.get(agent).map_or("gone", |a| match a.link {
                Link::Connected { .. } => "connected",
                Link::Disconnected { .. } => "disconnected",
            })
        };
        let text = match (job.state, job.held()) {
            (JobState::Queued, _) => {
                let position = self.queue_position(id).unwrap_or(0);
                let limits = self
                    .config
                    .plans
                    .get(&*job.plan)
                    .map(|p| p.limits(job.kind()));
                let queue = &self.queues[job.kind().index()];
                if let Some(cpus) = queue.aside_cpus(id) {
                    let largest = self.agents.largest().unwrap_or(0);
                    format!(
                        "needs {cpus} CPUs; the largest connected agent has {largest}: waiting out of line for one that fits"
                    )
                } else if queue.is_parked(job.priority, job.user_key) {
                    let cap = limits.map_or(0, |l| l.max_running);
                    format!(
                        "waiting for one of your running {} jobs to end (plan {} allows {cap}), position {position}",
                        job.kind(),
                        job.plan
                    )
                } else {
                    format!("waiting for a {} CPU slot, position {position}", job.kind())
                }
            }
            (_, Some(attempt)) if agent_link(&attempt.agent) != "connected" => format!(
                "waiting for agent {} to reconnect (attempt {})",
                attempt.agent, attempt.number
            ),
            (JobState::Dispatched, Some(a)) if matches!(a.phase, Phase::Stopping { .. }) => {
                format!(
                    "agent {} did not start attempt {}; stopping it",
                    a.agent, a.number
                )
            }
            (JobState::Dispatched, Some(a)) => format!("starting on agent {}", a.agent),
            (JobState::Running, Some(a)) => format!("running on agent {}", a.agent),
            (JobState::Canceling, Some(a)) => format!("canceling on agent {}", a.agent),
            (state, Some(a)) => format!(
                "{state}; stopping attempt {} on agent {}",
                a.number, a.agent
            ),
            (state, None) => format!("{state}: {}", job.reason),
        };
        Some(text)
    }

    /// Applies one input at `now` (never earlier than the last `now`).
    pub fn handle(&mut self, now: Millis, input: Input) -> std::vec::Drain<'_, Effect> {
        self.now = self.now.max(now);
        self.fire_timers();
        self.expire_idempotency();
        match input {
            Input::Tick => {}
            Input::Submit {
                request,
                user,
                plan,
                spec,
            } => self.submit(request, user, plan, spec),
            Input::Cancel { request, by, job } => self.cancel(request, &by, job),
            Input::AgentConnected {
                conn,
                agent,
                cpus,
                labels,
                attempts,
            } => self.agent_connected(conn, agent, cpus, labels, attempts),
            Input::AgentMessage { conn, agent, msg } => self.agent_message(conn, &agent, msg),
            Input::AgentGone {
                conn,
                agent,
                reason,
            } => {
                if self.agents.get(&agent).and_then(Agent::conn) == Some(conn) {
                    self.disconnect(&agent, reason);
                }
            }
        }
        self.schedule();
        self.answer_where_jobs_stand();
        self.flush()
    }

    /// Fills in the job of every submit answered in this step as the step
    /// leaves it.
    fn answer_where_jobs_stand(&mut self) {
        for i in 0..self.out.len() {
            if let Effect::Reply {
                reply: Reply::Submitted { job, at, .. },
                ..
            } = &self.out[i]
            {
                if at.is_some() {
                    continue;
                }
                let id = *job;
                let Some(live) = self.jobs.get(&id) else {
                    continue;
                };
                let job_at = JobAt {
                    record: live.job.clone(),
                    situation: self.situation(id),
                    queue_position: self.queue_position(id),
                };
                if let Effect::Reply {
                    reply: Reply::Submitted { at, .. },
                    ..
                } = &mut self.out[i]
                {
                    *at = Some(Box::new(job_at));
                }
            }
        }
    }

    // ---- submit and cancel -------------------------------------------------

    fn submit(
        &mut self,
        request: RequestId,
        user: Arc<str>,
        plan_name: Arc<str>,
        spec: SubmitSpec,
    ) {
        match self.admit(user, plan_name, spec) {
            Ok((job, existing)) => {
                self.out.push(Effect::Reply {
                    request,
                    reply: Reply::Submitted {
                        job,
                        existing,
                        at: None,
                    },
                });
            }
            Err(error) => {
                self.event(None, None, None, EventKind::Rejected, error.to_string());
                self.out.push(Effect::Reply {
                    request,
                    reply: Reply::Rejected { error },
                });
            }
        }
    }

    fn admit(
        &mut self,
        user: Arc<str>,
        plan_name: Arc<str>,
        submitted: SubmitSpec,
    ) -> Result<(JobId, bool), SubmitError> {
        if user.is_empty() || user.len() > 128 || user.chars().any(char::is_control) {
            return Err(SubmitError::BadUser);
        }
        let plan = self
            .config
            .plans
            .get(&*plan_name)
            .ok_or_else(|| SubmitError::UnknownPlan {
                plan: spec::truncated(&plan_name, 64),
            })?;
        let priority = plan.priority;
        let mut job_spec = spec::validate(&self.config, &plan_name, plan, submitted)?;
        // The request's digest, before anything the configuration adds.
        let digest = job_spec.idempotency_key.as_ref().map(|_| job_spec.digest());
        job_spec.run_as = self
            .config
            .run_as
            .get(&*user)
            .or_else(|| self.config.run_as.get("*"))
            .cloned();
        if let Some(key) = &job_spec.idempotency_key {
            if let Some((job, _, first)) = self.idempotency.get(&(user.clone(), key.clone())) {
                if first.is_some_and(|first| Some(first) != digest) {
                    return Err(SubmitError::IdempotencyConflict {
                        key: spec::truncated(key, 64),
                        job: *job,
                    });
                }
                return Ok((*job, true));
            }
        }
        let waiting = self.user_key(&user).map_or(0, |k| self.waiting[k.index()]);
        if waiting >= plan.max_queued {
            return Err(SubmitError::TooManyQueued {
                queued: waiting,
                max: plan.max_queued,
                plan: plan_name.to_string(),
            });
        }
        let id = JobId(self.next_job);
        self.next_job += 1;
        if let Some(key) = &job_spec.idempotency_key {
            self.remember_key(user.clone(), key.clone(), id, self.now, digest);
        }
        let job = Job {
            id,
            user: user.clone(),
            plan: plan_name,
            priority,
            spec: Arc::new(job_spec),
            state: JobState::Queued,
            submitted_at: self.now,
            finished_at: None,
            attempts: Vec::new(),
            history: {
                // Room for a whole first attempt's transitions without regrowing.
                let mut history = Vec::with_capacity(4);
                history.push(Transition {
                    at: self.now,
                    state: JobState::Queued,
                    reason: self.submitted_reason.clone(),
                });
                history
            },
            exit_code: None,
            output_tail: String::new(),
            reason: self.submitted_reason.clone(),
        };
        let kind = job.kind();
        let key = self.intern(&user);
        self.queues[kind.index()].push(priority, key, id);
        self.waiting[key.index()] += 1;
        self.jobs.insert(
            id,
            Live {
                job: Arc::new(job),
                user_key: key,
            },
        );
        self.rearm(id);
        // A step touches a handful of jobs: a scan beats a set.
        if !self.dirty.contains(&id) {
            self.dirty.push(id);
        }
        self.event(
            Some(id),
            None,
            None,
            EventKind::Submitted,
            format!("{kind} job for {user}"),
        );
        Ok((id, false))
    }

    fn remember_key(
        &mut self,
        user: Arc<str>,
        key: String,
        job: JobId,
        submitted_at: Millis,
        digest: Option<u64>,
    ) {
        let expires = submitted_at.plus_secs(self.config.idempotency_window_secs);
        if expires <= self.now {
            return;
        }
        let map_key = (user.clone(), key.clone());
        if self
            .idempotency
            .get(&map_key)
            .is_some_and(|(first, _, _)| *first < job)
        {
            return; // the key names the first job that used it
        }
        self.idempotency.insert(map_key, (job, expires, digest));
        self.idempotency_expiry.push_back((expires, user, key));
    }

    fn expire_idempotency(&mut self) {
        while let Some((expires, _, _)) = self.idempotency_expiry.front() {
            if *expires > self.now {
                break;
            }
            let (expires, user, key) = self.idempotency_expiry.pop_front().expect("front exists");
            let map_key = (user, key);
            if self
                .idempotency
                .get(&map_key)
                .is_some_and(|(_, e, _)| *e == expires)
            {
                self.idempotency.remove(&map_key);
            }
        }
    }

    fn cancel(&mut self, request: RequestId, by: &Requester, id: JobId) {
        let visible = self
            .jobs
            .get(&id)
            .is_some_and(|job| by.admin || job.user == by.user);
        if !visible {
            self.out.push(Effect::Reply {
                request,
                reply: Reply::CancelRejected {
                    job: id,
                    error: CancelError::NotFound,
                },
            });
            return;
        }
        let job = &self.jobs[&id];
        let who = if by.admin && job.user != by.user {
            format!("canceled by admin {}", by.user)
        } else {
            "canceled by its owner".to_string()
        };
        match (job.state, job.held().map(|a| a.phase)) {
            (JobState::Queued, _) => {
                let (kind, priority, user) = (job.kind(), job.priority, job.user_key);
                let removed = self.queues[kind.index()].remove(priority, user, id);
                assert!(removed, "queued job {id} missing from its queue");
                self.set_state(id, JobState::Canceled, format!("{who} while queued"));
            }
            (JobState::Dispatched | JobState::Running, Some(phase)) => {
                self.set_state(id, JobState::Canceling, who);
                if phase == Phase::Active {
                    self.stop_attempt(id, StopReason::Cancel);
                }
            }
            // Canceling already, or terminal and still stopping: nothing more to do.
            _ => {}
        }
        let state = self.jobs.get(&id).map_or(JobState::Canceled, |j| j.state);
        self.event(
            Some(id),
            None,
            None,
            EventKind::CancelRequested,
            format!("now {state}"),
        );
        self.out.push(Effect::Reply {
            request,
            reply: Reply::Cancel { job: id, state },
        });
    }

    // ---- scheduling --------------------------------------------------------

    /// Grants queued jobs while the head of each kind's queue fits: a CPU pool
    /// share, the user's plan cap and CPUs on one agent, all or nothing.
    ///
    /// The head that does not fit blocks its kind (no backfill), so a large
    /// job is never starved by a stream of small ones: it holds its place
    /// until CPUs free up. One exception: a head larger than every connected
    /// agent could wait forever, so it steps aside and the jobs behind it go
    /// on; when an agent it fits connects it goes back to its place among
    /// its user's jobs, and blocks again until it fits.
    fn schedule(&mut self) {
        let largest = self.agents.largest();
        for kind in Kind::ALL {
            if let Some(largest) = largest {
                self.queues[kind.index()].bring_back(largest);
            }
            while let Some(head) = self.queues[kind.index()].head() {
                let job = &self.jobs[&head.job];
                let cpus = job.spec.cpus;
                let cap = self
                    .config
                    .plans
                    .get(&*job.plan)
                    .map_or(0, |p| p.limits(kind).max_running);
                let held = self.held[head.user.index()][kind.index()];
                if held >= cap {
                    self.queues[kind.index()].park_head(&head);
                    continue;
                }
                if let Some(largest) = largest.filter(|largest| cpus > *largest) {
                    self.queues[kind.index()].set_aside(&head, cpus);
                    let reason = format!(
                        "needs {cpus} CPUs; the largest connected agent has {largest}: jobs behind it go first"
                    );
                    self.event(Some(head.job), None, None, EventKind::SetAside, reason);
                    continue;
                }
                let pool_free = self
                    .config
                    .pool_cpus(kind)
                    .saturating_sub(self.pool_used[kind.index()]);
                if pool_free < cpus {
                    break;
                }
                let Some(agent) = self.agents.best_fit(cpus).cloned() else {
                    break;
                };
                let id = self.queues[kind.index()].pop_head(&head);
                self.dispatch(id, agent);
            }
        }
    }

    fn dispatch(&mut self, id: JobId, agent_id: AgentId) {
        let job = Arc::make_mut(&mut self.jobs.get_mut(&id).expect("dispatched job exists").job);
        let number = job.next_attempt_number();
        let cpus = job.spec.cpus;
        let kind = job.kind();
        job.attempts.push(Attempt {
            number,
            agent: agent_id.clone(),
            cpus,
            dispatched_at: self.now,
            started_at: None,
            ended_at: None,
            phase: Phase::Active,
            outcome: None,
            run_ms: None,
        });
        let spec = job.spec.clone();
        let user = self.jobs[&id].user_key;
        self.hold(&agent_id, id, user, kind, cpus);
        let conn = self
            .agents
            .get(&agent_id)
            .and_then(Agent::conn)
            .expect("dispatch to a connected agent");
        let reason = self.text(format_args!("attempt {number} on agent {agent_id}"));
        self.set_state(id, JobState::Dispatched, reason);
        self.out.push(Effect::Send {
            agent: agent_id.clone(),
            conn,
            msg: ToAgent::Run {
                job: id,
                attempt: number,
                spec,
            },
        });
    }

    fn hold(&mut self, agent: &AgentId, id: JobId, user: UserKey, kind: Kind, cpus: u32) {
        self.agents
            .update(agent, |a| {
                a.used_cpus += cpus;
                a.jobs.insert(id);
            })
            .expect("hold on a known agent");
        self.pool_used[kind.index()] += cpus;
        self.held[user.index()][kind.index()] += 1;
    }

    /// Ends the held attempt of `id` and gives back everything it held, then
    /// decides what becomes of the job.
    fn release(&mut self, id: JobId, why: Release) {
        let now = self.now;
        let live = self.jobs.get_mut(&id).expect("released job exists");
        let user = live.user_key;
        let job = Arc::make_mut(&mut live.job);
        let kind = job.kind();
        let attempt = job.held_mut().expect("released job holds an attempt");
        let stop = match attempt.phase {
            Phase::Stopping { reason, .. } => Some(reason),
            _ => None,
        };
        attempt.phase = Phase::Ended;
        attempt.ended_at = Some(now);
        let (agent, cpus, number) = (attempt.agent.clone(), attempt.cpus, attempt.number);
        if let Release::Finished(report) = &why {
            attempt.outcome = Some(report.outcome.clone());
            attempt.run_ms = Some(report.run_ms);
            if let Outcome::Exited { code } = report.outcome {
                job.exit_code = Some(code);
            }
            job.output_tail = spec::tail(&report.output_tail, self.config.output_tail_bytes_max);
        }
        let reason: Arc<str> = match (&why, stop) {
            (Release::Abandoned(reason), _) => Arc::from(reason.as_str()),
            (Release::Finished(report), Some(stop)) => self.text(format_args!(
                "{}: {}",
                stop.as_str(),
                Described(&report.outcome)
            )),
            (Release::Finished(report), _) if report.outcome == Outcome::Fenced => {
                self.text(format_args!(
                    "agent {agent} lost contact with the supervisor: attempt {number} {}",
                    Described(&report.outcome)
                ))
            }
            (Release::Finished(report), None) => {
                self.text(format_args!("{}", Described(&report.outcome)))
            }
        };
        let job = &self.jobs[&id];
        let state = job.state;
        let attempts_left = job.attempts_left();
        self.agents
            .update(&agent, |a| {
                a.used_cpus -= cpus;
                a.jobs.remove(&id);
            })
            .expect("release on a known agent");
        self.pool_used[kind.index()] -= cpus;
        let held = &mut self.held[user.index()][kind.index()];
        *held = held.checked_sub(1).expect("user holds what it releases");
        self.queues[kind.index()].unpark(user);
        self.event(
            Some(id),
            Some(number),
            Some(agent),
            EventKind::AttemptReleased,
            reason.clone(),
        );
        match (state, why) {
            (JobState::Canceling, _) => {
                let reason = self.text(format_args!("canceled ({reason})"));
                self.set_state(id, JobState::Canceled, reason)
            }
            (state, _) if state.is_terminal() => self.touch(id),
            // A process that ran to its end counts, even if its start was
            // acknowledged too late; only a killed one never really ran. One
            // its agent killed at the fence was lost to lost contact, not
            // ended by the job: it is run again, or lost.
            (_, Release::Finished(report))
                if !(stop == Some(StopReason::DispatchTimeout)
                    && report.outcome == Outcome::Killed)
                    && report.outcome != Outcome::Fenced =>
            {
                match report.outcome {
                    Outcome::Exited { code: 0 } => self.set_state(id, JobState::Succeeded, reason),
                    _ => self.set_state(id, JobState::Failed, reason),
                }
            }
            _ if attempts_left => self.requeue(id, reason),
            _ => self.set_state(id, JobState::Lost, reason),
        }
    }

    fn requeue(&mut self, id: JobId, reason: Arc<str>) {
        let job = &self.jobs[&id];
        let (kind, priority, user) = (job.kind(), job.priority, job.user_key);
        self.queues[kind.index()].push(priority, user, id);
        let reason = self.text(format_args!("requeued: {reason}"));
        self.set_state(id, JobState::Queued, reason);
    }

    /// Asks the agent to kill the held attempt. The attempt keeps its CPUs
    /// until the agent confirms, or its grace period ends; an agent that is
    /// away now is told when it comes back.
    fn stop_attempt(&mut self, id: JobId, reason: StopReason) {
        let now = self.now;
        let job = Arc::make_mut(&mut self.jobs.get_mut(&id).expect("stopped job exists").job);
        let attempt = job.held_mut().expect("stopped job holds an attempt");
        attempt.phase = Phase::Stopping { reason, since: now };
        let (agent, number) = (attempt.agent.clone(), attempt.number);
        let text = match self.agents.get(&agent).and_then(Agent::conn) {
            Some(conn) => {
                self.out.push(Effect::Send {
                    agent: agent.clone(),
                    conn,
                    msg: ToAgent::Kill {
                        job: id,
                        attempt: number,
                        reason: KillReason::Stop(reason),
                    },
                });
                reason.as_str().to_string()
            }
            None => format!(
                "{}; agent not connected, told when it returns",
                reason.as_str()
            ),
        };
        self.event(
            Some(id),
            Some(number),
            Some(agent),
            EventKind::StopRequested,
            text,
        );
        self.touch(id);
    }

    // ---- timers ------------------------------------------------------------

    fn fire_timers(&mut self) {
        while let Some((_, key)) = self.timers.pop_due(self.now) {
            match key {
                TimerKey::Job(id) => self.job_deadline(id),
                TimerKey::Agent(agent) => self.agent_grace_over(&agent),
            }
        }
    }

    fn job_deadline(&mut self, id: JobId) {
        let job = &self.jobs[&id];
        match (job.state, job.held().map(|a| (a.phase, a.started_at))) {
            (JobState::Queued, _) => {
                let (kind, priority, user) = (job.kind(), job.priority, job.user_key);
                let secs = job.spec.queue_timeout_secs.unwrap_or(0);
                self.queues[kind.index()].remove(priority, user, id);
                self.set_state(
                    id,
                    JobState::TimedOut,
                    format!("waited in the queue more than {secs} s"),
                );
            }
            (_, Some((Phase::Active, None))) => {
                debug_assert!(
                    self.holder_connected(job),
                    "dispatch timer armed while the agent is away"
                );
                self.stop_attempt(id, StopReason::DispatchTimeout)
            }
            (_, Some((Phase::Active, Some(_)))) => {
                let secs = job.spec.max_run_secs;
                self.set_state(
                    id,
                    JobState::TimedOut,
                    format!("ran more than max_run_secs={secs}"),
                );
                self.stop_attempt(id, StopReason::RunTimeout);
            }
            (_, Some((Phase::Stopping { .. }, _))) => {
                let agent = job.held().expect("stopping attempt").agent.clone();
                match self.agents.get(&agent).and_then(Agent::conn) {
                    Some(conn) => {
                        self.out.push(Effect::Close {
                            agent: agent.clone(),
                            conn,
                            reason: CloseReason::Unresponsive,
                        });
                        self.event(
                            Some(id),
                            None,
                            Some(agent.clone()),
                            EventKind::AgentClosed,
                            "kill not confirmed within stop_timeout_ms".to_string(),
                        );
                        self.disconnect(&agent, GoneReason::Unresponsive);
                    }
                    None => {
                        unreachable!("stop timer of job {id} armed while agent {agent} is away")
                    }
                }
            }
            (state, held) => unreachable!("job {id} in {state} with {held:?} had a deadline"),
        }
    }

    fn agent_grace_over(&mut self, agent_id: &AgentId) {
        let agent = self
            .agents
            .get(agent_id)
            .expect("agent timer for a known agent");
        let Link::Disconnected { reason, .. } = agent.link else {
            unreachable!("grace timer of connected agent {agent_id}");
        };
        let jobs: Vec<JobId> = agent.jobs.iter().copied().collect();
        let why = format!("agent {agent_id} lost: {}", reason.as_str());
        self.event(
            None,
            None,
            Some(agent_id.clone()),
            EventKind::AgentLost,
            why.clone(),
        );
        for id in jobs {
            self.release(id, Release::Abandoned(why.clone()));
        }
        self.agents.remove(agent_id);
    }

    fn rearm(&mut self, id: JobId) {
        let at = self
            .jobs
            .get(&id)
            .and_then(|j| j.deadline(&self.config, self.holder_connected(j)));
        self.timers.set(TimerKey::Job(id), at);
    }

    // ---- agents ------------------------------------------------------------

    fn agent_connected(
        &mut self,
        conn: ConnId,
        agent_id: AgentId,
        cpus: u32,
        labels: BTreeMap<String, String>,
        reports: Vec<AttemptReport>,
    ) {
        let refusal = if !AgentId::is_valid(agent_id.as_str(), self.config.agent_id_bytes_max) {
            Some(format!(
                "agent id must be 1 to {} bytes of letters, digits and . _ - : @",
                self.config.agent_id_bytes_max
            ))
        } else if cpus == 0 || cpus > self.config.agent_cpus_max {
            Some(format!(
                "cpus must be between 1 and {}; got {cpus}",
                self.config.agent_cpus_max
            ))
        } else if labels.len() > self.config.submit.labels_max
            || labels
                .iter()
                .any(|(k, v)| k.len() + v.len() > self.config.submit.label_bytes_max)
        {
            Some("too many or too large labels".to_string())
        } else if self.agents.get(&agent_id).is_none()
            && self.agents.len() >= self.config.agents_max
        {
            Some(format!("agents_max={} reached", self.config.agents_max))
        } else {
            None
        };
        if let Some(why) = refusal {
            self.event(
                None,
                None,
                Some(agent_id.clone()),
                EventKind::AgentRefused,
                why,
            );
            self.out.push(Effect::Close {
                agent: agent_id,
                conn,
                reason: CloseReason::Refused,
            });
            return;
        }
        if self.agents.get(&agent_id).and_then(Agent::conn) == Some(conn) {
            self.event(
                None,
                None,
                Some(agent_id),
                EventKind::AgentRefused,
                "a second hello on one connection is ignored",
            );
            return;
        }
        let now = self.now;
        let previous = self.agents.update(&agent_id, |a| {
            let old = a.link;
            forget_dying(a);
            a.link = Link::Connected { conn, since: now };
            a.cpus = cpus;
            a.labels = labels.clone();
            old
        });
        match previous {
            None => self.agents.insert(Agent {
                id: agent_id.clone(),
                link: Link::Connected { conn, since: now },
                cpus,
                labels,
                used_cpus: 0,
                jobs: BTreeSet::new(),
                dying: BTreeMap::new(),
            }),
            Some(Link::Connected { conn: old, .. }) => {
                self.out.push(Effect::Close {
                    agent: agent_id.clone(),
                    conn: old,
                    reason: CloseReason::Replaced,
                });
                self.event(
                    None,
                    None,
                    Some(agent_id.clone()),
                    EventKind::AgentReplaced,
                    "a new connection with the same id took over".to_string(),
                );
            }
            Some(Link::Disconnected { .. }) => {}
        }
        self.timers.set(TimerKey::Agent(agent_id.clone()), None);
        self.event(
            None,
            None,
            Some(agent_id.clone()),
            EventKind::AgentConnected,
            format!("{cpus} cpus, reports {} attempts", reports.len()),
        );
        self.reconcile(conn, &agent_id, reports);
    }

    /// Brings the core's view of what runs on `agent_id` in line with what
    /// the agent says: kept, finished, forgotten, or not ours to run.
    fn reconcile(&mut self, conn: ConnId, agent_id: &AgentId, reports: Vec<AttemptReport>) {
        let mut reported: BTreeMap<(JobId, u32), AttemptReport> = BTreeMap::new();
        for report in reports {
            reported.insert((report.job, report.attempt), report);
        }
        let held: Vec<JobId> = self
            .agents
            .get(agent_id)
            .map(|a| a.jobs.iter().copied().collect())
            .unwrap_or_default();
        for id in held {
            let attempt = self.jobs[&id].held().expect("agent lists a held job");
            let (number, phase, started) =
                (attempt.number, attempt.phase, attempt.started_at.is_some());
            match reported.remove(&(id, number)) {
                Some(report) => match report.finished {
                    Some(finished) => self.finished(conn, agent_id, id, number, finished),
                    None => match phase {
                        Phase::Active => self.started(agent_id, id, number),
                        // Still running what it was told to stop: tell it again,
                        // and count the stop timeout from now.
                        Phase::Stopping { reason, .. } => self.stop_attempt(id, reason),
                        Phase::Ended => unreachable!("held attempt ended"),
                    },
                },
                // Never started, and the agent does not have it: the run never
                // reached it (a supervisor that died between committing the
                // dispatch and sending it, say). Send the same attempt again.
                None if phase == Phase::Active && !started => {
                    self.redeliver(conn, agent_id, id, number)
                }
                None => {
                    self.release(
                        id,
                        Release::Abandoned(format!(
                            "agent {agent_id} came back without attempt {number}"
                        )),
                    );
                }
            }
        }
        for ((id, _), report) in reported {
            self.stale(
                conn,
                agent_id,
                id,
                report.attempt,
                report.finished.is_some(),
                "not an attempt this supervisor owns",
            );
        }
    }

    /// Sends a dispatched attempt again, under the same number (the agent
    /// ignores a run it already has), and restarts its acknowledgement timer.
    fn redeliver(&mut self, conn: ConnId, agent: &AgentId, id: JobId, number: u32) {
        let now = self.now;
        let job = Arc::make_mut(&mut self.jobs.get_mut(&id).expect("redelivered job exists").job);
        let attempt = job.held_mut().expect("redelivered attempt");
        attempt.dispatched_at = now;
        let spec = job.spec.clone();
        self.out.push(Effect::Send {
            agent: agent.clone(),
            conn,
            msg: ToAgent::Run {
                job: id,
                attempt: number,
                spec,
            },
        });
        self.event(
            Some(id),
            Some(number),
            Some(agent.clone()),
            EventKind::Dispatched,
            "sent again: the agent never received it",
        );
        self.touch(id);
    }

    /// A report about an attempt the core does not own: finished ones are
    /// acknowledged (so the agent's outbox drains), running ones are killed.
    fn stale(
        &mut self,
        conn: ConnId,
        agent: &AgentId,
        id: JobId,
        attempt: u32,
        finished: bool,
        why: &str,
    ) {
        self.event(
            Some(id),
            Some(attempt),
            Some(agent.clone()),
            EventKind::StaleReport,
            why.to_string(),
        );
        // A process told to die keeps its CPUs until it has: they are not
        // free for another job while it may still be dying.
        let cpus = self.jobs.get(&id).map(|j| j.job.spec.cpus);
        self.agents.update(agent, |a| {
            if finished {
                if let Some(held) = a.dying.remove(&(id, attempt)) {
                    a.used_cpus -= held;
                }
            } else if !a.dying.contains_key(&(id, attempt)) {
                // A job the core no longer keeps: its size is unknown, so
                // the whole agent waits.
                let held = cpus.unwrap_or(a.cpus).max(1);
                a.dying.insert((id, attempt), held);
                a.used_cpus += held;
            }
        });
        let msg = if finished {
            ToAgent::Ack { job: id, attempt }
        } else {
            ToAgent::Kill {
                job: id,
                attempt,
                reason: KillReason::NotOwned,
            }
        };
        self.out.push(Effect::Send {
            agent: agent.clone(),
            conn,
            msg,
        });
    }

    fn agent_message(&mut self, conn: ConnId, agent_id: &AgentId, msg: AgentMsg) {
        if self.agents.get(agent_id).and_then(Agent::conn) != Some(conn) {
            // A message from a replaced or closed connection: its news comes
            // again in the hello of the connection that replaced it.
            return;
        }
        match msg {
            AgentMsg::Started { job, attempt } => {
                if self.owns(agent_id, job, attempt) {
                    self.started(agent_id, job, attempt);
                } else {
                    self.stale(
                        conn,
                        agent_id,
                        job,
                        attempt,
                        false,
                        "started: not an attempt this supervisor owns",
                    );
                }
            }
            AgentMsg::Finished {
                job,
                attempt,
                outcome,
                output_tail,
                run_ms,
            } => {
                let report = FinishedReport {
                    outcome,
                    output_tail,
                    run_ms,
                };
                if self.owns(agent_id, job, attempt) {
                    self.finished(conn, agent_id, job, attempt, report);
                } else {
                    self.stale(
                        conn,
                        agent_id,
                        job,
                        attempt,
                        true,
                        "finished: not an attempt this supervisor owns",
                    );
                }
            }
        }
    }

    fn owns(&self, agent: &AgentId, id: JobId, number: u32) -> bool {
        self.jobs
            .get(&id)
            .and_then(|j| j.held())
            .is_some_and(|a| a.number == number && &a.agent == agent)
    }

    fn started(&mut self, agent: &AgentId, id: JobId, number: u32) {
        let now = self.now;
        let job = Arc::make_mut(&mut self.jobs.get_mut(&id).expect("owned job").job);
        let attempt = job.held_mut().expect("owned attempt");
        if attempt.phase != Phase::Active || attempt.started_at.is_some() {
            return;
        }
        attempt.started_at = Some(now);
        let reason = self.text(format_args!("attempt {number} started on agent {agent}"));
        self.set_state(id, JobState::Running, reason);
    }

    fn finished(
        &mut self,
        conn: ConnId,
        agent: &AgentId,
        id: JobId,
        number: u32,
        report: FinishedReport,
    ) {
        self.event(
            Some(id),
            Some(number),
            Some(agent.clone()),
            EventKind::Finished,
            Arc::clone(&self.finished_reason),
        );
        self.release(id, Release::Finished(report));
        self.out.push(Effect::Send {
            agent: agent.clone(),
            conn,
            msg: ToAgent::Ack {
                job: id,
                attempt: number,
            },
        });
    }

    /// The agent's connection is gone: its capacity leaves the pool, and its
    /// attempts (running or being stopped) wait out the grace period, with
    /// their CPUs still held, for it to come back and say how they are.
    fn disconnect(&mut self, agent_id: &AgentId, reason: GoneReason) {
        let now = self.now;
        let jobs = self
            .agents
            .update(agent_id, |a| {
                forget_dying(a);
                a.link = Link::Disconnected { since: now, reason };
                a.jobs.iter().copied().collect::<Vec<_>>()
            })
            .expect("disconnect of a known agent");
        self.timers.set(
            TimerKey::Agent(agent_id.clone()),
            Some(now.plus_ms(self.config.agent_grace_ms)),
        );
        self.event(
            None,
            None,
            Some(agent_id.clone()),
            EventKind::AgentDisconnected,
            reason.as_str().to_string(),
        );
        for id in jobs {
            self.rearm(id);
        }
    }

    // ---- bookkeeping -------------------------------------------------------

    fn set_state(&mut self, id: JobId, state: JobState, reason: impl Into<Arc<str>>) {
        let now = self.now;
        let mut reason: Arc<str> = reason.into();
        if reason.len() > self.config.reason_bytes_max {
            reason = Arc::from(spec::truncated(&reason, self.config.reason_bytes_max));
        }
        let live = self.jobs.get_mut(&id).expect("job exists");
        let user = live.user_key.index();
        let job = Arc::make_mut(&mut live.job);
        assert!(
            !job.state.is_terminal(),
            "job {id}: terminal state {} cannot become {state}",
            job.state
        );
        match (job.state == JobState::Queued, state == JobState::Queued) {
            (true, false) => self.waiting[user] -= 1,
            (false, true) => self.waiting[user] += 1,
            _ => {}
        }
        job.state = state;
        job.reason = reason.clone();
        job.history.push(Transition {
            at: now,
            state,
            reason: reason.clone(),
        });
        if state.is_terminal() {
            job.finished_at = Some(now);
        }
        let attempt = job.attempts.last().map(|a| a.number);
        let agent = job.attempts.last().map(|a| a.agent.clone());
        let kind = match state {
            JobState::Queued => EventKind::Requeued,
            JobState::Dispatched => EventKind::Dispatched,
            JobState::Running => EventKind::Started,
            JobState::Canceling => EventKind::CancelRequested,
            _ => EventKind::Ended,
        };
        self.event(Some(id), attempt, agent, kind, reason);
        self.touch(id);
    }

    /// The user's key, assigned on first sight. Users are accounts, so the
    /// table is as large as the set of people who ever submitted.
    pub(super) fn intern(&mut self, name: &Arc<str>) -> UserKey {
        if let Some(key) = self.users.get(name) {
            return *key;
        }
        let key = UserKey(u32::try_from(self.user_names.len()).expect("fewer than 2^32 users"));
        self.users.insert(name.clone(), key);
        self.user_names.push(name.clone());
        self.held.push([0, 0]);
        self.waiting.push(0);
        key
    }

    /// Formats a reason once into a shared string, cut to `reason_bytes_max`.
    fn text(&mut self, args: std::fmt::Arguments<'_>) -> Arc<str> {
        use std::fmt::Write;
        self.scratch.clear();
        let _ = self.scratch.write_fmt(args);
        Arc::from(spec::truncated_str(
            &self.scratch,
            self.config.reason_bytes_max,
        ))
    }

    /// Whether the agent holding the job's attempt (if any) is connected.
    pub(super) fn holder_connected(&self, job: &Job) -> bool {
        job.held()
            .and_then(|a| self.agents.get(&a.agent))
            .is_some_and(|a| a.conn().is_some())
    }

    /// Marks the job's record for this step's transaction and re-derives its timer.
    fn touch(&mut self, id: JobId) {
        // A step touches a handful of jobs: a scan beats a set.
        if !self.dirty.contains(&id) {
            self.dirty.push(id);
        }
        self.rearm(id);
    }

    fn event(
        &mut self,
        job: Option<JobId>,
        attempt: Option<u32>,
        agent: Option<AgentId>,
        kind: EventKind,
        reason: impl Into<Arc<str>>,
    ) {
        self.out.push(Effect::Event(Event {
            at: self.now,
            job,
            attempt,
            agent,
            kind,
            reason: reason.into(),
        }));
    }

    /// Orders this step's effects: persists first, then the rest; retires
    /// jobs that are over and hold nothing (the store keeps them).
    fn flush(&mut self) -> std::vec::Drain<'_, Effect> {
        self.effects.clear();
        for i in 0..self.dirty.len() {
            let id = self.dirty[i];
            let done = self
                .jobs
                .get(&id)
                .is_some_and(|j| j.state.is_terminal() && j.held().is_none());
            let record = if done {
                self.timers.set(TimerKey::Job(id), None);
                self.jobs.remove(&id).expect("done job exists").job
            } else {
                self.jobs[&id].job.clone()
            };
            self.effects.push(Effect::Persist { job: record });
        }
        self.dirty.clear();
        self.effects.append(&mut self.out);
        self.effects.drain(..)
    }

    pub(super) fn parts(&self) -> Parts<'_> {
        Parts {
            config: &self.config,
            jobs: &self.jobs,
            queues: &self.queues,
            pool_used: &self.pool_used,
            held: &self.held,
            waiting: &self.waiting,
            user_names: &self.user_names,
            idempotency: &self.idempotency,
            idempotency_expiry: &self.idempotency_expiry,
            agents: &self.agents,
            timers: &self.timers,
        }
    }

    // ---- hooks for `snapshot` ------------------------------------------------

    pub(super) fn set_clock(&mut self, now: Millis, next_job: u64) {
        self.now = now;
        self.next_job = next_job.max(1);
    }

    pub(super) fn user_count(&self) -> usize {
        self.user_names.len()
    }

    pub(super) fn user_key(&self, name: &Arc<str>) -> Option<UserKey> {
        self.users.get(name).copied()
    }

    pub(super) fn arm(&mut self, key: TimerKey, at: Option<Millis>) {
        self.timers.set(key, at);
    }

    pub(super) fn insert_agent(&mut self, agent: Agent) {
        self.agents.insert(agent);
    }

    /// Adds a live job from a snapshot, holding what its attempt holds.
    pub(super) fn insert_live(&mut self, live: Live) -> Result<(), RestoreError> {
        check_record(&self.config, &live.job, self.next_job)?;
        let id = live.job.id;
        if self.jobs.contains_key(&id) {
            return Err(RestoreError::new(id, "appears twice"));
        }
        if let Some(attempt) = live.job.held() {
            if self.agents.get(&attempt.agent).is_none() {
                return Err(RestoreError::new(
                    id,
                    "is held on an agent the snapshot does not have",
                ));
            }
            let (agent, cpus, kind) = (attempt.agent.clone(), attempt.cpus, live.job.kind());
            self.hold(&agent, id, live.user_key, kind, cpus);
        }
        if live.job.state == JobState::Queued {
            self.waiting[live.user_key.index()] += 1;
        }
        self.jobs.insert(id, live);
        Ok(())
    }

    pub(super) fn set_queue(&mut self, kind: Kind, queue: FairQueue) {
        self.queues[kind.index()] = queue;
    }

    pub(super) fn remember_idempotency(
        &mut self,
        user: Arc<str>,
        key: String,
        job: JobId,
        expires: Millis,
        digest: Option<u64>,
    ) {
        self.idempotency
            .insert((user.clone(), key.clone()), (job, expires, digest));
        self.idempotency_expiry.push_back((expires, user, key));
    }

    pub(super) fn rearm_all(&mut self) {
        let ids: Vec<JobId> = self.jobs.keys().copied().collect();
        for id in ids {
            self.rearm(id);
        }
    }

    /// Rebuilds the core from the store after a restart. Records are every
    /// job that is not over, plus recent ones (for their idempotency keys);
    /// `next_job_id` is past every id the store ever gave out. Jobs that held
    /// an attempt wait for their agent to come back within the grace period.
    pub fn restore(
        config: CoreConfig,
        now: Millis,
        records: impl IntoIterator<Item = Job>,
        next_job_id: u64,
    ) -> Result<Core, RestoreError> {
        let mut core = Core::new(config);
        core.now = now;
        core.next_job = next_job_id.max(1);
        for job in records {
            check_record(&core.config, &job, core.next_job)?;
            if let Some(key) = &job.spec.idempotency_key {
                let digest = Some(job.spec.request_digest());
                core.remember_key(
                    job.user.clone(),
                    key.clone(),
                    job.id,
                    job.submitted_at,
                    digest,
                );
            }
            if job.state.is_terminal() && job.held().is_none() {
                continue;
            }
            if core.jobs.contains_key(&job.id) {
                return Err(RestoreError::new(job.id, "appears twice"));
            }
            let id = job.id;
            let kind = job.kind();
            let user = core.intern(&job.user);
            if job.state == JobState::Queued {
                core.queues[kind.index()].push(job.priority, user, id);
                core.waiting[user.index()] += 1;
            }
            if let Some(attempt) = job.held() {
                let agent = attempt.agent.clone();
                if core.agents.get(&agent).is_none() {
                    core.agents.insert(Agent {
                        id: agent.clone(),
                        link: Link::Disconnected {
                            since: now,
                            reason: GoneReason::Closed,
                        },
                        cpus: attempt.cpus,
                        labels: BTreeMap::new(),
                        used_cpus: 0,
                        dying: BTreeMap::new(),
                        jobs: BTreeSet::new(),
                    });
                    core.timers.set(
                        TimerKey::Agent(agent.clone()),
                        Some(now.plus_ms(core.config.agent_grace_ms)),
                    );
                }
                let cpus = attempt.cpus;
                core.agents
                    .update(&agent, |a| a.cpus = a.cpus.max(a.used_cpus + cpus));
                core.hold(&agent, id, user, kind, cpus);
            }
            core.jobs.insert(
                id,
                Live {
                    job: Arc::new(job),
                    user_key: user,
                },
            );
            core.rearm(id);
        }
        // Idempotency keys were remembered in record order; expiry needs time order.
        core.idempotency_expiry.make_contiguous().sort();
        // What the jobs hold must fit what the configuration now allows: a
        // pool or cap shrunk below running work is an operator's error to fix.
        for kind in Kind::ALL {
            let (used, size) = (core.pool_used[kind.index()], core.config.pool_cpus(kind));
            if used > size {
                let job = core
                    .jobs
                    .values()
                    .filter(|j| j.kind() == kind && j.held().is_some())
                    .map(|j| j.id)
                    .max();
                return Err(RestoreError {
                    job: job.unwrap_or(JobId(0)),
                    problem: format!("is among {kind} jobs holding {used} cpus, over the configured pool of {size}"),
                });
            }
        }
        // Per user and kind, the largest cap among the plans of the jobs held
        // (a cap is checked per decision with the deciding job's plan).
        let mut caps: BTreeMap<(UserKey, Kind), (u32, JobId)> = BTreeMap::new();
        for live in core.jobs.values().filter(|j| j.held().is_some()) {
            let cap = core.config.plans[&*live.plan]
                .limits(live.kind())
                .max_running;
            let entry = caps
                .entry((live.user_key, live.kind()))
                .or_insert((0, live.id));
            *entry = (entry.0.max(cap), entry.1.max(live.id));
        }
        for ((user, kind), (cap, job)) in caps {
            let held = core.held[user.index()][kind.index()];
            if held > cap {
                let name = &core.user_names[user.index()];
                return Err(RestoreError {
                    job,
                    problem: format!(
                        "is one of {held} {kind} jobs {name} holds, over the plan cap of {cap}"
                    ),
                });
            }
        }
        // No agent is connected yet, so this can only park users at their cap.
        core.schedule();
        assert!(
            core.out.is_empty(),
            "restore dispatched with no agent connected"
        );
        Ok(core)
    }
}

/// A record the store handed back that the core cannot trust.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("job {job}: record {problem}")]
pub struct RestoreError {
    pub job: JobId,
    pub problem: String,
}

impl RestoreError {
    fn new(job: JobId, problem: &str) -> RestoreError {
        RestoreError {
            job,
            problem: problem.to_string(),
        }
    }
}

fn check_record(config: &CoreConfig, job: &Job, next_job: u64) -> Result<(), RestoreError> {
    let fail = |p: &str| Err(RestoreError::new(job.id, p));
    if job.id.0 == 0 || job.id.0 >= next_job {
        return fail("has an id at or past the next id");
    }
    let live = !job.state.is_terminal() || job.held().is_some();
    if live {
        // A job that still has to run must be servable under this configuration.
        let Some(plan) = config.plans.get(&*job.plan) else {
            return fail("names a plan the configuration no longer has");
        };
        if plan.limits(job.kind()).max_running == 0 {
            return fail("is of a kind its plan no longer allows");
        }
        if job.spec.cpus == 0
            || job.spec.cpus > config.agent_cpus_max.min(config.pool_cpus(job.kind()))
        {
            return fail("asks for more cpus than an agent or its pool may now have");
        }
    }
    if job.spec.max_attempts == 0 || job.attempts.len() as u32 > job.spec.max_attempts {
        return fail("has an attempt count outside its max_attempts");
    }
    for (i, a) in job.attempts.iter().enumerate() {
        if a.number as usize != i + 1 {
            return fail("has attempts out of order");
        }
        if a.holds() && i + 1 != job.attempts.len() {
            return fail("has an earlier attempt still holding resources");
        }
        if a.cpus != job.spec.cpus {
            return fail("has an attempt whose cpus differ from the job's");
        }
    }
    let held = job.held().map(|a| (a.phase, a.started_at.is_some()));
    let consistent = match job.state {
        JobState::Queued => held.is_none(),
        JobState::Dispatched => matches!(
            held,
            Some((Phase::Active, false))
                | Some((
                    Phase::Stopping {
                        reason: StopReason::DispatchTimeout,
                        ..
                    },
                    false
                ))
        ),
        JobState::Running => matches!(held, Some((Phase::Active, true))),
        JobState::Canceling => matches!(held, Some((Phase::Stopping { .. }, _))),
        _ => matches!(held, None | Some((Phase::Stopping { .. }, _))),
    };
    if !consistent {
        return fail("has a state that does not match its attempts");
    }
    Ok(())
}

/// A new connection, or none: what the old one was killing, the next hello
/// reports afresh.
fn forget_dying(agent: &mut Agent) {
    let dying: u32 = std::mem::take(&mut agent.dying).values().sum();
    agent.used_cpus -= dying;
}

/// An outcome in words, formatted without allocating.
struct Described<'a>(&'a Outcome);

impl std::fmt::Display for Described<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Outcome::Exited { code } => write!(f, "exited with code {code}"),
            Outcome::Signaled { signal } => write!(f, "killed by signal {signal}"),
            Outcome::Killed => f.write_str("killed on request"),
            Outcome::Fenced => f.write_str(
                "killed by its agent, out of contact with the supervisor past its fence",
            ),
            Outcome::SpawnFailed { error } => write!(f, "could not start: {error}"),
        }
    }
}

/// Read-only view of the core's internals, for `check_invariants`.
/// (user, key) → the first job, when the key expires, and the digest of
/// its spec (`None` from an old snapshot: any body matches).
pub(super) type Idempotency = BTreeMap<(Arc<str>, String), (JobId, Millis, Option<u64>)>;

pub(super) struct Parts<'a> {
    pub config: &'a CoreConfig,
    pub jobs: &'a JobTable,
    pub queues: &'a [FairQueue; 2],
    pub pool_used: &'a [u32; 2],
    pub held: &'a [[u32; 2]],
    pub waiting: &'a [u32],
    pub user_names: &'a [Arc<str>],
    pub idempotency: &'a Idempotency,
    pub idempotency_expiry: &'a VecDeque<(Millis, Arc<str>, String)>,
    pub agents: &'a Agents,
    pub timers: &'a Timers,
}
