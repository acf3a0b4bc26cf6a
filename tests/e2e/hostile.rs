//! Bad input gets a clear error and harms nothing: HTTP bodies, tokens,
//! other users' jobs, websocket frames, duplicate agent ids.

use std::time::Duration;

use foreman::client::Client;
use foreman::core::{JobId, JobState, SubmitSpec};
use futures_util::{SinkExt, StreamExt};
use hyper::StatusCode;
use tokio_tungstenite::tungstenite::Message;

use crate::harness::*;

const BOUND: Duration = Duration::from_secs(30);

/// A raw HTTP request; returns (status, body).
async fn raw(
    api: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Vec<u8>,
) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(api).await.expect("connect");
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {api}\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let _ = stream.write_all(&body).await; // the server may stop reading an oversized body
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response).await;
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_http_bodies_tokens_and_other_users_jobs() {
    let sup = Supervisor::start(1).await;
    let token = std::fs::read_to_string(sup.path().join("admin.token")).unwrap();
    let token = token.trim();
    let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        ("not json", b"{".to_vec(), 400, "request body"),
        (
            "unknown field",
            br#"{"argv":["true"],"colour":"red"}"#.to_vec(),
            400,
            "unknown field",
        ),
        (
            "wrong type",
            br#"{"argv":"true"}"#.to_vec(),
            400,
            "request body",
        ),
        (
            "empty argv",
            br#"{"argv":[]}"#.to_vec(),
            422,
            "argv is empty",
        ),
        (
            "bad kind",
            br#"{"argv":["x"],"kind":"gpu"}"#.to_vec(),
            422,
            "unknown kind",
        ),
        ("too large", vec![b' '; 2 * 1024 * 1024], 413, ""),
    ];
    for (what, body, status, message) in cases {
        let (got, text) = raw(&sup.api, "POST", "/v1/jobs", Some(token), body).await;
        assert_eq!(got, status, "{what}: {text}");
        assert!(text.contains(message), "{what}: {text}");
    }
    let (status, text) = raw(
        &sup.api,
        "POST",
        "/v1/jobs",
        None,
        br#"{"argv":["true"]}"#.to_vec(),
    )
    .await;
    assert_eq!(status, 401, "{text}");
    assert!(text.contains("missing Authorization"));
    let (status, _) = raw(
        &sup.api,
        "POST",
        "/v1/jobs",
        Some("wrong"),
        br#"{"argv":["true"]}"#.to_vec(),
    )
    .await;
    assert_eq!(status, 401);
    let (status, _) = raw(&sup.api, "GET", "/v1/jobs/abc", Some(token), vec![]).await;
    assert_eq!(status, 400);
    let (status, _) = raw(&sup.api, "GET", "/v1/nothing", Some(token), vec![]).await;
    assert_eq!(status, 404);
    let (status, text) = raw(
        &sup.api,
        "GET",
        "/v1/jobs?state=sleeping",
        Some(token),
        vec![],
    )
    .await;
    assert_eq!((status, text.contains("unknown state")), (400, true));
    assert_eq!(
        sup.admin.jobs("").await.unwrap().len(),
        0,
        "nothing was half-written"
    );

    // User A cannot see or cancel user B's job, nor tell it exists.
    let ana = sup.add_user("ana", "basic");
    let bob = sup.add_user("bob", "basic");
    let anas = ana
        .submit(&SubmitSpec::command(["sleep", "5"]))
        .await
        .unwrap()
        .job
        .id;
    let (status, _) = api_error(bob.job(anas).await);
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = api_error(bob.cancel(anas).await);
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(
        api_error(bob.jobs("user=ana").await).0,
        StatusCode::FORBIDDEN
    );
    assert!(bob.jobs("").await.unwrap().is_empty());
    assert_eq!(api_error(bob.agents().await).0, StatusCode::FORBIDDEN);
    assert_ne!(ana.job(anas).await.unwrap().job.state, JobState::Canceled);
    // The admin may.
    assert_eq!(sup.admin.jobs("user=ana").await.unwrap().len(), 1);
    sup.admin.cancel(anas).await.unwrap();
    sup.wait_state(&ana, anas, JobState::Canceled, BOUND).await;
    let (status, _) = api_error(ana.job(JobId(999)).await);
    assert_eq!(status, StatusCode::NOT_FOUND);
    let stranger = Client::new(sup.api.clone(), "x".repeat(10_000));
    assert_eq!(
        api_error(stranger.jobs("").await).0,
        StatusCode::UNAUTHORIZED
    );
}

async fn ws(agent_addr: &str) -> tokio_tungstenite::WebSocketStream<tokio::net::TcpStream> {
    let stream = tokio::net::TcpStream::connect(agent_addr)
        .await
        .expect("connect");
    tokio_tungstenite::client_async(format!("ws://{agent_addr}/agent"), stream)
        .await
        .expect("handshake")
        .0
}

fn hello(agent: &str, token: &str) -> Message {
    Message::text(format!(
        r#"{{"type":"hello","v":1,"agent":"{agent}","token":"{token}","cpus":1}}"#
    ))
}

/// Reads until the server closes the connection; true if it did within the bound.
async fn closed(socket: &mut tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>) -> bool {
    tokio::time::timeout(BOUND, async {
        loop {
            match socket.next().await {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return true,
                Some(Ok(_)) => {}
            }
        }
    })
    .await
    .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_websocket_frames_tokens_and_duplicate_agents() {
    let sup = Supervisor::start(1).await;
    sup.wait_agents(1).await;
    let token = |id: &str| sup.agent_token(id).0;
    let agent_token = token("garbage");

    let mut wrong_token = ws(&sup.agent).await;
    wrong_token
        .send(hello("intruder", "not-the-token"))
        .await
        .unwrap();
    assert!(closed(&mut wrong_token).await, "an unknown token is closed");

    // An agent id made to forge log lines or move the terminal, with or
    // without the token: refused, and nothing of it reaches the log raw.
    for token in ["not-the-token", agent_token.as_str()] {
        let mut forger = ws(&sup.agent).await;
        let forged = r#"x\n2026-01-01T00:00:00Z  INFO foreman: admin token accepted\u001b[2J"#;
        forger
            .send(Message::text(format!(
                r#"{{"type":"hello","v":1,"agent":"{forged}","token":"{token}","cpus":1}}"#
            )))
            .await
            .unwrap();
        assert!(closed(&mut forger).await, "a forged agent id is closed");
    }
    let log = std::fs::read_to_string(sup.path().join("serve-0.log")).unwrap();
    assert!(
        !log.lines().any(|l| l.starts_with("2026-01-01")) && !log.contains('\u{1b}'),
        "{log}"
    );
    assert!(log.contains("agent id not valid"), "{log}");

    let mut no_hello = ws(&sup.agent).await;
    no_hello
        .send(Message::text(r#"{"type":"started","job":1,"attempt":1}"#))
        .await
        .unwrap();
    assert!(
        closed(&mut no_hello).await,
        "a first message that is not a hello is closed"
    );

    let mut garbage = ws(&sup.agent).await;
    garbage.send(hello("garbage", &agent_token)).await.unwrap();
    garbage
        .send(Message::text("{\"type\": \"exploded\""))
        .await
        .unwrap();
    assert!(closed(&mut garbage).await, "a malformed frame is closed");

    let mut binary = ws(&sup.agent).await;
    binary
        .send(hello("binary", &token("binary")))
        .await
        .unwrap();
    binary.send(Message::binary(vec![0u8; 16])).await.unwrap();
    assert!(closed(&mut binary).await, "a binary frame is closed");

    let mut oversized = ws(&sup.agent).await;
    oversized.send(hello("big", &token("big"))).await.unwrap();
    let _ = oversized
        .send(Message::text("x".repeat(2 * 1024 * 1024)))
        .await;
    assert!(closed(&mut oversized).await, "an oversized frame is closed");

    // A token is its agent's alone: another id with it is refused, even
    // a connected agent's (it cannot be replaced by a stranger).
    let local = std::fs::read_to_string(sup.path().join("agents").join("local-0.token"))
        .unwrap()
        .trim()
        .to_string();
    let mut impostor = ws(&sup.agent).await;
    impostor.send(hello("local-1", &local)).await.unwrap();
    assert!(
        closed(&mut impostor).await,
        "another agent's token is refused"
    );
    let mut thief = ws(&sup.agent).await;
    thief.send(hello("local-0", &agent_token)).await.unwrap();
    assert!(
        closed(&mut thief).await,
        "an agent cannot be taken over with another's token"
    );

    // A second connection with the same agent id and its token replaces the first.
    let twin = token("twin");
    let mut first = ws(&sup.agent).await;
    first.send(hello("twin", &twin)).await.unwrap();
    // The first is in the core before the second says hello (else the
    // second may be heard first, and be the one replaced).
    wait_for("the first twin to connect", BOUND, || async {
        let agents = sup.admin.agents().await.ok()?;
        agents.to_string().contains("\"twin\"").then_some(())
    })
    .await;
    let mut second = ws(&sup.agent).await;
    second.send(hello("twin", &twin)).await.unwrap();
    assert!(closed(&mut first).await, "the first twin is replaced");

    // None of that harmed the real agent or the service.
    let job = sup
        .admin
        .submit(&SubmitSpec::command(["echo", "still-fine"]))
        .await
        .unwrap()
        .job
        .id;
    let done = sup
        .wait_state(&sup.admin, job, JobState::Succeeded, BOUND)
        .await;
    assert_eq!(done.job.output_tail, "still-fine\n");
    let agents = sup.admin.agents().await.unwrap();
    let names: Vec<&str> = agents
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|a| a["id"].as_str())
        .collect();
    assert!(
        names.contains(&"local-0") && names.contains(&"twin"),
        "{names:?}"
    );
}

#[test]
fn hostile_config_files_are_refused_with_the_file_and_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("broken.toml", "[core\npool_sequential_cpus = 4\n", "line 1"),
        (
            "unknown.toml",
            "api_adress = \"127.0.0.1:1\"\n",
            "unknown field `api_adress`",
        ),
        (
            "typed.toml",
            "[core]\nagent_grace_ms = \"soon\"\n",
            "agent_grace_ms",
        ),
        (
            "plan.toml",
            "[core.plans.gold]\npriority = 1\n",
            "missing field `sequential`",
        ),
    ];
    for (name, text, expected) in cases {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        let output = std::process::Command::new(FOREMAN)
            .args(["serve", "--local-agents", "0", "--config"])
            .arg(&path)
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{name} was accepted");
        assert!(
            stderr.contains(name) && stderr.contains(expected),
            "{name}: {stderr}"
        );
    }
    let missing = std::process::Command::new(FOREMAN)
        .args(["serve", "--config", "/no/such/foreman.toml"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&missing.stderr).contains("/no/such/foreman.toml"));
}
