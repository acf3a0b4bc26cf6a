//! Load runs against a real `foreman serve` process on loopback, with
//! durable commits. Every request loop is bounded in count and time.
//!
//!   cargo xtask load            (builds release, then runs every mode)
//!
//! Modes (first argument), each printing one summary line:
//! - `noop FOREMAN_BIN`: closed-loop submissions from 64 keep-alive clients
//!   for 10 s, run by 8 in-process agents whose runner does nothing (NOT a
//!   real process: it reports started and finished at once). Jobs/s and
//!   p50/p99 submit→running and submit→done, supervisor peak RSS.
//! - `rate FOREMAN_BIN`: the same agents, 1,000 jobs/s offered (open loop)
//!   for 10 s, then 200 jobs/s (the rate peers' latencies are given at):
//!   p50/p99 submit→running.
//! - `fsync FOREMAN_BIN`: what durability costs, in one sitting: the disk's
//!   fsync latency, then `noop` with commits not durable (a benchmark-only
//!   setting), durable, and durable with 3 ms more per commit, as ratios;
//!   then `rate` durable and with 3 ms more.
//! - `processes FOREMAN_BIN`: two local agents running the real `true`, 16
//!   clients; and, for comparison, how fast this machine spawns `true`
//!   itself with the same concurrency.
//! - `memory FOREMAN_BIN`: 100,000 finished jobs in the store and 10,000
//!   queued: the supervisor's RSS.
//! - `listing FOREMAN_BIN`: 400 queued jobs of 120 KiB each (47 MiB of
//!   records), listed by 8 clients at once, `limit=1000`, for 5 s: the
//!   supervisor's peak RSS, and the jobs per page.
//! - `deep FOREMAN_BIN`: 100,000 jobs queued with no agent, the journal in
//!   1 MiB segments (so that the queue's snapshot is far larger than a
//!   segment): submit latency at the start and at 100,000 queued, and the
//!   bytes the journal and the whole supervisor wrote.

// A load tool measures wall-clock time and runs outside any simulation.
#![allow(clippy::disallowed_methods)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use foreman::agent::runner::{RunControl, RunFuture, RunOrder, Runner};
use foreman::agent::{Agent, AgentOptions};
use foreman::client::Client;
use foreman::core::{FinishedReport, Job, JobState, Millis, Outcome, SubmitSpec};
use foreman::store::Store;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;

const RUN_SECS: u64 = 10;

/// Reports started and finished at once: measures the supervisor, not processes.
struct NoopRunner;

impl Runner for NoopRunner {
    fn run(&self, _order: RunOrder, control: RunControl) -> RunFuture {
        Box::pin(async move {
            let _ = control.started.send(());
            FinishedReport {
                outcome: Outcome::Exited { code: 0 },
                output_tail: String::new(),
                run_ms: 0,
            }
        })
    }
}

struct Server {
    child: Child,
    dir: tempfile::TempDir,
    api: String,
    agent: String,
    token: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        for pid in pids_with(&self.dir.path().join("runs").display().to_string()) {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        }
    }
}

fn pids_with(needle: &str) -> Vec<u32> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains(needle) {
            pids.push(pid);
        }
    }
    pids
}

/// The admin's plan (premium) lets one user hold as many jobs as the agents
/// offer: the load comes from one account, and the runs measure the
/// supervisor, not the fair-share cap (8 for premium by default).
const LOAD_CONFIG: &str = r#"
[core]
pool_sequential_cpus = 1024
[core.plans.premium]
priority = 10
max_queued = 1000000
sequential = { max_running = 1024, max_run_secs_limit = 3600, default_run_secs = 3600 }
parallel = { max_running = 4, max_run_secs_limit = 3600, default_run_secs = 3600 }
[core.plans.basic]
priority = 0
sequential = { max_running = 4, max_run_secs_limit = 3600, default_run_secs = 3600 }
parallel = { max_running = 1, max_run_secs_limit = 3600, default_run_secs = 3600 }
"#;

fn start_server(bin: &Path, local_agents: u32, dir: Option<tempfile::TempDir>) -> Server {
    start_server_with(bin, local_agents, dir, &[])
}

fn start_server_with(
    bin: &Path,
    local_agents: u32,
    dir: Option<tempfile::TempDir>,
    extra: &[&str],
) -> Server {
    let dir = dir.unwrap_or_else(|| tempfile::tempdir().expect("temp dir"));
    let config = dir.path().join("load.toml");
    std::fs::write(&config, LOAD_CONFIG).expect("config");
    let child = Command::new(bin)
        .args(["serve", "--config"])
        .arg(&config)
        .args(["--api-addr", "127.0.0.1:0", "--agent-addr", "127.0.0.1:0"])
        .args(["--local-agents", &local_agents.to_string()])
        .arg("--data-dir")
        .arg(dir.path())
        .args(extra)
        .env(
            "FOREMAN_LOG",
            std::env::var("FOREMAN_LOAD_SERVER_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdout(Stdio::null())
        .spawn()
        .expect("foreman serve starts");
    let file = dir.path().join("server.json");
    let began = Instant::now();
    let text = loop {
        if let Ok(text) = std::fs::read_to_string(&file) {
            if text.contains("agent") {
                break text;
            }
        }
        assert!(
            began.elapsed() < Duration::from_secs(30),
            "the server did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let json: serde_json::Value = serde_json::from_str(&text).expect("server.json");
    let token = std::fs::read_to_string(dir.path().join("admin.token"))
        .expect("token")
        .trim()
        .to_string();
    Server {
        api: json["api"].as_str().expect("api").to_string(),
        agent: json["agent"].as_str().expect("agent").to_string(),
        child,
        dir,
        token,
    }
}

/// CPU time of process `pid` in clock ticks: (its own, its waited-for
/// children's), from `/proc/PID/stat` (utime + stime, cutime + cstime).
fn cpu_ticks(pid: u32) -> (u64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let field = |n: usize| -> u64 {
        rest.split_whitespace()
            .nth(n)
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    // utime is field 14 of the line, the 12th after the name and state.
    (field(11) + field(12), field(13) + field(14))
}

fn ticks_per_second() -> f64 {
    match nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK) {
        Ok(Some(ticks)) if ticks > 0 => ticks as f64,
        _ => 100.0,
    }
}

/// CPU time in ticks of the supervisor, its agents (their own), and the
/// jobs the agents ran (their waited-for children).
fn cpu_split(server: &Server) -> [u64; 3] {
    let (supervisor, _) = cpu_ticks(server.child.id());
    let runs = server.dir.path().join("runs").display().to_string();
    let mut split = [supervisor, 0, 0];
    for pid in pids_with(&runs) {
        let (own, children) = cpu_ticks(pid);
        split[1] += own;
        split[2] += children;
    }
    split
}

fn rss_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// A keep-alive HTTP/1.1 connection submitting jobs.
struct Submitter {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    api: String,
    token: String,
    body: Bytes,
}

impl Submitter {
    async fn connect(api: &str, token: &str, spec: &SubmitSpec) -> Submitter {
        let stream = tokio::net::TcpStream::connect(api).await.expect("connect");
        let _ = stream.set_nodelay(true);
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .expect("handshake");
        tokio::spawn(conn);
        Submitter {
            sender,
            api: api.to_string(),
            token: token.to_string(),
            body: Bytes::from(serde_json::to_vec(spec).expect("spec")),
        }
    }

    async fn submit(&mut self) -> bool {
        let request = hyper::Request::post("/v1/jobs")
            .header("host", &self.api)
            .header("authorization", format!("Bearer {}", self.token))
            .header("content-type", "application/json")
            .body(Full::new(self.body.clone()))
            .expect("request");
        match self.sender.send_request(request).await {
            Ok(response) => {
                let ok = response.status().is_success();
                let _ = response.into_body().collect().await;
                ok
            }
            Err(_) => false,
        }
    }
}

/// A credential for agent `id`, issued as an admin would.
fn agent_token(bin: &Path, server: &Server, id: &str) -> String {
    let out = Command::new(bin)
        .args(["agent-token", "add", id, "--data-dir"])
        .arg(server.dir.path())
        .output()
        .expect("foreman agent-token add runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .expect("a token")
        .trim()
        .to_string()
}

fn start_agents(bin: &Path, server: &Server, count: usize, cpus: u32) {
    for i in 0..count {
        let options = AgentOptions {
            supervisor: server.agent.clone(),
            token: agent_token(bin, server, &format!("noop-{i}")),
            agent_id: format!("noop-{i}"),
            cpus,
            labels: BTreeMap::new(),
            work_dir: server.dir.path().join("noop-runs"),
            reconnect_min_ms: 50,
            reconnect_max_ms: 1_000,
            reconnect_attempts_max: Some(50),
            leave_alone_ms: None,
            tls: None,
        };
        tokio::spawn(Agent::new(options, Arc::new(NoopRunner)).run());
    }
}

async fn wait_agents(client: &Client, count: usize) {
    let began = Instant::now();
    loop {
        if let Ok(agents) = client.agents().await {
            if agents.as_array().map_or(0, Vec::len) >= count {
                return;
            }
        }
        assert!(
            began.elapsed() < Duration::from_secs(30),
            "agents did not connect"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Latencies (ms) from each job's own record: queued → running, queued → end.
async fn latencies(client: &Client) -> (Vec<u64>, Vec<u64>, usize) {
    let mut stages: [Vec<u64>; 2] = [Vec::new(), Vec::new()];
    let mut to_running = Vec::new();
    let mut to_done = Vec::new();
    let mut before: Option<u64> = None;
    let mut done = 0;
    loop {
        let query = match before {
            Some(b) => format!("limit=1000&before={b}"),
            None => "limit=1000".to_string(),
        };
        let page: Vec<Job> = client.jobs(&query).await.expect("list");
        if page.is_empty() {
            break;
        }
        before = page.last().map(|j| j.id.0);
        for job in &page {
            let at = |state| job.history.iter().find(|t| t.state == state).map(|t| t.at);
            if let Some(running) = at(JobState::Running) {
                to_running.push(running.ms_since(job.submitted_at));
                if let Some(dispatched) = at(JobState::Dispatched) {
                    stages[0].push(dispatched.ms_since(job.submitted_at));
                    stages[1].push(running.ms_since(dispatched));
                }
            }
            if job.state == JobState::Succeeded {
                done += 1;
                to_done.push(
                    job.finished_at
                        .unwrap_or(Millis(0))
                        .ms_since(job.submitted_at),
                );
            }
        }
    }
    to_running.sort_unstable();
    to_done.sort_unstable();
    for stage in &mut stages {
        stage.sort_unstable();
    }
    eprintln!(
        "  stages: queued->dispatched p50 {} p99 {} ms; dispatched->running p50 {} p99 {} ms",
        pct(&stages[0], 0.5),
        pct(&stages[0], 0.99),
        pct(&stages[1], 0.5),
        pct(&stages[1], 0.99)
    );
    (to_running, to_done, done)
}

/// Where one CPU's time goes between two jobs, as means (µs) over every
/// attempt, from the records (the supervisor's millisecond clock, so only
/// means over thousands say much): dispatched → started (the decision's
/// commit, the order's trip, the run dir, the spawn, the report's trip),
/// started → ended (the process as the supervisor sees it), the process's
/// own run time as its agent measured it, and ended → the agent's next
/// dispatch.
async fn cycle(client: &Client) -> String {
    let mut by_agent: BTreeMap<String, Vec<foreman::core::Attempt>> = BTreeMap::new();
    let mut before: Option<u64> = None;
    loop {
        let query = match before {
            Some(b) => format!("limit=1000&before={b}"),
            None => "limit=1000".to_string(),
        };
        let page: Vec<Job> = client.jobs(&query).await.expect("list");
        let Some(last) = page.last() else { break };
        before = Some(last.id.0);
        for job in page {
            for attempt in job.attempts {
                by_agent
                    .entry(attempt.agent.to_string())
                    .or_default()
                    .push(attempt);
            }
        }
    }
    let mean = |v: &[u64]| v.iter().sum::<u64>() as f64 * 1000.0 / v.len().max(1) as f64;
    let (mut to_start, mut to_end, mut run, mut gap) = (vec![], vec![], vec![], vec![]);
    for attempts in by_agent.values_mut() {
        attempts.sort_by_key(|a| (a.dispatched_at, a.number));
        for (i, a) in attempts.iter().enumerate() {
            let (Some(started), Some(ended)) = (a.started_at, a.ended_at) else {
                continue;
            };
            to_start.push(started.ms_since(a.dispatched_at));
            to_end.push(ended.ms_since(started));
            run.extend(a.run_ms);
            if let Some(next) = attempts.get(i + 1) {
                gap.push(next.dispatched_at.ms_since(ended));
            }
        }
    }
    format!(
        "per CPU, means: dispatched->started {:.0} µs, started->ended {:.0} µs (the process's own run {:.0} µs), ended->next dispatched {:.0} µs",
        mean(&to_start),
        mean(&to_end),
        mean(&run),
        mean(&gap)
    )
}

fn pct(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// Submits `total` jobs from `clients` keep-alive connections, as fast as
/// they are acknowledged; returns (acknowledged, seconds).
async fn closed_loop(server: &Server, clients: usize, total: u64, spec: SubmitSpec) -> (u64, f64) {
    let next = Arc::new(AtomicU64::new(0));
    let acked = Arc::new(AtomicU64::new(0));
    let began = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (next, acked, api, token, spec) = (
            next.clone(),
            acked.clone(),
            server.api.clone(),
            server.token.clone(),
            spec.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut submitter = Submitter::connect(&api, &token, &spec).await;
            while next.fetch_add(1, Ordering::Relaxed) < total {
                if submitter.submit().await {
                    acked.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for task in tasks {
        let _ = task.await;
    }
    (acked.load(Ordering::Relaxed), began.elapsed().as_secs_f64())
}

async fn drain(client: &Client, total: u64) -> f64 {
    let began = Instant::now();
    loop {
        let queued = client
            .jobs("state=queued&limit=1")
            .await
            .map(|j| j.len())
            .unwrap_or(1);
        let running = client
            .jobs("state=running&limit=1")
            .await
            .map(|j| j.len())
            .unwrap_or(1);
        let dispatched = client
            .jobs("state=dispatched&limit=1")
            .await
            .map(|j| j.len())
            .unwrap_or(1);
        if queued + running + dispatched == 0 {
            return began.elapsed().as_secs_f64();
        }
        assert!(
            began.elapsed() < Duration::from_secs(600),
            "{total} jobs did not finish"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn noop(bin: PathBuf) {
    let server = start_server(&bin, 0, None);
    let admin = Client::new(server.api.clone(), server.token.clone());
    start_agents(&bin, &server, 8, 64);
    wait_agents(&admin, 8).await;
    let (acked, secs) = closed_loop(&server, 64, 50_000, SubmitSpec::command(["noop"])).await;
    let drain_secs = drain(&admin, acked).await;
    let (to_running, to_done, done) = latencies(&admin).await;
    println!(
        "noop runner (in-process, no real process), 64 clients, 8 agents x 64 cpus: {acked} jobs acknowledged in {secs:.1} s = {:.0} jobs/s submitted; {done} done, {:.0} jobs/s end to end (last done {drain_secs:.1} s after the last submit); submit->running p50 {} ms p99 {} ms; submit->done p50 {} ms p99 {} ms; supervisor peak RSS {} MiB",
        acked as f64 / secs,
        done as f64 / (secs + drain_secs),
        pct(&to_running, 0.5),
        pct(&to_running, 0.99),
        pct(&to_done, 0.5),
        pct(&to_done, 0.99),
        rss_kib(server.child.id(), "VmHWM:") / 1024
    );
}

/// The disk's own fsync latency where the supervisors' data dirs live (the
/// temp dir): 200 appends of 4 KiB, each made durable; (p50, p99) in µs.
fn fsync_latency() -> (u64, u64) {
    use std::io::Write;
    let dir = tempfile::tempdir().expect("temp dir");
    let mut file = std::fs::File::create(dir.path().join("probe")).expect("probe file");
    let mut times = Vec::new();
    for _ in 0..200 {
        let began = Instant::now();
        file.write_all(&[7u8; 4096]).expect("write");
        file.sync_data().expect("fsync");
        times.push(began.elapsed().as_micros() as u64);
    }
    times.sort_unstable();
    (pct(&times, 0.5), pct(&times, 0.99))
}

/// The `noop` run with `clients` and `extra` serve arguments: (jobs/s end to end,
/// submit->done p50, p99 in ms).
async fn noop_end_to_end(bin: &Path, extra: &[&str], clients: usize) -> (f64, u64, u64) {
    let server = start_server_with(bin, 0, None, extra);
    let admin = Client::new(server.api.clone(), server.token.clone());
    start_agents(bin, &server, 8, 64);
    wait_agents(&admin, 8).await;
    let (acked, secs) = closed_loop(&server, clients, 50_000, SubmitSpec::command(["noop"])).await;
    let drain_secs = drain(&admin, acked).await;
    let (_, to_done, done) = latencies(&admin).await;
    eprintln!(
        "  {acked} acknowledged in {secs:.1} s = {:.0} jobs/s submitted; last done {drain_secs:.1} s after the last submit",
        acked as f64 / secs
    );
    (
        done as f64 / (secs + drain_secs),
        pct(&to_done, 0.5),
        pct(&to_done, 0.99),
    )
}

/// What durability costs, in one sitting: the `noop` run with commits that
/// do not wait for the disk, durable, and durable with 3 ms more per fsync
/// (a network disk's), with 64 clients and with 256; then the `rate` run
/// durable and +3 ms. Ratios are to the run that is not durable with as
/// many clients; the disk's fsync is measured first.
async fn fsync(bin: PathBuf) {
    let (p50, p99) = fsync_latency();
    println!("this disk's fsync (the temp dir's), same sitting: p50 {p50} us, p99 {p99} us");
    let runs: [(&str, &[&str]); 3] = [
        (
            "commits not durable (benchmark only)",
            &["--bench-no-fsync"],
        ),
        ("durable", &[]),
        (
            "durable, +3 ms per fsync",
            &["--bench-fsync-delay-us", "3000"],
        ),
    ];
    for clients in [64, 256] {
        let mut base = None;
        for (label, extra) in runs {
            let (rate, p50, p99) = noop_end_to_end(&bin, extra, clients).await;
            let base = *base.get_or_insert(rate);
            println!(
                "noop end to end, {clients} clients, {label}: {rate:.0} jobs/s = {:.0}% of not durable; submit->done p50 {p50} ms p99 {p99} ms",
                100.0 * rate / base
            );
        }
    }
    for (label, extra) in &runs[1..] {
        let (p50, p99, max) = rate_run(&bin, extra, 1_000).await;
        println!(
            "1,000 jobs/s offered, {label}: submit->running p50 {p50} ms p99 {p99} ms max {max} ms"
        );
    }
}

async fn rate(bin: PathBuf) {
    // 1,000 jobs/s, and 200 jobs/s: the rate other systems' latency
    // figures are usually given at, so that p50/p99 can be set beside them.
    for per_sec in [1_000, 200] {
        let (p50, p99, max) = rate_run(&bin, &[], per_sec).await;
        println!(
            "noop runner, {per_sec} jobs/s offered for {RUN_SECS} s: submit->running p50 {p50} ms p99 {p99} ms max {max} ms"
        );
    }
}

/// `per_sec` jobs/s offered for `RUN_SECS`, open loop: submit->running
/// (p50, p99, max) in ms.
async fn rate_run(bin: &Path, extra: &[&str], per_sec: u64) -> (u64, u64, u64) {
    let server = start_server_with(bin, 0, None, extra);
    let admin = Client::new(server.api.clone(), server.token.clone());
    start_agents(bin, &server, 8, 64);
    wait_agents(&admin, 8).await;
    let total = per_sec * RUN_SECS;
    let workers = 16u64;
    let began = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..workers {
        let (api, token) = (server.api.clone(), server.token.clone());
        tasks.push(tokio::spawn(async move {
            let mut submitter =
                Submitter::connect(&api, &token, &SubmitSpec::command(["noop"])).await;
            let mut sent = 0;
            // Worker w sends jobs w, w+16, ... on their scheduled instants.
            for n in (w..total).step_by(workers as usize) {
                let due = began + Duration::from_micros(n * 1_000_000 / per_sec);
                tokio::time::sleep(due.saturating_duration_since(Instant::now())).await;
                if submitter.submit().await {
                    sent += 1;
                }
            }
            sent
        }));
    }
    let mut sent = 0;
    for task in tasks {
        sent += task.await.unwrap_or(0);
    }
    let secs = began.elapsed().as_secs_f64();
    drain(&admin, sent).await;
    let (to_running, _, done) = latencies(&admin).await;
    eprintln!("  {sent} acknowledged in {secs:.1} s, {done} done");
    (
        pct(&to_running, 0.5),
        pct(&to_running, 0.99),
        to_running.last().copied().unwrap_or(0),
    )
}

async fn processes(bin: PathBuf) {
    // The machine's own rate: spawn `true` with the agents' concurrency.
    let concurrency: u32 = std::env::var("LOAD_AGENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    let began = Instant::now();
    let spawned = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let spawned = spawned.clone();
        tasks.push(tokio::spawn(async move {
            let until = Instant::now() + Duration::from_secs(RUN_SECS);
            while Instant::now() < until {
                let status = tokio::process::Command::new("true").status().await;
                if status.is_ok() {
                    spawned.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for task in tasks {
        let _ = task.await;
    }
    let raw = spawned.load(Ordering::Relaxed) as f64 / began.elapsed().as_secs_f64();

    let server = start_server(&bin, concurrency, None);
    let admin = Client::new(server.api.clone(), server.token.clone());
    wait_agents(&admin, concurrency as usize).await;
    let total = 6_000;
    let before = cpu_split(&server);
    let (acked, secs) = closed_loop(&server, 16, total, SubmitSpec::command(["true"])).await;
    let drain_secs = drain(&admin, acked).await;
    let after = cpu_split(&server);
    let (_, to_done, done) = latencies(&admin).await;
    let rate = done as f64 / (secs + drain_secs);
    println!(
        "real `true` processes, {concurrency} local agents: {done} jobs done in {:.1} s = {rate:.0} jobs/s; raw spawn rate of `true` ({concurrency} at a time): {raw:.0}/s; ratio {:.0}%; submit->done p50 {} ms p99 {} ms",
        secs + drain_secs,
        100.0 * rate / raw,
        pct(&to_done, 0.5),
        pct(&to_done, 0.99),
    );
    // Clock ticks are coarse (10 ms at the usual 100 per second): over
    // thousands of jobs, per-job figures are good to a few µs.
    let tick_us = 1e6 / ticks_per_second();
    let per_job = |i: usize| (after[i] - before[i]) as f64 * tick_us / done.max(1) as f64;
    println!(
        "CPU per job: supervisor {:.0} µs, agents {:.0} µs, the job itself {:.0} µs (wall time per job on {concurrency} CPUs: {:.0} µs)",
        per_job(0),
        per_job(1),
        per_job(2),
        1e6 * f64::from(concurrency) / rate,
    );
    println!("{}", cycle(&admin).await);
}

async fn memory(bin: PathBuf) {
    let dir = tempfile::tempdir().expect("temp dir");
    let finished = 100_000u64;
    {
        // 100,000 finished jobs, written straight into the store.
        let mut store = Store::open(&dir.path().join("foreman.db")).expect("store");
        let mut batch = Vec::new();
        for id in 1..=finished {
            batch.push(Arc::new(finished_job(id)));
            if batch.len() == 5_000 {
                store.commit(&batch).expect("commit");
                batch.clear();
            }
        }
        store.commit(&batch).expect("commit");
    }
    let server = start_server(&bin, 0, Some(dir));
    let pid = server.child.id();
    let baseline = rss_kib(pid, "VmRSS:");
    let queued = 10_000;
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let (api, token, count, stop) = (
            server.api.clone(),
            server.token.clone(),
            count.clone(),
            stop.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let spec = SubmitSpec::command(["python", "simulate.py", "--steps", "1000"]);
            let mut submitter = Submitter::connect(&api, &token, &spec).await;
            while !stop.load(Ordering::Relaxed) && count.fetch_add(1, Ordering::Relaxed) < queued {
                submitter.submit().await;
            }
        }));
    }
    for task in tasks {
        let _ = task.await;
    }
    stop.store(true, Ordering::Relaxed);
    let admin = Client::new(server.api.clone(), server.token.clone());
    let waiting = admin
        .jobs("state=queued&limit=1000")
        .await
        .map(|j| j.len())
        .unwrap_or(0);
    println!(
        "memory: {finished} finished jobs in the store and {queued} queued (first page {waiting}): supervisor RSS {} MiB (peak {} MiB; {} MiB before the submissions)",
        rss_kib(pid, "VmRSS:") / 1024,
        rss_kib(pid, "VmHWM:") / 1024,
        baseline / 1024
    );
}

/// Bytes a process wrote through write calls (`wchar` of /proc/PID/io).
fn written_bytes(pid: u32) -> u64 {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).unwrap_or_default();
    io.lines()
        .find_map(|l| l.strip_prefix("wchar: "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

fn dir_bytes(dir: &Path) -> (u64, usize) {
    let sizes: Vec<u64> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.metadata().ok().map(|m| m.len()))
        .collect();
    (sizes.iter().sum(), sizes.len())
}

async fn listing(bin: PathBuf) {
    let server = start_server(&bin, 0, None);
    let pid = server.child.id();
    let admin = Client::new(server.api.clone(), server.token.clone());
    let jobs = 400;
    let spec = SubmitSpec::command(["echo".to_string(), "x".repeat(120 * 1024)]);
    for _ in 0..jobs {
        admin.submit(&spec).await.expect("a large job is accepted");
    }
    let before = rss_kib(pid, "VmHWM:");
    let began = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let admin = admin.clone();
        tasks.push(tokio::spawn(async move {
            let (mut pages, mut listed) = (0u64, 0usize);
            while began.elapsed() < Duration::from_secs(5) {
                listed += admin.jobs("limit=1000").await.expect("a page").len();
                pages += 1;
            }
            (pages, listed)
        }));
    }
    let (mut pages, mut listed) = (0, 0);
    for task in tasks {
        let (p, l) = task.await.expect("a lister");
        pages += p;
        listed += l;
    }
    println!(
        "listing: {jobs} jobs of 120 KiB ({} MiB of records), 8 clients listing limit=1000 for 5 s: {pages} pages of {} jobs on average; supervisor peak RSS {} MiB ({} MiB before the listings)",
        jobs * 120 / 1024,
        listed / pages.max(1) as usize,
        rss_kib(pid, "VmHWM:") / 1024,
        before / 1024
    );
}

async fn deep(bin: PathBuf) {
    // FOREMAN_LOAD_DEEP_JOBS: fewer, to compare with a build that cannot
    // reach 100,000 in reasonable time.
    let queued: u64 = std::env::var("FOREMAN_LOAD_DEEP_JOBS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let server = start_server_with(
        &bin,
        0,
        None,
        &["--journal-segment-mib", "1", "--journal-segments", "100000"],
    );
    let pid = server.child.id();
    let written_before = written_bytes(pid);
    let count = Arc::new(AtomicU64::new(0));
    let began = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let (api, token, count) = (server.api.clone(), server.token.clone(), count.clone());
        tasks.push(tokio::spawn(async move {
            let spec = SubmitSpec::command(["python", "simulate.py", "--steps", "1000"]);
            let mut submitter = Submitter::connect(&api, &token, &spec).await;
            // (queue depth when sent, µs to the reply)
            let mut seen = Vec::new();
            loop {
                let n = count.fetch_add(1, Ordering::Relaxed);
                if n >= queued {
                    break;
                }
                let sent = Instant::now();
                assert!(submitter.submit().await, "submission {n} refused");
                seen.push((n, sent.elapsed().as_micros() as u64));
            }
            seen
        }));
    }
    let mut seen = Vec::new();
    for task in tasks {
        seen.extend(task.await.expect("a submitter"));
    }
    let secs = began.elapsed().as_secs_f64();
    let window = |range: std::ops::Range<u64>| {
        let mut us: Vec<u64> = seen
            .iter()
            .filter(|(n, _)| range.contains(n))
            .map(|(_, us)| *us)
            .collect();
        us.sort_unstable();
        (pct(&us, 0.5), pct(&us, 0.99))
    };
    let tenth = queued / 10;
    let (first_p50, first_p99) = window(0..tenth);
    let (last_p50, last_p99) = window(queued - tenth..queued);
    let written = written_bytes(pid) - written_before;
    let (journal, segments) = dir_bytes(&server.dir.path().join("journal"));
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    println!(
        "deep: {queued} jobs queued in {secs:.1} s ({:.0}/s); submit p50/p99 {:.2}/{:.2} ms for the first tenth, {:.2}/{:.2} ms for the last tenth ({}-{queued} queued); journal {:.0} MiB in {segments} segments ({:.0} bytes per submit); the supervisor wrote {:.0} MiB in all ({:.0} bytes per submit); RSS {} MiB",
        queued as f64 / secs,
        first_p50 as f64 / 1000.0,
        first_p99 as f64 / 1000.0,
        last_p50 as f64 / 1000.0,
        last_p99 as f64 / 1000.0,
        queued - tenth,
        mib(journal),
        journal as f64 / queued as f64,
        mib(written),
        written as f64 / queued as f64,
        rss_kib(pid, "VmRSS:") / 1024,
    );
}

fn finished_job(id: u64) -> Job {
    let text = format!(
        r#"{{"id":{id},"user":"admin","plan":"premium","priority":10,
        "spec":{{"argv":["python","simulate.py","--steps","1000"],"env":{{}},"cwd":null,"labels":{{}},"kind":"sequential","cpus":1,"max_run_secs":3600,"queue_timeout_secs":null,"max_attempts":1,"idempotency_key":null}},
        "state":"succeeded","submitted_at":1000,"finished_at":2000,
        "attempts":[{{"number":1,"agent":"local-0","cpus":1,"dispatched_at":1000,"started_at":1001,"ended_at":2000,"phase":{{"phase":"ended"}},"outcome":{{"type":"exited","code":0}},"run_ms":999}}],
        "history":[{{"at":1000,"state":"queued","reason":"submitted"}},{{"at":1000,"state":"dispatched","reason":"attempt 1 on agent local-0"}},{{"at":1001,"state":"running","reason":"attempt 1 started on agent local-0"}},{{"at":2000,"state":"succeeded","reason":"exited with code 0"}}],
        "exit_code":0,"output_tail":"done\n","reason":"exited with code 0"}}"#
    );
    serde_json::from_str(&text).expect("a finished job record")
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(mode), Some(bin)) = (args.first(), args.get(1)) else {
        eprintln!("usage: load noop|rate|fsync|processes|memory|listing|deep FOREMAN_BIN");
        std::process::exit(2);
    };
    let bin = PathBuf::from(bin);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async move {
        match mode.as_str() {
            "noop" => noop(bin).await,
            "rate" => rate(bin).await,
            "fsync" => fsync(bin).await,
            "processes" => processes(bin).await,
            "memory" => memory(bin).await,
            "deep" => deep(bin).await,
            "listing" => listing(bin).await,
            other => {
                eprintln!("unknown mode {other}");
                std::process::exit(2);
            }
        }
    });
}
