//! All of the engine's SQL: the data model, the migrations and the queries behind each retention
//! task. Functions take `impl PgExecutor` (or a connection) so callers choose pool or transaction.
//! Queries are runtime SQL: those that need the retention rule are assembled from its fragments
//! ([`rule`]) with their values bound by name ([`sql`]), and one style throughout keeps the crate
//! buildable without a database.

pub mod batch;
pub mod clock;
pub mod demo;
pub mod heap;
pub mod history;
pub mod holds;
pub mod lease;
pub mod maintenance;
pub mod outbox;
pub mod payloads;
pub mod queue_items;
pub mod receipts;
pub mod replication;
pub mod rule;
pub mod sessions;
pub mod sql;
pub mod tenants;
pub mod watermarks;

pub use sqlx::PgPool;

/// The schema migrations in `migrations/`, applied by `engine migrate` and at start-up.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations");
