//! Foreman's deterministic testbed: the real supervisor and agent code run
//! under the madsim simulator (`RUSTFLAGS="--cfg madsim"`, target dir
//! `target/sim`), where time, network and task order follow a seed.
//!
//! - `scenario`: scenarios as data (`scenarios/*.toml`).
//! - `trace`: the structured trace of a run.
//! - `checkers`: one passive checker per invariant, fed by the trace.
//! - `rare`: the rare events a run reached, named and counted.
//! - `runner`: the simulated `Runner` (jobs that take simulated time).
//! - `world`: the composer of a world and the driver of a scenario.
//! - `journal`: the supervisor's journal, replayed after a run.
//! - `play`: one scenario on one seed, on a fresh runtime and thread.
//! - `shrink`: delta debugging of a failing scenario.
//! - `import`: an incident bundle as a scenario.

pub mod checkers;
#[cfg(madsim)]
pub mod explore;
pub mod import;
pub mod journal;
#[cfg(madsim)]
pub mod play;
pub mod rare;
pub mod report;
pub mod runner;
pub mod scenario;
pub mod shrink;
pub mod swarm;
pub mod trace;
#[cfg(madsim)]
pub mod world;
