//! The API's connections, each bounded: how many may be open at once, how
//! long a request's head may take to arrive, and how long a connection may
//! sit with nothing moving either way. A client that opens connections and
//! sends nothing, or sends its head a byte at a time, or keeps idle
//! keep-alive connections, holds at most `connections_max` of them, for a
//! bounded time, and never the agent endpoint (its own listener and cap).

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tracing::{info, warn};

use crate::seam;
use crate::tls::{self, Accepted, TlsAcceptor};

/// The bounds on the API's connections (`[http]` in the configuration file).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpLimits {
    /// Connections open at once; one more is answered 503 and closed.
    pub connections_max: usize,
    /// Time for a request's head (request line and headers) to arrive.
    pub header_timeout_ms: u64,
    /// Time for a request's whole body to arrive, once its head has.
    pub body_timeout_ms: u64,
    /// A connection with no bytes moving either way this long is closed.
    pub idle_timeout_ms: u64,
    /// Event streams (`/v1/jobs/{id}/events`) one user may hold open.
    pub event_streams_per_user: usize,
    /// An event stream with nothing to say sends a comment this often, so
    /// that proxies and the idle timeout keep it, and a dead client is seen.
    pub event_heartbeat_ms: u64,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            connections_max: 512,
            header_timeout_ms: 10_000,
            body_timeout_ms: 30_000,
            idle_timeout_ms: 120_000,
            event_streams_per_user: 32,
            event_heartbeat_ms: 15_000,
        }
    }
}

impl HttpLimits {
    /// Limits that hold together; the error says which does not.
    pub fn check(&self) -> Result<(), String> {
        if self.connections_max == 0 {
            return Err("http.connections_max must be at least 1".into());
        }
        if self.header_timeout_ms == 0 || self.body_timeout_ms == 0 || self.idle_timeout_ms == 0 {
            return Err(
                "http.header_timeout_ms, http.body_timeout_ms and http.idle_timeout_ms must be positive"
                    .into(),
            );
        }
        if self.event_heartbeat_ms == 0 || self.event_heartbeat_ms >= self.idle_timeout_ms {
            return Err(format!(
                "http.event_heartbeat_ms ({}) must be positive and shorter than http.idle_timeout_ms ({})",
                self.event_heartbeat_ms, self.idle_timeout_ms
            ));
        }
        Ok(())
    }
}

/// The longest request head hyper buffers; past it hyper itself answers
/// 431 (the API's own, JSON, 431 comes earlier: `api::HEAD_BYTES_MAX`).
const HEAD_BUFFER_BYTES: usize = 64 * 1024;

/// Serves `router` on every connection `listener` accepts, within `limits`,
/// over TLS if `tls` is set.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: HttpLimits,
    tls: Option<TlsAcceptor>,
) {
    let open = Arc::new(Semaphore::new(limits.connections_max));
    loop {
        let (stream, peer) = super::accept(&listener, "api").await;
        let Ok(permit) = open.clone().try_acquire_owned() else {
            tokio::spawn(refuse(stream, tls.clone(), peer, limits.connections_max));
            continue;
        };
        let service = TowerToHyperService::new(router.clone());
        let limits = limits.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let _permit = permit;
            // The TLS handshake is part of the head: both share its time.
            let began = seam::now();
            let header_timeout = Duration::from_millis(limits.header_timeout_ms);
            let stream =
                match tokio::time::timeout(header_timeout, tls::accept(stream, tls.as_ref())).await
                {
                    Ok(Ok(Accepted::Ready(stream))) => stream,
                    Ok(Ok(Accepted::Plaintext(stream))) => {
                        info!(%peer, "http connection refused: plaintext on the TLS API");
                        answer_and_close(stream, &plaintext_on_tls()).await;
                        return;
                    }
                    Ok(Err(e)) => {
                        info!(%peer, error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        info!(%peer, "no TLS handshake within header_timeout_ms");
                        return;
                    }
                };
            let moved = Arc::new(AtomicU64::new(seam::now().0));
            let io = Watched {
                inner: stream,
                moved: moved.clone(),
            };
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(seam::HyperTimer)
                .header_read_timeout(Duration::from_millis(
                    limits
                        .header_timeout_ms
                        .saturating_sub(seam::now().ms_since(began))
                        .max(1),
                ))
                .max_buf_size(HEAD_BUFFER_BYTES);
            let conn = builder.serve_connection(TokioIo::new(io), service);
            tokio::pin!(conn);
            loop {
                let idle_until = moved.load(Ordering::Relaxed) + limits.idle_timeout_ms;
                crate::select! {
                    result = &mut conn => {
                        if let Err(e) = result {
                            info!(%peer, error = %e, "http connection ended with an error");
                        }
                        return;
                    }
                    () = seam::sleep_until(crate::core::Millis(idle_until)) => {
                        let last = moved.load(Ordering::Relaxed);
                        if seam::now().0 >= last + limits.idle_timeout_ms {
                            info!(%peer, idle_ms = limits.idle_timeout_ms, "http connection closed: idle");
                            return;
                        }
                    }
                }
            }
        });
    }
}

/// Over the cap: a short JSON 503, and the connection closed. With TLS,
/// closed at once: a handshake per refused connection would make the cap
/// no bound on the work connections cost.
async fn refuse(stream: TcpStream, tls: Option<TlsAcceptor>, peer: SocketAddr, max: usize) {
    warn!(%peer, max, "http connection refused: too many open");
    if tls.is_some() {
        return;
    }
    let response = json_answer(
        "503 Service Unavailable",
        "retry-after: 1\r\n",
        &format!("too many connections: the API serves {max} at once; try again shortly"),
    );
    answer_and_close(stream, &response).await;
}

/// A whole HTTP/1.1 answer with a JSON error, closing the connection.
fn json_answer(status: &str, headers: &str, error: &str) -> String {
    let body = serde_json::json!({ "error": error }).to_string();
    format!(
        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{headers}connection: close\r\n\r\n{body}",
        body.len()
    )
}

/// What a plaintext HTTP client on the TLS API is told.
fn plaintext_on_tls() -> String {
    json_answer(
        "400 Bad Request",
        "",
        "this API speaks TLS only: use https:// (the CLI: --server https://HOST:PORT, or --tls-ca)",
    )
}

/// Writes `response` and closes, within a second (a peer that does not
/// read cannot hold the task). What the peer still sends is read and
/// dropped until it closes too, so that the answer is not cut off by a
/// reset for unread bytes.
async fn answer_and_close(mut stream: TcpStream, response: &str) {
    use tokio::io::AsyncReadExt;
    let answer = async {
        let _ = stream.write_all(response.as_bytes()).await;
        let _ = stream.shutdown().await;
        let mut sink = [0u8; 4096];
        while let Ok(n) = stream.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    };
    crate::select! {
        () = answer => {}
        () = tokio::time::sleep(Duration::from_secs(1)) => {}
    }
}

/// A stream that notes when bytes last moved through it, either way.
struct Watched {
    inner: tls::Stream,
    moved: Arc<AtomicU64>,
}

impl Watched {
    fn touch(&self) {
        self.moved.store(seam::now().0, Ordering::Relaxed);
    }
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.touch();
        }
        poll
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(poll, Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        poll
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
