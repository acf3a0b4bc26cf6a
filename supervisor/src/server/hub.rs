//! What the server's tasks share: open agent connections, replies waited
//! for, the job-transition broadcast, and counters for metrics. Plain
//! synchronous maps; no lock is held across an await.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{broadcast, mpsc, oneshot};

use crate::core::{CloseReason, ConnId, Job, JobId, JobState, Millis, Reply, RequestId};
use crate::protocol::ToAgentMsg;

/// What an agent connection's task is told to do.
#[derive(Debug)]
pub enum Outgoing {
    Msg(ToAgentMsg),
    Close(CloseReason),
}

/// One job transition, as watchers see it.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Transition {
    pub job: JobId,
    pub state: JobState,
    pub at: Millis,
    pub reason: Arc<str>,
}

/// Dispatch latency buckets (submit or requeue → dispatched), in ms.
pub const LATENCY_BUCKETS_MS: [u64; 12] = [1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 5000, 30000];

#[derive(Default)]
pub struct Latency {
    pub buckets: [u64; LATENCY_BUCKETS_MS.len()],
    pub count: u64,
    pub sum_ms: u64,
}

/// A reply to come; its entry in the hub lives exactly as long as it does.
pub struct ReplyWaiter {
    hub: Arc<Hub>,
    pub request: RequestId,
    rx: Option<oneshot::Receiver<Reply>>,
}

impl ReplyWaiter {
    pub async fn wait(mut self) -> Result<Reply, oneshot::error::RecvError> {
        self.rx.take().expect("waited once").await
    }
}

impl Drop for ReplyWaiter {
    fn drop(&mut self) {
        self.hub
            .replies
            .lock()
            .expect("hub lock")
            .remove(&self.request);
    }
}

pub struct Hub {
    next_conn: AtomicU64,
    next_request: AtomicU64,
    conns: Mutex<BTreeMap<ConnId, mpsc::UnboundedSender<Outgoing>>>,
    replies: Mutex<BTreeMap<RequestId, oneshot::Sender<Reply>>>,
    transitions: broadcast::Sender<Transition>,
    pub dispatch_latency: Mutex<Latency>,
}

impl Default for Hub {
    fn default() -> Self {
        Hub {
            next_conn: AtomicU64::new(1),
            next_request: AtomicU64::new(1),
            conns: Mutex::new(BTreeMap::new()),
            replies: Mutex::new(BTreeMap::new()),
            transitions: broadcast::channel(4096).0,
            dispatch_latency: Mutex::new(Latency::default()),
        }
    }
}

impl Hub {
    pub fn open_conn(&self) -> (ConnId, mpsc::UnboundedReceiver<Outgoing>) {
        let conn = ConnId(self.next_conn.fetch_add(1, Ordering::Relaxed));
        let (tx, rx) = mpsc::unbounded_channel();
        self.conns.lock().expect("hub lock").insert(conn, tx);
        (conn, rx)
    }

    /// Connections open, and requests waiting for a reply (what a dropped
    /// handler must not leave behind).
    pub fn open_counts(&self) -> (usize, usize) {
        (
            self.conns.lock().expect("hub lock").len(),
            self.replies.lock().expect("hub lock").len(),
        )
    }

    pub fn close_conn(&self, conn: ConnId) {
        self.conns.lock().expect("hub lock").remove(&conn);
    }

    /// Hands `out` to the connection's task; false if it is gone.
    pub fn send(&self, conn: ConnId, out: Outgoing) -> bool {
        let conns = self.conns.lock().expect("hub lock");
        conns.get(&conn).is_some_and(|tx| tx.send(out).is_ok())
    }

    /// A new request id with the waiter its reply will arrive on. Dropping
    /// the waiter (a client that went away) forgets the request.
    pub fn expect_reply(self: &Arc<Self>) -> ReplyWaiter {
        let request = RequestId(self.next_request.fetch_add(1, Ordering::Relaxed));
        let (tx, rx) = oneshot::channel();
        self.replies.lock().expect("hub lock").insert(request, tx);
        ReplyWaiter {
            hub: self.clone(),
            request,
            rx: Some(rx),
        }
    }

    pub fn reply(&self, request: RequestId, reply: Reply) {
        if let Some(tx) = self.replies.lock().expect("hub lock").remove(&request) {
            let _ = tx.send(reply);
        }
    }

    pub fn watch(&self) -> broadcast::Receiver<Transition> {
        self.transitions.subscribe()
    }

    /// Publishes the latest transition of a persisted job, and its dispatch latency.
    pub fn published(&self, job: &Job) {
        if let Some(t) = job.history.last() {
            if t.state == JobState::Dispatched {
                let queued = job.queued_since();
                self.observe_dispatch(t.at.ms_since(queued));
            }
            let _ = self.transitions.send(Transition {
                job: job.id,
                state: t.state,
                at: t.at,
                reason: t.reason.clone(),
            });
        }
    }

    fn observe_dispatch(&self, ms: u64) {
        let mut latency = self.dispatch_latency.lock().expect("hub lock");
        for (i, bound) in LATENCY_BUCKETS_MS.iter().enumerate() {
            if ms <= *bound {
                latency.buckets[i] += 1;
            }
        }
        latency.count += 1;
        latency.sum_ms += ms;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::{JobSpec, Transition as Step};

    fn job(history: &[(u64, JobState)]) -> Job {
        Job {
            id: JobId(7),
            user: "ann".into(),
            plan: "basic".into(),
            priority: 0,
            spec: Arc::new(JobSpec::for_test(&["true"], 1)),
            state: history.last().map_or(JobState::Queued, |h| h.1),
            submitted_at: Millis(history.first().map_or(0, |h| h.0)),
            finished_at: None,
            attempts: Vec::new(),
            history: history
                .iter()
                .map(|&(at, state)| Step {
                    at: Millis(at),
                    state,
                    reason: Arc::from(format!("{state} at {at}")),
                })
                .collect(),
            exit_code: None,
            output_tail: String::new(),
            reason: Arc::from(""),
        }
    }

    #[test]
    fn a_dropped_reply_waiter_forgets_its_request_and_a_reply_reaches_its_waiter() {
        let hub = Arc::new(Hub::default());
        let (conn, _rx) = hub.open_conn();
        let gone = hub.expect_reply();
        let kept = hub.expect_reply();
        assert_ne!(gone.request, kept.request);
        assert_eq!(hub.open_counts(), (1, 2));
        drop(gone);
        assert_eq!(hub.open_counts(), (1, 1), "the dropped waiter is forgotten");
        hub.close_conn(conn);
        assert_eq!(hub.open_counts(), (0, 1));
        assert!(!hub.send(conn, Outgoing::Close(CloseReason::Replaced)));
        let request = kept.request;
        let reply = Reply::Submitted {
            job: JobId(7),
            existing: true,
            at: None,
        };
        hub.reply(request, reply.clone());
        let got = futures_util::FutureExt::now_or_never(kept.wait())
            .expect("the reply is there")
            .expect("not dropped");
        assert_eq!(got, reply);
        assert_eq!(hub.open_counts(), (0, 0));
    }

    #[test]
    fn each_published_transition_reaches_watchers_and_dispatches_are_timed_from_the_last_queueing()
    {
        let hub = Hub::default();
        let mut watcher = hub.watch();
        // Queued at 100, dispatched at 103, requeued at 200, dispatched at 260.
        hub.published(&job(&[(100, JobState::Queued)]));
        hub.published(&job(&[
            (100, JobState::Queued),
            (103, JobState::Dispatched),
        ]));
        hub.published(&job(&[
            (100, JobState::Queued),
            (103, JobState::Dispatched),
            (200, JobState::Queued),
            (260, JobState::Dispatched),
        ]));
        hub.published(&job(&[]));
        let seen: Vec<(JobState, u64, String)> = std::iter::from_fn(|| watcher.try_recv().ok())
            .map(|t| (t.state, t.at.0, t.reason.to_string()))
            .collect();
        assert_eq!(
            seen,
            [
                (JobState::Queued, 100, "queued at 100".into()),
                (JobState::Dispatched, 103, "dispatched at 103".into()),
                (JobState::Dispatched, 260, "dispatched at 260".into()),
            ]
        );
        let latency = hub.dispatch_latency.lock().expect("hub lock");
        assert_eq!((latency.count, latency.sum_ms), (2, 3 + 60));
        // Cumulative buckets: 3 ms is within 5 ms and up, 60 ms within 100 ms and up.
        let expected: Vec<u64> = LATENCY_BUCKETS_MS
            .iter()
            .map(|&b| u64::from(b >= 5) + u64::from(b >= 100))
            .collect();
        assert_eq!(latency.buckets.to_vec(), expected);
    }
}
