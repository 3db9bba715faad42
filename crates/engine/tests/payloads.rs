//! `engine payload put|get`, and the engine killed (SIGKILL) in the middle of deleting stored
//! objects: the next run deletes what is left, and every invariant holds.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use retention_controller::storage::{Storage, StorageSettings, PAYLOADS_PREFIX};
use testkit::seaweed::SeaweedFs;
use testkit::TestDatabase;

fn put(db: &TestDatabase, objects: &Path, args: &[&str], file: &Path) -> std::process::Output {
    engine()
        .env("DATABASE_URL", &db.url)
        .env(
            "ENGINE__STORAGE__URL",
            format!("file://{}", objects.display()),
        )
        .args(["payload", "put"])
        .args(args)
        .arg(file)
        .output()
        .unwrap()
}

fn stored(objects: &Path) -> BTreeSet<String> {
    fn walk(dir: &Path, root: &Path, into: &mut BTreeSet<String>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, root, into);
            } else {
                into.insert(path.strip_prefix(root).unwrap().display().to_string());
            }
        }
    }
    let mut keys = BTreeSet::new();
    walk(objects, objects, &mut keys);
    keys
}

#[test]
fn a_payload_put_in_the_store_reads_back_and_bad_input_changes_nothing() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let db = rt.block_on(TestDatabase::new());
    let dir = tempfile::tempdir().unwrap();
    let objects = dir.path().join("objects");
    let tenant: uuid::Uuid = rt
        .block_on(
            sqlx::query_scalar(
                "INSERT INTO tenants (slug, name) VALUES ('acme', 'Acme') RETURNING id",
            )
            .fetch_one(&db.pool),
        )
        .unwrap();
    let file = dir.path().join("result.json");
    std::fs::write(&file, b"{\"answer\": 42}").unwrap();
    let task = uuid::Uuid::new_v4().to_string();
    let common = [
        "--tenant",
        "acme",
        "--task",
        task.as_str(),
        "--task-inserted-at",
        "2026-12-01T10:00:00Z",
        "--kind",
        "output",
    ];
    let output = put(
        &db,
        &objects,
        &[&common[..], &["--external"]].concat(),
        &file,
    );
    let (stdout, stderr) = text(&output);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    let printed: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    let id = printed["id"].as_i64().unwrap();
    let key = format!("payloads/{tenant}/2026-12-01/{id}");
    assert_eq!(printed["external_key"], key.as_str());
    assert_eq!(stored(&objects), BTreeSet::from([key.clone()]));
    let got = engine()
        .env("DATABASE_URL", &db.url)
        .env(
            "ENGINE__STORAGE__URL",
            format!("file://{}", objects.display()),
        )
        .args(["payload", "get", &id.to_string()])
        .output()
        .unwrap();
    assert!(got.status.success(), "{:?}", text(&got));
    assert_eq!(got.stdout, b"{\"answer\": 42}");

    // Inline: no object.
    let output = put(&db, &objects, &common, &file);
    assert!(output.status.success(), "{:?}", text(&output));
    assert_eq!(stored(&objects).len(), 1);

    // Bad input: refused with what is wrong, nothing written.
    for (args, says) in [
        (
            vec![
                "--tenant",
                "acme",
                "--task",
                "nope",
                "--task-inserted-at",
                "2026-12-01T10:00:00Z",
                "--kind",
                "input",
            ],
            "is not a task id",
        ),
        (
            vec![
                "--tenant",
                "acme",
                "--task",
                task.as_str(),
                "--task-inserted-at",
                "yesterday",
                "--kind",
                "input",
            ],
            "RFC 3339",
        ),
        (
            vec![
                "--tenant",
                "nobody",
                "--task",
                task.as_str(),
                "--task-inserted-at",
                "2026-12-01T10:00:00Z",
                "--kind",
                "input",
                "--external",
            ],
            "no tenant",
        ),
    ] {
        let output = put(&db, &objects, &args, &file);
        let (_, stderr) = text(&output);
        assert!(!output.status.success());
        assert!(stderr.contains(says), "{stderr}");
    }
    let rows: i64 = rt
        .block_on(sqlx::query_scalar("SELECT count(*) FROM task_payloads").fetch_one(&db.pool))
        .unwrap();
    assert_eq!(rows, 2);
    assert_eq!(stored(&objects).len(), 1);
}

#[test]
fn the_engine_killed_while_deleting_objects_leaves_nothing_behind_on_files() {
    let dir = tempfile::tempdir().unwrap();
    let settings = StorageSettings {
        url: Some(format!("file://{}", dir.path().join("objects").display())),
        ..Default::default()
    };
    killed_while_deleting_objects(settings, dir.path(), Credentials::Settings, None);
}

/// On SeaweedFS, with the credentials in AWS's environment variables (none in the engine's
/// settings), and with the store down for a while after the kill: a run against it is killed
/// too, and nothing is lost.
#[test]
fn the_engine_killed_while_deleting_objects_leaves_nothing_behind_on_seaweedfs() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut server = rt.block_on(SeaweedFs::start());
    let dir = tempfile::tempdir().unwrap();
    killed_while_deleting_objects(
        server.settings("engine"),
        dir.path(),
        Credentials::Environment,
        Some(&mut server),
    );
    rt.block_on(server.stop());
}

fn killed_while_deleting_objects(
    settings: StorageSettings,
    scratch: &Path,
    credentials: Credentials,
    mut seaweed: Option<&mut SeaweedFs>,
) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let db = rt.block_on(TestDatabase::new());
    let pool = db.pool.clone();
    let storage = Storage::open(&settings, scratch).unwrap();
    let env = store_env(&settings, credentials);
    let stored = || -> BTreeSet<String> {
        rt.block_on(storage.list_all(PAYLOADS_PREFIX))
            .unwrap()
            .into_iter()
            .map(|o| o.key)
            .collect()
    };
    // 600 payload rows already deleted: their objects are in the outbox.
    let keys: BTreeSet<String> = rt.block_on(async {
        let tenant: uuid::Uuid = sqlx::query_scalar(
            "INSERT INTO tenants (slug, name) VALUES ('acme', 'Acme') RETURNING id",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        let mut keys = BTreeSet::new();
        for i in 0..600 {
            let key = format!("{PAYLOADS_PREFIX}{tenant}/2026-11-01/{i}");
            storage.put(&key, Bytes::from_static(b"bytes")).await.unwrap();
            keys.insert(key);
        }
        sqlx::query(
            "INSERT INTO object_deletions (object_key, tenant_id, payload_id, task_inserted_at, size_bytes)
             SELECT k, $2, 0, '2026-11-01', 5 FROM unnest($1::text[]) k",
        )
        .bind(keys.iter().cloned().collect::<Vec<_>>())
        .bind(tenant)
        .execute(&pool)
        .await
        .unwrap();
        keys
    });
    assert_eq!(stored(), keys);
    let entries = || -> BTreeSet<String> {
        rt.block_on(sqlx::query_scalar("SELECT object_key FROM object_deletions").fetch_all(&pool))
            .unwrap()
            .into_iter()
            .collect()
    };
    // A killed run's lease lasts until it runs out: here it runs out at once.
    let lease_ran_out = || {
        rt.block_on(
            sqlx::query(
                "UPDATE maintenance_tasks SET lease_expires_at = now() WHERE task = 'blobs'",
            )
            .execute(&pool),
        )
        .unwrap();
    };
    let blobs = |paced: bool| {
        let mut args = vec!["retention", "run", "--task", "blobs"];
        if paced {
            args.extend(["--pace", "20"]);
        }
        engine()
            .env("DATABASE_URL", &db.url)
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .env("ENGINE__RETENTION__BLOBS__BATCH_SIZE", "20")
            .env("ENGINE__RETENTION__PACING__FEEDBACK", "false")
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };
    // Small batches, paced: the kill lands between or inside batches.
    let mut run = blobs(true);
    wait_until("some objects deleted", Duration::from_secs(120), || {
        stored().len() < 500
    });
    run.kill().unwrap();
    run.wait().unwrap();
    let left_objects = stored();
    assert!(!left_objects.is_empty(), "killed before the end");
    let left_entries = entries();
    assert!(
        left_objects.is_subset(&left_entries),
        "every object still there has its outbox entry: {} objects, {} entries",
        left_objects.len(),
        left_entries.len()
    );
    assert!(
        left_entries.len() < keys.len(),
        "some entries removed, after their objects"
    );
    // What an operator sees meanwhile.
    let status = engine()
        .env("DATABASE_URL", &db.url)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .args(["retention", "status", "--json"])
        .output()
        .unwrap();
    let (stdout, stderr) = text(&status);
    assert!(status.status.success(), "{stderr}");
    let line: serde_json::Value = stdout
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|v| v["task"] == "blobs")
        .expect("a line for blobs");
    assert_eq!(
        line["outbox"]["entries"],
        left_entries.len() as i64,
        "{line}"
    );
    assert!(line["outbox"]["oldest_enqueued_at"].is_string(), "{line}");
    lease_ran_out();
    if let Some(server) = seaweed.as_deref_mut() {
        // The store goes down; a run against it is killed while it tries. Nothing is lost.
        rt.block_on(server.stop());
        let mut run = blobs(false);
        wait_until(
            "the run against the store that is down records its failures",
            Duration::from_secs(60),
            || {
                rt.block_on(
                    sqlx::query_scalar::<_, i64>(
                        "SELECT count(*) FROM object_deletions WHERE attempts > 0 AND last_error IS NOT NULL",
                    )
                    .fetch_one(&pool),
                )
                .unwrap()
                    > 0
            },
        );
        let _ = run.kill();
        run.wait().unwrap();
        assert_eq!(
            entries(),
            left_entries,
            "no entry removed while the store is down"
        );
        lease_ran_out();
        rt.block_on(server.restart());
        assert_eq!(stored(), left_objects);
        // Entries a run failed on wait out their backoff: here it passes at once.
        rt.block_on(
            sqlx::query("UPDATE object_deletions SET next_attempt_at = now()").execute(&pool),
        )
        .unwrap();
    }
    // The next run finishes: an object deleted twice is no error.
    let output = blobs(false).wait_with_output().unwrap();
    assert!(output.status.success(), "{:?}", text(&output));
    assert!(entries().is_empty());
    assert!(stored().is_empty());
}
