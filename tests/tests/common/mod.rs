//! Seeding and inspection helpers shared by the workspace tests.
#![allow(dead_code)]

use chrono::{DateTime, Duration, Utc};
use sqlx::PgPool;
use uuid::Uuid;

pub use testkit::TestDatabase;

pub const MINUTE: Duration = Duration::minutes(1);

/// The database's clock.
pub async fn db_now(pool: &PgPool) -> DateTime<Utc> {
    repository::clock::now(pool).await.unwrap()
}

pub async fn insert_user(pool: &PgPool) -> Uuid {
    sqlx::query_scalar("INSERT INTO users (id, email) VALUES ($1, $2) RETURNING id")
        .bind(Uuid::new_v4())
        .bind(format!("{}@example.test", Uuid::new_v4()))
        .fetch_one(pool)
        .await
        .unwrap()
}

/// Inserts one session naming only the contract's columns.
pub async fn insert_session(
    pool: &PgPool,
    user_id: Option<Uuid>,
    created_at: DateTime<Utc>,
    expires_at: DateTime<Utc>,
) -> Uuid {
    sqlx::query_scalar(
        "INSERT INTO user_sessions (id, user_id, created_at, updated_at, expires_at)
         VALUES ($1, $2, $3, $3, $4) RETURNING id",
    )
    .bind(Uuid::new_v4())
    .bind(user_id)
    .bind(created_at)
    .bind(expires_at)
    .fetch_one(pool)
    .await
    .unwrap()
}

/// Inserts `n` sessions in one statement: anonymous or not, created and expiring at the given
/// offsets from `now`. Returns their ids, sorted.
pub async fn insert_sessions(
    pool: &PgPool,
    n: i64,
    user_id: Option<Uuid>,
    created_at: DateTime<Utc>,
    expires_at: DateTime<Utc>,
) -> Vec<Uuid> {
    let mut ids: Vec<Uuid> = sqlx::query_scalar(
        "INSERT INTO user_sessions (user_id, created_at, updated_at, expires_at)
         SELECT $1, $2, $2, $3 FROM generate_series(1, $4) RETURNING id",
    )
    .bind(user_id)
    .bind(created_at)
    .bind(expires_at)
    .bind(n)
    .fetch_all(pool)
    .await
    .unwrap();
    ids.sort();
    ids
}

/// Every session id left, sorted.
pub async fn session_ids(pool: &PgPool) -> Vec<Uuid> {
    sqlx::query_scalar("SELECT id FROM user_sessions ORDER BY id").fetch_all(pool).await.unwrap()
}

pub fn sorted(mut ids: Vec<Uuid>) -> Vec<Uuid> {
    ids.sort();
    ids
}
