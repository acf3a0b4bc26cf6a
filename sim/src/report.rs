//! Reports a person reads at a glance: the scenario matrix (markdown) and a
//! timeline per scenario (SVG): the jobs on each agent over simulated time,
//! CPU slots in use, faults marked.

use std::collections::BTreeMap;
use std::fmt::Write;

use crate::trace::{Entry, Ev, ProcessEnd};

/// One scenario's row of the matrix.
pub struct Row {
    pub name: String,
    pub description: String,
    pub seeds: u64,
    pub passed: u64,
    /// Verdicts other than pass, with the seeds that gave them.
    pub failures: BTreeMap<String, Vec<u64>>,
    pub sim_ms_mean: u64,
    pub wall_ms_mean: f64,
    /// Rare events, with how many of its seeds reached each.
    pub reached: BTreeMap<&'static str, u64>,
}

/// How many of a swarm campaign's seeds reached each rare event.
pub struct SwarmReach {
    pub seeds: u64,
    pub reached: BTreeMap<&'static str, u64>,
}

pub fn matrix(rows: &[Row], swarm: &SwarmReach, command: &str) -> String {
    let mut out = String::from("# Scenarios\n\n");
    let _ = writeln!(
        out,
        "Every named scenario in `scenarios/`, run on consecutive seeds in the \
         simulation build, release mode. Written by `{command}`; the timelines \
         are in `reports/timelines/` (seed 1).\n"
    );
    out.push_str(
        "| scenario | seeds | outcome | rare events reached (seeds) | simulated time (mean) | wall time per run (mean) | timeline |\n\
         |---|---|---|---|---|---|---|\n",
    );
    for row in rows {
        let outcome = if row.failures.is_empty() {
            format!("all {} pass", row.passed)
        } else {
            let failed: Vec<String> = row
                .failures
                .iter()
                .map(|(verdict, seeds)| format!("{verdict}: seeds {seeds:?}"))
                .collect();
            format!("{} pass; {}", row.passed, failed.join("; "))
        };
        let reached: Vec<String> = row
            .reached
            .iter()
            .map(|(name, n)| format!("{name} {n}"))
            .collect();
        let _ = writeln!(
            out,
            "| `{}` | {} | {} | {} | {:.1} s | {:.1} ms | [svg](timelines/{}.svg) |",
            row.name,
            row.seeds,
            outcome,
            reached.join(", "),
            row.sim_ms_mean as f64 / 1000.0,
            row.wall_ms_mean,
            row.name
        );
    }
    let _ = writeln!(
        out,
        "\n## Rare events in the swarm\n\nSwarm seeds 1 to {} (as `cargo xtask fuzz` draws them), and how many \
         reached each rare event (`sim/src/rare.rs`). One never reached is flagged: \
         no seed of the campaign tested it.\n\n| rare event | seeds | what it is |\n|---|---|---|",
        swarm.seeds
    );
    for (name, meaning) in crate::rare::ALL {
        match swarm.reached.get(name) {
            Some(n) => {
                let _ = writeln!(out, "| `{name}` | {n} | {meaning} |");
            }
            None => {
                let _ = writeln!(out, "| `{name}` | **never** | {meaning} |");
            }
        }
    }
    out.push_str("\n## What each scenario does\n\n");
    for row in rows {
        let text = row
            .description
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        let _ = writeln!(out, "- **{}**: {}", row.name, text);
    }
    out
}

struct Bar {
    job: u64,
    attempt: u32,
    from: u64,
    to: Option<u64>,
    end: Option<ProcessEnd>,
}

const LANE: f64 = 28.0;
const LEFT: f64 = 90.0;
const WIDTH: f64 = 1100.0;
const TOP: f64 = 76.0;
const OCCUPANCY: f64 = 80.0;

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The timeline of one run as an SVG document.
pub fn timeline(title: &str, agents: usize, cpus: u32, trace: &[Entry]) -> String {
    let end = trace.iter().map(|e| e.at).max().unwrap_or(0).max(1);
    let x = |at: u64| LEFT + (at as f64 / end as f64) * (WIDTH - LEFT - 20.0);
    let mut lanes: BTreeMap<String, Vec<Bar>> = (0..agents)
        .map(|i| (format!("agent-{i}"), Vec::new()))
        .collect();
    let mut frozen: BTreeMap<String, Vec<(u64, Option<u64>)>> = BTreeMap::new();
    let mut faults: Vec<(u64, String)> = Vec::new();
    // CPUs in use over time, from the processes.
    let mut steps: Vec<(u64, i64)> = Vec::new();
    let mut cpus_of: BTreeMap<(u64, u32, String), u32> = BTreeMap::new();
    for e in trace {
        match &e.ev {
            Ev::ProcessStarted {
                job,
                attempt,
                agent,
                cpus,
            } => {
                lanes.entry(agent.clone()).or_default().push(Bar {
                    job: *job,
                    attempt: *attempt,
                    from: e.at,
                    to: None,
                    end: None,
                });
                cpus_of.insert((*job, *attempt, agent.clone()), *cpus);
                steps.push((e.at, i64::from(*cpus)));
            }
            Ev::ProcessEnded {
                job,
                attempt,
                agent,
                end,
            } => {
                if let Some(bar) = lanes.get_mut(agent).and_then(|bars| {
                    bars.iter_mut()
                        .rev()
                        .find(|b| b.job == *job && b.attempt == *attempt && b.to.is_none())
                }) {
                    bar.to = Some(e.at);
                    bar.end = Some(*end);
                }
                if let Some(c) = cpus_of.remove(&(*job, *attempt, agent.clone())) {
                    steps.push((e.at, -i64::from(c)));
                }
            }
            Ev::Frozen { agent } => frozen.entry(agent.clone()).or_default().push((e.at, None)),
            Ev::Thawed { agent } => {
                if let Some(last) = frozen.get_mut(agent).and_then(|v| v.last_mut()) {
                    last.1 = Some(e.at);
                }
            }
            Ev::Fault { what, .. } => faults.push((e.at, what.clone())),
            _ => {}
        }
    }
    let lanes_h = LANE * lanes.len() as f64;
    let height = TOP + lanes_h + 30.0 + OCCUPANCY + 40.0;
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        svg,
        r#"<text x="10" y="20" font-size="14" font-weight="bold">{}</text>"#,
        escape(title)
    );
    let _ = writeln!(
        svg,
        r##"<text x="10" y="38" fill="#555">jobs per agent over simulated time ({:.1} s); green exited, orange crashed, red killed, grey vanished with its node; blue shade: node frozen; dashed: faults</text>"##,
        end as f64 / 1000.0
    );
    for (i, (agent, bars)) in lanes.iter().enumerate() {
        let y = TOP + LANE * i as f64;
        let _ = writeln!(
            svg,
            r##"<text x="10" y="{:.1}">{}</text><line x1="{LEFT}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="#ddd"/>"##,
            y + LANE * 0.6,
            escape(agent),
            y + LANE,
            WIDTH - 20.0,
            y + LANE
        );
        // Overlapping runs (several CPUs) stack inside the lane.
        let mut rows_end: Vec<u64> = Vec::new();
        for bar in bars {
            let to = bar.to.unwrap_or(end);
            let row = rows_end
                .iter()
                .position(|e| *e <= bar.from)
                .unwrap_or(rows_end.len());
            if row == rows_end.len() {
                rows_end.push(to);
            } else {
                rows_end[row] = to;
            }
            let stack = (cpus.max(1) as f64).min(4.0);
            let h = (LANE - 4.0) / stack;
            let by = y + 2.0 + h * (row as f64 % stack);
            let color = match bar.end {
                Some(ProcessEnd::Exited) => "#4caf50",
                Some(ProcessEnd::Crashed) => "#ff9800",
                Some(ProcessEnd::Killed) => "#e53935",
                Some(ProcessEnd::Vanished) => "#9e9e9e",
                None => "#81c784",
            };
            let _ = writeln!(
                svg,
                r#"<rect x="{:.1}" y="{by:.1}" width="{:.1}" height="{:.1}" fill="{color}" stroke="white" stroke-width="0.5"><title>job {} attempt {}: {} to {} ms{}</title></rect>"#,
                x(bar.from),
                (x(to) - x(bar.from)).max(1.0),
                h - 1.0,
                bar.job,
                bar.attempt,
                bar.from,
                to,
                bar.end
                    .map_or(", still running".to_string(), |e| format!(", {e:?}"))
            );
            if x(to) - x(bar.from) > 28.0 {
                let _ = writeln!(
                    svg,
                    r#"<text x="{:.1}" y="{:.1}" fill="white" font-size="9">{}/{}</text>"#,
                    x(bar.from) + 2.0,
                    by + h - 3.0,
                    bar.job,
                    bar.attempt
                );
            }
        }
    }
    // Frozen spans, over the bars.
    for (i, agent) in lanes.keys().enumerate() {
        let y = TOP + LANE * i as f64;
        for (from, to) in frozen.get(agent).into_iter().flatten() {
            let _ = writeln!(
                svg,
                r##"<rect x="{:.1}" y="{y:.1}" width="{:.1}" height="{LANE}" fill="#1e88e5" opacity="0.3"/>"##,
                x(*from),
                (x(to.unwrap_or(end)) - x(*from)).max(1.0)
            );
        }
    }
    // Slot occupancy.
    let oy = TOP + lanes_h + 30.0;
    let total = (agents as u32 * cpus).max(1);
    let _ = writeln!(
        svg,
        r##"<text x="10" y="{:.1}">CPUs in use</text><text x="10" y="{:.1}" fill="#555">of {total}</text><rect x="{LEFT}" y="{oy:.1}" width="{:.1}" height="{OCCUPANCY}" fill="none" stroke="#ddd"/>"##,
        oy + 14.0,
        oy + 28.0,
        WIDTH - 20.0 - LEFT
    );
    steps.sort();
    let mut used: i64 = 0;
    let mut points = format!("{LEFT:.1},{:.1}", oy + OCCUPANCY);
    for (at, delta) in steps {
        let y_before = oy + OCCUPANCY * (1.0 - used as f64 / f64::from(total));
        used += delta;
        let y_after = oy + OCCUPANCY * (1.0 - used as f64 / f64::from(total));
        let _ = write!(
            points,
            " {:.1},{y_before:.1} {:.1},{y_after:.1}",
            x(at),
            x(at)
        );
    }
    let _ = write!(
        points,
        " {:.1},{:.1}",
        x(end),
        oy + OCCUPANCY * (1.0 - used as f64 / f64::from(total))
    );
    let _ = writeln!(
        svg,
        r##"<polyline points="{points}" fill="none" stroke="#1565c0" stroke-width="1.5"/>"##
    );
    // Faults.
    for (i, (at, what)) in faults.iter().enumerate() {
        let fx = x(*at);
        let _ = writeln!(
            svg,
            r##"<line x1="{fx:.1}" y1="{:.1}" x2="{fx:.1}" y2="{:.1}" stroke="#6a1b9a" stroke-dasharray="4,3"><title>{} ms: {}</title></line><text x="{:.1}" y="{:.1}" fill="#6a1b9a" font-size="9">{}</text>"##,
            TOP - 8.0,
            oy + OCCUPANCY,
            at,
            escape(what),
            fx + 2.0,
            TOP - 10.0 - 9.0 * (i % 2) as f64,
            escape(&what.chars().take(24).collect::<String>())
        );
    }
    svg.push_str("</svg>\n");
    svg
}
