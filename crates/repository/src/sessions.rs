//! The sessions rule: a `user_sessions` row is due when it has expired (`expires_at < now`), or
//! when it is anonymous (`user_id IS NULL`) and older than the anonymous TTL.
//!
//! Each part of the rule is purged by walking its own index in key order, `(expires_at, id)` and
//! `(created_at, id) WHERE user_id IS NULL`, with a cursor: every batch starts where the last one
//! stopped, so a batch reads only the rows it deletes, however large the table, and a whole purge
//! is linear in the rows due. No OFFSET, no re-scan of what earlier batches passed.
//!
//! A backlog (due rows on most pages) is purged instead by walking the heap in block ranges
//! ([`delete_block_range`], see [`crate::heap`]): one sequential pass that deletes the whole rule at
//! the speed of one bare `DELETE`. [`estimate_due`] tells the caller which walk fits.

use chrono::{DateTime, Utc};
use sqlx::{FromRow, PgExecutor};
use uuid::Uuid;

use crate::heap::BlockRange;

/// The instants a run evaluates the rule against, fixed at the start of the run from the
/// database's clock. A session that becomes due during a run waits for the next one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionCutoffs {
    /// Sessions with `expires_at` before this are due.
    pub expired_before: DateTime<Utc>,
    /// Anonymous sessions with `created_at` before this are due.
    pub anonymous_created_before: DateTime<Utc>,
}

impl SessionCutoffs {
    pub fn at(now: DateTime<Utc>, anonymous_ttl: chrono::Duration) -> Self {
        SessionCutoffs {
            expired_before: now,
            anonymous_created_before: now - anonymous_ttl,
        }
    }

    /// The whole rule for the row `t`, with these cutoffs as literals (the engine's own
    /// timestamps, nothing from input), for statements that must be planned for them.
    fn rule(&self, t: &str) -> String {
        format!(
            "({t}.expires_at < '{expired}'::timestamptz OR ({t}.user_id IS NULL AND {t}.created_at < '{anonymous}'::timestamptz))",
            expired = self.expired_before.to_rfc3339(),
            anonymous = self.anonymous_created_before.to_rfc3339(),
        )
    }
}

/// The two parts of the rule, each purged along its own index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SessionRule {
    /// `expires_at < cutoff`.
    Expired,
    /// `user_id IS NULL AND created_at < cutoff`.
    AnonymousStale,
}

impl SessionRule {
    pub const ALL: [SessionRule; 2] = [SessionRule::Expired, SessionRule::AnonymousStale];

    pub fn name(self) -> &'static str {
        match self {
            SessionRule::Expired => "expired",
            SessionRule::AnonymousStale => "anonymous",
        }
    }

    fn cutoff(self, cutoffs: &SessionCutoffs) -> DateTime<Utc> {
        match self {
            SessionRule::Expired => cutoffs.expired_before,
            SessionRule::AnonymousStale => cutoffs.anonymous_created_before,
        }
    }

    /// The index key column the part is walked along.
    fn key(self) -> &'static str {
        match self {
            SessionRule::Expired => "expires_at",
            SessionRule::AnonymousStale => "created_at",
        }
    }

    /// The predicate, with `$1` the cutoff and `{t}` the table alias.
    fn predicate(self, t: &str) -> String {
        match self {
            SessionRule::Expired => format!("{t}.expires_at < $1"),
            SessionRule::AnonymousStale => format!("{t}.user_id IS NULL AND {t}.created_at < $1"),
        }
    }
}

/// Where the next batch of a part starts: just past the last row deleted, in index order.
/// The key is kept as PostgreSQL's own text so that any stored timestamp, `-infinity` included,
/// round-trips exactly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    key: String,
    id: Uuid,
}

/// What one batch did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchOutcome {
    pub deleted: u64,
    /// Where the next batch starts; `None` when this batch deleted nothing.
    pub next: Option<Cursor>,
}

#[derive(FromRow)]
struct BatchRow {
    deleted: i64,
    last_key: Option<String>,
    last_id: Option<Uuid>,
}

/// The statement [`delete_batch`] issues: `$1` the cutoff, `$2` the limit and, `with_cursor`,
/// `$3` and `$4` the cursor's key (text) and id. Public so that a test can EXPLAIN it.
pub fn delete_batch_sql(rule: SessionRule, with_cursor: bool) -> String {
    let key = rule.key();
    let after_clause = if with_cursor {
        format!("AND (s.{key}, s.id) > ($3::timestamptz, $4)")
    } else {
        String::new()
    };
    format!(
        "WITH picked AS (
             SELECT s.id FROM user_sessions s
             WHERE {pick} {after_clause}
             ORDER BY s.{key}, s.id
             LIMIT $2
             FOR UPDATE SKIP LOCKED
         ), deleted AS (
             -- By primary key: a join with `picked` may be planned as a hash of the whole table
             -- when most of it is due.
             DELETE FROM user_sessions d
             WHERE d.id = ANY (ARRAY (SELECT id FROM picked)) AND {recheck}
             RETURNING d.{key} AS key, d.id
         ), last AS (
             SELECT key::text AS key, id FROM deleted ORDER BY deleted.key DESC, id DESC LIMIT 1
         )
         SELECT (SELECT count(*) FROM deleted) AS deleted,
                (SELECT key FROM last) AS last_key,
                (SELECT id FROM last) AS last_id",
        pick = rule.predicate("s"),
        recheck = rule.predicate("d"),
    )
}

/// Deletes up to `limit` due rows of one part of the rule, in index order after `after`.
///
/// Rows locked by someone else (another runner, or a request refreshing the session) are skipped,
/// never waited for, so concurrent runners cannot deadlock or delete the same row; the outer
/// DELETE repeats the predicate so only rows that are due when locked are removed.
pub async fn delete_batch(
    executor: impl PgExecutor<'_>,
    rule: SessionRule,
    cutoffs: &SessionCutoffs,
    after: Option<&Cursor>,
    limit: u32,
) -> Result<BatchOutcome, sqlx::Error> {
    let sql = delete_batch_sql(rule, after.is_some());
    let mut query = sqlx::query_as::<_, BatchRow>(&sql)
        .bind(rule.cutoff(cutoffs))
        .bind(i64::from(limit));
    if let Some(cursor) = after {
        query = query.bind(&cursor.key).bind(cursor.id);
    }
    let row = query.fetch_one(executor).await?;
    let next = match (row.last_key, row.last_id) {
        (Some(key), Some(id)) => Some(Cursor { key, id }),
        _ => None,
    };
    Ok(BatchOutcome {
        deleted: row.deleted as u64,
        next,
    })
}

/// Deletes up to `limit` due rows under either part of the rule, in one statement: what most
/// runs find (a few dozen rows an hour) goes in one transaction, where the walks cost a
/// statement and a transaction per part. The cutoffs are literals, so that the statement is
/// planned for them: through both indexes (a BitmapOr) when few rows are due, a sequential scan
/// that stops at `limit` on a backlog. It goes with its `limits` as one simple query, a batch in
/// one round trip ([`crate::batch::one_statement`]), like the bare DELETE it is measured against.
///
/// The rows are found first, then deleted by `ctid` (a Tid Scan, no second index lookup, no
/// row lock taken before the delete's own). A row a request is updating meanwhile is waited for
/// (bounded by `lock_timeout`); its new version has another `ctid`, so it is kept, whatever the
/// rule says of it, until the next run.
pub async fn delete_few(
    pool: &sqlx::PgPool,
    limits: crate::batch::BatchLimits,
    cutoffs: &SessionCutoffs,
    limit: u32,
) -> Result<RangeOutcome, sqlx::Error> {
    let sql = format!(
        "WITH deleted AS (
             DELETE FROM user_sessions d
             WHERE d.ctid = ANY (ARRAY (SELECT s.ctid FROM user_sessions s WHERE {pick} LIMIT {limit})) AND {recheck}
             RETURNING d.expires_at < '{expired}'::timestamptz AS expired
         )
         SELECT count(*) FILTER (WHERE expired), count(*) FILTER (WHERE NOT expired) FROM deleted",
        pick = cutoffs.rule("s"),
        recheck = cutoffs.rule("d"),
        expired = cutoffs.expired_before.to_rfc3339(),
    );
    let (expired, anonymous): (i64, i64) = crate::batch::one_statement(pool, limits, &sql).await?;
    Ok(RangeOutcome { expired, anonymous })
}

/// How many rows each part of the rule would delete now (a row due under both parts counts as
/// expired). Reads only the due rows, through the two indexes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, FromRow)]
pub struct DueCounts {
    pub expired: i64,
    pub anonymous: i64,
}

impl DueCounts {
    pub fn total(&self) -> i64 {
        self.expired + self.anonymous
    }
}

pub async fn count_due(
    executor: impl PgExecutor<'_>,
    cutoffs: &SessionCutoffs,
) -> Result<DueCounts, sqlx::Error> {
    sqlx::query_as!(
        DueCounts,
        r#"SELECT count(*) FILTER (WHERE expires_at < $1) AS "expired!",
                count(*) FILTER (WHERE NOT expires_at < $1) AS "anonymous!"
         FROM user_sessions
         WHERE expires_at < $1 OR (user_id IS NULL AND created_at < $2)"#,
        cutoffs.expired_before,
        cutoffs.anonymous_created_before
    )
    .fetch_one(executor)
    .await
}

/// Rows deleted by one block-range batch, by part of the rule (a row due under both counts as
/// expired).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RangeOutcome {
    pub expired: i64,
    pub anonymous: i64,
}

/// Deletes every due row on the pages of `range`; run it in a transaction.
///
/// Plain DELETEs, one per part of the rule (counting with RETURNING made the walk ~45% slower;
/// the second statement finds the pages in shared buffers). A row that a request is updating at
/// that moment is waited for (bounded by the batch's `lock_timeout`), then the rule is checked
/// again on the row's newest version, so a session refreshed meanwhile is kept.
pub async fn delete_block_range(
    tx: &mut sqlx::PgConnection,
    cutoffs: &SessionCutoffs,
    range: BlockRange,
) -> Result<RangeOutcome, sqlx::Error> {
    let (from, to) = range.tids();
    let mut outcome = RangeOutcome::default();
    for rule in SessionRule::ALL {
        let gone = sqlx::query(&format!(
            "DELETE FROM user_sessions s WHERE s.ctid >= $2::tid AND s.ctid < $3::tid AND {}",
            rule.predicate("s")
        ))
        .bind(rule.cutoff(cutoffs))
        .bind(&from)
        .bind(&to)
        .execute(&mut *tx)
        .await?
        .rows_affected() as i64;
        match rule {
            SessionRule::Expired => outcome.expired = gone,
            SessionRule::AnonymousStale => outcome.anonymous = gone,
        }
    }
    Ok(outcome)
}

/// The planner's estimate of the rows due now, from the table's statistics: free (no row is
/// read), and good enough to choose between walking the indexes and walking the heap.
pub async fn estimate_due(
    executor: impl PgExecutor<'_>,
    cutoffs: &SessionCutoffs,
) -> Result<f64, sqlx::Error> {
    // Literals, not parameters: a generic plan would estimate from default selectivities.
    let sql = format!(
        "EXPLAIN SELECT 1 FROM user_sessions s WHERE {}",
        cutoffs.rule("s")
    );
    let plan: String = sqlx::query_scalar(&sql).fetch_one(executor).await?;
    Ok(crate::heap::plan_rows(&plan))
}
