//! What a run would delete, counted by the rule and deleting nothing: `engine retention run
//! --dry-run`, and a tenant's proposed windows (`engine tenant retention set ... --dry-run`,
//! `PUT ...?dry_run=true`).
//!
//! Previews never block writers: they only read, in one read-only snapshot, one range at a time,
//! each statement under `statement_timeout`. A proposed window is never written anywhere, not
//! even in a transaction rolled back later (that held the tenant's row and the rules' lock for as
//! long as the count took, and every tenant insert, window change and hold waited behind it): the
//! rule reads it from the statement, in place of the tenant's row.

use std::time::Duration;

use sqlx::postgres::types::PgInterval;
use sqlx::{PgPool, Postgres, Transaction};
use uuid::Uuid;

use super::{ranges, Range};
use crate::rule::Rule;
use crate::sql::{Fragment, Sql};

/// A read-only snapshot whose statements stop after `statement_timeout`.
async fn begin(
    pool: &PgPool,
    statement_timeout: Duration,
) -> Result<Transaction<'static, Postgres>, sqlx::Error> {
    pool.begin_with(format!(
        "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY; SET LOCAL statement_timeout = '{}ms'; SET LOCAL jit = off",
        statement_timeout.as_millis().max(1)
    ))
    .await
}

/// Tasks of one tenant that a run would delete now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TenantDue {
    pub tenant_id: Uuid,
    /// Under the live tenant's retention.
    pub retained: i64,
    /// Of a tenant deleted longer ago than the grace period.
    pub purged: i64,
}

/// What the `task-history` rule would delete now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Due {
    /// Per tenant with any.
    pub tenants: Vec<TenantDue>,
    /// Orphan events due, wherever they are.
    pub orphan_events: i64,
}

/// Counts, per tenant with any, every task due by `rule` (each goes with its events and queue
/// items), and every orphan event due: range by range, in one snapshot.
pub async fn due(
    pool: &PgPool,
    rule: &Rule,
    statement_timeout: Duration,
) -> Result<Due, sqlx::Error> {
    let mut tx = begin(pool, statement_timeout).await?;
    let mut by_tenant: std::collections::BTreeMap<Uuid, TenantDue> = Default::default();
    let mut orphan_events = 0;
    for range in ranges::all(&mut *tx).await? {
        let mut sql = Sql::new(
            "SELECT t.tenant_id, count(*) FILTER (WHERE tn.deleted_at IS NULL), count(*) FILTER (WHERE tn.deleted_at IS NOT NULL)
             FROM {tasks} t LEFT JOIN tenants tn ON tn.id = t.tenant_id
             WHERE {due} GROUP BY t.tenant_id",
        );
        sql.raw("tasks", &range.tasks_name)
            .with("due", rule.task_due("t", "tn"));
        let rows: Vec<(Uuid, i64, i64)> = sql.build_query_as().fetch_all(&mut *tx).await?;
        for (tenant_id, retained, purged) in rows {
            let entry = by_tenant.entry(tenant_id).or_insert(TenantDue {
                tenant_id,
                ..Default::default()
            });
            entry.retained += retained;
            entry.purged += purged;
        }
        orphan_events += orphans_in(&mut tx, &range, rule).await?;
    }
    tx.commit().await?;
    Ok(Due {
        tenants: by_tenant.into_values().collect(),
        orphan_events,
    })
}

async fn orphans_in(
    tx: &mut Transaction<'static, Postgres>,
    range: &Range,
    rule: &Rule,
) -> Result<i64, sqlx::Error> {
    let mut sql = Sql::new("SELECT count(*) FROM {events} e WHERE {due}");
    sql.raw("events", &range.events_name)
        .with("due", rule.orphan_due("e", &range.tasks_name));
    sql.build_query_scalar().fetch_one(&mut **tx).await
}

/// A tenant's rules as a preview proposes them: its row, with some windows replaced.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ProposedRules {
    pub tenant_id: Uuid,
    /// The new `data_retention_period` (`Some(None)`: forever), or `None`: as it is.
    pub data_retention_period: Option<Option<PgInterval>>,
    /// The new window of a status (`Some(None)`: back to `data_retention_period`), or `None`: as
    /// it is. A status's "forever" is 1000 years, as stored.
    pub succeeded_retention_period: Option<Option<PgInterval>>,
    pub failed_retention_period: Option<Option<PgInterval>>,
    pub cancelled_retention_period: Option<Option<PgInterval>>,
}

impl ProposedRules {
    /// The row the rule reads in place of the tenant's (the columns of `tenants` it needs).
    fn as_row(&self) -> Fragment {
        let column = |fragment: Fragment, name: &str, proposed: &Option<Option<PgInterval>>| {
            fragment
                .push("CASE WHEN ")
                .bind(proposed.is_some())
                .push(" THEN ")
                .bind((*proposed).flatten())
                .push(format!("::interval ELSE tn.{name} END AS {name}"))
        };
        let row = Fragment::text("SELECT tn.id, tn.deleted_at, ");
        let row = column(row, "data_retention_period", &self.data_retention_period).push(", ");
        let row = column(
            row,
            "succeeded_retention_period",
            &self.succeeded_retention_period,
        )
        .push(", ");
        let row = column(
            row,
            "failed_retention_period",
            &self.failed_retention_period,
        )
        .push(", ");
        let row = column(
            row,
            "cancelled_retention_period",
            &self.cancelled_retention_period,
        );
        row.push(" FROM tenants tn WHERE tn.id = ")
            .bind(self.tenant_id)
    }
}

/// What the next run would delete of one tenant: its due tasks per status, and their events.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TenantPreview {
    pub tasks: Vec<(String, i64)>,
    pub events: i64,
}

/// Counts, by `rule` under the `proposed` rules of one tenant, its tasks due per status and their
/// events: range by range, in one read-only snapshot, through the tenant's index.
pub async fn tenant(
    pool: &PgPool,
    proposed: &ProposedRules,
    rule: &Rule,
    statement_timeout: Duration,
) -> Result<TenantPreview, sqlx::Error> {
    let mut tx = begin(pool, statement_timeout).await?;
    let mut by_status: Vec<(String, i64)> = Vec::new();
    let mut events = 0;
    for range in ranges::all(&mut *tx).await? {
        let mut sql = Sql::new(
            "WITH tn AS MATERIALIZED ({tenant}),
                  due AS MATERIALIZED (SELECT t.id, t.inserted_at, t.status FROM {tasks} t, tn WHERE t.tenant_id = tn.id AND {due})
             SELECT d.status, count(*), coalesce(sum((SELECT count(*) FROM {events} e
                                                     WHERE e.task_id = d.id AND e.task_inserted_at = d.inserted_at)), 0)::bigint
             FROM due d GROUP BY d.status",
        );
        sql.with("tenant", proposed.as_row())
            .raw("tasks", &range.tasks_name)
            .raw("events", &range.events_name)
            .with("due", rule.task_due("t", "tn"));
        let rows: Vec<(String, i64, i64)> = sql.build_query_as().fetch_all(&mut *tx).await?;
        for (status, tasks, n) in rows {
            match by_status.iter_mut().find(|(s, _)| *s == status) {
                Some((_, total)) => *total += tasks,
                None => by_status.push((status, tasks)),
            }
            events += n;
        }
    }
    tx.commit().await?;
    let order = ["succeeded", "failed", "cancelled", "queued", "running"];
    by_status.sort_by_key(|(status, _)| order.iter().position(|s| s == status));
    Ok(TenantPreview {
        tasks: by_status,
        events,
    })
}
