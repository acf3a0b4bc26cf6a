//! `cargo xtask`: one entry point for Foreman's two build modes.
//!
//!   cargo xtask test    formatting, clippy and every test, normal then simulation mode
//!   cargo xtask bench   the core benchmark (criterion), release build
//!   cargo xtask load    load runs against a real supervisor (release build)
//!   cargo xtask sim     the testbed CLI, `foreman-sim` (simulation build, release)
//!   cargo xtask fuzz    same as `cargo xtask sim fuzz`

use std::env;
use std::io::{BufRead, BufReader};
use std::process::{Command, ExitCode, Stdio};

/// Where the simulation build lives, apart from the normal one.
const SIM_TARGET_DIR: &str = "target/sim";

fn main() -> ExitCode {
    let args: Vec<String> = env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("test") => test(),
        Some("bench") => bench(&args[1..]),
        Some("load") => load(&args[1..]),
        Some("sim") => sim(&args[1..]),
        Some("fuzz") => sim(&[&["fuzz".to_string()], &args[1..]].concat()),
        _ => {
            eprintln!("usage: cargo xtask test | bench [criterion args] | load [noop|rate|fsync|processes|memory|listing|deep]... | sim run|fuzz|shrink|import|report|explore ... | fuzz ...");
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

/// Tests counted across every `cargo test` run, for one closing line.
#[derive(Default)]
struct Tally {
    passed: u64,
    failed: u64,
}

impl Tally {
    /// Reads a libtest closing line: "test result: ok. 33 passed; 0 failed; ...".
    fn add(&mut self, line: &str) {
        let Some(rest) = line.strip_prefix("test result: ") else {
            return;
        };
        for part in rest.split(';') {
            let mut words = part.split_whitespace().rev();
            let (Some(what), Some(count)) = (words.next(), words.next()) else {
                continue;
            };
            let Ok(count) = count.parse::<u64>() else {
                continue;
            };
            match what {
                "passed" => self.passed += count,
                "failed" => self.failed += count,
                _ => {}
            }
        }
    }
}

fn cargo(mode: Mode, args: &[&str], envs: &[(&str, &str)]) -> Result<(), String> {
    cargo_counted(mode, args, envs, None)
}

fn cargo_counted(
    mode: Mode,
    args: &[&str],
    envs: &[(&str, &str)],
    tally: Option<&mut Tally>,
) -> Result<(), String> {
    let mut command = Command::new(env::var("CARGO").unwrap_or_else(|_| "cargo".to_string()));
    command.args(args);
    if mode == Mode::Simulation {
        let mut flags = env::var("RUSTFLAGS").unwrap_or_default();
        if !flags.split_whitespace().any(|f| f == "--cfg") {
            flags = format!("{flags} --cfg madsim").trim().to_string();
        }
        // Doc-tests are compiled by rustdoc, which reads RUSTDOCFLAGS, not
        // RUSTFLAGS: without the cfg they would build the library's normal
        // code against the simulation's dependencies.
        let mut doc_flags = env::var("RUSTDOCFLAGS").unwrap_or_default();
        if !doc_flags.split_whitespace().any(|f| f == "--cfg") {
            doc_flags = format!("{doc_flags} --cfg madsim").trim().to_string();
        }
        command
            .env("RUSTFLAGS", flags)
            .env("RUSTDOCFLAGS", doc_flags)
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
    let status = match tally {
        None => command.status().map_err(|e| format!("{shown}: {e}"))?,
        Some(tally) => {
            command.stdout(Stdio::piped());
            let mut child = command.spawn().map_err(|e| format!("{shown}: {e}"))?;
            let stdout = child.stdout.take().expect("stdout is piped");
            for line in BufReader::new(stdout).lines() {
                let line = line.map_err(|e| format!("{shown}: reading its output: {e}"))?;
                println!("{line}");
                tally.add(&line);
            }
            child.wait().map_err(|e| format!("{shown}: {e}"))?
        }
    };
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
    let mut tally = Tally::default();
    let normal = cargo_counted(
        Mode::Normal,
        &["test", "--workspace"],
        &[],
        Some(&mut tally),
    );
    // The model test's 10,000 sequences run in the normal build; in simulation
    // mode the same pure core gets a smaller sample, the madsim tests run in full.
    let simulation = normal.and_then(|()| {
        cargo_counted(
            Mode::Simulation,
            &["test", "--workspace"],
            &[("FOREMAN_MODEL_SEQUENCES", "1000")],
            Some(&mut tally),
        )
    });
    // A swarm fuzz smoke over the real server and agents (release build:
    // the same seeds run several times faster).
    let fuzz = simulation.and_then(|()| {
        let smoke = sim(&["fuzz", "--seeds", "1000", "--quiet"].map(String::from));
        match &smoke {
            Ok(()) => tally.passed += 1,
            Err(_) => tally.failed += 1,
        }
        smoke
    });
    println!("xtask: {} passed, {} failed", tally.passed, tally.failed);
    fuzz
}

fn sim(args: &[String]) -> Result<(), String> {
    let mut all = vec!["run", "--release", "--quiet", "-p", "foreman-sim", "--"];
    all.extend(args.iter().map(String::as_str));
    cargo(Mode::Simulation, &all, &[])
}

fn bench(extra: &[String]) -> Result<(), String> {
    let mut args = vec!["bench", "-p", "foreman", "--bench", "core"];
    if !extra.is_empty() {
        args.push("--");
        args.extend(extra.iter().map(String::as_str));
    }
    cargo(Mode::Normal, &args, &[])
}

fn load(modes: &[String]) -> Result<(), String> {
    cargo(
        Mode::Normal,
        &[
            "build",
            "--release",
            "-p",
            "foreman",
            "--bins",
            "--examples",
        ],
        &[],
    )?;
    let all = [
        "noop",
        "rate",
        "fsync",
        "processes",
        "memory",
        "listing",
        "deep",
    ]
    .map(String::from);
    let modes = if modes.is_empty() { &all[..] } else { modes };
    for mode in modes {
        eprintln!("\n==> load {mode}");
        let status = Command::new("target/release/examples/load")
            .args([mode.as_str(), "target/release/foreman"])
            .status()
            .map_err(|e| format!("load {mode}: {e}"))?;
        if !status.success() {
            return Err(format!("load {mode}"));
        }
    }
    Ok(())
}
