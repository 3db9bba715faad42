//! Benchmarks that print figures measured against a baseline in the same run.
//!
//! `cargo run --release -p bench -- history`
//! `cargo run --release -p bench -- sessions --rows 2598000`

mod db;
mod history;
mod history_archive;
mod payloads;
mod queue_items;
mod sessions;

use std::time::Duration;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    about = "Retention benchmarks: each prints its figures and ratios against a baseline from the same run"
)]
struct Cli {
    #[command(subcommand)]
    bench: Bench,
}

#[derive(Subcommand)]
enum Bench {
    /// Run history: the steady state (a few due rows among many kept, with windows per tenant and
    /// per status), a past day rewritten against row deletes, a backlog deleted row by row against
    /// a bare DELETE, and a cold month merged under a short statement timeout.
    History {
        /// Sections to run (steady, compaction, backlog, status, merge, archive); default: the
        /// first five.
        #[arg(long = "section", value_parser = ["steady", "compaction", "backlog", "status", "merge", "archive"])]
        sections: Vec<String>,
        /// The archive section alone (`--section archive`): an archiving tenant's backlog purged
        /// with and without archiving, against a COPY of the same runs to a file.
        #[arg(long)]
        archive: bool,
        /// Archive: due failed tasks (each with two events) of the archiving tenant.
        #[arg(long, default_value_t = 1_000_000)]
        archive_tasks: i64,
        /// Archive: days they are spread over.
        #[arg(long, default_value_t = 10)]
        archive_days: i64,
        /// Steady state: tenants keeping long windows.
        #[arg(long, default_value_t = 1_000)]
        tenants: usize,
        /// Steady state: days of history.
        #[arg(long, default_value_t = 60)]
        days: i64,
        /// Steady state: tasks kept over those days.
        #[arg(long, default_value_t = 10_000_000)]
        rows: i64,
        /// Steady state: due tasks arriving between runs.
        #[arg(long, default_value_t = 100)]
        due: i64,
        /// Steady state: measured runs (after five warm-up runs).
        #[arg(long, default_value_t = 9)]
        samples: usize,
        /// Compaction: due tasks in the day.
        #[arg(long, default_value_t = 1_000_000)]
        day_rows: i64,
        /// Compaction: tasks the day keeps.
        #[arg(long, default_value_t = 100_000)]
        kept: i64,
        /// Backlog: due tasks (each with two events).
        #[arg(long, default_value_t = 1_000_000)]
        backlog_tasks: i64,
        #[arg(long, default_value_t = 100)]
        backlog_tenants: usize,
        #[arg(long, default_value_t = 30)]
        backlog_days: i64,
        /// Merge: tasks kept forever in the cold month.
        #[arg(long, default_value_t = 5_000_000)]
        merge_rows: i64,
        /// Merge: the partitions task's statement timeout.
        #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
        merge_timeout: std::time::Duration,
    },
    /// The queue-items task's steady state: a few due items among many live ones, against a bare DELETE.
    QueueItems {
        /// Live queue items (over 10,000 running tasks)
        #[arg(long, default_value_t = 10_000_000)]
        items: i64,
        /// Due items arriving between runs
        #[arg(long, default_value_t = 100)]
        due: i64,
        /// Measured runs (after three warm-up runs)
        #[arg(long, default_value_t = 9)]
        samples: usize,
    },
    /// A backlog of due tasks with payloads in object storage (the local filesystem store): the
    /// engine's rows and objects gone, against a plain loop deleting the same objects.
    Payloads {
        #[arg(long, default_value_t = 1_000_000)]
        tasks: i64,
        #[arg(long, default_value_t = 10)]
        tenants: usize,
        #[arg(long, default_value_t = 10)]
        days: i64,
    },
    /// Purging the reported 2.6M-row sessions backlog: the engine at full speed and paced, a bare
    /// DELETE and the common LIMIT 1000 loop on identical copies, with a foreground workload;
    /// then a steady-state run with 100 due rows among many kept.
    Sessions {
        /// Due rows in the backlog (6,000 more are kept).
        #[arg(long, default_value_t = 2_598_000)]
        rows: i64,
        /// How long the LIMIT 1000 loop may run before its total is extrapolated.
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        cte_budget: Duration,
        /// A paced run with this pause ratio; repeat for several (default: one run with the
        /// engine's retention.pacing.pause_ratio).
        #[arg(long)]
        pace: Vec<f64>,
        /// retention.pacing.batch_time for the paced run (default: the engine's).
        #[arg(long)]
        batch_time: Option<String>,
        /// retention.pacing.full_speed_batch_time for the full-speed run (default: the engine's).
        #[arg(long)]
        full_speed_batch_time: Option<String>,
        /// Kept rows in the steady-state measurement (0 skips it).
        #[arg(long, default_value_t = 10_000_000)]
        steady_rows: i64,
        /// Only the steady-state measurement.
        #[arg(long)]
        steady_only: bool,
        /// Rounds of every strategy, each on fresh copies (the LIMIT 1000 loop only in the
        /// first); with more than one, medians and ranges of the ratios.
        #[arg(long, default_value_t = 1)]
        runs: usize,
        /// retention.parallelism for the engine's runs (default: the engine's).
        #[arg(long)]
        parallelism: Option<u32>,
        /// Start a streaming standby of the bench's server (pg_basebackup, on this machine) and
        /// report how far behind each strategy left it; the engine's runs throttle on it.
        #[arg(long)]
        standby: bool,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Quiet unless RUST_LOG asks (RUST_LOG=retention_controller=debug shows every batch).
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,sqlx=error".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().bench {
        Bench::History {
            sections,
            tenants,
            days,
            rows,
            due,
            samples,
            day_rows,
            kept,
            backlog_tasks,
            backlog_tenants,
            backlog_days,
            merge_rows,
            merge_timeout,
            archive,
            archive_tasks,
            archive_days,
        } => {
            let mut sections = sections;
            if archive {
                sections.push("archive".into());
            }
            history::run(history::Args {
                sections,
                archive_tasks,
                archive_days,
                tenants,
                days,
                rows,
                due,
                samples,
                day_rows,
                kept,
                backlog_tasks,
                backlog_tenants,
                backlog_days,
                merge_rows,
                merge_timeout,
            })
            .await
        }
        Bench::Payloads {
            tasks,
            tenants,
            days,
        } => {
            payloads::run(payloads::Args {
                tasks,
                tenants,
                days,
            })
            .await
        }
        Bench::QueueItems {
            items,
            due,
            samples,
        } => {
            queue_items::run(queue_items::Args {
                items,
                due,
                samples,
            })
            .await
        }
        Bench::Sessions {
            rows,
            cte_budget,
            pace,
            batch_time,
            full_speed_batch_time,
            steady_rows,
            steady_only,
            runs,
            parallelism,
            standby,
        } => {
            let args = sessions::Args {
                rows,
                cte_budget,
                pace,
                batch_time,
                full_speed_batch_time,
                steady_rows,
                steady_only,
                runs,
                parallelism,
                standby,
            };
            sessions::run(args).await
        }
    }
}
