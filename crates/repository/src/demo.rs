//! What `engine demo` seeds: the picture the field reports paint, in a database of its own.
//! Every row goes in as the application would write it (through the parents and their
//! triggers), so the controller finds it as it would in production.

use chrono::{DateTime, NaiveDate, Utc};
use sqlx::PgPool;

use crate::history::ranges;

/// How much to seed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DemoSize {
    /// Anonymous sessions created evenly over the last 30 days (those older than a day are due).
    pub anonymous_sessions: i64,
    /// Finished tasks a day, over 30 days, spread over every tenant; two events each.
    pub tasks_per_day: i64,
    /// Queue items whose task is gone (due), and as many of tasks still queued (kept).
    pub queue_items: i64,
    /// Events older than an hour whose task does not exist (due).
    pub orphan_events: i64,
}

impl DemoSize {
    /// The field report: 2.6M anonymous sessions (~1 GB) in 30 days, with run history to match.
    pub const REPORTED: DemoSize = DemoSize {
        anonymous_sessions: 2_600_000,
        tasks_per_day: 20_000,
        queue_items: 100_000,
        orphan_events: 50_000,
    };
    /// About a tenth of [`DemoSize::REPORTED`].
    pub const SMALL: DemoSize = DemoSize {
        anonymous_sessions: 260_000,
        tasks_per_day: 2_000,
        queue_items: 10_000,
        orphan_events: 5_000,
    };
}

/// Logged-in users with a live session each, kept: the report's 9.
pub const LOGGED_IN_USERS: i64 = 9;
/// Days of run history.
pub const DAYS: i64 = 30;
/// Tenants and their windows: `None` keeps forever; the last three are deleted (two days ago,
/// past the default grace of a day), so everything of theirs is due.
pub const TENANT_WINDOWS: [Option<&str>; 10] = [
    Some("1 day"),
    Some("3 days"),
    Some("7 days"),
    Some("7 days"),
    Some("14 days"),
    Some("30 days"),
    None,
    Some("7 days"),
    Some("3 days"),
    Some("1 day"),
];
pub const TENANTS: usize = 50;
const DELETED_TENANTS: usize = 3;

/// What one part of [`seed`] put in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seeded {
    Sessions {
        anonymous: i64,
        logged_in: i64,
    },
    Tenants {
        tenants: usize,
        deleted: usize,
    },
    History {
        tasks: i64,
        events: i64,
        days: i64,
    },
    QueueItems {
        of_gone_tasks: i64,
        of_queued_tasks: i64,
    },
    OrphanEvents {
        events: i64,
    },
}

/// Seeds everything; `step` is told what each part seeded as it goes.
pub async fn seed(
    pool: &PgPool,
    size: DemoSize,
    mut step: impl FnMut(Seeded),
) -> Result<(), sqlx::Error> {
    seed_sessions(pool, size.anonymous_sessions).await?;
    step(Seeded::Sessions {
        anonymous: size.anonymous_sessions,
        logged_in: LOGGED_IN_USERS,
    });
    let tenants = seed_tenants(pool).await?;
    step(Seeded::Tenants {
        tenants: TENANTS,
        deleted: DELETED_TENANTS,
    });
    seed_history(pool, &tenants, size.tasks_per_day).await?;
    step(Seeded::History {
        tasks: size.tasks_per_day * DAYS,
        events: 2 * size.tasks_per_day * DAYS,
        days: DAYS,
    });
    seed_queue_items(pool, &tenants, size.queue_items).await?;
    step(Seeded::QueueItems {
        of_gone_tasks: size.queue_items,
        of_queued_tasks: size.queue_items,
    });
    seed_orphan_events(pool, &tenants, size.orphan_events).await?;
    step(Seeded::OrphanEvents {
        events: size.orphan_events,
    });
    sqlx::query!("ANALYZE").execute(pool).await?;
    Ok(())
}

async fn seed_sessions(pool: &PgPool, anonymous: i64) -> Result<(), sqlx::Error> {
    const CHUNK: i64 = 250_000;
    let mut done = 0;
    while done < anonymous {
        let n = CHUNK.min(anonymous - done);
        // ~280 bytes of session data each, as in the report (969 MB for 2.6M rows with indexes).
        sqlx::query!(
            "INSERT INTO user_sessions (user_id, data, created_at, updated_at, expires_at)
             SELECT NULL, jsonb_build_object('csrf', md5(g::text), 'ua', repeat('Mozilla/5.0 ', 14), 'ip', '10.1.2.3',
                                             'flash', md5((g * 7)::text)),
                    c, c, c + interval '30 days'
             FROM generate_series($1::bigint, $2::bigint) g,
                  LATERAL (SELECT now() - (g::float8 / $3) * interval '30 days' AS c) t",
            done + 1,
            done + n,
            anonymous as f64
        )
        .execute(pool)
        .await?;
        done += n;
    }
    sqlx::query!(
        "WITH u AS (INSERT INTO users (email) SELECT 'user' || g || '@demo.example' FROM generate_series(1, $1::bigint) g RETURNING id)
         INSERT INTO user_sessions (user_id, created_at, updated_at, expires_at)
         SELECT id, now() - interval '20 days', now(), now() + interval '10 days' FROM u",
        LOGGED_IN_USERS
    )
    .execute(pool)
    .await?;
    Ok(())
}

async fn seed_tenants(pool: &PgPool) -> Result<Vec<uuid::Uuid>, sqlx::Error> {
    let mut ids = Vec::with_capacity(TENANTS);
    for i in 0..TENANTS {
        let deleted = i >= TENANTS - DELETED_TENANTS;
        // The windows are interval text (`'7 days'`), cast by the server.
        let id = sqlx::query_scalar!(
            "INSERT INTO tenants (slug, name, data_retention_period, deleted_at)
             VALUES ($1, $1, $2::text::interval, CASE WHEN $3 THEN now() - interval '2 days' END) RETURNING id",
            format!("demo-{:02}", i + 1),
            TENANT_WINDOWS[i % TENANT_WINDOWS.len()],
            deleted
        )
        .fetch_one(pool)
        .await?;
        ids.push(id);
    }
    Ok(ids)
}

/// Day ranges for the 30 days back (as a deployment that has run for a month has them), then
/// the tasks, a day at a time: 85% succeeded, 10% failed, 5% cancelled, each finished a few
/// minutes after it started, with a `started` and a final event; and today a few still running.
async fn seed_history(
    pool: &PgPool,
    tenants: &[uuid::Uuid],
    per_day: i64,
) -> Result<(), sqlx::Error> {
    let now: DateTime<Utc> = crate::clock::now(pool).await?;
    let first: NaiveDate = now.date_naive() - chrono::Duration::days(DAYS);
    let mut tx = pool.begin().await?;
    ranges::take_layout_lock(&mut tx, true).await?;
    ranges::extend_back(&mut tx, first, std::time::Duration::from_secs(60)).await?;
    tx.commit().await?;
    for day in 0..DAYS {
        sqlx::query!(
            "WITH t AS (
                 INSERT INTO tasks (tenant_id, status, inserted_at, finished_at)
                 SELECT ($1::uuid[])[1 + g % array_length($1::uuid[], 1)],
                        CASE WHEN g % 20 = 0 THEN 'cancelled' WHEN g % 10 = 1 THEN 'failed' ELSE 'succeeded' END,
                        s, s + (g % 600) * interval '1 second'
                 FROM generate_series(0, $3::bigint - 1) g,
                      LATERAL (SELECT $2::timestamptz + (g * 86400.0 / $3::bigint) * interval '1 second' AS s) x
                 RETURNING id, tenant_id, inserted_at, finished_at, status)
             INSERT INTO task_events (tenant_id, task_id, task_inserted_at, event_type, created_at)
             SELECT tenant_id, id, inserted_at, 'started', inserted_at FROM t
             UNION ALL
             SELECT tenant_id, id, inserted_at, status, finished_at FROM t",
            tenants,
            ranges::day_start(first + chrono::Duration::days(day)),
            per_day
        )
        .execute(pool)
        .await?;
    }
    sqlx::query!(
        "INSERT INTO tasks (tenant_id, status, inserted_at)
         SELECT ($1::uuid[])[1 + g % array_length($1::uuid[], 1)], 'running', now() - g * interval '1 minute'
         FROM generate_series(1, 100) g",
        tenants
    )
    .execute(pool)
    .await?;
    Ok(())
}

async fn seed_queue_items(
    pool: &PgPool,
    tenants: &[uuid::Uuid],
    n: i64,
) -> Result<(), sqlx::Error> {
    // Of tasks long gone (due), and of tasks queued now (kept).
    sqlx::query!(
        "INSERT INTO queue_items (tenant_id, task_id, task_inserted_at, inserted_at)
         SELECT ($1::uuid[])[1 + g % array_length($1::uuid[], 1)], gen_random_uuid(), now() - interval '20 days',
                now() - interval '20 days'
         FROM generate_series(1, $2::bigint) g",
        tenants,
        n
    )
    .execute(pool)
    .await?;
    sqlx::query!(
        "WITH t AS (
             INSERT INTO tasks (tenant_id, status, inserted_at)
             SELECT ($1::uuid[])[1 + g % ($3 - 3)], 'queued', now() - (g % 3600) * interval '1 second'
             FROM generate_series(1, $2::bigint) g
             RETURNING id, tenant_id, inserted_at)
         INSERT INTO queue_items (tenant_id, task_id, task_inserted_at) SELECT tenant_id, id, inserted_at FROM t",
        tenants,
        n,
        tenants.len() as i32
    )
    .execute(pool)
    .await?;
    Ok(())
}

async fn seed_orphan_events(
    pool: &PgPool,
    tenants: &[uuid::Uuid],
    n: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query!(
        "INSERT INTO task_events (tenant_id, task_id, task_inserted_at, event_type, created_at)
         SELECT ($1::uuid[])[1 + g % array_length($1::uuid[], 1)], gen_random_uuid(), c, 'started', c
         FROM generate_series(1, $2::bigint) g, LATERAL (SELECT now() - interval '2 hours' - (g % 86400) * interval '1 second' AS c) x",
        tenants,
        n
    )
    .execute(pool)
    .await?;
    Ok(())
}

/// Exact rows of each of the bounded tables, in [`crate::maintenance::BOUNDED_TABLES`]' order.
pub async fn row_counts(pool: &PgPool) -> Result<Vec<(String, i64)>, sqlx::Error> {
    let mut counts = Vec::new();
    for table in crate::maintenance::BOUNDED_TABLES {
        let n: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {table}"))
            .fetch_one(pool)
            .await?;
        counts.push((table.to_string(), n));
    }
    Ok(counts)
}
