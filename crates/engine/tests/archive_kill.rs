//! The engine killed (SIGKILL) while it archives: once a file's manifest row is begun (before or
//! during its upload), once its object is uploaded but not yet recorded, and once it is recorded
//! but its runs not yet deleted. After each kill: no run deleted without a written archive
//! holding it, every written manifest row's object in the store with its size and SHA-256, and
//! every object under `archive/` named by a manifest row. The next runs finish: DuckDB reads
//! exactly the runs the ledger says were due, none twice. On the file store and on SeaweedFS.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use common::*;
use retention_controller::storage::{Storage, StorageSettings};
use sha2::{Digest, Sha256};
use testkit::TestDatabase;
use uuid::Uuid;

/// Every key under `archive/` in the store.
async fn stored(storage: &Storage) -> BTreeSet<String> {
    storage
        .list_all("archive/")
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.key)
        .collect()
}

struct Ledger {
    /// Failed runs past their window: archived, then deleted.
    due: BTreeSet<Uuid>,
    /// Failed runs within it: kept, not archived.
    young: BTreeSet<Uuid>,
}

async fn seed(db: &TestDatabase) -> Ledger {
    let acme: Uuid = sqlx::query_scalar(
        "INSERT INTO tenants (slug, name, data_retention_period, archive_statuses)
         VALUES ('acme', 'Acme', '2 days', '{failed}') RETURNING id",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    // Ten failed runs finished on each of four days (a file each), with an event and a log line.
    let due: Vec<Uuid> = sqlx::query_scalar(
        "WITH t AS (
             INSERT INTO tasks (tenant_id, status, inserted_at, finished_at)
             SELECT $1, 'failed', date_trunc('day', now()) - d * interval '1 day' + interval '1 hour',
                    date_trunc('day', now()) - d * interval '1 day' + interval '2 hours' + n * interval '1 minute'
               FROM generate_series(3, 6) d, generate_series(1, 10) n
             RETURNING id, inserted_at, finished_at, tenant_id),
         e AS (INSERT INTO task_events (tenant_id, task_id, task_inserted_at, event_type, created_at)
               SELECT tenant_id, id, inserted_at, 'failed', finished_at FROM t),
         l AS (INSERT INTO task_logs (tenant_id, task_id, task_inserted_at, created_at, level, line)
               SELECT tenant_id, id, inserted_at, finished_at, 'error', 'card declined' FROM t)
         SELECT id FROM t",
    )
    .bind(acme)
    .fetch_all(&db.pool)
    .await
    .unwrap();
    let young: Vec<Uuid> = sqlx::query_scalar(
        "INSERT INTO tasks (tenant_id, status, inserted_at, finished_at)
         SELECT $1, 'failed', now() - interval '1 day', now() - interval '1 day' FROM generate_series(1, 3)
         RETURNING id",
    )
    .bind(acme)
    .fetch_all(&db.pool)
    .await
    .unwrap();
    Ledger {
        due: due.into_iter().collect(),
        young: young.into_iter().collect(),
    }
}

/// The invariants, at any moment: no run deleted without a written archive holding it; every
/// written file in the store as recorded; every object under `archive/` named by a manifest row.
async fn check(db: &TestDatabase, storage: &Storage, ledger: &Ledger, when: &str) {
    let live: BTreeSet<Uuid> = sqlx::query_scalar("SELECT id FROM tasks")
        .fetch_all(&db.pool)
        .await
        .unwrap()
        .into_iter()
        .collect();
    let archived: BTreeSet<Uuid> = sqlx::query_scalar(
        "SELECT ra.task_id FROM retention_archived_tasks ra JOIN retention_archives a ON a.id = ra.archive_id
          WHERE a.state = 'written'",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap()
    .into_iter()
    .collect();
    let gone: BTreeSet<Uuid> = ledger.due.difference(&live).copied().collect();
    assert!(
        gone.is_subset(&archived),
        "{when}: {} runs deleted without a written archive",
        gone.difference(&archived).count()
    );
    assert!(
        ledger.young.is_subset(&live),
        "{when}: a run within its window went"
    );
    let manifest: Vec<(String, String, Option<i64>, Option<String>)> =
        sqlx::query_as("SELECT object_key, state, bytes, sha256 FROM retention_archives")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    for (key, state, bytes, sha256) in &manifest {
        if state == "written" {
            let content =
                storage.get(key).await.unwrap().unwrap_or_else(|| {
                    panic!("{when}: the written archive {key} is not in the store")
                });
            let digest: String = Sha256::digest(&content)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            assert_eq!(Some(content.len() as i64), *bytes, "{when}: {key}'s size");
            assert_eq!(Some(&digest), sha256.as_ref(), "{when}: {key}'s SHA-256");
        }
    }
    let named: BTreeSet<String> = manifest.iter().map(|(key, ..)| key.clone()).collect();
    let in_store = stored(storage).await;
    assert!(
        in_store.is_subset(&named),
        "{when}: objects under archive/ no manifest row names: {:?}",
        in_store.difference(&named).collect::<Vec<_>>()
    );
}

#[test]
fn the_engine_killed_while_it_archives_deletes_nothing_without_its_archive_on_files() {
    let dir = tempfile::tempdir().unwrap();
    let settings = StorageSettings {
        url: Some(format!("file://{}", dir.path().join("objects").display())),
        ..Default::default()
    };
    killed_while_archiving(settings, dir.path());
}

#[test]
fn the_engine_killed_while_it_archives_deletes_nothing_without_its_archive_on_seaweedfs() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut server = rt.block_on(testkit::seaweed::SeaweedFs::start());
    let dir = tempfile::tempdir().unwrap();
    killed_while_archiving(server.settings("engine"), dir.path());
    rt.block_on(server.stop());
}

fn killed_while_archiving(settings: StorageSettings, scratch: &Path) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let db = rt.block_on(TestDatabase::new());
    let storage = Storage::open(&settings, scratch).unwrap();
    let ledger = rt.block_on(seed(&db));
    let env = store_env(&settings, Credentials::Settings);
    let start = |pace: &str| {
        let mut args = vec!["retention", "run", "--task", "task-history"];
        if !pace.is_empty() {
            args.extend(["--pace", pace]);
        }
        engine()
            .env("DATABASE_URL", &db.url)
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .env("ENGINE__RETENTION__PACING__FEEDBACK", "false")
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };
    let exists = |key: &str| rt.block_on(storage.exists(key)).unwrap();
    // A killed run's lease lasts until it runs out: here it runs out at once (as it would after
    // its time to live).
    let lease_ran_out = || {
        rt.block_on(
            sqlx::query(
                "UPDATE maintenance_tasks SET lease_expires_at = now() WHERE task = 'task-history'",
            )
            .execute(&db.pool),
        )
        .unwrap();
    };
    let manifest = || -> Vec<(String, String)> {
        rt.block_on(
            sqlx::query_as("SELECT object_key, state FROM retention_archives ORDER BY id")
                .fetch_all(&db.pool),
        )
        .unwrap()
    };
    let live = || -> i64 {
        rt.block_on(sqlx::query_scalar("SELECT count(*) FROM tasks").fetch_one(&db.pool))
            .unwrap()
    };

    // Paced: each step is followed by a pause forty times its length, where the kills land.
    type Point<'a> = (&'a str, Box<dyn Fn() -> bool + 'a>);
    let points: Vec<Point> = vec![
        (
            "a manifest row begun, its object not uploaded",
            Box::new(|| {
                manifest()
                    .iter()
                    .any(|(key, state)| state == "writing" && !exists(key))
            }),
        ),
        (
            "an object uploaded, its manifest row not yet written",
            Box::new(|| {
                manifest()
                    .iter()
                    .any(|(key, state)| state == "writing" && exists(key))
            }),
        ),
        (
            "a manifest row written, its runs not yet deleted",
            Box::new(|| {
                let written = manifest().iter().filter(|(_, s)| s == "written").count();
                written > 0 && live() == (ledger.due.len() + ledger.young.len()) as i64
            }),
        ),
    ];
    for (when, reached) in &points {
        let mut run = start("40");
        wait_until(when, Duration::from_secs(120), reached);
        run.kill().unwrap();
        run.wait().unwrap();
        rt.block_on(check(
            &db,
            &storage,
            &ledger,
            &format!("killed with {when}"),
        ));
        lease_ran_out();
    }

    // The next run finishes what the killed ones began.
    let mut run = start("");
    let status = run.wait().unwrap();
    assert!(status.success(), "the run after the kills");
    rt.block_on(check(&db, &storage, &ledger, "after the last run"));
    let live_ids: BTreeSet<Uuid> = rt
        .block_on(sqlx::query_scalar("SELECT id FROM tasks").fetch_all(&db.pool))
        .unwrap()
        .into_iter()
        .collect();
    assert_eq!(live_ids, ledger.young, "every due run went, only those");
    assert!(
        manifest().iter().all(|(_, state)| state == "written"),
        "no file left half written: {:?}",
        manifest()
    );
    // DuckDB reads the files as downloaded from the store.
    let local = scratch.join("downloaded");
    for key in rt.block_on(stored(&storage)) {
        let path = local.join(&key);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, rt.block_on(storage.get(&key)).unwrap().unwrap()).unwrap();
    }
    let read = testkit::duckdb::archived_task_ids(&local);
    let read_set: BTreeSet<Uuid> = read.iter().map(|id| id.parse().unwrap()).collect();
    assert_eq!(read.len(), read_set.len(), "no run twice");
    assert_eq!(
        read_set, ledger.due,
        "exactly the due runs, in the store's files"
    );
}
