//! The journal: every input the core was given, with its time, as JSON
//! lines in `<data dir>/journal/`, so that an incident can be replayed
//! through the core exactly (`foreman replay FILE`).
//!
//! Format, one JSON object per line:
//! - `{"at": <ms>, "snapshot": <Snapshot>}`: the core's whole state; the
//!   first line of every segment, so each segment replays on its own;
//! - `{"at": <ms>, "input": <Input>}`: an input, in the order the core took it;
//! - `{"decided": "<digest>"}`: after each input, a digest of what the core
//!   decided on it (`decisions_digest`), so that a replay through other
//!   code can say where it would decide differently (`foreman replay
//!   --check`). Segments of an earlier version have none; they replay all
//!   the same;
//! - `{"at": <ms>, "supervisor": {"event": "started" | "stopped" |
//!   "panicked", "version": ..., "settings": {...}}}`: the supervisor's
//!   starts (after the snapshot of its first input, with its version and
//!   settings) and ends. A supervisor killed writes no end: a start with
//!   no end before it is a crash. Replays skip these lines.
//!
//! The segment being written is `current.jsonl`. Once the inputs written
//! since its snapshot are more than the size bound, and more than the
//! snapshot itself, it is renamed `<n>.jsonl` (n increasing) and a new one
//! begins. So snapshots never cost more bytes than the inputs, whatever the
//! size of the queue: a snapshot larger than the bound is followed by at
//! least as many bytes of inputs before the next. At most `segments_max`
//! old segments are kept, oldest deleted first. A journal
//! that cannot be written is logged and switched off: it never stops the
//! supervisor.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tracing::warn;

use crate::core::{Core, Effect, Input, Millis, Snapshot, ToAgent};

#[derive(Debug, Serialize, Deserialize)]
#[serde(untagged)]
#[allow(clippy::large_enum_variant)] // one line at a time, written at once
pub enum Line {
    Snapshot {
        at: Millis,
        snapshot: Box<Snapshot>,
    },
    Input {
        at: Millis,
        input: Input,
    },
    Decided {
        decided: String,
    },
    Supervisor {
        at: Millis,
        supervisor: SupervisorFact,
    },
}

/// A supervisor's start or end, as the journal records it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SupervisorFact {
    /// `started`, `stopped`, or `panicked`.
    pub event: String,
    pub version: String,
    /// Its settings beyond the scheduler's (whose are in every snapshot).
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub settings: serde_json::Value,
}

/// A digest of what the core decided in one step: SHA-256 of the JSON of
/// its events (what happened to which job, attempt and agent, and why),
/// messages to agents (a run order as its job, attempt and agent, without
/// the spec) and connections closed, the first 16 bytes in hex.
/// Records and replies are left out: they follow from those, and a change
/// in how a record is written alone is not a different decision (and
/// hashing them cost a tenth of the throughput).
pub fn decisions_digest(effects: &[Effect]) -> String {
    use sha2::{Digest, Sha256};
    struct Hashing(Sha256);
    impl Write for Hashing {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.update(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut hashing = Hashing(Sha256::new());
    for effect in effects {
        let written = match effect {
            Effect::Persist { .. } | Effect::Reply { .. } => continue,
            // Which attempt goes where is the decision; the spec is the
            // submitter's (and a bundle redacts its environment).
            Effect::Send {
                agent,
                conn,
                msg: ToAgent::Run { job, attempt, .. },
            } => serde_json::to_writer(
                &mut hashing,
                &serde_json::json!({ "run": job, "attempt": attempt, "agent": agent, "conn": conn }),
            ),
            Effect::Event(_) | Effect::Send { .. } | Effect::Close { .. } => {
                serde_json::to_writer(&mut hashing, effect)
            }
        };
        written.expect("effects serialize");
        hashing.0.update(b"\n");
    }
    hashing.0.finalize()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

pub struct Journal {
    dir: PathBuf,
    writer: Option<BufWriter<File>>,
    /// Bytes in the current segment, and of its snapshot.
    bytes: u64,
    snapshot_bytes: u64,
    segment_bytes_max: u64,
    segments_max: usize,
    /// Set when the next input must be preceded by a snapshot.
    needs_snapshot: bool,
    /// The supervisor's start, written before the first input.
    start: Option<SupervisorFact>,
}

impl Journal {
    /// Opens the journal in `dir`; a segment left by an earlier run is
    /// moved aside first (it replays on its own, from its own snapshot).
    pub fn open(
        dir: &Path,
        segment_bytes_max: u64,
        segments_max: usize,
    ) -> std::io::Result<Journal> {
        // It holds every input, submitted environments included.
        crate::agent::runner::create_dir_with_mode(dir, 0o700)?;
        let mut journal = Journal {
            dir: dir.to_path_buf(),
            writer: None,
            bytes: 0,
            snapshot_bytes: 0,
            segment_bytes_max,
            segments_max,
            needs_snapshot: true,
            start: None,
        };
        journal.rotate()?;
        Ok(journal)
    }

    pub fn current(&self) -> PathBuf {
        self.dir.join("current.jsonl")
    }

    fn segments(&self) -> Vec<(u64, PathBuf)> {
        let mut found: Vec<(u64, PathBuf)> = std::fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().to_string();
                let n = name.strip_suffix(".jsonl")?.parse::<u64>().ok()?;
                Some((n, e.path()))
            })
            .collect();
        found.sort();
        found
    }

    /// Moves the current segment aside, drops the oldest beyond the bound,
    /// and starts a new one.
    fn rotate(&mut self) -> std::io::Result<()> {
        if let Some(mut writer) = self.writer.take() {
            writer.flush()?;
        }
        let current = self.current();
        let segments = self.segments();
        // A segment with nothing in it (a supervisor that stopped before its
        // first input) is reused, not kept: kept, it would replay to nothing
        // and, in a crash loop, push every real segment past the bound.
        if std::fs::metadata(&current).is_ok_and(|m| m.len() > 0) {
            let next = segments.last().map_or(1, |(n, _)| n + 1);
            std::fs::rename(&current, self.dir.join(format!("{next:08}.jsonl")))?;
        }
        let segments = self.segments();
        for (_, path) in segments
            .iter()
            .take(segments.len().saturating_sub(self.segments_max))
        {
            let _ = std::fs::remove_file(path);
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&current)?;
        self.writer = Some(BufWriter::new(file));
        self.bytes = 0;
        self.snapshot_bytes = 0;
        self.needs_snapshot = true;
        Ok(())
    }

    /// Records `input`, about to be handled at `now` by `core`.
    pub fn record(&mut self, now: Millis, input: &Input, core: &Core) {
        if self.writer.is_none() {
            return;
        }
        if let Err(e) = self.write(now, input, core) {
            warn!(error = %e, "journal cannot be written; journaling is off");
            self.writer = None;
        }
    }

    fn write(&mut self, now: Millis, input: &Input, core: &Core) -> std::io::Result<()> {
        let inputs = self.bytes - self.snapshot_bytes;
        if inputs > self.segment_bytes_max.max(self.snapshot_bytes) {
            self.rotate()?;
        }
        let writer = self.writer.as_mut().expect("journal open");
        if self.needs_snapshot {
            let line = serde_json::to_string(&Line::Snapshot {
                at: now,
                snapshot: Box::new(core.snapshot()),
            })?;
            writer.write_all(line.as_bytes())?;
            writer.write_all(b"\n")?;
            self.bytes += line.len() as u64 + 1;
            self.snapshot_bytes = self.bytes;
            self.needs_snapshot = false;
        }
        if let Some(start) = self.start.take() {
            let line = serde_json::to_string(&Line::Supervisor {
                at: now,
                supervisor: start,
            })?;
            writer.write_all(line.as_bytes())?;
            writer.write_all(b"\n")?;
            self.bytes += line.len() as u64 + 1;
        }
        let line = serde_json::to_string(&Line::Input {
            at: now,
            input: input.clone(),
        })?;
        writer.write_all(line.as_bytes())?;
        writer.write_all(b"\n")?;
        self.bytes += line.len() as u64 + 1;
        Ok(())
    }

    /// Notes the supervisor's start, with its settings: written before its
    /// first input (a supervisor that stops before any leaves no trace).
    pub fn started(&mut self, settings: serde_json::Value) {
        self.start = Some(SupervisorFact {
            event: "started".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            settings,
        });
    }

    /// Records the digest of what the core decided on the input just
    /// recorded.
    pub fn decided(&mut self, effects: &[Effect]) {
        let Some(writer) = &mut self.writer else {
            return;
        };
        let line = format!("{{\"decided\":\"{}\"}}\n", decisions_digest(effects));
        match writer.write_all(line.as_bytes()) {
            Ok(()) => self.bytes += line.len() as u64,
            Err(e) => {
                warn!(error = %e, "journal cannot be written; journaling is off");
                self.writer = None;
            }
        }
    }

    /// Hands what is buffered to the operating system.
    pub fn flush(&mut self) {
        if let Some(writer) = &mut self.writer {
            if let Err(e) = writer.flush() {
                warn!(error = %e, "journal cannot be written; journaling is off");
                self.writer = None;
            }
        }
    }
}

/// A supervisor's end, in the segment it last wrote to; the same `at` as
/// its last input or later.
impl Drop for Journal {
    fn drop(&mut self) {
        if self.writer.is_none() || self.bytes == 0 {
            // Off, or nothing recorded in this segment (a supervisor that
            // stopped before its first input leaves no trace).
            return;
        }
        let event = if std::thread::panicking() {
            "panicked"
        } else {
            "stopped"
        };
        let line = serde_json::to_string(&Line::Supervisor {
            at: crate::seam::now(),
            supervisor: SupervisorFact {
                event: event.into(),
                version: env!("CARGO_PKG_VERSION").into(),
                settings: serde_json::Value::Null,
            },
        })
        .expect("serializes");
        if let Some(writer) = &mut self.writer {
            let _ = writer.write_all(format!("{line}\n").as_bytes());
            let _ = writer.flush();
        }
    }
}

/// One step of a replay: an input as the journal holds it, the effects the
/// core decides on it today, and the digest of what the core that wrote
/// the journal decided (`None` in a segment of an earlier version).
pub struct Step {
    /// The step's line in the segment.
    pub line: usize,
    pub at: Millis,
    pub input: Input,
    pub effects: Vec<Effect>,
    pub recorded: Option<String>,
}

/// Replays one journal segment through a fresh core: the snapshot, then
/// every input. Calls `each` with every step. An error names the line that
/// could not be used.
pub fn replay(path: &Path, each: impl FnMut(Step)) -> Result<Core, String> {
    let file = File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    replay_from(
        &path.display().to_string(),
        std::io::BufReader::new(file),
        each,
    )
}

/// Replays a segment read from `lines` (named `name` in errors).
pub fn replay_from(
    name: &str,
    lines: impl std::io::BufRead,
    mut each: impl FnMut(Step),
) -> Result<Core, String> {
    let mut core: Option<Core> = None;
    // The last input's step, until its digest (or the next input) is read.
    let mut step: Option<Step> = None;
    for (n, line) in lines.lines().enumerate() {
        let at_line = |e: &dyn std::fmt::Display| format!("{name}:{}: {e}", n + 1);
        let line = line.map_err(|e| at_line(&e))?;
        if line.trim().is_empty() {
            continue;
        }
        let parsed: Line = serde_json::from_str(&line).map_err(|e| at_line(&e))?;
        match parsed {
            Line::Snapshot { snapshot, .. } => {
                if core.is_some() {
                    return Err(at_line(&"a second snapshot in one segment"));
                }
                core = Some(Core::from_snapshot(*snapshot).map_err(|e| at_line(&e))?);
            }
            Line::Input { at, input } => {
                let core = core
                    .as_mut()
                    .ok_or_else(|| at_line(&"an input before the snapshot"))?;
                if let Some(done) = step.take() {
                    each(done);
                }
                let effects = core.handle(at, input.clone()).collect();
                step = Some(Step {
                    line: n + 1,
                    at,
                    input,
                    effects,
                    recorded: None,
                });
            }
            Line::Supervisor { .. } => {}
            Line::Decided { decided } => match step.as_mut() {
                Some(step) if step.recorded.is_none() => step.recorded = Some(decided),
                _ => return Err(at_line(&"a digest with no input before it")),
            },
        }
    }
    if let Some(done) = step.take() {
        each(done);
    }
    core.ok_or_else(|| format!("{name}: no snapshot"))
}

/// Where a replay through today's core first decides otherwise than the
/// core that wrote the segment.
#[derive(Debug)]
pub struct Divergence {
    /// The step's line in the segment, its time, and both digests.
    pub line: usize,
    pub at: Millis,
    pub recorded: String,
    pub today: String,
    /// What today's core decides there.
    pub effects: Vec<Effect>,
    /// The inputs around it (line, time, input): up to `around` before,
    /// the step's own, up to `around` after.
    pub inputs: Vec<(usize, Millis, Input)>,
}

/// A segment replayed against the decisions it recorded.
#[derive(Debug, Default)]
pub struct Check {
    pub steps: usize,
    /// Steps with no recorded digest (an earlier version's segment).
    pub unrecorded: usize,
    /// Steps whose decisions differ (after the first, the cores' states
    /// may differ too: only the first says much).
    pub differing: usize,
    pub first: Option<Divergence>,
}

/// Replays a segment read from `lines` (named `name` in errors) through
/// today's core and compares every step's decisions with the digest
/// recorded when it was written.
pub fn check_from(
    name: &str,
    lines: impl std::io::BufRead,
    around: usize,
) -> Result<Check, String> {
    let mut check = Check::default();
    let mut before: std::collections::VecDeque<(usize, Millis, Input)> = Default::default();
    let mut after = 0;
    replay_from(name, lines, |step| {
        check.steps += 1;
        let today = decisions_digest(&step.effects);
        let entry = (step.line, step.at, step.input);
        match step.recorded {
            None => check.unrecorded += 1,
            Some(recorded) if recorded != today => {
                check.differing += 1;
                if check.first.is_none() {
                    let mut inputs: Vec<_> = before.drain(..).collect();
                    inputs.push(entry.clone());
                    check.first = Some(Divergence {
                        line: step.line,
                        at: step.at,
                        recorded,
                        today,
                        effects: step.effects,
                        inputs,
                    });
                    after = around;
                    return;
                }
            }
            Some(_) => {}
        }
        if after > 0 {
            after -= 1;
            if let Some(first) = &mut check.first {
                first.inputs.push(entry);
            }
        } else if check.first.is_none() && around > 0 {
            if before.len() == around {
                before.pop_front();
            }
            before.push_back(entry);
        }
    })?;
    Ok(check)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::{CoreConfig, RequestId, SubmitSpec};

    fn submit(request: u64) -> Input {
        Input::Submit {
            request: RequestId(request),
            user: "ana".into(),
            plan: "basic".into(),
            spec: SubmitSpec::command(["echo", "hi"]),
        }
    }

    fn check(path: &Path, around: usize) -> Result<Check, String> {
        let file = File::open(path).unwrap();
        check_from("segment", std::io::BufReader::new(file), around)
    }

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn journal_records_rotates_and_replays_each_segment_on_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let mut journal = Journal::open(dir.path(), 2_000, 2).unwrap();
        let mut core = Core::new(CoreConfig::default());
        for i in 0..40u64 {
            let input = submit(i);
            journal.record(Millis(1_000 + i), &input, &core);
            core.handle(Millis(1_000 + i), input).for_each(drop);
        }
        journal.flush();
        let segments = journal.segments();
        assert_eq!(
            segments.len(),
            2,
            "old segments beyond the bound are deleted"
        );
        // The newest segment replays to exactly the live core's state.
        let replayed = replay(&journal.current(), |_| {}).unwrap();
        assert_eq!(replayed.snapshot(), core.snapshot());
        for (_, path) in segments {
            assert!(
                replay(&path, |_| {}).is_ok(),
                "{} replays on its own",
                path.display()
            );
        }
    }

    #[test]
    fn journal_records_each_steps_decisions_and_a_check_finds_the_first_that_differs() {
        let dir = tempfile::tempdir().unwrap();
        let mut journal = Journal::open(dir.path(), 1_000_000, 2).unwrap();
        let mut core = Core::new(CoreConfig::default());
        for i in 0..10u64 {
            let input = submit(i);
            journal.record(Millis(1_000 + i), &input, &core);
            let effects: Vec<Effect> = core.handle(Millis(1_000 + i), input).collect();
            journal.decided(&effects);
        }
        journal.flush();
        let path = journal.current();
        let clean = check(&path, 2).unwrap();
        assert_eq!((clean.steps, clean.unrecorded, clean.differing), (10, 0, 0));
        assert!(clean.first.is_none());
        // The 6th step's recorded decisions are not what this core decides
        // (as if the code that wrote it decided otherwise).
        let text = std::fs::read_to_string(&path).unwrap();
        let mut lines: Vec<String> = text.lines().map(String::from).collect();
        // Line 1 is the snapshot; each step is an input line and a digest.
        let digest_line = 1 + 2 * 5 + 1;
        assert!(lines[digest_line].starts_with("{\"decided\":\""));
        lines[digest_line] = format!("{{\"decided\":\"{}\"}}", "0".repeat(32));
        std::fs::write(&path, lines.join("\n") + "\n").unwrap();
        let found = check(&path, 2).unwrap();
        assert_eq!(found.differing, 1);
        let first = found.first.expect("a divergence");
        assert_eq!(first.line, digest_line, "the input's line (1-based)");
        assert_eq!(first.at, Millis(1_005));
        assert_eq!(first.recorded, "0".repeat(32));
        assert_eq!(first.today, decisions_digest(&first.effects));
        let around: Vec<u64> = first.inputs.iter().map(|(_, at, _)| at.0).collect();
        assert_eq!(around, [1_003, 1_004, 1_005, 1_006, 1_007]);
        // A segment of an earlier version records nothing to compare.
        let old: Vec<&String> = lines
            .iter()
            .filter(|l| !l.contains("\"decided\""))
            .collect();
        let old_path = dir.path().join("old.jsonl");
        let old_text: String = old.iter().map(|l| format!("{l}\n")).collect();
        std::fs::write(&old_path, old_text).unwrap();
        let unrecorded = check(&old_path, 2).unwrap();
        assert_eq!((unrecorded.steps, unrecorded.unrecorded), (10, 10));
        // A digest with no input before it is an error naming its line.
        std::fs::write(&old_path, format!("{}\n{{\"decided\":\"00\"}}\n", lines[0])).unwrap();
        let err = check(&old_path, 2).unwrap_err();
        assert!(
            err.ends_with(":2: a digest with no input before it"),
            "{err}"
        );
    }

    /// The time of a segment's first line (its snapshot).
    fn first_at(path: &Path) -> u64 {
        let text = std::fs::read_to_string(path).unwrap();
        match serde_json::from_str(text.lines().next().expect("a first line")).unwrap() {
            Line::Snapshot { at, .. } | Line::Input { at, .. } => at.0,
            Line::Decided { .. } | Line::Supervisor { .. } => {
                panic!("a segment starts with its snapshot")
            }
        }
    }

    #[test]
    fn journal_segments_are_numbered_in_order_and_bounded_to_the_byte() {
        let core = Core::new(CoreConfig::default());
        let (snapshot, tick) = {
            let dir = tempfile::tempdir().unwrap();
            let mut journal = Journal::open(dir.path(), 1_000_000, 1).unwrap();
            journal.record(Millis(1_000_000), &Input::Tick, &core);
            (
                journal.snapshot_bytes,
                journal.bytes - journal.snapshot_bytes,
            )
        };
        // Times of one width, so that every line of a kind has one size.
        for bound in [snapshot / 2, snapshot, 3 * snapshot, 3 * snapshot + 1] {
            let dir = tempfile::tempdir().unwrap();
            let mut journal = Journal::open(dir.path(), bound, 100).unwrap();
            let limit = bound.max(snapshot);
            // Its count of bytes is the file's, after every input.
            for i in 0..(5 * limit / tick) {
                journal.record(Millis(1_000_000 + i), &Input::Tick, &core);
                journal.flush();
                let on_disk = std::fs::metadata(journal.current()).unwrap().len();
                assert_eq!(journal.bytes, on_disk, "after input {i}");
            }
            // Rotated segments are numbered in the order they were written,
            // and hold the fewest inputs that are more than the limit: the
            // bound, or the snapshot if larger.
            let segments = journal.segments();
            assert!(segments.len() >= 3, "{segments:?}");
            let starts: Vec<u64> = segments.iter().map(|(_, p)| first_at(p)).collect();
            assert!(starts.windows(2).all(|w| w[0] < w[1]), "{starts:?}");
            assert!(first_at(&journal.current()) > *starts.last().unwrap());
            let inputs = (limit / tick + 1) * tick;
            for (_, path) in &segments {
                let len = std::fs::metadata(path).unwrap().len();
                assert_eq!(len, snapshot + inputs, "bound {bound}: {}", path.display());
            }
        }
    }

    #[test]
    fn journal_a_queue_larger_than_a_segment_is_snapshot_once_per_segment_not_per_input() {
        // A queue whose snapshot is ten times the segment bound.
        let mut core = Core::new(CoreConfig::default());
        for i in 0..300u64 {
            let input = Input::Submit {
                request: RequestId(i),
                user: "ana".into(),
                plan: "premium".into(),
                spec: SubmitSpec::command(["echo", "a queued job"]),
            };
            core.handle(Millis(i), input).for_each(drop);
        }
        let snapshot = serde_json::to_string(&core.snapshot()).unwrap().len() as u64;
        let bound = snapshot / 10;
        let dir = tempfile::tempdir().unwrap();
        let mut journal = Journal::open(dir.path(), bound, 1_000).unwrap();
        let mut input_bytes = 0;
        for i in 0..5_000u64 {
            let input = Input::Tick;
            input_bytes += serde_json::to_string(&Line::Input {
                at: Millis(1_000 + i),
                input: input.clone(),
            })
            .unwrap()
            .len() as u64
                + 1;
            journal.record(Millis(1_000 + i), &input, &core);
            core.handle(Millis(1_000 + i), input).for_each(drop);
        }
        journal.flush();
        let written: u64 = journal
            .segments()
            .iter()
            .map(|(_, p)| p.clone())
            .chain([journal.current()])
            .map(|p| std::fs::metadata(p).unwrap().len())
            .sum();
        let segments = journal.segments().len() as u64 + 1;
        // One snapshot per segment, and each segment holds at least as many
        // bytes of inputs as its snapshot (the last may be partly written).
        assert!(segments >= 2, "it rotated: {segments}");
        assert!(
            written <= 2 * input_bytes + snapshot + 1_000,
            "{written} bytes written for {input_bytes} bytes of inputs with snapshots of {snapshot}"
        );
        for (_, path) in journal.segments() {
            let text = std::fs::read_to_string(&path).unwrap();
            let snapshots = text.lines().filter(|l| l.contains("\"snapshot\"")).count();
            assert_eq!(snapshots, 1, "{}", path.display());
            let first = text.lines().next().unwrap().len() as u64;
            assert!(
                text.len() as u64 - first > snapshot.max(bound),
                "{}",
                path.display()
            );
        }
    }

    #[test]
    fn journal_a_crash_loop_keeps_the_history_and_leaves_no_empty_segment() {
        let dir = tempfile::tempdir().unwrap();
        let core = Core::new(CoreConfig::default());
        let mut journal = Journal::open(dir.path(), 1_000_000, 2).unwrap();
        journal.record(Millis(5), &Input::Tick, &core);
        journal.flush();
        drop(journal);
        // Five starts that each die before their first input.
        for _ in 0..5 {
            drop(Journal::open(dir.path(), 1_000_000, 2).unwrap());
        }
        let journal = Journal::open(dir.path(), 1_000_000, 2).unwrap();
        let segments = journal.segments();
        assert_eq!(segments.len(), 1, "{segments:?}");
        let mut inputs = 0;
        replay(&segments[0].1, |_| inputs += 1).expect("the history replays");
        assert_eq!(inputs, 1);
    }

    #[test]
    fn journal_a_damaged_file_is_an_error_naming_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let snapshot = serde_json::to_string(&Line::Snapshot {
            at: Millis(1),
            snapshot: Box::new(Core::new(CoreConfig::default()).snapshot()),
        })
        .unwrap();
        let tick = r#"{"at":2,"input":{"input":"tick"}}"#;
        let cases = [
            (
                "garbage.jsonl",
                format!("{snapshot}\n{{not json\n"),
                "garbage.jsonl:2",
            ),
            (
                "early.jsonl",
                format!("{tick}\n{snapshot}\n"),
                "an input before the snapshot",
            ),
            (
                "twice.jsonl",
                format!("{snapshot}\n{snapshot}\n"),
                "a second snapshot",
            ),
            ("empty.jsonl", String::new(), "no snapshot"),
            (
                "unknown.jsonl",
                format!("{snapshot}\n{{\"at\":3,\"input\":{{\"input\":\"explode\"}}}}\n"),
                "unknown.jsonl:2",
            ),
        ];
        for (name, text, expected) in cases {
            let err = replay(&write(dir.path(), name, &text), |_| {})
                .err()
                .expect("refused");
            assert!(err.contains(expected), "{name}: {err}");
        }
        let fine = write(dir.path(), "fine.jsonl", &format!("{snapshot}\n{tick}\n\n"));
        assert!(replay(&fine, |_| {}).is_ok());
    }
}
