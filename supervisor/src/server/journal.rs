//! The journal: every input the core was given, with its time, as JSON
//! lines in `<data dir>/journal/`, so that an incident can be replayed
//! through the core exactly (`foreman replay FILE`).
//!
//! Format, one JSON object per line:
//! - `{"at": <ms>, "snapshot": <Snapshot>}`: the core's whole state; the
//!   first line of every segment, so each segment replays on its own;
//! - `{"at": <ms>, "input": <Input>}`: an input, in the order the core took it.
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

use crate::core::{Core, Input, Millis, Snapshot};

#[derive(Debug, Serialize, Deserialize)]
#[serde(untagged)]
#[allow(clippy::large_enum_variant)] // one line at a time, written at once
pub enum Line {
    Snapshot { at: Millis, snapshot: Box<Snapshot> },
    Input { at: Millis, input: Input },
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
        let line = serde_json::to_string(&Line::Input {
            at: now,
            input: input.clone(),
        })?;
        writer.write_all(line.as_bytes())?;
        writer.write_all(b"\n")?;
        self.bytes += line.len() as u64 + 1;
        Ok(())
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

/// Replays one journal segment through a fresh core: the snapshot, then
/// every input. Calls `each` with every input's effects. An error names the
/// line that could not be used.
pub fn replay(
    path: &Path,
    mut each: impl FnMut(Millis, &Input, Vec<crate::core::Effect>),
) -> Result<Core, String> {
    use std::io::BufRead;
    let file = File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut core: Option<Core> = None;
    for (n, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.map_err(|e| format!("{}:{}: {e}", path.display(), n + 1))?;
        if line.trim().is_empty() {
            continue;
        }
        let parsed: Line = serde_json::from_str(&line)
            .map_err(|e| format!("{}:{}: {e}", path.display(), n + 1))?;
        match parsed {
            Line::Snapshot { snapshot, .. } => {
                if core.is_some() {
                    return Err(format!(
                        "{}:{}: a second snapshot in one segment",
                        path.display(),
                        n + 1
                    ));
                }
                core = Some(
                    Core::from_snapshot(*snapshot)
                        .map_err(|e| format!("{}:{}: {e}", path.display(), n + 1))?,
                );
            }
            Line::Input { at, input } => {
                let core = core.as_mut().ok_or_else(|| {
                    format!("{}:{}: an input before the snapshot", path.display(), n + 1)
                })?;
                let effects = core.handle(at, input.clone()).collect();
                each(at, &input, effects);
            }
        }
    }
    core.ok_or_else(|| format!("{}: no snapshot", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::{CoreConfig, RequestId, SubmitSpec};

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
            let input = Input::Submit {
                request: RequestId(i),
                user: "ana".into(),
                plan: "basic".into(),
                spec: SubmitSpec::command(["echo", "hi"]),
            };
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
        let replayed = replay(&journal.current(), |_, _, _| {}).unwrap();
        assert_eq!(replayed.snapshot(), core.snapshot());
        for (_, path) in segments {
            assert!(
                replay(&path, |_, _, _| {}).is_ok(),
                "{} replays on its own",
                path.display()
            );
        }
    }

    /// The time of a segment's first line (its snapshot).
    fn first_at(path: &Path) -> u64 {
        let text = std::fs::read_to_string(path).unwrap();
        match serde_json::from_str(text.lines().next().expect("a first line")).unwrap() {
            Line::Snapshot { at, .. } | Line::Input { at, .. } => at.0,
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
        replay(&segments[0].1, |_, _, _| inputs += 1).expect("the history replays");
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
            let err = replay(&write(dir.path(), name, &text), |_, _, _| {})
                .err()
                .expect("refused");
            assert!(err.contains(expected), "{name}: {err}");
        }
        let fine = write(dir.path(), "fine.jsonl", &format!("{snapshot}\n{tick}\n\n"));
        assert!(replay(&fine, |_, _, _| {}).is_ok());
    }
}
