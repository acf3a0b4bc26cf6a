//! Carries out a batch of the core's effects in the order durability needs:
//! every record of the batch is committed in one transaction first, and only
//! then do messages, replies and events leave. A submission is acknowledged
//! only once its job is durable.

use std::sync::Arc;
use std::time::Duration;

use tracing::{error, info};

use crate::core::{Core, Effect, Event, Input, Job, Millis};
use crate::shell::actor::Executor;
use crate::store::Store;

use super::hub::{Hub, Outgoing};
use super::journal::Journal;

pub struct ServerExecutor {
    pub store: Store,
    pub hub: Arc<Hub>,
    pub journal: Option<Journal>,
    pub observer: Option<Arc<dyn Observer>>,
    /// Extra time each commit takes (see `ServerOptions::commit_delay_ms`).
    pub commit_delay_ms: u64,
}

/// A passive tap on the core, for the simulator: it sees the core after
/// every step and every event once its batch is committed. Production runs
/// have none.
pub trait Observer: Send + Sync + std::fmt::Debug {
    /// The core just handled an input.
    fn handled(&self, core: &Core);
    /// An event of a committed batch, in order.
    fn event(&self, event: &Event);
    /// A batch is committed and sent: the core as last handled is durable.
    fn committed(&self) {}
}

impl Executor for ServerExecutor {
    fn record(&mut self, now: Millis, input: &Input, core: &Core) {
        if let Some(journal) = &mut self.journal {
            journal.record(now, input, core);
        }
    }

    fn handled(&mut self, core: &Core) {
        if let Some(observer) = &self.observer {
            observer.handled(core);
        }
    }

    async fn execute(&mut self, effects: Vec<Effect>) {
        if let Some(journal) = &mut self.journal {
            journal.flush();
        }
        let records: Vec<Arc<Job>> = effects
            .iter()
            .filter_map(|e| match e {
                Effect::Persist { job } => Some(job.clone()),
                _ => None,
            })
            .collect();
        // A slow commit: a crash in the first half loses the batch (it was
        // never durable), one in the second keeps it with nothing sent.
        let before_ms = self.commit_delay_ms / 2;
        if !records.is_empty() && before_ms > 0 {
            tokio::time::sleep(Duration::from_millis(before_ms)).await;
        }
        if let Err(e) = self.store.commit(&records) {
            // Nothing of this batch has been acknowledged. Stopping here keeps
            // that true; a restart restores from the last commit.
            error!(error = %e, "store commit failed; stopping the supervisor");
            panic!("store commit failed: {e}");
        }
        let after_ms = self.commit_delay_ms - before_ms;
        if !records.is_empty() && after_ms > 0 {
            tokio::time::sleep(Duration::from_millis(after_ms)).await;
        }
        for record in &records {
            self.hub.published(record);
        }
        for effect in effects {
            match effect {
                Effect::Persist { .. } => {}
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
                Effect::Event(event) => {
                    log_event(&event);
                    if let Some(observer) = &self.observer {
                        observer.event(&event);
                    }
                }
            }
        }
        if let Some(observer) = &self.observer {
            observer.committed();
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
