//! `engine demo`: seeds a database of its own (`engine_demo`) with the picture the field reports
//! paint, runs the controller on it as `engine serve` does (paced, with the status page), shows
//! progress, prints what changed, and serves the status page until Ctrl-C.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use repository::demo::{DemoSize, Seeded};

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::cli::DemoScale;
use crate::database::{self, Database};
use crate::settings::Settings;
use crate::{serve, shutdown, status};
use retention_controller::human::{bytes, duration, thousands};

/// The demo's database, on whichever server it runs.
pub const DATABASE: &str = "engine_demo";
/// How often progress is shown: redrawn on a terminal, a line otherwise.
const TERMINAL_EVERY: Duration = Duration::from_millis(500);
const LINES_EVERY: Duration = Duration::from_secs(5);

pub async fn demo(
    settings: &Settings,
    scale: DemoScale,
    server_url: Option<&str>,
) -> anyhow::Result<ExitCode> {
    if server_url.is_none() && database::configured_url(settings).is_some() {
        eprintln!(
            "error: engine demo runs on the embedded PostgreSQL only, and a database is configured (DATABASE_URL or database.url).\n\
             The demo drops and re-creates a database of its own ({DATABASE}) and never touches yours; to run it on that\n\
             server anyway, name the server explicitly: engine demo --database-url postgres://user@host/postgres"
        );
        return Ok(ExitCode::from(2));
    }
    let root = CancellationToken::new();
    shutdown::cancel_on_signal(root.clone())?;
    let listener = match TcpListener::bind(settings.http.addr).await {
        Ok(listener) => listener,
        // `engine serve` is probably there: any free port will do.
        Err(error) => {
            eprintln!(
                "note: http.addr = {} is taken ({error}); the status page goes on a free port",
                settings.http.addr
            );
            TcpListener::bind((settings.http.addr.ip(), 0)).await?
        }
    };
    let url = format!("http://{}/", listener.local_addr()?);
    let (size, name) = match scale {
        DemoScale::Small => (DemoSize::SMALL, "small"),
        DemoScale::Reported => (DemoSize::REPORTED, "reported"),
    };
    println!(
        "engine demo (scale {name}): a database of its own, {DATABASE}, on {}",
        if server_url.is_some() {
            "the server named by --database-url"
        } else {
            "the embedded PostgreSQL"
        }
    );
    let db = Database::open_fresh(settings, server_url, DATABASE).await?;
    let result = show(settings, &db, size, listener, &url, root).await;
    db.close().await;
    result.map(|()| ExitCode::SUCCESS)
}

async fn show(
    settings: &Settings,
    db: &Database,
    size: DemoSize,
    listener: TcpListener,
    url: &str,
    root: CancellationToken,
) -> anyhow::Result<()> {
    let started = Instant::now();
    println!("seeding...");
    repository::demo::seed(&db.pool, size, |seeded| println!("  {}", describe(seeded))).await?;
    println!("seeded in {}", duration(started.elapsed()));
    let before = Tables::read(&db.pool).await?;
    let wal = repository::replication::wal_position(&db.pool).await?;
    let since: DateTime<Utc> = repository::clock::now(&db.pool).await?;

    println!(
        "\nrunning the retention controller as `engine serve` does (paced); status page: {url}"
    );
    let cleaning = Instant::now();
    let served = serve::run(settings, db, listener, root.clone());
    let watched = async {
        let finished = watch(db, settings, since, &root).await;
        if let Ok(true) = finished {
            let after = Tables::read(&db.pool).await?;
            let written = repository::replication::wal_since(&db.pool, &wal).await?;
            print_summary(&before, &after, cleaning.elapsed(), written);
            println!("\nstatus page: {url}   (Ctrl-C to stop)");
        }
        finished.map(drop)
    };
    let (served, watched) = tokio::join!(served, watched);
    watched?;
    served
}

fn describe(seeded: Seeded) -> String {
    let n = |n: i64| thousands(n.max(0) as u64);
    match seeded {
        Seeded::Sessions {
            anonymous,
            logged_in,
        } => {
            format!(
                "{} anonymous sessions created over 30 days, and {} logged-in users' sessions",
                n(anonymous),
                n(logged_in)
            )
        }
        Seeded::Tenants { tenants, deleted } => format!(
            "{} tenants keeping 1 day to 30 days or forever, {} of them deleted",
            n(tenants as i64),
            n(deleted as i64)
        ),
        Seeded::History {
            tasks,
            events,
            days,
        } => format!(
            "{} finished tasks with {} events over {} days",
            n(tasks),
            n(events),
            n(days)
        ),
        Seeded::QueueItems {
            of_gone_tasks,
            of_queued_tasks,
        } => {
            format!(
                "{} queue items whose task is gone, {} of queued tasks",
                n(of_gone_tasks),
                n(of_queued_tasks)
            )
        }
        Seeded::OrphanEvents { events } => format!("{} events whose task is gone", n(events)),
    }
}

/// Shows each task's progress until every task has completed a run (`done`) since `since`; `false` when
/// stopped first (Ctrl-C).
async fn watch(
    db: &Database,
    settings: &Settings,
    since: DateTime<Utc>,
    root: &CancellationToken,
) -> anyhow::Result<bool> {
    let all = settings.tasks()?;
    let terminal = std::io::stdout().is_terminal();
    let started = Instant::now();
    let mut shown = Instant::now() - LINES_EVERY;
    loop {
        if root.is_cancelled() {
            return Ok(false);
        }
        let states = status::tasks(&db.pool, &all, false).await?;
        let deleted = repository::maintenance::rows_since(&db.pool, since).await?;
        let rows = |task: &str| {
            thousands(
                deleted
                    .iter()
                    .find(|(t, _)| t == task)
                    .map_or(0, |(_, n)| (*n).max(0) as u64),
            )
        };
        // A run that stopped at its deadline is followed by another at once, and one that failed
        // by a retry after a backoff: not done yet.
        let ran = |s: &status::TaskStatus| {
            s.holder.is_none() && s.last_run_at.is_some_and(|at| at >= since)
        };
        let done = |s: &status::TaskStatus| ran(s) && s.outcome.as_deref() == Some("done");
        let line = states
            .iter()
            .map(|s| {
                if done(s) {
                    format!("{} done ({} rows)", s.task, rows(s.task))
                } else if ran(s) && s.outcome.as_deref() == Some("failed") {
                    format!("{} failed, retrying (see the status page)", s.task)
                } else if s.holder.is_some() {
                    format!("{} running", s.task)
                } else {
                    format!("{} waiting", s.task)
                }
            })
            .collect::<Vec<_>>()
            .join(" · ");
        let finished = states.iter().all(done);
        let every = if terminal {
            TERMINAL_EVERY
        } else {
            LINES_EVERY
        };
        if finished || shown.elapsed() >= every {
            let line = format!("  [{:>4.0} s] {line}", started.elapsed().as_secs_f64());
            if terminal {
                print!("\x1b[2K{line}\r");
                let _ = std::io::stdout().flush();
            } else {
                println!("{line}");
            }
            shown = Instant::now();
        }
        if finished {
            if terminal {
                println!();
            }
            return Ok(true);
        }
        tokio::select! {
            _ = root.cancelled() => return Ok(false),
            _ = tokio::time::sleep(TERMINAL_EVERY) => {}
        }
    }
}

/// Rows (counted) and sizes of the bounded tables.
struct Tables(Vec<(String, i64, i64)>);

impl Tables {
    async fn read(pool: &sqlx::PgPool) -> anyhow::Result<Tables> {
        let counts = repository::demo::row_counts(pool).await?;
        let sizes = repository::maintenance::table_sizes(pool).await?;
        Ok(Tables(
            counts
                .into_iter()
                .map(|(table, rows)| {
                    let size = sizes
                        .iter()
                        .find(|s| s.table == table)
                        .map_or(0, |s| s.bytes);
                    (table, rows, size)
                })
                .collect(),
        ))
    }
}

fn print_summary(before: &Tables, after: &Tables, took: Duration, wal: i64) {
    println!(
        "\n{:<20} {:>12} {:>12} {:>12} {:>12}",
        "table", "rows before", "rows after", "size before", "size after"
    );
    for ((table, rows_before, size_before), (_, rows_after, size_after)) in
        before.0.iter().zip(&after.0)
    {
        println!(
            "{table:<20} {:>12} {:>12} {:>12} {:>12}",
            thousands(*rows_before as u64),
            thousands(*rows_after as u64),
            bytes(*size_before as u64),
            bytes(*size_after as u64)
        );
    }
    println!(
        "\ncleaned in {}, writing {} of WAL. Sizes shrink where whole partitions were dropped; elsewhere\n\
         the space freed is reused by new rows (VACUUM marks it free; it does not return it to the disk).",
        duration(took),
        bytes(wal.max(0) as u64)
    );
}
