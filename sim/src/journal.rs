//! After a run, the supervisor's journal is replayed through a fresh core,
//! one segment at a time, as an operator replays an incident
//! (`foreman replay`). Every segment must replay on its own, and the newest
//! one (what the last supervisor wrote) must end where that supervisor did:
//! the same jobs ended the same way, the same live jobs, CPUs and agents.

use std::collections::BTreeMap;
use std::path::Path;

use foreman::core::Effect;

use crate::trace::{CoreView, Ev};

/// Replays every segment in `dir`, oldest first; `committed` is the core as
/// the supervisor last made it durable.
pub fn replayed(dir: &Path, committed: Option<CoreView>) -> Ev {
    let mut segments: Vec<_> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "jsonl"))
        .collect();
    // Numbered segments in order, then the one being written.
    segments.sort_by_key(|p| (p.ends_with("current.jsonl"), p.clone()));
    let mut errors = Vec::new();
    let mut inputs = 0;
    let mut ended = BTreeMap::new();
    let mut view = None;
    for (i, path) in segments.iter().enumerate() {
        let newest = i + 1 == segments.len();
        let mut last = BTreeMap::new();
        let mut differs = None;
        let replay = foreman::server::journal::replay(path, |step| {
            inputs += 1;
            // The same code decides the same on the same inputs: every
            // step's digest is the one the supervisor recorded.
            let today = foreman::server::journal::decisions_digest(&step.effects);
            if differs.is_none() && step.recorded.as_deref() != Some(today.as_str()) {
                differs = Some(format!(
                    "line {}: the replay decides {today}, the supervisor recorded {:?}",
                    step.line, step.recorded
                ));
            }
            for effect in step.effects {
                if let Effect::Persist { job } = effect {
                    last.insert(job.id.0, job.state);
                }
            }
        });
        if let Some(differs) = differs {
            let name = path
                .file_name()
                .map_or(String::new(), |n| n.to_string_lossy().into_owned());
            errors.push(format!("journal/{name} {differs}"));
        }
        match replay {
            Ok(core) if newest => {
                ended = last.into_iter().filter(|(_, s)| s.is_terminal()).collect();
                view = Some(CoreView::of(&core).numbers());
            }
            Ok(_) => {}
            // Named from the data dir, the same in every run of a seed.
            Err(e) => errors.push(e.replace(&dir.display().to_string(), "journal")),
        }
    }
    if segments.is_empty() {
        errors.push("no journal segment in journal/".to_string());
    }
    Ev::JournalReplayed {
        segments: segments.len(),
        inputs,
        ended,
        replayed: view,
        committed: committed.map(|c| c.numbers()),
        errors,
    }
}

/// A journal found where none was asked for (segment bound 0: no journal).
pub fn kept_though_off(dir: &Path) -> Ev {
    Ev::JournalReplayed {
        segments: 0,
        inputs: 0,
        ended: BTreeMap::new(),
        replayed: None,
        committed: None,
        errors: vec![format!(
            "journal/ ({} entries): a journal was kept though the configuration turns it off",
            std::fs::read_dir(dir).map_or(0, |d| d.count())
        )],
    }
}
