//! Object storage for offloaded payloads (issue 24), against a directory and against a real
//! S3-compatible server (SeaweedFS, started by the test): one contract for both, and what a
//! caller sees while the server is down.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::{NaiveDate, Utc};
use retention_controller::storage::{
    payload_key, Deleted, Location, Storage, StorageError, StorageSettings, PAYLOADS_PREFIX,
};
use testkit::seaweed::SeaweedFs;
use uuid::Uuid;

/// What a delete of a missing key reports: a directory knows the object was missing; S3 answers
/// a delete the same whether the object existed or not.
const FILE_MISSING: Deleted = Deleted::WasMissing;
const S3_MISSING: Deleted = Deleted::Removed;

fn day(d: u32) -> NaiveDate {
    NaiveDate::from_ymd_opt(2026, 3, d).unwrap()
}

async fn listed(storage: &Storage, prefix: &str) -> BTreeMap<String, u64> {
    storage
        .list_all(prefix)
        .await
        .unwrap()
        .into_iter()
        .map(|o| (o.key, o.size))
        .collect()
}

/// The contract every store keeps; `missing` is what deleting a missing key reports there.
async fn keeps_the_contract(storage: &Storage, missing: Deleted) {
    let (tenant_a, tenant_b) = (Uuid::new_v4(), Uuid::new_v4());
    let payloads: Vec<(String, Bytes)> = vec![
        (
            payload_key(tenant_a, day(1), 1),
            Bytes::from_static(b"{\"input\": 1}"),
        ),
        (
            payload_key(tenant_a, day(1), 2),
            Bytes::from(vec![7u8; 70_000]),
        ),
        (payload_key(tenant_a, day(2), 3), Bytes::new()),
        (
            payload_key(tenant_b, day(1), 4),
            Bytes::from_static(b"tenant b"),
        ),
    ];
    let started = Utc::now();
    for (key, body) in &payloads {
        storage.put(key, body.clone()).await.unwrap();
    }

    // Round trips, and what a missing key reads as.
    for (key, body) in &payloads {
        assert_eq!(
            storage.get(key).await.unwrap().as_ref(),
            Some(body),
            "{key}"
        );
        assert!(storage.exists(key).await.unwrap(), "{key}");
    }
    let never = payload_key(tenant_a, day(1), 999);
    assert_eq!(storage.get(&never).await.unwrap(), None);
    assert!(!storage.exists(&never).await.unwrap());

    // A put replaces.
    let (key, _) = &payloads[0];
    storage
        .put(key, Bytes::from_static(b"{\"input\": 2}"))
        .await
        .unwrap();
    assert_eq!(
        storage.get(key).await.unwrap(),
        Some(Bytes::from_static(b"{\"input\": 2}"))
    );
    storage.put(key, payloads[0].1.clone()).await.unwrap();

    // A listing holds exactly what was put, relative to the configured prefix, so each key goes
    // straight back into `get`.
    let all = storage.list_all(PAYLOADS_PREFIX).await.unwrap();
    let expected: BTreeMap<String, u64> = payloads
        .iter()
        .map(|(k, b)| (k.clone(), b.len() as u64))
        .collect();
    let got: BTreeMap<String, u64> = all.iter().map(|o| (o.key.clone(), o.size)).collect();
    assert_eq!(got, expected);
    for object in &all {
        assert!(
            object.last_modified > started - chrono::Duration::minutes(1)
                && object.last_modified < Utc::now() + chrono::Duration::minutes(1),
            "{object:?}"
        );
        let body = storage.get(&object.key).await.unwrap().unwrap();
        assert_eq!(body.len() as u64, object.size);
    }
    assert_eq!(listed(storage, "").await, expected, "the whole prefix");
    // By tenant, and by tenant and day: whole segments only.
    let tenant_a_keys: Vec<String> = listed(storage, &format!("payloads/{tenant_a}/"))
        .await
        .into_keys()
        .collect();
    assert_eq!(
        tenant_a_keys,
        payloads[..3]
            .iter()
            .map(|(k, _)| k.clone())
            .collect::<Vec<_>>()
    );
    assert_eq!(
        listed(storage, &format!("payloads/{tenant_a}/2026-03-01"))
            .await
            .len(),
        2
    );
    assert!(listed(storage, &format!("payloads/{tenant_a}/2026-03-0"))
        .await
        .is_empty());
    assert!(listed(storage, "payload").await.is_empty());

    // Deletes: a present key, then the same key again (missing now).
    let (gone, _) = &payloads[3];
    assert_eq!(storage.delete(gone).await.unwrap(), Deleted::Removed);
    assert_eq!(storage.get(gone).await.unwrap(), None);
    assert!(!storage.exists(gone).await.unwrap());
    assert_eq!(storage.delete(gone).await.unwrap(), missing);
    assert_eq!(storage.delete(&never).await.unwrap(), missing);

    // A batch of present and missing keys: each key's outcome, in order.
    let batch = vec![
        payloads[0].0.clone(),
        never.clone(),
        payloads[1].0.clone(),
        payloads[3].0.clone(),
        payloads[2].0.clone(),
    ];
    let outcomes = storage.delete_many(batch.clone()).await;
    assert_eq!(
        outcomes.iter().map(|(k, _)| k.clone()).collect::<Vec<_>>(),
        batch
    );
    for (key, outcome) in &outcomes {
        assert_eq!(outcome, &Ok(()), "{key}");
    }
    for (key, _) in &payloads {
        assert_eq!(storage.get(key).await.unwrap(), None, "{key}");
    }
    assert!(storage.list_all(PAYLOADS_PREFIX).await.unwrap().is_empty());

    // More keys than one S3 request takes: outcomes stay in order across requests.
    let keep: Vec<String> = (0..3)
        .map(|i| payload_key(tenant_b, day(9), 10_000 + i))
        .collect();
    for key in &keep {
        storage.put(key, Bytes::from_static(b"x")).await.unwrap();
    }
    let mut many: Vec<String> = (0..1_205)
        .map(|i| payload_key(tenant_b, day(8), i))
        .collect();
    many[0] = keep[0].clone();
    many[1_000] = keep[1].clone();
    many[1_204] = keep[2].clone();
    let outcomes = storage.delete_many(many.clone()).await;
    assert_eq!(outcomes.len(), many.len());
    for ((key, outcome), asked) in outcomes.iter().zip(&many) {
        assert_eq!(key, asked);
        assert_eq!(outcome, &Ok(()), "{key}");
    }
    assert!(storage.list_all("").await.unwrap().is_empty());
    assert!(storage.delete_many(Vec::new()).await.is_empty());

    // Keys that would not round-trip are refused before anything is sent.
    for key in [
        "",
        "/payloads/x",
        "payloads/x/",
        "payloads//x",
        "payloads/../x",
    ] {
        assert!(
            matches!(storage.get(key).await, Err(StorageError::InvalidKey { .. })),
            "{key:?}"
        );
    }
    let outcomes = storage
        .delete_many(vec!["a//b".into(), never.clone()])
        .await;
    assert!(matches!(
        outcomes[0].1,
        Err(StorageError::InvalidKey { .. })
    ));
    assert_eq!(outcomes[1], (never, Ok(())));
}

#[tokio::test]
async fn a_directory_keeps_the_contract() {
    let data_dir = tempfile::tempdir().unwrap();
    let storage = Storage::open(&StorageSettings::default(), data_dir.path()).unwrap();
    let objects = data_dir.path().join("objects");
    assert_eq!(storage.location(), &Location::File(objects.clone()));
    keeps_the_contract(&storage, FILE_MISSING).await;
    // A tenant's day directories go with their last object.
    assert_eq!(std::fs::read_dir(&objects).unwrap().count(), 0);

    // A configured directory is created; an object is a file under it.
    let elsewhere = data_dir.path().join("elsewhere/objects");
    let settings = StorageSettings {
        url: Some(format!("file://{}", elsewhere.display())),
        ..StorageSettings::default()
    };
    let storage = Storage::open(&settings, data_dir.path()).unwrap();
    let key = payload_key(Uuid::nil(), day(1), 1);
    storage
        .put(&key, Bytes::from_static(b"on disk"))
        .await
        .unwrap();
    assert_eq!(std::fs::read(elsewhere.join(&key)).unwrap(), b"on disk");
}

#[tokio::test]
async fn seaweedfs_keeps_the_contract() {
    let server = SeaweedFs::start().await;
    let storage = server.storage("engine/a");
    keeps_the_contract(&storage, S3_MISSING).await;

    // Prefixes keep engines apart: one sees nothing of another's objects.
    let other = server.storage("engine/b");
    let key = payload_key(Uuid::new_v4(), day(1), 1);
    other.put(&key, Bytes::from_static(b"b's")).await.unwrap();
    assert!(storage.list_all("").await.unwrap().is_empty());
    assert_eq!(storage.get(&key).await.unwrap(), None);
    assert_eq!(
        server
            .storage("engine")
            .list_all("")
            .await
            .unwrap()
            .into_iter()
            .map(|o| o.key)
            .collect::<Vec<_>>(),
        vec![format!("b/{key}")]
    );
    // The bucket's root, with no prefix at all, round-trips too.
    let root = server.storage("");
    assert_eq!(
        root.get(&format!("engine/b/{key}")).await.unwrap(),
        Some(Bytes::from_static(b"b's"))
    );

    // A bucket that does not exist is an error, not an empty store.
    let mut settings = server.settings("x");
    settings.url = Some("s3://no-such-bucket/x".into());
    let missing = Storage::open(&settings, std::path::Path::new("/")).unwrap();
    let err = missing.list_all("").await.unwrap_err();
    assert!(!err.is_retryable(), "{err}");
    let err = missing.put("k", Bytes::new()).await.unwrap_err();
    assert!(!err.is_retryable(), "{err}");

    // Wrong credentials are refused, not retried.
    let mut settings = server.settings("engine/a");
    settings.s3.secret_access_key = Some("wrong".into());
    let refused = Storage::open(&settings, std::path::Path::new("/")).unwrap();
    let err = refused.get(&key).await.unwrap_err();
    assert!(!err.is_retryable(), "{err}");
}

/// Runs `call` against a store that is down: it must fail within a few seconds, retryably.
async fn fails_fast<T: std::fmt::Debug>(
    what: &str,
    call: impl std::future::Future<Output = Result<T, StorageError>>,
) {
    let started = Instant::now();
    let result = call.await;
    let took = started.elapsed();
    let err = result.expect_err(what);
    assert!(err.is_retryable(), "{what}: {err}");
    assert!(took < Duration::from_secs(5), "{what} took {took:?}: {err}");
    eprintln!("{what} failed in {took:?}: {err}");
}

#[tokio::test]
async fn a_stopped_seaweedfs_fails_fast_and_retryably_and_keeps_its_objects() {
    let mut server = SeaweedFs::start().await;
    let storage = server.storage("engine");
    let tenant = Uuid::new_v4();
    let before: Vec<String> = (1..=3).map(|i| payload_key(tenant, day(1), i)).collect();
    for key in &before {
        storage
            .put(key, Bytes::from(key.clone().into_bytes()))
            .await
            .unwrap();
    }

    // Down (a crash: nothing listens any more).
    server.kill();
    let key = &before[0];
    fails_fast("get", storage.get(key)).await;
    fails_fast("exists", storage.exists(key)).await;
    fails_fast("put", storage.put(key, Bytes::from_static(b"lost"))).await;
    fails_fast("delete", storage.delete(key)).await;
    fails_fast("list", storage.list_all(PAYLOADS_PREFIX)).await;
    let started = Instant::now();
    let outcomes = storage.delete_many(before.clone()).await;
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(outcomes.len(), before.len());
    for (key, outcome) in &outcomes {
        let err = outcome.as_ref().expect_err(key);
        assert!(err.is_retryable(), "{key}: {err}");
    }

    // Back on the same directory: every object acknowledged before is there, and the same
    // client works again.
    let restarted = Instant::now();
    server.restart().await;
    eprintln!("restarted in {:?}", restarted.elapsed());
    for key in &before {
        assert_eq!(
            storage.get(key).await.unwrap(),
            Some(Bytes::from(key.clone().into_bytes())),
            "{key}"
        );
    }
    let after = payload_key(tenant, day(2), 4);
    storage
        .put(&after, Bytes::from_static(b"after"))
        .await
        .unwrap();
    let mut keys: Vec<String> = storage
        .list_all(PAYLOADS_PREFIX)
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.key)
        .collect();
    keys.sort();
    let mut expected = before.clone();
    expected.push(after);
    assert_eq!(keys, expected);

    // An operator's stop: SIGTERM, then SIGKILL after 10 s at most.
    let pid = server.pid().unwrap();
    let stopping = Instant::now();
    server.stop().await;
    let took = stopping.elapsed();
    eprintln!("stopped in {took:?}");
    assert!(took < Duration::from_secs(12), "{took:?}");
    assert!(server.pid().is_none());
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "weed ({pid}) still runs"
    );
    fails_fast("get after stop", storage.get(key)).await;
}
