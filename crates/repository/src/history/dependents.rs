//! What leaves with a task besides its events and queue items: its payloads and log lines.
//!
//! Every statement that deletes tasks (the index walk, the page sweep, the purge) or counts the
//! tasks a rewrite dropped takes its CTEs from here, so that no path deletes a task and keeps
//! its payloads, or forgets an object: deleting a payload row that points at a stored object
//! writes the object's key to the outbox (`object_deletions`) by trigger, in the same
//! transaction.
//!
//! `task_payloads` and `task_logs` are partitioned by day on their own: the statements bound the
//! task's `inserted_at` by the range's bounds, so that only the partitions of those days are
//! planned and opened (pruned by the planner for a custom plan, when the executor starts for a
//! generic one).

use crate::sql::Fragment;

/// The tasks being deleted: a CTE of the statement with their `id` and `inserted_at` columns,
/// all within `[lower, upper)` (SQL text of `timestamptz`, `-infinity`/`infinity` for none).
pub(crate) struct Victims<'a> {
    pub cte: &'a str,
    pub id: &'a str,
    pub inserted_at: &'a str,
    pub lower: String,
    pub upper: String,
    /// Also require that no task with that key is left in `tasks` (a rewrite's count: the tasks
    /// it dropped from a detached table, never one it copied).
    pub only_if_gone: bool,
    /// Also leave what a hold covers now (a rewrite's count, which decides its tasks by the rule
    /// recorded at its swap: a hold added since keeps their payloads and log lines, which the
    /// orphan sweep then treats as held orphans).
    pub unless_held_now: Option<&'a crate::rule::Rule>,
    /// The CTE also has `archived` (the task has an archive record, and its tenant archives its
    /// status) and the record's
    /// `max_payload_id` and `max_log_id`: of an archived task only the rows its archive holds
    /// go (ids up to those), and one written since stays, a late row (a rewrite's count, whose
    /// tasks were decided before such a row could be written).
    pub up_to_archived: bool,
}

/// Two CTEs, `payloads` (yielding `tenant_id`, `external`) and `logs` (yielding `tenant_id`),
/// deleting the payloads and log lines of the victims. To be placed after the CTE that defines
/// the victims, separated by commas as the caller writes them.
pub(crate) fn delete_ctes(victims: &Victims<'_>) -> Fragment {
    let mut fragment = Fragment::default();
    for (name, table, returning, max_id) in [
        (
            "payloads",
            "task_payloads",
            "d.tenant_id, d.external_key IS NOT NULL AS external",
            "max_payload_id",
        ),
        ("logs", "task_logs", "d.tenant_id", "max_log_id"),
    ] {
        if name == "logs" {
            fragment = fragment.push(", ");
        }
        // Within the range's bounds: the one partition is read (not every live task of every
        // partition, hashed, as the planner chose without them).
        let guard = if victims.only_if_gone {
            " AND NOT EXISTS (SELECT 1 FROM tasks k WHERE k.id = v.__id AND k.inserted_at = v.__at
                                AND k.inserted_at >= __lower::timestamptz AND k.inserted_at < __upper::timestamptz)"
                .replace("__id", victims.id)
                .replace("__at", victims.inserted_at)
                .replace("__lower", &sql_literal(&victims.lower))
                .replace("__upper", &sql_literal(&victims.upper))
        } else {
            String::new()
        };
        let guard = if victims.up_to_archived {
            format!("{guard} AND (NOT v.archived OR d.id <= coalesce(v.{max_id}, 0))")
        } else {
            guard
        };
        fragment = fragment.push(format!(
            "{name} AS (DELETE FROM {table} d USING {cte} v
                 WHERE d.task_id = v.{id} AND d.task_inserted_at = v.{at}{guard}
                   AND ",
            cte = victims.cte,
            id = victims.id,
            at = victims.inserted_at,
        ));
        fragment = match victims.unless_held_now {
            Some(rule) => fragment
                .push("NOT ")
                .then(rule.held("d.tenant_id", "d.task_id")),
            None => fragment.push("true"),
        };
        // Bound as `timestamptz` values, not text cast by the server (a stable cast, evaluated
        // only when the executor starts): the planner then prunes to the range's day partitions
        // itself, instead of planning every partition of both tables (8 ms of planning a run
        // with 70 days, in `bench history --section status`). An infinite bound is no bound.
        for (bound, op) in [(&victims.lower, ">="), (&victims.upper, "<")] {
            if let Ok(at) = chrono::DateTime::parse_from_rfc3339(bound) {
                fragment = fragment
                    .push(format!(" AND d.task_inserted_at {op} "))
                    .bind(at.with_timezone(&chrono::Utc));
            }
        }
        fragment = fragment.push(format!(" RETURNING {returning})"));
    }
    fragment
}

/// Per tenant: the payloads, log lines and objects the two CTEs deleted, as a relation
/// `(tenant_id, payloads, logs, objects)` to join receipts with.
pub(crate) const BY_TENANT: &str =
    "(SELECT tenant_id, sum(p) AS payloads, sum(l) AS logs, sum(o) AS objects FROM (
         SELECT tenant_id, 1 AS p, 0 AS l, CASE WHEN external THEN 1 ELSE 0 END AS o FROM payloads
         UNION ALL SELECT tenant_id, 0, 1, 0 FROM logs) z GROUP BY tenant_id)";

/// `text` as an SQL string literal.
fn sql_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}
