//! The one task that owns the `Core`, and the commit stage behind it.
//!
//! Inputs arrive on a channel; the actor feeds them to the core in batches
//! (everything already waiting, up to a bound) and wakes at the core's next
//! deadline with a tick. A batch's effects go to the commit stage, a task
//! of its own that makes them durable and only then carries them out
//! (messages, replies, events), one batch at a time, in order. While a
//! batch commits the actor goes on deciding: what it decides meanwhile
//! becomes the next batch, handed on as soon as the stage is free, so that
//! batches grow with the commit's latency instead of the throughput
//! shrinking with it (pipelined group commit). Nothing leaves before its
//! batch is durable, and batches become durable in the order they were
//! decided, so what survives a crash is always a prefix of what was decided.
//!
//! Queries read the core between inputs, and their answers are released
//! with the batch that holds everything decided before them: no caller ever
//! sees a half-applied step, or a state that is not yet durable.

use tokio::sync::{mpsc, oneshot};
use tracing::{debug, error};

use crate::core::{Core, Effect, Input};
use crate::seam;

/// Inputs handled in one go before the actor looks at the commit stage
/// again.
pub const BATCH_INPUTS_MAX: usize = 256;

/// Inputs decided while a batch commits, past which the actor stops taking
/// more until the stage is free (the channel's capacity then pushes back
/// on producers): a bound on the memory and on the next commit's size.
pub const PENDING_INPUTS_MAX: usize = 16 * 1024;

/// What a query leaves once it has read the core: its answer, to be sent
/// when everything decided before it is durable.
type Delivery = Box<dyn FnOnce() + Send>;
type Query = Box<dyn FnOnce(&Core) -> Delivery + Send>;

#[allow(clippy::large_enum_variant)] // inputs are moved once, into the core
enum Command {
    Input(Input),
    Query(Query),
}

/// The commit stage's work: makes a batch's records durable, then carries
/// out its effects in order. Issue-specific executors (server, tests)
/// implement it.
pub trait Executor: Send + 'static {
    fn execute(&mut self, effects: Vec<Effect>) -> impl std::future::Future<Output = ()> + Send;
}

/// What the actor tells as it decides, before anything is durable: the
/// journal, and the simulator's checks.
pub trait Recorder: Send + 'static {
    /// Sees every input just before the core handles it.
    fn record(&mut self, _now: crate::core::Millis, _input: &Input, _core: &Core) {}

    /// Sees the core just after it handled an input, and what it decided.
    fn handled(&mut self, _core: &Core, _effects: &[Effect]) {}

    /// The batch decided so far is handed to the commit stage.
    fn sealed(&mut self) {}
}

/// No journal, no checks.
impl Recorder for () {}

/// An executor that passes every batch on to a channel, for tests.
impl Executor for mpsc::UnboundedSender<Vec<Effect>> {
    async fn execute(&mut self, effects: Vec<Effect>) {
        if !effects.is_empty() {
            let _ = self.send(effects);
        }
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

    /// Runs `read` against the core between two inputs, and returns its
    /// result once everything decided before it is durable.
    pub async fn query<T: Send + 'static>(
        &self,
        read: impl FnOnce(&Core) -> T + Send + 'static,
    ) -> Result<T, Stopped> {
        let (tx, rx) = oneshot::channel();
        let query: Query = Box::new(move |core| {
            let answer = read(core);
            Box::new(move || {
                let _ = tx.send(answer);
            })
        });
        self.tx
            .send(Command::Query(query))
            .await
            .map_err(|_| Stopped)?;
        rx.await.map_err(|_| Stopped)
    }
}

/// Starts the actor and its commit stage; they stop when every handle is
/// dropped (after the last batch is carried out). The task handle ends if
/// either stops (a store failure stops them on purpose).
pub fn spawn(
    core: Core,
    recorder: impl Recorder,
    executor: impl Executor,
    channel_capacity: usize,
) -> (CoreHandle, tokio::task::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(channel_capacity);
    let task = tokio::spawn(run(core, rx, recorder, executor));
    (CoreHandle { tx }, task)
}

/// A batch decided and not yet handed on: its effects, the answers of the
/// queries that read the core after them, and how many inputs made it.
#[derive(Default)]
struct Batch {
    effects: Vec<Effect>,
    deliveries: Vec<Delivery>,
    inputs: usize,
}

impl Batch {
    fn is_empty(&self) -> bool {
        self.effects.is_empty() && self.deliveries.is_empty()
    }
}

async fn run(
    mut core: Core,
    mut rx: mpsc::Receiver<Command>,
    mut recorder: impl Recorder,
    executor: impl Executor,
) {
    // One batch in the stage at a time: the next waits here, growing.
    let (batch_tx, batch_rx) = mpsc::channel::<Batch>(1);
    let (done_tx, mut done_rx) = mpsc::channel::<()>(1);
    let stage = tokio::spawn(commit_stage(executor, batch_rx, done_tx));
    let mut pending = Batch::default();
    let mut in_flight = false;
    let mut open = true;
    loop {
        if !in_flight && pending.is_empty() {
            // Inputs that changed nothing need no commit: nothing to wait for.
            pending.inputs = 0;
        }
        if !in_flight && !pending.is_empty() {
            recorder.sealed();
            debug!(
                inputs = pending.inputs,
                effects = pending.effects.len(),
                "batch"
            );
            if batch_tx.send(std::mem::take(&mut pending)).await.is_err() {
                break;
            }
            in_flight = true;
        }
        if !open && !in_flight {
            break;
        }
        let deadline = core.next_deadline().filter(|_| open);
        // Only a commit in flight holds inputs back (and it always ends).
        let full = in_flight && pending.inputs >= PENDING_INPUTS_MAX;
        crate::select! {
            done = done_rx.recv(), if in_flight => match done {
                Some(()) => in_flight = false,
                None => break,
            },
            command = rx.recv(), if open && !full => match command {
                None => open = false,
                Some(command) => {
                    let now = seam::now();
                    let mut next = Some(command);
                    let mut inputs = 0;
                    while let Some(command) = next.take() {
                        match command {
                            Command::Input(input) => {
                                recorder.record(now, &input, &core);
                                let before = pending.effects.len();
                                pending.effects.extend(core.handle(now, input));
                                recorder.handled(&core, &pending.effects[before..]);
                                pending.inputs += 1;
                                inputs += 1;
                            }
                            Command::Query(read) => {
                                let delivery = read(&core);
                                if in_flight || !pending.is_empty() {
                                    pending.deliveries.push(delivery);
                                } else {
                                    // Everything decided is durable already.
                                    delivery();
                                }
                            }
                        }
                        if inputs < BATCH_INPUTS_MAX && pending.inputs < PENDING_INPUTS_MAX {
                            next = rx.try_recv().ok();
                        }
                    }
                }
            },
            () = seam::sleep_until(deadline.unwrap_or_default()), if deadline.is_some() && !full => {
                let now = seam::now();
                recorder.record(now, &Input::Tick, &core);
                let before = pending.effects.len();
                pending.effects.extend(core.handle(now, Input::Tick));
                recorder.handled(&core, &pending.effects[before..]);
                pending.inputs += 1;
            },
        }
    }
    drop(batch_tx);
    if let Err(e) = stage.await {
        // The stage stops on purpose on a store failure: so does the actor.
        panic!("the commit stage stopped: {e:?}");
    }
}

/// Carries out batches one at a time, in order, and says when each is done.
async fn commit_stage(
    mut executor: impl Executor,
    mut batches: mpsc::Receiver<Batch>,
    done: mpsc::Sender<()>,
) {
    while let Some(batch) = batches.recv().await {
        // Every batch, even one of answers alone: one `execute` per batch
        // sealed (the simulator's observer pairs them).
        executor.execute(batch.effects).await;
        for delivery in batch.deliveries {
            delivery();
        }
        if done.send(()).await.is_err() {
            error!("the core actor is gone; the commit stage stops");
            break;
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

    /// Commits its first batch only once `gate` opens; passes every batch on.
    struct Gated {
        gate: Option<oneshot::Receiver<()>>,
        batches: mpsc::UnboundedSender<Vec<Effect>>,
        /// Batches carried out to their end.
        executed: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    }

    impl Executor for Gated {
        async fn execute(&mut self, effects: Vec<Effect>) {
            if let Some(gate) = self.gate.take() {
                let _ = gate.await;
            }
            // A commit takes time: whatever was released early runs now.
            tokio::task::yield_now().await;
            if !effects.is_empty() {
                let _ = self.batches.send(effects);
            }
            self.executed
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    /// Counts the inputs the core handled, as they are handled.
    struct Counting(std::sync::Arc<std::sync::atomic::AtomicUsize>);

    impl Recorder for Counting {
        fn handled(&mut self, _core: &Core, _effects: &[Effect]) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    fn submit(request: u64) -> Input {
        Input::Submit {
            request: RequestId(request),
            user: "ana".into(),
            plan: "basic".into(),
            spec: SubmitSpec::command(["true"]),
        }
    }

    fn persisted_jobs(batch: &[Effect]) -> Vec<u64> {
        batch
            .iter()
            .filter_map(|e| match e {
                Effect::Persist { job } => Some(job.id.0),
                _ => None,
            })
            .collect()
    }

    #[tokio::test]
    async fn the_core_decides_while_a_batch_commits_and_nothing_leaves_before_its_commit() {
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
        use std::sync::Arc;
        let handled = Arc::new(AtomicUsize::new(0));
        let (gate_tx, gate) = oneshot::channel();
        let (tx, mut batches) = mpsc::unbounded_channel();
        let executed = Arc::new(AtomicUsize::new(0));
        let executor = Gated {
            gate: Some(gate),
            batches: tx,
            executed: executed.clone(),
        };
        let (handle, _task) = spawn(
            Core::new(CoreConfig::default()),
            Counting(handled.clone()),
            executor,
            16,
        );
        let until = |n: usize| {
            let handled = handled.clone();
            async move {
                tokio::time::timeout(Duration::from_secs(30), async {
                    while handled.load(Ordering::SeqCst) < n {
                        tokio::task::yield_now().await;
                    }
                })
                .await
                .expect("inputs handled in time")
            }
        };
        // Job 1's batch goes to the stage at once, and waits there at the gate.
        handle.input(submit(1)).await.unwrap();
        until(1).await;
        // Jobs 2 and 3 are decided while it commits (the event under test).
        handle.input(submit(2)).await.unwrap();
        handle.input(submit(3)).await.unwrap();
        until(3).await;
        // A query reads the core now, but is answered only once everything
        // it read is durable.
        let read = Arc::new(AtomicBool::new(false));
        let query = {
            let (handle, read) = (handle.clone(), read.clone());
            tokio::spawn(async move {
                handle
                    .query(move |core| {
                        read.store(true, Ordering::SeqCst);
                        core.jobs().count()
                    })
                    .await
            })
        };
        tokio::time::timeout(Duration::from_secs(30), async {
            while !read.load(Ordering::SeqCst) {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the query read the core");
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        assert!(
            batches.try_recv().is_err(),
            "nothing left before the commit"
        );
        assert!(!query.is_finished(), "the answer waits for the commit");
        gate_tx.send(()).unwrap();
        assert_eq!(query.await.unwrap().unwrap(), 3);
        assert_eq!(
            executed.load(Ordering::SeqCst),
            2,
            "answered only once the batch holding what it read was carried out"
        );
        let first = batches.recv().await.expect("the first batch");
        let second = batches.recv().await.expect("the second batch");
        assert_eq!(persisted_jobs(&first), vec![1]);
        assert_eq!(
            persisted_jobs(&second),
            vec![2, 3],
            "decided during the first commit, committed together"
        );
    }

    #[tokio::test]
    async fn inputs_that_change_nothing_never_stall_the_actor() {
        let (tx, _batches) = mpsc::unbounded_channel();
        let (handle, _task) = spawn(Core::new(CoreConfig::default()), (), tx, 64);
        // More than a commit's worth of inputs with no effects (a departure
        // of a connection the core never knew), with nothing to commit.
        for n in 0..(PENDING_INPUTS_MAX as u64 + 100) {
            handle
                .input(Input::AgentGone {
                    conn: ConnId(1_000_000 + n),
                    agent: AgentId::new("nobody"),
                    reason: crate::core::GoneReason::Closed,
                })
                .await
                .unwrap();
        }
        let answer = tokio::time::timeout(
            Duration::from_secs(30),
            handle.query(|core| core.jobs().count()),
        )
        .await
        .expect("the actor still answers")
        .unwrap();
        assert_eq!(answer, 0);
    }

    #[tokio::test]
    async fn actor_fires_the_run_timeout_at_the_core_deadline_and_answers_queries() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let (handle, _task) = spawn(Core::new(CoreConfig::default()), (), tx, 16);
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
