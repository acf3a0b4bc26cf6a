//! Foreman: a job supervisor for long-running compute jobs, built so that the
//! same code runs in production (tokio) and in a deterministic simulator
//! (madsim, under `RUSTFLAGS="--cfg madsim"`).
//!
//! Layers: `core` (sans-IO state machine, all the rules), `seam` (the clock
//! and runtime as the two build modes see them), `shell` (async code that
//! feeds the core and carries out its effects).

pub mod agent;
pub mod client;
pub mod core;
pub mod protocol;
pub mod seam;
pub mod server;
pub mod shell;
pub mod store;
pub mod tls;
