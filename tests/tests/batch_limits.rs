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
async fn a_batch_sets_its_timeouts_and_commit_mode_locally() {
    let db = TestDatabase::new().await;
    let defaults = settings(&mut db.pool.acquire().await.unwrap()).await;
    let limits = BatchLimits::new(Duration::from_millis(1500), Duration::from_millis(20));

    let mut tx = batch::begin(&db.pool, limits.with_async_commit(true)).await.unwrap();
    assert_eq!(settings(&mut tx).await, ("1500ms".into(), "20ms".into(), "off".into()));
    tx.commit().await.unwrap();

    let mut tx = batch::begin(&db.pool, limits).await.unwrap();
    assert_eq!(settings(&mut tx).await.2, "on", "synchronous unless asked");
    tx.rollback().await.unwrap();

    // Back on the pool, every connection has the server's defaults again (the test server does
    // not wait for flushes at all).
    for _ in 0..3 {
        assert_eq!(settings(&mut db.pool.acquire().await.unwrap()).await, defaults);
    }
}
