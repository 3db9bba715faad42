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
    },
}
