//! The store against a real SQLite file: round trips, restore queries,
//! transactions, and hostile contents.

use std::sync::Arc;

use super::*;
use crate::core::testkit_public::sample_job;

fn open() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Store::open(&dir.path().join("foreman.db")).expect("open");
    (dir, store)
}

#[test]
fn store_round_trips_records_and_lists_newest_first() {
    let (_dir, mut store) = open();
    let jobs: Vec<Arc<Job>> = (1..=5)
        .map(|i| {
            Arc::new(sample_job(
                i,
                if i % 2 == 0 { "ana" } else { "bob" },
                JobState::Queued,
            ))
        })
        .collect();
    store.commit(&jobs).unwrap();
    assert_eq!(store.job(JobId(3)).unwrap().as_ref(), Some(&*jobs[2]));
    assert_eq!(store.job(JobId(99)).unwrap(), None);
    let ana: Vec<u64> = store
        .jobs(Some("ana"), None, None, 10, usize::MAX)
        .unwrap()
        .0
        .iter()
        .map(|j| j.id.0)
        .collect();
    assert_eq!(ana, vec![4, 2]);
    let page: Vec<u64> = store
        .jobs(None, None, Some(JobId(4)), 2, usize::MAX)
        .unwrap()
        .0
        .iter()
        .map(|j| j.id.0)
        .collect();
    assert_eq!(page, vec![3, 2]);
    // An upsert replaces the record.
    let done = Arc::new(sample_job(3, "bob", JobState::Succeeded));
    store.commit(std::slice::from_ref(&done)).unwrap();
    assert_eq!(
        store.job(JobId(3)).unwrap().unwrap().state,
        JobState::Succeeded
    );
    let succeeded = store
        .jobs(None, Some(JobState::Succeeded), None, 10, usize::MAX)
        .unwrap()
        .0;
    assert_eq!(succeeded.len(), 1);
    // A page stops at its byte bound, with at least one job, and says so.
    let one = serde_json::to_string(&*jobs[0]).unwrap().len();
    let (page, cut) = store.jobs(None, None, None, 10, 2 * one + one / 2).unwrap();
    assert_eq!((page.len(), cut), (2, true));
    let (page, cut) = store.jobs(None, None, None, 10, 1).unwrap();
    assert_eq!((page.len(), cut), (1, true));
    let (page, cut) = store.jobs(None, None, None, 10, usize::MAX).unwrap();
    assert_eq!((page.len(), cut), (5, false));
    assert_eq!(
        store.count_by_state().unwrap(),
        vec![("queued".to_string(), 4), ("succeeded".to_string(), 1)]
    );
}

#[test]
fn store_restore_loads_live_and_recent_jobs_and_the_next_id() {
    let (dir, mut store) = open();
    let mut old_done = sample_job(1, "ana", JobState::Succeeded);
    old_done.submitted_at = Millis(1_000);
    let mut recent_done = sample_job(2, "ana", JobState::Canceled);
    recent_done.submitted_at = Millis(50_000);
    let mut old_live = sample_job(3, "bob", JobState::Queued);
    old_live.submitted_at = Millis(1_000);
    store
        .commit(&[
            Arc::new(old_done),
            Arc::new(recent_done),
            Arc::new(old_live),
        ])
        .unwrap();
    drop(store);
    let store = Store::open(&dir.path().join("foreman.db")).unwrap();
    let (jobs, next) = store.load_for_restore(Millis(10_000)).unwrap();
    let ids: Vec<u64> = jobs.iter().map(|j| j.id.0).collect();
    assert_eq!(ids, vec![2, 3], "old finished jobs are left in the store");
    assert_eq!(next, 4);
    let (_, empty_next) = open().1.load_for_restore(Millis(0)).unwrap();
    assert_eq!(empty_next, 1);
}

#[test]
fn store_a_corrupt_record_is_an_error_naming_the_job() {
    let (_dir, mut store) = open();
    store
        .commit(&[Arc::new(sample_job(7, "ana", JobState::Queued))])
        .unwrap();
    store
        .conn
        .execute(
            "UPDATE jobs SET record = '{\"id\": 7, \"state\": 12' WHERE id = 7",
            [],
        )
        .unwrap();
    let err = store.job(JobId(7)).unwrap_err();
    assert!(matches!(err, StoreError::Corrupt { job: 7, .. }), "{err}");
    assert!(err
        .to_string()
        .starts_with("job 7: stored record is not valid"));
    assert!(store.load_for_restore(Millis(0)).is_err());
    // A record that claims to be another job is corrupt too.
    let other = serde_json::to_string(&sample_job(8, "ana", JobState::Queued)).unwrap();
    store
        .conn
        .execute("UPDATE jobs SET record = ?1 WHERE id = 7", [other])
        .unwrap();
    assert!(store
        .job(JobId(7))
        .unwrap_err()
        .to_string()
        .contains("says it is job 8"));
}

#[test]
fn store_refuses_a_database_from_a_newer_version() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("foreman.db");
    let store = Store::open(&path).unwrap();
    assert_eq!(store.schema_version().unwrap(), 2);
    store
        .conn
        .execute("INSERT INTO schema_version (version) VALUES (99)", [])
        .unwrap();
    drop(store);
    let err = Store::open(&path).err().expect("refused");
    assert_eq!(
        err.to_string(),
        "the database has schema version 99; this build knows up to 2"
    );
}

#[test]
fn store_a_file_that_is_not_a_database_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("foreman.db");
    std::fs::write(
        &path,
        b"this is not sqlite, just some bytes that go on for a while........",
    )
    .unwrap();
    assert!(Store::open(&path).is_err());
}

#[test]
fn store_users_by_token_and_no_duplicates() {
    let (_dir, mut store) = open();
    let ana = User {
        name: "ana".into(),
        plan: "basic".into(),
        admin: false,
    };
    store.add_user(&ana, "hash-a", Millis(1)).unwrap();
    assert_eq!(store.user_by_token("hash-a").unwrap(), Some(ana.clone()));
    assert_eq!(store.user_by_token("hash-b").unwrap(), None);
    let again = store.add_user(&ana, "hash-c", Millis(2)).unwrap_err();
    assert_eq!(again.to_string(), "user \"ana\" already exists");
    let bob = User {
        name: "bob".into(),
        plan: "basic".into(),
        admin: false,
    };
    assert!(
        store.add_user(&bob, "hash-a", Millis(3)).is_err(),
        "a token hash names one user"
    );
}

#[test]
fn store_an_agent_credential_names_one_agent_and_can_be_replaced_or_revoked() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(&dir.path().join("foreman.db")).unwrap();
    store
        .set_agent_credential("node-1", "aaa", Millis(1))
        .unwrap();
    store
        .set_agent_credential("node-2", "bbb", Millis(1))
        .unwrap();
    assert!(store.agent_credential_valid("node-1", "aaa").unwrap());
    assert!(
        !store.agent_credential_valid("node-2", "aaa").unwrap(),
        "bound to its agent"
    );
    assert!(
        store
            .set_agent_credential("node-3", "aaa", Millis(1))
            .is_err(),
        "one token is one agent's"
    );
    // A new credential replaces the old; a revoked one is refused.
    store
        .set_agent_credential("node-1", "ccc", Millis(2))
        .unwrap();
    assert!(!store.agent_credential_valid("node-1", "aaa").unwrap());
    assert!(store.revoke_agent_credential("node-1", Millis(3)).unwrap());
    assert!(!store.revoke_agent_credential("node-1", Millis(4)).unwrap());
    assert!(!store.agent_credential_valid("node-1", "ccc").unwrap());
    assert_eq!(
        store.agent_credentials().unwrap(),
        vec![
            ("node-1".to_string(), Millis(2), Some(Millis(3))),
            ("node-2".to_string(), Millis(1), None)
        ]
    );
}
