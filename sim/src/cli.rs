//! The commands of `foreman-sim`.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::{Parser, Subcommand};
use foreman_sim::play::{run, RunResult, Verdict};
use foreman_sim::scenario::Scenario;
use foreman_sim::shrink::{shrink, size, Shrunk, Signature};
use foreman_sim::trace::first_divergence;

/// Exit code for bad usage or an unreadable scenario.
const USAGE: i32 = 64;

#[derive(Parser)]
#[command(name = "foreman-sim", about = "Foreman's deterministic testbed")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs scenario files (or every scenario in a directory) on a seed.
    Run {
        /// Scenario files or directories of them.
        #[arg(required = true)]
        scenarios: Vec<PathBuf>,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Writes the trace (JSON lines) here; with several scenarios, a directory.
        #[arg(long)]
        trace: Option<PathBuf>,
        /// Runs each seed twice and reports the first divergence.
        #[arg(long)]
        twice: bool,
    },
    /// Swarm fuzzing: each seed is its own world and fault mix.
    Fuzz {
        /// How many seeds.
        #[arg(long, conflicts_with = "time")]
        seeds: Option<u64>,
        /// For how long, e.g. 90s, 10m, 1h.
        #[arg(long)]
        time: Option<String>,
        /// The first seed.
        #[arg(long, default_value_t = 1)]
        from: u64,
        /// Runs in parallel (default: the machine's cores).
        #[arg(long)]
        jobs: Option<usize>,
        /// Where failures are saved.
        #[arg(long, default_value = "target/sim-failures")]
        out: PathBuf,
        /// Replays one seed only, printing its knobs and verdict.
        #[arg(long, conflicts_with_all = ["seeds", "time"])]
        seed: Option<u64>,
        /// No progress bar (a line per thousand seeds instead).
        #[arg(long)]
        quiet: bool,
        /// Runs every Nth seed twice and fails on any difference (0: never).
        #[arg(long, default_value_t = 50)]
        recheck: u64,
        /// Stops at the first failing seed (and says how long it took).
        #[arg(long)]
        first_failure: bool,
        /// Saves failures as they are, unshrunk.
        #[arg(long)]
        no_shrink: bool,
    },
    /// Shrinks a failing scenario to a small one that fails the same way
    /// (the same verdict, checker and jobs named): fewer jobs, faults,
    /// agents and users, shorter runs and settle time, times pulled
    /// together. Prints each step; writes the result as it goes, so that a
    /// shrink cut short goes on from there when run again.
    Shrink {
        scenario: PathBuf,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Where the result goes (default: beside the input, NAME.shrunk.toml).
        #[arg(short, long)]
        out: Option<PathBuf>,
        /// At most this many candidate runs.
        #[arg(long, default_value_t = 2_000)]
        max_runs: usize,
        /// At most this long, e.g. 90s, 10m, 1h.
        #[arg(long, default_value = "10m")]
        time: String,
    },
    /// Imports an incident bundle (`foreman incident`) as a scenario: the
    /// topology, workload and fault plan read from its journal, what cannot
    /// be read said in comments. Runs it on seeds 1..=N and keeps the
    /// recorded end states it reproduces as expectations; a job the
    /// simulator ends otherwise, or the outcome checker rejects, is
    /// reported and left to the checkers.
    Import {
        bundle: PathBuf,
        /// The scenario file to write (e.g. scenarios/regressions/NAME.toml).
        #[arg(short, long)]
        out: PathBuf,
        /// How many seeds it is checked on.
        #[arg(long, default_value_t = 5)]
        seeds: u64,
    },
    /// Cancellation-point exploration: drops each path's future at its 1st,
    /// 2nd, … poll and checks nothing leaked.
    Explore {
        /// One path (default: all).
        #[arg(long)]
        path: Option<String>,
        /// Cut at most this many polls into a path that never completes.
        #[arg(long, default_value_t = 60)]
        polls: usize,
    },
    /// Runs every named scenario on seeds 1..=N and writes the matrix
    /// (`scenarios.md`) and a timeline per scenario (`timelines/*.svg`).
    Report {
        #[arg(long, default_value = "scenarios")]
        scenarios: PathBuf,
        #[arg(long, default_value_t = 20)]
        seeds: u64,
        #[arg(long, default_value = "reports")]
        out: PathBuf,
    },
}

pub fn main() -> i32 {
    // A crash is reported with the run's verdict; one line here says where.
    std::panic::set_hook(Box::new(|info| eprintln!("panic: {info}")));
    // Logs of the supervisor and agents, when asked for (FOREMAN_LOG=info).
    if let Ok(filter) = tracing_subscriber::EnvFilter::try_from_env("FOREMAN_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .try_init();
    }
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { USAGE } else { 0 };
        }
    };
    match cli.command {
        Command::Import { bundle, out, seeds } => import_bundle(&bundle, &out, seeds.max(1)),
        Command::Explore { path, polls } => explore(path.as_deref(), polls),
        Command::Report {
            scenarios,
            seeds,
            out,
        } => report(&scenarios, seeds.max(1), &out),
        Command::Run {
            scenarios,
            seed,
            trace,
            twice,
        } => run_scenarios(&scenarios, seed, trace.as_deref(), twice),
        Command::Fuzz {
            seeds,
            time,
            from,
            jobs,
            out,
            seed,
            quiet,
            recheck,
            first_failure,
            no_shrink,
        } => {
            if let Some(seed) = seed {
                return fuzz_one(seed, &out, !no_shrink);
            }
            let time = match time.as_deref().map(parse_duration) {
                Some(Ok(d)) => Some(d),
                Some(Err(e)) => {
                    eprintln!("--time: {e}");
                    return USAGE;
                }
                None => None,
            };
            let jobs =
                jobs.unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()));
            fuzz(
                Campaign {
                    from,
                    seeds,
                    time,
                    jobs: jobs.max(1),
                    recheck,
                    first_failure,
                    shrink: !no_shrink,
                },
                &out,
                quiet,
            )
        }
        Command::Shrink {
            scenario,
            seed,
            out,
            max_runs,
            time,
        } => match parse_duration(&time) {
            Ok(time) => shrink_file(
                &scenario,
                seed,
                out,
                Budget {
                    runs: max_runs,
                    time,
                },
            ),
            Err(e) => {
                eprintln!("--time: {e}");
                USAGE
            }
        },
    }
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    let (number, unit) = text.split_at(
        text.find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len()),
    );
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?}: a number then s, m or h"))?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        _ => return Err(format!("{text:?}: a number then s, m or h")),
    };
    Ok(Duration::from_secs(secs))
}

/// Scenario files named, directories expanded (sorted).
fn scenario_files(paths: &[PathBuf]) -> Result<Vec<PathBuf>, String> {
    let mut files = Vec::new();
    for path in paths {
        if path.is_dir() {
            let mut found: Vec<PathBuf> = std::fs::read_dir(path)
                .map_err(|e| format!("{}: {e}", path.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "toml"))
                .collect();
            found.sort();
            files.extend(found);
        } else {
            files.push(path.clone());
        }
    }
    Ok(files)
}

fn print_result(label: &str, result: &RunResult) {
    println!(
        "{label}: {} (seed {}, {:.1} simulated s in {:.2} s, {}x real time, {} trace entries)",
        result.verdict().as_str(),
        result.seed,
        result.sim_ms as f64 / 1000.0,
        result.wall.as_secs_f64(),
        (result.sim_ms as f64 / 1000.0 / result.wall.as_secs_f64().max(1e-9)) as u64,
        result.trace.len()
    );
    let reached = foreman_sim::rare::reached(&result.trace);
    if !reached.is_empty() {
        let names: Vec<String> = reached.iter().map(|(n, c)| format!("{n} x{c}")).collect();
        println!("  reached: {}", names.join(", "));
    }
    if let Some(crash) = &result.crash {
        println!("  crash: {crash}");
    }
    for v in &result.violations {
        println!("  {v}");
    }
}

/// Every scenario named (directories expanded), each checked before any
/// runs; on an error, it is printed and the exit code returned.
fn load_scenarios(paths: &[PathBuf]) -> Result<Vec<(PathBuf, Scenario)>, i32> {
    let files = scenario_files(paths).map_err(|e| {
        eprintln!("{e}");
        USAGE
    })?;
    files
        .into_iter()
        .map(|file| match Scenario::load(&file) {
            Ok(scenario) => Ok((file, scenario)),
            Err(e) => {
                eprintln!("{e}");
                Err(USAGE)
            }
        })
        .collect()
}

fn run_scenarios(paths: &[PathBuf], seed: u64, trace: Option<&Path>, twice: bool) -> i32 {
    let scenarios = match load_scenarios(paths) {
        Ok(scenarios) => scenarios,
        Err(code) => return code,
    };
    let mut worst = Verdict::Pass;
    for (file, scenario) in &scenarios {
        let result = run(scenario, seed);
        print_result(&scenario.name, &result);
        let mut verdict = result.verdict();
        if twice {
            let again = run(scenario, seed);
            if let Some(diff) = first_divergence(&result.trace, &again.trace, 5) {
                println!("  nondeterministic: {diff}");
                verdict = verdict.worst(Verdict::Nondeterminism);
            } else {
                println!(
                    "  the second run gave the same {} entries",
                    again.trace.len()
                );
            }
        }
        if let Some(path) = trace {
            let target = if scenarios.len() > 1 {
                let _ = std::fs::create_dir_all(path);
                path.join(format!("{}.jsonl", scenario.name))
            } else {
                path.to_path_buf()
            };
            if let Err(e) = std::fs::write(&target, result.trace_jsonl()) {
                eprintln!("{}: {e}", target.display());
                return USAGE;
            }
        }
        if verdict != Verdict::Pass {
            println!(
                "  replay: cargo xtask sim run {} --seed {seed} --trace trace.jsonl",
                file.display()
            );
        }
        worst = worst.worst(verdict);
    }
    worst as i32
}

/// A shrink's bound.
struct Budget {
    runs: usize,
    time: Duration,
}

/// What a fuzz failure's automatic shrink may take, at most.
const FUZZ_SHRINK: Budget = Budget {
    runs: 300,
    time: Duration::from_secs(300),
};

/// Shrinks `scenario`, which failed as `signature` on `seed`, within
/// `budget`, writing each step to `out` as it is kept.
fn shrink_run(
    scenario: &Scenario,
    signature: &Signature,
    seed: u64,
    budget: &Budget,
    out: &Path,
    quiet: bool,
) -> Shrunk {
    #[allow(clippy::disallowed_methods)] // the shrink's wall-clock bound, outside the simulation
    let began = std::time::Instant::now();
    let mut runs = 0;
    let mut oracle = |candidate: &Scenario| {
        if runs >= budget.runs || began.elapsed() >= budget.time {
            return None;
        }
        runs += 1;
        Some(run(candidate, seed).outcome())
    };
    let mut step = |what: &str, current: &Scenario| {
        if !quiet {
            println!("  {what}: {}", size(current));
        }
        write_shrunk(out, current, signature, seed);
    };
    shrink(scenario, signature, &mut oracle, &mut step)
}

fn write_shrunk(out: &Path, scenario: &Scenario, signature: &Signature, seed: u64) {
    let header = format!(
        "# Shrunk on seed {seed}: fails as {signature}.\n# Replay: cargo xtask sim run {} --seed {seed}\n",
        out.display()
    );
    if let Err(e) = std::fs::write(out, format!("{header}{}", scenario.to_toml())) {
        eprintln!("{}: {e}", out.display());
    }
}

fn shrink_file(path: &Path, seed: u64, out: Option<PathBuf>, budget: Budget) -> i32 {
    let scenario = match Scenario::load(path) {
        Ok(scenario) => scenario,
        Err(e) => {
            eprintln!("{e}");
            return USAGE;
        }
    };
    let out = out.unwrap_or_else(|| {
        let stem = path
            .file_stem()
            .map_or("scenario".into(), |s| s.to_string_lossy());
        let stem = stem.strip_suffix(".shrunk").unwrap_or(&stem);
        path.with_file_name(format!("{stem}.shrunk.toml"))
    });
    let first = run(&scenario, seed);
    let Some(signature) = Signature::of(&scenario, &first.outcome()) else {
        eprintln!(
            "{}: passes on seed {seed}; only a failing scenario shrinks",
            path.display()
        );
        return USAGE;
    };
    println!("{}: {} ({})", path.display(), signature, size(&scenario));
    // Where an earlier shrink of it stopped, if that still fails the same way.
    let mut start = scenario.clone();
    if out != path {
        if let Ok(earlier) = Scenario::load(&out) {
            if signature.matches(&earlier, &run(&earlier, seed).outcome()) {
                println!("resuming from {} ({})", out.display(), size(&earlier));
                start = earlier;
            }
        }
    }
    let shrunk = shrink_run(&start, &signature, seed, &budget, &out, false);
    // Written whatever happened: never an earlier, unrelated file left there.
    write_shrunk(&out, &shrunk.scenario, &signature, seed);
    println!(
        "shrunk to {} in {} runs{}; written to {}",
        size(&shrunk.scenario),
        shrunk.runs,
        if shrunk.cut_short {
            " (the budget ran out: run it again to go on)"
        } else {
            ""
        },
        out.display()
    );
    println!(
        "  replay: cargo xtask sim run {} --seed {seed}",
        out.display()
    );
    0
}

fn import_bundle(path: &Path, out: &Path, seeds: u64) -> i32 {
    let file = path.display().to_string();
    let draft = std::fs::File::open(path)
        .map_err(|e| format!("{file}: {e}"))
        .and_then(|f| foreman_sim::import::read(&file, std::io::BufReader::new(f)));
    let mut draft = match draft {
        Ok(draft) => draft,
        Err(e) => {
            eprintln!("{e}");
            return USAGE;
        }
    };
    let name = out
        .file_stem()
        .map_or("imported".into(), |s| s.to_string_lossy().into_owned());
    let out_name = out.display().to_string();
    let parse = |text: &str| Scenario::parse(&out_name, &name, text);
    let scenario = match parse(&draft.to_toml()) {
        Ok(scenario) => scenario,
        Err(e) => {
            let _ = std::fs::write(out, draft.to_toml());
            eprintln!("the imported scenario does not check: {e}\n(written as it is to {out_name}, to be edited)");
            return 1;
        }
    };
    println!(
        "{file}: {} jobs ({} ended), {} agents, {} faults, {} users",
        scenario.jobs.len(),
        draft.recorded.len(),
        scenario.topology.agents,
        scenario.faults.len(),
        scenario.users.len()
    );
    let mut runs = Vec::new();
    for seed in 1..=seeds {
        let result = run(&scenario, seed);
        if let Some(crash) = &result.crash {
            println!("  seed {seed}: crash: {crash}");
        }
        runs.push(foreman_sim::import::SeedRun::of(
            seed,
            &result.trace,
            &result.violations,
        ));
    }
    let judged = draft.judge(&runs);
    judged.lines.iter().for_each(|l| println!("  {l}"));
    println!(
        "reproduced {} of {} ended jobs as recorded on every seed (1-{seeds})",
        judged.reproduced,
        draft.recorded.len()
    );
    if !draft.expect.reached.is_empty() {
        println!("reached on every seed: {}", draft.expect.reached.join(", "));
    }
    let text = draft.to_toml();
    let scenario = match parse(&text) {
        Ok(scenario) => scenario,
        Err(e) => {
            eprintln!("the imported scenario does not check: {e}");
            return 1;
        }
    };
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        let _ = std::fs::create_dir_all(dir);
    }
    let partial = out.with_extension("toml.partial");
    if let Err(e) = std::fs::write(&partial, &text).and_then(|()| std::fs::rename(&partial, out)) {
        eprintln!("{out_name}: {e}");
        return USAGE;
    }
    // How the written scenario fares: a failure here is the incident
    // reproduced (or something the import could not say).
    let mut failing = Vec::new();
    for seed in 1..=seeds {
        let result = run(&scenario, seed);
        if result.verdict() != Verdict::Pass {
            let first = result
                .crash
                .clone()
                .or_else(|| result.violations.first().map(|v| v.to_string()))
                .unwrap_or_default();
            failing.push(format!(
                "seed {seed}: {}: {first}",
                result.verdict().as_str()
            ));
        }
    }
    if failing.is_empty() {
        println!("wrote {out_name}: it passes on seeds 1-{seeds}");
    } else {
        println!(
            "wrote {out_name}: it fails on {} of {seeds} seeds (the incident, reproduced, until it is fixed):",
            failing.len()
        );
        failing.iter().for_each(|f| println!("  {f}"));
    }
    println!("  run: cargo xtask sim run {out_name} --seed 1");
    0
}

/// Saves a failing seed's scenario and trace, the scenario shrunk within
/// `shrink` if given (the original and its trace kept beside it); returns
/// the replay command.
fn save_failure(
    out: &Path,
    result: &RunResult,
    scenario: &Scenario,
    summary: &str,
    shrink: Option<Budget>,
) -> String {
    let dir = out.join(format!("seed-{}", result.seed));
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join("scenario.toml");
    let _ = std::fs::write(&path, scenario.to_toml());
    let _ = std::fs::write(dir.join("trace.jsonl"), result.trace_jsonl());
    let mut report = format!("{summary}\nverdict: {}\n", result.verdict().as_str());
    let signature = Signature::of(scenario, &result.outcome()).filter(|_| shrink.is_some());
    if let (Some(signature), Some(budget)) = (signature, shrink) {
        let _ = std::fs::write(dir.join("original.toml"), scenario.to_toml());
        // The trace is the whole scenario's run, not the shrunk one's.
        let _ = std::fs::rename(dir.join("trace.jsonl"), dir.join("original-trace.jsonl"));
        let shrunk = shrink_run(scenario, &signature, result.seed, &budget, &path, true);
        report.push_str(&format!(
            "shrunk: scenario.toml has {} ({} runs{}); original.toml is the seed's whole scenario, original-trace.jsonl its run\n",
            size(&shrunk.scenario),
            shrunk.runs,
            if shrunk.cut_short { ", cut short" } else { "" }
        ));
    }
    if let Some(crash) = &result.crash {
        report.push_str(&format!("crash: {crash}\n"));
    }
    for v in &result.violations {
        report.push_str(&format!("{v}\n"));
    }
    let _ = std::fs::write(dir.join("verdict.txt"), report);
    format!(
        "cargo xtask sim fuzz --seed {}   (saved in {})",
        result.seed,
        dir.display()
    )
}

fn fuzz_one(seed: u64, out: &Path, shrink: bool) -> i32 {
    let (scenario, summary) = foreman_sim::swarm::scenario(seed);
    println!("{summary}");
    let result = run(&scenario, seed);
    print_result(&scenario.name, &result);
    if result.verdict() != Verdict::Pass {
        println!(
            "  saved: {}",
            save_failure(
                out,
                &result,
                &scenario,
                &summary,
                shrink.then_some(FUZZ_SHRINK)
            )
        );
    }
    result.verdict() as i32
}

struct Campaign {
    from: u64,
    seeds: Option<u64>,
    time: Option<Duration>,
    jobs: usize,
    recheck: u64,
    first_failure: bool,
    shrink: bool,
}

fn fuzz(campaign: Campaign, out: &Path, quiet: bool) -> i32 {
    let Campaign {
        from,
        seeds,
        time,
        jobs,
        recheck,
        first_failure,
        shrink,
    } = campaign;
    let total = seeds.unwrap_or(if time.is_some() { u64::MAX } else { 1_000 });
    let next = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(Mutex::new(Vec::<(u64, Verdict, String)>::new()));
    let done = Arc::new(AtomicU64::new(0));
    let sim_ms = Arc::new(AtomicU64::new(0));
    // Seeds that reached each rare event.
    let reached = Arc::new(Mutex::new(std::collections::BTreeMap::<&str, u64>::new()));
    let bar = if quiet {
        indicatif::ProgressBar::hidden()
    } else if time.is_some() {
        indicatif::ProgressBar::new_spinner()
    } else {
        indicatif::ProgressBar::new(total)
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} seeds {per_sec} {msg}",
        )
        .expect("template"),
    );
    #[allow(clippy::disallowed_methods)] // the campaign's wall clock, outside the simulation
    let began = std::time::Instant::now();
    let workers: Vec<_> = (0..jobs)
        .map(|_| {
            let (next, stop, failures, done, sim_ms, bar, out, reached) = (
                next.clone(),
                stop.clone(),
                failures.clone(),
                done.clone(),
                sim_ms.clone(),
                bar.clone(),
                out.to_path_buf(),
                reached.clone(),
            );
            #[allow(clippy::disallowed_methods)] // worker threads of the campaign
            std::thread::spawn(move || loop {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= total {
                    return;
                }
                if let Some(limit) = time {
                    #[allow(clippy::disallowed_methods)]
                    if began.elapsed() >= limit {
                        stop.store(true, Ordering::Relaxed);
                        return;
                    }
                }
                let seed = from + n;
                let (scenario, summary) = foreman_sim::swarm::scenario(seed);
                let result = run(&scenario, seed);
                sim_ms.fetch_add(result.sim_ms, Ordering::Relaxed);
                {
                    let mut reached = reached.lock().expect("reached");
                    for name in foreman_sim::rare::reached(&result.trace).into_keys() {
                        *reached.entry(name).or_default() += 1;
                    }
                }
                let mut verdict = result.verdict();
                let mut diverged = None;
                if recheck > 0 && seed % recheck == 0 {
                    let again = run(&scenario, seed);
                    diverged = first_divergence(&result.trace, &again.trace, 5);
                    if diverged.is_some() {
                        verdict = verdict.worst(Verdict::Nondeterminism);
                    }
                }
                if verdict != Verdict::Pass {
                    #[allow(clippy::disallowed_methods)] // the campaign's wall clock
                    let found_secs = began.elapsed().as_secs_f64();
                    // A run that did not repeat itself is saved as it is;
                    // a shrink never runs past the campaign's time.
                    let budget = Budget {
                        time: time.map_or(FUZZ_SHRINK.time, |limit| {
                            FUZZ_SHRINK.time.min(limit.saturating_sub(began.elapsed()))
                        }),
                        ..FUZZ_SHRINK
                    };
                    let shrink = (shrink && diverged.is_none()).then_some(budget);
                    let replay = save_failure(&out, &result, &scenario, &summary, shrink);
                    let first = diverged
                        .or_else(|| result.crash.clone())
                        .or_else(|| result.violations.first().map(|v| v.to_string()))
                        .unwrap_or_default();
                    let message = format!(
                        "{summary}\n  {}: {first}\n  replay: {replay}",
                        verdict.as_str()
                    );
                    // A hidden bar prints nothing: a run for its first
                    // failure says it anyway.
                    if first_failure {
                        println!("{message}");
                    } else {
                        bar.println(message);
                    }
                    failures
                        .lock()
                        .expect("failures")
                        .push((seed, verdict, replay));
                    if first_failure {
                        stop.store(true, Ordering::Relaxed);
                        // Said even when quiet: it is what the run is for
                        // (its time is the search's, not the shrink's).
                        println!(
                            "first failure: seed {seed}, after {} seeds in {found_secs:.2} s",
                            done.load(Ordering::Relaxed) + 1
                        );
                    }
                }
                let count = done.fetch_add(1, Ordering::Relaxed) + 1;
                bar.inc(1);
                if quiet && count % 1000 == 0 {
                    println!("{count} seeds");
                }
            })
        })
        .collect();
    for worker in workers {
        let _ = worker.join();
    }
    bar.finish_and_clear();
    let secs = began.elapsed().as_secs_f64();
    let count = done.load(Ordering::Relaxed);
    let failures = failures.lock().expect("failures");
    println!(
        "fuzz: {count} seeds from {from} in {secs:.1} s ({:.0} seeds/s, {:.0}x real time over {jobs} threads), {} failed",
        count as f64 / secs.max(1e-9),
        sim_ms.load(Ordering::Relaxed) as f64 / 1000.0 / secs.max(1e-9),
        failures.len()
    );
    for (seed, verdict, replay) in failures.iter() {
        println!("  seed {seed}: {}; {replay}", verdict.as_str());
    }
    let reached = reached.lock().expect("reached");
    println!("rare events (seeds that reached each, of {count}):");
    for (name, meaning) in foreman_sim::rare::ALL {
        match reached.get(name) {
            Some(n) => println!("  {name:<36} {n:>7}  {meaning}"),
            None => println!("  {name:<36} {:>7}  NEVER REACHED: {meaning}", 0),
        }
    }
    failures.iter().fold(Verdict::Pass, |w, f| w.worst(f.1)) as i32
}

/// Swarm seeds the scenario report counts rare events over.
const SWARM_REPORT_SEEDS: u64 = 1_000;

fn report(dir: &Path, seeds: u64, out: &Path) -> i32 {
    let scenarios = match load_scenarios(&[dir.to_path_buf()]) {
        Ok(scenarios) => scenarios,
        Err(code) => return code,
    };
    let timelines = out.join("timelines");
    if let Err(e) = std::fs::create_dir_all(&timelines) {
        eprintln!("{}: {e}", timelines.display());
        return USAGE;
    }
    let mut rows = Vec::new();
    let mut worst = Verdict::Pass;
    for (_, scenario) in &scenarios {
        let mut row = foreman_sim::report::Row {
            name: scenario.name.clone(),
            description: scenario.description.clone(),
            seeds,
            passed: 0,
            failures: Default::default(),
            sim_ms_mean: 0,
            wall_ms_mean: 0.0,
            reached: Default::default(),
        };
        let (mut sim_ms, mut wall) = (0u64, 0.0f64);
        for seed in 1..=seeds {
            let result = run(scenario, seed);
            sim_ms += result.sim_ms;
            wall += result.wall.as_secs_f64() * 1000.0;
            for name in foreman_sim::rare::reached(&result.trace).into_keys() {
                *row.reached.entry(name).or_default() += 1;
            }
            let verdict = result.verdict();
            worst = worst.worst(verdict);
            if verdict == Verdict::Pass {
                row.passed += 1;
            } else {
                row.failures
                    .entry(verdict.as_str().to_string())
                    .or_default()
                    .push(seed);
            }
            if seed == 1 {
                let svg = foreman_sim::report::timeline(
                    &format!("{} (seed 1)", scenario.name),
                    scenario.topology.agents,
                    scenario.topology.cpus_max(),
                    &result.trace,
                );
                let path = timelines.join(format!("{}.svg", scenario.name));
                if let Err(e) = std::fs::write(&path, svg) {
                    eprintln!("{}: {e}", path.display());
                    return USAGE;
                }
            }
        }
        row.sim_ms_mean = sim_ms / seeds;
        row.wall_ms_mean = wall / seeds as f64;
        println!("{}: {}/{} pass", row.name, row.passed, seeds);
        rows.push(row);
    }
    // The swarm's reach, seed by seed as a fuzz campaign draws them.
    let mut swarm = foreman_sim::report::SwarmReach {
        seeds: SWARM_REPORT_SEEDS,
        reached: Default::default(),
    };
    for seed in 1..=SWARM_REPORT_SEEDS {
        let (scenario, _) = foreman_sim::swarm::scenario(seed);
        let result = run(&scenario, seed);
        worst = worst.worst(result.verdict());
        for name in foreman_sim::rare::reached(&result.trace).into_keys() {
            *swarm.reached.entry(name).or_default() += 1;
        }
    }
    let command = format!("cargo xtask sim report --seeds {seeds}");
    let path = out.join("scenarios.md");
    if let Err(e) = std::fs::write(&path, foreman_sim::report::matrix(&rows, &swarm, &command)) {
        eprintln!("{}: {e}", path.display());
        return USAGE;
    }
    println!("wrote {} and {}", path.display(), timelines.display());
    worst as i32
}

fn explore(only: Option<&str>, polls: usize) -> i32 {
    let paths: Vec<&'static str> = foreman_sim::explore::PATHS
        .into_iter()
        .filter(|p| only.is_none_or(|o| o == *p))
        .collect();
    if paths.is_empty() {
        eprintln!(
            "no such path; the paths are {:?}",
            foreman_sim::explore::PATHS
        );
        return USAGE;
    }
    let mut worst = Verdict::Pass;
    for path in paths {
        let report = foreman_sim::explore::explore(path, polls);
        println!(
            "{path}: cut at polls 1..={}{}; {} finding(s)",
            report.cuts,
            report.completed_at.map_or(
                " (never completed within the bound)".to_string(),
                |p| format!(", completes by itself at poll {p}")
            ),
            report.findings.len()
        );
        for finding in &report.findings {
            println!("  {finding}");
        }
        if !report.findings.is_empty() {
            worst = Verdict::Correctness;
        }
    }
    worst as i32
}
