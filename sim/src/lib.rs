//! Foreman's deterministic testbed: the real supervisor and agent code run
//! under the madsim simulator (`RUSTFLAGS="--cfg madsim"`, target dir
//! `target/sim`), where time, network and task order follow a seed.
//!
//! - `runner`: the simulated `Runner` (jobs that take simulated time).
//! - `world`: the composer of a world of supervisor, agent and client nodes.

pub mod runner;
#[cfg(madsim)]
pub mod world;
