//! The retention controller: maintenance tasks that keep the engine's tables bounded, each on its
//! own interval, one runner per task across every engine on a database.
//!
//! * [`MaintenanceTask`] is what a task implements: a name, its schedule, one run, a dry run.
//!   A new task is one file in `tasks/` and one line in [`tasks::all`].
//! * [`run_once`] runs a task a single time under its cross-replica lease, with a run id on every
//!   log line, a deadline and cancellation between batches.
//! * [`Controller`] runs every task's loop until its `CancellationToken` is cancelled.

pub mod archive;
pub mod archive_format;
pub mod archive_policy;
pub mod batching;
mod block_walk;
pub mod clock_guard;
mod controller;
pub mod feedback;
mod history;
pub mod history_policy;
pub mod holds;
pub mod human;
pub mod rewrites;
pub mod schedule;
pub mod settings;
mod statistics;
pub mod storage;
mod task;
pub mod tasks;
pub mod telemetry;
pub mod tenant_retention;
pub mod throttle;
pub mod wal_compression;

pub use controller::{
    replica, run_once, run_once_with, Controller, RunOutcome, RunSummary, StopReason,
};
pub use settings::{RetentionSettings, SettingError};
pub use task::{
    Completion, DryRunReport, MaintenanceTask, Progress, ProgressFn, RunContext, RunOptions,
    RunReport, TaskError,
};
