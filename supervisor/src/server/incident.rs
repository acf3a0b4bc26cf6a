//! The incident bundle (`foreman incident`): one file an operator attaches
//! to a bug report, read from a data dir. JSON lines:
//!
//! - the header, `{"bundle": "foreman-incident", ...}`: the bundle's
//!   format, the version of the `foreman` that wrote it, when, the window
//!   asked for, the scheduler's configuration as the newest included
//!   segment's snapshot holds it, the supervisor's starts (version,
//!   settings) and ends, the agents seen and when (connected, gone, from
//!   the segments), and the affected jobs' records;
//! - then each journal segment that covers the window, whole: a line
//!   `{"segment": "<name>"}` and the segment's own lines (each starts
//!   with its snapshot, so each replays on its own).
//!
//! Nothing secret leaves: every job environment's values, and every value
//! under a key that names a token, secret, password or credential, are
//! replaced with `"<redacted>"`, wherever they are in the JSON. Tokens
//! themselves never reach the journal or the records (the store keeps
//! their hashes, which are not read).

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::core::{Job, JobId, Millis};
use crate::store::Store;

pub const REDACTED: &str = "<redacted>";

/// Format of the bundle, in its header.
pub const BUNDLE_FORMAT: u32 = 1;

/// Words that make a key's value secret, wherever they are in it.
const SECRET_WORDS: [&str; 9] = [
    "token",
    "secret",
    "password",
    "passwd",
    "credential",
    "auth",
    "cookie",
    "session",
    "private",
];

/// Replaces secrets in `value`, wherever they are: job environments'
/// values, values under keys that name a secret (above, or ending in
/// `key`, but for `idempotency_key` and a bare `key`), and idempotency
/// digests (so a resubmission in a bundle's window replays as a conflict). Commands,
/// labels and output are kept: they are what an incident is read from.
pub fn redact(value: &mut Value) {
    match value {
        Value::Object(map) => {
            for (key, inner) in map.iter_mut() {
                let key = key.to_ascii_lowercase();
                // An idempotency record's digest is a hash of the spec,
                // environment included: a weak secret could be guessed
                // from it offline.
                let secret = SECRET_WORDS.iter().any(|word| key.contains(word))
                    || (key.ends_with("key") && key != "idempotency_key" && key != "key")
                    || key == "digest";
                if secret {
                    *inner = Value::String(REDACTED.into());
                } else if key == "env" {
                    match inner {
                        Value::Object(env) => {
                            for v in env.values_mut() {
                                *v = Value::String(REDACTED.into());
                            }
                        }
                        other => *other = Value::String(REDACTED.into()),
                    }
                } else {
                    redact(inner);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(redact),
        _ => {}
    }
}

/// What the bundle covers: the last `since` ms, and these jobs' lives.
#[derive(Debug, Default)]
pub struct Window {
    pub since_ms: Option<u64>,
    pub jobs: Vec<JobId>,
}

/// What a bundle holds, as `foreman incident` reports it.
#[derive(Debug)]
pub struct Summary {
    pub segments: Vec<String>,
    pub jobs: usize,
    pub agents: usize,
}

/// A journal segment: its name, path, and the time of its first line (its
/// snapshot's).
struct Segment {
    name: String,
    path: PathBuf,
    first: u64,
}

/// The journal's segments, oldest first; each read as far as its first
/// line's time (a segment covers from there to the next one's).
fn segments(journal: &Path) -> Result<Vec<Segment>, String> {
    #[derive(serde::Deserialize)]
    struct At {
        at: u64,
    }
    let mut found = Vec::new();
    let entries = match std::fs::read_dir(journal) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(found),
        Err(e) => return Err(format!("{}: {e}", journal.display())),
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.ends_with(".jsonl") {
            continue;
        }
        let path = entry.path();
        let file = std::fs::File::open(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut line = String::new();
        std::io::BufReader::new(file)
            .read_line(&mut line)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        // An empty segment, or one whose first line has no time, covers
        // nothing that can be placed.
        if let Ok(At { at }) = serde_json::from_str(&line) {
            found.push(Segment {
                name,
                path,
                first: at,
            });
        }
    }
    // Numbered segments in order, then the one being written.
    found.sort_by_key(|s| (s.name == "current.jsonl", s.name.clone()));
    Ok(found)
}

/// The jobs the window asks about: those named, and those alive at any
/// time since `since` (submitted, running or ended in it).
fn affected_jobs(store: &Store, window: &Window, now: Millis) -> Result<Vec<Job>, String> {
    let mut jobs = BTreeMap::new();
    for &id in &window.jobs {
        match store.job(id).map_err(|e| e.to_string())? {
            Some(job) => {
                jobs.insert(id, job);
            }
            None => return Err(format!("no job {id} in the store")),
        }
    }
    if let Some(since) = window.since_ms {
        let cutoff = now.0.saturating_sub(since);
        let mut before = None;
        loop {
            let (page, _) = store
                .jobs(None, None, before, 1_000, 16 * 1024 * 1024)
                .map_err(|e| e.to_string())?;
            let Some(last) = page.last() else { break };
            before = Some(last.id);
            for job in page {
                if job.finished_at.is_none_or(|f| f.0 >= cutoff) {
                    jobs.insert(job.id, job);
                }
            }
        }
    }
    Ok(jobs.into_values().collect())
}

/// Writes the bundle of `data_dir` for `window` to `out`.
pub fn bundle(
    data_dir: &Path,
    window: &Window,
    now: Millis,
    out: &mut dyn Write,
) -> Result<Summary, String> {
    if window.since_ms.is_none() && window.jobs.is_empty() {
        return Err("say what the bundle covers: --since, or --job".into());
    }
    let store_path = data_dir.join("foreman.db");
    if !store_path.exists() {
        return Err(format!(
            "{}: no store (is this a Foreman data dir?)",
            store_path.display()
        ));
    }
    let store =
        Store::open_to_read(&store_path).map_err(|e| format!("{}: {e}", store_path.display()))?;
    let jobs = affected_jobs(&store, window, now)?;
    // The times to cover: the window, and each named job's life.
    let mut spans: Vec<(u64, u64)> = Vec::new();
    if let Some(since) = window.since_ms {
        spans.push((now.0.saturating_sub(since), now.0));
    }
    for job in jobs.iter().filter(|j| window.jobs.contains(&j.id)) {
        spans.push((job.submitted_at.0, job.finished_at.map_or(now.0, |f| f.0)));
    }
    let all = segments(&data_dir.join("journal"))?;
    // A segment covers from its first line to the next one's first line
    // (the newest, to now).
    let chosen: Vec<&Segment> = all
        .iter()
        .enumerate()
        .filter(|(i, s)| {
            let end = all.get(i + 1).map_or(now.0, |next| next.first);
            spans.iter().any(|&(from, to)| s.first <= to && from <= end)
        })
        .map(|(_, s)| s)
        .collect();
    // Two passes over the chosen segments, a line at a time (they may be
    // hundreds of MiB): the first for the header's facts, the second to
    // copy each line, redacted.
    let mut agents: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    let mut supervisor: Vec<Value> = Vec::new();
    let mut config = Value::Null;
    for segment in &chosen {
        for_each_line(segment, |value| {
            let at = value.get("at").cloned().unwrap_or(Value::Null);
            if let Some(snapshot) = value.get("snapshot") {
                config = snapshot.get("config").cloned().unwrap_or(Value::Null);
                for agent in snapshot
                    .get("agents")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    if let Some(id) = agent.get("id").and_then(Value::as_str) {
                        agents
                            .entry(id.to_string())
                            .or_default()
                            .push(serde_json::json!({
                                "at": at, "seen": "in the snapshot", "link": agent.get("link"),
                            }));
                    }
                }
            }
            if let Some(fact) = value.get("supervisor") {
                let mut fact = fact.clone();
                if let Some(map) = fact.as_object_mut() {
                    map.insert("at".into(), at.clone());
                }
                supervisor.push(fact);
            }
            if let Some(input) = value.get("input") {
                let kind = input.get("input").and_then(Value::as_str);
                let agent = input.get("agent").and_then(Value::as_str);
                if let (Some(kind @ ("agent_connected" | "agent_gone")), Some(agent)) =
                    (kind, agent)
                {
                    agents
                        .entry(agent.to_string())
                        .or_default()
                        .push(serde_json::json!({
                            "at": at, "seen": kind, "conn": input.get("conn"),
                            "cpus": input.get("cpus"), "reason": input.get("reason"),
                        }));
                }
            }
            Ok(())
        })?;
    }
    let mut records: Vec<Value> = jobs
        .iter()
        .map(|j| serde_json::to_value(j).expect("records serialize"))
        .collect();
    records.iter_mut().for_each(redact);
    redact(&mut config);
    supervisor.iter_mut().for_each(redact);
    let names: Vec<String> = chosen.iter().map(|s| s.name.clone()).collect();
    let header = serde_json::json!({
        "bundle": "foreman-incident",
        "format": BUNDLE_FORMAT,
        "foreman_version": env!("CARGO_PKG_VERSION"),
        "created_at": now.0,
        "window": {
            "since_ms": window.since_ms,
            "jobs": window.jobs.iter().map(|j| j.0).collect::<Vec<_>>(),
        },
        "segments": names,
        "config": config,
        "supervisor": supervisor,
        "agents": agents,
        "jobs": records,
    });
    let io = |e: std::io::Error| e.to_string();
    writeln!(out, "{header}").map_err(io)?;
    for segment in &chosen {
        writeln!(out, "{}", serde_json::json!({ "segment": segment.name })).map_err(io)?;
        for_each_line(segment, |mut value| {
            redact(&mut value);
            writeln!(out, "{value}").map_err(io)
        })?;
    }
    Ok(Summary {
        segments: names,
        jobs: jobs.len(),
        agents: agents.len(),
    })
}

/// Each line of `segment` as JSON (one that is not JSON, as a marker: it is
/// carried, never trusted, and its text could hold anything).
fn for_each_line(
    segment: &Segment,
    mut each: impl FnMut(Value) -> Result<(), String>,
) -> Result<(), String> {
    let file = std::fs::File::open(&segment.path)
        .map_err(|e| format!("{}: {e}", segment.path.display()))?;
    for line in std::io::BufReader::new(file).lines() {
        let line = line.map_err(|e| format!("{}: {e}", segment.path.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        let value = serde_json::from_str(&line)
            .unwrap_or_else(|_| serde_json::json!({ "unreadable": REDACTED }));
        each(value)?;
    }
    Ok(())
}

/// The segments of a bundle read from `lines`, each as (name, its lines);
/// `None` if the first line is not a bundle's header.
pub fn segments_of(lines: impl BufRead) -> Result<Option<Vec<(String, String)>>, String> {
    let mut segments: Vec<(String, String)> = Vec::new();
    let mut header = false;
    for (n, line) in lines.lines().enumerate() {
        let line = line.map_err(|e| format!("line {}: {e}", n + 1))?;
        if n == 0 {
            let first: Option<Value> = serde_json::from_str(&line).ok();
            let Some(first) = first.filter(|h| h.get("bundle") == Some(&"foreman-incident".into()))
            else {
                return Ok(None);
            };
            let format = first.get("format").and_then(Value::as_u64).unwrap_or(0);
            if format == 0 || format > u64::from(BUNDLE_FORMAT) {
                return Err(format!(
                    "line 1: bundle format {} (written by foreman {}); this foreman reads \
                     format {BUNDLE_FORMAT}",
                    first.get("format").unwrap_or(&Value::Null),
                    first.get("foreman_version").unwrap_or(&Value::Null)
                ));
            }
            header = true;
            continue;
        }
        let marker = serde_json::from_str::<Value>(&line)
            .ok()
            .and_then(|v| v.get("segment").and_then(Value::as_str).map(String::from));
        match (marker, segments.last_mut()) {
            (Some(name), _) => segments.push((name, String::new())),
            (None, Some((_, text))) => {
                text.push_str(&line);
                text.push('\n');
            }
            (None, None) => return Err(format!("line {}: a line before the first segment", n + 1)),
        }
    }
    if header && segments.is_empty() {
        return Err("the bundle holds no journal segment: nothing to replay".into());
    }
    Ok(header.then_some(segments))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn incident_secrets_are_redacted_wherever_they_are() {
        let mut value = serde_json::json!({
            "input": "submit",
            "spec": {"argv": ["sh", "-c", "echo $API_KEY"], "env": {"API_KEY": "s3cret", "N": "1"}},
            "nested": [{"Access_Token": "t0ken"}, {"db_password": {"deep": "pw"}}],
            "env": "not a map, s3cret",
            "credentials": ["c1"],
            "labels": {"api_key": "k1", "AWS_ACCESS_KEY": "k2", "Authorization": "b1", "zone": "eu"},
            "idempotency": [{"key": "retry-1", "digest": "0123abcd"}],
            "ordinary": "kept",
            "idempotency_key": "kept too",
        });
        redact(&mut value);
        let text = value.to_string();
        for secret in [
            "s3cret", "t0ken", "\"pw\"", "c1", "k1", "k2", "b1", "0123abcd",
        ] {
            assert!(!text.contains(secret), "{secret} in {text}");
        }
        assert_eq!(value["spec"]["env"]["API_KEY"], REDACTED);
        assert_eq!(
            value["spec"]["argv"][2], "echo $API_KEY",
            "commands are kept"
        );
        assert!(text.contains("kept too") && text.contains("\"ordinary\":\"kept\""));
        assert_eq!(value["labels"]["zone"], "eu");
        assert_eq!(value["idempotency"][0]["key"], "retry-1");
    }

    #[test]
    fn incident_a_bundle_is_read_back_segment_by_segment() {
        let read = |text: &str| segments_of(std::io::Cursor::new(text.to_string()));
        let bundle = "{\"bundle\":\"foreman-incident\",\"format\":1}\n{\"segment\":\"1.jsonl\"}\na\nb\n{\"segment\":\"current.jsonl\"}\nc\n";
        assert_eq!(
            read(bundle).unwrap(),
            Some(vec![
                ("1.jsonl".to_string(), "a\nb\n".to_string()),
                ("current.jsonl".to_string(), "c\n".to_string())
            ])
        );
        // A journal segment, or anything else, is not a bundle.
        assert_eq!(read("{\"at\":1,\"snapshot\":{}}\n").unwrap(), None);
        assert_eq!(read("not json\n").unwrap(), None);
        assert_eq!(read("").unwrap(), None);
        let err = read("{\"bundle\":\"foreman-incident\",\"format\":1}\nstray\n").unwrap_err();
        assert!(
            err.contains("line 2: a line before the first segment"),
            "{err}"
        );
        // A later format, one with none, and a bundle of nothing are refused.
        for (text, says) in [
            (
                "{\"bundle\":\"foreman-incident\",\"format\":2,\"foreman_version\":\"9.0.0\"}\n",
                "line 1: bundle format 2 (written by foreman \"9.0.0\"); this foreman reads format 1",
            ),
            (
                "{\"bundle\":\"foreman-incident\"}\n{\"segment\":\"1.jsonl\"}\na\n",
                "line 1: bundle format null",
            ),
            (
                "{\"bundle\":\"foreman-incident\",\"format\":1}\n",
                "no journal segment",
            ),
        ] {
            let err = read(text).unwrap_err();
            assert!(err.contains(says), "{err}");
        }
    }

    #[test]
    fn incident_a_bundle_must_say_what_it_covers_and_where_from() {
        let dir = tempfile::tempdir().unwrap();
        let mut out = Vec::new();
        let err = bundle(dir.path(), &Window::default(), Millis(1), &mut out).unwrap_err();
        assert!(err.contains("--since, or --job"), "{err}");
        let window = Window {
            since_ms: Some(1_000),
            jobs: vec![],
        };
        let err = bundle(dir.path(), &window, Millis(1), &mut out).unwrap_err();
        assert!(err.contains("no store"), "{err}");
        assert!(out.is_empty());
    }
}
