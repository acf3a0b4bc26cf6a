//! The `foreman` binary: the supervisor (`serve`), an agent (`agent`), and
//! the client commands. Settings come from flags, then `FOREMAN_*`
//! environment variables, then the TOML file named by `--config`, then
//! defaults; `foreman serve --help` lists them all.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use foreman::agent::retention::Retention;
use foreman::agent::{Agent, AgentOptions, ProcessRunner};
use foreman::client::{Client, WatchEvent};
use foreman::core::{CoreConfig, JobId, JobState, SubmitSpec};
use foreman::server::http::HttpLimits;
use foreman::server::{self, auth, AgentEndpoint, ServerOptions};
use foreman::store::{Store, User};
use foreman::tls::{Endpoint, TlsConfig};
use serde::{Deserialize, Serialize};

#[derive(Parser)]
#[command(
    name = "foreman",
    version,
    about = "A job supervisor for long-running compute jobs"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the supervisor, with local agents (one per core unless told otherwise).
    Serve(ServeArgs),
    /// Run an agent that connects to a supervisor and runs its jobs.
    Agent(AgentArgs),
    /// Submit a job: foreman submit [options] -- CMD ARGS...
    Submit(SubmitArgs),
    /// Show one job.
    Status {
        id: u64,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// List jobs, newest first.
    Jobs {
        #[arg(long)]
        state: Option<String>,
        /// Another user's jobs (admin only).
        #[arg(long)]
        user: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: usize,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Cancel a job (idempotent).
    Cancel {
        id: u64,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Follow a job live until it ends.
    Watch {
        id: u64,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Write an incident bundle to attach to a bug report: the journal
    /// segments that cover a window, the scheduler's configuration, the
    /// agents seen and when, and the affected jobs' records, with job
    /// environments and anything named like a secret redacted.
    Incident {
        /// The last this long: 90s, 30m, 2h or 1d.
        #[arg(long)]
        since: Option<String>,
        /// This job's life, from its submission to its end (repeatable).
        #[arg(long = "job", value_name = "ID")]
        jobs: Vec<u64>,
        /// The bundle's file (JSON lines).
        #[arg(short, long)]
        output: PathBuf,
        /// The supervisor's data dir [default: the one `serve` uses].
        #[arg(long, env = "FOREMAN_DATA_DIR")]
        data_dir: Option<PathBuf>,
    },
    /// Replay a journal segment through the scheduler and print what it did.
    Replay {
        /// A segment: <data dir>/journal/current.jsonl or <n>.jsonl.
        file: PathBuf,
        /// Print every effect as JSON, one per line.
        #[arg(long)]
        json: bool,
        /// Compare what today's scheduler decides at every step with what
        /// the one that wrote the segment decided, and show the first step
        /// that differs with the inputs around it (exit 1 if one does).
        #[arg(long, conflicts_with = "json")]
        check: bool,
    },
    /// Manage accounts.
    User {
        #[command(subcommand)]
        command: UserCommand,
    },
    /// Manage agents' credentials: each agent connects with a token of its
    /// own, which lets it be that agent and no other.
    AgentToken {
        #[command(subcommand)]
        command: AgentTokenCommand,
    },
}

#[derive(Subcommand)]
enum AgentTokenCommand {
    /// Issue a credential for agent ID and print its token (shown once);
    /// it replaces any the agent had.
    Add {
        /// 1 to 128 characters: letters, digits, '.', '_', '-', ':', '@'.
        id: String,
        #[arg(long, env = "FOREMAN_DATA_DIR")]
        data_dir: Option<PathBuf>,
    },
    /// Revoke agent ID's credential: refused at its next hello, and its
    /// connection closed within five seconds and a ping interval.
    Revoke {
        id: String,
        #[arg(long, env = "FOREMAN_DATA_DIR")]
        data_dir: Option<PathBuf>,
    },
    /// List agents' credentials.
    List {
        #[arg(long, env = "FOREMAN_DATA_DIR")]
        data_dir: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum UserCommand {
    /// Create a user and print their token (shown once).
    Add {
        /// 1 to 64 characters: lowercase letters, digits, '_', '.' and '-',
        /// starting with a letter or '_' (a name an operating system takes too).
        name: String,
        /// One of the plans of the configuration (`[core.plans]`).
        #[arg(long, default_value = "basic")]
        plan: String,
        #[arg(long)]
        admin: bool,
        #[arg(long, env = "FOREMAN_DATA_DIR")]
        data_dir: Option<PathBuf>,
        /// The supervisor's configuration file, for its plans.
        #[arg(long, env = "FOREMAN_CONFIG")]
        config: Option<PathBuf>,
    },
}

#[derive(Args, Clone)]
struct ServeArgs {
    /// TOML file with any of these settings, and a [core] table (plans, pools, timeouts).
    #[arg(long, env = "FOREMAN_CONFIG")]
    config: Option<PathBuf>,
    /// Database, tokens, run dirs. [default: $XDG_DATA_HOME/foreman if set,
    /// else /var/lib/foreman for root and ~/.local/share/foreman for others]
    #[arg(long, env = "FOREMAN_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// HTTP API address. [default: 127.0.0.1:8470]
    #[arg(long, env = "FOREMAN_API_ADDR")]
    api_addr: Option<SocketAddr>,
    /// Agent websocket address. [default: 127.0.0.1:8471]
    #[arg(long, env = "FOREMAN_AGENT_ADDR")]
    agent_addr: Option<SocketAddr>,
    /// Local agent processes to keep running (1 CPU each). [default: one per core]
    #[arg(long, env = "FOREMAN_LOCAL_AGENTS")]
    local_agents: Option<u32>,
    /// Once the supervisor stops, a local agent with nothing to run leaves
    /// after this long without it (one with runs stays for them). [default: 600]
    #[arg(long, env = "FOREMAN_LOCAL_AGENT_LEAVE_SECS")]
    local_agent_leave_secs: Option<u64>,
    /// How often the supervisor pings each agent. [default: 5000]
    #[arg(long, env = "FOREMAN_PING_INTERVAL_MS")]
    ping_interval_ms: Option<u64>,
    /// An agent silent this long is gone. [default: 15000]
    #[arg(long, env = "FOREMAN_PING_TIMEOUT_MS")]
    ping_timeout_ms: Option<u64>,
    /// Time for a new connection to say hello. [default: 5000]
    #[arg(long, env = "FOREMAN_HELLO_TIMEOUT_MS")]
    hello_timeout_ms: Option<u64>,
    /// A lost agent's jobs wait this long for it. [default: 60000]
    #[arg(long, env = "FOREMAN_AGENT_GRACE_MS")]
    agent_grace_ms: Option<u64>,
    /// MiB of inputs after which a journal segment rotates (a segment also
    /// holds at least as many bytes of inputs as its opening snapshot).
    /// [default: 64]
    #[arg(long, env = "FOREMAN_JOURNAL_SEGMENT_MIB")]
    journal_segment_mib: Option<u64>,
    /// Old journal segments kept; 0 turns the journal off. [default: 8]
    #[arg(long, env = "FOREMAN_JOURNAL_SEGMENTS")]
    journal_segments: Option<usize>,
    /// PEM certificate chain for TLS on both listeners (`[tls] cert`).
    #[arg(long, env = "FOREMAN_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert (`[tls] key`).
    #[arg(long, env = "FOREMAN_TLS_KEY")]
    tls_key: Option<PathBuf>,
    /// Listen beyond loopback without TLS (`[tls] allow_plaintext`).
    #[arg(long)]
    allow_plaintext: bool,
    /// Benchmarks only: every commit's fsync takes this much longer (a
    /// slower disk), in µs.
    #[arg(long, hide = true, default_value_t = 0)]
    bench_fsync_delay_us: u64,
    /// Benchmarks only: commits do not wait for the disk (not durable).
    #[arg(long, hide = true)]
    bench_no_fsync: bool,
}

/// The file form of `ServeArgs` (same names), plus the core's settings.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    data_dir: Option<PathBuf>,
    api_addr: Option<SocketAddr>,
    agent_addr: Option<SocketAddr>,
    local_agents: Option<u32>,
    local_agent_leave_secs: Option<u64>,
    ping_interval_ms: Option<u64>,
    ping_timeout_ms: Option<u64>,
    hello_timeout_ms: Option<u64>,
    agent_grace_ms: Option<u64>,
    journal_segment_mib: Option<u64>,
    journal_segments: Option<usize>,
    #[serde(default)]
    core: Option<CoreConfig>,
    /// Bounds on the API's connections and event streams.
    #[serde(default)]
    http: Option<HttpLimits>,
    /// How long and how much of finished runs' dirs local agents keep.
    #[serde(default)]
    run_dirs: Option<Retention>,
    /// TLS for both listeners.
    #[serde(default)]
    tls: Option<TlsConfig>,
}

/// How a client reaches the supervisor over TLS (agents and the CLI).
#[derive(Args, Clone, Default)]
struct TlsArgs {
    /// PEM CA certificates to trust for TLS; given, a bare host:port means
    /// TLS. [default: the system's CA bundle, for https:// and wss://]
    #[arg(long, env = "FOREMAN_TLS_CA")]
    tls_ca: Option<PathBuf>,
    /// The name the supervisor's certificate must carry. [default: the host connected to]
    #[arg(long, env = "FOREMAN_TLS_SERVER_NAME")]
    tls_server_name: Option<String>,
}

#[derive(Args, Clone)]
struct AgentArgs {
    /// The supervisor's agent endpoint: host:port, wss://host:port (TLS) or ws://host:port.
    #[arg(long, env = "FOREMAN_SUPERVISOR")]
    supervisor: String,
    #[command(flatten)]
    tls: TlsArgs,
    #[arg(long, env = "FOREMAN_AGENT_TOKEN", conflicts_with = "token_file")]
    token: Option<String>,
    #[arg(long)]
    token_file: Option<PathBuf>,
    #[arg(long, default_value_t = 1)]
    cpus: u32,
    /// Stable across reconnects. [default: agent-<hostname>-<pid>]
    #[arg(long)]
    id: Option<String>,
    /// Where run dirs go. [default: ./foreman-runs]
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Exit once the supervisor has been out of reach this long with
    /// nothing running here. [default: never]
    #[arg(long)]
    leave_after_secs: Option<u64>,
    /// Remove a finished run's dir once untouched this long. [default: 168]
    #[arg(long)]
    keep_run_dirs_hours: Option<u64>,
    /// Past this many MiB of run dirs, remove the oldest finished. [default: 10240]
    #[arg(long)]
    run_dirs_max_mib: Option<u64>,
    /// The operating-system user jobs run as when the supervisor maps
    /// theirs to none (`[core.run_as]`). Never root. [default: nobody for an
    /// agent running as root, else the agent's own user]
    #[arg(long)]
    run_jobs_as: Option<String>,
}

#[derive(Args, Clone)]
struct ClientArgs {
    /// The API: host:port, https://host:port (TLS) or http://host:port.
    /// [default: from the local supervisor's data dir]
    #[arg(long, env = "FOREMAN_SERVER")]
    server: Option<String>,
    #[command(flatten)]
    tls: TlsArgs,
    /// [default: the local admin token]
    #[arg(long, env = "FOREMAN_TOKEN")]
    token: Option<String>,
    #[arg(long, env = "FOREMAN_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Clone)]
struct SubmitArgs {
    #[arg(long, default_value = "sequential")]
    kind: String,
    #[arg(long, default_value_t = 1)]
    cpus: u32,
    #[arg(long)]
    max_run_secs: Option<u64>,
    #[arg(long, default_value_t = 1)]
    max_attempts: u32,
    #[arg(long)]
    queue_timeout_secs: Option<u64>,
    #[arg(long)]
    idempotency_key: Option<String>,
    /// KEY=VALUE, repeatable.
    #[arg(long = "env", value_name = "KEY=VALUE")]
    env: Vec<String>,
    #[arg(long)]
    cwd: Option<String>,
    #[command(flatten)]
    client: ClientArgs,
    /// The command and its arguments.
    #[arg(last = true, required = true)]
    argv: Vec<String>,
}

/// What a running supervisor leaves in its data dir for local clients.
#[derive(Debug, Serialize, Deserialize)]
struct ServerFile {
    api: String,
    agent: String,
    pid: u32,
    /// With TLS: the CA file local clients trust, and the name they verify.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tls_ca: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tls_server_name: Option<String>,
}

/// The `[http]` and `[core]` parts of a configuration file with every default, for
/// `foreman serve --help` (generated, so it cannot drift from the code).
fn core_defaults_toml() -> String {
    #[derive(Serialize)]
    struct File {
        http: HttpLimits,
        run_dirs: Retention,
        tls: TlsConfig,
        core: CoreConfig,
    }
    let text = toml::to_string(&File {
        http: HttpLimits::default(),
        run_dirs: Retention::default(),
        tls: TlsConfig::default(),
        core: CoreConfig::default(),
    })
    .unwrap_or_default();
    format!("Core settings for the --config file, with their defaults (every one may be left out; [tls] also takes cert, key, ca and server_name, all unset by default):\n\n{text}")
}

fn main() -> ExitCode {
    use clap::{CommandFactory, FromArgMatches};
    let command =
        Cli::command().mut_subcommand("serve", |serve| serve.after_long_help(core_defaults_toml()));
    let cli = match Cli::from_arg_matches(&command.get_matches()) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    // The supervisor uses every core. Everything else runs on one thread:
    // an agent's work per job is small, and a single-threaded agent forks
    // its jobs without stopping other CPUs to flush their TLBs, and hands
    // a job's report from task to task without waking another thread.
    let mut builder = match cli.command {
        Command::Serve(_) => tokio::runtime::Builder::new_multi_thread(),
        _ => tokio::runtime::Builder::new_current_thread(),
    };
    if !matches!(cli.command, Command::Serve(_) | Command::Agent(_)) {
        quiet_when_the_reader_goes();
    }
    let runtime = match builder.enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("foreman: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(run(cli));
    match result {
        Ok(code) => code,
        Err(message) => {
            eprintln!("foreman: {message}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<ExitCode, String> {
    match cli.command {
        Command::Serve(args) => serve(args).await,
        Command::Agent(args) => agent(args).await,
        Command::Submit(args) => submit(args).await,
        Command::Status { id, client } => status(id, client).await,
        Command::Jobs {
            state,
            user,
            limit,
            client,
        } => jobs(state, user, limit, client).await,
        Command::Cancel { id, client } => cancel(id, client).await,
        Command::Watch { id, client } => watch(id, client).await,
        Command::Incident {
            since,
            jobs,
            output,
            data_dir,
        } => incident(since.as_deref(), jobs, &output, data_dir),
        Command::Replay {
            file, check: true, ..
        } => replay_check(file),
        Command::Replay { file, json, .. } => replay(file, json),
        Command::User {
            command:
                UserCommand::Add {
                    name,
                    plan,
                    admin,
                    data_dir,
                    config,
                },
        } => user_add(name, plan, admin, data_dir, config),
        Command::AgentToken { command } => agent_token(command),
    }
}

fn agent_token(command: AgentTokenCommand) -> Result<ExitCode, String> {
    let (AgentTokenCommand::Add { data_dir, .. }
    | AgentTokenCommand::Revoke { data_dir, .. }
    | AgentTokenCommand::List { data_dir }) = &command;
    let data_dir = data_dir.clone().unwrap_or_else(default_data_dir);
    create_dir_mode(&data_dir, 0o711).map_err(|e| format!("data dir {e}"))?;
    let mut store = Store::open(&data_dir.join("foreman.db")).map_err(|e| e.to_string())?;
    let now = foreman::seam::now();
    let valid = |id: &str| {
        if foreman::core::AgentId::is_valid(id, 128) {
            Ok(())
        } else {
            Err(format!(
                "agent id {id:?} is not valid: 1 to 128 characters, letters, digits, '.', '_', '-', ':', '@'"
            ))
        }
    };
    match command {
        AgentTokenCommand::Add { id, .. } => {
            valid(&id)?;
            let token = auth::new_token();
            store
                .set_agent_credential(&id, &auth::sha256_hex(&token), now)
                .map_err(|e| e.to_string())?;
            println!("{token}");
            eprintln!("agent {id} may connect with the token above (shown only once): foreman agent --id {id} --token-file FILE");
        }
        AgentTokenCommand::Revoke { id, .. } => {
            valid(&id)?;
            if !store
                .revoke_agent_credential(&id, now)
                .map_err(|e| e.to_string())?
            {
                return Err(format!("agent {id} has no credential in force"));
            }
            eprintln!(
                "agent {id}'s credential is revoked: its connection closes within five seconds and a ping interval"
            );
        }
        AgentTokenCommand::List { .. } => {
            for (id, created, revoked) in store.agent_credentials().map_err(|e| e.to_string())? {
                let state =
                    revoked.map_or("in force".to_string(), |r| format!("revoked at {}", r.0));
                println!("{id}	issued at {}	{state}", created.0);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn init_logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("FOREMAN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .try_init();
}

/// `$XDG_DATA_HOME/foreman` if set; else, for root, `/var/lib/foreman` (jobs
/// never run as root, and the users they run as must pass through the data
/// dir's parents to reach their run dirs, which root's home, 0700, does not
/// let them do), and `~/.local/share/foreman` for others.
fn default_data_dir() -> PathBuf {
    if let Some(xdg) = std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(xdg).join("foreman");
    }
    let home = std::env::var_os("HOME")
        .filter(|v| !v.is_empty())
        .map(|home| PathBuf::from(home).join(".local/share/foreman"));
    if nix::unistd::geteuid().is_root() {
        // A data dir made there by an earlier version is kept, not left
        // behind (serve warns that its jobs' users cannot reach it).
        let system = PathBuf::from("/var/lib/foreman");
        return match home {
            Some(old) if old.join("foreman.db").exists() && !system.exists() => old,
            _ => system,
        };
    }
    home.unwrap_or_else(|| PathBuf::from("foreman-data"))
}

/// Reads a token file, or writes a new token there (readable by its owner only).
fn token_file(path: &Path) -> Result<String, String> {
    if let Ok(text) = std::fs::read_to_string(path) {
        let token = text.trim().to_string();
        if !token.is_empty() {
            return Ok(token);
        }
    }
    let token = auth::new_token();
    write_private(path, &format!("{token}\n"))?;
    Ok(token)
}

fn write_private(path: &Path, text: &str) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    // A file made earlier with looser bits is tightened too.
    file.set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("{}: {e}", path.display()))?;
    file.write_all(text.as_bytes())
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// A directory only its owner may enter (`mode`: 0o700), or pass through
/// without listing (0o711: what job users need to reach their run dirs).
fn create_dir_mode(path: &Path, mode: u32) -> Result<(), String> {
    foreman::agent::runner::create_dir_with_mode(path, mode)
        .map_err(|e| format!("{}: {e}", path.display()))
}

fn create_private_dir(path: &Path) -> Result<(), String> {
    create_dir_mode(path, 0o700)
}

fn config_file(path: Option<&Path>) -> Result<ConfigFile, String> {
    match path {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("config {}: {e}", path.display()))?;
            toml::from_str(&text).map_err(|e| format!("config {}: {e}", path.display()))
        }
        None => Ok(ConfigFile::default()),
    }
}

async fn serve(args: ServeArgs) -> Result<ExitCode, String> {
    init_logs();
    let file = config_file(args.config.as_deref())?;
    let data_dir = args
        .data_dir
        .clone()
        .or(file.data_dir.clone())
        .unwrap_or_else(default_data_dir);
    // Others may pass through (to reach a run dir) but not list it; its
    // secrets are the supervisor's user's alone.
    create_dir_mode(&data_dir, 0o711).map_err(|e| format!("data dir {e}"))?;
    // Absolute and without links: local agents' work dirs and the run-dir
    // check see the real path.
    let data_dir = std::fs::canonicalize(&data_dir)
        .map_err(|e| format!("data dir {}: {e}", data_dir.display()))?;
    let api_addr = args
        .api_addr
        .or(file.api_addr)
        .unwrap_or(SocketAddr::from(([127, 0, 0, 1], 8470)));
    let agent_addr = args
        .agent_addr
        .or(file.agent_addr)
        .unwrap_or(SocketAddr::from(([127, 0, 0, 1], 8471)));
    let tls_config = file.tls.clone().unwrap_or_default();
    let tls = serve_tls(
        &args,
        &tls_config,
        [("api_addr", api_addr), ("agent_addr", agent_addr)],
    )?;
    let mut core = file.core.unwrap_or_default();
    if let Some(grace) = args.agent_grace_ms.or(file.agent_grace_ms) {
        core.agent_grace_ms = grace;
    }
    let admin_token_path = data_dir.join("admin.token");
    let admin_token = token_file(&admin_token_path)?;
    // Each local agent has a credential of its own, its token in a file
    // only the supervisor's user can read.
    let local_agents = args
        .local_agents
        .or(file.local_agents)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get() as u32));
    let agent_tokens = data_dir.join("agents");
    create_private_dir(&agent_tokens)?;
    let store = Store::open(&data_dir.join("foreman.db")).map_err(|e| e.to_string())?;
    let mut bootstrap_agents = Vec::new();
    for i in 0..local_agents {
        let (id, path) = (
            format!("local-{i}"),
            agent_tokens.join(format!("local-{i}.token")),
        );
        let mut token = token_file(&path)?;
        // A credential revoked, or replaced by another, is never brought
        // back by a restart: the local agent gets a new one.
        let stored = store.agent_credential(&id).map_err(|e| e.to_string())?;
        if stored.is_some_and(|(hash, revoked)| revoked || hash != auth::sha256_hex(&token)) {
            token = auth::new_token();
            write_private(&path, &format!("{token}\n"))?;
        }
        bootstrap_agents.push((id, auth::sha256_hex(&token)));
    }
    drop(store);
    let admin_plan = if core.plans.contains_key("premium") {
        "premium"
    } else {
        core.plans.keys().next().map_or("basic", String::as_str)
    };
    let admin = User {
        name: "admin".into(),
        plan: admin_plan.into(),
        admin: true,
    };
    let options = ServerOptions {
        data_dir: data_dir.clone(),
        core,
        api_addr,
        agent_addr,
        endpoint: AgentEndpoint {
            ping_interval_ms: args
                .ping_interval_ms
                .or(file.ping_interval_ms)
                .unwrap_or(5_000),
            ping_timeout_ms: args
                .ping_timeout_ms
                .or(file.ping_timeout_ms)
                .unwrap_or(15_000),
            hello_timeout_ms: args
                .hello_timeout_ms
                .or(file.hello_timeout_ms)
                .unwrap_or(5_000),
        },
        bootstrap_users: vec![(admin, auth::sha256_hex(&admin_token))],
        bootstrap_agents,
        journal_segment_bytes_max: args
            .journal_segment_mib
            .or(file.journal_segment_mib)
            .unwrap_or(64)
            * 1024
            * 1024,
        journal_segments_max: args.journal_segments.or(file.journal_segments).unwrap_or(8),
        observer: None,
        commit_delay_ms: 0,
        commit_without_fsync: args.bench_no_fsync,
        fsync_delay_us: args.bench_fsync_delay_us,
        tls: tls.as_ref().map(|(config, _)| config.clone()),
        http: file.http.unwrap_or_default(),
    };
    let grace_ms = options.core.agent_grace_ms;
    let mut running = server::start(options).await.map_err(|e| e.to_string())?;
    // What local clients and agents reach, and trust.
    let local_tls = tls.map(|(_, local)| local);
    let server_file = ServerFile {
        api: foreman::tls::local_reach(running.api_addr).to_string(),
        agent: foreman::tls::local_reach(running.agent_addr).to_string(),
        pid: std::process::id(),
        tls_ca: local_tls.as_ref().map(|t| t.ca.clone()),
        tls_server_name: local_tls.as_ref().and_then(|t| t.server_name.clone()),
    };
    write_private(
        &data_dir.join("server.json"),
        &serde_json::to_string_pretty(&server_file).expect("serializes"),
    )?;
    let (http, ws) = if local_tls.is_some() {
        ("https", "wss")
    } else {
        ("http", "ws")
    };
    println!(
        "Foreman supervisor: API on {http}://{}, agents on {ws}://{}",
        running.api_addr, running.agent_addr
    );
    println!(
        "Data dir: {} (admin token in {})",
        data_dir.display(),
        admin_token_path.display()
    );
    println!("Local agents: {local_agents}. Try: foreman submit -- echo hello");
    let leave_secs = args
        .local_agent_leave_secs
        .or(file.local_agent_leave_secs)
        .unwrap_or(600);
    let retention = file.run_dirs.clone().unwrap_or_default();
    // Passable for jobs run as other users, whatever the umask.
    let runs = data_dir.join("runs");
    create_dir_mode(&runs, 0o711)?;
    if local_agents > 0 && nix::unistd::geteuid().is_root() {
        // Root's local agents run jobs as other users, who must reach
        // their run dirs: say so now rather than fail every job.
        if let Some((dir, mode)) = foreman::agent::runner::blocked_ancestor(&runs, u32::MAX, &[]) {
            tracing::warn!(
                dir = %dir.display(),
                mode = format!("{mode:o}"),
                "jobs run as users other than root cannot pass through this directory to their run dirs, and will fail at start unless it lets their user through; choose a data dir others may pass through (such as /var/lib/foreman)"
            );
        }
    }
    for i in 0..local_agents {
        tokio::spawn(local_agent(
            i,
            foreman::tls::local_reach(running.agent_addr),
            local_tls.clone(),
            data_dir.clone(),
            leave_secs,
            retention.clone(),
        ));
    }
    let signal = foreman::select! {
        _ = &mut running.actor => return Err("the scheduler stopped (see the log above)".to_string()),
        signal = foreman::seam::stop_signal() => signal,
    };
    // Whatever the scheduler took is committed once this query is answered
    // (a query waits for the batch before it), journal included.
    let (held, agents) = running
        .core
        .query(|core| {
            let held = core.jobs().filter(|j| j.held().is_some()).count();
            let agents = core.agents().filter(|a| !a.jobs.is_empty()).count();
            (held, agents)
        })
        .await
        .map_err(|e| e.to_string())?;
    let _ = std::fs::remove_file(data_dir.join("server.json"));
    println!(
        "foreman: {signal}: stopping. Everything accepted is committed. {held} jobs hold attempts on {agents} agents: they keep running, and a supervisor started again within agent_grace_ms ({} s) takes them back; later they end lost, or run again if they allow more attempts. Queued jobs wait in the store. Local agents with nothing to run leave after {leave_secs} s without a supervisor.",
        grace_ms / 1000
    );
    Ok(ExitCode::SUCCESS)
}

/// What the supervisor's own agents and CLI use to reach it over TLS.
#[derive(Clone, Debug)]
struct LocalTls {
    ca: PathBuf,
    server_name: Option<String>,
}

/// TLS for both listeners from the flags and `[tls]`, and what local
/// clients trust; none for plaintext, which is refused beyond loopback
/// unless allowed.
fn serve_tls(
    args: &ServeArgs,
    config: &TlsConfig,
    listeners: [(&str, SocketAddr); 2],
) -> Result<Option<(Arc<foreman::tls::ServerConfig>, LocalTls)>, String> {
    let cert = args.tls_cert.clone().or(config.cert.clone());
    let key = args.tls_key.clone().or(config.key.clone());
    let (cert, key) = match (cert, key) {
        (Some(cert), Some(key)) => (cert, key),
        (None, None) => {
            if !(args.allow_plaintext || config.allow_plaintext) {
                if let Some((what, addr)) =
                    listeners.iter().find(|(_, addr)| !addr.ip().is_loopback())
                {
                    return Err(format!(
                        "{what} {addr} is reachable from other hosts, and without TLS tokens and jobs would cross the network in the clear. Give a certificate ([tls] cert and key, or --tls-cert and --tls-key), or set [tls] allow_plaintext = true (--allow-plaintext) behind a TLS-terminating proxy or on a trusted network"
                    ));
                }
            }
            return Ok(None);
        }
        _ => return Err("TLS needs both a certificate and its key ([tls] cert and key)".into()),
    };
    let server = foreman::tls::server_config(&cert, &key)?;
    let ca = config.ca.clone().unwrap_or(cert.clone());
    let ca =
        std::fs::canonicalize(&ca).map_err(|e| format!("TLS CA file {}: {e}", ca.display()))?;
    // Local agents and the CLI must be able to verify what is served: a
    // configuration they could not connect with fails here, not later.
    for (_, addr) in listeners {
        let name = config
            .server_name
            .clone()
            .unwrap_or_else(|| foreman::tls::local_reach(addr).ip().to_string());
        foreman::tls::check_trust(&cert, &ca, &name).map_err(|e| {
            format!("{e}. Local agents and the CLI trust [tls] ca (default: the cert file itself) and verify [tls] server_name (default: the address they connect to): set them to the CA that issued the certificate and a name it carries")
        })?;
    }
    Ok(Some((
        server,
        LocalTls {
            ca,
            server_name: config.server_name.clone(),
        },
    )))
}

/// The local driver: keeps one agent process running, restarting it with
/// backoff when it dies. Agents outlive a stopped or crashed supervisor and
/// reconnect to the next one, which reconciles their jobs; with nothing to
/// run, they leave after `leave_secs` without one.
async fn local_agent(
    index: u32,
    agent_addr: SocketAddr,
    tls: Option<LocalTls>,
    data_dir: PathBuf,
    leave_secs: u64,
    retention: Retention,
) {
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => {
            tracing::error!(error = %e, "cannot find this executable to start local agents");
            return;
        }
    };
    let mut delay_ms = 100u64;
    loop {
        let began = foreman::seam::now();
        let mut command = tokio::process::Command::new(&exe);
        command.arg("agent");
        match &tls {
            None => command.arg("--supervisor").arg(agent_addr.to_string()),
            Some(tls) => {
                if let Some(name) = &tls.server_name {
                    command.arg("--tls-server-name").arg(name);
                }
                command
                    .arg("--supervisor")
                    .arg(format!("wss://{agent_addr}"))
                    .arg("--tls-ca")
                    .arg(&tls.ca)
            }
        };
        let child = command
            .arg("--token-file")
            .arg(data_dir.join("agents").join(format!("local-{index}.token")))
            .arg("--id")
            .arg(format!("local-{index}"))
            .arg("--work-dir")
            .arg(data_dir.join("runs").join(format!("local-{index}")))
            .arg("--leave-after-secs")
            .arg(leave_secs.to_string())
            .arg("--keep-run-dirs-hours")
            .arg(retention.keep_hours.to_string())
            .arg("--run-dirs-max-mib")
            .arg(retention.max_mib.to_string())
            .kill_on_drop(false)
            .spawn();
        match child {
            Ok(mut child) => {
                let status = child.wait().await;
                tracing::warn!(agent = index, ?status, "local agent exited; restarting");
            }
            Err(e) => tracing::error!(agent = index, error = %e, "cannot start a local agent"),
        }
        if foreman::seam::now().ms_since(began) > 60_000 {
            delay_ms = 100;
        }
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        delay_ms = (delay_ms * 2).min(10_000);
    }
}

async fn agent(args: AgentArgs) -> Result<ExitCode, String> {
    init_logs();
    let token = match (&args.token, &args.token_file) {
        (Some(token), _) => token.clone(),
        (None, Some(path)) => std::fs::read_to_string(path)
            .map_err(|e| format!("token file {}: {e}", path.display()))?
            .trim()
            .to_string(),
        (None, None) => return Err("give --token or --token-file".into()),
    };
    let supervisor = Endpoint::parse(
        &args.supervisor,
        "wss",
        "ws",
        args.tls.tls_ca.as_deref(),
        args.tls.tls_server_name.as_deref(),
    )?;
    let work_dir = args
        .work_dir
        .unwrap_or_else(|| PathBuf::from("foreman-runs"));
    let (groups, reaped) = foreman::agent::runner::GroupLog::open(&work_dir)
        .map_err(|e| format!("work dir {}: {e}", work_dir.display()))?;
    if reaped > 0 {
        tracing::warn!(
            reaped,
            "killed processes left running by a previous agent in this work dir"
        );
    }
    let host = std::fs::read_to_string("/etc/hostname")
        .unwrap_or_default()
        .trim()
        .to_string();
    let options = AgentOptions {
        supervisor: supervisor.addr,
        token,
        agent_id: args
            .id
            .unwrap_or_else(|| format!("agent-{host}-{}", std::process::id())),
        cpus: args.cpus,
        labels: BTreeMap::new(),
        work_dir,
        reconnect_min_ms: 100,
        reconnect_max_ms: 10_000,
        reconnect_attempts_max: None,
        leave_alone_ms: args.leave_after_secs.map(|secs| secs.saturating_mul(1000)),
        tls: supervisor.tls,
    };
    let defaults = Retention::default();
    let outbox = foreman::agent::outbox::Outbox::open(&options.work_dir)
        .map_err(|e| format!("work dir {}: {e}", options.work_dir.display()))?;
    let default_run_as = args.run_jobs_as.or_else(|| {
        nix::unistd::geteuid()
            .is_root()
            .then(|| "nobody".to_string())
    });
    let runner = ProcessRunner {
        groups: Some(Arc::new(groups)),
        outbox: Some(Arc::new(outbox)),
        spares: Some(
            foreman::agent::runner::SpareDirs::new(&options.work_dir)
                .map_err(|e| format!("work dir {}: {e}", options.work_dir.display()))?,
        ),
        default_run_as,
        retention: Retention {
            keep_hours: args.keep_run_dirs_hours.unwrap_or(defaults.keep_hours),
            max_mib: args.run_dirs_max_mib.unwrap_or(defaults.max_mib),
        },
        ..ProcessRunner::default()
    };
    Agent::new(options, Arc::new(runner))
        .run()
        .await
        .map_err(|e| e.to_string())?;
    Ok(ExitCode::SUCCESS)
}

/// A command piped into `head` or `grep -q` ends quietly when the reader
/// goes, as Unix tools do (status 141, as if killed by SIGPIPE), instead of
/// panicking on its next print: the Rust runtime ignores SIGPIPE, and the
/// project forbids the unsafe call that would restore it. The supervisor
/// and the agent keep the panic: a print failing there is a real fault.
fn quiet_when_the_reader_goes() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let message = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or_default();
        if message.starts_with("failed printing to stdout") && message.contains("Broken pipe") {
            std::process::exit(141);
        }
        default(info);
    }));
}

/// `90s`, `30m`, `2h`, `1d` in ms.
fn duration_ms(text: &str) -> Result<u64, String> {
    let bad = || format!("{text:?}: a number and s, m, h or d (90s, 30m, 2h, 1d)");
    let unit = text.chars().last().ok_or_else(bad)?;
    let number: u64 = text[..text.len() - unit.len_utf8()]
        .parse()
        .map_err(|_| bad())?;
    let ms = match unit {
        's' => 1_000,
        'm' => 60_000,
        'h' => 3_600_000,
        'd' => 86_400_000,
        _ => return Err(bad()),
    };
    number.checked_mul(ms).ok_or_else(bad)
}

fn incident(
    since: Option<&str>,
    jobs: Vec<u64>,
    output: &Path,
    data_dir: Option<PathBuf>,
) -> Result<ExitCode, String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let window = foreman::server::incident::Window {
        since_ms: since.map(duration_ms).transpose()?,
        jobs: jobs.into_iter().map(foreman::core::JobId).collect(),
    };
    let data_dir = data_dir.unwrap_or_else(default_data_dir);
    // Written aside, then renamed: a bundle is whole or not there. 0600:
    // it holds jobs' commands and output.
    let partial = output.with_extension("partial");
    let _ = std::fs::remove_file(&partial);
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&partial)
        .map_err(|e| format!("{}: {e}", partial.display()))?;
    let mut out = std::io::BufWriter::new(file);
    let written =
        foreman::server::incident::bundle(&data_dir, &window, foreman::seam::now(), &mut out)
            .and_then(|summary| {
                out.flush().map_err(|e| e.to_string())?;
                std::fs::rename(&partial, output)
                    .map_err(|e| format!("{}: {e}", output.display()))?;
                Ok(summary)
            });
    let summary = match written {
        Ok(summary) => summary,
        Err(e) => {
            let _ = std::fs::remove_file(&partial);
            return Err(e);
        }
    };
    println!(
        "{}: {} journal segments ({}), {} jobs, {} agents; job environments and secrets redacted",
        output.display(),
        summary.segments.len(),
        summary.segments.join(", "),
        summary.jobs,
        summary.agents
    );
    if summary.segments.is_empty() {
        println!("no journal segment covers the window (is the journal on?)");
    }
    Ok(ExitCode::SUCCESS)
}

fn replay_check(file: PathBuf) -> Result<ExitCode, String> {
    use foreman::server::{incident, journal};
    let open = || {
        std::fs::File::open(&file)
            .map(std::io::BufReader::new)
            .map_err(|e| format!("{}: {e}", file.display()))
    };
    // A bundle: each of its segments in turn.
    if let Some(segments) =
        incident::segments_of(open()?).map_err(|e| format!("{}: {e}", file.display()))?
    {
        let mut worst = ExitCode::SUCCESS;
        for (name, text) in segments {
            let label = format!("{} [{name}]", file.display());
            let check = journal::check_from(&label, std::io::Cursor::new(text), 3)?;
            if report_check(&label, check)? != ExitCode::SUCCESS {
                worst = ExitCode::from(1);
            }
        }
        return Ok(worst);
    }
    let label = file.display().to_string();
    report_check(&label, journal::check_from(&label, open()?, 3)?)
}

fn report_check(file: &str, check: foreman::server::journal::Check) -> Result<ExitCode, String> {
    if check.steps > 0 && check.unrecorded == check.steps {
        return Err(format!(
            "{}: its {} steps record no decisions (an earlier version wrote it): nothing to compare",
            file,
            check.steps
        ));
    }
    let Some(first) = check.first else {
        println!(
            "{}: today's scheduler decides as recorded at all {} steps{}",
            file,
            check.steps - check.unrecorded,
            if check.unrecorded > 0 {
                format!(" ({} steps recorded nothing)", check.unrecorded)
            } else {
                String::new()
            }
        );
        return Ok(ExitCode::SUCCESS);
    };
    println!(
        "{}:{}: at {} ms today's scheduler decides otherwise: digest {} today, {} recorded ({} of {} steps differ from there on)",
        file,
        first.line,
        first.at.0,
        first.today,
        first.recorded,
        check.differing,
        check.steps
    );
    println!("inputs around it:");
    for (line, at, input) in &first.inputs {
        let mark = if *line == first.line { ">" } else { " " };
        println!("{mark} {line:>7} {:>13} {}", at.0, to_json(input));
    }
    println!("what today's scheduler decides there:");
    for effect in &first.effects {
        println!("  {}", to_json(effect));
    }
    Ok(ExitCode::from(1))
}

/// One line of JSON, for the check's report.
fn to_json<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_else(|e| format!("(cannot show: {e})"))
}

fn client(args: &ClientArgs) -> Result<Client, String> {
    let data_dir = args.data_dir.clone().unwrap_or_else(default_data_dir);
    let endpoint = match &args.server {
        Some(server) => Endpoint::parse(
            server,
            "https",
            "http",
            args.tls.tls_ca.as_deref(),
            args.tls.tls_server_name.as_deref(),
        )?,
        None => {
            let path = data_dir.join("server.json");
            let text = std::fs::read_to_string(&path).map_err(|e| {
                format!(
                    "no --server given and no local supervisor found ({}: {e})",
                    path.display()
                )
            })?;
            let file: ServerFile =
                serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
            Endpoint::parse(
                &file.api,
                "https",
                "http",
                args.tls.tls_ca.as_deref().or(file.tls_ca.as_deref()),
                args.tls
                    .tls_server_name
                    .as_deref()
                    .or(file.tls_server_name.as_deref()),
            )?
        }
    };
    let token = match &args.token {
        Some(token) => token.clone(),
        None => {
            let path = data_dir.join("admin.token");
            std::fs::read_to_string(&path)
                .map_err(|e| {
                    format!(
                        "no --token given and no local admin token ({}: {e})",
                        path.display()
                    )
                })?
                .trim()
                .to_string()
        }
    };
    Ok(Client {
        tls: endpoint.tls,
        ..Client::new(endpoint.addr, token)
    })
}

fn print_json<T: Serialize>(value: &T) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).expect("serializes")
    );
}

async fn submit(args: SubmitArgs) -> Result<ExitCode, String> {
    let client = client(&args.client)?;
    let mut env = BTreeMap::new();
    for pair in &args.env {
        let (key, value) = pair
            .split_once('=')
            .ok_or_else(|| format!("--env {pair:?}: expected KEY=VALUE"))?;
        env.insert(key.to_string(), value.to_string());
    }
    let spec = SubmitSpec {
        argv: args.argv,
        env,
        cwd: args.cwd,
        kind: args.kind,
        cpus: args.cpus,
        max_run_secs: args.max_run_secs,
        queue_timeout_secs: args.queue_timeout_secs,
        max_attempts: args.max_attempts,
        idempotency_key: args.idempotency_key,
        ..SubmitSpec::default()
    };
    let view = client.submit(&spec).await.map_err(|e| e.to_string())?;
    if args.client.json {
        print_json(&view);
    } else {
        println!("{}", view.job.id);
    }
    Ok(ExitCode::SUCCESS)
}

async fn status(id: u64, args: ClientArgs) -> Result<ExitCode, String> {
    let view = client(&args)?
        .job(JobId(id))
        .await
        .map_err(|e| e.to_string())?;
    if args.json {
        print_json(&view);
        return Ok(ExitCode::SUCCESS);
    }
    let job = &view.job;
    println!(
        "job {}  {}  ({} {} cpu, user {})",
        job.id,
        job.state,
        job.kind(),
        job.spec.cpus,
        job.user
    );
    println!("command: {}", job.spec.argv.join(" "));
    if let Some(situation) = &view.situation {
        println!("situation: {situation}");
    }
    if let Some(code) = job.exit_code {
        println!("exit code: {code}");
    }
    for t in &job.history {
        println!("  {:>13}  {:<10} {}", t.at.0, t.state.as_str(), t.reason);
    }
    if !job.output_tail.is_empty() {
        println!("output (tail):\n{}", job.output_tail);
    }
    Ok(ExitCode::SUCCESS)
}

async fn jobs(
    state: Option<String>,
    user: Option<String>,
    limit: usize,
    args: ClientArgs,
) -> Result<ExitCode, String> {
    let mut query = vec![format!("limit={limit}")];
    if let Some(state) = state {
        query.push(format!("state={state}"));
    }
    if let Some(user) = user {
        query.push(format!("user={user}"));
    }
    let jobs = client(&args)?
        .jobs(&query.join("&"))
        .await
        .map_err(|e| e.to_string())?;
    if args.json {
        print_json(&jobs);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:>8}  {:<10}  {:<10}  {:<12}  command",
        "id", "state", "kind", "user"
    );
    for job in jobs {
        println!(
            "{:>8}  {:<10}  {:<10}  {:<12}  {}",
            job.id.0,
            job.state.as_str(),
            job.kind().as_str(),
            job.user,
            job.spec.argv.join(" ")
        );
    }
    Ok(ExitCode::SUCCESS)
}

async fn cancel(id: u64, args: ClientArgs) -> Result<ExitCode, String> {
    let view = client(&args)?
        .cancel(JobId(id))
        .await
        .map_err(|e| e.to_string())?;
    if args.json {
        print_json(&view);
    } else {
        println!("job {} {}", view.job.id, view.job.state);
    }
    Ok(ExitCode::SUCCESS)
}

async fn watch(id: u64, args: ClientArgs) -> Result<ExitCode, String> {
    let client = client(&args)?;
    let bar = if args.json {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new_spinner()
    };
    bar.enable_steady_tick(Duration::from_millis(120));
    let mut last: Option<JobState> = None;
    client
        .watch(JobId(id), |event| {
            let (state, text) = match &event {
                WatchEvent::State(view) => {
                    (view.job.state, view.situation.clone().unwrap_or_else(|| view.job.reason.to_string()))
                }
                WatchEvent::Transition(t) => (t.state, t.reason.to_string()),
            };
            if args.json {
                let line = match &event {
                    WatchEvent::State(view) => serde_json::json!({"event": "state", "job": view.job.id, "state": state, "situation": text}),
                    WatchEvent::Transition(t) => serde_json::json!({"event": "transition", "job": t.job, "state": t.state, "at": t.at, "reason": t.reason}),
                };
                println!("{line}");
            } else {
                bar.set_message(format!("job {id}: {state} — {text}"));
            }
            last = Some(state);
            !state.is_terminal()
        })
        .await
        .map_err(|e| e.to_string())?;
    bar.finish_and_clear();
    let state = last.ok_or("the stream ended before any event")?;
    if !args.json {
        let view = client.job(JobId(id)).await.map_err(|e| e.to_string())?;
        println!("job {id} {state}: {}", view.job.reason);
        if !view.job.output_tail.is_empty() {
            print!("{}", view.job.output_tail);
        }
    }
    Ok(if state == JobState::Succeeded {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// A user name: what a person types, what a log shows, and what an
/// operating system would accept as an account name.
fn valid_user_name(name: &str) -> bool {
    let mut chars = name.chars();
    name.len() <= 64
        && chars
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "_.-".contains(c))
}

fn user_add(
    name: String,
    plan: String,
    admin: bool,
    data_dir: Option<PathBuf>,
    config: Option<PathBuf>,
) -> Result<ExitCode, String> {
    if !valid_user_name(&name) {
        return Err(format!(
            "user name {name:?} is not valid: 1 to 64 characters, lowercase letters, digits, '_', '.' and '-', starting with a letter or '_'"
        ));
    }
    let file = config_file(config.as_deref())?;
    let plans = file.core.unwrap_or_default().plans;
    if !plans.contains_key(&plan) {
        let known: Vec<&str> = plans.keys().map(String::as_str).collect();
        return Err(format!(
            "unknown plan {plan:?}: the configuration has {}",
            known.join(", ")
        ));
    }
    let data_dir = data_dir.or(file.data_dir).unwrap_or_else(default_data_dir);
    create_dir_mode(&data_dir, 0o711).map_err(|e| format!("data dir {e}"))?;
    let mut store = Store::open(&data_dir.join("foreman.db")).map_err(|e| e.to_string())?;
    let token = auth::new_token();
    let user = User {
        name: name.as_str().into(),
        plan: plan.as_str().into(),
        admin,
    };
    store
        .add_user(&user, &auth::sha256_hex(&token), foreman::seam::now())
        .map_err(|e| e.to_string())?;
    println!("{token}");
    eprintln!(
        "user {name} created on plan {plan}{}; the token above is shown only once",
        if admin { " (admin)" } else { "" }
    );
    Ok(ExitCode::SUCCESS)
}

fn replay(file: PathBuf, json: bool) -> Result<ExitCode, String> {
    let mut inputs = 0u64;
    let core = foreman::server::journal::replay(&file, |step| {
        inputs += 1;
        let at = step.at;
        for effect in step.effects {
            if json {
                println!(
                    "{}",
                    serde_json::to_string(&effect).expect("effects serialize")
                );
            } else if let foreman::core::Effect::Event(event) = effect {
                let job = event.job.map_or(String::from("-"), |j| j.to_string());
                let agent = event.agent.as_ref().map_or("-", |a| a.as_str());
                println!(
                    "{:>13} job {job:<6} agent {agent:<12} {:?}: {}",
                    at.0, event.kind, event.reason
                );
            }
        }
    })?;
    eprintln!(
        "replayed {inputs} inputs; {} jobs still live, {} agents known",
        core.jobs().count(),
        core.agents().count()
    );
    Ok(ExitCode::SUCCESS)
}
