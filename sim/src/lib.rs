//! Foreman's deterministic testbed: the real supervisor and agent code run
//! under the madsim simulator (`RUSTFLAGS="--cfg madsim"`, target dir
//! `target/sim`), where time, network and task order follow a seed.
//!
//! So far it holds the simulation-mode tests in `tests/`: the core driven by
//! its actor on the simulated clock, replayed exactly from a seed.
