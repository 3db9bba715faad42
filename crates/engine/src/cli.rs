//! The command line.

use std::path::PathBuf;

use clap::builder::PossibleValuesParser;
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "engine", version, about = "Workflow engine with a retention controller that keeps every table bounded")]
pub struct Cli {
    /// TOML configuration file, layered over the built-in defaults and under ENGINE__* variables.
    #[arg(long, global = true, env = "ENGINE_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Apply the database migrations (idempotent).
    Migrate,
    /// Run the engine: migrations, the retention controller and the admin HTTP server.
    Serve,
    /// Retention tasks on demand.
    #[command(subcommand)]
    Retention(RetentionCommand),
    /// Tenant settings.
    #[command(subcommand)]
    Tenant(TenantCommand),
}

#[derive(Debug, Subcommand)]
pub enum TenantCommand {
    /// A tenant's run-history retention (data_retention_period).
    #[command(subcommand)]
    Retention(TenantRetentionCommand),
}

#[derive(Debug, Subcommand)]
pub enum TenantRetentionCommand {
    /// Show how long the tenant's finished run history is kept.
    Get {
        /// The tenant's id or slug.
        tenant: String,
    },
    /// Change it; applies at the next task-history run.
    Set {
        /// The tenant's id or slug.
        tenant: String,
        /// A duration from 1h to 100years ("30days", "720h", "1h 30m") or "forever".
        #[arg(allow_hyphen_values = true, value_name = "DURATION|forever")]
        retention: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum RetentionCommand {
    /// Run tasks once, until nothing is due, and print what each deleted.
    Run {
        /// Run only this task (repeat for several). Default: every task.
        #[arg(long = "task", value_name = "NAME", value_parser = PossibleValuesParser::new(retention_controller::tasks::NAMES))]
        tasks: Vec<String>,
        /// Report what would be deleted; delete nothing.
        #[arg(long)]
        dry_run: bool,
        /// Pause after each batch for RATIO times its duration, sparing the foreground (default:
        /// full speed). Without a value: retention.pacing.pause_ratio.
        #[arg(long, value_name = "RATIO", num_args = 0..=1, allow_negative_numbers = true, conflicts_with = "dry_run")]
        pace: Option<Option<f64>>,
    },
    /// Stop a task on every replica until it is resumed (a run in progress stops after its batch in flight).
    Pause {
        #[arg(value_parser = PossibleValuesParser::new(retention_controller::tasks::NAMES))]
        task: String,
    },
    /// Let a paused task run again, from its next scheduled run.
    Resume {
        #[arg(value_parser = PossibleValuesParser::new(retention_controller::tasks::NAMES))]
        task: String,
    },
    /// Per task: paused or not, the last run and how it ended, rows, when it is next due, and
    /// where it is running now.
    Status,
}
