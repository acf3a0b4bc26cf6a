//! The one task that owns the `Core`. Inputs arrive on a channel; the task
//! feeds them to the core in batches (everything already waiting, up to a
//! bound), wakes at the core's next deadline with a tick, and hands each
//! batch's effects to the executor in order. Queries read the core between
//! batches, so no caller ever sees a half-applied step.

use tokio::sync::{mpsc, oneshot};
use tracing::debug;

use crate::core::{Core, Effect, Input};
use crate::seam;

/// Inputs handled before their effects are handed on together: one batch,
/// one store transaction under load (group commit).
pub const BATCH_INPUTS_MAX: usize = 256;

type Query = Box<dyn FnOnce(&Core) + Send>;

#[allow(clippy::large_enum_variant)] // inputs are moved once, into the core
enum Command {
    Input(Input),
    Query(Query),
}

/// Where a batch's effects go: the store commit, then agent messages and
/// replies. Issue-specific executors (server, tests, simulator) implement it.
pub trait Executor: Send + 'static {
    fn execute(&mut self, effects: Vec<Effect>) -> impl std::future::Future<Output = ()> + Send;

    /// Sees every input just before the core handles it (the journal).
    fn record(&mut self, _now: crate::core::Millis, _input: &Input, _core: &Core) {}

    /// Sees the core just after it handled an input (the simulator's
    /// invariant checks).
    fn handled(&mut self, _core: &Core) {}
}

/// An executor that passes every batch on to a channel, for tests.
impl Executor for mpsc::UnboundedSender<Vec<Effect>> {
    async fn execute(&mut self, effects: Vec<Effect>) {
        let _ = self.send(effects);
    }
}

#[derive(Clone)]
pub struct CoreHandle {
    tx: mpsc::Sender<Command>,
}

#[derive(Debug, thiserror::Error)]
#[error("the core actor has stopped")]
pub struct Stopped;

impl CoreHandle {
    pub async fn input(&self, input: Input) -> Result<(), Stopped> {
        self.tx
            .send(Command::Input(input))
            .await
            .map_err(|_| Stopped)
    }

    /// Hands `input` to the core without waiting, for code that cannot
    /// wait (a drop guard): at once if the channel has room, else from a
    /// task of its own.
    pub fn input_detached(&self, input: Input) {
        match self.tx.try_send(Command::Input(input)) {
            Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => {}
            Err(mpsc::error::TrySendError::Full(command)) => {
                let tx = self.tx.clone();
                tokio::spawn(async move {
                    let _ = tx.send(command).await;
                });
            }
        }
    }

    /// Runs `read` against the core between two batches and returns its result.
    pub async fn query<T: Send + 'static>(
        &self,
        read: impl FnOnce(&Core) -> T + Send + 'static,
    ) -> Result<T, Stopped> {
        let (tx, rx) = oneshot::channel();
        let query: Query = Box::new(move |core| {
            let _ = tx.send(read(core));
        });
        self.tx
            .send(Command::Query(query))
            .await
            .map_err(|_| Stopped)?;
        rx.await.map_err(|_| Stopped)
    }
}

/// Starts the actor; it stops when every handle is dropped. The task handle
/// ends if the actor does (a store failure stops it on purpose).
pub fn spawn(
    core: Core,
    executor: impl Executor,
    channel_capacity: usize,
) -> (CoreHandle, tokio::task::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(channel_capacity);
    let task = tokio::spawn(run(core, rx, executor));
    (CoreHandle { tx }, task)
}

async fn run(mut core: Core, mut rx: mpsc::Receiver<Command>, mut executor: impl Executor) {
    let mut effects: Vec<Effect> = Vec::new();
    loop {
        let deadline = core.next_deadline();
        let first = crate::select! {
            command = rx.recv() => match command {
                Some(command) => Some(command),
                None => break,
            },
            () = seam::sleep_until(deadline.unwrap_or_default()), if deadline.is_some() => None,
        };
        let now = seam::now();
        match first {
            None => {
                executor.record(now, &Input::Tick, &core);
                effects.extend(core.handle(now, Input::Tick));
                executor.handled(&core);
            }
            Some(command) => {
                let mut next = Some(command);
                let mut inputs = 0;
                while let Some(command) = next.take() {
                    match command {
                        Command::Input(input) => {
                            executor.record(now, &input, &core);
                            effects.extend(core.handle(now, input));
                            executor.handled(&core);
                            inputs += 1;
                        }
                        Command::Query(read) => {
                            // A query sees only what is committed: finish the
                            // batch so far first.
                            if !effects.is_empty() {
                                executor.execute(std::mem::take(&mut effects)).await;
                            }
                            read(&core);
                        }
                    }
                    if inputs < BATCH_INPUTS_MAX {
                        next = rx.try_recv().ok();
                    }
                }
                debug!(at = now.0, inputs, effects = effects.len(), "batch");
            }
        }
        if !effects.is_empty() {
            executor.execute(std::mem::take(&mut effects)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::Duration;

    use super::*;
    use crate::core::{
        AgentId, AgentMsg, ConnId, CoreConfig, JobId, JobState, RequestId, SubmitSpec, ToAgent,
    };

    /// Waits, with a bound, for a batch in which `job` is persisted in `state`.
    async fn persisted(
        rx: &mut mpsc::UnboundedReceiver<Vec<Effect>>,
        job: JobId,
        state: JobState,
    ) -> Vec<Effect> {
        tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                let batch = rx.recv().await.expect("actor alive");
                if batch.iter().any(
                    |e| matches!(e, Effect::Persist { job: j } if j.id == job && j.state == state),
                ) {
                    return batch;
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("job {job} never became {state}"))
    }

    #[tokio::test]
    async fn actor_fires_the_run_timeout_at_the_core_deadline_and_answers_queries() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let (handle, _task) = spawn(Core::new(CoreConfig::default()), tx, 16);
        let agent = AgentId::new("a1");
        let conn = ConnId(1);
        handle
            .input(Input::AgentConnected {
                conn,
                agent: agent.clone(),
                cpus: 1,
                labels: BTreeMap::new(),
                attempts: vec![],
            })
            .await
            .unwrap();
        let spec = SubmitSpec {
            max_run_secs: Some(1),
            ..SubmitSpec::command(["sleep", "600"])
        };
        handle
            .input(Input::Submit {
                request: RequestId(1),
                user: "ana".into(),
                plan: "basic".into(),
                spec,
            })
            .await
            .unwrap();
        let batch = persisted(&mut rx, JobId(1), JobState::Dispatched).await;
        assert!(batch.iter().any(|e| matches!(
            e,
            Effect::Send {
                msg: ToAgent::Run { .. },
                ..
            }
        )));
        handle
            .input(Input::AgentMessage {
                conn,
                agent,
                msg: AgentMsg::Started {
                    job: JobId(1),
                    attempt: 1,
                },
            })
            .await
            .unwrap();
        persisted(&mut rx, JobId(1), JobState::Running).await;
        let started = seam::now();
        let batch = persisted(&mut rx, JobId(1), JobState::TimedOut).await;
        assert!(
            seam::now().ms_since(started) >= 1_000,
            "the timeout fired early"
        );
        assert!(batch.iter().any(|e| matches!(
            e,
            Effect::Send {
                msg: ToAgent::Kill { .. },
                ..
            }
        )));
        let state = handle
            .query(|core| core.job(JobId(1)).map(|j| j.state))
            .await
            .unwrap();
        assert_eq!(
            state,
            Some(JobState::TimedOut),
            "held until the agent confirms the kill"
        );
    }
}
