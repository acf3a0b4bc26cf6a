//! Scenarios as data: a TOML file names a topology, a workload, a fault plan
//! and what must be true at the end. The format is documented in
//! `scenarios/README.md`; `Scenario::parse` turns a file into a checked
//! scenario or an error naming the file, line and field.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;

use foreman::core::{CoreConfig, JobState};

use crate::runner::KILL_GRACE_MS;
use serde::{Deserialize, Serialize};
use toml::Spanned;

/// A user of the world: a name, a plan and (derived) a token.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserSpec {
    pub name: String,
    pub plan: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Topology {
    pub agents: usize,
    pub cpus: u32,
    /// CPUs of the first agents, one by one (the rest have `cpus`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub agent_cpus: Vec<u32>,
    pub ping_interval_ms: u64,
    pub ping_timeout_ms: u64,
    /// The range one network message takes, in ms: `[min, max]`.
    pub latency_ms: [u64; 2],
    /// The fraction of network messages lost on their first try (0 to
    /// 0.5). A lost message on a connection is sent again after a backoff
    /// (1 ms, doubling), as TCP would, delaying it and everything behind
    /// it; a lost connection attempt is refused.
    pub loss: f64,
    /// The longest an agent waits between two connection attempts (the
    /// shipped agent waits at most 10 s).
    pub reconnect_max_ms: u64,
    /// How long each of the supervisor's commits takes (a disk's fsync):
    /// a supervisor crash can land before it is durable or after, before
    /// anything of its batch is sent.
    pub commit_ms: u64,
    /// The output tail an agent's report carries, in bytes (the shipped
    /// agent's 4096).
    pub output_tail_bytes: usize,
    /// The supervisor's journal segment bound in bytes (0: no journal).
    /// Every segment is replayed after the run and checked.
    pub journal_segment_bytes: u64,
    /// Overrides of the supervisor's core settings (any `CoreConfig` field).
    pub core: toml::Table,
}

impl Default for Topology {
    fn default() -> Self {
        Topology {
            agents: 2,
            cpus: 1,
            agent_cpus: Vec::new(),
            ping_interval_ms: 500,
            ping_timeout_ms: 2_000,
            latency_ms: [1, 5],
            loss: 0.0,
            reconnect_max_ms: 2_000,
            commit_ms: 0,
            output_tail_bytes: 4096,
            journal_segment_bytes: 65_536,
            core: toml::Table::new(),
        }
    }
}

/// The name of agent number `i`, as it says hello.
pub fn agent_name(i: usize) -> String {
    format!("agent-{i}")
}

impl Topology {
    /// The CPUs of agent number `agent`.
    pub fn cpus_of(&self, agent: usize) -> u32 {
        self.agent_cpus.get(agent).copied().unwrap_or(self.cpus)
    }

    /// The CPUs of the largest agent.
    pub fn cpus_max(&self) -> u32 {
        (0..self.agents).map(|a| self.cpus_of(a)).max().unwrap_or(0)
    }
}

/// One job of the workload and how its simulated process behaves.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobPlan {
    pub name: String,
    /// Who submits it (a `[[users]]` name, or "admin").
    #[serde(default = "admin")]
    pub user: String,
    /// When it is submitted, in simulated ms from the start.
    #[serde(default)]
    pub at_ms: u64,
    #[serde(default = "sequential")]
    pub kind: String,
    #[serde(default = "one")]
    pub cpus: u32,
    /// How long its process runs.
    #[serde(default = "second")]
    pub duration_ms: u64,
    #[serde(default)]
    pub exit_code: i32,
    /// What its process prints (to its run dir's `output`).
    #[serde(default)]
    pub output: String,
    /// It prints `output` in this many parts of equal bytes (a part may end
    /// inside a character), spread over its duration, the last at its exit.
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub output_parts: u32,
    /// What its process prints once killed, while it dies.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub term_output: String,
    /// The process never ends by itself (only a kill ends it).
    #[serde(default)]
    pub hang: bool,
    /// The process dies of a signal (SIGSEGV) at the end of its duration.
    #[serde(default)]
    pub crash: bool,
    #[serde(default)]
    pub max_run_secs: Option<u64>,
    #[serde(default = "one")]
    pub max_attempts: u32,
    /// How long its process takes to die once killed (as a real one takes
    /// between SIGTERM and its exit), at most the runner's kill grace.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub stop_ms: u64,
    /// How long its process takes to start once its agent is told to run
    /// it (a real agent makes its run dir, forks and execs): the process
    /// and its clock start this much later, and a kill meanwhile lands
    /// once it has started.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub start_ms: u64,
    /// Its client gives up on each submit request after this long and
    /// hangs up (mid-request: the supervisor may have committed it); 0: 10 s.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub client_timeout_ms: u64,
    /// Its client never retries a submission that got no answer.
    #[serde(default, skip_serializing_if = "is_false")]
    pub no_retry: bool,
}

fn is_one(n: &u32) -> bool {
    *n == 1
}

fn is_false(b: &bool) -> bool {
    !*b
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

fn admin() -> String {
    "admin".into()
}
fn sequential() -> String {
    "sequential".into()
}
fn one() -> u32 {
    1
}
fn second() -> u64 {
    1_000
}

/// Which agents a fault touches.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Target {
    One(usize),
    /// "all"
    All(String),
}

impl Target {
    pub fn agents(&self, count: usize) -> Vec<usize> {
        match self {
            Target::One(i) => vec![*i],
            Target::All(_) => (0..count).collect(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    KillAgent,
    RestartAgent,
    /// The agent's host reboots without closing its connections: the
    /// supervisor's side of them stays half-open (as after a power cut)
    /// until its ping timeout, or until the new agent's connection with the
    /// same id replaces it.
    RebootAgent,
    PauseAgent,
    ResumeAgent,
    /// Both directions between the agent and the supervisor are cut.
    Partition,
    Heal,
    /// Nothing from the agent reaches the supervisor, so its pongs are lost
    /// (madsim's TCP never drops a byte; a one-way clog stands for dropped
    /// pings and the ping timeout must notice).
    DropPings,
    RestorePings,
    /// Every message takes `latency_ms` from now on.
    Latency,
    /// The clients are cut off from the supervisor (both directions), and
    /// back.
    PartitionClients,
    HealClients,
    CrashSupervisor,
    RestartSupervisor,
    Cancel,
}

/// A situation a job must be in for a cancel to fire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Situation {
    /// Queued, not yet granted a CPU slot.
    WaitingForSlot,
    /// Granted and sent to an agent, not yet started there.
    Dispatched,
    Running,
    /// Its agent's connection is gone and the grace period runs.
    AgentReconnecting,
    /// It has ended: the cancel changes nothing (as one that reached a
    /// supervisor after the job's end).
    Ended,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fault {
    #[serde(default)]
    pub at_ms: u64,
    pub action: Action,
    #[serde(default)]
    pub agent: Option<Target>,
    /// For `cancel`: the job's name. For an agent fault without `agent`: the
    /// job whose agent it hits (once the job runs).
    #[serde(default)]
    pub job: Option<String>,
    /// For `cancel`: fire only once the job is in this situation (waiting
    /// from `at_ms` on).
    #[serde(default)]
    pub when: Option<Situation>,
    /// For `latency`.
    #[serde(default)]
    pub latency_ms: Option<[u64; 2]>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Expect {
    /// After the last fault, everything must settle within this much
    /// simulated time: every job terminal, every live agent connected and idle.
    pub settle_ms: u64,
    /// End states of named jobs.
    pub states: BTreeMap<String, JobState>,
    /// Attempts made by named jobs.
    pub attempts: BTreeMap<String, usize>,
    /// Jobs named in the order their first attempt was dispatched (a subsequence check).
    pub dispatch_order: Vec<String>,
    /// Rare events (`rare::ALL`) the run must reach: what the scenario exists for.
    pub reached: Vec<String>,
    /// Output tails of named jobs, exactly.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub outputs: BTreeMap<String, String>,
    /// Exit codes of named jobs (of the attempt that ended them).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub exit_codes: BTreeMap<String, i32>,
    /// Words the reasons of named jobs must contain.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub reasons: BTreeMap<String, String>,
}

impl Default for Expect {
    fn default() -> Self {
        Expect {
            settle_ms: 120_000,
            states: BTreeMap::new(),
            attempts: BTreeMap::new(),
            dispatch_order: Vec::new(),
            reached: Vec::new(),
            outputs: BTreeMap::new(),
            exit_codes: BTreeMap::new(),
            reasons: BTreeMap::new(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    #[serde(default)]
    description: String,
    #[serde(default)]
    topology: Topology,
    #[serde(default)]
    users: Vec<Spanned<UserSpec>>,
    #[serde(default)]
    jobs: Vec<Spanned<JobPlan>>,
    #[serde(default)]
    faults: Vec<Spanned<Fault>>,
    #[serde(default)]
    expect: Option<Spanned<Expect>>,
}

/// A checked scenario.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Scenario {
    pub name: String,
    pub description: String,
    pub topology: Topology,
    pub users: Vec<UserSpec>,
    pub jobs: Vec<JobPlan>,
    pub faults: Vec<Fault>,
    pub expect: Expect,
    /// The supervisor's settings: the defaults with the topology's overrides.
    #[serde(skip)]
    pub core: CoreConfig,
}

/// What is wrong with a scenario file, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScenarioError {
    pub file: String,
    pub line: usize,
    pub field: String,
    pub message: String,
}

impl fmt::Display for ScenarioError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}: {}: {}",
            self.file, self.line, self.field, self.message
        )
    }
}

impl std::error::Error for ScenarioError {}

/// Largest scenario file read, and largest workload: a scenario is a test,
/// not a load generator.
pub const FILE_BYTES_MAX: usize = 1 << 20;
pub const JOBS_MAX: usize = 10_000;
pub const AGENTS_MAX: usize = 64;
pub const FAULTS_MAX: usize = 10_000;
/// Past half the messages lost, resends back off for whole seconds: the
/// network is down, which partitions say more plainly.
pub const LOSS_MAX: f64 = 0.5;

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

impl Scenario {
    /// Reads and checks a scenario file.
    pub fn load(path: &std::path::Path) -> Result<Scenario, ScenarioError> {
        let file = path.display().to_string();
        let error = |message: String| ScenarioError {
            file: file.clone(),
            line: 0,
            field: "-".into(),
            message,
        };
        let meta = std::fs::metadata(path).map_err(|e| error(e.to_string()))?;
        if meta.len() > FILE_BYTES_MAX as u64 {
            return Err(error(format!(
                "{} bytes; a scenario is at most {FILE_BYTES_MAX}",
                meta.len()
            )));
        }
        let bytes = std::fs::read(path).map_err(|e| error(e.to_string()))?;
        let text = String::from_utf8(bytes).map_err(|e| error(format!("not UTF-8: {e}")))?;
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        Scenario::parse(&file, &name, &text)
    }

    /// Parses and checks scenario text; `file` names it in errors.
    pub fn parse(file: &str, name: &str, text: &str) -> Result<Scenario, ScenarioError> {
        let at = |span: Option<Range<usize>>, field: &str, message: String| ScenarioError {
            file: file.to_string(),
            line: span.map_or(0, |s| line_of(text, s.start)),
            field: field.to_string(),
            message,
        };
        if text.len() > FILE_BYTES_MAX {
            return Err(at(
                None,
                "-",
                format!(
                    "{} bytes; a scenario is at most {FILE_BYTES_MAX}",
                    text.len()
                ),
            ));
        }
        let raw: Raw = toml::from_str(text).map_err(|e| {
            let span = e.span();
            at(span.clone(), &field_at(text, span), e.message().to_string())
        })?;
        let users: Vec<UserSpec> = raw.users.iter().map(|u| u.get_ref().clone()).collect();
        let topology = raw.topology;
        // The topology's core overrides, over the defaults.
        let core = {
            let mut table = toml::Table::try_from(CoreConfig::default())
                .map_err(|e| at(None, "topology.core", e.to_string()))?;
            merge(&mut table, &topology.core);
            let core: CoreConfig = table.try_into().map_err(|e: toml::de::Error| {
                at(
                    find_line(text, "[topology.core]"),
                    "topology.core",
                    e.message().to_string(),
                )
            })?;
            core
        };
        let topo_span = find_line(text, "[topology]");
        if topology.agents == 0 || topology.agents > AGENTS_MAX {
            return Err(at(
                topo_span.clone(),
                "topology.agents",
                format!("{} agents; between 1 and {AGENTS_MAX}", topology.agents),
            ));
        }
        if topology.cpus == 0 || topology.cpus > core.agent_cpus_max {
            return Err(at(
                topo_span.clone(),
                "topology.cpus",
                format!(
                    "{} cpus per agent; between 1 and {}",
                    topology.cpus, core.agent_cpus_max
                ),
            ));
        }
        if topology.agent_cpus.len() > topology.agents
            || topology
                .agent_cpus
                .iter()
                .any(|&c| c == 0 || c > core.agent_cpus_max)
        {
            return Err(at(
                topo_span.clone(),
                "topology.agent_cpus",
                format!(
                    "{:?}: at most one per agent, each between 1 and {}",
                    topology.agent_cpus, core.agent_cpus_max
                ),
            ));
        }
        if topology.ping_interval_ms == 0 || topology.ping_timeout_ms <= topology.ping_interval_ms {
            return Err(at(
                topo_span.clone(),
                "topology.ping_timeout_ms",
                "the ping interval must be positive and shorter than the ping timeout".into(),
            ));
        }
        if topology.commit_ms > 10_000 {
            return Err(at(
                topo_span.clone(),
                "topology.commit_ms",
                format!("{} ms; at most 10 s", topology.commit_ms),
            ));
        }
        if !(1..=1 << 20).contains(&topology.output_tail_bytes) {
            return Err(at(
                topo_span.clone(),
                "topology.output_tail_bytes",
                format!("{}; between 1 byte and 1 MiB", topology.output_tail_bytes),
            ));
        }
        if topology.journal_segment_bytes > 1 << 26 {
            return Err(at(
                topo_span.clone(),
                "topology.journal_segment_bytes",
                format!("{}; at most 64 MiB", topology.journal_segment_bytes),
            ));
        }
        if !(100..=600_000).contains(&topology.reconnect_max_ms) {
            return Err(at(
                topo_span.clone(),
                "topology.reconnect_max_ms",
                format!(
                    "{} ms; between 100 ms and 10 minutes",
                    topology.reconnect_max_ms
                ),
            ));
        }
        // The agent fences its kill grace (the slowest death) earlier.
        let stop_ms_max = raw
            .jobs
            .iter()
            .map(|j| j.get_ref().stop_ms)
            .max()
            .unwrap_or(0);
        // Four ping intervals (as the supervisor requires), and room for
        // the slowest death beyond the agent's three-interval floor
        // (PROTOCOL.md, Fencing).
        let grace_min = topology
            .ping_interval_ms
            .saturating_mul(4)
            .saturating_add(stop_ms_max);
        if core.agent_grace_ms < grace_min {
            return Err(at(
                find_line(text, "[topology.core]").or(topo_span.clone()),
                "topology.core.agent_grace_ms",
                format!(
                    "{} ms; at least four ping intervals and the slowest death ({grace_min} ms)",
                    core.agent_grace_ms,
                ),
            ));
        }
        if topology.latency_ms[0] > topology.latency_ms[1] {
            return Err(at(
                topo_span,
                "topology.latency_ms",
                "[min, max] with min <= max".into(),
            ));
        }
        if !(0.0..=LOSS_MAX).contains(&topology.loss) {
            return Err(at(
                topo_span,
                "topology.loss",
                format!("{}: a fraction from 0 to {LOSS_MAX}", topology.loss),
            ));
        }
        let mut user_names = std::collections::BTreeSet::from(["admin".to_string()]);
        for (i, user) in raw.users.iter().enumerate() {
            let field = format!("users[{i}]");
            let u = user.get_ref();
            if !core.plans.contains_key(&u.plan) {
                return Err(at(
                    Some(user.span()),
                    &format!("{field}.plan"),
                    format!("no plan {:?}", u.plan),
                ));
            }
            if u.name.is_empty()
                || u.name.len() > 64
                || !u
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-')
            {
                return Err(at(
                    Some(user.span()),
                    &format!("{field}.name"),
                    format!("{:?}: 1 to 64 letters, digits or '-'", u.name),
                ));
            }
            if !user_names.insert(u.name.clone()) {
                return Err(at(
                    Some(user.span()),
                    &format!("{field}.name"),
                    format!("{:?} appears twice", u.name),
                ));
            }
        }
        if raw.jobs.len() > JOBS_MAX {
            return Err(at(
                None,
                "jobs",
                format!("{} jobs; at most {JOBS_MAX}", raw.jobs.len()),
            ));
        }
        let mut job_names = std::collections::BTreeSet::new();
        for (i, job) in raw.jobs.iter().enumerate() {
            let span = Some(job.span());
            let j = job.get_ref();
            let field = |f: &str| format!("jobs[{i}].{f}");
            if j.name.is_empty() || !job_names.insert(j.name.clone()) {
                return Err(at(
                    span,
                    &field("name"),
                    format!("{:?}: empty or not unique", j.name),
                ));
            }
            if j.stop_ms > KILL_GRACE_MS {
                return Err(at(
                    span,
                    &field("stop_ms"),
                    format!("{} ms; at most {KILL_GRACE_MS}", j.stop_ms),
                ));
            }
            if j.start_ms > 600_000 {
                return Err(at(
                    span,
                    &field("start_ms"),
                    format!("{} ms; at most 10 minutes", j.start_ms),
                ));
            }
            if !(1..=64).contains(&j.output_parts) {
                return Err(at(
                    span,
                    &field("output_parts"),
                    format!("{}; between 1 and 64", j.output_parts),
                ));
            }
            if !user_names.contains(&j.user) {
                return Err(at(span, &field("user"), format!("no user {:?}", j.user)));
            }
            if foreman::core::Kind::parse(&j.kind).is_none() {
                return Err(at(
                    span,
                    &field("kind"),
                    format!("{:?}: sequential or parallel", j.kind),
                ));
            }
            if j.cpus == 0 || j.cpus > topology.cpus_max() {
                return Err(at(
                    span,
                    &field("cpus"),
                    format!(
                        "{} cpus; between 1 and the largest agent's {}",
                        j.cpus,
                        topology.cpus_max()
                    ),
                ));
            }
            if j.max_attempts == 0 {
                return Err(at(span, &field("max_attempts"), "at least 1".into()));
            }
        }
        if raw.faults.len() > FAULTS_MAX {
            return Err(at(
                None,
                "faults",
                format!("{} faults; at most {FAULTS_MAX}", raw.faults.len()),
            ));
        }
        for (i, fault) in raw.faults.iter().enumerate() {
            let span = Some(fault.span());
            let f = fault.get_ref();
            let field = |n: &str| format!("faults[{i}].{n}");
            let needs_agent = matches!(
                f.action,
                Action::KillAgent
                    | Action::RestartAgent
                    | Action::RebootAgent
                    | Action::PauseAgent
                    | Action::ResumeAgent
                    | Action::Partition
                    | Action::Heal
                    | Action::DropPings
                    | Action::RestorePings
            );
            match (&f.agent, &f.job, needs_agent) {
                (Some(_), Some(_), true) => {
                    return Err(at(
                        span,
                        &field("job"),
                        "an agent or a job, not both".into(),
                    ))
                }
                (None, None, true) => {
                    return Err(at(
                        span,
                        &field("agent"),
                        "this action needs an agent (or the job whose agent it hits)".into(),
                    ))
                }
                (Some(_), _, false) => {
                    return Err(at(
                        span,
                        &field("agent"),
                        "this action takes no agent".into(),
                    ))
                }
                (Some(Target::One(n)), _, true) if *n >= topology.agents => {
                    return Err(at(
                        span,
                        &field("agent"),
                        format!("agent {n}; there are {}", topology.agents),
                    ))
                }
                (Some(Target::All(s)), _, true) if s != "all" => {
                    return Err(at(
                        span,
                        &field("agent"),
                        format!("{s:?}: an agent number or \"all\""),
                    ))
                }
                _ => {}
            }
            match (f.action, &f.job) {
                (Action::Cancel, None) => {
                    return Err(at(span, &field("job"), "cancel needs a job".into()))
                }
                (_, Some(job)) if !job_names.contains(job) => {
                    return Err(at(span, &field("job"), format!("no job {job:?}")))
                }
                (_, Some(_)) if !needs_agent && f.action != Action::Cancel => {
                    return Err(at(span, &field("job"), "this action takes no job".into()))
                }
                _ => {}
            }
            if f.when.is_some() && f.action != Action::Cancel {
                return Err(at(
                    span,
                    &field("when"),
                    "only cancel takes a situation".into(),
                ));
            }
            match (f.action, f.latency_ms) {
                (Action::Latency, None) => {
                    return Err(at(
                        span,
                        &field("latency_ms"),
                        "latency needs [min, max]".into(),
                    ))
                }
                (Action::Latency, Some([lo, hi])) if lo > hi => {
                    return Err(at(
                        span,
                        &field("latency_ms"),
                        "[min, max] with min <= max".into(),
                    ))
                }
                (Action::Latency, _) => {}
                (_, Some(_)) => {
                    return Err(at(
                        span,
                        &field("latency_ms"),
                        "only latency takes latency_ms".into(),
                    ))
                }
                _ => {}
            }
        }
        let expect_span = raw.expect.as_ref().map(|e| e.span());
        let expect = raw.expect.map(Spanned::into_inner).unwrap_or_default();
        for (field, names) in [
            ("expect.states", expect.states.keys().collect::<Vec<_>>()),
            ("expect.attempts", expect.attempts.keys().collect()),
            ("expect.outputs", expect.outputs.keys().collect()),
            ("expect.exit_codes", expect.exit_codes.keys().collect()),
            ("expect.reasons", expect.reasons.keys().collect()),
            (
                "expect.dispatch_order",
                expect.dispatch_order.iter().collect(),
            ),
        ] {
            if let Some(name) = names.into_iter().find(|n| !job_names.contains(*n)) {
                return Err(at(expect_span.clone(), field, format!("no job {name:?}")));
            }
        }
        if let Some(name) = expect.reached.iter().find(|n| !crate::rare::is_known(n)) {
            let known: Vec<&str> = crate::rare::ALL.iter().map(|(n, _)| *n).collect();
            return Err(at(
                expect_span,
                "expect.reached",
                format!("no rare event {name:?}; known: {}", known.join(", ")),
            ));
        }
        Ok(Scenario {
            name: name.to_string(),
            description: raw.description,
            topology,
            users,
            jobs: raw.jobs.into_iter().map(Spanned::into_inner).collect(),
            faults: raw.faults.into_iter().map(Spanned::into_inner).collect(),
            expect,
            core,
        })
    }

    /// The simulated runner's kill grace in this scenario: the slowest of
    /// its processes to die once killed (its largest `stop_ms`).
    pub fn kill_grace_ms(&self) -> u64 {
        self.jobs.iter().map(|j| j.stop_ms).max().unwrap_or(0)
    }

    /// The time the fault plan and the workload end.
    pub fn plan_end_ms(&self) -> u64 {
        let jobs = self.jobs.iter().map(|j| j.at_ms);
        let faults = self.faults.iter().map(|f| f.at_ms);
        jobs.chain(faults).max().unwrap_or(0)
    }

    /// The scenario as TOML (what the fuzzer saves beside a failure).
    pub fn to_toml(&self) -> String {
        let written = toml::Table::try_from(self).and_then(|mut table| {
            // The name is the file's.
            table.remove("name");
            toml::to_string(&table)
        });
        written.unwrap_or_else(|e| format!("# cannot write: {e}\n"))
    }
}

/// The key on the line of `span`, for an error from the TOML decoder.
fn field_at(text: &str, span: Option<Range<usize>>) -> String {
    let Some(span) = span else { return "-".into() };
    let start = text[..span.start.min(text.len())]
        .rfind('\n')
        .map_or(0, |i| i + 1);
    let line = text[start..].lines().next().unwrap_or("");
    let key = line.split('=').next().unwrap_or("").trim();
    if key.is_empty() || key.len() > 64 {
        "-".into()
    } else {
        key.trim_matches(['[', ']']).to_string()
    }
}

fn find_line(text: &str, needle: &str) -> Option<Range<usize>> {
    text.find(needle).map(|i| i..i + needle.len())
}

fn merge(base: &mut toml::Table, over: &toml::Table) {
    for (key, value) in over {
        match (base.get_mut(key), value) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            _ => {
                base.insert(key.clone(), value.clone());
            }
        }
    }
}

#[cfg(test)]
mod tests;
