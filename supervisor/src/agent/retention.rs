//! Run-dir retention: an agent's work dir keeps the run dirs of finished
//! attempts (their whole `output`) for a while, bounded in age and in total
//! size, so that a long-running agent's disk does not fill. The dirs of
//! runs in progress are never removed.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::core::Millis;

/// How long and how much of finished runs' dirs an agent keeps.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Retention {
    /// A finished run's dir is removed once untouched this long.
    pub keep_hours: u64,
    /// Past this many MiB of run dirs in all, the oldest finished ones go first.
    pub max_mib: u64,
}

/// The least time between two sweeps of a work dir (the first comes with
/// an agent's first run).
pub const SWEEP_EVERY_MS: u64 = 60_000;

impl Default for Retention {
    fn default() -> Self {
        Retention {
            keep_hours: 7 * 24,
            max_mib: 10 * 1024,
        }
    }
}

/// What one sweep removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Swept {
    pub removed: usize,
    pub freed_bytes: u64,
    /// Bytes of run dirs left, in progress included.
    pub kept_bytes: u64,
}

/// The run dirs in use and when the last sweep ran, shared by every run.
#[derive(Debug, Default)]
pub struct RunDirs {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    live: BTreeSet<PathBuf>,
    last_sweep: Option<Millis>,
    /// A sweep is under way: no second one starts beside it.
    sweeping: bool,
}

impl RunDirs {
    /// Marks `dir` in use until the guard is dropped.
    pub fn enter(self: &Arc<Self>, dir: &Path) -> InUse {
        self.state
            .lock()
            .expect("run dirs lock")
            .live
            .insert(dir.to_path_buf());
        InUse {
            dirs: self.clone(),
            dir: dir.to_path_buf(),
        }
    }

    fn is_live(&self, dir: &Path) -> bool {
        self.state.lock().expect("run dirs lock").live.contains(dir)
    }

    /// Sweeps `work_dir` if the last sweep is older than the policy allows;
    /// the sweep itself runs off the async threads. A run marks its dir in
    /// use (`enter`) before it creates it, and the sweep asks again just
    /// before each removal: a dir it found was made before, so a run that
    /// began meanwhile is seen.
    pub async fn maybe_sweep(self: &Arc<Self>, work_dir: &Path, policy: &Retention, now: Millis) {
        {
            let mut state = self.state.lock().expect("run dirs lock");
            let due = state
                .last_sweep
                .is_none_or(|last| now.ms_since(last) >= SWEEP_EVERY_MS);
            if !due || state.sweeping {
                return;
            }
            state.last_sweep = Some(now);
            state.sweeping = true;
        }
        let (work_dir, policy, dirs) = (work_dir.to_path_buf(), policy.clone(), self.clone());
        let sweeper = dirs.clone();
        let swept = crate::seam::blocking(move || {
            sweep(&work_dir, |dir| sweeper.is_live(dir), &policy, now)
        })
        .await;
        dirs.state.lock().expect("run dirs lock").sweeping = false;
        match swept {
            Ok(swept) if swept.removed > 0 => info!(
                removed = swept.removed,
                freed_bytes = swept.freed_bytes,
                kept_bytes = swept.kept_bytes,
                "old run dirs removed"
            ),
            Ok(_) => {}
            Err(e) => warn!(error = %e, "run dirs cannot be swept"),
        }
    }
}

/// A run dir in use; it may be swept once this is dropped.
pub struct InUse {
    dirs: Arc<RunDirs>,
    dir: PathBuf,
}

impl Drop for InUse {
    fn drop(&mut self) {
        if let Ok(mut state) = self.dirs.state.lock() {
            state.live.remove(&self.dir);
        }
    }
}

struct Found {
    path: PathBuf,
    touched_ms: u64,
    bytes: u64,
}

/// A run dir's name: `<job>-<attempt>`.
fn is_run_dir_name(name: &str) -> bool {
    name.split_once('-').is_some_and(|(job, attempt)| {
        [job, attempt]
            .iter()
            .all(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
    })
}

/// Removes from `work_dir` the run dirs not in use that are older than
/// the policy keeps, then, oldest first, those past its size bound. Only
/// directories directly in `work_dir` named `<job>-<attempt>` are run dirs;
/// anything else there (the agent's own files, its outbox) is never
/// touched, nor is anything reached by a symlink.
pub fn sweep(
    work_dir: &Path,
    is_live: impl Fn(&Path) -> bool,
    policy: &Retention,
    now: Millis,
) -> std::io::Result<Swept> {
    let mut found = Vec::new();
    let mut kept_bytes = 0;
    for entry in std::fs::read_dir(work_dir)?.flatten() {
        let Ok(kind) = entry.file_type() else {
            continue;
        };
        if !kind.is_dir() || !is_run_dir_name(&entry.file_name().to_string_lossy()) {
            continue;
        }
        let path = entry.path();
        let bytes = dir_bytes(&path);
        if is_live(&path) {
            kept_bytes += bytes;
            continue;
        }
        found.push(Found {
            touched_ms: touched_ms(&path),
            path,
            bytes,
        });
    }
    found.sort_by_key(|f| (f.touched_ms, f.path.clone()));
    let keep_ms = policy.keep_hours.saturating_mul(3_600_000);
    let max_bytes = policy.max_mib.saturating_mul(1024 * 1024);
    let mut total: u64 = kept_bytes + found.iter().map(|f| f.bytes).sum::<u64>();
    let mut swept = Swept::default();
    for dir in found {
        let old = now.0.saturating_sub(dir.touched_ms) >= keep_ms;
        if (!old && total <= max_bytes) || is_live(&dir.path) {
            swept.kept_bytes += dir.bytes;
            continue;
        }
        match std::fs::remove_dir_all(&dir.path) {
            Ok(()) => {
                swept.removed += 1;
                swept.freed_bytes += dir.bytes;
                total -= dir.bytes;
            }
            Err(e) => {
                warn!(dir = %dir.path.display(), error = %e, "run dir cannot be removed");
                swept.kept_bytes += dir.bytes;
            }
        }
    }
    swept.kept_bytes += kept_bytes;
    Ok(swept)
}

/// When the run dir or anything directly in it last changed, in ms since
/// the epoch (a run's output is written in place, which does not touch
/// the dir itself).
fn touched_ms(dir: &Path) -> u64 {
    let modified = |path: &Path| {
        std::fs::symlink_metadata(path)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_millis() as u64)
    };
    let inside = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| modified(&e.path()));
    inside.chain([modified(dir)]).max().unwrap_or(0)
}

/// The bytes of disk the files under `dir` take, symlinks not followed:
/// blocks allocated, each file once however many links it has (a sparse
/// file of a terabyte, or a thousand links to one, cannot make every other
/// run dir look over the bound).
fn dir_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    let mut seen = BTreeSet::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let Ok(meta) = entry.path().symlink_metadata() else {
                continue;
            };
            if meta.is_dir() {
                stack.push(entry.path());
            } else if seen.insert((meta.dev(), meta.ino())) {
                total += meta.blocks() * 512;
            }
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR_MS: u64 = 3_600_000;

    /// A run dir with `bytes` of output, last touched `age_h` hours before `now`.
    fn run_dir(work: &Path, name: &str, bytes: usize, now: Millis, age_h: u64) -> PathBuf {
        let dir = work.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("output"), vec![b'x'; bytes]).unwrap();
        let at = std::time::UNIX_EPOCH + std::time::Duration::from_millis(now.0 - age_h * HOUR_MS);
        for path in [dir.join("output"), dir.clone()] {
            std::fs::File::open(&path)
                .unwrap()
                .set_modified(at)
                .unwrap();
        }
        dir
    }

    #[test]
    fn retention_removes_the_old_then_the_oldest_past_the_size_and_never_a_live_run() {
        let work = tempfile::tempdir().unwrap();
        let now = Millis(1_800_000_000_000);
        let mib = 1024 * 1024;
        let ancient = run_dir(work.path(), "1-1", 10, now, 200);
        let older = run_dir(work.path(), "2-1", mib, now, 5);
        let old = run_dir(work.path(), "3-1", mib, now, 4);
        let recent = run_dir(work.path(), "4-1", mib, now, 1);
        let live = run_dir(work.path(), "5-1", 2 * mib, now, 300);
        std::fs::write(work.path().join("agent.lock"), b"").unwrap();
        let outbox = run_dir(work.path(), "outbox", 10, now, 900);
        let policy = Retention {
            keep_hours: 168,
            max_mib: 4,
        };
        let swept = sweep(work.path(), |d| d == live, &policy, now).unwrap();
        // The 200-hour-old dir by age; then 5 MiB are over 4: the oldest
        // finished one goes; the live one, older than all, stays.
        assert_eq!(swept.removed, 2, "{swept:?}");
        assert!(!ancient.exists() && !older.exists());
        assert!(old.exists() && recent.exists() && live.exists());
        assert!(
            work.path().join("agent.lock").exists(),
            "files are not run dirs"
        );
        assert!(outbox.exists(), "nor are dirs of other names");
        // Bytes of disk: blocks, so at least what was written.
        assert!(swept.freed_bytes >= mib as u64 + 10, "{swept:?}");
        assert!(swept.kept_bytes >= 4 * mib as u64, "{swept:?}");
        // Within both bounds, nothing more goes.
        let roomy = Retention {
            max_mib: 100,
            ..policy
        };
        let again = sweep(work.path(), |d| d == live, &roomy, now).unwrap();
        assert_eq!(again.removed, 0);
    }

    #[tokio::test]
    async fn retention_sweeps_at_most_once_per_interval_and_spares_dirs_in_use() {
        let work = tempfile::tempdir().unwrap();
        let now = Millis(1_800_000_000_000);
        let policy = Retention {
            keep_hours: 1,
            max_mib: 1024,
        };
        let dirs = Arc::new(RunDirs::default());
        let in_use = run_dir(work.path(), "1-1", 10, now, 5);
        let guard = dirs.enter(&in_use);
        dirs.maybe_sweep(work.path(), &policy, now).await;
        assert!(in_use.exists(), "a dir in use is never swept");
        drop(guard);
        let stale = run_dir(work.path(), "2-1", 10, now, 5);
        dirs.maybe_sweep(work.path(), &policy, Millis(now.0 + 59_000))
            .await;
        assert!(
            stale.exists() && in_use.exists(),
            "too soon for another sweep"
        );
        dirs.maybe_sweep(work.path(), &policy, Millis(now.0 + 60_000))
            .await;
        assert!(!stale.exists() && !in_use.exists());
    }

    #[test]
    fn retention_a_sparse_file_or_many_links_count_the_disk_they_take() {
        let work = tempfile::tempdir().unwrap();
        let now = Millis(1_800_000_000_000);
        let keep = run_dir(work.path(), "1-1", 10, now, 2);
        let sparse = run_dir(work.path(), "2-1", 10, now, 1);
        let huge = std::fs::File::create(sparse.join("huge")).unwrap();
        huge.set_len(1 << 40).unwrap();
        for i in 0..100 {
            std::fs::hard_link(sparse.join("output"), sparse.join(format!("link-{i}"))).unwrap();
        }
        let policy = Retention {
            keep_hours: 24,
            max_mib: 1,
        };
        let swept = sweep(work.path(), |_| false, &policy, now).unwrap();
        assert_eq!(swept.removed, 0, "{swept:?}");
        assert!(keep.exists());
    }

    #[test]
    fn retention_a_symlink_out_of_a_run_dir_is_removed_not_followed() {
        let work = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("precious"), b"keep me").unwrap();
        let now = Millis(1_800_000_000_000);
        let dir = run_dir(work.path(), "1-1", 10, now, 1);
        std::os::unix::fs::symlink(outside.path(), dir.join("link")).unwrap();
        // No room at all: every run dir not in use goes.
        let policy = Retention {
            max_mib: 0,
            ..Retention::default()
        };
        let swept = sweep(work.path(), |_| false, &policy, now).unwrap();
        assert_eq!(swept.removed, 1);
        assert!(!dir.exists());
        assert!(outside.path().join("precious").exists());
    }
}
