//! Carries out a batch of the core's effects in the order durability needs:
//! every record of the batch is committed in one transaction first, and only
//! then do messages, replies and events leave. A submission is acknowledged
//! only once its job is durable. The commit runs off the async threads, in
//! the actor's commit stage, while the core goes on deciding the next batch.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use tracing::{error, info};

use crate::core::{Core, Effect, Event, Input, Job, Millis};
use crate::seam;
use crate::shell::actor::{Executor, Recorder};
use crate::store::Store;

use super::hub::{Hub, Outgoing};
use super::journal::Journal;

pub struct ServerExecutor {
    /// Taken while a commit runs on a blocking thread, and put back.
    pub store: Option<Store>,
    pub hub: Arc<Hub>,
    pub observer: Option<Arc<dyn Observer>>,
    /// Extra time each commit takes (see `ServerOptions::commit_delay_ms`).
    pub commit_delay_ms: u64,
}

/// What the actor tells as it decides: the journal, and the observer.
pub struct ServerRecorder {
    pub journal: Option<Journal>,
    pub observer: Option<Arc<dyn Observer>>,
}

/// A passive tap on the core, for the simulator: it sees the core after
/// every step and every event once its batch is committed. Production runs
/// have none.
pub trait Observer: Send + Sync + std::fmt::Debug {
    /// The core just handled an input.
    fn handled(&self, core: &Core);
    /// The batch decided so far (up to the core as last handled) is handed
    /// to the commit stage.
    fn sealed(&self) {}
    /// An event of a batch just made durable, in order (before any of the
    /// batch's messages or replies leave).
    fn event(&self, event: &Event);
    /// The oldest sealed batch is durable (its events were just told): the
    /// core as it was when that batch was sealed is what a restart restores.
    fn committed(&self) {}
}

impl Recorder for ServerRecorder {
    fn record(&mut self, now: Millis, input: &Input, core: &Core) {
        if let Some(journal) = &mut self.journal {
            journal.record(now, input, core);
        }
    }

    fn handled(&mut self, core: &Core, effects: &[Effect]) {
        if let Some(journal) = &mut self.journal {
            journal.decided(effects);
        }
        if let Some(observer) = &self.observer {
            observer.handled(core);
        }
    }

    fn sealed(&mut self) {
        // The journal holds a batch's inputs before its records commit.
        if let Some(journal) = &mut self.journal {
            journal.flush();
        }
        if let Some(observer) = &self.observer {
            observer.sealed();
        }
    }
}

/// The batch's records to commit, each job once, as it was last (a batch
/// that grew while the previous one committed may hold a job several
/// times).
fn latest_records(effects: &[Effect]) -> Vec<Arc<Job>> {
    let mut seen = BTreeSet::new();
    let mut records: Vec<Arc<Job>> = effects
        .iter()
        .rev()
        .filter_map(|e| match e {
            Effect::Persist { job } if seen.insert(job.id) => Some(job.clone()),
            _ => None,
        })
        .collect();
    records.reverse();
    records
}

impl Executor for ServerExecutor {
    async fn execute(&mut self, effects: Vec<Effect>) {
        let records = latest_records(&effects);
        let writes = !records.is_empty();
        // A slow commit: a crash in the first half loses the batch (it was
        // never durable), one in the second keeps it with nothing sent.
        let before_ms = self.commit_delay_ms / 2;
        if writes && before_ms > 0 {
            tokio::time::sleep(Duration::from_millis(before_ms)).await;
        }
        if writes {
            let mut store = self
                .store
                .take()
                .expect("the store is back after every commit");
            let (store, committed) = seam::blocking(move || {
                let committed = store.commit(&records);
                (store, committed)
            })
            .await;
            self.store = Some(store);
            if let Err(e) = committed {
                // Nothing of this batch has been acknowledged. Stopping here
                // keeps that true; a restart restores from the last commit.
                error!(error = %e, "store commit failed; stopping the supervisor");
                panic!("store commit failed: {e}");
            }
        }
        // Durable now: the observer (the simulator's oracle) hears the
        // batch's events and that it is committed at this instant, before
        // anything leaves. A crash from here on restores all of it.
        if let Some(observer) = &self.observer {
            for effect in &effects {
                if let Effect::Event(event) = effect {
                    observer.event(event);
                }
            }
            observer.committed();
        }
        let after_ms = self.commit_delay_ms - before_ms;
        if writes && after_ms > 0 {
            tokio::time::sleep(Duration::from_millis(after_ms)).await;
        }
        for effect in effects {
            match effect {
                // Every step's record, in order: event streams see each
                // transition, though the commit wrote each job once.
                Effect::Persist { job } => self.hub.published(&job),
                Effect::Send { agent, conn, msg } => {
                    if !self.hub.send(conn, Outgoing::Msg(msg.into())) {
                        info!(agent.id = %agent, conn = conn.0, "message for a closed connection dropped");
                    }
                }
                Effect::Close {
                    agent,
                    conn,
                    reason,
                } => {
                    info!(agent.id = %agent, conn = conn.0, ?reason, "closing agent connection");
                    self.hub.send(conn, Outgoing::Close(reason));
                }
                Effect::Reply { request, reply } => self.hub.reply(request, reply),
                Effect::Event(event) => log_event(&event),
            }
        }
    }
}

fn log_event(event: &Event) {
    info!(
        job.id = event.job.map(|j| j.0),
        attempt = event.attempt,
        agent.id = event.agent.as_ref().map(|a| a.as_str()),
        kind = ?event.kind,
        // Reasons carry what agents and clients said: escaped, so that no
        // newline or terminal escape of theirs reaches the log as it is.
        "{}",
        event.reason.escape_debug()
    );
}
