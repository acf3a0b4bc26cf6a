//! `cargo xtask`: one entry point for Foreman's two build modes.
//!
//!   cargo xtask test    formatting, clippy and every test, normal then simulation mode
//!   cargo xtask bench   the core benchmark (criterion), release build

use std::env;
use std::process::{Command, ExitCode};

/// Where the simulation build lives, apart from the normal one.
const SIM_TARGET_DIR: &str = "target/sim";

fn main() -> ExitCode {
    let args: Vec<String> = env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("test") => test(),
        Some("bench") => bench(&args[1..]),
        _ => {
            eprintln!("usage: cargo xtask test | bench [criterion args]");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(step) => {
            eprintln!("xtask: failed: {step}");
            ExitCode::FAILURE
        }
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Normal,
    Simulation,
}

fn cargo(mode: Mode, args: &[&str], envs: &[(&str, &str)]) -> Result<(), String> {
    let mut command = Command::new(env::var("CARGO").unwrap_or_else(|_| "cargo".to_string()));
    command.args(args);
    if mode == Mode::Simulation {
        let mut flags = env::var("RUSTFLAGS").unwrap_or_default();
        if !flags.split_whitespace().any(|f| f == "--cfg") {
            flags = format!("{flags} --cfg madsim").trim().to_string();
        }
        command
            .env("RUSTFLAGS", flags)
            .env("CARGO_TARGET_DIR", SIM_TARGET_DIR);
    }
    for (key, value) in envs {
        command.env(key, value);
    }
    let shown = format!(
        "{}cargo {}",
        if mode == Mode::Simulation {
            "RUSTFLAGS=\"--cfg madsim\" CARGO_TARGET_DIR=target/sim "
        } else {
            ""
        },
        args.join(" ")
    );
    eprintln!("\n==> {shown}");
    let status = command.status().map_err(|e| format!("{shown}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(shown)
    }
}

fn test() -> Result<(), String> {
    cargo(Mode::Normal, &["fmt", "--all", "--", "--check"], &[])?;
    for mode in [Mode::Normal, Mode::Simulation] {
        cargo(
            mode,
            &[
                "clippy",
                "--workspace",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ],
            &[],
        )?;
    }
    cargo(Mode::Normal, &["test", "--workspace"], &[])?;
    // The model test's 10,000 sequences already ran above; in simulation mode
    // the same pure core gets a smaller sample, the madsim tests run in full.
    cargo(
        Mode::Simulation,
        &["test", "--workspace"],
        &[("FOREMAN_MODEL_SEQUENCES", "1000")],
    )?;
    Ok(())
}

fn bench(extra: &[String]) -> Result<(), String> {
    let mut args = vec!["bench", "-p", "foreman", "--bench", "core"];
    if !extra.is_empty() {
        args.push("--");
        args.extend(extra.iter().map(String::as_str));
    }
    cargo(Mode::Normal, &args, &[])
}
