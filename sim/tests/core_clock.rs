//! The core driven by its actor on the simulator's clock: an hour of
//! simulated time passes in moments, timers fire at their exact deadline,
//! and the same seed gives the same run.
#![cfg(madsim)]

use std::collections::BTreeMap;
use std::time::Duration;

use foreman::core::{
    AgentId, AgentMsg, ConnId, Core, CoreConfig, Effect, Input, JobId, JobState, RequestId,
    SubmitSpec,
};
use foreman::seam;
use foreman::shell::actor;
use madsim::{runtime::Runtime, Config};
use tokio::sync::mpsc;

/// Runs two hour-long jobs past their limit; returns the effect log as JSON
/// and how long after "started" the first timeout fired, in simulated ms.
async fn hour_long_job_times_out() -> (String, u64) {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let (handle, _task) = actor::spawn(Core::new(CoreConfig::default()), (), tx, 16);
    let agent = AgentId::new("a1");
    let conn = ConnId(1);
    let mut log = Vec::new();
    handle
        .input(Input::AgentConnected {
            conn,
            agent: agent.clone(),
            cpus: 4,
            labels: BTreeMap::new(),
            attempts: vec![],
        })
        .await
        .unwrap();
    for (i, user) in ["ana", "bob"].iter().enumerate() {
        let spec = SubmitSpec {
            max_run_secs: Some(3600 - i as u64 * 60),
            ..SubmitSpec::command(["simulate"])
        };
        handle
            .input(Input::Submit {
                request: RequestId(i as u64),
                user: (*user).into(),
                plan: "basic".into(),
                spec,
            })
            .await
            .unwrap();
    }
    // A random delay before the agent reports, drawn from the seeded runtime.
    let delay_ms = madsim::rand::random::<u64>() % 1_000;
    tokio::time::sleep(Duration::from_millis(delay_ms)).await;
    for job in [1, 2] {
        handle
            .input(Input::AgentMessage {
                conn,
                agent: agent.clone(),
                msg: AgentMsg::Started {
                    job: JobId(job),
                    attempt: 1,
                },
            })
            .await
            .unwrap();
    }
    let started = seam::now();
    // Each job's first persist as timed_out (a later one comes when the stop
    // timeout closes this agent, which never confirms the kill).
    let mut fired_after: BTreeMap<JobId, u64> = BTreeMap::new();
    while fired_after.len() < 2 {
        let batch = rx.recv().await.expect("actor alive");
        for effect in &batch {
            if let Effect::Persist { job } = effect {
                if job.state == JobState::TimedOut {
                    fired_after
                        .entry(job.id)
                        .or_insert_with(|| seam::now().ms_since(started));
                }
            }
        }
        log.extend(batch);
    }
    let fired_after = fired_after[&JobId(1)];
    (
        serde_json::to_string(&log).expect("effects serialize"),
        fired_after,
    )
}

#[test]
fn sim_run_timeout_fires_at_the_simulated_deadline_and_replays_exactly() {
    let run = |seed| {
        Runtime::with_seed_and_config(seed, Config::default()).block_on(hour_long_job_times_out())
    };
    let (first, fired_after) = run(7);
    assert_eq!(
        fired_after, 3_600_000,
        "the one-hour limit fires at exactly one simulated hour"
    );
    let (again, _) = run(7);
    assert_eq!(
        first, again,
        "the same seed gives the same effects, byte for byte"
    );
    let (other, _) = run(8);
    assert_ne!(
        first, other,
        "another seed draws another delay, so other timestamps"
    );
}
