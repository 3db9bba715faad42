//! Benchmarks that print figures measured against a baseline in the same run.
//!
//! `cargo run --release -p bench -- history --rows 10000000`

mod db;
mod history;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Retention benchmarks: each prints its figures and ratios against a baseline from the same run")]
struct Cli {
    #[command(subcommand)]
    bench: Bench,
}

#[derive(Subcommand)]
enum Bench {
    /// Removing a day of history by partition drop versus row deletes, and a steady-state
    /// task-history run with a few due rows among many kept.
    History {
        /// Rows in the day that is removed (and in the kept history).
        #[arg(long, default_value_t = 10_000_000)]
        rows: i64,
        /// Due rows among the kept history in the steady-state run.
        #[arg(long, default_value_t = 100)]
        due: i64,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Quiet unless RUST_LOG asks (RUST_LOG=retention_controller=debug shows every batch).
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn,sqlx=error".into()))
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().bench {
        Bench::History { rows, due } => history::run(rows, due).await,
    }
}
