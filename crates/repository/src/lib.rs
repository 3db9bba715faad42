//! All of the engine's SQL: the data model, the migrations and the queries behind each retention
//! task. Functions take `impl PgExecutor` (or a connection) so callers choose pool or transaction.
//! A statement whose text is fixed is checked against the schema when the crate compiles (sqlx's
//! `query!`, `query_as!`, `query_scalar!`), offline, from what `.sqlx/` at the workspace root
//! records of it: no build needs a database, and `cargo sqlx-prepare` rewrites `.sqlx/` after a
//! statement or a migration changes (docs/development.md). Statements built at run time stay
//! runtime SQL (`sqlx::query(...)`): those that need the retention rule, assembled from its
//! fragments ([`rule`]) with their values bound by name ([`sql`]), those naming a partition or a
//! table, and those whose `SET LOCAL` values are spliced in; each is run by a test.

pub mod archives;
pub mod batch;
pub mod clock;
pub mod demo;
pub mod heap;
pub mod history;
pub mod holds;
pub mod lease;
pub mod maintenance;
pub mod outbox;
pub mod pacing;
pub mod payloads;
pub mod queue_items;
pub mod receipts;
pub mod replication;
pub mod restore;
pub mod rule;
pub mod sessions;
pub mod sql;
pub mod tenants;
pub mod watermarks;

pub use sqlx::PgPool;

/// The schema migrations in `migrations/`, applied by `engine migrate` and at start-up.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations");
