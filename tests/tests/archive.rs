//! Archive before delete, end to end: a task-history run writes an archiving tenant's due runs
//! to Parquet files in the store, records them, and only then deletes them; DuckDB reads the
//! files back and finds exactly the runs the database says were archived, none twice. A store
//! that refuses leaves every waiting run in place, and other tenants' due runs still go.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;

use chrono::Duration as Span;
use common::*;
use retention_controller::storage::{Storage, StorageSettings};
use sqlx::PgPool;
use uuid::Uuid;

/// `pay` archives its failed runs; `other` archives nothing. Both keep 2 days.
struct Seeded {
    pay: Uuid,
    other: Uuid,
    /// `pay`'s failed tasks past their window (two days of them): to be archived, then deleted.
    archived: BTreeSet<Uuid>,
    /// `pay`'s failed tasks within their window: kept, not archived.
    young: BTreeSet<Uuid>,
}

async fn seed(pool: &PgPool) -> Seeded {
    let now = db_now(pool).await;
    let pay = archiving_tenant(pool, "2 days").await;
    let other = insert_tenant(pool, Some("2 days"), None).await;
    let day1 = day_start(a_past_day(pool).await) + Span::hours(3);
    let day2 = day1 + Span::days(1);
    create_day(pool, day2.date_naive()).await;
    let mut archived = BTreeSet::new();
    // Finished on two days (a file per day of finish), past the 2-day window.
    let finished = [
        day_start((now - Span::days(4)).date_naive()) + Span::hours(1),
        day_start((now - Span::days(3)).date_naive()) + Span::hours(1),
    ];
    for (i, at) in [(0, day1), (1, day2)] {
        for n in 0..15 {
            let key = insert_task(
                pool,
                pay,
                "failed",
                at + Span::minutes(n),
                Some(finished[i] + Span::minutes(n)),
            )
            .await;
            for e in 0..(n % 3) {
                insert_event(pool, pay, key, at + Span::minutes(e)).await;
            }
            sqlx::query("INSERT INTO task_logs (tenant_id, task_id, task_inserted_at, level, line) VALUES ($1, $2, $3, 'error', $4)")
                .bind(pay).bind(key.0).bind(key.1).bind(format!("declined {i}-{n}"))
                .execute(pool).await.unwrap();
            sqlx::query("INSERT INTO task_payloads (tenant_id, task_id, task_inserted_at, kind, location, inline_content, size_bytes) VALUES ($1, $2, $3, 'input', 'inline', '\\x00ff', 2)")
                .bind(pay).bind(key.0).bind(key.1)
                .execute(pool).await.unwrap();
            archived.insert(key.0);
        }
    }
    for n in 0..5 {
        insert_task(
            pool,
            pay,
            "succeeded",
            day1 + Span::minutes(n),
            Some(now - Span::days(3)),
        )
        .await;
        insert_task(
            pool,
            other,
            "failed",
            day1 + Span::minutes(n),
            Some(now - Span::days(3)),
        )
        .await;
    }
    let mut young = BTreeSet::new();
    for n in 0..3 {
        young.insert(
            insert_task(
                pool,
                pay,
                "failed",
                day1 + Span::minutes(n),
                Some(now - Span::days(1)),
            )
            .await
            .0,
        );
    }
    Seeded {
        pay,
        other,
        archived,
        young,
    }
}

/// DuckDB over every file under `dir`: each task id with its event and log counts.
fn duckdb_tasks(dir: &std::path::Path) -> Vec<(String, i64, i64, i64)> {
    testkit::duckdb::rows(
        dir,
        "SELECT task_id, len(events), len(logs), len(payloads) FROM 'archive/**/*.parquet' ORDER BY task_id",
    )
    .into_iter()
    .map(|row| {
        let n = |i: usize| row[i].parse::<i64>().expect("a count");
        (row[0].clone(), n(1), n(2), n(3))
    })
    .collect()
}

#[tokio::test]
async fn due_runs_of_an_archiving_tenant_go_only_after_their_archive_and_duckdb_reads_it() {
    let db = TestDatabase::new().await;
    let pool = &db.pool;
    let s = seed(pool).await;
    let dir = tempfile::tempdir().unwrap();
    let settings = StorageSettings {
        url: Some(format!("file://{}", dir.path().join("objects").display())),
        ..Default::default()
    };
    let storage = Arc::new(Storage::open(&settings, dir.path()).unwrap());

    let report = run_task(&archiving_history(storage), pool).await;

    // Deleted: the archived failed runs, the succeeded ones (not archived), the other tenant's.
    assert_eq!(
        task_ids_of(pool, s.pay, "failed").await,
        s.young,
        "{report:?}"
    );
    assert!(task_ids_of(pool, s.pay, "succeeded").await.is_empty());
    assert!(task_ids_of(pool, s.other, "failed").await.is_empty());
    // The manifest: one file per day of finish, written, holding the 30.
    let files: Vec<(String, String, i64, String, i64)> = sqlx::query_as(
        "SELECT object_key, state, tasks, status, bytes FROM retention_archives WHERE tenant_id = $1 ORDER BY first_day",
    )
    .bind(s.pay)
    .fetch_all(pool)
    .await
    .unwrap();
    assert_eq!(files.len(), 2, "{files:?}");
    for (key, state, tasks, statuses, bytes) in &files {
        assert_eq!(state, "written");
        assert_eq!(*tasks, 15);
        assert_eq!(statuses, "failed");
        let on_disk = std::fs::metadata(dir.path().join("objects").join(key))
            .unwrap()
            .len();
        assert_eq!(on_disk as i64, *bytes, "{key}");
    }
    // DuckDB finds exactly the archived runs, once each, with their events, logs and payloads.
    let read = duckdb_tasks(&dir.path().join("objects"));
    let ids: BTreeSet<Uuid> = read.iter().map(|(id, ..)| id.parse().unwrap()).collect();
    assert_eq!(read.len(), 30, "none twice");
    assert_eq!(ids, s.archived);
    let events: i64 = read.iter().map(|(_, e, _, _)| e).sum();
    assert_eq!(events, 2 * (0..15).map(|n| n % 3).sum::<i64>());
    assert!(read
        .iter()
        .all(|(_, _, logs, payloads)| *logs == 1 && *payloads == 1));
    // The mapping rows of deleted tasks are what let them go; nothing else was archived.
    let archived_rows: i64 = sqlx::query_scalar("SELECT count(*) FROM retention_archived_tasks")
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(archived_rows, 30);
}

/// An archive past its tenant's archive retention leaves through the outbox: the next
/// task-history run deletes its manifest row, gives its object to the outbox and writes a
/// receipt naming the key; the blobs task then deletes the object. The other file stays.
#[tokio::test]
async fn an_expired_archive_leaves_through_the_outbox_with_a_receipt() {
    let db = TestDatabase::new().await;
    let pool = &db.pool;
    let s = seed(pool).await;
    let dir = tempfile::tempdir().unwrap();
    let settings = StorageSettings {
        url: Some(format!("file://{}", dir.path().join("objects").display())),
        ..Default::default()
    };
    let storage = Arc::new(Storage::open(&settings, dir.path()).unwrap());
    run_task(&archiving_history(storage.clone()), pool).await;
    let keys: Vec<String> = sqlx::query_scalar(
        "SELECT object_key FROM retention_archives WHERE tenant_id = $1 ORDER BY first_day",
    )
    .bind(s.pay)
    .fetch_all(pool)
    .await
    .unwrap();
    assert_eq!(keys.len(), 2);
    let (expired, kept) = (&keys[0], &keys[1]);
    sqlx::query("UPDATE retention_archives SET expires_at = now() - interval '1 minute' WHERE object_key = $1")
        .bind(expired)
        .execute(pool)
        .await
        .unwrap();

    let report = run_task(&archiving_history(storage.clone()), pool).await;

    assert!(
        report
            .counters
            .iter()
            .any(|(c, n)| *c == "archives expired" && *n == 1),
        "{report:?}"
    );
    let left: Vec<String> = sqlx::query_scalar("SELECT object_key FROM retention_archives")
        .fetch_all(pool)
        .await
        .unwrap();
    assert_eq!(&left, std::slice::from_ref(kept));
    let outbox: Vec<String> = sqlx::query_scalar("SELECT object_key FROM object_deletions")
        .fetch_all(pool)
        .await
        .unwrap();
    assert_eq!(&outbox, std::slice::from_ref(expired));
    let receipt: (i64, Vec<String>) = sqlx::query_as(
        "SELECT objects, archive_keys FROM retention_receipts WHERE rule = 'archive-expired' AND tenant_id = $1",
    )
    .bind(s.pay)
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!(receipt, (1, vec![expired.clone()]));
    // The first run's receipt named the files it wrote.
    let written: Vec<String> = sqlx::query_scalar(
        "SELECT unnest(archive_keys) FROM retention_receipts WHERE rule = 'archived' AND tenant_id = $1 ORDER BY 1",
    )
    .bind(s.pay)
    .fetch_all(pool)
    .await
    .unwrap();
    assert_eq!(written, keys);

    let blobs = retention_controller::tasks::blobs::BlobsTask::new(
        retention_controller::settings::BlobsSettings::default(),
        storage.clone(),
    );
    run_task(&blobs, pool).await;
    assert!(!storage.exists(expired).await.unwrap());
    assert!(storage.exists(kept).await.unwrap());
    let outbox: i64 = sqlx::query_scalar("SELECT count(*) FROM object_deletions")
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(outbox, 0);
}

#[tokio::test]
async fn a_store_that_refuses_keeps_every_waiting_run_and_others_still_go() {
    let db = TestDatabase::new().await;
    let pool = &db.pool;
    let s = seed(pool).await;
    let dir = tempfile::tempdir().unwrap();
    let settings = StorageSettings {
        url: Some(format!("file://{}", dir.path().join("objects").display())),
        ..Default::default()
    };
    let storage = Arc::new(Storage::open(&settings, dir.path()).unwrap());
    // Then the store's directory becomes a file: every upload fails.
    std::fs::remove_dir_all(dir.path().join("objects")).unwrap();
    std::fs::write(dir.path().join("objects"), b"not a directory").unwrap();

    let report = run_task(&archiving_history(storage), pool).await;

    assert!(
        report
            .counters
            .iter()
            .any(|(c, n)| *c == "archive failures" && *n == 2),
        "one failure per file (a day of finish each; one refused holds back no other): {report:?}"
    );
    let waiting: BTreeSet<Uuid> = s.archived.union(&s.young).copied().collect();
    assert_eq!(
        task_ids_of(pool, s.pay, "failed").await,
        waiting,
        "no run deleted without its archive"
    );
    assert!(task_ids_of(pool, s.pay, "succeeded").await.is_empty());
    assert!(task_ids_of(pool, s.other, "failed").await.is_empty());
    let (written, archived_rows): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM retention_archives WHERE state = 'written'),
                (SELECT count(*) FROM retention_archived_tasks)",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!((written, archived_rows), (0, 0));
}

/// A run died after it began a file (its row `writing`, part of the object uploaded): the next
/// run writes the same key again, with the day's waiting runs, and only then lets them go; a
/// file begun for a tenant that no longer archives goes, object and row.
#[tokio::test]
async fn a_file_begun_by_a_run_that_died_is_written_again_under_its_key() {
    let db = TestDatabase::new().await;
    let pool = &db.pool;
    let s = seed(pool).await;
    let dir = tempfile::tempdir().unwrap();
    let settings = StorageSettings {
        url: Some(format!("file://{}", dir.path().join("objects").display())),
        ..Default::default()
    };
    let storage = Arc::new(Storage::open(&settings, dir.path()).unwrap());
    // The first day's 15 waiting runs, as the run that died had fixed them.
    let (first_at, first_task, last_at, last_task): (chrono::DateTime<chrono::Utc>, Uuid, chrono::DateTime<chrono::Utc>, Uuid) =
        sqlx::query_as(
            "SELECT min(k), (array_agg(id ORDER BY k, id))[1], max(k), (array_agg(id ORDER BY k DESC, id DESC))[1]
               FROM (SELECT id, coalesce(finished_at, inserted_at) AS k FROM tasks
                      WHERE tenant_id = $1 AND status = 'failed' ORDER BY k, id LIMIT 15) f",
        )
        .bind(s.pay)
        .fetch_one(pool)
        .await
        .unwrap();
    let day1 = first_at.date_naive();
    let begun_key = format!("archive/{}/{day1}/failed-died-0.parquet", s.pay);
    let gone_key = format!("archive/{}/{day1}/failed-died-0.parquet", s.other);
    let store = retention_controller::archive::store_id(&storage);
    for (tenant, key) in [(s.pay, &begun_key), (s.other, &gone_key)] {
        sqlx::query(
            "INSERT INTO retention_archives (object_key, store, tenant_id, status, first_at, first_task, last_at, last_task,
                                             tasks, run_id, part, schema_version)
             VALUES ($1, $2, $3, 'failed', $4, $5, $6, $7, 15, gen_random_uuid(), 0, 1)",
        )
        .bind(key)
        .bind(&store)
        .bind(tenant)
        .bind(first_at)
        .bind(first_task)
        .bind(last_at)
        .bind(last_task)
        .execute(pool)
        .await
        .unwrap();
        storage
            .put(key, bytes::Bytes::from_static(b"PAR1 half an upload"))
            .await
            .unwrap();
    }

    run_task(&archiving_history(storage.clone()), pool).await;

    assert_eq!(task_ids_of(pool, s.pay, "failed").await, s.young);
    let rows: Vec<(String, String, i64)> = sqlx::query_as(
        "SELECT object_key, state, tasks FROM retention_archives ORDER BY first_day, object_key",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    // The begun key holds day 1's 15 (and day 2's went to a file of this run); the other
    // tenant's begun file is gone, its object given to the outbox (the blobs task deletes it).
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_eq!(rows[0], (begun_key.clone(), "written".into(), 15));
    assert_eq!(rows[1].1, "written");
    let outbox: Vec<String> = sqlx::query_scalar("SELECT object_key FROM object_deletions")
        .fetch_all(pool)
        .await
        .unwrap();
    assert_eq!(outbox, vec![gone_key.clone()]);
    std::fs::remove_file(dir.path().join("objects").join(&gone_key)).unwrap();
    let read = duckdb_tasks(&dir.path().join("objects"));
    assert_eq!(read.len(), 30, "none twice");
    let ids: BTreeSet<Uuid> = read.iter().map(|(id, ..)| id.parse().unwrap()).collect();
    assert_eq!(ids, s.archived);
}

/// The same against a real S3-compatible store (SeaweedFS on loopback): each file in the
/// manifest is in the store with its size and checksum, and DuckDB reads the downloaded files.
#[tokio::test]
async fn archives_in_an_s3_store_hold_exactly_the_deleted_runs() {
    use sha2::{Digest, Sha256};
    let server = testkit::seaweed::SeaweedFs::start().await;
    let storage = Arc::new(server.storage("engine"));
    let db = TestDatabase::new().await;
    let pool = &db.pool;
    let s = seed(pool).await;

    run_task(&archiving_history(storage.clone()), pool).await;

    assert_eq!(task_ids_of(pool, s.pay, "failed").await, s.young);
    let files: Vec<(String, i64, String)> = sqlx::query_as(
        "SELECT object_key, bytes, sha256 FROM retention_archives WHERE state = 'written' ORDER BY object_key",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    assert_eq!(files.len(), 2);
    let local = tempfile::tempdir().unwrap();
    for (key, bytes, sha256) in &files {
        let stored = storage.get(key).await.unwrap().expect("in the store");
        assert_eq!(stored.len() as i64, *bytes, "{key}");
        let digest: String = Sha256::digest(&stored)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(&digest, sha256, "{key}");
        let path = local.path().join(key);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, &stored).unwrap();
    }
    let read = duckdb_tasks(local.path());
    assert_eq!(read.len(), 30, "none twice");
    let ids: BTreeSet<Uuid> = read.iter().map(|(id, ..)| id.parse().unwrap()).collect();
    assert_eq!(ids, s.archived);
}

/// A record always names a written archive, and an archive named by a record is never deleted:
/// checked once per statement (migration 18) in place of the per-row foreign key, both ways,
/// and a refused statement changes nothing.
#[tokio::test]
async fn a_record_names_a_written_archive_and_a_named_archive_cannot_be_deleted() {
    let db = TestDatabase::new().await;
    let pool = &db.pool;
    let tenant = insert_tenant(pool, Some("2 days"), None).await;
    let archive = |state: &'static str| {
        sqlx::query_scalar::<_, i64>(
            "INSERT INTO retention_archives (object_key, store, tenant_id, status, first_at, first_task, last_at, last_task,
                                             run_id, part, state, tasks, bytes, sha256, written_at, schema_version)
             VALUES ('archive/' || gen_random_uuid(), 'file:///x', $1, 'failed', now(), gen_random_uuid(), now(),
                     gen_random_uuid(), gen_random_uuid(), 0, $2, 1,
                     CASE WHEN $2 = 'written' THEN 1 END, CASE WHEN $2 = 'written' THEN 'ab' END,
                     CASE WHEN $2 = 'written' THEN now() END, 1)
             RETURNING id",
        )
        .bind(tenant)
        .bind(state)
    };
    let writing = archive("writing").fetch_one(pool).await.unwrap();
    let written = archive("written").fetch_one(pool).await.unwrap();
    let record = |archive_id: i64| {
        sqlx::query(
            "INSERT INTO retention_archived_tasks (task_inserted_at, task_id, archive_id, status, finished_at, events, payloads, logs)
             VALUES (now(), gen_random_uuid(), $1, 'failed', now(), 0, 0, 0)",
        )
        .bind(archive_id)
    };
    for (id, what) in [(writing, "a begun archive"), (written + 1000, "no archive")] {
        let error = record(id).execute(pool).await.unwrap_err().to_string();
        assert!(
            error.contains(&format!(
                "names archive {id}, which is not a written archive"
            )),
            "a record of {what}: {error}"
        );
    }
    record(written).execute(pool).await.unwrap();
    let error = sqlx::query("DELETE FROM retention_archives WHERE id = $1")
        .bind(written)
        .execute(pool)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        error.contains(&format!("archive {written} is still named")),
        "{error}"
    );
    let (archives, records, outbox): (i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM retention_archives), (SELECT count(*) FROM retention_archived_tasks),
                (SELECT count(*) FROM object_deletions)",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!((archives, records, outbox), (2, 1, 0), "nothing changed");
    let error = sqlx::query("TRUNCATE retention_archives")
        .execute(pool)
        .await
        .unwrap_err()
        .to_string();
    assert!(error.contains("cannot be truncated"), "{error}");
    // Once its records are gone, it goes (its object to the outbox).
    sqlx::query("DELETE FROM retention_archived_tasks")
        .execute(pool)
        .await
        .unwrap();
    sqlx::query("DELETE FROM retention_archives WHERE id = $1")
        .bind(written)
        .execute(pool)
        .await
        .unwrap();
}

/// A rewrite dropped archived runs; before its count, the application writes a log line to one
/// of them (a late row: in no archive), another's line goes by another rule, and the
/// application deletes, with its rows, a run the copy kept (an event written after its archive
/// made it differ). The count counts exactly the runs the rewrite dropped, with their events and
/// the payloads and lines it deleted (the receipt is exact), deletes the payloads and lines
/// their archive holds, and leaves the late line, counted as a late row.
#[tokio::test]
async fn a_log_line_written_between_a_rewrites_swap_and_its_count_stays_and_the_count_is_exact() {
    use repository::batch::BatchLimits;
    use repository::history::rewrite::swap;
    use retention_controller::rewrites::{self, Naming, Outcome, Steps};
    use retention_controller::{RunContext, RunOptions, RunReport};
    use std::time::Duration;

    let db = TestDatabase::new().await;
    let pool = &db.pool;
    let now = db_now(pool).await;
    let tenant = archiving_tenant(pool, "2 days").await;
    let at = day_start(a_past_day(pool).await) + Span::hours(12);
    let finished = Some(now - Span::days(3));
    let log_line = |task: TaskKey, line: &'static str| {
        sqlx::query_scalar::<_, i64>(
            "INSERT INTO task_logs (tenant_id, task_id, task_inserted_at, created_at, level, line)
             VALUES ($1, $2, $3, $3, 'info', $4) RETURNING id",
        )
        .bind(tenant)
        .bind(task.0)
        .bind(task.1)
        .bind(line)
    };
    let mut runs = Vec::new();
    for _ in 0..4 {
        let task = insert_task(pool, tenant, "failed", at, finished).await;
        for _ in 0..2 {
            insert_event(pool, tenant, task, at).await;
        }
        sqlx::query(
            "INSERT INTO task_payloads (tenant_id, task_id, task_inserted_at, kind, location, inline_content, size_bytes, created_at)
             VALUES ($1, $2, $3, 'output', 'inline', '\\x00', 1, $3)",
        )
        .bind(tenant)
        .bind(task.0)
        .bind(task.1)
        .execute(pool)
        .await
        .unwrap();
        log_line(task, "archived").fetch_one(pool).await.unwrap();
        runs.push(task);
    }
    // Recorded as the archive step records them (a written archive holding each as it is).
    let archive: i64 = sqlx::query_scalar(
        "INSERT INTO retention_archives (object_key, store, tenant_id, status, first_at, first_task, last_at, last_task,
                                         run_id, part, state, tasks, bytes, sha256, schema_version, written_at)
         VALUES ('archive/x.parquet', 'file:///x', $1, 'failed', now(), gen_random_uuid(), now(), gen_random_uuid(),
                 gen_random_uuid(), 0, 'written', 4, 1, 'ab', 1, now())
         RETURNING id",
    )
    .bind(tenant)
    .fetch_one(pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO retention_archived_tasks (task_id, task_inserted_at, archive_id, status, finished_at, events, payloads, logs,
                                               max_event_id, max_payload_id, max_log_id)
         SELECT t.id, t.inserted_at, $2, t.status, t.finished_at,
                (SELECT count(*) FROM task_events e WHERE e.task_id = t.id),
                (SELECT count(*) FROM task_payloads p WHERE p.task_id = t.id),
                (SELECT count(*) FROM task_logs l WHERE l.task_id = t.id),
                (SELECT max(id) FROM task_events e WHERE e.task_id = t.id),
                (SELECT max(id) FROM task_payloads p WHERE p.task_id = t.id),
                (SELECT max(id) FROM task_logs l WHERE l.task_id = t.id)
           FROM tasks t WHERE t.tenant_id = $1",
    )
    .bind(tenant)
    .bind(archive)
    .execute(pool)
    .await
    .unwrap();
    // The fourth run gets an event after its archive: the copy keeps it (it waits for a new one).
    let kept = runs[3];
    insert_event(pool, tenant, kept, at).await;

    let limits = BatchLimits::new(Duration::from_secs(30), Duration::from_secs(5))
        .with_generic_plans()
        .with_history_write();
    let range = range_at(pool, at).await;
    let run_id = uuid::Uuid::now_v7();
    let id = rewrite_copied(
        pool,
        run_id,
        &range,
        now,
        Duration::from_secs(86_400),
        limits,
    )
    .await;
    let swapped = swap::swap(pool, id, limits, Duration::from_secs(5))
        .await
        .unwrap();
    assert!(swapped.is_ok(), "{swapped:?}");
    // The three dropped runs are out of the live tables; a log line comes for the first one.
    // The second's line goes by another rule first (as the log window or the orphan sweep
    // would take it). The application deletes the kept run, with its rows.
    let late = log_line(runs[0], "late").fetch_one(pool).await.unwrap();
    sqlx::query("DELETE FROM task_logs WHERE task_id = $1 AND task_inserted_at = $2")
        .bind(runs[1].0)
        .bind(runs[1].1)
        .execute(pool)
        .await
        .unwrap();
    for table in ["task_events", "task_payloads", "task_logs"] {
        sqlx::query(&format!(
            "DELETE FROM {table} WHERE task_id = $1 AND task_inserted_at = $2"
        ))
        .bind(kept.0)
        .bind(kept.1)
        .execute(pool)
        .await
        .unwrap();
    }
    sqlx::query("DELETE FROM tasks WHERE id = $1 AND inserted_at = $2")
        .bind(kept.0)
        .bind(kept.1)
        .execute(pool)
        .await
        .unwrap();

    let ctx = RunContext::new(
        pool.clone(),
        run_id,
        tokio_util::sync::CancellationToken::new(),
        Duration::from_secs(600),
        RunOptions::default(),
    )
    .with_clock(now, tokio::time::Instant::now());
    let steps = Steps {
        limits,
        lock_timeout: Duration::from_secs(5),
        grace: Duration::from_secs(86_400),
    };
    let mut report = RunReport::default();
    let outcome = rewrites::advance(&ctx, id, steps, Naming::Rules, &mut report)
        .await
        .unwrap();
    assert!(matches!(outcome, Outcome::Done(_)), "{outcome:?}");

    let (tasks_left, logs_left, payloads_left): (i64, Vec<i64>, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM tasks WHERE tenant_id = $1),
                (SELECT coalesce(array_agg(id ORDER BY id), '{}') FROM task_logs WHERE tenant_id = $1),
                (SELECT count(*) FROM task_payloads WHERE tenant_id = $1)",
    )
    .bind(tenant)
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!(tasks_left, 0);
    assert_eq!(logs_left, vec![late], "only the late line stays");
    assert_eq!(payloads_left, 0);
    let (tasks, events, payloads, logs): (i64, i64, i64, i64) = sqlx::query_as(
        "SELECT coalesce(sum(tasks), 0)::bigint, coalesce(sum(events), 0)::bigint,
                coalesce(sum(payloads), 0)::bigint, coalesce(sum(logs), 0)::bigint
           FROM retention_receipts WHERE tenant_id = $1 AND rule = 'retention'",
    )
    .bind(tenant)
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!(
        (tasks, events, payloads, logs),
        (3, 6, 3, 2),
        "every run the rewrite dropped, with its events and what the count deleted; not the run it kept"
    );
    assert_eq!(repository::archives::late_rows(pool).await.unwrap(), 1);
}
