//! The HTTP client of the API, used by the CLI (and by simulated clients):
//! hyper's http1 client over the seam's `TcpStream` (TLS if set), one
//! connection per call.

use std::time::Duration;

use axum::body::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;

use crate::core::{Job, JobId, SubmitSpec};
use crate::server::api::JobView;
use crate::server::hub::Transition;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the supervisor at {addr}: {error}")]
    Connect { addr: String, error: std::io::Error },
    #[error("http: {0}")]
    Http(#[from] hyper::Error),
    #[error("{message} (HTTP {status})")]
    Api { status: StatusCode, message: String },
    #[error("unexpected answer: {0}")]
    Decode(String),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

#[derive(Clone, Debug)]
pub struct Client {
    /// `host:port` of the API.
    pub addr: String,
    pub token: String,
    pub timeout: Duration,
    /// TLS to the API (whom to trust, the name to verify); none: plaintext.
    pub tls: Option<crate::tls::ClientTls>,
}

/// One item of a job's event stream.
#[derive(Clone, Debug)]
pub enum WatchEvent {
    State(Box<JobView>),
    Transition(Transition),
}

impl Client {
    pub fn new(addr: impl Into<String>, token: impl Into<String>) -> Client {
        Client {
            addr: addr.into(),
            token: token.into(),
            timeout: Duration::from_secs(30),
            tls: None,
        }
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<hyper::Response<hyper::body::Incoming>, ClientError> {
        let stream = crate::tls::connect(&self.addr, self.tls.as_ref())
            .await
            .map_err(|error| ClientError::Connect {
                addr: self.addr.clone(),
                error,
            })?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, &self.addr)
            .header(
                hyper::header::AUTHORIZATION,
                format!("Bearer {}", self.token),
            );
        if body.is_some() {
            request = request.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        let request = request
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| ClientError::Decode(e.to_string()))?;
        Ok(sender.send_request(request).await?)
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<T, ClientError> {
        let exchange = async {
            let response = self.send(method, path, body).await?;
            let status = response.status();
            let bytes = response.into_body().collect().await?.to_bytes();
            if !status.is_success() {
                let message = serde_json::from_slice::<serde_json::Value>(&bytes)
                    .ok()
                    .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
                    .unwrap_or_else(|| String::from_utf8_lossy(&bytes).into_owned());
                return Err(ClientError::Api { status, message });
            }
            serde_json::from_slice(&bytes).map_err(|e| ClientError::Decode(e.to_string()))
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| ClientError::Timeout(self.timeout))?
    }

    pub async fn submit(&self, spec: &SubmitSpec) -> Result<JobView, ClientError> {
        let body = serde_json::to_vec(spec).expect("a spec serializes");
        self.call(Method::POST, "/v1/jobs", Some(body)).await
    }

    pub async fn job(&self, id: JobId) -> Result<JobView, ClientError> {
        self.call(Method::GET, &format!("/v1/jobs/{id}"), None)
            .await
    }

    pub async fn jobs(&self, query: &str) -> Result<Vec<Job>, ClientError> {
        let path = if query.is_empty() {
            "/v1/jobs".to_string()
        } else {
            format!("/v1/jobs?{query}")
        };
        self.call(Method::GET, &path, None).await
    }

    pub async fn cancel(&self, id: JobId) -> Result<JobView, ClientError> {
        self.call(Method::POST, &format!("/v1/jobs/{id}/cancel"), None)
            .await
    }

    pub async fn agents(&self) -> Result<serde_json::Value, ClientError> {
        self.call(Method::GET, "/v1/agents", None).await
    }

    /// Follows the job's event stream, calling `seen` for each event, until
    /// the job ends (or `seen` returns false).
    pub async fn watch(
        &self,
        id: JobId,
        mut seen: impl FnMut(WatchEvent) -> bool,
    ) -> Result<(), ClientError> {
        let response = self
            .send(Method::GET, &format!("/v1/jobs/{id}/events"), None)
            .await?;
        let status = response.status();
        let mut body = response.into_body();
        if !status.is_success() {
            let bytes = body.collect().await?.to_bytes();
            return Err(ClientError::Api {
                status,
                message: String::from_utf8_lossy(&bytes).into_owned(),
            });
        }
        // Bytes until a whole event ("\n\n") is in: a character may be split
        // across frames.
        let mut buffer: Vec<u8> = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame?;
            let Some(data) = frame.data_ref() else {
                continue;
            };
            buffer.extend_from_slice(data);
            while let Some(end) = buffer.windows(2).position(|w| w == b"\n\n") {
                let block: Vec<u8> = buffer.drain(..end + 2).collect();
                let block =
                    String::from_utf8(block).map_err(|e| ClientError::Decode(e.to_string()))?;
                let mut event = "";
                let mut payload = "";
                for line in block.lines() {
                    if let Some(rest) = line.strip_prefix("event: ") {
                        event = rest;
                    } else if let Some(rest) = line.strip_prefix("data: ") {
                        payload = rest;
                    }
                }
                let parsed = match event {
                    "state" => {
                        serde_json::from_str(payload).map(|v| WatchEvent::State(Box::new(v)))
                    }
                    "transition" => serde_json::from_str(payload).map(WatchEvent::Transition),
                    _ => continue,
                };
                let event = parsed.map_err(|e| ClientError::Decode(e.to_string()))?;
                if !seen(event) {
                    return Ok(());
                }
            }
        }
        Ok(())
    }
}
