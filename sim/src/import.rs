//! An incident bundle (`foreman incident`) as a scenario: the topology, the
//! workload and the fault plan read from the bundle's journal segments,
//! replayed through the core so that every submission has its job and every
//! cancel the situation it landed in. What cannot be read from the bundle is
//! said in the file as a comment, never dropped silently.
//!
//! The mapping, in short (`scenarios/README.md` has it whole):
//! - agents, in the order they were first seen, become `agent-0`,
//!   `agent-1`, …, with the CPUs their hello gave; the scheduler's settings
//!   (every one that differs from the defaults) and the ping timings of the
//!   supervisor's start become the topology;
//! - each submission in the window becomes a job at its time (from the
//!   first segment's start), with its user, kind, CPUs, run limit and
//!   attempts; its program is read from how its attempts ended: an exit
//!   code after so many ms, a crash, or (never seen to end by itself) a
//!   process that runs until killed; its output is the recorded tail;
//! - an agent whose connection closed becomes a kill, and its return a
//!   restart; one that went silent (ping timeout), a partition healed when
//!   it came back; a connection replaced by a new hello that no longer
//!   knew its runs, a host reboot; each aimed at the job it was running
//!   where there was one (the simulator may place jobs on other agents);
//!   a supervisor start after the first, a crash (at its last line) and a
//!   restart; a cancel, at its time, once the job is in the situation the
//!   cancel found it in;
//! - the expectations are the recorded end states, attempts and exit codes.
//!   `foreman-sim import` then runs the scenario on several seeds and keeps
//!   only the ones the simulator reproduces and the outcome checker accepts.

use std::collections::{BTreeMap, BTreeSet};
use std::io::BufRead;

use foreman::core::{
    CoreConfig, Effect, EventKind, GoneReason, Input, Job, JobState, Link, Outcome, StopReason,
    SubmitSpec,
};
use foreman::server::journal::{replay_from, Line};
use serde_json::Value;

use crate::scenario::{Action, Expect, Fault, JobPlan, Situation, Target, Topology, UserSpec};

/// The bundle format this build reads (`foreman incident` writes it).
pub const BUNDLE_FORMAT: u64 = foreman::server::incident::BUNDLE_FORMAT as u64;

/// The longest line read from a bundle (a segment's snapshot can be large).
pub const LINE_BYTES_MAX: usize = 256 << 20;

/// How a job ended in production.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recorded {
    pub state: JobState,
    pub attempts: usize,
    pub exit_code: Option<i32>,
    pub reason: String,
}

/// A scenario read from a bundle, before it is written: its parts, and
/// what goes beside each as comments.
#[derive(Debug)]
pub struct Draft {
    /// Where it came from (the bundle's header), as comment lines.
    pub source: Vec<String>,
    pub description: String,
    pub topology: Topology,
    pub users: Vec<UserSpec>,
    /// Each job with the comment lines written above it.
    pub jobs: Vec<(JobPlan, Vec<String>)>,
    pub faults: Vec<(Fault, Vec<String>)>,
    /// What the bundle holds that the scenario cannot say.
    pub notes: Vec<String>,
    /// How each terminal job ended in production, by job name.
    pub recorded: BTreeMap<String, Recorded>,
    pub expect: Expect,
    /// Why an expectation of a job is not written (by job name).
    pub unexpected: BTreeMap<String, String>,
}

impl Draft {
    /// Drops `job`'s expectations, saying why in the file.
    pub fn drop_expectation(&mut self, job: &str, why: String) {
        self.expect.states.remove(job);
        self.expect.attempts.remove(job);
        self.expect.exit_codes.remove(job);
        self.unexpected.insert(job.to_string(), why);
    }

    /// The scenario file.
    pub fn to_toml(&self) -> String {
        let mut out = String::new();
        for line in &self.source {
            out.push_str(&comment(line));
        }
        out.push_str(&section("description", &self.description));
        out.push('\n');
        for line in &self.notes {
            out.push_str(&comment(line));
        }
        if !self.notes.is_empty() {
            out.push('\n');
        }
        out.push_str(&section("topology", &self.topology));
        for user in &self.users {
            out.push('\n');
            out.push_str(&section("users", &[user]));
        }
        for (job, lines) in &self.jobs {
            out.push('\n');
            lines.iter().for_each(|l| out.push_str(&comment(l)));
            out.push_str(&section("jobs", &[job]));
        }
        for (fault, lines) in &self.faults {
            out.push('\n');
            lines.iter().for_each(|l| out.push_str(&comment(l)));
            out.push_str(&section("faults", &[fault]));
        }
        out.push('\n');
        for (job, why) in &self.unexpected {
            out.push_str(&comment(&format!("{job}: no expectation: {why}")));
        }
        out.push_str(&section("expect", &self.expect));
        out
    }
}

/// How a job ended in a run: its state, attempts and exit code.
pub type End = (JobState, usize, Option<i32>);

/// One seed's run of an imported scenario, as the import judges it.
#[derive(Debug, Default)]
pub struct SeedRun {
    pub seed: u64,
    /// Each job's end, by name, as the API listed it at the end.
    pub ends: BTreeMap<String, End>,
    /// The outcome checker's verdict on each job it rejected, by name.
    pub rejected: BTreeMap<String, String>,
    /// The rare events the run reached.
    pub reached: BTreeSet<&'static str>,
}

impl SeedRun {
    pub fn of(
        seed: u64,
        trace: &[crate::trace::Entry],
        violations: &[crate::checkers::Violation],
    ) -> SeedRun {
        let ends = trace
            .iter()
            .filter_map(|e| match &e.ev {
                crate::trace::Ev::Final {
                    name,
                    state,
                    attempts,
                    exit_code,
                    ..
                } => Some((name.clone(), (*state, *attempts, *exit_code))),
                _ => None,
            })
            .collect::<BTreeMap<_, _>>();
        let mut rejected = BTreeMap::new();
        for v in violations.iter().filter(|v| v.checker == "outcome") {
            // "job 7 (job-7): ..."
            if let Some(name) = ends
                .keys()
                .find(|name| v.message.contains(&format!("({name})")))
            {
                rejected
                    .entry(name.clone())
                    .or_insert_with(|| v.message.clone());
            }
        }
        SeedRun {
            seed,
            ends,
            rejected,
            reached: crate::rare::reached(trace).into_keys().collect(),
        }
    }
}

/// What the import's runs showed.
#[derive(Debug, Default)]
pub struct Judged {
    /// Ended jobs every seed ended as recorded, the outcome checker
    /// accepting.
    pub reproduced: usize,
    /// One line per job whose expectations went, and why.
    pub lines: Vec<String>,
}

fn show(end: Option<&End>) -> String {
    match end {
        Some((state, attempts, code)) => format!(
            "{} after {attempts} attempts{}",
            state.as_str(),
            code.map_or(String::new(), |c| format!(", exit code {c}"))
        ),
        None => "not listed at the end".into(),
    }
}

impl Draft {
    /// Keeps the expectations of the ended jobs that every run in `runs`
    /// ended as recorded, with the outcome checker accepting that end;
    /// drops the others, saying why (a job the checker rejects is the
    /// incident: the checker judges it, and the scenario fails until the
    /// bug is fixed). The rare events every run reached become
    /// `expect.reached`.
    pub fn judge(&mut self, runs: &[SeedRun]) -> Judged {
        let mut judged = Judged::default();
        let seeds = match (runs.first(), runs.last()) {
            (Some(a), Some(b)) => format!("{}-{}", a.seed, b.seed),
            _ => "none".into(),
        };
        for (job, end) in self.recorded.clone() {
            let want: End = (end.state, end.attempts, end.exit_code);
            let recorded = show(Some(&want));
            let rejected: Vec<(u64, &String)> = runs
                .iter()
                .filter_map(|r| r.rejected.get(&job).map(|m| (r.seed, m)))
                .collect();
            let differ: Vec<String> = runs
                .iter()
                .filter(|r| r.ends.get(&job) != Some(&want))
                .map(|r| format!("seed {}: {}", r.seed, show(r.ends.get(&job))))
                .collect();
            let why = if let Some((_, message)) = rejected.first() {
                let on: Vec<u64> = rejected.iter().map(|(seed, _)| *seed).collect();
                format!(
                    "recorded {recorded}; the outcome checker rejects how it ends on seeds \
                     {on:?}: {message}"
                )
            } else if !differ.is_empty() || runs.is_empty() {
                format!(
                    "recorded {recorded}; the simulator differs ({})",
                    differ.join("; ")
                )
            } else {
                judged.reproduced += 1;
                continue;
            };
            judged.lines.push(format!("{job}: {why}"));
            self.drop_expectation(&job, why);
        }
        let mut reached = runs.iter().map(|r| r.reached.clone());
        let first = reached.next().unwrap_or_default();
        self.expect.reached = reached
            .fold(first, |all, here| {
                all.intersection(&here).copied().collect()
            })
            .into_iter()
            .map(String::from)
            .collect();
        self.source.push(format!(
            "Checked on seeds {seeds} when imported: {} of {} ended jobs ended as recorded \
             on every seed, and reached the rare events in expect.reached; the expectations \
             below are theirs.",
            judged.reproduced,
            self.recorded.len()
        ));
        judged
    }
}

/// `text` as comment lines, each at most one line of the file.
fn comment(text: &str) -> String {
    text.lines()
        .map(|l| format!("# {}\n", l.trim_end()).replace("# \n", "#\n"))
        .collect()
}

/// `value` under `key` as TOML: a table, or (a slice) an array of tables.
fn section(key: &str, value: &impl serde::Serialize) -> String {
    let mut map = toml::Table::new();
    map.insert(
        key.into(),
        toml::Value::try_from(value).expect("scenario parts are TOML"),
    );
    toml::to_string(&map).expect("a table writes")
}

/// A job met in the bundle.
struct Seen {
    id: u64,
    /// Its submission, in ms since the first segment's start.
    at_ms: u64,
    user: String,
    plan: String,
    spec: Option<SubmitSpec>,
    /// The record as the bundle last shows it.
    record: Option<Job>,
    /// Submitted before the window (it was live in the first snapshot).
    before: bool,
}

/// An agent as the replay follows it.
#[derive(Default)]
struct AgentSeen {
    index: usize,
    cpus: u32,
    /// The connection the supervisor holds for it.
    conn: Option<u64>,
    /// A loss not yet followed by a return: the action to undo and when
    /// it happened.
    away: Option<Action>,
    /// The job its faults aim at while it is away.
    aimed: Option<String>,
}

/// What the replay collects, in order.
#[derive(Default)]
struct Reading {
    t0: Option<u64>,
    last_at: u64,
    jobs: BTreeMap<u64, Seen>,
    agents: BTreeMap<String, AgentSeen>,
    faults: Vec<(Fault, Vec<String>)>,
    notes: Vec<String>,
    starts: Vec<(u64, Value)>,
    /// The supervisor's last fact (`started`, `stopped`, `panicked`).
    last_fact: Option<String>,
}

impl Reading {
    fn rel(&self, at: u64) -> u64 {
        at.saturating_sub(self.t0.unwrap_or(at))
    }

    /// A setting of the supervisor's first start in the window (the
    /// shipped default without one).
    fn setting(&self, key: &str, default: u64) -> u64 {
        self.starts
            .first()
            .and_then(|(_, s)| s.get(key))
            .and_then(Value::as_u64)
            .unwrap_or(default)
    }

    fn ms(&self, at: u64) -> String {
        format!("{} ms", self.rel(at))
    }

    fn agent(&mut self, id: &str, cpus: u32) -> &mut AgentSeen {
        let next = self.agents.len();
        let agent = self.agents.entry(id.to_string()).or_insert(AgentSeen {
            index: next,
            cpus,
            ..Default::default()
        });
        agent.cpus = agent.cpus.max(cpus);
        agent
    }

    /// The first live job on `agent` (by id), by the records so far.
    fn running_on(&self, agent: &str) -> Option<String> {
        self.jobs.values().find_map(|seen| {
            let record = seen.record.as_ref()?;
            let held = record.attempts.last().filter(|a| a.holds())?;
            (&*held.agent.0 == agent).then(|| job_name(seen.id))
        })
    }

    /// A fault on `agent`, or on the agent running `aim` where given.
    fn fault(&mut self, at: u64, action: Action, agent: &str, aim: Option<String>, why: String) {
        let index = self.agents.get(agent).map_or(0, |a| a.index);
        let (target, job) = match aim {
            Some(job) => (None, Some(job)),
            None => (Some(Target::One(index)), None),
        };
        self.faults.push((
            Fault {
                at_ms: self.rel(at),
                action,
                agent: target,
                job,
                when: None,
                latency_ms: None,
            },
            vec![why],
        ));
    }

    /// One step of the replay: the input, and what the core decided on it.
    fn step(&mut self, at: u64, input: &Input, effects: &[Effect]) {
        let ping_timeout_ms = self.setting("ping_timeout_ms", 15_000);
        self.last_at = self.last_at.max(at);
        match input {
            Input::Submit {
                user, plan, spec, ..
            } => {
                for effect in effects {
                    match effect {
                        Effect::Event(e) if e.kind == EventKind::Submitted => {
                            if let Some(job) = e.job {
                                self.jobs.insert(
                                    job.0,
                                    Seen {
                                        id: job.0,
                                        at_ms: self.rel(at),
                                        user: user.to_string(),
                                        plan: plan.to_string(),
                                        spec: Some(spec.clone()),
                                        record: None,
                                        before: false,
                                    },
                                );
                            }
                        }
                        Effect::Event(e) if e.kind == EventKind::Rejected => {
                            self.notes.push(format!(
                                "A submission by {user} at {} was refused ({}); the simulator's \
                                 client is not asked to make it.",
                                self.ms(at),
                                e.reason
                            ));
                        }
                        _ => {}
                    }
                }
            }
            Input::Cancel { by, job, .. } => self.cancel(at, by.user.as_ref(), job.0),
            Input::AgentConnected {
                conn,
                agent,
                cpus,
                attempts,
                ..
            } => {
                let id = agent.0.to_string();
                let had = self.running_on(&id);
                let t0 = self.t0.unwrap_or(at);
                let first = !self.agents.contains_key(&id);
                let seen = self.agent(&id, *cpus);
                let replaced = seen.conn.is_some_and(|c| c != conn.0);
                let away = seen.away.take();
                seen.conn = Some(conn.0);
                let aimed = seen.aimed.take();
                let at_rel = at.saturating_sub(t0);
                match away {
                    Some(Action::KillAgent) => {
                        self.fault(
                            at,
                            Action::RestartAgent,
                            &id,
                            aimed,
                            format!("agent {id} connected again at {at_rel} ms"),
                        );
                    }
                    Some(Action::Partition) => {
                        let lost = if attempts.is_empty() && had.is_some() {
                            " It came back without the runs it had: its host may have \
                             rebooted, which the partition does not reproduce."
                        } else {
                            ""
                        };
                        self.fault(
                            at,
                            Action::Heal,
                            &id,
                            aimed,
                            format!("agent {id} connected again at {at_rel} ms.{lost}"),
                        );
                    }
                    _ if replaced && attempts.is_empty() && had.is_some() => {
                        self.fault(
                            at,
                            Action::RebootAgent,
                            &id,
                            had,
                            format!(
                                "agent {id} said hello again at {at_rel} ms on a \
                                 new connection, without the runs it had: its host restarted \
                                 while the supervisor still held the old connection"
                            ),
                        );
                    }
                    _ if replaced => self.notes.push(format!(
                        "Agent {id} replaced its connection at {at_rel} ms and \
                         kept its runs (a network blip the supervisor never saw as a loss): \
                         not reproduced."
                    )),
                    _ if first && at_rel > 2_000 => {
                        // Agents in the simulator connect at the start: one
                        // that came later is held down until then.
                        for (action, when) in [(Action::KillAgent, t0), (Action::RestartAgent, at)]
                        {
                            self.fault(
                                when,
                                action,
                                &id,
                                None,
                                format!("agent {id} first connected at {at_rel} ms"),
                            );
                        }
                    }
                    _ => {}
                }
            }
            Input::AgentGone {
                conn,
                agent,
                reason,
            } => {
                let id = agent.0.to_string();
                let aimed = self.running_on(&id);
                let seen = self.agent(&id, 0);
                if seen.conn != Some(conn.0) {
                    return; // an old connection, already replaced
                }
                seen.conn = None;
                let action = match reason {
                    GoneReason::Closed => Action::KillAgent,
                    GoneReason::PingTimeout => Action::Partition,
                    other => {
                        self.notes.push(format!(
                            "Agent {id} was dropped at {} ({}): no fault of the \
                             simulator's stands for that.",
                            self.ms(at),
                            other.as_str()
                        ));
                        return;
                    }
                };
                seen.away = Some(action);
                seen.aimed = aimed.clone();
                let (when, why) = match action {
                    Action::KillAgent => (
                        at,
                        format!("agent {id}: its connection closed at {}", self.ms(at)),
                    ),
                    _ => (
                        at.saturating_sub(ping_timeout_ms).max(self.t0.unwrap_or(0)),
                        format!(
                            "agent {id} went silent: ping timeout at {}; written \
                             as a partition from a ping timeout before (it may as well have \
                             been a frozen or dead host)",
                            self.ms(at)
                        ),
                    ),
                };
                let why = match &aimed {
                    Some(job) => format!("{why}; aimed at the agent running {job}"),
                    None => why,
                };
                self.fault(when, action, &id, aimed, why);
            }
            Input::AgentMessage { .. } | Input::Tick => {}
        }
        for effect in effects {
            if let Effect::Persist { job } = effect {
                if let Some(seen) = self.jobs.get_mut(&job.id.0) {
                    seen.record = Some((**job).clone());
                }
            }
        }
    }

    fn cancel(&mut self, at: u64, by: &str, job: u64) {
        let Some(seen) = self.jobs.get(&job) else {
            self.notes.push(format!(
                "A cancel of job {job} at {}, a job the bundle does not hold: dropped.",
                self.ms(at)
            ));
            return;
        };
        let record = seen.record.as_ref();
        let agent_away = record.and_then(|r| r.attempts.last()).is_some_and(|a| {
            self.agents
                .get(&*a.agent.0)
                .is_some_and(|s| s.conn.is_none())
        });
        let (when, found) = match record.map(|r| r.state) {
            Some(JobState::Queued) => (Some(Situation::WaitingForSlot), "waiting for a slot"),
            Some(JobState::Dispatched) => (Some(Situation::Dispatched), "dispatched"),
            Some(JobState::Running) if agent_away => (
                Some(Situation::AgentReconnecting),
                "running on an agent that was away",
            ),
            Some(JobState::Running) => (Some(Situation::Running), "running"),
            Some(JobState::Canceling) => (None, "being canceled already"),
            Some(state) => (Some(Situation::Ended), state.as_str()),
            None => (None, "unknown"),
        };
        let mut why = vec![format!(
            "{by} canceled {} at {}; it was {found}{}",
            job_name(job),
            self.ms(at),
            if when == Some(Situation::Ended) {
                " (the cancel changed nothing)"
            } else {
                ""
            }
        )];
        if by != seen.user {
            why.push(format!(
                "(the simulator cancels as its owner, {})",
                seen.user
            ));
        }
        self.faults.push((
            Fault {
                at_ms: self.rel(at),
                action: Action::Cancel,
                agent: None,
                job: Some(job_name(job)),
                when,
                latency_ms: None,
            },
            why,
        ));
    }

    fn supervisor_fact(&mut self, at: u64, event: &str, settings: &Value) {
        match event {
            "started" if self.t0.is_some_and(|t0| at > t0) => {
                // Up at its last line, down by this start: written a little
                // after that line, so that what it handled last stays before
                // the crash whatever the seed does to the timing.
                let last = self.last_at.min(at.saturating_sub(1));
                let down = last + (at.saturating_sub(last) / 2).min(CRASH_AFTER_LAST_MS);
                let how = match self.last_fact.as_deref() {
                    Some("stopped") => "stopped cleanly (the simulator's supervisor only crashes)",
                    Some("panicked") => "panicked",
                    _ => "crashed (no end written)",
                };
                let rel = self.rel(down);
                self.faults.push((
                    Fault {
                        at_ms: rel,
                        action: Action::CrashSupervisor,
                        agent: None,
                        job: None,
                        when: None,
                        latency_ms: None,
                    },
                    vec![format!(
                        "the supervisor {how} between its last line, at {} ms, and its next \
                         start; written at {rel} ms",
                        self.rel(last)
                    )],
                ));
                self.faults.push((
                    Fault {
                        at_ms: self.rel(at),
                        action: Action::RestartSupervisor,
                        agent: None,
                        job: None,
                        when: None,
                        latency_ms: None,
                    },
                    vec![format!("the supervisor started again at {}", self.ms(at))],
                ));
                // Its agents' connections went with it.
                for agent in self.agents.values_mut() {
                    agent.conn = None;
                }
                self.starts.push((at, settings.clone()));
            }
            "started" => self.starts.push((at, settings.clone())),
            _ => {}
        }
        self.last_fact = Some(event.to_string());
    }
}

/// The time two messages take on the simulator's default network (1 to 5
/// ms each): what of a dispatch-to-start the network already stands for.
const SIM_HOPS_MS: u64 = 6;

/// How long after its last journal line a supervisor that crashed is
/// written to crash (at most half the way to its next start).
const CRASH_AFTER_LAST_MS: u64 = 50;

/// The name a job gets in the scenario.
pub fn job_name(id: u64) -> String {
    format!("job-{id}")
}

/// A user name the scenario accepts: letters, digits and '-'.
fn user_name(name: &str) -> String {
    let mut out: String = name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .take(64)
        .collect();
    if out.is_empty() {
        out = "user".into();
    }
    out
}

/// Reads a bundle line by line, each at most `max` bytes, as text.
fn lines_up_to<R: BufRead>(
    file: &str,
    mut input: R,
    max: usize,
) -> impl Iterator<Item = Result<(usize, String), String>> {
    let file = file.to_string();
    let mut n = 0;
    let mut done = false;
    std::iter::from_fn(move || {
        if done {
            return None;
        }
        n += 1;
        let mut buf = Vec::new();
        let read = std::io::Read::take(&mut input, max as u64 + 1).read_until(b'\n', &mut buf);
        match read {
            Err(e) => {
                done = true;
                Some(Err(format!("{file}:{n}: {e}")))
            }
            Ok(0) => None,
            Ok(_) if buf.len() > max => {
                done = true;
                Some(Err(format!("{file}:{n}: a line longer than {max} bytes")))
            }
            Ok(_) => {
                if buf.last() == Some(&b'\n') {
                    buf.pop();
                }
                match String::from_utf8(buf) {
                    Ok(text) => Some(Ok((n, text))),
                    Err(_) => {
                        done = true;
                        Some(Err(format!("{file}:{n}: not UTF-8")))
                    }
                }
            }
        }
    })
}

/// A segment of the bundle: its name, its first line's number in the
/// bundle, and its lines.
struct Segment {
    name: String,
    first_line: usize,
    text: String,
}

/// Reads the bundle `input` (named `file` in errors) as a scenario draft.
/// A file that is not a bundle, is of a later format, or is truncated or
/// corrupted is refused with the line that could not be used.
pub fn read(file: &str, input: impl BufRead) -> Result<Draft, String> {
    let mut header: Option<Value> = None;
    let mut segments: Vec<Segment> = Vec::new();
    for line in lines_up_to(file, input, LINE_BYTES_MAX) {
        let (n, text) = line?;
        if header.is_none() {
            let value: Option<Value> = serde_json::from_str(&text).ok();
            let value = value
                .filter(|v| v.get("bundle") == Some(&Value::from("foreman-incident")))
                .ok_or_else(|| {
                    format!(
                        "{file}:{n}: not a Foreman incident bundle (its first line is not a \
                         bundle's header; `foreman incident` writes one)"
                    )
                })?;
            let format = value.get("format").and_then(Value::as_u64).unwrap_or(0);
            if format == 0 || format > BUNDLE_FORMAT {
                return Err(format!(
                    "{file}:{n}: bundle format {} (written by foreman {}); this build reads \
                     format {BUNDLE_FORMAT}: import it with a foreman-sim as new as the foreman \
                     that wrote it",
                    value.get("format").unwrap_or(&Value::Null),
                    value.get("foreman_version").unwrap_or(&Value::Null)
                ));
            }
            header = Some(value);
            continue;
        }
        let marker = text
            .starts_with("{\"segment\"")
            .then(|| serde_json::from_str::<Value>(&text).ok())
            .flatten()
            .and_then(|v| v.get("segment").and_then(Value::as_str).map(String::from));
        match (marker, segments.last_mut()) {
            (Some(name), _) => segments.push(Segment {
                name,
                first_line: n + 1,
                text: String::new(),
            }),
            (None, Some(segment)) => {
                segment.text.push_str(&text);
                segment.text.push('\n');
            }
            (None, None) => {
                return Err(format!("{file}:{n}: a line before the first segment"));
            }
        }
    }
    let header = header.ok_or_else(|| format!("{file}: empty: not an incident bundle"))?;
    if segments.is_empty() {
        return Err(format!(
            "{file}: the bundle holds no journal segment (was the supervisor's journal off?): \
             nothing to import"
        ));
    }
    draft(file, &header, &segments)
}

fn draft(file: &str, header: &Value, segments: &[Segment]) -> Result<Draft, String> {
    let mut reading = Reading::default();
    for segment in segments {
        // The lines before this segment's own, blank, so that the replay's
        // errors name the bundle's lines.
        let pad = std::io::Read::take(std::io::repeat(b'\n'), segment.first_line as u64 - 1);
        let lines = std::io::BufReader::new(std::io::Read::chain(
            pad,
            std::io::Cursor::new(segment.text.as_bytes()),
        ));
        // First the segment's own facts (its snapshot, the supervisor's
        // starts and ends), by line.
        let mut facts: BTreeMap<usize, (u64, String, Value)> = BTreeMap::new();
        for (i, text) in segment.text.lines().enumerate() {
            let n = segment.first_line + i;
            // Inputs are the replay's to decode; only these lines are read here.
            if !(text.contains("\"snapshot\":") || text.contains("\"supervisor\":")) {
                continue;
            }
            match serde_json::from_str::<Line>(text) {
                Ok(Line::Snapshot { at, snapshot }) => {
                    if reading.t0.is_none() {
                        reading.t0 = Some(at.0);
                        for job in &snapshot.jobs {
                            reading.jobs.insert(
                                job.id.0,
                                Seen {
                                    id: job.id.0,
                                    at_ms: 0,
                                    user: job.user.to_string(),
                                    plan: job.plan.to_string(),
                                    spec: None,
                                    record: Some(job.clone()),
                                    before: true,
                                },
                            );
                        }
                        for agent in &snapshot.agents {
                            let id = agent.id.0.to_string();
                            let aim = reading.running_on(&id);
                            let seen = reading.agent(&id, agent.cpus);
                            match &agent.link {
                                Link::Connected { conn, .. } => seen.conn = Some(conn.0),
                                Link::Disconnected { reason, .. } => {
                                    // Gone before the window: down from the start.
                                    seen.away = Some(Action::KillAgent);
                                    let why = format!(
                                        "agent {id} was gone when the window opened ({})",
                                        reason.as_str()
                                    );
                                    reading.fault(at.0, Action::KillAgent, &id, aim, why);
                                }
                            }
                        }
                    }
                }
                Ok(Line::Supervisor { at, supervisor }) => {
                    facts.insert(n, (at.0, supervisor.event, supervisor.settings));
                }
                Ok(_) => {}
                Err(_) => {} // the replay names it
            }
        }
        let mut pending = facts.into_iter().peekable();
        let replayed = replay_from(file, lines, |step| {
            while let Some((_, (at, event, settings))) =
                pending.next_if(|(line, _)| *line < step.line)
            {
                reading.supervisor_fact(at, &event, &settings);
            }
            reading.step(step.at.0, &step.input, &step.effects);
        });
        replayed.map_err(|e| format!("{e} (in segment {})", segment.name))?;
        for (_, (at, event, settings)) in pending {
            reading.supervisor_fact(at, &event, &settings);
        }
    }
    // The store's records, where the bundle has them: the final word.
    for record in header
        .get("jobs")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        if let Ok(job) = serde_json::from_value::<Job>(record.clone()) {
            if let Some(seen) = reading.jobs.get_mut(&job.id.0) {
                seen.record = Some(job);
            }
        }
    }
    let created = header.get("created_at").and_then(Value::as_u64);
    let config = match header.get("config") {
        Some(config) if !config.is_null() => {
            match serde_json::from_value::<CoreConfig>(config.clone()) {
                Ok(config) => config,
                Err(e) => {
                    reading.notes.push(format!(
                        "The bundle's scheduler configuration could not be read ({e}): the \
                         defaults are used."
                    ));
                    CoreConfig::default()
                }
            }
        }
        _ => CoreConfig::default(),
    };
    Ok(assemble(file, header, reading, config, created))
}

fn assemble(
    file: &str,
    header: &Value,
    mut reading: Reading,
    config: CoreConfig,
    created: Option<u64>,
) -> Draft {
    let t0 = reading.t0.unwrap_or(0);
    let defaults = Topology::default();
    let mut topology = Topology {
        ping_interval_ms: reading.setting("ping_interval_ms", 5_000),
        ping_timeout_ms: reading.setting("ping_timeout_ms", 15_000),
        // The shipped agent's longest wait between connection attempts.
        reconnect_max_ms: 10_000,
        ..defaults.clone()
    };
    // Agents by id (the order they were met in is the faults' so far).
    let agents: Vec<(usize, String, u32)> = reading
        .agents
        .iter()
        .enumerate()
        .map(|(i, (id, a))| (i, id.clone(), a.cpus.max(1)))
        .collect();
    let index: BTreeMap<usize, usize> = reading
        .agents
        .values()
        .enumerate()
        .map(|(i, a)| (a.index, i))
        .collect();
    for (fault, _) in &mut reading.faults {
        if let Some(Target::One(met)) = &mut fault.agent {
            *met = index.get(met).copied().unwrap_or(0);
        }
    }
    topology.agents = agents.len().max(1);
    let cpus: Vec<u32> = agents.iter().map(|a| a.2).collect();
    topology.cpus = cpus.iter().copied().min().unwrap_or(1);
    if cpus.iter().any(|&c| c != topology.cpus) {
        topology.agent_cpus = cpus;
    }
    // The scheduler's settings that differ from the defaults.
    let ours = toml::Table::try_from(&config).unwrap_or_default();
    let base = toml::Table::try_from(CoreConfig::default()).unwrap_or_default();
    topology.core = ours
        .into_iter()
        .filter(|(key, value)| base.get(key) != Some(value))
        .collect();
    let mut notes = vec![
        format!(
            "Agents: {}.",
            if agents.is_empty() {
                "none seen (one is assumed)".to_string()
            } else {
                agents
                    .iter()
                    .map(|(i, id, cpus)| {
                        format!(
                            "{id} is agent {i} ({cpus} CPU{})",
                            if *cpus == 1 { "" } else { "s" }
                        )
                    })
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        ),
        "Not in the bundle, so the simulator's defaults: the network's latency (1 to 5 ms, \
         varied by the seed), commit latency (0), how long processes take to die once killed \
         (0), output written at once at each job's end."
            .to_string(),
    ];
    if reading.starts.len() > 1 {
        let first = &reading.starts[0].1;
        if reading.starts.iter().any(|(_, s)| {
            s.get("ping_interval_ms") != first.get("ping_interval_ms")
                || s.get("ping_timeout_ms") != first.get("ping_timeout_ms")
        }) {
            notes.push(
                "The ping timings changed across the supervisor's restarts: the first start's \
                 are used."
                    .into(),
            );
        }
    }
    if reading.starts.is_empty() {
        notes.push(
            "No supervisor start in the window: the ping timings are the shipped defaults.".into(),
        );
    }
    notes.append(&mut reading.notes);
    // Users, by the names the scenario accepts.
    let mut users: Vec<UserSpec> = Vec::new();
    let mut renamed: BTreeMap<String, String> = BTreeMap::new();
    for seen in reading.jobs.values() {
        if renamed.contains_key(&seen.user) {
            continue;
        }
        if seen.user == "admin" {
            renamed.insert(seen.user.clone(), "admin".into());
            if seen.plan != "premium" {
                notes.push(format!(
                    "admin's jobs ran on plan {:?}; the simulator's admin is on \"premium\".",
                    seen.plan
                ));
            }
            continue;
        }
        let mut name = user_name(&seen.user);
        let taken: BTreeSet<&str> = users.iter().map(|u| u.name.as_str()).collect();
        let mut n = 2;
        while taken.contains(name.as_str()) || name == "admin" {
            name = format!("{}-{n}", user_name(&seen.user));
            n += 1;
        }
        if name != seen.user {
            notes.push(format!("User {:?} is {name:?} here.", seen.user));
        }
        if !config.plans.contains_key(&seen.plan) {
            notes.push(format!(
                "User {:?}'s plan {:?} is not in the configuration.",
                seen.user, seen.plan
            ));
        }
        renamed.insert(seen.user.clone(), name.clone());
        users.push(UserSpec {
            name,
            plan: seen.plan.clone(),
        });
    }
    let mut jobs = Vec::new();
    let mut recorded = BTreeMap::new();
    let mut expect = Expect::default();
    let mut longest = 0u64;
    let canceled: BTreeSet<String> = reading
        .faults
        .iter()
        .filter(|(f, _)| f.action == Action::Cancel)
        .filter_map(|(f, _)| f.job.clone())
        .collect();
    for seen in reading.jobs.values() {
        let (plan, lines, end) = job_plan(seen, &config, &renamed, created, &canceled);
        if let Some(end) = end {
            expect.states.insert(plan.name.clone(), end.state);
            expect.attempts.insert(plan.name.clone(), end.attempts);
            if let (Some(code), JobState::Succeeded | JobState::Failed) = (end.exit_code, end.state)
            {
                expect.exit_codes.insert(plan.name.clone(), code);
            }
            recorded.insert(plan.name.clone(), end);
        }
        let runs = if plan.hang && !canceled.contains(&plan.name) {
            plan.max_run_secs
                .unwrap_or_else(|| default_run_secs(&config, &seen.plan, &plan.kind))
                .saturating_mul(1_000)
        } else {
            plan.duration_ms
        };
        longest = longest.max(runs.saturating_mul(plan.max_attempts as u64));
        jobs.push((plan, lines));
    }
    // Everything settles once the longest job has had all its attempts,
    // beyond the agents' grace and a reconnect.
    expect.settle_ms =
        (longest + config.agent_grace_ms + topology.ping_timeout_ms + topology.reconnect_max_ms)
            .max(defaults_settle());
    let mut faults = reading.faults;
    faults.sort_by_key(|(f, _)| f.at_ms);
    let window = header.get("window").cloned().unwrap_or(Value::Null);
    let source = vec![
        format!(
            "Imported from {file}: the incident bundle written by foreman {} at {} ms (epoch), \
             window {window}.",
            header.get("foreman_version").unwrap_or(&Value::Null),
            created.unwrap_or(0)
        ),
        format!("Times are ms from the first segment's start ({t0} ms since the epoch)."),
    ];
    let description = format!(
        "An incident imported from a bundle: {} jobs, {} agents, {} faults.",
        jobs.len(),
        topology.agents,
        faults.len()
    );
    Draft {
        source,
        description,
        topology,
        users,
        jobs,
        faults,
        notes,
        recorded,
        expect,
        unexpected: BTreeMap::new(),
    }
}

fn defaults_settle() -> u64 {
    Expect::default().settle_ms
}

fn default_run_secs(config: &CoreConfig, plan: &str, kind: &str) -> u64 {
    let limits = config.plans.get(plan).map(|p| match kind {
        "parallel" => p.parallel.default_run_secs,
        _ => p.sequential.default_run_secs,
    });
    limits.unwrap_or(3_600)
}

/// A job's plan, the comment lines above it, and its end if it ended.
fn job_plan(
    seen: &Seen,
    config: &CoreConfig,
    users: &BTreeMap<String, String>,
    created: Option<u64>,
    canceled: &BTreeSet<String>,
) -> (JobPlan, Vec<String>, Option<Recorded>) {
    let record = seen.record.as_ref();
    let mut lines = Vec::new();
    let argv = match (&seen.spec, record) {
        (Some(spec), _) => spec.argv.join(" "),
        (None, Some(r)) => r.spec.argv.join(" "),
        (None, None) => String::new(),
    };
    let argv: String = argv.chars().take(100).collect();
    lines.push(format!("job {}: {argv}", seen.id));
    if seen.before {
        lines.push(
            "Submitted before the window (live in the first snapshot): submitted at the start."
                .into(),
        );
    }
    let (kind, cpus, max_run_secs, max_attempts) = match (&seen.spec, record) {
        (Some(s), _) => (s.kind.clone(), s.cpus, s.max_run_secs, s.max_attempts),
        (None, Some(r)) => (
            r.spec.kind.as_str().to_string(),
            r.spec.cpus,
            Some(r.spec.max_run_secs),
            r.spec.max_attempts,
        ),
        (None, None) => ("sequential".into(), 1, None, 1),
    };
    let mut plan = JobPlan {
        name: job_name(seen.id),
        user: users
            .get(&seen.user)
            .cloned()
            .unwrap_or_else(|| "admin".into()),
        at_ms: seen.at_ms,
        kind,
        cpus: cpus.max(1),
        duration_ms: 1_000,
        exit_code: 0,
        output: String::new(),
        output_parts: 1,
        term_output: String::new(),
        hang: false,
        crash: false,
        max_run_secs,
        max_attempts: max_attempts.max(1),
        stop_ms: 0,
        start_ms: 0,
        client_timeout_ms: 0,
        no_retry: false,
    };
    let Some(record) = record else {
        lines.push("No record of it in the bundle: a one-second job that exits 0.".into());
        return (plan, lines, None);
    };
    // How long its first process took to start, beyond the two messages
    // the simulator's network carries meanwhile (the order, the report).
    if let Some(first) = record.attempts.first() {
        if let Some(started) = first.started_at {
            let took = started.0.saturating_sub(first.dispatched_at.0);
            let start_ms = took.saturating_sub(SIM_HOPS_MS);
            if start_ms >= SIM_HOPS_MS {
                plan.start_ms = start_ms.min(600_000);
                lines.push(format!(
                    "Its first process started {took} ms after it was dispatched."
                ));
            }
        }
    }
    // Its program, from the attempt that ended by itself.
    let natural = record.attempts.iter().rev().find_map(|a| match &a.outcome {
        Some(
            o @ (Outcome::Exited { .. } | Outcome::Signaled { .. } | Outcome::SpawnFailed { .. }),
        ) => Some((o.clone(), a.run_ms.unwrap_or(0))),
        _ => None,
    });
    match natural {
        Some((Outcome::Exited { code }, run_ms)) => {
            plan.duration_ms = run_ms;
            plan.exit_code = code;
            plan.output = record.output_tail.clone();
            lines.push(format!("It exited with code {code} after {run_ms} ms."));
        }
        Some((Outcome::Signaled { signal }, run_ms)) => {
            plan.duration_ms = run_ms;
            plan.crash = true;
            plan.output = record.output_tail.clone();
            lines.push(format!(
                "It died of signal {signal} after {run_ms} ms (the simulator's crash is a \
                 SIGSEGV)."
            ));
        }
        Some((Outcome::SpawnFailed { error }, _)) => {
            plan.duration_ms = 0;
            plan.exit_code = 127;
            lines.push(format!(
                "It could not be started ({error}); the simulator cannot fail a start: written \
                 as an exit with code 127 at once."
            ));
        }
        _ => {
            let ran = record
                .attempts
                .iter()
                .filter_map(|a| {
                    let start = a.started_at?.0;
                    let end = a.ended_at.map(|e| e.0).or(created).unwrap_or(start);
                    Some(a.run_ms.unwrap_or(end.saturating_sub(start)))
                })
                .max();
            match ran {
                Some(ran) if record.state.is_terminal() => {
                    let how: Vec<String> = record
                        .attempts
                        .iter()
                        .map(|a| match &a.outcome {
                            Some(Outcome::Killed) => "killed".to_string(),
                            Some(Outcome::Fenced) => "fenced".to_string(),
                            None => "lost".to_string(),
                            Some(other) => format!("{other:?}"),
                        })
                        .collect();
                    let how = how.join(", ");
                    if matches!(record.state, JobState::Canceled | JobState::TimedOut) {
                        // Its cancel or its run limit ends it, here too.
                        plan.hang = true;
                        lines.push(format!(
                            "It never ended by itself (attempts {how}; the longest ran {ran} \
                             ms): a process that runs until it is killed."
                        ));
                    } else {
                        // Its end is unknown: it ran at least until it was
                        // killed, and may have run until the bundle was taken.
                        let first = record.attempts.iter().find_map(|a| a.started_at);
                        let until = match (first, created) {
                            (Some(first), Some(created)) => created.saturating_sub(first.0),
                            _ => 0,
                        };
                        plan.duration_ms = ran.max(until);
                        lines.push(format!(
                            "It never ended by itself (attempts {how}; the longest ran {ran} \
                             ms) and no cancel or run limit stopped it: its own end is \
                             unknown; written to run {} ms (from its first start to the \
                             bundle), then exit 0.",
                            plan.duration_ms
                        ));
                    }
                }
                Some(ran) => {
                    plan.duration_ms = ran;
                    lines.push(format!(
                        "Still running when the bundle was taken, after {ran} ms: written to \
                         end then, with code 0."
                    ));
                }
                None if record.state.is_terminal() => {
                    lines.push("It never started: a one-second job that exits 0.".to_string());
                }
                None => lines.push(
                    "Still waiting when the bundle was taken: a one-second job that exits 0."
                        .to_string(),
                ),
            }
        }
    }
    // A cancel that decided (it reached the supervisor before the job's
    // end did) decides here too, however close the race was.
    if record.state == JobState::Canceled && canceled.contains(&plan.name) && !plan.hang {
        plan.hang = true;
        lines.push(
            "Its cancel reached the supervisor before its end did: written as a process \
             that runs until killed, so that the cancel decides here too."
                .into(),
        );
    }
    if record
        .history
        .iter()
        .any(|t| t.reason.contains(StopReason::RunTimeout.as_str()))
        && !plan.hang
    {
        lines.push("It reached its run limit.".into());
    }
    if !config.plans.contains_key(&*record.plan) {
        lines.push(format!(
            "Its plan {:?} is not in the configuration.",
            record.plan
        ));
    }
    let end = record.state.is_terminal().then(|| Recorded {
        state: record.state,
        attempts: record.attempts.len(),
        exit_code: record.exit_code,
        reason: record.reason.to_string(),
    });
    if let Some(end) = &end {
        lines.push(format!(
            "It ended {} after {} attempts: {}",
            end.state.as_str(),
            end.attempts,
            end.reason
        ));
    }
    (plan, lines, end)
}

#[cfg(test)]
mod tests;
