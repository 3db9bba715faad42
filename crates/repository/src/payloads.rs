//! Task payloads (a task's input and output) and log lines: writing and reading them, and their
//! day partitions. They leave with their task on every deleting path
//! ([`crate::history::dependents`]); log lines also by their own window ([`delete_due_logs`]).
//!
//! A payload kept in object storage is written store first, row second: its id is reserved
//! ([`reserve_id`]), the object put under the key that id gives, then the row inserted. A crash in
//! between leaves an object without a row (the sweep's to delete after its grace), never a row
//! pointing at nothing.

use chrono::{DateTime, NaiveDate, Utc};
use sqlx::{FromRow, PgConnection, PgExecutor};
use uuid::Uuid;

use crate::receipts::{self, RunReceipt};
use crate::rule::{self, Rule};
use crate::sql::Sql;

/// The tables partitioned by day here, on their task's `inserted_at`.
pub const DAY_TABLES: [&str; 2] = ["task_payloads", "task_logs"];

/// Input or output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Input,
    Output,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Input => "input",
            Kind::Output => "output",
        }
    }

    pub fn parse(text: &str) -> Option<Kind> {
        match text {
            "input" => Some(Kind::Input),
            "output" => Some(Kind::Output),
            _ => None,
        }
    }
}

/// Where a payload's bytes are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Content {
    Inline(Vec<u8>),
    /// In object storage, under this key (relative to the store's prefix), `size` bytes.
    External {
        key: String,
        size: i64,
    },
}

/// A payload row as read back.
#[derive(Debug, Clone, PartialEq, Eq, FromRow)]
pub struct Payload {
    pub id: i64,
    pub tenant_id: Uuid,
    pub task_id: Uuid,
    pub task_inserted_at: DateTime<Utc>,
    pub kind: String,
    pub location: String,
    pub inline_content: Option<Vec<u8>>,
    pub external_key: Option<String>,
    pub size_bytes: i64,
    pub created_at: DateTime<Utc>,
}

/// The id the next payload will have, taken now (for an external payload's key, before its
/// object is put).
pub async fn reserve_id(executor: impl PgExecutor<'_>) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar!(r#"SELECT nextval(pg_get_serial_sequence('task_payloads', 'id')) AS "id!""#)
        .fetch_one(executor)
        .await
}

/// Inserts a payload of the task `(task_id, task_inserted_at)` with the id `id` (from
/// [`reserve_id`]).
pub async fn insert(
    executor: impl PgExecutor<'_>,
    id: i64,
    tenant_id: Uuid,
    task: (Uuid, DateTime<Utc>),
    kind: Kind,
    content: &Content,
) -> Result<(), sqlx::Error> {
    let (location, inline, key, size) = match content {
        Content::Inline(bytes) => ("inline", Some(bytes.clone()), None, bytes.len() as i64),
        Content::External { key, size } => ("external", None, Some(key.clone()), *size),
    };
    sqlx::query!(
        "INSERT INTO task_payloads (id, tenant_id, task_id, task_inserted_at, kind, location, inline_content, external_key, size_bytes)
         OVERRIDING SYSTEM VALUE VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        id,
        tenant_id,
        task.0,
        task.1,
        kind.as_str(),
        location,
        inline,
        key,
        size
    )
    .execute(executor)
    .await?;
    Ok(())
}

/// The payload `id`.
pub async fn get(executor: impl PgExecutor<'_>, id: i64) -> Result<Option<Payload>, sqlx::Error> {
    sqlx::query_as!(
        Payload,
        "SELECT id, tenant_id, task_id, task_inserted_at, kind, location, inline_content, external_key, size_bytes, created_at
         FROM task_payloads WHERE id = $1",
        id
    )
    .fetch_optional(executor)
    .await
}

/// Appends a log line to a task.
pub async fn insert_log(
    executor: impl PgExecutor<'_>,
    tenant_id: Uuid,
    task: (Uuid, DateTime<Utc>),
    created_at: DateTime<Utc>,
    level: &str,
    line: &str,
) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar!(
        "INSERT INTO task_logs (tenant_id, task_id, task_inserted_at, created_at, level, line)
         VALUES ($1, $2, $3, $4, $5, $6) RETURNING id",
        tenant_id,
        task.0,
        task.1,
        created_at,
        level,
        line
    )
    .fetch_one(executor)
    .await
}

/// What one batch of the log window deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LogsGone {
    pub logs: i64,
    /// Lines the batch looked at: fewer than its limit ends the tenant's walk.
    pub examined: i64,
}

#[derive(FromRow)]
struct LogsRow {
    logs: i64,
    examined: i64,
    rules_version: i64,
}

/// Deletes up to `limit` of tenant `tenant_id`'s log lines due by the log window (see
/// [`Rule::log_due`]), oldest first along `task_logs_due_idx`, adds them to the run's receipts
/// under the rule `log-retention`, and confirms the rules; the caller commits. Lines a writer
/// holds locked are skipped.
pub async fn delete_due_logs(
    conn: &mut PgConnection,
    tenant_id: Uuid,
    rule: &Rule,
    default_window: std::time::Duration,
    limit: u32,
    receipt: &RunReceipt,
) -> Result<LogsGone, sqlx::Error> {
    let mut sql = Sql::new(
        "WITH tn AS MATERIALIZED (SELECT * FROM tenants WHERE id = {tenant}),
         candidates AS MATERIALIZED (
             SELECT l.id, l.task_inserted_at, l.tenant_id, l.task_id, l.created_at FROM tn CROSS JOIN LATERAL (
                 SELECT * FROM task_logs l WHERE l.tenant_id = tn.id AND l.created_at < {cutoff} AND {candidate_due}
                 ORDER BY l.created_at LIMIT {limit} FOR UPDATE OF l SKIP LOCKED) l
         ),
         gone AS (
             DELETE FROM task_logs d USING candidates c, tn
             WHERE d.id = c.id AND d.task_inserted_at = c.task_inserted_at AND {due}
             RETURNING d.created_at
         ), receipt AS (
             {receipt}
         )
         SELECT (SELECT count(*) FROM gone) AS logs, (SELECT count(*) FROM candidates) AS examined,
                {version} AS rules_version",
    );
    sql.bind("tenant", tenant_id)
        .with("cutoff", rule.log_cutoff("tn", default_window))
        .bind("limit", i64::from(limit))
        // Only due lines are candidates (a held task's lines are never locked or read again and
        // again): every candidate locked is deleted, so a batch short of its limit ends the walk.
        .with("candidate_due", rule.log_due("l", "tn", default_window))
        .with("due", rule.log_due("c", "tn", default_window))
        .with(
            "receipt",
            receipts::add_with_dependents(
                receipt,
                "SELECT tn.id, 'log-retention', 0, 0, 0, 0, g.n, 0, g.oldest, g.newest
                 FROM tn, (SELECT count(*) AS n, min(created_at) AS oldest, max(created_at) AS newest FROM gone) g
                 WHERE g.n > 0",
            ),
        )
        .raw("version", rule::VERSION);
    let row: LogsRow = sql.build_query_as().fetch_one(&mut *conn).await?;
    if row.logs > 0 {
        rule::confirm(conn, row.rules_version).await?;
    }
    Ok(LogsGone {
        logs: row.logs,
        examined: row.examined,
    })
}

/// The tenants with a log line due by the log window now, held ones left out: one index probe
/// per tenant (`task_logs_due_idx`).
pub async fn tenants_with_due_logs(
    executor: impl PgExecutor<'_>,
    rule: &Rule,
    default_window: std::time::Duration,
) -> Result<Vec<Uuid>, sqlx::Error> {
    let mut sql = Sql::new(
        "SELECT tn.id FROM tenants tn
         WHERE NOT {held}
           AND EXISTS (SELECT 1 FROM task_logs l WHERE l.tenant_id = tn.id AND l.created_at < {cutoff})
         ORDER BY tn.id",
    );
    sql.with("held", rule.tenant_held("tn.id"))
        .with("cutoff", rule.log_cutoff("tn", default_window));
    sql.build_query_scalar().fetch_all(executor).await
}

/// How many of tenant `tenant_id`'s log lines a log window of `window` makes due now (holds
/// considered): what a preview of a new window shows.
pub async fn count_due_logs(
    executor: impl PgExecutor<'_>,
    tenant_id: Uuid,
    window: std::time::Duration,
    rule: &Rule,
) -> Result<i64, sqlx::Error> {
    let mut sql = Sql::new(
        "WITH tn AS MATERIALIZED (SELECT id, {window}::interval AS log_retention_period FROM tenants WHERE id = {tenant})
         SELECT count(*) FROM tn JOIN task_logs l ON l.tenant_id = tn.id WHERE {due}",
    );
    sql.bind("window", rule::interval(window))
        .bind("tenant", tenant_id)
        .with("due", rule.log_due("l", "tn", window));
    sql.build_query_scalar().fetch_one(executor).await
}

/// Name of the day partition of `table` for `day`.
pub fn day_table(table: &str, day: NaiveDate) -> String {
    format!("{table}_p{}", day.format("%Y%m%d"))
}

/// Creates the day partitions of [`DAY_TABLES`] for `days` that have none, each in its own short
/// transaction under `lock_timeout` (creating a partition locks the default partition to check
/// it holds no row of that day). A day the default partition already holds rows of keeps them
/// there (it is skipped: rows are never moved). Returns the partitions created.
pub async fn create_days(
    conn: &mut PgConnection,
    days: &[NaiveDate],
    lock_timeout: std::time::Duration,
) -> Result<Vec<String>, sqlx::Error> {
    let mut created = Vec::new();
    for table in DAY_TABLES {
        for day in days {
            let name = day_table(table, *day);
            let exists: bool =
                sqlx::query_scalar!(r#"SELECT to_regclass($1) IS NOT NULL AS "exists!""#, name)
                    .fetch_one(&mut *conn)
                    .await?;
            if exists {
                continue;
            }
            let lower = crate::history::ranges::day_start(*day);
            let upper = crate::history::ranges::day_start(*day + chrono::Duration::days(1));
            let mut tx = sqlx::Connection::begin(&mut *conn).await?;
            sqlx::query(&format!(
                "SET LOCAL lock_timeout = '{}ms'",
                lock_timeout.as_millis().max(1)
            ))
            .execute(&mut *tx)
            .await?;
            let occupied: bool = sqlx::query_scalar(&format!(
                "SELECT EXISTS (SELECT 1 FROM {table}_default WHERE task_inserted_at >= $1 AND task_inserted_at < $2)"
            ))
            .bind(lower)
            .bind(upper)
            .fetch_one(&mut *tx)
            .await?;
            if occupied {
                tx.rollback().await?;
                continue;
            }
            let result = sqlx::query(&format!(
                "CREATE TABLE {name} PARTITION OF {table} FOR VALUES FROM ('{}') TO ('{}')",
                lower.to_rfc3339(),
                upper.to_rfc3339()
            ))
            .execute(&mut *tx)
            .await;
            match result {
                Ok(_) => {
                    tx.commit().await?;
                    created.push(name);
                }
                // Writers kept the default partition busy, or a row of the day arrived in it
                // meanwhile: the next run tries again.
                Err(error)
                    if crate::batch::is_lock_not_had(&error)
                        || error.as_database_error().and_then(|e| e.code()).as_deref()
                            == Some("23514") =>
                {
                    tx.rollback().await?;
                }
                Err(error) => return Err(error),
            }
        }
    }
    Ok(created)
}

/// Drops the day partitions of [`DAY_TABLES`] for days before `before` that are empty (their
/// tasks gone, and their rows with them), each in its own short transaction under
/// `lock_timeout`. Returns the partitions dropped.
pub async fn drop_empty_days(
    conn: &mut PgConnection,
    before: NaiveDate,
    lock_timeout: std::time::Duration,
) -> Result<Vec<String>, sqlx::Error> {
    let mut dropped = Vec::new();
    for table in DAY_TABLES {
        // `$1::text::regclass`: the name is bound as text (the macros know no regclass).
        let children: Vec<String> = sqlx::query_scalar!(
            r#"SELECT c.relname::text AS "name!" FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
             WHERE i.inhparent = $1::text::regclass AND c.relname ~ '_p[0-9]{8}$' AND c.relname < $2
             ORDER BY 1"#,
            table,
            day_table(table, before)
        )
        .fetch_all(&mut *conn)
        .await?;
        for name in children {
            // A look without a lock first: most past days still hold rows, and the lock below
            // would queue every writer of the table behind it.
            let empty: bool =
                sqlx::query_scalar(&format!("SELECT NOT EXISTS (SELECT 1 FROM {name})"))
                    .fetch_one(&mut *conn)
                    .await?;
            if !empty {
                continue;
            }
            let mut tx = sqlx::Connection::begin(&mut *conn).await?;
            sqlx::query(&format!(
                "SET LOCAL lock_timeout = '{}ms'",
                lock_timeout.as_millis().max(1)
            ))
            .execute(&mut *tx)
            .await?;
            let result = async {
                // The parent first, as every writer locks it: then the partition, and a last look.
                sqlx::query(&format!("LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE"))
                    .execute(&mut *tx)
                    .await?;
                let empty: bool =
                    sqlx::query_scalar(&format!("SELECT NOT EXISTS (SELECT 1 FROM {name})"))
                        .fetch_one(&mut *tx)
                        .await?;
                if empty {
                    sqlx::query(&format!("DROP TABLE {name}"))
                        .execute(&mut *tx)
                        .await?;
                }
                Ok::<bool, sqlx::Error>(empty)
            }
            .await;
            match result {
                Ok(true) => {
                    tx.commit().await?;
                    dropped.push(name);
                }
                Ok(false) => tx.rollback().await?,
                Err(error) if crate::batch::is_lock_not_had(&error) => tx.rollback().await?,
                Err(error) => return Err(error),
            }
        }
    }
    Ok(dropped)
}

/// The partitions of `table` (one of [`DAY_TABLES`]), the default included.
pub async fn partitions(
    executor: impl PgExecutor<'_>,
    table: &str,
) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar!(
        r#"SELECT c.relname::text AS "name!" FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
         WHERE i.inhparent = $1::text::regclass ORDER BY 1"#,
        table
    )
    .fetch_all(executor)
    .await
}

/// The OID of the relation `name` (a partition, as [`partitions`] names it), or 0 when there is
/// none (dropped since).
pub async fn relid_of(executor: impl PgExecutor<'_>, name: &str) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar!(
        r#"SELECT coalesce(to_regclass($1)::oid::bigint, 0) AS "relid!""#,
        name
    )
    .fetch_one(executor)
    .await
}

/// Whether a relation with this OID still exists.
pub async fn relation_exists(
    executor: impl PgExecutor<'_>,
    relid: i64,
) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar!(
        r#"SELECT EXISTS (SELECT 1 FROM pg_class WHERE oid = $1::bigint::oid) AS "exists!""#,
        relid
    )
    .fetch_one(executor)
    .await
}

#[derive(FromRow)]
struct OrphansRow {
    deleted: i64,
    rules_version: i64,
}

/// Deletes, on the pages `blocks` of `partition` (a partition of `table`, one of
/// [`DAY_TABLES`]), the payloads or log lines whose task is gone (deleted by the application,
/// say), older than an hour and not held: the orphan rule of events ([`Rule::orphan_due`]).
/// Payloads' stored objects go to the outbox by trigger. Receipts under `orphan-payloads` or
/// `orphan-logs`; then the rules are confirmed. `None` when the partition is gone.
pub async fn delete_orphans_in_blocks(
    conn: &mut PgConnection,
    table: &str,
    partition: &str,
    blocks: crate::heap::BlockRange,
    rule: &Rule,
    receipt: &RunReceipt,
) -> Result<Option<i64>, sqlx::Error> {
    let payloads = table == "task_payloads";
    let (from, to) = blocks.tids();
    let mut sql = Sql::new(
        "WITH gone AS (
             DELETE FROM {partition} d
             WHERE d.ctid >= {from}::tid AND d.ctid < {to}::tid AND {due}
             RETURNING d.tenant_id, d.created_at, {external} AS external
         ), receipt AS (
             {receipt}
         )
         SELECT (SELECT count(*) FROM gone) AS deleted, {version} AS rules_version",
    );
    let rows = if payloads {
        "SELECT g.tenant_id, 'orphan-payloads', 0, 0, 0, count(*), 0, count(*) FILTER (WHERE g.external), min(g.created_at), max(g.created_at)
         FROM gone g GROUP BY g.tenant_id"
    } else {
        "SELECT g.tenant_id, 'orphan-logs', 0, 0, 0, 0, count(*), 0, min(g.created_at), max(g.created_at)
         FROM gone g GROUP BY g.tenant_id"
    };
    sql.raw("partition", partition.to_string())
        .bind("from", from)
        .bind("to", to)
        .with(
            "due",
            rule.orphan_due_of(
                if payloads {
                    crate::rule::Dependent::Payloads
                } else {
                    crate::rule::Dependent::Logs
                },
                "d",
                "tasks",
            ),
        )
        .raw(
            "external",
            if payloads {
                "d.external_key IS NOT NULL"
            } else {
                "false"
            },
        )
        .with("receipt", receipts::add_with_dependents(receipt, rows))
        .raw("version", rule::VERSION);
    let row: OrphansRow = match sql.build_query_as().fetch_one(&mut *conn).await {
        Ok(row) => row,
        Err(error) if crate::history::deletes::is_undefined_table(&error) => return Ok(None),
        Err(error) => return Err(error),
    };
    if row.deleted > 0 {
        rule::confirm(conn, row.rules_version).await?;
    }
    Ok(Some(row.deleted))
}
