//! A harness for driving the core in tests: it keeps the clock, numbers
//! requests and connections, keeps a model of the store from `Persist`
//! effects, and checks every invariant after every step.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::*;

pub struct Harness {
    pub core: Core,
    pub now: u64,
    next_request: u64,
    next_conn: u64,
    pub conns: BTreeMap<String, ConnId>,
    /// The store as the persists left it.
    pub store: BTreeMap<JobId, Job>,
    /// Every effect of every step, in order.
    pub log: Vec<Effect>,
    /// Every input, with its time, in order (for replay tests).
    pub inputs: Vec<(u64, Input)>,
}

/// The message `f` panics with; fails the test if it does not panic.
pub fn panic_message(what: &str, f: impl FnOnce()) -> String {
    let panic = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
        .err()
        .unwrap_or_else(|| panic!("no panic for {what}"));
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default()
}

pub fn basic_config() -> CoreConfig {
    CoreConfig {
        dispatch_ack_timeout_ms: 5_000,
        stop_timeout_ms: 10_000,
        agent_grace_ms: 30_000,
        ..CoreConfig::default()
    }
}

pub fn cmd(argv: &[&str]) -> SubmitSpec {
    SubmitSpec::command(argv.iter().copied())
}

/// A command that may run up to `attempts` times.
pub fn retried(attempts: u32, argv: &[&str]) -> SubmitSpec {
    SubmitSpec {
        max_attempts: attempts,
        ..cmd(argv)
    }
}

pub fn parallel(cpus: u32) -> SubmitSpec {
    SubmitSpec {
        kind: "parallel".to_string(),
        cpus,
        ..cmd(&["mpirun", "sim"])
    }
}

impl Harness {
    pub fn new(config: CoreConfig) -> Harness {
        Harness::from_core(Core::new(config), 1_000_000)
    }

    pub fn from_core(core: Core, now: u64) -> Harness {
        Harness {
            core,
            now,
            next_request: 1,
            next_conn: 1,
            conns: BTreeMap::new(),
            store: BTreeMap::new(),
            log: Vec::new(),
            inputs: Vec::new(),
        }
    }

    /// The supervisor dies and restarts `after_ms` later: a new harness whose
    /// core is restored from this one's store (which it keeps).
    pub fn crash_and_restore(&self, config: CoreConfig, after_ms: u64) -> Harness {
        let records: Vec<Job> = self.store.values().cloned().collect();
        let at = self.now + after_ms;
        let core = Core::restore(config, Millis(at), records, self.core.next_job_id())
            .expect("the store restores");
        let mut restored = Harness::from_core(core, at);
        restored.store = self.store.clone();
        restored
    }

    pub fn step(&mut self, input: Input) -> Vec<Effect> {
        self.inputs.push((self.now, input.clone()));
        let effects: Vec<Effect> = self.core.handle(Millis(self.now), input).collect();
        self.core.check_invariants();
        let mut seen_other = false;
        for effect in &effects {
            match effect {
                Effect::Persist { job } => {
                    assert!(!seen_other, "a persist came after a message or reply");
                    if let Some(old) = self.store.get(&job.id) {
                        assert!(
                            !old.state.is_terminal() || old.state == job.state,
                            "job {} left terminal state {} for {}",
                            job.id,
                            old.state,
                            job.state
                        );
                    }
                    self.store.insert(job.id, (**job).clone());
                }
                _ => seen_other = true,
            }
        }
        self.log.extend(effects.iter().cloned());
        effects
    }

    pub fn advance(&mut self, ms: u64) -> Vec<Effect> {
        self.now += ms;
        self.step(Input::Tick)
    }

    /// Advances to the core's next deadline and fires it.
    pub fn fire_next_deadline(&mut self) -> Vec<Effect> {
        let at = self.core.next_deadline().expect("a deadline is armed").0;
        self.now = self.now.max(at);
        self.step(Input::Tick)
    }

    fn request(&mut self) -> RequestId {
        self.next_request += 1;
        RequestId(self.next_request)
    }

    pub fn try_submit(&mut self, user: &str, plan: &str, spec: SubmitSpec) -> Reply {
        let request = self.request();
        let effects = self.step(Input::Submit {
            request,
            user: Arc::from(user),
            plan: Arc::from(plan),
            spec,
        });
        reply_to(&effects, request)
    }

    pub fn submit(&mut self, user: &str, plan: &str, spec: SubmitSpec) -> JobId {
        match self.try_submit(user, plan, spec) {
            Reply::Submitted { job, .. } => job,
            other => panic!("submit rejected: {other:?}"),
        }
    }

    pub fn cancel_as(&mut self, user: &str, admin: bool, job: JobId) -> Reply {
        let request = self.request();
        let effects = self.step(Input::Cancel {
            request,
            by: Requester {
                user: Arc::from(user),
                admin,
            },
            job,
        });
        reply_to(&effects, request)
    }

    pub fn cancel(&mut self, job: JobId) -> Reply {
        let user = self.state_record(job).user.clone();
        self.cancel_as(&user, false, job)
    }

    pub fn connect_with(
        &mut self,
        agent: &str,
        cpus: u32,
        attempts: Vec<AttemptReport>,
    ) -> Vec<Effect> {
        self.next_conn += 1;
        let conn = ConnId(self.next_conn);
        self.conns.insert(agent.to_string(), conn);
        self.step(Input::AgentConnected {
            conn,
            agent: AgentId::new(agent),
            cpus,
            labels: BTreeMap::new(),
            attempts,
        })
    }

    pub fn connect(&mut self, agent: &str, cpus: u32) -> Vec<Effect> {
        self.connect_with(agent, cpus, Vec::new())
    }

    pub fn message(&mut self, agent: &str, msg: AgentMsg) -> Vec<Effect> {
        let conn = self.conns[agent];
        self.step(Input::AgentMessage {
            conn,
            agent: AgentId::new(agent),
            msg,
        })
    }

    pub fn started(&mut self, agent: &str, job: JobId, attempt: u32) -> Vec<Effect> {
        self.message(agent, AgentMsg::Started { job, attempt })
    }

    pub fn exited(&mut self, agent: &str, job: JobId, attempt: u32, code: i32) -> Vec<Effect> {
        self.finished(agent, job, attempt, Outcome::Exited { code })
    }

    pub fn finished(
        &mut self,
        agent: &str,
        job: JobId,
        attempt: u32,
        outcome: Outcome,
    ) -> Vec<Effect> {
        self.message(
            agent,
            AgentMsg::Finished {
                job,
                attempt,
                outcome,
                output_tail: format!("output of {job}\n"),
                run_ms: 10,
            },
        )
    }

    pub fn gone(&mut self, agent: &str, reason: GoneReason) -> Vec<Effect> {
        let conn = self.conns[agent];
        self.step(Input::AgentGone {
            conn,
            agent: AgentId::new(agent),
            reason,
        })
    }

    /// The job as the store has it (terminal jobs live only there).
    pub fn state_record(&self, job: JobId) -> &Job {
        self.store.get(&job).expect("job was persisted")
    }

    pub fn state(&self, job: JobId) -> JobState {
        self.state_record(job).state
    }

    /// Which agent the job's latest attempt is on, and its number.
    pub fn placed(&self, job: JobId) -> (String, u32) {
        let a = self.state_record(job).attempts.last().expect("dispatched");
        (a.agent.to_string(), a.number)
    }
}

/// A submit's answer as (job, existing), none if it was refused.
pub fn answered(reply: Reply) -> Option<(JobId, bool)> {
    match reply {
        Reply::Submitted { job, existing, .. } => Some((job, existing)),
        _ => None,
    }
}

pub fn reply_to(effects: &[Effect], request: RequestId) -> Reply {
    effects
        .iter()
        .find_map(|e| match e {
            Effect::Reply { request: r, reply } if *r == request => Some(reply.clone()),
            _ => None,
        })
        .expect("the request got a reply")
}

/// The (agent, job, attempt) of each run sent in `effects`.
pub fn runs(effects: &[Effect]) -> Vec<(String, JobId, u32)> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Send {
                agent,
                msg: ToAgent::Run { job, attempt, .. },
                ..
            } => Some((agent.to_string(), *job, *attempt)),
            _ => None,
        })
        .collect()
}

/// The (agent, job, attempt, reason) of each kill sent in `effects`.
pub fn kills(effects: &[Effect]) -> Vec<(String, JobId, u32, KillReason)> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Send {
                agent,
                msg:
                    ToAgent::Kill {
                        job,
                        attempt,
                        reason,
                    },
                ..
            } => Some((agent.to_string(), *job, *attempt, *reason)),
            _ => None,
        })
        .collect()
}

pub fn acks(effects: &[Effect]) -> Vec<(JobId, u32)> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Send {
                msg: ToAgent::Ack { job, attempt },
                ..
            } => Some((*job, *attempt)),
            _ => None,
        })
        .collect()
}

pub fn events(effects: &[Effect], kind: EventKind) -> Vec<Event> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Event(ev) if ev.kind == kind => Some(ev.clone()),
            _ => None,
        })
        .collect()
}
