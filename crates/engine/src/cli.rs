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
    /// Legal holds: a tenant, or one task, that no retention rule deletes while held.
    #[command(subcommand)]
    Hold(HoldCommand),
}

#[derive(Debug, Subcommand)]
pub enum HoldCommand {
    /// Hold every task of a tenant, or one task, until removed or until an instant.
    ///
    /// Example: engine hold add --tenant acme --reason "litigation #42" --until 2027-06-30
    Add {
        /// The tenant's id or slug.
        #[arg(long)]
        tenant: String,
        /// Hold only this task (its id); default: every task of the tenant.
        #[arg(long, value_name = "TASK_ID")]
        task: Option<String>,
        /// Why (recorded with the hold).
        #[arg(long)]
        reason: String,
        /// When the hold ends by itself: RFC 3339 (2027-06-30T12:00:00Z) or a date (midnight UTC).
        #[arg(long, value_name = "INSTANT")]
        until: Option<String>,
    },
    /// List the holds in force (with --all, also removed and ended ones).
    List {
        /// Only this tenant's (id or slug).
        #[arg(long)]
        tenant: Option<String>,
        #[arg(long)]
        all: bool,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// End a hold now (recorded with who and why).
    Remove {
        /// The hold's id, as `hold add` and `hold list` show it.
        id: i64,
        #[arg(long)]
        reason: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum TenantCommand {
    /// A tenant's run-history retention (data_retention_period).
    #[command(subcommand)]
    Retention(TenantRetentionCommand),
}

#[derive(Debug, Subcommand)]
pub enum TenantRetentionCommand {
    /// Show how long the tenant's finished run history is kept: the default and each status's window.
    Get {
        /// The tenant's id or slug.
        tenant: String,
        /// As JSON.
        #[arg(long)]
        json: bool,
    },
    /// Change the default window, or one status's; applies at the next task-history run.
    ///
    /// Example: engine tenant retention set acme 30days --status failed --dry-run
    Set {
        /// The tenant's id or slug.
        tenant: String,
        /// A duration from 1h to 100years ("30days", "720h", "1h 30m") or "forever"; with
        /// --status also "default" (the status follows data_retention_period again).
        #[arg(allow_hyphen_values = true, value_name = "DURATION|forever|default")]
        retention: String,
        /// Set the window of tasks that ended in this status only.
        #[arg(long, value_parser = PossibleValuesParser::new(["succeeded", "failed", "cancelled"]))]
        status: Option<String>,
        /// Print what the next run would delete under the new setting; change nothing.
        #[arg(long)]
        dry_run: bool,
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
    /// Deletion receipts: per run, tenant and rule, what was deleted and the instants it spanned.
    ///
    /// Example: engine retention receipts --tenant acme --since 2026-11-01 --json
    Receipts {
        /// Only this tenant's (id or slug).
        #[arg(long)]
        tenant: Option<String>,
        /// Only receipts of runs since this instant (RFC 3339 or a date).
        #[arg(long, value_name = "INSTANT")]
        since: Option<String>,
        /// At most this many (oldest first).
        #[arg(long, default_value_t = 1000)]
        limit: i64,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
}
