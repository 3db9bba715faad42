//! Stored objects are deleted exactly once, and only after their rows are gone: fault injection
//! against the local filesystem and a real S3-compatible server (SeaweedFS, on loopback).
//!
//! After every fault and its recovery the invariants hold: no payload row points at a missing
//! object, no outbox entry is lost (an object whose row went is either deleted or still in the
//! outbox), and after the sweep's grace no object is left without its row.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chrono::Duration as Span;
use common::*;
use repository::payloads::{self, Content, Kind};
use retention_controller::settings::TaskHistorySettings;
use retention_controller::storage::{payload_key, Storage, PAYLOADS_PREFIX};
use retention_controller::tasks::blobs::{BlobsSettings, BlobsTask};
use retention_controller::tasks::task_history::TaskHistoryTask;
use retention_controller::{run_once_with, MaintenanceTask, RunOutcome};
use sqlx::PgPool;
use testkit::seaweed::SeaweedFs;
use uuid::Uuid;

/// The store a test runs against, kept alive for it.
enum Store {
    Files(tempfile::TempDir, Arc<Storage>),
    Seaweed {
        _server: SeaweedFs,
        storage: Arc<Storage>,
    },
}

impl Store {
    async fn files() -> Store {
        let dir = tempfile::tempdir().unwrap();
        let settings = retention_controller::storage::StorageSettings {
            url: Some(format!("file://{}", dir.path().join("objects").display())),
            ..Default::default()
        };
        let storage = Storage::open(&settings, dir.path()).unwrap();
        Store::Files(dir, Arc::new(storage))
    }

    async fn seaweed() -> Store {
        let server = SeaweedFs::start().await;
        let storage = Arc::new(server.storage("engine"));
        Store::Seaweed {
            _server: server,
            storage,
        }
    }

    fn storage(&self) -> Arc<Storage> {
        match self {
            Store::Files(_, s) | Store::Seaweed { storage: s, .. } => s.clone(),
        }
    }
}

fn blobs(storage: Arc<Storage>) -> BlobsTask {
    BlobsTask::new(
        BlobsSettings {
            first_backoff: Duration::from_millis(200),
            batch_size: 100,
            ..Default::default()
        },
        storage,
    )
}

fn history() -> TaskHistoryTask {
    TaskHistoryTask::new(TaskHistorySettings {
        compaction: false,
        ..Default::default()
    })
}

/// Runs `task` once; its error, if it failed.
async fn run(task: &dyn MaintenanceTask, pool: &PgPool) -> Result<(), String> {
    let cancel = tokio_util::sync::CancellationToken::new();
    // A short lease: a run killed below holds it this long.
    let options = retention_controller::RunOptions {
        lease_ttl: Duration::from_secs(1),
        ..fixed_batches()
    };
    match run_once_with(task, pool, &cancel, &options).await {
        Ok(RunOutcome::Ran(_)) => Ok(()),
        Ok(other) => panic!("{} did not run: {other:?}", task.name()),
        Err(error) => Err(format!("{error:?}")),
    }
}

/// Runs `task` once, which must succeed; its report.
async fn report_of(task: &dyn MaintenanceTask, pool: &PgPool) -> retention_controller::RunReport {
    let cancel = tokio_util::sync::CancellationToken::new();
    match run_once_with(task, pool, &cancel, &fixed_batches()).await {
        Ok(RunOutcome::Ran(summary)) => summary.report,
        other => panic!("{} did not run: {other:?}", task.name()),
    }
}

/// `n` finished tasks of `tenant` in a past day, each with an external payload whose object is
/// put in the store first (as a writer does: object, then row). Returns (payload id, key).
async fn seed(
    pool: &PgPool,
    storage: &Storage,
    tenant: Uuid,
    n: usize,
    finished_ago: Span,
) -> Vec<(i64, String)> {
    let at = day_start(db_now(pool).await.date_naive() - Span::days(10)) + Span::hours(12);
    let finished = db_now(pool).await - finished_ago;
    let mut seeded = Vec::new();
    for _ in 0..n {
        let task = insert_task(pool, tenant, "succeeded", at, Some(finished)).await;
        let id = payloads::reserve_id(pool).await.unwrap();
        let key = payload_key(tenant, at.date_naive(), id);
        let bytes = Bytes::from(format!("payload {id}").repeat(10));
        storage.put(&key, bytes.clone()).await.unwrap();
        payloads::insert(
            pool,
            id,
            tenant,
            task,
            Kind::Output,
            &Content::External {
                key: key.clone(),
                size: bytes.len() as i64,
            },
        )
        .await
        .unwrap();
        seeded.push((id, key));
    }
    seeded
}

async fn stored(storage: &Storage) -> BTreeSet<String> {
    storage
        .list_all(PAYLOADS_PREFIX)
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.key)
        .collect()
}

async fn row_keys(pool: &PgPool) -> BTreeSet<String> {
    sqlx::query_scalar("SELECT external_key FROM task_payloads WHERE external_key IS NOT NULL")
        .fetch_all(pool)
        .await
        .unwrap()
        .into_iter()
        .collect()
}

async fn outbox_keys(pool: &PgPool) -> BTreeSet<String> {
    sqlx::query_scalar("SELECT object_key FROM object_deletions")
        .fetch_all(pool)
        .await
        .unwrap()
        .into_iter()
        .collect()
}

/// The invariants: every row's object exists; every stored object has its row or an outbox
/// entry (none is lost track of).
async fn invariants(pool: &PgPool, storage: &Storage) {
    let (rows, outbox, objects) = (
        row_keys(pool).await,
        outbox_keys(pool).await,
        stored(storage).await,
    );
    let missing: Vec<_> = rows.difference(&objects).collect();
    assert!(
        missing.is_empty(),
        "rows point at missing objects: {missing:?}"
    );
    let untracked: Vec<_> = objects
        .iter()
        .filter(|k| !rows.contains(*k) && !outbox.contains(*k))
        .collect();
    assert!(
        untracked.is_empty(),
        "objects with no row and no outbox entry: {untracked:?}"
    );
}

/// Makes every outbox entry due now (the backoff passed).
async fn backoff_passed(pool: &PgPool) {
    sqlx::query("UPDATE object_deletions SET next_attempt_at = now() - interval '1 second'")
        .execute(pool)
        .await
        .unwrap();
}

async fn field_report_case(store: Store) {
    // The field report: a batch of 250 whose 220th row fails after objects were already handled
    // left 200 of 250 rows pointing at deleted files. Here the 220th payload's delete fails; the
    // batch rolls back whole, and no object was touched: they are deleted only after a commit.
    let db = TestDatabase::new().await;
    let pool = &db.pool;
    let storage = store.storage();
    let tenant = insert_tenant(pool, Some("1 day"), None).await;
    let seeded = seed(pool, &storage, tenant, 250, Span::days(3)).await;
    let failing = seeded[219].0;
    sqlx::raw_sql(&format!(
        "CREATE FUNCTION fail_220th() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN IF OLD.id = {failing} THEN RAISE EXCEPTION 'injected: the 220th row fails'; END IF; RETURN OLD; END $$;
         CREATE TRIGGER fail_220th BEFORE DELETE ON task_payloads FOR EACH ROW EXECUTE FUNCTION fail_220th();"
    ))
    .execute(pool)
    .await
    .unwrap();
    let history = TaskHistoryTask::new(TaskHistorySettings {
        compaction: false,
        batch_size: 250,
        ..Default::default()
    });
    let failed = run(&history, pool).await;
    assert!(
        failed.as_ref().is_err_and(|e| e.contains("injected")),
        "{failed:?}"
    );
    run(&blobs(storage.clone()), pool).await.unwrap();
    let all: BTreeSet<String> = seeded.iter().map(|(_, k)| k.clone()).collect();
    assert_eq!(row_keys(pool).await, all, "every row is still there");
    assert_eq!(stored(&storage).await, all, "and every object");
    assert!(outbox_keys(pool).await.is_empty());
    invariants(pool, &storage).await;

    // Once the fault is gone, rows and objects go, each object once.
    sqlx::query("DROP TRIGGER fail_220th ON task_payloads")
        .execute(pool)
        .await
        .unwrap();
    run(&history, pool).await.unwrap();
    assert!(row_keys(pool).await.is_empty());
    assert_eq!(
        outbox_keys(pool).await,
        all,
        "the intents, committed with the deletes"
    );
    assert_eq!(
        stored(&storage).await,
        all,
        "objects wait for the blobs task"
    );
    run(&blobs(storage.clone()), pool).await.unwrap();
    assert!(outbox_keys(pool).await.is_empty());
    assert!(stored(&storage).await.is_empty());
}

async fn killed_between_row_delete_and_object_delete(store: Store) {
    let db = TestDatabase::new().await;
    let pool = &db.pool;
    let storage = store.storage();
    let tenant = insert_tenant(pool, Some("1 day"), None).await;
    let due = seed(pool, &storage, tenant, 120, Span::days(3)).await;
    let kept = seed(pool, &storage, tenant, 30, Span::hours(1)).await;
    // The row deletes commit; the engine dies before any object is deleted (the blobs task never
    // ran). A new engine's blobs task finds the intents.
    run(&history(), pool).await.unwrap();
    invariants(pool, &storage).await;
    let kept_keys: BTreeSet<String> = kept.iter().map(|(_, k)| k.clone()).collect();
    let due_keys: BTreeSet<String> = due.iter().map(|(_, k)| k.clone()).collect();
    assert_eq!(outbox_keys(pool).await, due_keys);
    run(&blobs(storage.clone()), pool).await.unwrap();
    assert!(outbox_keys(pool).await.is_empty());
    assert_eq!(stored(&storage).await, kept_keys);
    assert_eq!(row_keys(pool).await, kept_keys);
    invariants(pool, &storage).await;
}

async fn killed_in_the_middle_of_object_deletes(store: Store) {
    let db = TestDatabase::new().await;
    let pool = &db.pool;
    let storage = store.storage();
    let tenant = insert_tenant(pool, Some("1 day"), None).await;
    let due = seed(pool, &storage, tenant, 600, Span::days(3)).await;
    run(&history(), pool).await.unwrap();
    // Killed at several moments: the run's future dropped (its connections closed, nothing after
    // that point done), once some objects are gone.
    for delay_ms in [1u64, 5, 20, 60] {
        let task = blobs(storage.clone());
        let pool2 = pool.clone();
        let handle = tokio::spawn(async move {
            let _ = run(&task, &pool2).await;
        });
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        handle.abort();
        let _ = handle.await;
        invariants(pool, &storage).await;
        // The killed run's lease runs out.
        tokio::time::sleep(Duration::from_millis(1200)).await;
    }
    // The next run finishes what the killed ones left: an object deleted twice is no error.
    run(&blobs(storage.clone()), pool).await.unwrap();
    assert!(outbox_keys(pool).await.is_empty());
    assert!(
        stored(&storage).await.is_empty(),
        "{} objects left",
        stored(&storage).await.len()
    );
    assert_eq!(due.len(), 600);
}

macro_rules! on_both_stores {
    ($case:ident, $files:ident, $seaweed:ident) => {
        #[tokio::test]
        async fn $files() {
            $case(Store::files().await).await;
        }

        #[tokio::test]
        async fn $seaweed() {
            $case(Store::seaweed().await).await;
        }
    };
}

on_both_stores!(
    field_report_case,
    a_batch_whose_220th_row_fails_leaves_every_row_with_its_object_on_files,
    a_batch_whose_220th_row_fails_leaves_every_row_with_its_object_on_seaweedfs
);
on_both_stores!(
    killed_between_row_delete_and_object_delete,
    killed_after_the_row_deletes_commit_the_objects_still_go_on_files,
    killed_after_the_row_deletes_commit_the_objects_still_go_on_seaweedfs
);
on_both_stores!(
    killed_in_the_middle_of_object_deletes,
    killed_in_the_middle_of_object_deletes_nothing_is_lost_on_files,
    killed_in_the_middle_of_object_deletes_nothing_is_lost_on_seaweedfs
);

#[tokio::test]
async fn a_store_down_for_a_while_delays_deletes_and_loses_nothing() {
    let mut server = SeaweedFs::start().await;
    let storage = Arc::new(server.storage("engine"));
    let db = TestDatabase::new().await;
    let pool = &db.pool;
    let tenant = insert_tenant(pool, Some("1 day"), None).await;
    let due = seed(pool, &storage, tenant, 50, Span::days(3)).await;
    run(&history(), pool).await.unwrap();
    server.stop().await;
    let started = std::time::Instant::now();
    let failed = run(&blobs(storage.clone()), pool).await;
    assert!(
        failed.is_err(),
        "a run against a store that is down fails: {failed:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "and fails in bounded time: {:?}",
        started.elapsed()
    );
    let (failing, errors): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE attempts > 0), count(last_error) FROM object_deletions",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    assert!(failing > 0 && errors == failing, "{failing} {errors}");
    assert_eq!(outbox_keys(pool).await.len(), due.len(), "no intent lost");
    let depth = repository::outbox::depth(pool).await.unwrap();
    assert!(depth.last_error.is_some());
    server.restart().await;
    backoff_passed(pool).await;
    run(&blobs(storage.clone()), pool).await.unwrap();
    assert!(outbox_keys(pool).await.is_empty());
    assert!(stored(&storage).await.is_empty());
    invariants(pool, &storage).await;
}

/// The blobs task against a store that refuses to delete `refused` (and nothing else): the run
/// succeeds, the other objects go with their outbox entries, and only the refused keys wait,
/// tried once each. Once the store is fixed (`fixed`, after `fix`), the next run after their
/// backoff deletes them.
async fn only_the_refused_keys_wait(
    pool: &PgPool,
    refusing: Arc<Storage>,
    fixed: Arc<Storage>,
    refused: &BTreeSet<String>,
    refused_are_listed: bool,
    fix: impl std::future::Future<Output = ()>,
) {
    assert!(!refused.is_empty() && outbox_keys(pool).await.len() > refused.len());
    let outcome = run(&blobs(refusing.clone()), pool).await;
    assert!(
        outcome.is_ok(),
        "some keys failing fails no run: {outcome:?}"
    );
    assert_eq!(
        &outbox_keys(pool).await,
        refused,
        "only the refused keys wait, the others are gone"
    );
    let left = stored(&fixed).await;
    if refused_are_listed {
        assert_eq!(
            &left, refused,
            "the refused objects are all still there, and only they"
        );
    } else {
        // The file store's refused keys are directories, which a listing does not show.
        assert!(
            left.is_subset(refused),
            "every object not refused is deleted"
        );
    }
    let attempts: Vec<i32> = sqlx::query_scalar("SELECT attempts FROM object_deletions")
        .fetch_all(pool)
        .await
        .unwrap();
    assert!(attempts.iter().all(|a| *a == 1), "{attempts:?}");
    let errors: i64 =
        sqlx::query_scalar("SELECT count(*) FROM object_deletions WHERE last_error IS NOT NULL")
            .fetch_one(pool)
            .await
            .unwrap();
    assert_eq!(errors as usize, refused.len(), "each says why it waits");
    invariants(pool, &fixed).await;
    fix.await;
    backoff_passed(pool).await;
    run(&blobs(fixed.clone()), pool).await.unwrap();
    assert!(outbox_keys(pool).await.is_empty());
    assert!(stored(&fixed).await.is_empty());
}

#[tokio::test]
async fn a_store_failing_on_some_keys_retries_them_and_deletes_the_rest_on_files() {
    let store = Store::files().await;
    let Store::Files(dir, storage) = &store else {
        unreachable!()
    };
    let db = TestDatabase::new().await;
    let pool = &db.pool;
    let tenant = insert_tenant(pool, Some("1 day"), None).await;
    let due = seed(pool, storage, tenant, 40, Span::days(3)).await;
    run(&history(), pool).await.unwrap();
    // Ten objects the filesystem refuses to delete: each replaced by a directory that is not
    // empty, under the same name.
    let refused: BTreeSet<String> = due.iter().step_by(4).map(|(_, k)| k.clone()).collect();
    let objects = dir.path().join("objects");
    for key in &refused {
        let path = objects.join(key);
        std::fs::remove_file(&path).unwrap();
        std::fs::create_dir_all(path.join("inside")).unwrap();
    }
    let fix = async {
        for key in &refused {
            let path = objects.join(key);
            std::fs::remove_dir_all(&path).unwrap();
            std::fs::write(&path, b"back").unwrap();
        }
    };
    only_the_refused_keys_wait(pool, storage.clone(), storage.clone(), &refused, false, fix).await;
}

#[tokio::test]
async fn a_store_failing_on_some_keys_retries_them_and_deletes_the_rest_on_seaweedfs() {
    let db = TestDatabase::new().await;
    let pool = &db.pool;
    let allowed = insert_tenant(pool, Some("1 day"), None).await;
    let denied = insert_tenant(pool, Some("1 day"), None).await;
    // The engine's identity may delete the first tenant's objects only: SeaweedFS answers
    // AccessDenied for each of the other's keys in the same bulk delete.
    let server =
        SeaweedFs::start_refusing_writes_outside(&[format!("engine/{PAYLOADS_PREFIX}{allowed}/")])
            .await;
    let full = Arc::new(server.storage("engine"));
    let refusing = Arc::new(
        Storage::open(
            &server.limited_settings("engine"),
            std::env::temp_dir().as_path(),
        )
        .unwrap(),
    );
    seed(pool, &full, allowed, 30, Span::days(3)).await;
    let refused: BTreeSet<String> = seed(pool, &full, denied, 10, Span::days(3))
        .await
        .into_iter()
        .map(|(_, k)| k)
        .collect();
    run(&history(), pool).await.unwrap();
    // The store fixed: the engine's identity may delete everything again.
    only_the_refused_keys_wait(pool, refusing, full, &refused, true, async {}).await;
}

#[tokio::test]
async fn the_sweep_deletes_only_old_objects_no_row_names_and_its_first_run_only_counts() {
    for store in [Store::files().await, Store::seaweed().await] {
        let storage = store.storage();
        let db = TestDatabase::new().await;
        let pool = &db.pool;
        let tenant = insert_tenant(pool, None, None).await;
        let kept = seed(pool, &storage, tenant, 5, Span::days(3)).await;
        // Objects put by writers that died before inserting their rows, in a day of their own:
        // on the file store, the sweep empties (and so removes) that directory as it walks on.
        let orphan_keys: Vec<String> = (0..5)
            .map(|i| payload_key(tenant, db_now_date() - Span::days(1), 1_000_000 + i))
            .collect();
        for key in &orphan_keys {
            storage
                .put(key, Bytes::from_static(b"orphan"))
                .await
                .unwrap();
        }
        tokio::time::sleep(Duration::from_millis(3500)).await;
        // One more, younger than the grace.
        let young = payload_key(tenant, db_now_date(), 2_000_000);
        storage
            .put(&young, Bytes::from_static(b"young"))
            .await
            .unwrap();
        let task = BlobsTask::new(
            BlobsSettings {
                orphan_grace: Duration::from_secs(3),
                sweep_interval: Duration::ZERO,
                // The listing is judged two keys at a time: orphans, kept and young objects
                // share batches.
                batch_size: 2,
                ..Default::default()
            },
            storage.clone(),
        );
        let counted = report_of(&task, pool).await;
        assert!(
            counted.counters.contains(&("orphan objects found", 5))
                && counted.counters.contains(&("objects listed", 11)),
            "{counted:?}"
        );
        assert_eq!(
            stored(&storage).await.len(),
            11,
            "the first sweep only counts"
        );
        let swept = report_of(&task, pool).await;
        assert!(
            swept.counters.contains(&("orphan objects found", 5)),
            "{swept:?}"
        );
        let mut expected: BTreeSet<String> = kept.iter().map(|(_, k)| k.clone()).collect();
        expected.insert(young.clone());
        assert_eq!(
            stored(&storage).await,
            expected,
            "the old orphans went; the young one waits for its grace"
        );
    }
}

fn db_now_date() -> chrono::NaiveDate {
    chrono::Utc::now().date_naive()
}

#[tokio::test]
async fn a_directory_store_that_is_gone_is_down_not_empty() {
    // An unmounted volume answers every delete "not found", which counts as deleted: the outbox
    // would let go of objects that still exist. So a missing directory is a store that is down.
    let store = Store::files().await;
    let Store::Files(dir, storage) = &store else {
        unreachable!()
    };
    let db = TestDatabase::new().await;
    let pool = &db.pool;
    let tenant = insert_tenant(pool, Some("1 day"), None).await;
    let due = seed(pool, storage, tenant, 30, Span::days(3)).await;
    run(&history(), pool).await.unwrap();
    let objects = dir.path().join("objects");
    let away = dir.path().join("unmounted");
    std::fs::rename(&objects, &away).unwrap();
    let failed = run(&blobs(storage.clone()), pool).await;
    assert!(
        failed.as_ref().is_err_and(|e| e.contains("not there")),
        "{failed:?}"
    );
    assert_eq!(outbox_keys(pool).await.len(), due.len(), "no intent let go");
    std::fs::rename(&away, &objects).unwrap();
    run(&blobs(storage.clone()), pool).await.unwrap();
    assert!(outbox_keys(pool).await.is_empty());
    assert!(stored(storage).await.is_empty());
}
