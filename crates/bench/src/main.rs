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
    match Cli::parse().bench {
        Bench::History { rows, due } => history::run(rows, due).await,
    }
}
