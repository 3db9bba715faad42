//! Each path that deletes run history, or decides what a copy keeps, forced in turn against the
//! matrix. A case returns the rows whose fate was not met.

use std::time::Duration;

use chrono::Duration as Span;
use repository::batch::BatchLimits;
use repository::history::rewrite::swap;
use retention_controller::rewrites::{self, Naming, Outcome, Steps};
use retention_controller::settings::{QueueItemsSettings, TaskHistorySettings};
use retention_controller::tasks::queue_items::QueueItemsTask;
use retention_controller::tasks::task_history::TaskHistoryTask;
use retention_controller::{RunContext, RunOptions, RunReport};
use sqlx::PgPool;
use uuid::Uuid;

use super::common::*;
use super::matrix::{hold, hold_tenants, tenants, Matrix, Scope, GRACE};

/// Every path, by name.
pub const PATHS: &[&str] = &[
    "index walk",
    "sweep",
    "purge",
    "rewrite, rows changed in its catch-up",
    "rewrite, rows changed in its final replay",
    "merge",
    "orphan walk",
    "orphan sweep",
    "queue items by candidates",
    "queue items by heap sweep",
];

/// Runs the path named `path` on a database of its own; returns the violations, and a word on
/// what ran (to check the path was the one forced).
pub async fn run(path: &str) -> (Vec<String>, String) {
    let db = TestDatabase::new().await;
    let pool = &db.pool;
    match path {
        "index walk" => rows_deleted(pool, false).await,
        "sweep" => rows_deleted(pool, true).await,
        "purge" => purge(pool).await,
        "rewrite, rows changed in its catch-up" => rewrite_with_changes(pool, false).await,
        "rewrite, rows changed in its final replay" => rewrite_with_changes(pool, true).await,
        "merge" => merge(pool).await,
        "orphan walk" => orphan_walk(pool).await,
        "orphan sweep" => orphan_sweep(pool).await,
        "queue items by candidates" => queue_items(pool, true).await,
        "queue items by heap sweep" => queue_items(pool, false).await,
        other => panic!("no path {other}"),
    }
}

fn history(compaction: bool) -> TaskHistoryTask {
    TaskHistoryTask::new(TaskHistorySettings {
        compaction,
        ..Default::default()
    })
}

fn has(report: &RunReport, counter: &str) -> bool {
    report.counters.iter().any(|(c, n)| *c == counter && *n > 0)
}

/// The whole matrix in a past day, deleted row by row: through the indexes, or (with due filler
/// rows enough) by a sweep of the day's pages.
async fn rows_deleted(pool: &PgPool, sweep: bool) -> (Vec<String>, String) {
    let now = db_now(pool).await;
    let at = day_start(a_past_day(pool).await) + Span::hours(12);
    let t = tenants(pool, now).await;
    hold_tenants(pool, &t).await;
    let mut matrix = Matrix::default();
    matrix.all_tasks(pool, now, at, &t).await;
    matrix.orphans(pool, now, at, &t).await;
    matrix.lone_items(pool, at, &t).await;
    if sweep {
        matrix.filler(pool, at, 15_000).await;
    }
    let report = run_task(&history(false), pool).await;
    assert_eq!(
        has(&report, "ranges swept"),
        sweep,
        "the path forced: {report:?}"
    );
    // A sweep leaves nothing for the index walk: rows it kept came back as due would be walked,
    // and with the hold check broken the walk's deletes would stand in for the sweep's own.
    assert_eq!(
        has(&report, "pairs walked"),
        !sweep,
        "the one path: {report:?}"
    );
    (
        matrix.violations(pool, Scope::Tasks).await,
        format!("{report:?}"),
    )
}

/// Deleted tenants' rows alone: walked by id, tenant by tenant.
async fn purge(pool: &PgPool) -> (Vec<String>, String) {
    let now = db_now(pool).await;
    let at = day_start(a_past_day(pool).await) + Span::hours(12);
    let t = tenants(pool, now).await;
    hold_tenants(pool, &t).await;
    let mut matrix = Matrix::default();
    matrix.deleted_tenants_tasks(pool, now, at, &t).await;
    let report = run_task(&history(false), pool).await;
    assert!(
        report
            .by_rule
            .iter()
            .any(|(r, n)| *r == "deleted-tenants" && *n > 0),
        "{report:?}"
    );
    (
        matrix.violations(pool, Scope::Tasks).await,
        format!("{report:?}"),
    )
}

fn limits() -> BatchLimits {
    BatchLimits::new(Duration::from_secs(30), Duration::from_secs(5))
        .with_generic_plans()
        .with_history_write()
}

fn context(pool: &PgPool, now: chrono::DateTime<chrono::Utc>) -> RunContext {
    let ctx = RunContext::new(
        pool.clone(),
        Uuid::now_v7(),
        tokio_util::sync::CancellationToken::new(),
        Duration::from_secs(600),
        RunOptions::default(),
    );
    ctx.with_clock(now, tokio::time::Instant::now())
}

fn steps() -> Steps {
    Steps {
        limits: limits(),
        lock_timeout: Duration::from_secs(5),
        grace: GRACE,
    }
}

/// A compaction of a past day, started before the matrix's rows exist (only due filler rows are
/// there when it copies): the rows are written, and the tenant `h` put on hold, once its copy is
/// done. They reach the new range through its catch-up (the writes' replay and the copy again of
/// the tenant whose rules changed), or, with `final_replay`, through the replay under the
/// tables' lock (`h` is then held from the start).
async fn rewrite_with_changes(pool: &PgPool, final_replay: bool) -> (Vec<String>, String) {
    let now = db_now(pool).await;
    let at = day_start(a_past_day(pool).await) + Span::hours(12);
    let t = tenants(pool, now).await;
    hold(pool, t.dph, None).await;
    // A task of `a` held by its id, written after the copy (the hold is there before, so that
    // the rules do not change in the final replay's case).
    let held_task_id = Uuid::new_v4();
    hold(pool, t.a, Some(held_task_id)).await;
    if final_replay {
        hold(pool, t.h, None).await;
    }
    let mut matrix = Matrix::default();
    matrix.filler(pool, at, 2_000).await;
    // The archiving tenant's, archived (or not) before the copy; and one archived whose event
    // comes after the copy (it then differs from its archive: kept, waiting for a new one).
    matrix.archiving_tenant_tasks(pool, now, at, t.ar).await;
    let late_event = matrix
        .task(
            pool,
            at,
            super::matrix::row(t.ar, "failed", Some(now - Span::days(3)), false, true),
            "archiving tenant: failed past its window, archived, an event added as the rewrite ran",
        )
        .await;
    super::matrix::archive(pool, t.ar, late_event).await;
    // Rows of `h`, due until it is held: left out by the copy, before the hold.
    if !final_replay {
        matrix.live_tenant_tasks(pool, now, at, t.h, true).await;
    }
    let range = range_at(pool, at).await;
    let id = rewrite_copied(pool, Uuid::now_v7(), &range, now, GRACE, limits()).await;
    // The changes, while the rewrite catches up.
    insert_event(pool, t.ar, late_event, at).await;
    if !final_replay {
        hold(pool, t.h, None).await;
    } else {
        matrix.live_tenant_tasks(pool, now, at, t.h, true).await;
    }
    matrix.live_tenant_tasks(pool, now, at, t.a, false).await;
    sqlx::query("INSERT INTO tasks (id, tenant_id, status, inserted_at, finished_at) VALUES ($1, $2, 'succeeded', $3, $4)")
        .bind(held_task_id)
        .bind(t.a)
        .bind(at)
        .bind(now - Span::days(3))
        .execute(pool)
        .await
        .unwrap();
    let held_key: TaskKey = (held_task_id, at);
    let held_task = (
        held_key,
        insert_event(pool, t.a, held_key, at).await,
        insert_queue_item(pool, t.a, held_key).await,
    );
    matrix.tasks.push(super::matrix::Fated {
        key: held_task.0,
        what: "tenant: a task held by its id".into(),
        due: false,
        item_due: false,
    });
    matrix.children.push(held_task);
    matrix
        .dependents
        .push(super::matrix::payload_and_log(pool, t.a, held_key).await);
    matrix.deleted_tenants_tasks(pool, now, at, &t).await;
    matrix.orphans(pool, now, at, &t).await;
    let ctx = context(pool, now);
    let mut report = RunReport::default();
    if final_replay {
        // Straight to the swap: its replay, under the lock, is the first to see the changes.
        let swapped = swap::swap(pool, id, limits(), Duration::from_secs(5))
            .await
            .unwrap();
        assert!(swapped.is_ok(), "{swapped:?}");
    }
    let outcome = rewrites::advance(&ctx, id, steps(), Naming::Rules, &mut report)
        .await
        .unwrap();
    assert!(matches!(outcome, Outcome::Done(_)), "{outcome:?}");
    (
        matrix.violations(pool, Scope::Tasks).await,
        format!("{report:?}"),
    )
}

/// Two adjacent past days merged into one range, the matrix's rows across both.
async fn merge(pool: &PgPool) -> (Vec<String>, String) {
    let now = db_now(pool).await;
    let first = now.date_naive() - Span::days(12);
    create_day(pool, first).await;
    let (day1, day2) = (
        day_start(first) + Span::hours(12),
        day_start(first + Span::days(1)) + Span::hours(12),
    );
    let t = tenants(pool, now).await;
    hold_tenants(pool, &t).await;
    let mut matrix = Matrix::default();
    matrix.all_tasks(pool, now, day1, &t).await;
    matrix.live_tenant_tasks(pool, now, day2, t.a, false).await;
    matrix.live_tenant_tasks(pool, now, day2, t.h, true).await;
    matrix.orphans(pool, now, day2, &t).await;
    let sources = vec![range_at(pool, day1).await, range_at(pool, day2).await];
    let ctx = context(pool, now);
    let mut report = RunReport::default();
    let outcome = rewrites::start(
        &ctx,
        &sources,
        "partitions",
        steps(),
        true,
        Naming::Tables,
        &mut report,
    )
    .await
    .unwrap();
    assert!(
        matches!(outcome, Outcome::Done(ref done) if done.sources == 2),
        "{outcome:?}"
    );
    (
        matrix.violations(pool, Scope::Tasks).await,
        format!("{report:?}"),
    )
}

/// Orphan events alone, found by the walk of new event ids.
async fn orphan_walk(pool: &PgPool) -> (Vec<String>, String) {
    let now = db_now(pool).await;
    let at = day_start(a_past_day(pool).await) + Span::hours(12);
    let t = tenants(pool, now).await;
    hold_tenants(pool, &t).await;
    let mut matrix = Matrix::default();
    matrix.orphans(pool, now, at, &t).await;
    // The late-orphans sweep would pass over the same events in the same run: it is not due.
    swept_just_now(pool).await;
    let report = run_task(&history(true), pool).await;
    assert!(
        !has(&report, "event pages swept"),
        "the walk alone: {report:?}"
    );
    (
        matrix.violations(pool, Scope::Orphans).await,
        format!("{report:?}"),
    )
}

/// Events whose task is deleted after the orphan walk passed them, found by the sweep of every
/// range's events.
async fn orphan_sweep(pool: &PgPool) -> (Vec<String>, String) {
    let now = db_now(pool).await;
    let at = day_start(a_past_day(pool).await) + Span::hours(12);
    let t = tenants(pool, now).await;
    hold_tenants(pool, &t).await;
    let mut tasks = Vec::new();
    let mut matrix = Matrix::default();
    for (tenant, old_due, what) in [
        (t.a, true, "tenant"),
        (t.h, false, "held tenant"),
        (t.f, true, "forever tenant"),
        (t.u, true, "no tenant row"),
    ] {
        let task = insert_task(pool, tenant, "running", at, None).await;
        tasks.push(task);
        let old = insert_event(pool, tenant, task, now - Span::hours(1) - MINUTE).await;
        let young = insert_event(pool, tenant, task, now - Span::hours(1) + MINUTE).await;
        matrix.orphans.push(super::matrix::Fated {
            key: old,
            what: format!("{what}: orphaned late, a minute past an hour"),
            due: old_due,
            item_due: false,
        });
        matrix.orphans.push(super::matrix::Fated {
            key: young,
            what: format!("{what}: orphaned late, a minute short of an hour"),
            due: false,
            item_due: false,
        });
    }
    // A run the archiving tenant had archived, its event written as retention deleted it.
    let archived = insert_task(pool, t.ar, "running", at, None).await;
    tasks.push(archived);
    super::matrix::archive_gone(pool, t.ar, archived, None).await;
    let late = insert_event(pool, t.ar, archived, now - Span::hours(1) - MINUTE).await;
    matrix.orphans.push(super::matrix::Fated {
        key: late,
        what: "archiving tenant: orphan of an archived run retention deleted, orphaned late".into(),
        due: false,
        item_due: false,
    });
    let task = TaskHistoryTask::new(TaskHistorySettings::default());
    run_task(&task, pool).await; // the walk passes them: their tasks exist
    for key in &tasks {
        sqlx::query("DELETE FROM tasks WHERE id = $1 AND inserted_at = $2")
            .bind(key.0)
            .bind(key.1)
            .execute(pool)
            .await
            .unwrap();
    }
    sqlx::query("UPDATE retention_watermarks SET position = position - 86400 WHERE name = 'task-history.orphan-sweep.swept-at'")
        .execute(pool)
        .await
        .unwrap();
    let report = run_task(&task, pool).await;
    assert!(has(&report, "events swept"), "{report:?}");
    (
        matrix.violations(pool, Scope::Orphans).await,
        format!("{report:?}"),
    )
}

/// Queue items: of every task row (by the queue-items rule), and of no task; decided by the
/// recorded candidates (every item's task recorded, as if each had just finished or been
/// deleted, and the heap sweep not due), or by the heap sweep (nothing recorded: the first run
/// sweeps; deleted tenants' items still go by the tenant index first).
async fn queue_items(pool: &PgPool, by_candidates: bool) -> (Vec<String>, String) {
    let now = db_now(pool).await;
    let at = day_start(a_past_day(pool).await) + Span::hours(12);
    let t = tenants(pool, now).await;
    hold_tenants(pool, &t).await;
    let mut matrix = Matrix::default();
    matrix.all_tasks(pool, now, at, &t).await;
    matrix.lone_items(pool, at, &t).await;
    if by_candidates {
        sqlx::query(
            "INSERT INTO queue_item_candidates (task_id, task_inserted_at)
             SELECT DISTINCT task_id, task_inserted_at FROM queue_items",
        )
        .execute(pool)
        .await
        .unwrap();
        sqlx::query(
            "INSERT INTO retention_watermarks (name, position) VALUES ('queue-items.swept-at', $1)
             ON CONFLICT (name) DO UPDATE SET position = excluded.position",
        )
        .bind(now.timestamp())
        .execute(pool)
        .await
        .unwrap();
    }
    let report = run_task(&QueueItemsTask::new(QueueItemsSettings::default()), pool).await;
    assert_eq!(has(&report, "heap swept"), !by_candidates, "{report:?}");
    (
        matrix.violations(pool, Scope::QueueItems).await,
        format!("{report:?}"),
    )
}
