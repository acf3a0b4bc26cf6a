//! The agent's results not yet acknowledged, kept on disk in one
//! append-only log per work dir: a line `keep <job> <attempt> <report>` when
//! a run ends, `drop <job> <attempt>` when the supervisor acknowledges it.
//! One file for every result: a file per result, created and deleted per
//! run, costs more in inode churn (and makes every later inode allocation of
//! the run dirs slower) than the write.
//!
//! Not fsynced: it survives the agent's crash, not the host's power loss. A
//! crash mid-append leaves a torn last line, which the next agent skips and
//! names in its log; it never trusts a line it cannot read whole.

use std::collections::BTreeMap;
use std::io::{BufRead, Read, Write};
use std::path::{Path, PathBuf};

use crate::core::{FinishedReport, JobId};

/// The log's name in the work dir.
pub const OUTBOX_LOG: &str = "outbox.log";
/// Where an earlier version kept results, a file each; imported once.
pub const OUTBOX_DIR: &str = "outbox";
/// The longest line read back (a report is a tail and a few fields: far below this).
pub const KEPT_RESULT_BYTES_MAX: u64 = 1024 * 1024;
/// Appends before the log is rewritten to its live lines, at least.
const LOG_BYTES_MIN: u64 = 1024 * 1024;

type Key = (JobId, u32);

/// One append-only file, rewritten to its live lines when it grows past a
/// bound (written aside, renamed over: a crash leaves the old file or the
/// new one). Shared by the agent's logs.
#[derive(Debug)]
pub(crate) struct AppendLog {
    path: PathBuf,
    file: std::fs::File,
    bytes: u64,
}

impl AppendLog {
    /// The log at `path`, holding `text` and nothing else (mode 0600: it
    /// may hold other users' output). Written aside and renamed over.
    pub(crate) fn create(path: &Path, text: &str) -> std::io::Result<AppendLog> {
        let aside = path.with_extension("log.new");
        let mut file = private_file(&aside)?;
        file.write_all(text.as_bytes())?;
        std::fs::rename(&aside, path)?;
        Ok(AppendLog {
            path: path.to_path_buf(),
            file,
            bytes: text.len() as u64,
        })
    }

    /// Appends `line` whole, or not at all: a write that fails part way
    /// (a full disk) is cut back, so that the next line does not run on
    /// from half of this one.
    pub(crate) fn append(&mut self, line: &str) -> std::io::Result<()> {
        match self.file.write_all(line.as_bytes()) {
            Ok(()) => {
                self.bytes += line.len() as u64;
                Ok(())
            }
            Err(e) => {
                use std::io::{Seek, SeekFrom};
                let _ = self.file.set_len(self.bytes);
                let _ = self.file.seek(SeekFrom::Start(self.bytes));
                Err(e)
            }
        }
    }

    pub(crate) fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Replaces the whole log with `text`.
    pub(crate) fn rewrite(&mut self, text: &str) -> std::io::Result<()> {
        *self = AppendLog::create(&self.path, text)?;
        Ok(())
    }
}

fn private_file(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    // Never through a link someone left in its place.
    let _ = std::fs::remove_file(path);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(path)
}

/// The results kept in a work dir's log.
#[derive(Debug)]
pub struct Outbox {
    state: std::sync::Mutex<State>,
}

#[derive(Debug)]
struct State {
    log: AppendLog,
    /// Each kept result's line, as written.
    live: BTreeMap<Key, String>,
    live_bytes: u64,
}

impl State {
    fn live_text(&self) -> String {
        self.live.values().map(String::as_str).collect()
    }
}

impl Outbox {
    /// Reads what an earlier agent kept in `work_dir` (its log, and the
    /// files of an earlier version's outbox dir), and starts the log again
    /// with only those. Lines that cannot be read whole are named in the
    /// agent's log and never trusted; a log with any is kept aside
    /// (`outbox.log.bad`) for whoever wants to look.
    pub fn open(work_dir: &Path) -> std::io::Result<Outbox> {
        let path = work_dir.join(OUTBOX_LOG);
        let mut live = BTreeMap::new();
        match std::fs::File::open(&path) {
            Ok(file) => {
                let bad = read_log(std::io::BufReader::new(file), &mut live, &path);
                if bad > 0 {
                    let _ = std::fs::copy(&path, path.with_extension("log.bad"));
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let legacy = work_dir.join(OUTBOX_DIR);
        let imported = read_outbox_dir(&legacy);
        for (job, attempt, report) in &imported {
            live.entry((*job, *attempt))
                .or_insert_with(|| keep_line(*job, *attempt, report));
        }
        let text: String = live.values().map(String::as_str).collect();
        let state = State {
            log: AppendLog::create(&path, &text)?,
            live_bytes: text.len() as u64,
            live,
        };
        // In the log now: the old files can go.
        for (job, attempt, _) in imported {
            let _ = std::fs::remove_file(legacy.join(format!("{job}-{attempt}.json")));
        }
        let _ = std::fs::remove_dir(&legacy);
        Ok(Outbox {
            state: std::sync::Mutex::new(state),
        })
    }

    pub fn keep(&self, job: JobId, attempt: u32, report: &FinishedReport) {
        let line = keep_line(job, attempt, report);
        let mut state = self.state.lock().expect("outbox lock");
        if let Err(e) = state.log.append(&line) {
            tracing::warn!(%job, attempt, error = %e, "result cannot be kept on disk");
        }
        state.live_bytes += line.len() as u64;
        if let Some(old) = state.live.insert((job, attempt), line) {
            state.live_bytes -= old.len() as u64;
        }
    }

    pub fn drop_result(&self, job: JobId, attempt: u32) {
        let mut state = self.state.lock().expect("outbox lock");
        let Some(old) = state.live.remove(&(job, attempt)) else {
            return;
        };
        state.live_bytes -= old.len() as u64;
        let _ = state.log.append(&format!("drop {job} {attempt}\n"));
        // Rewritten only once the dead lines outweigh the live ones, so
        // that many results waiting never make each rewrite quadratic.
        if state.log.bytes() > LOG_BYTES_MIN.max(2 * state.live_bytes) {
            let text = state.live_text();
            if let Err(e) = state.log.rewrite(&text) {
                tracing::warn!(error = %e, "the outbox log cannot be compacted");
            }
        }
    }

    /// The results kept and not dropped, oldest job first.
    pub fn kept(&self) -> Vec<(JobId, u32, FinishedReport)> {
        let state = self.state.lock().expect("outbox lock");
        state
            .live
            .values()
            .filter_map(|line| parse_line(line.trim_end()).ok())
            .filter_map(|entry| match entry {
                Entry::Keep(job, attempt, report) => Some((job, attempt, report)),
                Entry::Drop(..) => None,
            })
            .collect()
    }
}

fn keep_line(job: JobId, attempt: u32, report: &FinishedReport) -> String {
    let json = serde_json::to_string(report).expect("a report serializes");
    format!("keep {job} {attempt} {json}\n")
}

enum Entry {
    Keep(JobId, u32, FinishedReport),
    Drop(JobId, u32),
}

/// One line, without its newline.
fn parse_line(line: &str) -> Result<Entry, String> {
    let mut fields = line.splitn(4, ' ');
    let verb = fields.next().unwrap_or_default();
    let job = fields.next().ok_or("no job")?;
    let attempt = fields.next().ok_or("no attempt")?;
    let key =
        parse_key(job, attempt).ok_or_else(|| format!("not a job and attempt: {job} {attempt}"))?;
    match (verb, fields.next()) {
        ("keep", Some(json)) => {
            let report = serde_json::from_str(json).map_err(|e| e.to_string())?;
            Ok(Entry::Keep(key.0, key.1, report))
        }
        ("drop", None) => Ok(Entry::Drop(key.0, key.1)),
        _ => Err(format!("not a keep or drop line: {verb:?}")),
    }
}

fn parse_key(job: &str, attempt: &str) -> Option<Key> {
    let (number, try_number): (u64, u32) = (job.parse().ok()?, attempt.parse().ok()?);
    // Canonical numbers only: one key has one spelling.
    (number > 0 && try_number > 0 && number.to_string() == job && try_number.to_string() == attempt)
        .then_some((JobId(number), try_number))
}

/// Reads a log into `live`; returns how many lines it could not trust.
fn read_log(mut reader: impl BufRead, live: &mut BTreeMap<Key, String>, path: &Path) -> usize {
    let (mut bad, mut number) = (0, 0);
    let mut line = Vec::new();
    loop {
        line.clear();
        number += 1;
        let read = reader
            .by_ref()
            .take(KEPT_RESULT_BYTES_MAX + 1)
            .read_until(b'\n', &mut line);
        let why = match read {
            Ok(0) => break,
            Err(e) => {
                tracing::warn!(file = %path.display(), line = number, error = %e, "outbox log unreadable from here");
                return bad + 1;
            }
            Ok(_) if line.last() != Some(&b'\n') => {
                if line.len() as u64 > KEPT_RESULT_BYTES_MAX {
                    // Skip the rest of the overlong line.
                    let mut rest = Vec::new();
                    let _ = reader.read_until(b'\n', &mut rest);
                    Some(format!("longer than {KEPT_RESULT_BYTES_MAX} bytes"))
                } else {
                    Some("torn: no end of line (an agent stopped mid-write)".to_string())
                }
            }
            Ok(_) => match std::str::from_utf8(&line[..line.len() - 1]) {
                Err(_) => Some("not UTF-8".to_string()),
                Ok(text) => match parse_line(text) {
                    Ok(Entry::Keep(job, attempt, _)) => {
                        live.insert((job, attempt), format!("{text}\n"));
                        None
                    }
                    Ok(Entry::Drop(job, attempt)) => {
                        live.remove(&(job, attempt));
                        None
                    }
                    Err(why) => Some(why),
                },
            },
        };
        if let Some(why) = why {
            bad += 1;
            tracing::warn!(file = %path.display(), line = number, %why, "not a kept result; skipped");
        }
    }
    bad
}

/// A kept result's file name in an earlier version's outbox dir,
/// `<job>-<attempt>.json`, read back.
pub fn kept_result_key(name: &str) -> Option<(JobId, u32)> {
    let (job, attempt) = name.strip_suffix(".json")?.split_once('-')?;
    let job: u64 = job.parse().ok()?;
    let attempt: u32 = attempt.parse().ok()?;
    (job > 0 && attempt > 0 && format!("{job}-{attempt}.json") == name)
        .then_some((JobId(job), attempt))
}

/// A kept result, read back: the report it holds, or why not.
pub fn kept_result(bytes: &[u8]) -> Result<FinishedReport, String> {
    if bytes.len() as u64 > KEPT_RESULT_BYTES_MAX {
        return Err(format!(
            "{} bytes; at most {KEPT_RESULT_BYTES_MAX}",
            bytes.len()
        ));
    }
    serde_json::from_slice(bytes).map_err(|e| e.to_string())
}

/// The results an earlier version kept in `dir`, a file each. Files that
/// are not kept results, or cannot be read as one, are named in the log and
/// moved aside (`.bad`), never trusted.
fn read_outbox_dir(dir: &Path) -> Vec<(JobId, u32, FinishedReport)> {
    let mut kept = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') || name.ends_with(".bad") {
            continue;
        }
        let read = kept_result_key(&name).ok_or_else(|| "not <job>-<attempt>.json".to_string());
        let read = read.and_then(|key| {
            let size = entry.metadata().map_err(|e| e.to_string())?.len();
            if size > KEPT_RESULT_BYTES_MAX {
                return Err(format!("{size} bytes; at most {KEPT_RESULT_BYTES_MAX}"));
            }
            let bytes = std::fs::read(entry.path()).map_err(|e| e.to_string())?;
            Ok((key, kept_result(&bytes)?))
        });
        match read {
            Ok(((job, attempt), report)) => kept.push((job, attempt, report)),
            Err(why) => {
                tracing::warn!(file = %entry.path().display(), %why, "not a kept result; moved aside");
                let _ = std::fs::rename(entry.path(), dir.join(format!("{name}.bad")));
            }
        }
    }
    kept.sort_by_key(|(job, attempt, _)| (*job, *attempt));
    kept
}
