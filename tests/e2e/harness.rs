//! Real supervisors and agents as processes on loopback, for end-to-end
//! tests. Every wait is on a condition, with a bound; nothing sleeps to
//! "wait a bit".

use std::future::Future;
use std::path::Path;
use std::process::{Child, Command};
use std::time::Duration;

use foreman::client::{Client, ClientError};
use foreman::core::{JobId, JobState};
use foreman::server::api::JobView;

pub const FOREMAN: &str = env!("CARGO_BIN_EXE_foreman");

/// The status and message of an API error; fails the test on anything else.
pub fn api_error<T: std::fmt::Debug>(
    result: Result<T, ClientError>,
) -> (hyper::StatusCode, String) {
    match result {
        Err(ClientError::Api { status, message }) => (status, message),
        other => panic!("expected an API error, got {other:?}"),
    }
}

/// Submits `spec` as `client`; the new job's id.
pub async fn submitted(client: &Client, spec: &foreman::core::SubmitSpec) -> JobId {
    client.submit(spec).await.expect("submitted").job.id
}

/// Waits until `check` gives `Some`, polling, for at most `bound`.
pub async fn wait_for<T, F, Fut>(what: &str, bound: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + bound;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "gave up after {bound:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub struct Supervisor {
    pub data_dir: tempfile::TempDir,
    pub process: Option<Child>,
    pub api: String,
    pub agent: String,
    pub admin: Client,
    /// Extra `foreman serve` arguments, kept across restarts.
    pub extra: Vec<String>,
    /// TLS to the API, as the supervisor's `server.json` tells local clients.
    pub tls: Option<foreman::tls::ClientTls>,
}

impl Supervisor {
    /// A supervisor with `local_agents` agents, fast pings and a short grace.
    pub async fn start(local_agents: u32) -> Supervisor {
        Supervisor::start_with(local_agents, None).await
    }

    /// The same, with `config` as its configuration file.
    pub async fn start_with(local_agents: u32, config: Option<&str>) -> Supervisor {
        let data_dir = tempfile::tempdir().expect("temp dir");
        let mut extra = Vec::new();
        if let Some(config) = config {
            let path = data_dir.path().join("config.toml");
            std::fs::write(&path, config).expect("config file");
            extra = vec!["--config".to_string(), path.display().to_string()];
        }
        let mut supervisor = Supervisor {
            data_dir,
            process: None,
            api: String::new(),
            agent: String::new(),
            admin: Client::new("", ""),
            extra,
            tls: None,
        };
        supervisor
            .launch(local_agents, "127.0.0.1:0", "127.0.0.1:0")
            .await;
        supervisor
    }

    pub fn path(&self) -> &Path {
        self.data_dir.path()
    }

    /// Starts the supervisor again on the same data dir and addresses (as a
    /// real restart would: its agents keep dialing the same endpoint).
    pub async fn restart(&mut self, local_agents: u32) {
        let (api, agent) = (self.api.clone(), self.agent.clone());
        self.launch(local_agents, &api, &agent).await;
    }

    async fn launch(&mut self, local_agents: u32, api: &str, agent: &str) {
        let server_file = self.path().join("server.json");
        let _ = std::fs::remove_file(&server_file);
        let starts = std::fs::read_dir(self.path()).map_or(0, |d| {
            d.flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with("serve-"))
                .count()
        });
        let log = std::fs::File::create(self.path().join(format!("serve-{starts}.log")))
            .expect("log file");
        let child = Command::new(FOREMAN)
            .args(["serve", "--api-addr", api, "--agent-addr", agent])
            .args(["--local-agents", &local_agents.to_string()])
            .args([
                "--ping-interval-ms",
                "200",
                "--ping-timeout-ms",
                "1500",
                "--agent-grace-ms",
                "3000",
            ])
            .arg("--data-dir")
            .arg(self.path())
            .args(&self.extra)
            .env("FOREMAN_LOG", "info")
            .env("FOREMAN_DATA_DIR", self.path())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .spawn()
            .expect("foreman serve starts");
        self.process = Some(child);
        let text = wait_for("server.json", Duration::from_secs(20), || {
            let path = server_file.clone();
            async move {
                std::fs::read_to_string(path)
                    .ok()
                    .filter(|t| t.contains("agent"))
            }
        })
        .await;
        let file: serde_json::Value = serde_json::from_str(&text).expect("server.json is JSON");
        self.api = file["api"].as_str().expect("api").to_string();
        self.agent = file["agent"].as_str().expect("agent").to_string();
        self.tls = file["tls_ca"].as_str().map(|ca| {
            let name = file["tls_server_name"].as_str().unwrap_or("127.0.0.1");
            foreman::tls::ClientTls::new(Some(Path::new(ca)), name).expect("the supervisor's CA")
        });
        let token = std::fs::read_to_string(self.path().join("admin.token")).expect("admin token");
        self.admin = self.client(token.trim());
    }

    /// kill -9 of the supervisor alone (its agents live on).
    pub fn kill_9(&mut self) {
        if let Some(mut child) = self.process.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends SIGTERM to the supervisor and waits (with a bound) for it to
    /// exit; returns whether it exited successfully.
    pub async fn stop(&mut self) -> bool {
        let mut child = self.process.take().expect("a running supervisor");
        let pid = child.id().to_string();
        let sent = Command::new("kill").args(["-TERM", &pid]).status();
        assert!(sent.is_ok_and(|s| s.success()), "kill -TERM {pid}");
        wait_for("the supervisor to exit", Duration::from_secs(20), || {
            let status = child.try_wait().expect("try_wait");
            async move { status }
        })
        .await
        .success()
    }

    /// Everything the supervisor printed in all its runs so far.
    pub fn log(&self) -> String {
        let mut names: Vec<_> = std::fs::read_dir(self.path())
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("serve-"))
            .collect();
        names.sort();
        names
            .iter()
            .map(|n| std::fs::read_to_string(self.path().join(n)).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Issues agent `id` a credential with the CLI; returns its token,
    /// also written to a file in the data dir (its path is the second).
    pub fn agent_token(&self, id: &str) -> (String, std::path::PathBuf) {
        let (ok, out, err) = self.cli(&["agent-token", "add", id]);
        assert!(ok, "agent-token add {id}: {err}");
        let token = out.trim().to_string();
        let path = self.path().join(format!("{id}.agent-token"));
        std::fs::write(&path, &token).expect("token file");
        (token, path)
    }

    /// Creates a user with the CLI; returns a client with their token.
    pub fn add_user(&self, name: &str, plan: &str) -> Client {
        let output = Command::new(FOREMAN)
            .args(["user", "add", name, "--plan", plan, "--data-dir"])
            .arg(self.path())
            .args(&self.extra)
            .output()
            .expect("foreman user add runs");
        assert!(
            output.status.success(),
            "user add: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let token = String::from_utf8(output.stdout)
            .expect("token")
            .trim()
            .to_string();
        self.client(&token)
    }

    /// A client of this supervisor's API with `token` (over TLS if it has TLS).
    pub fn client(&self, token: &str) -> Client {
        Client {
            tls: self.tls.clone(),
            ..Client::new(self.api.clone(), token)
        }
    }

    /// Runs the CLI against this supervisor; returns (success, stdout, stderr).
    pub fn cli(&self, args: &[&str]) -> (bool, String, String) {
        let output = Command::new(FOREMAN)
            .args(args)
            .env("FOREMAN_DATA_DIR", self.path())
            .env_remove("FOREMAN_SERVER")
            .env_remove("FOREMAN_TOKEN")
            .output()
            .expect("foreman runs");
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    }

    /// The pids of this supervisor's local agent processes named `id`.
    pub fn agent_pids(&self, id: &str) -> Vec<u32> {
        pids_matching(&format!(
            "--id {id} --work-dir {}",
            self.path().join("runs").display()
        ))
    }

    pub async fn wait_state(
        &self,
        client: &Client,
        job: JobId,
        state: JobState,
        bound: Duration,
    ) -> JobView {
        let deadline = tokio::time::Instant::now() + bound;
        loop {
            let view = client.job(job).await;
            if let Ok(view) = &view {
                if view.job.state == state {
                    return view.clone();
                }
            }
            if tokio::time::Instant::now() >= deadline {
                let log = std::fs::read_dir(self.path())
                    .into_iter()
                    .flatten()
                    .flatten()
                    .filter(|e| e.file_name().to_string_lossy().starts_with("serve-"))
                    .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
                    .collect::<Vec<_>>()
                    .join("\n----\n");
                let tail: String = log
                    .lines()
                    .rev()
                    .take(60)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect::<Vec<_>>()
                    .join("\n");
                panic!("gave up after {bound:?} waiting for job {job} to be {state}; it is {view:#?}\nsupervisor log (tail):\n{tail}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn wait_agents(&self, count: usize) {
        wait_for(
            &format!("{count} agents connected"),
            Duration::from_secs(20),
            || async {
                let agents = self.admin.agents().await.ok()?;
                let connected = agents
                    .as_array()?
                    .iter()
                    .filter(|a| a["link"]["link"] == "connected")
                    .count();
                (connected == count).then_some(())
            },
        )
        .await
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        self.kill_9();
        // Its local agents, which outlive a killed supervisor by design.
        for pid in pids_matching(&format!(
            "--work-dir {}",
            self.path().join("runs").display()
        )) {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        }
    }
}

/// Pids of processes whose command line contains `needle`.
pub fn pids_matching(needle: &str) -> Vec<u32> {
    let mut pids = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return pids;
    };
    for entry in entries.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(raw) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&raw).replace('\0', " ");
        if cmdline.contains(needle) && pid != std::process::id() {
            // Zombies have an empty command line and are not counted.
            pids.push(pid);
        }
    }
    pids
}

pub fn unique_sleep(tag: u32) -> String {
    // A duration no other process on the machine will have, to find ours.
    format!("{}.{:06}", 900 + tag, std::process::id() % 1_000_000)
}

/// Pids of `sleep <duration>` processes (not the shells that started them).
pub fn sleeps(duration: &str) -> Vec<u32> {
    let exact = format!("sleep {duration} ");
    pids_matching(&exact)
        .into_iter()
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|raw| String::from_utf8_lossy(&raw).replace('\0', " ") == exact)
                .unwrap_or(false)
        })
        .collect()
}
