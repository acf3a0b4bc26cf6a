//! Every resource a client can hold is bounded: connections, the time a
//! request head may take, idle keep-alive connections, event streams per
//! user; and the answers of the HTTP layers are the API's JSON errors.

use std::time::Duration;

use foreman::core::SubmitSpec;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::harness::*;

const BOUND: Duration = Duration::from_secs(30);

const TIGHT: &str = r#"
[http]
connections_max = 8
header_timeout_ms = 500
idle_timeout_ms = 1500
event_streams_per_user = 2
event_heartbeat_ms = 200
"#;

/// Reads until the server closes the connection (within the bound);
/// returns what it sent.
async fn until_closed(stream: &mut TcpStream) -> String {
    let mut got = Vec::new();
    let read = tokio::time::timeout(BOUND, async {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(
        read.is_ok(),
        "the server kept the connection past {BOUND:?}"
    );
    String::from_utf8_lossy(&got).into_owned()
}

/// One request on a fresh connection; returns (status, headers and body).
async fn request(api: &str, head: &str, body: &[u8]) -> (u16, String) {
    let mut stream = TcpStream::connect(api).await.expect("connect");
    stream.write_all(head.as_bytes()).await.unwrap();
    let _ = stream.write_all(body).await;
    let text = until_closed(&mut stream).await;
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, text)
}

fn json_error(text: &str) -> serde_json::Value {
    assert!(
        text.to_lowercase()
            .contains("content-type: application/json"),
        "not JSON: {text}"
    );
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("");
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body:?}"))
}

/// Room for eight connections that take two seconds to say anything.
const FEW: &str = r#"
[http]
connections_max = 8
header_timeout_ms = 2000
body_timeout_ms = 500
idle_timeout_ms = 1500
event_heartbeat_ms = 200
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bounds_slow_idle_and_surplus_connections_are_closed_and_agents_still_served() {
    let sup = Supervisor::start_with(1, Some(FEW)).await;
    sup.wait_agents(1).await;
    // A head dribbled a byte every 100 ms (so the connection is never idle)
    // is cut off at the header timeout, long before it is whole.
    let mut slow = TcpStream::connect(&sup.api).await.unwrap();
    let head = format!(
        "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: {}\r\n\r\n",
        "s".repeat(200)
    );
    let mut sent = 0;
    for byte in head.as_bytes() {
        if slow.write_all(&[*byte]).await.is_err() {
            break;
        }
        sent += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut probe = [0u8; 1];
        let closed = tokio::time::timeout(Duration::ZERO, slow.peek(&mut probe)).await;
        if matches!(closed, Ok(Ok(0)) | Ok(Err(_))) {
            break;
        }
    }
    assert!(sent < head.len(), "the whole dribbled head was read");
    let said = until_closed(&mut slow).await;
    assert!(!said.contains("200 OK"), "{said}");
    // A body that never comes: without a token, refused before it is read;
    // with one, given up at the body timeout.
    for (token, status) in [("nobody's", "401"), (sup.admin.token.as_str(), "408")] {
        let mut stalled = TcpStream::connect(&sup.api).await.unwrap();
        let head = format!(
            "POST /v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{\"argv\""
        );
        stalled.write_all(head.as_bytes()).await.unwrap();
        let said = until_closed(&mut stalled).await;
        assert!(said.starts_with(&format!("HTTP/1.1 {status}")), "{said}");
    }
    assert!(
        sup.admin.jobs("").await.unwrap().is_empty(),
        "nothing submitted"
    );
    // An idle keep-alive connection is closed after its one request.
    let mut idle = TcpStream::connect(&sup.api).await.unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let said = until_closed(&mut idle).await;
    assert!(said.starts_with("HTTP/1.1 200"), "{said}");
    // Connections past the cap get a JSON 503 at once; meanwhile the agent
    // endpoint, its own listener, still takes a connection.
    let mut held = Vec::new();
    for _ in 0..8 {
        held.push(TcpStream::connect(&sup.api).await.unwrap());
    }
    // The held ones are accepted first, in order: the next is past the cap.
    let said = wait_for("a connection past the cap refused", BOUND, || async {
        let mut surplus = TcpStream::connect(&sup.api).await.ok()?;
        let said = until_closed(&mut surplus).await;
        said.starts_with("HTTP/1.1 503").then_some(said)
    })
    .await;
    let error = json_error(&said);
    assert!(
        error["error"]
            .as_str()
            .unwrap()
            .contains("too many connections"),
        "{error}"
    );
    let stream = TcpStream::connect(&sup.agent).await.unwrap();
    let handshake = tokio_tungstenite::client_async(format!("ws://{}/agent", sup.agent), stream);
    assert!(
        tokio::time::timeout(BOUND, handshake)
            .await
            .is_ok_and(|r| r.is_ok()),
        "the agent endpoint answers while the API is full"
    );
    // The held connections time out (nothing sent): the API serves again.
    drop(held);
    wait_for("the API serves again", BOUND, || async {
        sup.admin.jobs("").await.ok()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bounds_the_http_layers_answer_in_json_too() {
    let sup = Supervisor::start_with(0, Some(TIGHT)).await;
    let token = sup.admin.token.clone();
    let api = &sup.api;
    let auth = format!("Authorization: Bearer {token}\r\n");
    // A method the endpoint does not take.
    let (status, text) = request(
        api,
        &format!("DELETE /v1/jobs HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n"),
        b"",
    )
    .await;
    assert_eq!(status, 405, "{text}");
    assert!(text.to_lowercase().contains("allow: "), "{text}");
    let error = json_error(&text);
    let message = error["error"].as_str().unwrap();
    assert!(message.contains("does not take DELETE"), "{message}");
    let allow = text
        .lines()
        .find(|l| l.to_lowercase().starts_with("allow:"))
        .unwrap_or_default();
    assert!(allow.contains("GET") && allow.contains("POST"), "{text}");
    // A body too large.
    let body = vec![b' '; 2 * 1024 * 1024];
    let (status, text) = request(
        api,
        &format!(
            "POST /v1/jobs HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        ),
        &body,
    )
    .await;
    assert_eq!(status, 413, "{text}");
    assert!(json_error(&text)["error"]
        .as_str()
        .unwrap()
        .contains("at most 1048576 bytes"));
    // Too many headers, and headers too large.
    let many: String = (0..80).map(|i| format!("X-Filler-{i}: {i}\r\n")).collect();
    let large = format!("X-Large: {}\r\n", "a".repeat(20 * 1024));
    for extra in [many, large] {
        let (status, text) = request(
            api,
            &format!("GET /v1/jobs HTTP/1.1\r\nHost: x\r\n{auth}{extra}Connection: close\r\n\r\n"),
            b"",
        )
        .await;
        assert_eq!(status, 431, "{}", &text[..text.len().min(200)]);
        assert!(
            json_error(&text)["error"]
                .as_str()
                .unwrap()
                .contains("request headers too large"),
            "{text}"
        );
    }
    // Nothing of it reached the queue.
    assert!(sup.admin.jobs("").await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bounds_event_streams_are_counted_per_user_and_kept_alive() {
    let sup = Supervisor::start_with(0, Some(TIGHT)).await;
    let ana = sup.add_user("ana", "basic");
    let job = ana
        .submit(&SubmitSpec::command(["true"]))
        .await
        .unwrap()
        .job
        .id;
    let open = |token: String| {
        let api = sup.api.clone();
        async move {
            let mut stream = TcpStream::connect(&api).await.unwrap();
            let head = format!(
                "GET /v1/jobs/{job}/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n"
            );
            stream.write_all(head.as_bytes()).await.unwrap();
            stream
        }
    };
    let mut first = open(ana.token.clone()).await;
    let _second = open(ana.token.clone()).await;
    // Heartbeats keep a quiet stream open past the idle timeout.
    let mut seen = String::new();
    let heartbeats = tokio::time::timeout(BOUND, async {
        let mut buf = [0u8; 1024];
        while seen.matches(": still here").count() < 10 {
            let n = first.read(&mut buf).await.expect("the stream stays open");
            assert!(n > 0, "the stream was closed: {seen}");
            seen.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    })
    .await;
    assert!(heartbeats.is_ok(), "{seen}");
    assert!(seen.contains("event: state"), "{seen}");
    // A third stream of the same user is refused; the admin's is not.
    let (status, text) = request(
        &sup.api,
        &format!(
            "GET /v1/jobs/{job}/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n",
            ana.token
        ),
        b"",
    )
    .await;
    assert_eq!(status, 429, "{text}");
    assert!(json_error(&text)["error"]
        .as_str()
        .unwrap()
        .contains("2 event streams open"));
    let _admins = open(sup.admin.token.clone()).await;
    // Closing one gives its place back.
    drop(first);
    wait_for("a stream's place given back", BOUND, || async {
        let mut stream = open(ana.token.clone()).await;
        let mut buf = [0u8; 64];
        let n = stream.read(&mut buf).await.ok()?;
        String::from_utf8_lossy(&buf[..n])
            .starts_with("HTTP/1.1 200")
            .then_some(())
    })
    .await;
}
