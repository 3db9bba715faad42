//! The swap: the sources detached and the new range attached in one transaction, under the
//! parents' ACCESS EXCLUSIVE lock, held for the catalog changes and the last replay only.
//!
//! Under that lock no statement waits for a row lock: every row it changes is the rewrite's own
//! (locked before the parents) or new, and the rules' check never waits; a session holding a row
//! lock while waiting for the parents (a facts refresh reading `tasks`) would otherwise deadlock
//! with it. The rules are held (shared) from their check to the commit: a hold or a window change
//! committed before the check stops the swap (the tenants concerned are copied again first), and
//! one that comes later waits for the swap's commit.

use std::time::{Duration, Instant};

use sqlx::postgres::types::Oid;
use sqlx::PgPool;

use super::{lock, not_now, replay, NotNow, Phase};
use crate::batch::{self, BatchLimits};
use crate::history::ranges::{self, take_layout_lock, NewRange};
use crate::history::{engine_write, ident, LogMode};
use crate::rule;
use crate::sql::{Fragment, Sql};

/// What a swap did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Swapped {
    /// How long the parents' lock was held.
    pub locked: Duration,
}

/// Log entries the last replay consumes per statement (it loops until none is left).
const FINAL_PASS: i64 = 10_000;

/// Swaps rewrite `id` (in its catch-up, caught up) in: `lock_timeout` bounds the waits for the
/// layout lock and the parents' lock. Sources an operator detached meanwhile come back as
/// [`NotNow::SourcesBusy`]: see [`sources_gone`].
pub async fn swap(
    pool: &PgPool,
    id: i64,
    limits: BatchLimits,
    lock_timeout: Duration,
) -> Result<Result<Swapped, NotNow>, sqlx::Error> {
    let mut conn = pool.acquire().await?;
    let mut tx = batch::begin_on(&mut conn, limits.with_lock_timeout(lock_timeout)).await?;
    engine_write(&mut tx).await?;
    match take_layout_lock(&mut tx, true).await {
        Ok(true) => {}
        Ok(false) => return not_now(tx, NotNow::LayoutBusy).await,
        Err(error) if batch::is_lock_not_had(&error) => {
            return not_now(tx, NotNow::LayoutBusy).await
        }
        Err(error) => return Err(error),
    }
    let rewrite = match lock(&mut tx, id).await {
        Ok(Some(rewrite)) if rewrite.phase == Phase::CatchUp => rewrite,
        Ok(_) => return not_now(tx, NotNow::Taken).await,
        Err(error) if batch::is_lock_not_had(&error) => return not_now(tx, NotNow::Taken).await,
        Err(error) => return Err(error),
    };
    let relids: Vec<Oid> = rewrite.sources.iter().map(|s| s.tasks_relid).collect();
    let locked: Vec<Oid> = match sqlx::query_scalar!(
        "SELECT tasks_relid FROM history_ranges WHERE tasks_relid = ANY($1) AND rewrite_id = $2 FOR UPDATE NOWAIT",
        &relids,
        id
    )
    .fetch_all(&mut *tx)
    .await
    {
            Ok(locked) => locked,
            // A row-delete batch holds a source's row for a moment: try again soon.
            Err(error) if batch::is_lock_not_had(&error) => return not_now(tx, NotNow::SourcesBusy).await,
            Err(error) => return Err(error),
        };
    if locked.len() != relids.len() {
        return not_now(tx, NotNow::SourcesBusy).await;
    }
    let sources: Vec<crate::history::Range> = ranges::all(&mut *tx)
        .await?
        .into_iter()
        .filter(|r| relids.contains(&r.tasks_relid))
        .collect();
    for source in &sources {
        ranges::verify_bounds(&mut tx, source).await?;
    }
    let names: Vec<&str> = sources
        .iter()
        .flat_map(|s| [s.tasks_name.as_str(), s.events_name.as_str()])
        .collect();
    match ranges::lock_parents(&mut tx, &names, lock_timeout).await {
        Ok(()) => {}
        Err(error) if batch::is_lock_not_had(&error) => {
            return not_now(tx, NotNow::LockTimeout).await
        }
        // A writer locked `task_events` before `tasks` in one transaction while the swap held
        // `tasks` and waited for `task_events`: PostgreSQL cancelled the swap.
        Err(error) if batch::is_retryable(&error) => return not_now(tx, NotNow::Deadlock).await,
        Err(error) => return Err(error),
    }
    let lock_started = Instant::now();
    match rule::confirm(&mut tx, rewrite.rules_version).await {
        Ok(()) => {}
        Err(error) if batch::is_retryable(&error) => {
            return not_now(tx, NotNow::RulesChanged).await
        }
        Err(error) => return Err(error),
    }
    while replay::log_pass(&mut tx, &rewrite, FINAL_PASS).await? as i64 >= FINAL_PASS {}
    // The rules the count will decide by: every tenant's (those not recorded yet; usually none
    // are left) and the holds in force at the rewrite's instant.
    if !replay::record_tenant_rules(&mut tx, &rewrite).await? {
        return not_now(tx, NotNow::RulesChanged).await;
    }
    let [held_tenants, held_tasks] = rule::holds_in_force(|| Fragment::text("rule_now"));
    Sql::new("UPDATE history_rewrites SET held_tenants = {tenants}, held_tasks = {tasks} WHERE id = {id}")
        .with("tenants", held_tenants)
        .with("tasks", held_tasks)
        .bind("id", id)
        .build()
        .execute(&mut *tx)
        .await?;

    // The catalog changes in one round trip: the lock is held for the server's work only. A
    // source is renamed only when the new range takes its name (a compaction of one range): a
    // merge's sources keep theirs, which no range of the new layout has (each DETACH and
    // RENAME costs about half a millisecond under the lock, and a month's merge has 62 tables).
    let (lower, upper) = (rewrite.lower_text(), rewrite.upper_text());
    let [tasks_name, events_name] = [&rewrite.new_tasks_name, &rewrite.new_events_name]
        .map(|name| name.strip_suffix("_new").unwrap_or(name));
    let mut catalog = String::new();
    let mut detached = Detached::default();
    for source in &sources {
        for (parent, relid, name) in [
            ("tasks", source.tasks_relid, &source.tasks_name),
            ("task_events", source.events_relid, &source.events_name),
        ] {
            catalog.push_str(&format!("ALTER TABLE {parent} DETACH PARTITION {name};\n"));
            let bare = name.trim_matches('"');
            let kept_as = if bare == tasks_name || bare == events_name {
                let renamed = format!("{bare}_detached_{}", relid.0);
                catalog.push_str(&format!(
                    "ALTER TABLE {name} RENAME TO {};\n",
                    ident(&renamed)
                ));
                renamed
            } else {
                bare.to_string()
            };
            detached.push(relid, kept_as, source);
        }
    }
    for (name, final_name) in [
        (&rewrite.new_tasks_name, tasks_name),
        (&rewrite.new_events_name, events_name),
    ] {
        catalog.push_str(&format!(
            "ALTER TABLE {} RENAME TO {};\n",
            ident(name),
            ident(final_name)
        ));
    }
    catalog.push_str(&ranges::attach_statements(
        &ident(tasks_name),
        &ident(events_name),
        &lower,
        &upper,
    ));
    sqlx::Executor::execute(&mut *tx, catalog.as_str()).await?;
    detached.record(&mut tx, id).await?;
    sqlx::query!(
        "DELETE FROM history_ranges WHERE tasks_relid = ANY($1)",
        &relids
    )
    .execute(&mut *tx)
    .await?;
    // Not settled: until its facts are rebuilt (right after the commit, or by the next run's
    // settle after a crash) the new range is probed, never trusted.
    let new_range = NewRange {
        tables: (rewrite.new_tasks, rewrite.new_events),
        lower: &lower,
        upper: &upper,
        kind: "range",
        rows: rewrite.tasks_kept,
        settled: false,
        log_mode: LogMode::All,
    };
    ranges::record(&mut tx, new_range).await?;
    let locked = lock_started.elapsed();
    sqlx::query!(
        "UPDATE history_rewrites SET phase = 'count-tasks', source = 0, block = 0, swapped_at = now(), lock_ms = $2 WHERE id = $1",
        id,
        locked.as_secs_f64() * 1000.0
    )
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    let locked = lock_started.elapsed().max(locked);

    // The old ranges' facts (ignored since their ranges are gone: removed for tidiness). The new
    // range's are built by the next settle, in block ranges; until then it is probed.
    sqlx::query!(
        "DELETE FROM history_range_tenants WHERE tasks_relid = ANY($1)",
        &relids
    )
    .execute(&mut *conn)
    .await?;
    Ok(Ok(Swapped { locked }))
}

/// Whether rewrite `id`'s sources are gone from the layout (an operator detached one): it can
/// then only be abandoned.
pub async fn sources_gone(pool: &PgPool, id: i64) -> Result<bool, sqlx::Error> {
    let mut conn = pool.acquire().await?;
    let Some(rewrite) = super::in_progress(&mut conn)
        .await?
        .into_iter()
        .find(|r| r.id == id)
    else {
        return Ok(false);
    };
    Ok(rewrite.phase.before_swap() && !super::sources_attached(&mut conn, &rewrite).await?)
}

/// The sources' tables as the swap detaches them, recorded in `history_detached` in one statement.
#[derive(Default)]
struct Detached {
    relids: Vec<Oid>,
    names: Vec<String>,
    lowers: Vec<String>,
    uppers: Vec<String>,
}

impl Detached {
    fn push(&mut self, relid: Oid, name: String, source: &crate::history::Range) {
        self.relids.push(relid);
        self.names.push(name);
        self.lowers.push(source.lower_text());
        self.uppers.push(source.upper_text());
    }

    async fn record(
        &self,
        conn: &mut sqlx::PgConnection,
        rewrite_id: i64,
    ) -> Result<(), sqlx::Error> {
        sqlx::query!(
            "INSERT INTO history_detached (relid, relname, lower, upper, rewrite_id)
             SELECT relid, relname, lower::timestamptz, upper::timestamptz, $5
             FROM unnest($1::oid[], $2::text[], $3::text[], $4::text[]) AS d(relid, relname, lower, upper)",
            &self.relids,
            &self.names,
            &self.lowers,
            &self.uppers,
            rewrite_id
        )
        .execute(conn)
        .await?;
        Ok(())
    }
}
