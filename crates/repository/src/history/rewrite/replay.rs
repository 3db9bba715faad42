//! The catch-up: what writers changed in the sources since the copy, and what a change of rules
//! changed for a tenant, replayed into the new range key by key. Each replay removes the keys'
//! rows from the new tables and copies them again if the rule keeps them now: idempotent, so a
//! key replayed twice, or a pass rolled back and run again, leaves the same new tables. Every
//! statement finds its rows through an index, keyed by the keys given: the last pass runs under
//! the parents' lock.

use chrono::{DateTime, Utc};
use sqlx::postgres::types::Oid;
use sqlx::PgConnection;
use uuid::Uuid;

use super::{columns, Rewrite};
use crate::history::ident;
use crate::sql::Sql;

/// Task keys and event keys to replay.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Keys {
    pub task_ids: Vec<Uuid>,
    pub task_ats: Vec<DateTime<Utc>>,
    pub event_ids: Vec<i64>,
    pub event_ats: Vec<DateTime<Utc>>,
    /// Tenants whose rows these are.
    pub tenants: Vec<Uuid>,
}

impl Keys {
    pub fn is_empty(&self) -> bool {
        self.task_ids.is_empty() && self.event_ids.is_empty()
    }
}

/// Replays `keys`: every event named, and every event of a task named (in the sources and in the
/// new range), and every task named, removed from the new range; the tasks copied again if the
/// rule keeps them, the events if their task was copied or they are orphans the rule keeps; the
/// orphans met recorded; the tenants recorded as seen. In the caller's transaction.
pub(crate) async fn keys(
    conn: &mut PgConnection,
    rewrite: &Rewrite,
    keys: &Keys,
) -> Result<(), sqlx::Error> {
    if keys.is_empty() {
        return Ok(());
    }
    // An archiving tenant's task whose event changed is decided again too: the copy may have
    // dropped it as archived, and the event makes it differ from its archive (it then waits for
    // a new one, kept).
    let changed_tasks: Vec<(Uuid, DateTime<Utc>)> = sqlx::query_as(&format!(
        "SELECT DISTINCT e.task_id, e.task_inserted_at
           FROM unnest($1::int8[], $2::timestamptz[]) AS ev(id, at)
           JOIN task_events e ON e.id = ev.id AND e.task_inserted_at = ev.at
          WHERE e.tenant_id = ANY ({})",
        crate::rule::ARCHIVING_TENANTS
    ))
    .bind(&keys.event_ids)
    .bind(&keys.event_ats)
    .fetch_all(&mut *conn)
    .await?;
    let mut widened;
    let keys = if changed_tasks.is_empty() {
        keys
    } else {
        widened = keys.clone();
        for (id, at) in changed_tasks {
            if !widened
                .task_ids
                .iter()
                .zip(&widened.task_ats)
                .any(|(i, a)| *i == id && *a == at)
            {
                widened.task_ids.push(id);
                widened.task_ats.push(at);
            }
        }
        &widened
    };
    let rule = rewrite.rule();
    let (new_tasks, new_events) = (
        ident(&rewrite.new_tasks_name),
        ident(&rewrite.new_events_name),
    );
    let (lower, upper) = (rewrite.lower, rewrite.upper);
    // The events to decide again: those named, and every event of the tasks named, wherever.
    let mut touched = Sql::new(
        "SELECT DISTINCT id, task_inserted_at FROM (
             SELECT ev.id, ev.at AS task_inserted_at FROM unnest({event_ids}::int8[], {event_ats}::timestamptz[]) AS ev(id, at)
             UNION ALL
             SELECT e.id, e.task_inserted_at FROM unnest({task_ids}::uuid[], {task_ats}::timestamptz[]) AS k(id, at)
             JOIN task_events e ON e.task_id = k.id AND e.task_inserted_at = k.at
             WHERE e.task_inserted_at >= {lower} AND e.task_inserted_at < {upper}
             UNION ALL
             SELECT n.id, n.task_inserted_at FROM unnest({task_ids2}::uuid[], {task_ats2}::timestamptz[]) AS k(id, at)
             JOIN {new_events} n ON n.task_id = k.id AND n.task_inserted_at = k.at) x",
    );
    touched
        .bind("event_ids", keys.event_ids.clone())
        .bind("event_ats", keys.event_ats.clone())
        .bind("task_ids", keys.task_ids.clone())
        .bind("task_ats", keys.task_ats.clone())
        .bind("task_ids2", keys.task_ids.clone())
        .bind("task_ats2", keys.task_ats.clone())
        .bind("lower", lower)
        .bind("upper", upper)
        .raw("new_events", new_events.clone());
    let events: Vec<(i64, DateTime<Utc>)> = touched.build_query_as().fetch_all(&mut *conn).await?;
    let (event_ids, event_ats): (Vec<i64>, Vec<DateTime<Utc>>) = events.into_iter().unzip();

    sqlx::query(&format!(
        "DELETE FROM {new_events} n USING unnest($1::int8[], $2::timestamptz[]) AS ev(id, at) WHERE n.id = ev.id AND n.task_inserted_at = ev.at"
    ))
    .bind(&event_ids)
    .bind(&event_ats)
    .execute(&mut *conn)
    .await?;
    sqlx::query(&format!(
        "DELETE FROM {new_tasks} n USING unnest($1::uuid[], $2::timestamptz[]) AS k(id, at) WHERE n.id = k.id AND n.inserted_at = k.at"
    ))
    .bind(&keys.task_ids)
    .bind(&keys.task_ats)
    .execute(&mut *conn)
    .await?;

    let task_columns = columns(&mut *conn, "tasks").await?;
    let mut copy_tasks = Sql::new(
        "INSERT INTO {new_tasks} ({columns})
         SELECT {t_columns} FROM (SELECT DISTINCT * FROM unnest({ids}::uuid[], {ats}::timestamptz[]) AS k(id, at)) k
         JOIN tasks t ON t.id = k.id AND t.inserted_at = k.at
         LEFT JOIN tenants tn ON tn.id = t.tenant_id
         WHERE t.inserted_at >= {lower} AND t.inserted_at < {upper} AND {kept}",
    );
    copy_tasks
        .raw("new_tasks", new_tasks.clone())
        .raw("columns", task_columns.clone())
        .raw("t_columns", prefixed("t", &task_columns))
        .bind("ids", keys.task_ids.clone())
        .bind("ats", keys.task_ats.clone())
        .bind("lower", lower)
        .bind("upper", upper)
        .with("kept", rule.task_kept("t", "tn"));
    copy_tasks.build().execute(&mut *conn).await?;

    let event_columns = columns(&mut *conn, "task_events").await?;
    let mut copy_events = Sql::new(
        "INSERT INTO {new_events} ({columns})
         SELECT {e_columns} FROM unnest({ids}::int8[], {ats}::timestamptz[]) AS ev(id, at)
         JOIN task_events e ON e.id = ev.id AND e.task_inserted_at = ev.at
         WHERE e.task_inserted_at >= {lower} AND e.task_inserted_at < {upper}
           AND (EXISTS (SELECT 1 FROM {new_tasks} k WHERE k.id = e.task_id AND k.inserted_at = e.task_inserted_at)
                OR {orphan_kept})",
    );
    copy_events
        .bind("ids", event_ids.clone())
        .bind("ats", event_ats.clone())
        .bind("lower", lower)
        .bind("upper", upper)
        .raw("new_events", new_events)
        .raw("new_tasks", new_tasks)
        .raw("columns", event_columns.clone())
        .raw("e_columns", prefixed("e", &event_columns))
        .with("orphan_kept", rule.orphan_kept("e", "tasks"));
    copy_events.build().execute(&mut *conn).await?;
    // The orphans met: the events named are looked at again.
    sqlx::query!(
        "DELETE FROM history_rewrite_orphans o USING unnest($2::int8[], $3::timestamptz[]) AS ev(id, at)
         WHERE o.rewrite_id = $1 AND o.event_id = ev.id AND o.task_inserted_at = ev.at",
        rewrite.id,
        &event_ids,
        &event_ats
    )
    .execute(&mut *conn)
    .await?;
    sqlx::query!(
        "INSERT INTO history_rewrite_orphans (rewrite_id, event_id, task_inserted_at, tenant_id)
         SELECT $1, e.id, e.task_inserted_at, e.tenant_id FROM unnest($2::int8[], $3::timestamptz[]) AS ev(id, at)
         JOIN task_events e ON e.id = ev.id AND e.task_inserted_at = ev.at
         WHERE e.task_inserted_at >= $4 AND e.task_inserted_at < $5
           AND NOT EXISTS (SELECT 1 FROM tasks t WHERE t.id = e.task_id AND t.inserted_at = e.task_inserted_at)",
        rewrite.id,
        &event_ids,
        &event_ats,
        lower,
        upper
    )
    .execute(&mut *conn)
    .await?;

    sqlx::query!(
        "INSERT INTO history_rewrite_tenants (rewrite_id, tenant_id) SELECT $1, t FROM unnest($2::uuid[]) AS t ON CONFLICT DO NOTHING",
        rewrite.id,
        &keys.tenants
    )
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// `columns` (an SQL list of quoted names) each prefixed with `alias.`.
fn prefixed(alias: &str, columns: &str) -> String {
    columns
        .split(", ")
        .map(|c| format!("{alias}.{c}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Replays up to `limit` of the sources' logged writes, consuming them; returns how many there
/// were. In no particular order: a replay decides each key from the rows as they are now. In the
/// caller's transaction.
pub async fn log_pass(
    conn: &mut PgConnection,
    rewrite: &Rewrite,
    limit: i64,
) -> Result<usize, sqlx::Error> {
    let task_relids: Vec<Oid> = rewrite.sources.iter().map(|s| s.tasks_relid).collect();
    let relids = rewrite.source_relids();
    type Entry = (Oid, Uuid, Option<Uuid>, Option<DateTime<Utc>>, Option<i64>);
    let entries: Vec<Entry> = sqlx::query!(
        "DELETE FROM history_changes WHERE id = ANY (ARRAY (
             SELECT id FROM history_changes WHERE relid = ANY($1) LIMIT $2))
         RETURNING relid, tenant_id, task_id, task_inserted_at, event_id",
        &relids,
        limit
    )
    .fetch_all(&mut *conn)
    .await?
    .into_iter()
    .map(|row| {
        (
            row.relid,
            row.tenant_id,
            row.task_id,
            row.task_inserted_at,
            row.event_id,
        )
    })
    .collect();
    let mut pass = Keys::default();
    for (relid, tenant, task_id, task_at, event_id) in &entries {
        if task_relids.contains(relid) {
            if let (Some(id), Some(at)) = (task_id, task_at) {
                pass.task_ids.push(*id);
                pass.task_ats.push(*at);
            }
        } else if let (Some(id), Some(at)) = (event_id, task_at) {
            pass.event_ids.push(*id);
            pass.event_ats.push(*at);
        }
        if !pass.tenants.contains(tenant) {
            pass.tenants.push(*tenant);
        }
    }
    keys(conn, rewrite, &pass).await?;
    Ok(entries.len())
}

/// The rules' version now, and the tenants whose rules changed since the version the rewrite's
/// rows were decided under (each of them is copied again before the swap).
pub async fn changed_tenants(
    conn: &mut PgConnection,
    rewrite: &Rewrite,
) -> Result<(i64, Vec<Uuid>), sqlx::Error> {
    let version: i64 = sqlx::query_scalar!("SELECT version FROM retention_rules")
        .fetch_one(&mut *conn)
        .await?;
    let tenants: Vec<Uuid> = sqlx::query_scalar!(
        "SELECT DISTINCT c.tenant_id FROM retention_rule_changes c
         WHERE c.version > $1 AND c.version <= $2
           AND EXISTS (SELECT 1 FROM history_rewrite_tenants s WHERE s.rewrite_id = $3 AND s.tenant_id = c.tenant_id)
         ORDER BY 1",
        rewrite.rules_version,
        version,
        rewrite.id
    )
    .fetch_all(&mut *conn)
    .await?;
    Ok((version, tenants))
}

/// Replays up to `limit` of tenant `tenant`'s tasks in the sources, by id after `after` (and, on
/// the first call, with `after` `None`, every orphan of the tenant met so far): its rows decided
/// again under its rules as they are now. Returns the last task id replayed, `None` once the
/// tenant's rows are all replayed. In the caller's transaction.
pub async fn tenant_chunk(
    conn: &mut PgConnection,
    rewrite: &Rewrite,
    tenant: Uuid,
    after: Option<Uuid>,
    limit: i64,
) -> Result<Option<Uuid>, sqlx::Error> {
    let tasks: Vec<(Uuid, DateTime<Utc>)> = sqlx::query!(
        "SELECT id, inserted_at FROM tasks
         WHERE tenant_id = $1 AND id > $2 AND inserted_at >= $3 AND inserted_at < $4
         ORDER BY id LIMIT $5",
        tenant,
        after.unwrap_or_else(Uuid::nil),
        rewrite.lower,
        rewrite.upper,
        limit
    )
    .fetch_all(&mut *conn)
    .await?
    .into_iter()
    .map(|row| (row.id, row.inserted_at))
    .collect();
    let mut chunk = Keys {
        tenants: vec![tenant],
        ..Keys::default()
    };
    for (id, at) in &tasks {
        chunk.task_ids.push(*id);
        chunk.task_ats.push(*at);
    }
    if after.is_none() {
        let orphans = sqlx::query!(
            "SELECT event_id, task_inserted_at FROM history_rewrite_orphans WHERE rewrite_id = $1 AND tenant_id = $2",
            rewrite.id,
            tenant
        )
        .fetch_all(&mut *conn)
        .await?
        .into_iter()
        .map(|row| (row.event_id, row.task_inserted_at));
        for (id, at) in orphans {
            chunk.event_ids.push(id);
            chunk.event_ats.push(at);
        }
    }
    keys(conn, rewrite, &chunk).await?;
    Ok(if (tasks.len() as i64) < limit {
        None
    } else {
        tasks.last().map(|(id, _)| *id)
    })
}

/// Records that the rewrite's rows follow the rules of `version` (every tenant changed since the
/// last recorded version was copied again).
pub async fn caught_up_with(
    conn: &mut PgConnection,
    rewrite: &Rewrite,
    version: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query!(
        "UPDATE history_rewrites SET rules_version = $2 WHERE id = $1",
        rewrite.id,
        version
    )
    .execute(conn)
    .await?;
    Ok(())
}

/// Records the rules of every tenant seen whose rules were not recorded under the rewrite's
/// version, as they are now, provided the rules are still at that version (else nothing: the
/// tenants changed must be copied again first). Returns whether they were.
pub async fn record_tenant_rules(
    conn: &mut PgConnection,
    rewrite: &Rewrite,
) -> Result<bool, sqlx::Error> {
    let recorded: Option<i64> = sqlx::query_scalar!(
        "WITH current AS (SELECT version FROM retention_rules WHERE version = $2),
              recorded AS (
                  UPDATE history_rewrite_tenants s
                  SET recorded_version = (SELECT version FROM current), id = tn.id, deleted_at = tn.deleted_at,
                      data_retention_period = tn.data_retention_period, succeeded_retention_period = tn.succeeded_retention_period,
                      failed_retention_period = tn.failed_retention_period, cancelled_retention_period = tn.cancelled_retention_period
                  FROM history_rewrite_tenants x LEFT JOIN tenants tn ON tn.id = x.tenant_id
                  WHERE s.rewrite_id = $1 AND x.rewrite_id = s.rewrite_id AND x.tenant_id = s.tenant_id
                    AND s.recorded_version IS DISTINCT FROM $2 AND EXISTS (SELECT 1 FROM current)
                  RETURNING 1)
         SELECT version FROM current",
        rewrite.id,
        rewrite.rules_version
    )
    .fetch_optional(&mut *conn)
    .await?;
    Ok(recorded.is_some())
}
