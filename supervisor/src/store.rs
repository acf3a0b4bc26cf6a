//! The durable store: SQLite in WAL mode. It owns the schema and its
//! migrations, writes job records in one transaction per batch of core steps
//! (group commit), and answers the reads the API and a restart need.
//! It never decides anything about jobs: it keeps what the core says.

use std::path::Path;
use std::sync::Arc;

use rusqlite::{params, Connection, OptionalExtension};

use crate::core::{Job, JobId, JobState, Millis};

/// Each migration brings the schema from the previous version to its own.
const MIGRATIONS: &[(i64, &str)] = &[
    (
        1,
        "CREATE TABLE jobs (
         id INTEGER PRIMARY KEY,
         user TEXT NOT NULL,
         state TEXT NOT NULL,
         live INTEGER NOT NULL,
         submitted_at INTEGER NOT NULL,
         record TEXT NOT NULL
     );
     CREATE INDEX jobs_by_user ON jobs(user, id);
     CREATE INDEX jobs_by_state ON jobs(state, id);
     CREATE INDEX jobs_live ON jobs(live, id);
     CREATE TABLE users (
         name TEXT PRIMARY KEY,
         plan TEXT NOT NULL,
         admin INTEGER NOT NULL,
         token_sha256 TEXT NOT NULL UNIQUE,
         created_at INTEGER NOT NULL
     );",
    ),
    (
        2,
        "CREATE TABLE agent_credentials (
         agent TEXT PRIMARY KEY,
         token_sha256 TEXT NOT NULL UNIQUE,
         created_at INTEGER NOT NULL,
         revoked_at INTEGER
     );",
    ),
];

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("job {job}: stored record is not valid: {reason}")]
    Corrupt { job: i64, reason: String },
    #[error("the database has schema version {found}; this build knows up to {known}")]
    NewerSchema { found: i64, known: i64 },
    #[error("the database has schema version {found}; this build reads only {known} (use the foreman that wrote it)")]
    OtherSchema { found: i64, known: i64 },
    #[error("user {0:?} already exists")]
    UserExists(String),
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
}

/// An account: who may call the API, on which plan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct User {
    pub name: Arc<str>,
    pub plan: Arc<str>,
    pub admin: bool,
}

pub struct Store {
    conn: Connection,
    /// Added to every commit, after its fsync: benchmarks only (a slower
    /// disk than this one). None in production and in the simulator.
    fsync_delay: Option<std::time::Duration>,
}

impl Store {
    /// Opens (creating if needed) the database at `path` and migrates it.
    /// Opens (or creates) the database at `path`, readable by its owner
    /// only: it holds every user's jobs, environments included. (SQLite
    /// gives its `-wal` and `-shm` files the database file's mode.)
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        {
            // Made 0600 before SQLite opens it: never readable by others,
            // not even for a moment.
            use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
            let io = |e| StoreError::Io(path.display().to_string(), e);
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(path)
                .map_err(io)?;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
        }
        let conn = Connection::open(path)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        // WAL: readers do not block the writer; FULL: a commit survives power loss.
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        let mut store = Store {
            conn,
            fsync_delay: None,
        };
        store.migrate()?;
        Ok(store)
    }

    /// Opens an existing database to read it, without changing anything:
    /// no file made, no mode set, no migration (a supervisor of another
    /// version may be running on it). Refuses a schema this build would
    /// migrate or does not know.
    pub fn open_to_read(path: &Path) -> Result<Store, StoreError> {
        let conn = Connection::open_with_flags(
            path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        let store = Store {
            conn,
            fsync_delay: None,
        };
        let found = store.schema_version()?;
        let known = MIGRATIONS.last().map_or(0, |(v, _)| *v);
        if found != known {
            return Err(StoreError::OtherSchema { found, known });
        }
        Ok(store)
    }

    /// Commits that do not wait for the disk (`synchronous = OFF`): for
    /// benchmarks that measure what durability costs, never for production.
    pub fn without_fsync(&mut self) -> Result<(), StoreError> {
        self.conn.pragma_update(None, "synchronous", "OFF")?;
        Ok(())
    }

    /// Every commit takes `delay` longer, as on a disk whose fsync is that
    /// much slower: for benchmarks, never for production (it blocks the
    /// calling thread, which in the server is a blocking-pool thread).
    pub fn with_fsync_delay(&mut self, delay: std::time::Duration) {
        self.fsync_delay = Some(delay);
    }

    fn migrate(&mut self) -> Result<(), StoreError> {
        self.conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)",
        )?;
        let current: i64 = self.conn.query_row(
            "SELECT coalesce(max(version), 0) FROM schema_version",
            [],
            |r| r.get(0),
        )?;
        let known = MIGRATIONS.last().map_or(0, |(v, _)| *v);
        if current > known {
            return Err(StoreError::NewerSchema {
                found: current,
                known,
            });
        }
        for (version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > current) {
            let tx = self.conn.transaction()?;
            tx.execute_batch(sql)?;
            tx.execute(
                "INSERT INTO schema_version (version) VALUES (?1)",
                [version],
            )?;
            tx.commit()?;
        }
        Ok(())
    }

    pub fn schema_version(&self) -> Result<i64, StoreError> {
        Ok(self
            .conn
            .query_row("SELECT max(version) FROM schema_version", [], |r| r.get(0))?)
    }

    /// Upserts every record in one transaction: all or nothing.
    pub fn commit(&mut self, jobs: &[Arc<Job>]) -> Result<(), StoreError> {
        if jobs.is_empty() {
            return Ok(());
        }
        let tx = self.conn.transaction()?;
        {
            let mut upsert = tx.prepare_cached(
                "INSERT INTO jobs (id, user, state, live, submitted_at, record)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT(id) DO UPDATE SET
                     state = excluded.state, live = excluded.live, record = excluded.record",
            )?;
            for job in jobs {
                let record = serde_json::to_string(&**job).expect("a job serializes");
                let live = !job.state.is_terminal() || job.held().is_some();
                upsert.execute(params![
                    job.id.0 as i64,
                    &*job.user,
                    job.state.as_str(),
                    live,
                    job.submitted_at.0 as i64,
                    record
                ])?;
            }
        }
        tx.commit()?;
        if let Some(delay) = self.fsync_delay {
            std::thread::sleep(delay);
        }
        Ok(())
    }

    /// What a restart needs: every live job, every job submitted since
    /// `recent_since` (for its idempotency key), and the next job id.
    pub fn load_for_restore(&self, recent_since: Millis) -> Result<(Vec<Job>, u64), StoreError> {
        let mut query = self.conn.prepare(
            "SELECT id, record FROM jobs WHERE live = 1 OR submitted_at >= ?1 ORDER BY id",
        )?;
        let rows = query.query_map([recent_since.0 as i64], |r| Ok((r.get(0)?, r.get(1)?)))?;
        let mut jobs = Vec::new();
        for row in rows {
            let (id, record): (i64, String) = row?;
            jobs.push(decode(id, &record)?);
        }
        let max: Option<i64> = self
            .conn
            .query_row("SELECT max(id) FROM jobs", [], |r| r.get(0))?;
        Ok((jobs, max.map_or(1, |m| m as u64 + 1)))
    }

    pub fn job(&self, id: JobId) -> Result<Option<Job>, StoreError> {
        let record: Option<String> = self
            .conn
            .query_row(
                "SELECT record FROM jobs WHERE id = ?1",
                [id.0 as i64],
                |r| r.get(0),
            )
            .optional()?;
        record.map(|r| decode(id.0 as i64, &r)).transpose()
    }

    /// Jobs newest first, optionally of one user and in one state, with ids
    /// below `before` (for paging), at most `limit`.
    /// Jobs newest first, at most `limit`, and no more than `bytes_max` of
    /// records (always at least one): a page costs bounded memory however
    /// large the records are. The flag says whether the page stopped at
    /// `bytes_max` with more rows to give.
    pub fn jobs(
        &self,
        user: Option<&str>,
        state: Option<JobState>,
        before: Option<JobId>,
        limit: usize,
        bytes_max: usize,
    ) -> Result<(Vec<Job>, bool), StoreError> {
        let mut query = self.conn.prepare_cached(
            "SELECT id, record FROM jobs
             WHERE (?1 IS NULL OR user = ?1) AND (?2 IS NULL OR state = ?2) AND (?3 IS NULL OR id < ?3)
             ORDER BY id DESC LIMIT ?4",
        )?;
        let rows = query.query_map(
            params![
                user,
                state.map(JobState::as_str),
                before.map(|b| b.0 as i64),
                limit as i64
            ],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        let mut jobs = Vec::new();
        let mut bytes = 0;
        for row in rows {
            let (id, record): (i64, String) = row?;
            bytes += record.len();
            if bytes > bytes_max && !jobs.is_empty() {
                return Ok((jobs, true));
            }
            jobs.push(decode(id, &record)?);
        }
        Ok((jobs, false))
    }

    /// How many jobs are in each state, for metrics.
    pub fn count_by_state(&self) -> Result<Vec<(String, u64)>, StoreError> {
        let mut query = self
            .conn
            .prepare_cached("SELECT state, count(*) FROM jobs GROUP BY state ORDER BY state")?;
        let rows = query.query_map([], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as u64)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn add_user(
        &mut self,
        user: &User,
        token_sha256: &str,
        now: Millis,
    ) -> Result<(), StoreError> {
        let inserted = self.conn.execute(
            "INSERT INTO users (name, plan, admin, token_sha256, created_at) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT(name) DO NOTHING",
            params![&*user.name, &*user.plan, user.admin, token_sha256, now.0 as i64],
        )?;
        if inserted == 0 {
            return Err(StoreError::UserExists(user.name.to_string()));
        }
        Ok(())
    }

    /// Gives agent `agent` a new credential (a token's SHA-256), replacing
    /// and so revoking any it had.
    pub fn set_agent_credential(
        &mut self,
        agent: &str,
        token_sha256: &str,
        now: Millis,
    ) -> Result<(), StoreError> {
        self.conn.execute(
            "INSERT INTO agent_credentials (agent, token_sha256, created_at, revoked_at)
             VALUES (?1, ?2, ?3, NULL)
             ON CONFLICT(agent) DO UPDATE SET token_sha256 = ?2, created_at = ?3, revoked_at = NULL",
            params![agent, token_sha256, now.0 as i64],
        )?;
        Ok(())
    }

    /// Revokes agent `agent`'s credential; false if it had none in force.
    pub fn revoke_agent_credential(
        &mut self,
        agent: &str,
        now: Millis,
    ) -> Result<bool, StoreError> {
        let changed = self.conn.execute(
            "UPDATE agent_credentials SET revoked_at = ?2 WHERE agent = ?1 AND revoked_at IS NULL",
            params![agent, now.0 as i64],
        )?;
        Ok(changed > 0)
    }

    /// Whether `token_sha256` is agent `agent`'s credential, in force.
    pub fn agent_credential_valid(
        &self,
        agent: &str,
        token_sha256: &str,
    ) -> Result<bool, StoreError> {
        Ok(self
            .conn
            .prepare_cached(
                "SELECT 1 FROM agent_credentials WHERE agent = ?1 AND token_sha256 = ?2 AND revoked_at IS NULL",
            )?
            .query_row(params![agent, token_sha256], |_| Ok(()))
            .optional()?
            .is_some())
    }

    /// Agent `agent`'s credential: its token's SHA-256, and whether it is revoked.
    pub fn agent_credential(&self, agent: &str) -> Result<Option<(String, bool)>, StoreError> {
        Ok(self
            .conn
            .prepare_cached(
                "SELECT token_sha256, revoked_at IS NOT NULL FROM agent_credentials WHERE agent = ?1",
            )?
            .query_row([agent], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?)
    }

    /// Every agent credential: (agent, created at, revoked at).
    pub fn agent_credentials(&self) -> Result<Vec<(String, Millis, Option<Millis>)>, StoreError> {
        let mut query = self.conn.prepare_cached(
            "SELECT agent, created_at, revoked_at FROM agent_credentials ORDER BY agent",
        )?;
        let rows = query.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                Millis(r.get::<_, i64>(1)? as u64),
                r.get::<_, Option<i64>>(2)?.map(|t| Millis(t as u64)),
            ))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn user_by_token(&self, token_sha256: &str) -> Result<Option<User>, StoreError> {
        Ok(self
            .conn
            .query_row(
                "SELECT name, plan, admin FROM users WHERE token_sha256 = ?1",
                [token_sha256],
                |r| {
                    Ok(User {
                        name: Arc::from(r.get::<_, String>(0)?),
                        plan: Arc::from(r.get::<_, String>(1)?),
                        admin: r.get(2)?,
                    })
                },
            )
            .optional()?)
    }
}

fn decode(id: i64, record: &str) -> Result<Job, StoreError> {
    let job: Job = serde_json::from_str(record).map_err(|e| StoreError::Corrupt {
        job: id,
        reason: e.to_string(),
    })?;
    if job.id.0 as i64 != id {
        return Err(StoreError::Corrupt {
            job: id,
            reason: format!("the record says it is job {}", job.id),
        });
    }
    Ok(job)
}

#[cfg(test)]
mod tests;
