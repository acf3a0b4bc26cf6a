//! What the core is told at construction: plans, CPU pools, timeouts and the
//! bounds on everything a submitter or agent can send. Every size and time has
//! its unit in its name and a maximum.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::types::Kind;

/// What a plan allows for one kind of job.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KindLimits {
    /// How many jobs of this kind one user may hold resources for at once.
    pub max_running: u32,
    /// The longest run a job may ask for (`max_run_secs`), counted from running.
    pub max_run_secs_limit: u64,
    /// The run limit of a job that asks for none.
    pub default_run_secs: u64,
}

/// A plan: a priority (higher is served first) and limits per kind.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    pub priority: u8,
    /// How many jobs, of both kinds, one user may have waiting in the queue;
    /// a submission past it is refused (HTTP 429) and loses nothing queued.
    #[serde(default = "default_max_queued")]
    pub max_queued: u32,
    pub sequential: KindLimits,
    pub parallel: KindLimits,
}

fn default_max_queued() -> u32 {
    10_000
}

impl Plan {
    pub fn limits(&self, kind: Kind) -> &KindLimits {
        match kind {
            Kind::Sequential => &self.sequential,
            Kind::Parallel => &self.parallel,
        }
    }
}

/// Bounds on what a submission may carry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SubmitLimits {
    pub argv_items_max: usize,
    pub argv_bytes_max: usize,
    pub env_items_max: usize,
    pub env_bytes_max: usize,
    pub labels_max: usize,
    pub label_bytes_max: usize,
    pub cwd_bytes_max: usize,
    pub idempotency_key_bytes_max: usize,
    pub attempts_max: u32,
    pub queue_timeout_secs_max: u64,
}

impl Default for SubmitLimits {
    fn default() -> Self {
        SubmitLimits {
            argv_items_max: 4096,
            argv_bytes_max: 128 * 1024,
            env_items_max: 256,
            env_bytes_max: 64 * 1024,
            labels_max: 32,
            label_bytes_max: 256,
            cwd_bytes_max: 4096,
            idempotency_key_bytes_max: 256,
            attempts_max: 10,
            queue_timeout_secs_max: 30 * 24 * 3600,
        }
    }
}

/// Every field may be left out of a configuration file: it then takes the
/// value of `CoreConfig::default()`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CoreConfig {
    pub plans: BTreeMap<String, Plan>,
    /// CPUs that jobs of each kind may hold at once across all agents.
    pub pool_sequential_cpus: u32,
    pub pool_parallel_cpus: u32,
    /// The most CPUs one agent may offer, and so the most one job may ask for.
    pub agent_cpus_max: u32,
    pub agents_max: usize,
    pub agent_id_bytes_max: usize,
    /// Time for an agent to answer a run with "started".
    pub dispatch_ack_timeout_ms: u64,
    /// Time for an agent to confirm that it killed an attempt; past it the
    /// agent is closed as unresponsive (so a stuck kill cannot hold slots forever).
    pub stop_timeout_ms: u64,
    /// How long a lost agent's jobs wait for it to come back.
    pub agent_grace_ms: u64,
    /// Queue timeout for jobs that ask for none; `None` waits forever.
    pub default_queue_timeout_secs: Option<u64>,
    /// How long a repeated idempotency key returns the first job.
    pub idempotency_window_secs: u64,
    pub output_tail_bytes_max: usize,
    pub reason_bytes_max: usize,
    pub submit: SubmitLimits,
    /// The operating-system user each Foreman user's jobs run as (`"*"`:
    /// everyone not named). A user not mapped runs as the agent's default
    /// (for an agent running as root: `nobody`).
    pub run_as: BTreeMap<String, String>,
}

impl CoreConfig {
    pub fn pool_cpus(&self, kind: Kind) -> u32 {
        match kind {
            Kind::Sequential => self.pool_sequential_cpus,
            Kind::Parallel => self.pool_parallel_cpus,
        }
    }
}

impl Default for CoreConfig {
    /// Two plans in the spirit of the reference system: basic users hold one
    /// parallel job at a time, premium users four and get served first.
    fn default() -> Self {
        let basic = Plan {
            priority: 0,
            max_queued: 1_000,
            sequential: KindLimits {
                max_running: 4,
                max_run_secs_limit: 3600,
                default_run_secs: 3600,
            },
            parallel: KindLimits {
                max_running: 1,
                max_run_secs_limit: 3600,
                default_run_secs: 3600,
            },
        };
        let premium = Plan {
            priority: 10,
            max_queued: default_max_queued(),
            sequential: KindLimits {
                max_running: 8,
                max_run_secs_limit: 7 * 24 * 3600,
                default_run_secs: 3600,
            },
            parallel: KindLimits {
                max_running: 4,
                max_run_secs_limit: 7 * 24 * 3600,
                default_run_secs: 7200,
            },
        };
        CoreConfig {
            plans: BTreeMap::from([
                ("basic".to_string(), basic),
                ("premium".to_string(), premium),
            ]),
            pool_sequential_cpus: 1024,
            pool_parallel_cpus: 1024,
            agent_cpus_max: 256,
            agents_max: 10_000,
            agent_id_bytes_max: 128,
            dispatch_ack_timeout_ms: 30_000,
            stop_timeout_ms: 30_000,
            agent_grace_ms: 60_000,
            default_queue_timeout_secs: None,
            idempotency_window_secs: 24 * 3600,
            output_tail_bytes_max: 4096,
            reason_bytes_max: 1024,
            submit: SubmitLimits::default(),
            run_as: BTreeMap::new(),
        }
    }
}
