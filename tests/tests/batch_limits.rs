//! A batch's transaction carries its limits, and only for its own duration.

mod common;

use std::time::Duration;

use common::*;
use repository::batch::{self, BatchLimits};

async fn settings(conn: &mut sqlx::PgConnection) -> (String, String, String) {
    sqlx::query_as(
        "SELECT current_setting('statement_timeout'), current_setting('lock_timeout'), current_setting('synchronous_commit')",
    )
    .fetch_one(conn)
    .await
    .unwrap()
}

#[tokio::test]
async fn a_one_statement_batch_obeys_its_limits_in_its_own_transaction_only() {
    let db = TestDatabase::new().await;
    let defaults = settings(&mut db.pool.acquire().await.unwrap()).await;
    let limits = BatchLimits::new(Duration::from_millis(1500), Duration::from_millis(20))
        .with_async_commit(true);
    sqlx::query("CREATE TABLE t (n int)")
        .execute(&db.pool)
        .await
        .unwrap();

    let seen: (String, String, String, i64) = batch::one_statement(
        &db.pool,
        limits,
        "WITH added AS (INSERT INTO t VALUES (1), (2) RETURNING n)
         SELECT current_setting('statement_timeout'), current_setting('lock_timeout'), current_setting('synchronous_commit'), count(*) FROM added",
    )
    .await
    .unwrap();
    assert_eq!(seen, ("1500ms".into(), "20ms".into(), "off".into(), 2));
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM t")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(count, 2, "committed");

    // A statement that fails is rolled back whole, and the connection is left as it was.
    let failed = batch::one_statement::<(i64,)>(
        &db.pool,
        limits,
        "WITH added AS (INSERT INTO t VALUES (3) RETURNING n) SELECT count(*) / 0 FROM added",
    )
    .await;
    assert!(failed.is_err());
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM t")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(count, 2, "rolled back");
    // Its lock_timeout holds: a row locked elsewhere makes it give up after 20 ms.
    let mut holder = db.pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE t IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *holder)
        .await
        .unwrap();
    let blocked = batch::one_statement::<(i64,)>(&db.pool, limits, "SELECT count(*) FROM t")
        .await
        .unwrap_err();
    assert!(batch::is_lock_not_had(&blocked), "{blocked}");
    holder.rollback().await.unwrap();
    for _ in 0..3 {
        assert_eq!(
            settings(&mut db.pool.acquire().await.unwrap()).await,
            defaults
        );
    }
}

#[tokio::test]
async fn a_bookkeeping_statement_commits_asynchronously_for_itself_only() {
    let db = TestDatabase::new().await;
    let mut conn = db.pool.acquire().await.unwrap();
    // The test server's own default is off: this session's is on, as a durable server's.
    sqlx::query("SET synchronous_commit = on")
        .execute(&mut *conn)
        .await
        .unwrap();
    let (_, during): (String, String) = sqlx::query_as(&format!(
        "SELECT {}, current_setting('synchronous_commit')",
        batch::BOOKKEEPING_COMMIT
    ))
    .fetch_one(&mut *conn)
    .await
    .unwrap();
    assert_eq!(
        during, "off",
        "in effect for the rest of the statement's transaction, its commit included"
    );
    let after: String = sqlx::query_scalar("SELECT current_setting('synchronous_commit')")
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    assert_eq!(after, "on", "and no further");
}

#[tokio::test]
async fn a_batch_sets_its_timeouts_and_commit_mode_locally() {
    let db = TestDatabase::new().await;
    let defaults = settings(&mut db.pool.acquire().await.unwrap()).await;
    let limits = BatchLimits::new(Duration::from_millis(1500), Duration::from_millis(20));

    let mut tx = batch::begin(&db.pool, limits.with_async_commit(true))
        .await
        .unwrap();
    assert_eq!(
        settings(&mut tx).await,
        ("1500ms".into(), "20ms".into(), "off".into())
    );
    tx.commit().await.unwrap();

    let mut tx = batch::begin(&db.pool, limits).await.unwrap();
    assert_eq!(settings(&mut tx).await.2, "on", "synchronous unless asked");
    tx.rollback().await.unwrap();

    // Back on the pool, every connection has the server's defaults again (the test server does
    // not wait for flushes at all).
    for _ in 0..3 {
        assert_eq!(
            settings(&mut db.pool.acquire().await.unwrap()).await,
            defaults
        );
    }
}

#[tokio::test]
async fn batches_compress_their_wal_when_the_role_may_set_it_and_run_as_before_when_not() {
    use retention_controller::settings::WalCompressionMethod;
    use retention_controller::wal_compression::WalCompression;
    let db = TestDatabase::new().await;
    let wal_compression =
        |conn: &'static str| format!("SELECT current_setting('wal_compression') /* {conn} */");
    let server_default: String = sqlx::query_scalar(&wal_compression("default"))
        .fetch_one(&db.pool)
        .await
        .unwrap();
    let limits = BatchLimits::new(Duration::from_secs(1), Duration::from_secs(1));

    // The tests' role is a superuser: it may.
    let compression = WalCompression::new(WalCompressionMethod::Lz4).unwrap();
    assert_eq!(compression.for_batches(&db.pool).await, Some("lz4"));
    let mut tx = batch::begin(&db.pool, limits.with_wal_compression(Some("lz4")))
        .await
        .unwrap();
    let set: String = sqlx::query_scalar(&wal_compression("batch"))
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    assert_eq!(set, "lz4");
    tx.commit().await.unwrap();
    for _ in 0..3 {
        let after: String = sqlx::query_scalar(&wal_compression("after"))
            .fetch_one(&db.pool)
            .await
            .unwrap();
        assert_eq!(after, server_default, "for the batch's transaction only");
    }
    assert!(WalCompression::new(WalCompressionMethod::Off).is_none());

    // An ordinary role may not, until granted the parameter (PostgreSQL 15+).
    let role = format!("plain_{}", uuid::Uuid::new_v4().simple());
    sqlx::query(&format!("CREATE ROLE {role} LOGIN"))
        .execute(&db.pool)
        .await
        .unwrap();
    let options: sqlx::postgres::PgConnectOptions = db
        .url
        .parse::<sqlx::postgres::PgConnectOptions>()
        .unwrap()
        .username(&role);
    let plain = sqlx::PgPool::connect_with(options.clone()).await.unwrap();
    let refused = batch::wal_compression_settable(&plain, "lz4")
        .await
        .unwrap();
    assert!(
        refused
            .as_ref()
            .is_err_and(|reason| reason.contains("wal_compression")),
        "{refused:?}"
    );
    assert_eq!(
        WalCompression::new(WalCompressionMethod::Lz4)
            .unwrap()
            .for_batches(&plain)
            .await,
        None
    );
    plain.close().await;
    sqlx::query(&format!("GRANT SET ON PARAMETER wal_compression TO {role}"))
        .execute(&db.pool)
        .await
        .unwrap();
    let granted = sqlx::PgPool::connect_with(options).await.unwrap();
    assert_eq!(
        WalCompression::new(WalCompressionMethod::Lz4)
            .unwrap()
            .for_batches(&granted)
            .await,
        Some("lz4")
    );
    granted.close().await;
    sqlx::query(&format!(
        "REVOKE SET ON PARAMETER wal_compression FROM {role}"
    ))
    .execute(&db.pool)
    .await
    .unwrap();
    sqlx::query(&format!("DROP ROLE {role}"))
        .execute(&db.pool)
        .await
        .unwrap();
}
