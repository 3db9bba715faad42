//! The rule matrix: rows of run history on both sides of every cutoff, each with its fate written
//! down by hand (never computed by a copy of the rule), and the ways to run every path that
//! deletes them or decides what a copy keeps. `rule_matrix.rs` runs each path and expects no row
//! to meet another fate; `rule_matrix_broken.rs` runs them again with the rule's one hold check
//! broken, and expects every path to delete what holds cover.
//!
//! Tenants (windows relative to the database's clock at seeding):
//! * `a`: 2 days, failed 5 days, cancelled forever; a task of it is held by its id;
//! * `h`: the same windows, held whole;
//! * `dg`: deleted 23 hours ago (within the 24-hour grace); `dp`: deleted 25 hours ago; `dph`: the
//!   same, held;
//! * `f`: forever; `u`: a tenant id with no row.
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::time::Duration;

use chrono::{DateTime, Duration as Span, Utc};
use sqlx::PgPool;
use uuid::Uuid;

use super::common::*;

pub const GRACE: Duration = Duration::from_secs(86_400);

/// Which rows a path deletes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Due tasks with their events and queue items, and due orphan events (`task-history`, a
    /// rewrite).
    Tasks,
    /// Due orphan events only.
    Orphans,
    /// Due queue items only (`queue-items`).
    QueueItems,
}

/// A seeded row and its fate under each scope.
#[derive(Debug, Clone)]
pub struct Fated<K> {
    pub key: K,
    pub what: String,
    /// Gone under the task (or orphan) rule.
    pub due: bool,
    /// Gone under the queue-items rule (a task's queue item, a queue item on its own).
    pub item_due: bool,
}

/// The tenants of the matrix.
#[derive(Debug, Clone, Copy)]
pub struct Tenants {
    pub a: Uuid,
    pub h: Uuid,
    pub dg: Uuid,
    pub dp: Uuid,
    pub dph: Uuid,
    pub f: Uuid,
    pub u: Uuid,
    /// Archives its failed tasks (windows as `a`'s, but 2 days for every status).
    pub ar: Uuid,
}

/// What was seeded, with the fates.
#[derive(Debug, Default)]
pub struct Matrix {
    /// Tasks, each with one event and one queue item (`children`).
    pub tasks: Vec<Fated<TaskKey>>,
    pub children: Vec<(TaskKey, i64, i64)>,
    /// Each task's external payload (id, key) and log line (written now: never due by the log
    /// window), which leave with it.
    pub dependents: Vec<(i64, String, i64)>,
    /// Events whose task does not exist.
    pub orphans: Vec<Fated<i64>>,
    /// Queue items whose task does not exist.
    pub items: Vec<Fated<i64>>,
    /// Rows that are not the matrix's (filler for a path that needs volume): all due.
    pub filler_tenant: Option<Uuid>,
}

/// Creates the tenants (and the holds: `h` and `dph` whole, and `held_task` by id, added later).
pub async fn tenants(pool: &PgPool, now: DateTime<Utc>) -> Tenants {
    let a = insert_tenant(pool, Some("2 days"), None).await;
    let h = insert_tenant(pool, Some("2 days"), None).await;
    for tenant in [a, h] {
        sqlx::query("UPDATE tenants SET failed_retention_period = '5 days', cancelled_retention_period = '1000 years' WHERE id = $1")
            .bind(tenant)
            .execute(pool)
            .await
            .unwrap();
    }
    let dg = insert_tenant(pool, Some("1 hour"), Some(now - Span::hours(23))).await;
    let dp = insert_tenant(pool, None, Some(now - Span::hours(25))).await;
    let dph = insert_tenant(pool, None, Some(now - Span::hours(25))).await;
    let f = insert_tenant(pool, None, None).await;
    let ar = archiving_tenant(pool, "2 days").await;
    Tenants {
        ar,
        a,
        h,
        dg,
        dp,
        dph,
        f,
        u: Uuid::new_v4(),
    }
}

pub async fn hold(pool: &PgPool, tenant: Uuid, task: Option<Uuid>) {
    sqlx::query("INSERT INTO retention_holds (tenant_id, task_id, reason, created_by) VALUES ($1, $2, 'matrix', 'test')")
        .bind(tenant)
        .bind(task)
        .execute(pool)
        .await
        .unwrap();
}

/// Records `task` as held by a written archive of `tenant` (a manifest row of its own), as the
/// task is now and as the engine records it: its status, finish, how many events, payloads and
/// log lines it has and the highest id of each.
pub async fn archive(pool: &PgPool, tenant: Uuid, task: TaskKey) {
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO retention_archives (object_key, store, tenant_id, status, first_at, first_task, last_at, last_task,
                                         run_id, part, state, tasks, bytes, sha256, schema_version, written_at)
         SELECT 'archive/' || $1::text || '/' || $2::text || '.parquet', 'file:///matrix', $1, t.status,
                coalesce(t.finished_at, t.inserted_at), t.id, coalesce(t.finished_at, t.inserted_at), t.id,
                gen_random_uuid(), 0, 'written', 1, 100, 'sha', 1, now()
           FROM tasks t WHERE t.id = $2 AND t.inserted_at = $3
         RETURNING id",
    )
    .bind(tenant)
    .bind(task.0)
    .bind(task.1)
    .fetch_one(pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO retention_archived_tasks (task_id, task_inserted_at, archive_id, status, finished_at, events, payloads, logs,
                                               max_event_id, max_payload_id, max_log_id)
         SELECT t.id, t.inserted_at, $3, t.status, t.finished_at, e.n, p.n, l.n, e.max, p.max, l.max
           FROM tasks t,
                LATERAL (SELECT count(*) AS n, max(id) AS max FROM task_events e WHERE e.task_id = t.id AND e.task_inserted_at = t.inserted_at) e,
                LATERAL (SELECT count(*) AS n, max(id) AS max FROM task_payloads p WHERE p.task_id = t.id AND p.task_inserted_at = t.inserted_at) p,
                LATERAL (SELECT count(*) AS n, max(id) AS max FROM task_logs l WHERE l.task_id = t.id AND l.task_inserted_at = t.inserted_at) l
          WHERE t.id = $1 AND t.inserted_at = $2",
    )
    .bind(task.0)
    .bind(task.1)
    .bind(id)
    .execute(pool)
    .await
    .unwrap();
}

/// Records `task`, gone, as archived by a written archive of `tenant` (as retention leaves a run
/// it archived and deleted), the archive holding its events up to `max_event_id`.
pub async fn archive_gone(pool: &PgPool, tenant: Uuid, task: TaskKey, max_event_id: Option<i64>) {
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO retention_archives (object_key, store, tenant_id, status, first_at, first_task, last_at, last_task,
                                         run_id, part, state, tasks, bytes, sha256, schema_version, written_at)
         VALUES ('archive/' || $1::text || '/' || $2::text || '.parquet', 'file:///matrix', $1, 'failed',
                 $3, $2, $3, $2, gen_random_uuid(), 0, 'written', 1, 100, 'sha', 1, now())
         RETURNING id",
    )
    .bind(tenant)
    .bind(task.0)
    .bind(task.1)
    .fetch_one(pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO retention_archived_tasks (task_id, task_inserted_at, archive_id, status, finished_at, events, payloads, logs, max_event_id)
         VALUES ($1, $2, $3, 'failed', $2, 0, 0, 0, $4)",
    )
    .bind(task.0)
    .bind(task.1)
    .bind(id)
    .bind(max_event_id)
    .execute(pool)
    .await
    .unwrap();
}

/// A log line added to `task` (of `tenant`) after its archive: the archive no longer holds the
/// task as it is.
pub async fn add_late_log(pool: &PgPool, tenant: Uuid, task: TaskKey) {
    sqlx::query(
        "INSERT INTO task_logs (tenant_id, task_id, task_inserted_at, created_at, level, line)
         VALUES ($1, $2, $3, $3, 'info', 'written after the archive')",
    )
    .bind(tenant)
    .bind(task.0)
    .bind(task.1)
    .execute(pool)
    .await
    .unwrap();
}

/// Holds `h` and `dph` whole.
pub async fn hold_tenants(pool: &PgPool, t: &Tenants) {
    hold(pool, t.h, None).await;
    hold(pool, t.dph, None).await;
}

/// A task row to seed: who, what state, and its fates (under the task rule, and its queue item
/// under the queue-items rule).
pub struct Row<'a> {
    tenant: Uuid,
    status: &'a str,
    finished: Option<DateTime<Utc>>,
    due: bool,
    item_due: bool,
}

pub fn row(
    tenant: Uuid,
    status: &str,
    finished: Option<DateTime<Utc>>,
    due: bool,
    item_due: bool,
) -> Row<'_> {
    Row {
        tenant,
        status,
        finished,
        due,
        item_due,
    }
}

impl Matrix {
    pub async fn task(
        &mut self,
        pool: &PgPool,
        at: DateTime<Utc>,
        row: Row<'_>,
        what: &str,
    ) -> TaskKey {
        let children =
            insert_task_with_children(pool, row.tenant, row.status, at, row.finished).await;
        self.tasks.push(Fated {
            key: children.0,
            what: what.to_string(),
            due: row.due,
            item_due: row.item_due,
        });
        self.children.push(children);
        self.dependents
            .push(payload_and_log(pool, row.tenant, children.0).await);
        children.0
    }

    /// Seeds the task rows of tenant `tenant` (as `a` or, `held`, as `h`) in the range of `at`.
    pub async fn live_tenant_tasks(
        &mut self,
        pool: &PgPool,
        now: DateTime<Utc>,
        at: DateTime<Utc>,
        tenant: Uuid,
        held: bool,
    ) {
        let due = !held;
        let item = !held;
        let who = if held { "held tenant" } else { "tenant" };
        self.task(
            pool,
            at,
            row(
                tenant,
                "succeeded",
                Some(now - Span::days(2) - MINUTE),
                due,
                item,
            ),
            &format!("{who}: succeeded a minute before its 2 days"),
        )
        .await;
        self.task(
            pool,
            at,
            row(
                tenant,
                "succeeded",
                Some(now - Span::days(2) + MINUTE),
                false,
                item,
            ),
            &format!("{who}: succeeded a minute after its 2 days"),
        )
        .await;
        self.task(
            pool,
            at,
            row(
                tenant,
                "failed",
                Some(now - Span::days(5) - MINUTE),
                due,
                item,
            ),
            &format!("{who}: failed a minute before its 5 days"),
        )
        .await;
        self.task(
            pool,
            at,
            row(
                tenant,
                "failed",
                Some(now - Span::days(5) + MINUTE),
                false,
                item,
            ),
            &format!("{who}: failed a minute after its 5 days"),
        )
        .await;
        self.task(
            pool,
            at,
            row(
                tenant,
                "failed",
                Some(now - Span::days(2) - MINUTE),
                false,
                item,
            ),
            &format!("{who}: failed past the 2 days of succeeded"),
        )
        .await;
        self.task(
            pool,
            at,
            row(tenant, "cancelled", Some(now - Span::days(30)), false, item),
            &format!("{who}: cancelled, kept forever"),
        )
        .await;
        self.task(
            pool,
            at,
            row(tenant, "succeeded", None, due, item),
            &format!("{who}: succeeded, no finish, inserted long ago"),
        )
        .await;
        self.task(
            pool,
            at,
            row(tenant, "running", None, false, false),
            &format!("{who}: running"),
        )
        .await;
        self.task(
            pool,
            at,
            row(tenant, "queued", Some(now - Span::days(30)), false, false),
            &format!("{who}: queued"),
        )
        .await;
    }

    /// Seeds every task row of the matrix in the range of `at`.
    pub async fn all_tasks(
        &mut self,
        pool: &PgPool,
        now: DateTime<Utc>,
        at: DateTime<Utc>,
        t: &Tenants,
    ) {
        self.live_tenant_tasks(pool, now, at, t.a, false).await;
        self.live_tenant_tasks(pool, now, at, t.h, true).await;
        let held_task = self
            .task(
                pool,
                at,
                row(t.a, "succeeded", Some(now - Span::days(3)), false, false),
                "tenant: a task held by its id",
            )
            .await;
        hold(pool, t.a, Some(held_task.0)).await;
        self.deleted_tenants_tasks(pool, now, at, t).await;
        self.archiving_tenant_tasks(pool, now, at, t.ar).await;
        self.task(
            pool,
            at,
            row(t.f, "succeeded", Some(now - Span::days(30)), false, true),
            "forever tenant: succeeded long ago",
        )
        .await;
        self.task(
            pool,
            at,
            row(t.u, "succeeded", Some(now - Span::days(30)), false, true),
            "no tenant row: succeeded long ago",
        )
        .await;
    }

    /// Seeds the task rows of `tenant`, which archives its failed tasks, in the range of `at`:
    /// a failed task past its window goes only once an archive holds it; a succeeded one goes
    /// without; an archive lets nothing go before its window.
    pub async fn archiving_tenant_tasks(
        &mut self,
        pool: &PgPool,
        now: DateTime<Utc>,
        at: DateTime<Utc>,
        tenant: Uuid,
    ) {
        let past = Some(now - Span::days(2) - MINUTE);
        self.task(
            pool,
            at,
            row(tenant, "failed", past, false, true),
            "archiving tenant: failed past its window, not archived",
        )
        .await;
        let archived = self
            .task(
                pool,
                at,
                row(tenant, "failed", past, true, true),
                "archiving tenant: failed past its window, archived",
            )
            .await;
        archive(pool, tenant, archived).await;
        let changed = self
            .task(
                pool,
                at,
                row(tenant, "failed", past, false, true),
                "archiving tenant: failed past its window, archived, then a log line added",
            )
            .await;
        archive(pool, tenant, changed).await;
        add_late_log(pool, tenant, changed).await;
        self.task(
            pool,
            at,
            row(tenant, "succeeded", past, true, true),
            "archiving tenant: succeeded past its window (not a status it archives)",
        )
        .await;
        let young = self
            .task(
                pool,
                at,
                row(
                    tenant,
                    "failed",
                    Some(now - Span::days(2) + MINUTE),
                    false,
                    true,
                ),
                "archiving tenant: failed within its window, archived",
            )
            .await;
        archive(pool, tenant, young).await;
    }

    /// Seeds the deleted tenants' task rows in the range of `at`.
    pub async fn deleted_tenants_tasks(
        &mut self,
        pool: &PgPool,
        now: DateTime<Utc>,
        at: DateTime<Utc>,
        t: &Tenants,
    ) {
        self.task(
            pool,
            at,
            row(t.dg, "succeeded", Some(now - Span::days(30)), false, true),
            "deleted within its grace: succeeded",
        )
        .await;
        self.task(
            pool,
            at,
            row(t.dg, "running", None, false, true),
            "deleted within its grace: running",
        )
        .await;
        self.task(
            pool,
            at,
            row(t.dp, "succeeded", Some(now - Span::days(30)), true, true),
            "deleted past its grace: succeeded",
        )
        .await;
        self.task(
            pool,
            at,
            row(t.dp, "running", None, true, true),
            "deleted past its grace: running",
        )
        .await;
        self.task(
            pool,
            at,
            row(t.dph, "succeeded", Some(now - Span::days(30)), false, false),
            "deleted past its grace, held: succeeded",
        )
        .await;
        self.task(
            pool,
            at,
            row(t.dph, "running", None, false, false),
            "deleted past its grace, held: running",
        )
        .await;
    }

    /// Seeds the orphan events (no task) in the range of `at`.
    pub async fn orphans(
        &mut self,
        pool: &PgPool,
        now: DateTime<Utc>,
        at: DateTime<Utc>,
        t: &Tenants,
    ) {
        for (tenant, old_due, what) in [
            (t.a, true, "tenant"),
            (t.h, false, "held tenant"),
            (t.dp, true, "deleted tenant"),
            (t.u, true, "no tenant row"),
        ] {
            let missing: TaskKey = (Uuid::new_v4(), at);
            let old = insert_event(pool, tenant, missing, now - Span::hours(1) - MINUTE).await;
            self.orphans.push(Fated {
                key: old,
                what: format!("{what}: orphan a minute past an hour"),
                due: old_due,
                item_due: false,
            });
            let young = insert_event(pool, tenant, missing, now - Span::hours(1) + MINUTE).await;
            self.orphans.push(Fated {
                key: young,
                what: format!("{what}: orphan a minute short of an hour"),
                due: false,
                item_due: false,
            });
        }
        // The archiving tenant's: of a task the application deleted (no archive: a run's rows
        // are archived, not an orphan's), and of a run archived and deleted by retention, written
        // as its delete ran (in no archive: kept).
        let missing: TaskKey = (Uuid::new_v4(), at);
        let old = insert_event(pool, t.ar, missing, now - Span::hours(1) - MINUTE).await;
        self.orphans.push(Fated {
            key: old,
            what: "archiving tenant: orphan a minute past an hour".into(),
            due: true,
            item_due: false,
        });
        let archived: TaskKey = (Uuid::new_v4(), at);
        let held_by_archive =
            insert_event(pool, t.ar, archived, now - Span::hours(1) - MINUTE).await;
        archive_gone(pool, t.ar, archived, Some(held_by_archive)).await;
        self.orphans.push(Fated {
            key: held_by_archive,
            what: "archiving tenant: orphan its run's archive holds (the run deleted by the application)".into(),
            due: true,
            item_due: false,
        });
        let late = insert_event(pool, t.ar, archived, now - Span::hours(1) - MINUTE).await;
        self.orphans.push(Fated {
            key: late,
            what: "archiving tenant: orphan of an archived run retention deleted".into(),
            due: false,
            item_due: false,
        });
    }

    /// Seeds queue items whose task does not exist.
    pub async fn lone_items(&mut self, pool: &PgPool, at: DateTime<Utc>, t: &Tenants) {
        for (tenant, due, what) in [
            (t.a, true, "tenant"),
            (t.h, false, "held tenant"),
            (t.u, true, "no tenant row"),
        ] {
            let item = insert_queue_item(pool, tenant, (Uuid::new_v4(), at)).await;
            self.items.push(Fated {
                key: item,
                what: format!("{what}: queue item of no task"),
                due: false,
                item_due: due,
            });
        }
    }

    /// Due filler tasks of a one-day tenant in the range of `at`, each with an event, enough for a
    /// path that needs volume (a sweep, a rewrite that pays).
    pub async fn filler(&mut self, pool: &PgPool, at: DateTime<Utc>, n: i64) {
        let tenant = insert_tenant(pool, Some("1 day"), None).await;
        seed_tasks(pool, tenant, "succeeded", at, at + Span::hours(1), n).await;
        self.filler_tenant = Some(tenant);
    }

    /// The rows whose fate under `scope` was not met: deleted but to be kept, or left but due.
    pub async fn violations(&self, pool: &PgPool, scope: Scope) -> Vec<String> {
        let tasks: BTreeSet<TaskKey> = task_keys(pool).await.into_iter().collect();
        let events: BTreeSet<i64> = event_ids(pool).await.into_iter().collect();
        let items: BTreeSet<i64> = queue_item_ids(pool).await.into_iter().collect();
        let mut wrong = Vec::new();
        let mut check = |present: bool, gone: bool, what: &str| {
            if present == gone {
                wrong.push(format!(
                    "{} {what}",
                    if gone {
                        "left (due):"
                    } else {
                        "deleted (to keep):"
                    }
                ));
            }
        };
        for (task, (key, event, item)) in self.tasks.iter().zip(&self.children) {
            match scope {
                Scope::Tasks => {
                    check(tasks.contains(key), task.due, &task.what);
                    check(
                        events.contains(event),
                        task.due,
                        &format!("{}'s event", task.what),
                    );
                    check(
                        items.contains(item),
                        task.due,
                        &format!("{}'s queue item", task.what),
                    );
                }
                Scope::Orphans => check(tasks.contains(key), false, &task.what),
                Scope::QueueItems => {
                    check(tasks.contains(key), false, &task.what);
                    check(
                        items.contains(item),
                        task.item_due,
                        &format!("{}'s queue item", task.what),
                    );
                }
            }
        }
        let payloads: BTreeSet<i64> = sqlx::query_scalar("SELECT id FROM task_payloads")
            .fetch_all(pool)
            .await
            .unwrap()
            .into_iter()
            .collect();
        let logs: BTreeSet<i64> = sqlx::query_scalar("SELECT id FROM task_logs")
            .fetch_all(pool)
            .await
            .unwrap()
            .into_iter()
            .collect();
        let released: BTreeSet<String> =
            sqlx::query_scalar("SELECT object_key FROM object_deletions")
                .fetch_all(pool)
                .await
                .unwrap()
                .into_iter()
                .collect();
        for (task, (payload, key, log)) in self.tasks.iter().zip(&self.dependents) {
            let gone = scope == Scope::Tasks && task.due;
            check(
                payloads.contains(payload),
                gone,
                &format!("{}'s payload", task.what),
            );
            check(
                logs.contains(log),
                gone,
                &format!("{}'s log line", task.what),
            );
            check(
                !released.contains(key),
                gone,
                &format!("{}'s object (in the outbox)", task.what),
            );
        }
        for orphan in &self.orphans {
            let gone = matches!(scope, Scope::Tasks | Scope::Orphans) && orphan.due;
            check(events.contains(&orphan.key), gone, &orphan.what);
        }
        for item in &self.items {
            check(
                items.contains(&item.key),
                scope == Scope::QueueItems && item.item_due,
                &item.what,
            );
        }
        if let Some(filler) = self.filler_tenant {
            let left: i64 = sqlx::query_scalar("SELECT count(*) FROM tasks WHERE tenant_id = $1")
                .bind(filler)
                .fetch_one(pool)
                .await
                .unwrap();
            if scope == Scope::Tasks && left > 0 {
                wrong.push(format!("left (due): {left} filler tasks"));
            }
        }
        wrong
    }

    /// Whether every violation is a row a hold covers, deleted.
    /// Whether the violations are the archiving tenant's task waiting for its archive, deleted
    /// (the task among them), and what goes with it.
    pub fn only_unarchived_rows_deleted(violations: &[String]) -> bool {
        const TASK: &str =
            "deleted (to keep): archiving tenant: failed past its window, not archived";
        const CHANGED: &str =
            "deleted (to keep): archiving tenant: failed past its window, archived, then a log line added";
        const LATE: &str =
            "deleted (to keep): archiving tenant: orphan of an archived run retention deleted";
        let task_paths =
            violations.iter().any(|v| v == TASK) && violations.iter().any(|v| v == CHANGED);
        let orphan_paths = violations.iter().any(|v| v.starts_with(LATE));
        // Every row deleted is one of the archiving tenant's waiting ones (a task, what goes
        // with it, or a late row of an archived run).
        (task_paths || orphan_paths)
            && violations
                .iter()
                .all(|v| v.starts_with("deleted (to keep): archiving tenant: "))
    }

    pub fn only_held_rows_deleted(violations: &[String]) -> bool {
        violations.iter().all(|v| {
            v.starts_with("deleted (to keep): held")
                || v.starts_with("deleted (to keep): deleted past its grace, held")
                || v.contains("held by its id")
        })
    }
}

/// An external payload (its key as the engine would make it) and a log line written now, of
/// `task`.
pub async fn payload_and_log(pool: &PgPool, tenant: Uuid, task: TaskKey) -> (i64, String, i64) {
    use repository::payloads::{self, Content, Kind};
    let id = payloads::reserve_id(pool).await.unwrap();
    let key = format!(
        "payloads/{tenant}/{}/{id}",
        task.1.date_naive().format("%Y-%m-%d")
    );
    payloads::insert(
        pool,
        id,
        tenant,
        task,
        Kind::Input,
        &Content::External {
            key: key.clone(),
            size: 10,
        },
    )
    .await
    .unwrap();
    let now = db_now(pool).await;
    let log = payloads::insert_log(pool, tenant, task, now, "info", "started")
        .await
        .unwrap();
    (id, key, log)
}
