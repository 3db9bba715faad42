//! Archive before delete when the store fails for a while (issue 26's fault section): a store
//! that is down, then back; a store that refuses one key. While it fails, an archiving tenant's
//! due runs wait (every one of them), and everything else goes as usual; after it recovers, the
//! next run archives and deletes exactly the runs that waited, every manifest row is `written`
//! with its object (size and SHA-256 as recorded), no object is without its manifest row, and
//! DuckDB reads back exactly the deleted runs, each once. Against SeaweedFS on loopback and the
//! file store.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use chrono::{Duration as Span, NaiveDate};
use common::*;
use retention_controller::settings::BlobsSettings;
use retention_controller::storage::{Storage, StorageSettings};
use retention_controller::tasks::blobs::BlobsTask;
use retention_controller::RunReport;
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use uuid::Uuid;

/// `pay` archives its failed runs; `other` archives nothing. Both keep 2 days.
struct Seeded {
    pay: Uuid,
    other: Uuid,
    /// The days of finish of `pay`'s due failed runs, oldest first (5, 4 and 3 days ago).
    days: Vec<NaiveDate>,
    /// `pay`'s due failed runs, by day of finish (as `days`): each day's go into a file of its own.
    due: Vec<BTreeSet<Uuid>>,
    /// `pay`'s failed runs within their window: kept, never archived.
    young: BTreeSet<Uuid>,
}

impl Seeded {
    fn all_due(&self) -> BTreeSet<Uuid> {
        self.due.iter().flatten().copied().collect()
    }
}

/// Events of the due runs: `n % 3` for the n-th of each of 3 days (0, 1, 2, 0, 1, 2, 0, 1).
const DUE_EVENTS: i64 = 3 * 7;

async fn seed(pool: &PgPool) -> Seeded {
    let now = db_now(pool).await;
    let pay = archiving_tenant(pool, "2 days").await;
    let other = insert_tenant(pool, Some("2 days"), None).await;
    let at = day_start(a_past_day(pool).await) + Span::hours(3);
    let days: Vec<NaiveDate> = [5, 4, 3]
        .into_iter()
        .map(|d| (now - Span::days(d)).date_naive())
        .collect();
    let mut due = Vec::new();
    for (i, day) in days.iter().enumerate() {
        let mut of_day = BTreeSet::new();
        for n in 0..8 {
            let finished = day_start(*day) + Span::hours(1) + Span::minutes(n);
            let key = insert_task(pool, pay, "failed", at + Span::minutes(n), Some(finished)).await;
            for e in 0..(n % 3) {
                insert_event(pool, pay, key, at + Span::minutes(e)).await;
            }
            sqlx::query("INSERT INTO task_logs (tenant_id, task_id, task_inserted_at, level, line) VALUES ($1, $2, $3, 'error', $4)")
                .bind(pay).bind(key.0).bind(key.1).bind(format!("declined {i}-{n}"))
                .execute(pool).await.unwrap();
            of_day.insert(key.0);
        }
        due.push(of_day);
    }
    let mut young = BTreeSet::new();
    for n in 0..3 {
        let finished = now - Span::days(1) + Span::minutes(n);
        young.insert(
            insert_task(pool, pay, "failed", at + Span::minutes(n), Some(finished))
                .await
                .0,
        );
    }
    // Due, and not waiting for any archive: a status `pay` does not archive, and `other`'s.
    for n in 0..4 {
        let finished = Some(now - Span::days(3) + Span::minutes(n));
        insert_task(pool, pay, "succeeded", at + Span::minutes(n), finished).await;
        insert_task(pool, other, "failed", at + Span::minutes(n), finished).await;
    }
    Seeded {
        pay,
        other,
        days,
        due,
        young,
    }
}

fn counter(report: &RunReport, name: &str) -> u64 {
    report
        .counters
        .iter()
        .filter(|(c, _)| *c == name)
        .map(|(_, n)| n)
        .sum()
}

/// The manifest: (key, state), by id.
async fn manifest(pool: &PgPool) -> Vec<(String, String)> {
    sqlx::query_as("SELECT object_key, state FROM retention_archives ORDER BY id")
        .fetch_all(pool)
        .await
        .unwrap()
}

async fn archived_records(pool: &PgPool) -> BTreeSet<Uuid> {
    sqlx::query_scalar("SELECT task_id FROM retention_archived_tasks")
        .fetch_all(pool)
        .await
        .unwrap()
        .into_iter()
        .collect()
}

/// What a run with the store failing must leave: `waiting` (the archiving tenant's due runs
/// whose file was not written) and the young ones, and nothing else of the tenant's or of
/// `other`'s due runs. Prints and returns the manifest.
async fn check_waiting(
    pool: &PgPool,
    s: &Seeded,
    waiting: &BTreeSet<Uuid>,
    report: &RunReport,
    what: &str,
) -> Vec<(String, String)> {
    let expected: BTreeSet<Uuid> = waiting.union(&s.young).copied().collect();
    assert_eq!(
        task_ids_of(pool, s.pay, "failed").await,
        expected,
        "{what}: no run deleted without its archive, and none kept that had one; {report:?}"
    );
    assert!(
        task_ids_of(pool, s.pay, "succeeded").await.is_empty(),
        "{what}"
    );
    assert!(
        task_ids_of(pool, s.other, "failed").await.is_empty(),
        "{what}"
    );
    let rows = manifest(pool).await;
    eprintln!("{what}: {report:?}\n{what}: manifest {rows:#?}");
    rows
}

/// (key, state, tasks, bytes, sha256): bytes and sha256 are NULL while `writing`.
type ManifestRow = (String, String, i64, Option<i64>, Option<String>);

/// After the store recovered and a run went through: every manifest row is `written`, its object
/// is in the store with the recorded size and SHA-256, the store holds no other object (with
/// `extra_listed`: e.g. every file under a file store's directory, which the listing may skip),
/// the records name exactly `recorded` (those of the last run: a run forgets the records of
/// tasks deleted before it), and DuckDB reads exactly `deleted` back, each once. Returns the keys.
async fn check_archives(
    pool: &PgPool,
    storage: &Storage,
    deleted: &BTreeSet<Uuid>,
    recorded: &BTreeSet<Uuid>,
    events: i64,
    extra_listed: BTreeSet<String>,
) -> BTreeSet<String> {
    let rows: Vec<ManifestRow> = sqlx::query_as(
        "SELECT object_key, state, tasks, bytes, sha256 FROM retention_archives ORDER BY id",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    let local = tempfile::tempdir().unwrap();
    let mut keys = BTreeSet::new();
    for (key, state, _, bytes, sha256) in &rows {
        assert_eq!(
            state, "written",
            "no manifest row left unfinished: {rows:#?}"
        );
        let stored = storage
            .get(key)
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("no manifest row without its object: {key} is missing"));
        assert_eq!(Some(stored.len() as i64), *bytes, "{key}");
        let digest: String = Sha256::digest(&stored)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(Some(&digest), sha256.as_ref(), "{key}");
        let path = local.path().join(key);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, &stored).unwrap();
        keys.insert(key.clone());
    }
    let tasks: i64 = rows.iter().map(|r| r.2).sum();
    assert_eq!(tasks, deleted.len() as i64, "{rows:#?}");
    let mut listed: BTreeSet<String> = storage
        .list_all("")
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.key)
        .collect();
    listed.extend(extra_listed);
    assert_eq!(listed, keys, "no object without its manifest row");
    assert_eq!(&archived_records(pool).await, recorded);
    let read = testkit::duckdb::rows(
        local.path(),
        "SELECT task_id, len(events), len(logs) FROM 'archive/**/*.parquet' ORDER BY task_id",
    );
    let ids: Vec<Uuid> = read.iter().map(|r| r[0].parse().unwrap()).collect();
    assert_eq!(ids.len(), deleted.len(), "none twice: {ids:?}");
    assert_eq!(&ids.iter().copied().collect::<BTreeSet<_>>(), deleted);
    let read_events: i64 = read.iter().map(|r| r[1].parse::<i64>().unwrap()).sum();
    assert_eq!(read_events, events);
    assert!(
        read.iter().all(|r| r[2] == "1"),
        "one log line each: {read:?}"
    );
    keys
}

/// The `blobs` task with an orphan sweep of 1 s grace that deletes: after the manifest and the
/// store agree, it must delete no archive (and drain the outbox of any forgotten file's key).
async fn sweep_and_drain(pool: &PgPool, storage: Arc<Storage>, keys: &BTreeSet<String>) {
    let outbox: Vec<String> = sqlx::query_scalar("SELECT object_key FROM object_deletions")
        .fetch_all(pool)
        .await
        .unwrap();
    eprintln!("outbox before blobs: {outbox:?}");
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let blobs = BlobsTask::new(BlobsSettings::default(), storage.clone())
        .with_sweep(std::time::Duration::from_secs(1), Some(false));
    let report = run_task(&blobs, pool).await;
    let outbox: Vec<String> = sqlx::query_scalar("SELECT object_key FROM object_deletions")
        .fetch_all(pool)
        .await
        .unwrap();
    assert!(outbox.is_empty(), "{outbox:?}; {report:?}");
    for key in keys {
        assert!(
            storage.exists(key).await.unwrap(),
            "{key} survives blobs: {report:?}"
        );
    }
}

/// Every file under `dir`, relative, `/`-separated.
fn files_under(dir: &Path) -> BTreeSet<String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeSet<String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(root, &path, out);
            } else {
                let rel = path.strip_prefix(root).unwrap();
                out.insert(rel.to_string_lossy().replace('\\', "/"));
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(dir, dir, &mut out);
    out
}

/// A file store in a temporary directory: (the directory, its objects directory, the store).
fn file_store() -> (tempfile::TempDir, PathBuf, Arc<Storage>) {
    let dir = tempfile::tempdir().unwrap();
    let objects = dir.path().join("objects");
    let settings = StorageSettings {
        url: Some(format!("file://{}", objects.display())),
        ..Default::default()
    };
    let storage = Arc::new(Storage::open(&settings, dir.path()).unwrap());
    (dir, objects, storage)
}

/// Two runs while the store is down (a store down "for a while" spans runs): every due run of
/// `pay` waits, nothing is `written` or recorded. Returns the manifest (its `writing` rows).
async fn runs_while_down(
    pool: &PgPool,
    s: &Seeded,
    storage: Arc<Storage>,
    label: &str,
) -> Vec<(String, String)> {
    let mut after_down = Vec::new();
    for attempt in 1..=2 {
        let what = format!("{label}, store down, run {attempt}");
        let report = run_task(&archiving_history(storage.clone()), pool).await;
        assert_eq!(
            counter(&report, "archive failures"),
            3,
            "{what}: one per file (a day of finish each): {report:?}"
        );
        assert_eq!(
            counter(&report, "archive files written"),
            0,
            "{what}: {report:?}"
        );
        let rows = check_waiting(pool, s, &s.all_due(), &report, &what).await;
        assert!(
            rows.iter().all(|(_, state)| state == "writing"),
            "{what}: no `written` manifest row while the store is down: {rows:#?}"
        );
        assert!(archived_records(pool).await.is_empty(), "{what}");
        // A file begun for each day of finish (a refused one holds back no other), and the
        // second run retries those under their keys rather than beginning more for the same
        // runs: an outage costs one manifest row per file, however many runs it spans.
        assert_eq!(rows.len(), 3, "{what}: {rows:#?}");
        if attempt == 2 {
            assert_eq!(
                rows, after_down,
                "{what}: the same begun files, no new ones"
            );
        }
        after_down = rows;
    }
    after_down
}

/// The run after the store came back: no failure, exactly the young runs left, a file per day
/// of finish holding exactly the due runs (see `check_archives`; `files` lists the store's own
/// files, when it has them, after the run), and the outbox drained by `blobs`. Returns the keys.
async fn recovered(
    pool: &PgPool,
    s: &Seeded,
    storage: &Arc<Storage>,
    label: &str,
    files: impl Fn() -> BTreeSet<String>,
) -> BTreeSet<String> {
    let report = run_task(&archiving_history(storage.clone()), pool).await;

    assert_eq!(counter(&report, "archive failures"), 0, "{report:?}");
    assert_eq!(
        task_ids_of(pool, s.pay, "failed").await,
        s.young,
        "{report:?}"
    );
    eprintln!(
        "{label} back: {report:?}\nmanifest {:#?}",
        manifest(pool).await
    );
    let keys = check_archives(
        pool,
        storage,
        &s.all_due(),
        &s.all_due(),
        DUE_EVENTS,
        files(),
    )
    .await;
    assert_eq!(keys.len(), 3, "a file per day of finish: {keys:?}");
    sweep_and_drain(pool, storage.clone(), &keys).await;
    keys
}

#[tokio::test]
async fn an_archiving_tenants_runs_wait_while_seaweedfs_is_down_then_go_with_their_archive() {
    let mut server = testkit::seaweed::SeaweedFs::start().await;
    let storage = Arc::new(server.storage("engine"));
    let db = TestDatabase::new().await;
    let pool = &db.pool;
    let s = seed(pool).await;

    server.stop().await;
    let writing = runs_while_down(pool, &s, storage.clone(), "SeaweedFS").await;
    eprintln!(
        "SeaweedFS down: {} `writing` rows after two runs",
        writing.len()
    );
    server.restart().await;

    let keys = recovered(pool, &s, &storage, "SeaweedFS", BTreeSet::new).await;
    let listed = storage.list_all("").await.unwrap().len();
    assert_eq!(listed, keys.len());
}

#[tokio::test]
async fn an_archiving_tenants_runs_wait_while_the_file_store_is_down_then_go_with_their_archive() {
    let db = TestDatabase::new().await;
    let pool = &db.pool;
    let s = seed(pool).await;
    let (_dir, objects, storage) = file_store();
    // Down from the start: its directory is a file, every upload fails.
    std::fs::remove_dir_all(&objects).unwrap();
    std::fs::write(&objects, b"not a directory").unwrap();

    let writing = runs_while_down(pool, &s, storage.clone(), "file store").await;
    eprintln!(
        "file store down: {} `writing` rows after two runs",
        writing.len()
    );
    std::fs::remove_file(&objects).unwrap();
    std::fs::create_dir(&objects).unwrap();

    let keys = recovered(pool, &s, &storage, "file store", || files_under(&objects)).await;
    assert_eq!(files_under(&objects), keys);
}

/// The file store refuses the keys of one day of finish (`refused`, an index into
/// [`Seeded::days`]): its day directory is a plain file. That day's runs wait; the other days'
/// go with their archives ("a store that ... refuses a key fails that file only",
/// docs/operations.md). Once the obstruction is gone, the next run archives and deletes the rest.
async fn one_day_refused(refused: usize) {
    let db = TestDatabase::new().await;
    let pool = &db.pool;
    let s = seed(pool).await;
    let (_dir, objects, storage) = file_store();
    let day_dir = objects
        .join("archive")
        .join(s.pay.to_string())
        .join(s.days[refused].to_string());
    std::fs::create_dir_all(day_dir.parent().unwrap()).unwrap();
    std::fs::write(&day_dir, b"not a directory").unwrap();
    let obstruction = day_dir
        .strip_prefix(&objects)
        .unwrap()
        .to_string_lossy()
        .into_owned();

    let report = run_task(&archiving_history(storage.clone()), pool).await;

    let survivors = task_ids_of(pool, s.pay, "failed").await;
    let kept_days: Vec<NaiveDate> = (0..s.days.len())
        .filter(|&i| s.due[i].is_subset(&survivors))
        .map(|i| s.days[i])
        .collect();
    let what = format!(
        "the key of {} refused (due runs of {:?}; those of {kept_days:?} still there)",
        s.days[refused], s.days
    );
    let rows = check_waiting(pool, &s, &s.due[refused], &report, &what).await;
    assert_eq!(
        counter(&report, "archive failures"),
        1,
        "{what}: {report:?}"
    );
    let gone: BTreeSet<Uuid> = s.all_due().difference(&s.due[refused]).copied().collect();
    assert_eq!(archived_records(pool).await, gone, "{what}");
    let writing: Vec<&String> = rows
        .iter()
        .filter(|r| r.1 == "writing")
        .map(|r| &r.0)
        .collect();
    assert_eq!(
        writing.len(),
        1,
        "{what}: the refused file, begun: {rows:#?}"
    );
    let written = rows.iter().filter(|r| r.1 == "written").count();
    assert_eq!(written, s.days.len() - 1, "{what}: {rows:#?}");

    std::fs::remove_file(&day_dir).unwrap();
    let report = run_task(&archiving_history(storage.clone()), pool).await;

    assert_eq!(counter(&report, "archive failures"), 0, "{report:?}");
    assert_eq!(
        task_ids_of(pool, s.pay, "failed").await,
        s.young,
        "{report:?}"
    );
    eprintln!(
        "{what}, then not: {report:?}\nmanifest {:#?}",
        manifest(pool).await
    );
    let keys = check_archives(
        pool,
        &storage,
        &s.all_due(),
        &s.due[refused],
        DUE_EVENTS,
        files_under(&objects),
    )
    .await;
    assert_eq!(keys.len(), 3, "a file per day of finish: {keys:?}");
    assert!(!keys.iter().any(|k| k == &obstruction));
    sweep_and_drain(pool, storage.clone(), &keys).await;
    assert_eq!(files_under(&objects), keys);
}

#[tokio::test]
async fn a_file_store_refusing_the_middle_days_key_keeps_only_that_days_runs() {
    one_day_refused(1).await;
}

#[tokio::test]
async fn a_file_store_refusing_the_last_days_key_keeps_only_that_days_runs() {
    one_day_refused(2).await;
}
