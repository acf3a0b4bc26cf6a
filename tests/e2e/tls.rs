//! TLS on both listeners: with a certificate, local agents reach the agent
//! endpoint over TLS and run jobs, the CLI and API clients reach the API
//! over TLS; plaintext, a client that trusts another CA and a name the
//! certificate does not carry are all refused. Without a certificate the
//! supervisor refuses to listen beyond loopback unless told to.
//!
//! The certificates are made with `openssl`, as the README tells operators.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use foreman::client::{Client, ClientError};
use foreman::core::{JobState, SubmitSpec};
use foreman::tls::ClientTls;

use crate::harness::*;

const BOUND: Duration = Duration::from_secs(30);

/// Runs `openssl` in `dir` with `args` (split on spaces; no path in them
/// has one: they are names inside `dir`).
fn openssl(dir: &Path, args: &str) {
    let output = Command::new("openssl")
        .args(args.split_whitespace())
        .current_dir(dir)
        .output()
        .expect("openssl runs (Debian's openssl package)");
    assert!(
        output.status.success(),
        "openssl {args}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A CA (`<name>-ca.pem`), and a server certificate it issued for
/// 127.0.0.1 and localhost (`<name>.pem`, key `<name>.key`).
fn issue(dir: &Path, name: &str) -> (PathBuf, PathBuf, PathBuf) {
    let p256 = "-newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes";
    openssl(
        dir,
        &format!(
            "req -x509 {p256} -keyout {name}-ca.key -out {name}-ca.pem -days 2 -subj /CN=Foreman-test-CA-{name} \
             -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign"
        ),
    );
    openssl(
        dir,
        &format!("req {p256} -keyout {name}.key -out {name}.csr -subj /CN=localhost"),
    );
    std::fs::write(
        dir.join(format!("{name}.ext")),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .expect("extensions file");
    openssl(
        dir,
        &format!(
            "x509 -req -in {name}.csr -CA {name}-ca.pem -CAkey {name}-ca.key -CAcreateserial \
             -out {name}.pem -days 2 -extfile {name}.ext"
        ),
    );
    (
        dir.join(format!("{name}-ca.pem")),
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}.key")),
    )
}

/// A supervisor with TLS from a new CA in `dir`, with `local_agents` and
/// `more` configuration; the CA's file.
async fn tls_supervisor(dir: &Path, local_agents: u32, more: &str) -> (Supervisor, PathBuf) {
    let (ca, cert, key) = issue(dir, "server");
    let config = format!(
        "[tls]\ncert = {:?}\nkey = {:?}\nca = {:?}\n{more}",
        cert.display().to_string(),
        key.display().to_string(),
        ca.display().to_string()
    );
    (
        Supervisor::start_with(local_agents, Some(&config)).await,
        ca,
    )
}

/// The error a TLS client got connecting, as text.
fn connect_error<T: std::fmt::Debug>(result: Result<T, ClientError>) -> String {
    match result {
        Err(ClientError::Connect { error, .. }) => error.to_string(),
        other => panic!("expected a refused connection, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_jobs_run_over_tls_and_plaintext_strangers_and_wrong_names_are_refused() {
    let certs = tempfile::tempdir().expect("temp dir");
    let (sup, ca) = tls_supervisor(certs.path(), 1, "").await;
    let (other_ca, _, _) = issue(certs.path(), "other");
    assert!(
        sup.tls.is_some(),
        "server.json names the CA for local clients"
    );
    assert!(sup.log().contains("API on https://"), "{}", sup.log());
    // The local agent connected over wss (the only way in), and runs jobs
    // submitted over https.
    sup.wait_agents(1).await;
    let job = submitted(&sup.admin, &SubmitSpec::command(["echo", "over-tls"])).await;
    let done = sup
        .wait_state(&sup.admin, job, JobState::Succeeded, BOUND)
        .await;
    assert_eq!(done.job.output_tail, "over-tls\n");
    // The CLI finds the CA in server.json.
    let (ok, out, err) = sup.cli(&["status", &job.to_string()]);
    assert!(ok && out.contains("succeeded"), "{out}\n{err}");
    // And with it given explicitly, by address and name.
    let (ok, out, err) = sup.cli(&[
        "jobs",
        "--server",
        &format!("https://{}", sup.api),
        "--tls-ca",
        &ca.display().to_string(),
        "--tls-server-name",
        "localhost",
        "--token",
        sup.admin.token.as_str(),
    ]);
    assert!(ok && out.contains("echo over-tls"), "{out}\n{err}");

    // Plaintext on the TLS API: a JSON 400 that says to use TLS.
    let plain = Client::new(sup.api.clone(), sup.admin.token.clone());
    let (status, message) = api_error(plain.job(job).await);
    assert_eq!(status, hyper::StatusCode::BAD_REQUEST);
    assert!(message.contains("TLS only"), "{message}");
    // A client trusting another CA, or verifying a name the certificate
    // does not carry, does not connect, and says why.
    let stranger = Client {
        tls: Some(ClientTls::new(Some(&other_ca), "127.0.0.1").expect("CA")),
        ..Client::new(sup.api.clone(), sup.admin.token.clone())
    };
    let error = connect_error(stranger.job(job).await);
    assert!(error.to_lowercase().contains("unknownissuer"), "{error}");
    let misnamed = Client {
        tls: Some(ClientTls::new(Some(&ca), "foreman.example.org").expect("CA")),
        ..Client::new(sup.api.clone(), sup.admin.token.clone())
    };
    let error = connect_error(misnamed.job(job).await);
    assert!(error.contains("not valid for name"), "{error}");
    // The CLI told to use plain http against it is refused the same way.
    let (ok, _, err) = sup.cli(&[
        "jobs",
        "--server",
        &format!("http://{}", sup.api),
        "--token",
        sup.admin.token.as_str(),
    ]);
    assert!(!ok && err.contains("TLS only"), "{err}");

    // A plaintext agent with a valid token never joins.
    let (_, token_file) = sup.agent_token("plain-agent");
    let work = sup.path().join("plain-agent-work");
    let mut plain_agent = Command::new(FOREMAN)
        .args(["agent", "--id", "plain-agent", "--supervisor", &sup.agent])
        .arg("--token-file")
        .arg(&token_file)
        .arg("--work-dir")
        .arg(&work)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("agent starts");
    wait_for("the plaintext agent to be refused", BOUND, || async {
        sup.log()
            .contains("plaintext on the TLS agent endpoint")
            .then_some(())
    })
    .await;
    let _ = plain_agent.kill();
    let _ = plain_agent.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_a_certificate_local_agents_could_not_verify_is_refused_at_start() {
    let certs = tempfile::tempdir().expect("temp dir");
    let (ca, cert, key) = issue(certs.path(), "server");
    let data = tempfile::tempdir().expect("temp dir");
    let serve = |config: String| {
        let path = data.path().join("config.toml");
        std::fs::write(&path, config).expect("config");
        Command::new(FOREMAN)
            .args(["serve", "--local-agents", "0", "--api-addr", "127.0.0.1:0"])
            .args(["--agent-addr", "127.0.0.1:0", "--config"])
            .arg(&path)
            .arg("--data-dir")
            .arg(data.path())
            .output()
            .expect("foreman serve runs")
    };
    let tls = |extra: &str| {
        format!(
            "[tls]\ncert = {:?}\nkey = {:?}\n{extra}",
            cert.display().to_string(),
            key.display().to_string()
        )
    };
    // The leaf alone is no CA: local agents could not verify it.
    let out = serve(tls(""));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains("cannot verify certificate")
            && err.contains("[tls] ca"),
        "{err}"
    );
    // The right CA with a name the certificate lacks: the same.
    let ca_line = format!("ca = {:?}\n", ca.display().to_string());
    let out = serve(tls(&format!(
        "{ca_line}server_name = \"foreman.example.org\"\n"
    )));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("not valid for name"),
        "{err}"
    );
    // A key that is not the certificate's.
    let (_, _, other_key) = issue(certs.path(), "other");
    let out = serve(format!(
        "[tls]\ncert = {:?}\nkey = {:?}\n{ca_line}",
        cert.display().to_string(),
        other_key.display().to_string()
    ));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("other.key"), "{err}");
    assert!(!data.path().join("server.json").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_plaintext_beyond_loopback_is_refused_unless_allowed() {
    let data = tempfile::tempdir().expect("temp dir");
    let serve = |api: &str, extra: &[&str]| {
        Command::new(FOREMAN)
            .args(["serve", "--local-agents", "0", "--api-addr", api])
            .args(["--agent-addr", "127.0.0.1:0"])
            .args(extra)
            .arg("--data-dir")
            .arg(data.path())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("foreman serve runs")
    };
    let refused = serve("0.0.0.0:0", &[])
        .wait_with_output()
        .expect("serve exits");
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success()
            && err.contains("api_addr 0.0.0.0:0")
            && err.contains("allow_plaintext"),
        "{err}"
    );
    assert!(!data.path().join("server.json").exists());
    // Allowed: it starts (and is stopped again).
    let mut allowed = serve("0.0.0.0:0", &["--allow-plaintext"]);
    let file = data.path().join("server.json");
    let text = wait_for("server.json", BOUND, || {
        let file = file.clone();
        async move {
            std::fs::read_to_string(file)
                .ok()
                .filter(|t| t.contains("agent"))
        }
    })
    .await;
    // Local clients are told the loopback address, not 0.0.0.0.
    assert!(text.contains("\"api\": \"127.0.0.1:"), "{text}");
    let _ = allowed.kill();
    let _ = allowed.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_handshakes_that_stall_or_are_garbage_are_closed_and_the_api_still_serves() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let certs = tempfile::tempdir().expect("temp dir");
    let (sup, _) = tls_supervisor(
        certs.path(),
        0,
        "[http]\nheader_timeout_ms = 2000\nconnections_max = 2\n",
    )
    .await;
    let closed = |mut stream: tokio::net::TcpStream| async move {
        let mut buf = [0u8; 4096];
        loop {
            match tokio::time::timeout(BOUND, stream.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return,
                Ok(Ok(_)) => {}
                Err(_) => panic!("the connection stayed open past {BOUND:?}"),
            }
        }
    };
    // A handshake record begun and never finished: two hold both API
    // slots; one more on the agent endpoint. Each is closed at
    // header_timeout_ms (the agent endpoint: hello_timeout_ms).
    let mut stalls = Vec::new();
    for addr in [&sup.api, &sup.api, &sup.agent] {
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        stream.write_all(&[0x16, 0x03, 0x01]).await.expect("write");
        stalls.push(stream);
    }
    // Over the cap, a TLS connection is closed at once, with no handshake.
    let refused = sup.admin.agents().await;
    assert!(
        matches!(refused, Err(ClientError::Connect { .. })),
        "{refused:?}"
    );
    for stream in stalls {
        closed(stream).await;
    }
    // Garbage after a handshake record's first byte: closed at once.
    let mut garbage = tokio::net::TcpStream::connect(&sup.api)
        .await
        .expect("connect");
    let mut noise = vec![0x16u8, 0x03, 0x03, 0xff, 0xff];
    noise.extend((0..20_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8));
    let _ = garbage.write_all(&noise).await;
    closed(garbage).await;
    // None of it kept a slot: the API serves again, over TLS, one
    // connection after another.
    for _ in 0..8 {
        sup.admin.agents().await.expect("the API serves");
    }
    let log = sup.log();
    for line in [
        "http connection refused: too many open",
        "no TLS handshake within header_timeout_ms",
        "TLS handshake failed",
    ] {
        assert!(log.contains(line), "{line}: {log}");
    }
}
