//! The HTTP JSON API under `/v1`, an axum `Router` served by hyper's
//! `serve_connection` over the seam's listener. Handlers authenticate,
//! decode, hand the core an input or a query, and encode the answer; errors
//! are JSON `{"error": "..."}` with a status that says what kind of wrong.
//! Every write goes through the core, so nothing is half-written.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;
use tracing::warn;

use crate::core::{
    Agent, CancelError, Input, Job, JobId, JobState, Kind, Reply, Requester, SubmitError,
    SubmitSpec,
};
use crate::shell::actor::CoreHandle;
use crate::store::{Store, User};

use super::auth;
use super::http::HttpLimits;
use super::hub::{Hub, Transition, LATENCY_BUCKETS_MS};

/// The largest request body the API reads.
pub const BODY_BYTES_MAX: usize = 1024 * 1024;
/// The largest request head (its headers, names and values) the API reads,
/// and the most headers.
pub const HEAD_BYTES_MAX: usize = 16 * 1024;
pub const HEADERS_MAX: usize = 64;
const LIST_LIMIT_MAX: usize = 1000;
/// A listing page holds at most this many bytes of job records (and at
/// least one job): its memory is bounded whatever the records hold.
const LIST_BYTES_MAX: usize = 4 * 1024 * 1024;

#[derive(Clone)]
pub struct ApiState {
    pub core: CoreHandle,
    pub hub: Arc<Hub>,
    /// A reading connection (WAL lets it read while the actor writes).
    pub store: Arc<Mutex<Store>>,
    pub limits: HttpLimits,
    /// Event streams open, per user.
    pub streams: Arc<Mutex<BTreeMap<Arc<str>, usize>>>,
}

impl ApiState {
    pub fn new(core: CoreHandle, hub: Arc<Hub>, store: Store, limits: HttpLimits) -> ApiState {
        ApiState {
            core,
            hub,
            store: Arc::new(Mutex::new(store)),
            limits,
            streams: Arc::default(),
        }
    }
}

pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/v1/jobs", post(submit).get(list))
        .route("/v1/jobs/{id}", get(job))
        .route("/v1/jobs/{id}/cancel", post(cancel))
        .route("/v1/jobs/{id}/events", get(events))
        .route("/v1/agents", get(agents))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such endpoint") })
        .layer(axum::middleware::map_response(json_errors))
        .layer(axum::middleware::from_fn(head_bounds))
        .with_state(state)
}

/// A request head past the API's bounds is refused before anything reads it.
async fn head_bounds(request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let headers = request.headers();
    let bytes: usize = headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len())
        .sum();
    if headers.len() > HEADERS_MAX || bytes > HEAD_BYTES_MAX {
        return ApiError::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            format!(
                "request headers too large: {} headers of {bytes} bytes; at most {HEADERS_MAX} headers of {HEAD_BYTES_MAX} bytes",
                headers.len()
            ),
        )
        .into_response();
    }
    next.run(request).await
}

/// Every error the API answers is `{"error": "..."}`, the ones the HTTP
/// layers make too (a method the endpoint does not take). Bodies are read
/// by `read_body`, whose own refusals are JSON already.
async fn json_errors(method: axum::http::Method, response: Response) -> Response {
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let message = match status {
        StatusCode::METHOD_NOT_ALLOWED => {
            format!("this endpoint does not take {method}: the Allow header says what it takes")
        }
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "send the body as application/json".to_string(),
        other => other
            .canonical_reason()
            .unwrap_or("request refused")
            .to_lowercase(),
    };
    let (mut parts, _) = response.into_parts();
    let mut json = ApiError::new(status, message).into_response();
    // Keep what the answer said besides its body (Allow, Retry-After).
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.remove(header::CONTENT_TYPE);
    for (name, value) in parts.headers.iter() {
        json.headers_mut().insert(name.clone(), value.clone());
    }
    json
}

pub use super::http::serve;

#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
        }
    }
    fn internal(what: impl std::fmt::Display) -> ApiError {
        warn!(error = %what, "internal error");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("internal error: {what}"),
        )
    }
    fn not_found(id: JobId) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, format!("no job {id}"))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(serde_json::json!({ "error": self.message })),
        )
            .into_response()
    }
}

type ApiResult<T> = Result<T, ApiError>;

impl ApiState {
    fn authenticate(&self, headers: &HeaderMap) -> ApiResult<User> {
        let unauthorized = |m: &str| ApiError::new(StatusCode::UNAUTHORIZED, m);
        let value = headers
            .get(header::AUTHORIZATION)
            .ok_or_else(|| unauthorized("missing Authorization: Bearer <token>"))?;
        let token = value
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| unauthorized("Authorization must be: Bearer <token>"))?;
        if token.is_empty() || token.len() > auth::TOKEN_BYTES_MAX {
            return Err(unauthorized("unknown token"));
        }
        let hash = auth::sha256_hex(token);
        let user = self
            .store
            .lock()
            .expect("store lock")
            .user_by_token(&hash)
            .map_err(ApiError::internal)?;
        user.ok_or_else(|| unauthorized("unknown token"))
    }

    /// The job, live from the core, else from the store.
    async fn lookup(&self, id: JobId) -> ApiResult<JobView> {
        let live = self
            .core
            .query(move |core| {
                core.job(id).map(|job| JobView {
                    situation: core.situation(id),
                    queue_position: core.queue_position(id),
                    job: job.clone(),
                })
            })
            .await
            .map_err(ApiError::internal)?;
        if let Some(view) = live {
            return Ok(view);
        }
        let stored = self
            .store
            .lock()
            .expect("store lock")
            .job(id)
            .map_err(ApiError::internal)?;
        let job = stored.ok_or_else(|| ApiError::not_found(id))?;
        Ok(JobView {
            situation: Some(format!("{}: {}", job.state, job.reason)),
            queue_position: None,
            job,
        })
    }

    /// The job as this user may see it: another user's job does not exist,
    /// as far as they can tell.
    async fn view(&self, user: &User, id: JobId) -> ApiResult<JobView> {
        let view = self.lookup(id).await?;
        if !user.admin && view.job.user != user.name {
            return Err(ApiError::not_found(id));
        }
        Ok(view)
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JobView {
    #[serde(flatten)]
    pub job: Job,
    pub situation: Option<String>,
    pub queue_position: Option<usize>,
}

fn job_id(raw: &str) -> ApiResult<JobId> {
    raw.parse::<u64>()
        .map(JobId)
        .map_err(|_| ApiError::new(StatusCode::BAD_REQUEST, format!("{raw:?} is not a job id")))
}

/// A request body, read only once its sender is known, whole within
/// `body_timeout_ms` and `BODY_BYTES_MAX`: a client that sends its body a
/// byte at a time cannot hold a connection, nor can one with no token.
async fn read_body(state: &ApiState, body: Body) -> ApiResult<Bytes> {
    use http_body_util::BodyExt;
    let limited = http_body_util::Limited::new(body, BODY_BYTES_MAX).collect();
    let bound = std::time::Duration::from_millis(state.limits.body_timeout_ms);
    match tokio::time::timeout(bound, limited).await {
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body too large: at most {BODY_BYTES_MAX} bytes"),
        )),
        Ok(Err(e)) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("request body: {e}"),
        )),
        Err(_) => Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            format!(
                "request body not received within {} ms",
                state.limits.body_timeout_ms
            ),
        )),
    }
}

async fn submit(
    State(state): State<ApiState>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let user = state.authenticate(&headers)?;
    let body = read_body(&state, body).await?;
    let spec: SubmitSpec = serde_json::from_slice(&body)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("request body: {e}")))?;
    let waiter = state.hub.expect_reply();
    let request = waiter.request;
    let input = Input::Submit {
        request,
        user: user.name.clone(),
        plan: user.plan.clone(),
        spec,
    };
    state.core.input(input).await.map_err(ApiError::internal)?;
    match waiter.wait().await.map_err(ApiError::internal)? {
        Reply::Submitted { job, existing, at } => {
            // The job as its submit left it, durable with it; an earlier
            // job (same idempotency key) no longer live is read back.
            let view = match at {
                Some(at) => JobView {
                    job: (*at.record).clone(),
                    situation: at.situation,
                    queue_position: at.queue_position,
                },
                None => state.view(&user, job).await?,
            };
            let status = if existing {
                StatusCode::OK
            } else {
                StatusCode::CREATED
            };
            Ok((status, Json(view)).into_response())
        }
        Reply::Rejected { error } => {
            let status = match error {
                SubmitError::TooManyQueued { .. } => StatusCode::TOO_MANY_REQUESTS,
                SubmitError::IdempotencyConflict { .. } => StatusCode::CONFLICT,
                _ => StatusCode::UNPROCESSABLE_ENTITY,
            };
            Err(ApiError::new(status, error.to_string()))
        }
        other => Err(ApiError::internal(format!("unexpected reply {other:?}"))),
    }
}

async fn job(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<Json<JobView>> {
    let user = state.authenticate(&headers)?;
    Ok(Json(state.view(&user, job_id(&id)?).await?))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    state: Option<String>,
    user: Option<String>,
    limit: Option<usize>,
    before: Option<u64>,
}

async fn list(
    State(state): State<ApiState>,
    headers: HeaderMap,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Response> {
    let user = state.authenticate(&headers)?;
    let Query(query) = query.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.body_text()))?;
    let filter_user = match (&query.user, user.admin) {
        (Some(other), false) if **other != *user.name => {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "only an admin may list another user's jobs",
            ))
        }
        (Some(other), _) => Some(other.clone()),
        (None, true) => None,
        (None, false) => Some(user.name.to_string()),
    };
    let job_state = match &query.state {
        Some(s) => Some(JobState::parse(s).ok_or_else(|| {
            ApiError::new(StatusCode::BAD_REQUEST, format!("unknown state {s:?}"))
        })?),
        None => None,
    };
    let limit = query.limit.unwrap_or(100).clamp(1, LIST_LIMIT_MAX);
    let (jobs, cut) = state
        .store
        .lock()
        .expect("store lock")
        .jobs(
            filter_user.as_deref(),
            job_state,
            query.before.map(JobId),
            limit,
            LIST_BYTES_MAX,
        )
        .map_err(ApiError::internal)?;
    // Where the next page starts, when there may be one.
    let next = (cut || jobs.len() == limit)
        .then(|| jobs.last().map(|j| j.id.0))
        .flatten();
    let mut response = Json(jobs).into_response();
    if let Some(next) = next {
        response.headers_mut().insert(
            "x-next-before",
            header::HeaderValue::from_str(&next.to_string()).expect("digits"),
        );
    }
    Ok(response)
}

async fn cancel(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<Json<JobView>> {
    let user = state.authenticate(&headers)?;
    let id = job_id(&id)?;
    let waiter = state.hub.expect_reply();
    let request = waiter.request;
    let by = Requester {
        user: user.name.clone(),
        admin: user.admin,
    };
    let input = Input::Cancel {
        request,
        by,
        job: id,
    };
    state.core.input(input).await.map_err(ApiError::internal)?;
    match waiter.wait().await.map_err(ApiError::internal)? {
        Reply::Cancel { .. } => Ok(Json(state.view(&user, id).await?)),
        // Not live: over already (cancel is idempotent: answer with its state),
        // or not this user's, or no such job.
        Reply::CancelRejected {
            error: CancelError::NotFound,
            ..
        } => Ok(Json(state.view(&user, id).await?)),
        other => Err(ApiError::internal(format!("unexpected reply {other:?}"))),
    }
}

/// Server-sent events: the job's current state, then each transition, until
/// it ends. A watcher that falls behind gets the current state again.
async fn events(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let user = state.authenticate(&headers)?;
    let id = job_id(&id)?;
    // Subscribe before reading, so no transition falls between the two.
    let transitions = state.hub.watch();
    let view = state.view(&user, id).await?;
    let slot = StreamSlot::take(&state, &user)?;
    struct Feed {
        first: Option<Bytes>,
        over: bool,
        transitions: broadcast::Receiver<Transition>,
        state: ApiState,
        id: JobId,
        heartbeat_ms: u64,
        /// When a heartbeat is due: one heartbeat after the last bytes
        /// sent, whatever else the hub says meanwhile.
        next_beat: crate::core::Millis,
        _slot: StreamSlot,
    }
    let feed = Feed {
        first: Some(sse("state", &view)),
        over: view.job.state.is_terminal(),
        transitions,
        heartbeat_ms: state.limits.event_heartbeat_ms,
        next_beat: crate::seam::now().plus_ms(state.limits.event_heartbeat_ms),
        state,
        id,
        _slot: slot,
    };
    let stream = futures_util::stream::unfold(feed, |mut feed| async move {
        if let Some(first) = feed.first.take() {
            return Some((Ok::<_, Infallible>(first), feed));
        }
        if feed.over {
            return None;
        }
        loop {
            let received = crate::select! {
                received = feed.transitions.recv() => received,
                () = crate::seam::sleep_until(feed.next_beat) => {
                    feed.next_beat = crate::seam::now().plus_ms(feed.heartbeat_ms);
                    return Some((Ok(Bytes::from_static(b": still here\n\n")), feed));
                }
            };
            let sent = match received {
                Ok(t) if t.job == feed.id => {
                    feed.over = t.state.is_terminal();
                    sse("transition", &t)
                }
                // Other jobs' news: the heartbeat's deadline stands.
                Ok(_) => continue,
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    let view = feed.state.lookup(feed.id).await.ok()?;
                    feed.over = view.job.state.is_terminal();
                    sse("state", &view)
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            };
            feed.next_beat = crate::seam::now().plus_ms(feed.heartbeat_ms);
            return Some((Ok(sent), feed));
        }
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(stream))
        .map_err(ApiError::internal)
}

/// One of a user's event streams; given back when the stream is dropped
/// (the job ended, or the client went away).
struct StreamSlot {
    streams: Arc<Mutex<BTreeMap<Arc<str>, usize>>>,
    user: Arc<str>,
}

impl StreamSlot {
    fn take(state: &ApiState, user: &User) -> ApiResult<StreamSlot> {
        let mut streams = state.streams.lock().expect("streams lock");
        let open = streams.entry(user.name.clone()).or_default();
        if *open >= state.limits.event_streams_per_user {
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                format!(
                    "you have {open} event streams open; at most {} are allowed: close one first",
                    state.limits.event_streams_per_user
                ),
            ));
        }
        *open += 1;
        Ok(StreamSlot {
            streams: state.streams.clone(),
            user: user.name.clone(),
        })
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut streams = self.streams.lock().expect("streams lock");
        if let Some(open) = streams.get_mut(&self.user) {
            *open -= 1;
            if *open == 0 {
                streams.remove(&self.user);
            }
        }
    }
}

fn sse<T: Serialize>(event: &str, data: &T) -> Bytes {
    let json = serde_json::to_string(data).expect("serializes");
    Bytes::from(format!("event: {event}\ndata: {json}\n\n"))
}

async fn agents(State(state): State<ApiState>, headers: HeaderMap) -> ApiResult<Json<Vec<Agent>>> {
    let user = state.authenticate(&headers)?;
    if !user.admin {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "only an admin may list agents",
        ));
    }
    let agents = state
        .core
        .query(|core| core.agents().cloned().collect::<Vec<Agent>>())
        .await
        .map_err(ApiError::internal)?;
    Ok(Json(agents))
}

/// Prometheus text exposition.
async fn metrics(State(state): State<ApiState>) -> ApiResult<Response> {
    use std::fmt::Write;
    let snapshot = state
        .core
        .query(|core| {
            let mut running = [0u64; 2];
            for job in core.jobs() {
                if job.state == JobState::Running {
                    running[job.kind().index()] += 1;
                }
            }
            let agents = core.agents().filter(|a| a.conn().is_some()).count();
            let per_kind: Vec<(Kind, usize, u64, u32, u32)> = Kind::ALL
                .iter()
                .map(|k| {
                    (
                        *k,
                        core.queued(*k),
                        running[k.index()],
                        core.pool_used(*k),
                        core.config().pool_cpus(*k),
                    )
                })
                .collect();
            (per_kind, agents)
        })
        .await
        .map_err(ApiError::internal)?;
    let outcomes = state
        .store
        .lock()
        .expect("store lock")
        .count_by_state()
        .map_err(ApiError::internal)?;
    let mut out = String::new();
    let (per_kind, agents) = snapshot;
    let _ = writeln!(
        out,
        "# HELP foreman_queue_depth Jobs waiting, by kind.\n# TYPE foreman_queue_depth gauge"
    );
    for (kind, queued, _, _, _) in &per_kind {
        let _ = writeln!(out, "foreman_queue_depth{{kind=\"{kind}\"}} {queued}");
    }
    let _ = writeln!(
        out,
        "# HELP foreman_running Jobs running, by kind.\n# TYPE foreman_running gauge"
    );
    for (kind, _, running, _, _) in &per_kind {
        let _ = writeln!(out, "foreman_running{{kind=\"{kind}\"}} {running}");
    }
    let _ = writeln!(
        out,
        "# HELP foreman_slots_used CPUs held, by kind.\n# TYPE foreman_slots_used gauge"
    );
    for (kind, _, _, used, _) in &per_kind {
        let _ = writeln!(out, "foreman_slots_used{{kind=\"{kind}\"}} {used}");
    }
    let _ = writeln!(out, "# HELP foreman_slots_free CPUs of the pool not held, by kind.\n# TYPE foreman_slots_free gauge");
    for (kind, _, _, used, size) in &per_kind {
        let _ = writeln!(
            out,
            "foreman_slots_free{{kind=\"{kind}\"}} {}",
            size.saturating_sub(*used)
        );
    }
    let _ = writeln!(out, "# HELP foreman_agents_connected Agents connected now.\n# TYPE foreman_agents_connected gauge");
    let _ = writeln!(out, "foreman_agents_connected {agents}");
    let _ = writeln!(
        out,
        "# HELP foreman_jobs Jobs in the store, by state.\n# TYPE foreman_jobs gauge"
    );
    for (job_state, count) in outcomes {
        let _ = writeln!(out, "foreman_jobs{{state=\"{job_state}\"}} {count}");
    }
    {
        let latency = state.hub.dispatch_latency.lock().expect("hub lock");
        let _ = writeln!(
            out,
            "# HELP foreman_dispatch_latency_seconds From entering the queue to dispatch.\n# TYPE foreman_dispatch_latency_seconds histogram"
        );
        for (bound, count) in LATENCY_BUCKETS_MS.iter().zip(latency.buckets) {
            let _ = writeln!(
                out,
                "foreman_dispatch_latency_seconds_bucket{{le=\"{}\"}} {count}",
                *bound as f64 / 1000.0
            );
        }
        let _ = writeln!(
            out,
            "foreman_dispatch_latency_seconds_bucket{{le=\"+Inf\"}} {}",
            latency.count
        );
        let _ = writeln!(
            out,
            "foreman_dispatch_latency_seconds_sum {}",
            latency.sum_ms as f64 / 1000.0
        );
        let _ = writeln!(
            out,
            "foreman_dispatch_latency_seconds_count {}",
            latency.count
        );
    }
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response())
}
