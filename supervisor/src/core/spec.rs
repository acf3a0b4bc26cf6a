//! A submission as it arrives, and its validation into a `JobSpec`.
//! Every rejection is a typed `SubmitError`; nothing here panics on input.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::config::{CoreConfig, Plan};
use super::types::{JobId, Kind};

/// A submission as the API decoded it. `kind` is still text so that an unknown
/// kind is the core's error to report, with the same wording everywhere.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubmitSpec {
    pub argv: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub cwd: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default = "default_kind")]
    pub kind: String,
    #[serde(default = "default_cpus")]
    pub cpus: u32,
    #[serde(default)]
    pub max_run_secs: Option<u64>,
    #[serde(default)]
    pub queue_timeout_secs: Option<u64>,
    #[serde(default = "default_attempts")]
    pub max_attempts: u32,
    #[serde(default)]
    pub idempotency_key: Option<String>,
}

fn default_kind() -> String {
    Kind::Sequential.as_str().to_string()
}
fn default_cpus() -> u32 {
    1
}
fn default_attempts() -> u32 {
    1
}

impl SubmitSpec {
    /// A sequential one-CPU job running `argv`, with every other field defaulted.
    pub fn command<S: Into<String>>(argv: impl IntoIterator<Item = S>) -> SubmitSpec {
        SubmitSpec {
            argv: argv.into_iter().map(Into::into).collect(),
            kind: default_kind(),
            cpus: 1,
            max_attempts: 1,
            ..SubmitSpec::default()
        }
    }
}

/// A validated job specification: what an agent needs to run the job.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobSpec {
    pub argv: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub cwd: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub kind: Kind,
    pub cpus: u32,
    pub max_run_secs: u64,
    pub queue_timeout_secs: Option<u64>,
    pub max_attempts: u32,
    pub idempotency_key: Option<String>,
    /// The operating-system user the job runs as (the supervisor's
    /// `run_as` for its Foreman user); `None`: the agent's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_as: Option<String>,
}

impl JobSpec {
    /// A digest of the whole specification, so that a repeated idempotency
    /// key can be told apart from a different request reusing it.
    pub fn digest(&self) -> u64 {
        use sha2::Digest;
        let bytes = serde_json::to_vec(self).expect("a job spec serializes");
        let hash = sha2::Sha256::digest(&bytes);
        u64::from_be_bytes(hash[..8].try_into().expect("8 bytes"))
    }

    /// The digest of what was asked: the spec without what the supervisor's
    /// configuration added to it (`run_as`), so that a change of mapping
    /// does not make a genuine retry a conflict.
    pub fn request_digest(&self) -> u64 {
        JobSpec {
            run_as: None,
            ..self.clone()
        }
        .digest()
    }
}

#[cfg(test)]
impl JobSpec {
    /// A sequential one-CPU job of `argv` with a minute's run limit, for
    /// the tests of the layers that carry specs (hub, agent).
    pub(crate) fn for_test(argv: &[&str], max_attempts: u32) -> JobSpec {
        JobSpec {
            argv: argv.iter().map(|a| a.to_string()).collect(),
            env: BTreeMap::new(),
            cwd: None,
            labels: BTreeMap::new(),
            kind: Kind::Sequential,
            cpus: 1,
            max_run_secs: 60,
            queue_timeout_secs: None,
            max_attempts,
            idempotency_key: None,
            run_as: None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[serde(tag = "error", rename_all = "snake_case")]
pub enum SubmitError {
    #[error("argv is empty: give the command to run")]
    EmptyArgv,
    #[error("argv[0] is empty")]
    EmptyProgram,
    #[error("{field} has {count} items; at most {max} are allowed")]
    TooMany {
        field: String,
        count: usize,
        max: usize,
    },
    #[error("{field} is {bytes} bytes; at most {max} are allowed")]
    TooLarge {
        field: String,
        bytes: usize,
        max: usize,
    },
    #[error("{field} contains a NUL byte")]
    NulByte { field: String },
    #[error("env name {name:?} is not valid: it must be non-empty and contain no '='")]
    BadEnvName { name: String },
    #[error("unknown kind {kind:?}: use \"sequential\" or \"parallel\"")]
    UnknownKind { kind: String },
    #[error("unknown plan {plan:?}")]
    UnknownPlan { plan: String },
    #[error("cpus must be between 1 and {max} (the largest agent or the kind's pool); got {cpus}")]
    BadCpus { cpus: u32, max: u32 },
    #[error(
        "max_run_secs must be between 1 and {limit} for {kind} jobs on plan {plan}; got {got}"
    )]
    RunLimit {
        got: u64,
        limit: u64,
        kind: Kind,
        plan: String,
    },
    #[error("plan {plan} allows no {kind} jobs")]
    KindNotAllowed { kind: Kind, plan: String },
    #[error("queue_timeout_secs must be between 1 and {max}; got {got}")]
    QueueTimeout { got: u64, max: u64 },
    #[error("max_attempts must be between 1 and {max}; got {got}")]
    Attempts { got: u32, max: u32 },
    #[error("you have {queued} jobs waiting; plan {plan} allows {max}: wait for some to start, or cancel some")]
    TooManyQueued { queued: u32, max: u32, plan: String },
    #[error("idempotency key {key:?} was used for job {job} with a different request; use a new key for a new job")]
    IdempotencyConflict { key: String, job: JobId },
    #[error("user name must be 1 to 128 bytes")]
    BadUser,
}

fn check_count(field: &str, count: usize, max: usize) -> Result<(), SubmitError> {
    if count > max {
        return Err(SubmitError::TooMany {
            field: field.to_string(),
            count,
            max,
        });
    }
    Ok(())
}

fn check_bytes(field: &str, bytes: usize, max: usize) -> Result<(), SubmitError> {
    if bytes > max {
        return Err(SubmitError::TooLarge {
            field: field.to_string(),
            bytes,
            max,
        });
    }
    Ok(())
}

fn check_nul(field: &str, text: &str) -> Result<(), SubmitError> {
    if text.contains('\0') {
        return Err(SubmitError::NulByte {
            field: field.to_string(),
        });
    }
    Ok(())
}

/// Validates `spec` for a user on `plan` (already looked up by name).
pub fn validate(
    config: &CoreConfig,
    plan_name: &str,
    plan: &Plan,
    spec: SubmitSpec,
) -> Result<JobSpec, SubmitError> {
    let limits = &config.submit;
    if spec.argv.is_empty() {
        return Err(SubmitError::EmptyArgv);
    }
    if spec.argv[0].is_empty() {
        return Err(SubmitError::EmptyProgram);
    }
    check_count("argv", spec.argv.len(), limits.argv_items_max)?;
    let argv_bytes: usize = spec.argv.iter().map(|a| a.len()).sum();
    check_bytes("argv", argv_bytes, limits.argv_bytes_max)?;
    for arg in &spec.argv {
        check_nul("argv", arg)?;
    }
    check_count("env", spec.env.len(), limits.env_items_max)?;
    let env_bytes: usize = spec.env.iter().map(|(k, v)| k.len() + v.len()).sum();
    check_bytes("env", env_bytes, limits.env_bytes_max)?;
    for (name, value) in &spec.env {
        if name.is_empty() || name.contains('=') {
            return Err(SubmitError::BadEnvName { name: name.clone() });
        }
        check_nul("env", name)?;
        check_nul("env", value)?;
    }
    if let Some(cwd) = &spec.cwd {
        check_bytes("cwd", cwd.len(), limits.cwd_bytes_max)?;
        check_nul("cwd", cwd)?;
    }
    check_count("labels", spec.labels.len(), limits.labels_max)?;
    for (key, value) in &spec.labels {
        check_bytes("label", key.len() + value.len(), limits.label_bytes_max)?;
    }
    if let Some(key) = &spec.idempotency_key {
        check_bytes(
            "idempotency_key",
            key.len(),
            limits.idempotency_key_bytes_max,
        )?;
    }
    let kind = Kind::parse(&spec.kind).ok_or_else(|| SubmitError::UnknownKind {
        kind: truncated(&spec.kind, 64),
    })?;
    let cpus_max = config.agent_cpus_max.min(config.pool_cpus(kind));
    if spec.cpus == 0 || spec.cpus > cpus_max {
        return Err(SubmitError::BadCpus {
            cpus: spec.cpus,
            max: cpus_max,
        });
    }
    let kind_limits = plan.limits(kind);
    if kind_limits.max_running == 0 {
        return Err(SubmitError::KindNotAllowed {
            kind,
            plan: plan_name.to_string(),
        });
    }
    let max_run_secs = spec.max_run_secs.unwrap_or(kind_limits.default_run_secs);
    if max_run_secs == 0 || max_run_secs > kind_limits.max_run_secs_limit {
        return Err(SubmitError::RunLimit {
            got: max_run_secs,
            limit: kind_limits.max_run_secs_limit,
            kind,
            plan: plan_name.to_string(),
        });
    }
    let queue_timeout_secs = spec
        .queue_timeout_secs
        .or(config.default_queue_timeout_secs);
    if let Some(secs) = queue_timeout_secs {
        if secs == 0 || secs > limits.queue_timeout_secs_max {
            return Err(SubmitError::QueueTimeout {
                got: secs,
                max: limits.queue_timeout_secs_max,
            });
        }
    }
    if spec.max_attempts == 0 || spec.max_attempts > limits.attempts_max {
        return Err(SubmitError::Attempts {
            got: spec.max_attempts,
            max: limits.attempts_max,
        });
    }
    Ok(JobSpec {
        argv: spec.argv,
        env: spec.env,
        cwd: spec.cwd,
        labels: spec.labels,
        kind,
        cpus: spec.cpus,
        max_run_secs,
        queue_timeout_secs,
        max_attempts: spec.max_attempts,
        idempotency_key: spec.idempotency_key,
        run_as: None,
    })
}

/// `text` cut to at most `max` bytes on a character boundary.
pub fn truncated(text: &str, max: usize) -> String {
    truncated_str(text, max).to_string()
}

/// `text` cut to at most `max` bytes on a character boundary, borrowed.
pub fn truncated_str(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// The last `max` bytes of `text`, starting on a character boundary.
pub fn tail(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut start = text.len() - max;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    text[start..].to_string()
}
