//! The command line.

use std::path::PathBuf;

use clap::builder::PossibleValuesParser;
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "engine",
    version,
    about = "Workflow engine with a retention controller that keeps every table bounded",
    after_help = "Examples:
  engine demo                          # seed a demo database, watch retention clean it, open the status page
  engine retention run --dry-run       # what every task would delete now, deleting nothing
  engine retention run                 # run every task once, at full speed
  engine serve                         # the controller on its schedule, the status page and admin API

No database configured: the engine starts a private PostgreSQL of its own (see README.md)."
)]
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
    #[command(after_help = "Example: DATABASE_URL=postgres://engine@db/engine engine migrate")]
    Migrate,
    /// Run the engine: migrations, the retention controller (paced) and the admin server with the status page.
    #[command(
        after_help = "Example: engine serve   # then open http://127.0.0.1:8080/ (http.addr, loopback by default)

The admin server speaks plain HTTP: to reach it from other hosts, keep it on loopback (or a
private network) and put a TLS-terminating proxy in front (docs/operations.md, \"Exposing the
admin server\")."
    )]
    Serve,
    /// Seed a demo database on the embedded PostgreSQL, clean it as `serve` would, and show the status page.
    #[command(after_help = "Examples:
  engine demo                      # about half a million rows; a minute and a half or so
  engine demo --scale reported     # the reported 2.6M-session backlog and 30 days of run history")]
    Demo {
        /// How much to seed: `small` (about a tenth of `reported`) or `reported` (the 2.6M
        /// anonymous sessions of the field report, with run history to match).
        #[arg(long, value_enum, default_value_t = DemoScale::Small)]
        scale: DemoScale,
        /// Run on this server instead of the embedded one (in a database `engine_demo` the demo
        /// creates there, dropping any earlier one; needs CREATEDB).
        #[arg(long, value_name = "URL")]
        database_url: Option<String>,
    },
    /// Retention tasks on demand: run, pause, resume, status, receipts.
    #[command(subcommand, after_help = "Example: engine retention status")]
    Retention(RetentionCommand),
    /// Tenant settings: how long each tenant's run history is kept, and whether it is archived first.
    #[command(subcommand, after_help = "Example: engine tenant retention get acme")]
    Tenant(TenantCommand),
    /// Legal holds: a tenant, or one task, that no retention rule deletes while held.
    #[command(subcommand, after_help = "Example: engine hold list")]
    Hold(HoldCommand),
    /// Task payloads: store one (inline, or in object storage under `storage.url`), read one back.
    #[command(
        subcommand,
        after_help = "Example: engine payload get 42 > output.json"
    )]
    Payload(PayloadCommand),
    /// Archives of run history (written before an archiving tenant's runs are deleted).
    #[command(
        subcommand,
        after_help = "Example: engine archive list --tenant acme --status failed"
    )]
    Archive(ArchiveCommand),
}

#[derive(Debug, Subcommand)]
pub enum ArchiveCommand {
    /// The archive files written, oldest day first: key, tenant, days, runs by status, bytes.
    #[command(after_help = "Example: engine archive list --tenant acme --since 2026-11-01 --json")]
    List {
        /// Only this tenant's (id or slug).
        #[arg(long)]
        tenant: Option<String>,
        /// Only files holding days from this date on (YYYY-MM-DD).
        #[arg(long)]
        since: Option<String>,
        /// Only files holding runs that ended in this status.
        #[arg(long, value_parser = PossibleValuesParser::new(["succeeded", "failed", "cancelled"]))]
        status: Option<String>,
        /// As JSON (one array).
        #[arg(long)]
        json: bool,
    },
    /// Load a tenant's archived runs of some days into a schema of your choosing (created if
    /// missing; never the live tables, where retention would delete them again). Each file is
    /// checked against its manifest row (size, SHA-256) first; a run restored again replaces
    /// its earlier copy.
    #[command(
        after_help = "Example: engine archive restore --tenant acme --from 2026-11-01 --to 2026-11-30 --into restored_acme"
    )]
    Restore {
        /// The tenant's id or slug.
        #[arg(long)]
        tenant: String,
        /// The first day (YYYY-MM-DD, UTC) of the runs' finish (else insertion).
        #[arg(long)]
        from: String,
        /// The last day, inclusive.
        #[arg(long)]
        to: String,
        /// The schema to load into: tables tasks, task_events, task_payloads and task_logs.
        #[arg(long)]
        into: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum PayloadCommand {
    /// Store a task's payload from a file (or stdin): the object first, then its row. Prints the
    /// payload as JSON.
    #[command(
        after_help = "Example: engine payload put --tenant acme --task 0190... --task-inserted-at 2026-12-01T10:00:00Z --kind output --external result.json"
    )]
    Put {
        /// The tenant's id or slug.
        #[arg(long)]
        tenant: String,
        /// The task's id.
        #[arg(long, value_name = "TASK_ID")]
        task: String,
        /// The task's `inserted_at` (RFC 3339): with the id, the task's key.
        #[arg(long, value_name = "INSTANT")]
        task_inserted_at: String,
        #[arg(long, value_parser = PossibleValuesParser::new(["input", "output"]))]
        kind: String,
        /// Keep the bytes in object storage (`storage.url`) rather than in the row.
        #[arg(long)]
        external: bool,
        /// The file to read ("-": stdin).
        #[arg(value_name = "FILE")]
        file: String,
    },
    /// Write a payload's bytes to stdout (or a file), wherever they are kept.
    #[command(after_help = "Example: engine payload get 42 --out result.json")]
    Get {
        /// The payload's id.
        id: i64,
        /// Write here instead of stdout.
        #[arg(long, value_name = "FILE")]
        out: Option<String>,
    },
}

/// How much `engine demo` seeds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DemoScale {
    Small,
    Reported,
}

#[derive(Debug, Subcommand)]
pub enum HoldCommand {
    /// Hold every task of a tenant, or one task, until removed or until an instant.
    #[command(
        after_help = "Example: engine hold add --tenant acme --reason \"litigation #42\" --until 2027-06-30"
    )]
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
    #[command(after_help = "Example: engine hold list --tenant acme --all --json")]
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
    #[command(after_help = "Example: engine hold remove 7 --reason \"case closed\"")]
    Remove {
        /// The hold's id, as `hold add` and `hold list` show it.
        id: i64,
        #[arg(long)]
        reason: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum TenantCommand {
    /// A tenant's run-history retention (data_retention_period, and windows per final status).
    #[command(
        subcommand,
        after_help = "Example: engine tenant retention set acme 30days"
    )]
    Retention(TenantRetentionCommand),
    /// A tenant's archive policy: which finished runs are archived before they are deleted.
    #[command(
        subcommand,
        after_help = "Example: engine tenant archive set acme failed --retention 7years"
    )]
    Archive(TenantArchiveCommand),
}

#[derive(Debug, Subcommand)]
pub enum TenantArchiveCommand {
    /// Show which final statuses the tenant archives and how long its archives are kept.
    #[command(after_help = "Example: engine tenant archive get acme --json")]
    Get {
        /// The tenant's id or slug.
        tenant: String,
        /// As JSON.
        #[arg(long)]
        json: bool,
    },
    /// Change the tenant's archive policy; applies from the next task-history run.
    #[command(after_help = "Examples:
  engine tenant archive set acme on                      # every final status
  engine tenant archive set acme failed,cancelled --retention 7years
  engine tenant archive set acme off --dry-run           # what would change; changes nothing")]
    Set {
        /// The tenant's id or slug.
        tenant: String,
        /// off, on (every final status), or final statuses separated by commas.
        #[arg(value_name = "off|on|STATUS[,STATUS]")]
        archive: String,
        /// How long archives are kept: a duration from 1day to 100years, or "forever". Moves the
        /// expiry of the tenant's archives already written too.
        #[arg(long, value_name = "DURATION|forever")]
        retention: Option<String>,
        /// Whether the tenant's runs are still archived after the tenant is deleted (before its
        /// purge): on or off (the default: a deleted tenant's runs are not archived).
        #[arg(long, value_name = "on|off")]
        deleted: Option<String>,
        /// Print the change; change nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum TenantRetentionCommand {
    /// Show how long the tenant's finished run history is kept: the default and each status's window.
    #[command(after_help = "Example: engine tenant retention get acme --json")]
    Get {
        /// The tenant's id or slug.
        tenant: String,
        /// As JSON.
        #[arg(long)]
        json: bool,
    },
    /// Change the default window, or one status's; applies at the next task-history run.
    #[command(after_help = "Examples:
  engine tenant retention set acme 30days --dry-run     # what the next run would delete; changes nothing
  engine tenant retention set acme 90days --status failed
  engine tenant retention set acme default --status failed
  engine tenant retention set acme 14days --logs        # the log lines' own window")]
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
        /// Set the log lines' window instead (`log_retention_period`: a duration from 1m,
        /// "forever", or "default" for retention.task_logs.max_age).
        #[arg(long, conflicts_with = "status")]
        logs: bool,
        /// Print what the next run would delete under the new setting; change nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum RetentionCommand {
    /// Run tasks once, until nothing is due, and print what each deleted.
    #[command(after_help = "Examples:
  engine retention run --dry-run                 # what would go, deleting nothing
  engine retention run --task sessions --pace    # one task, paced as `serve` runs it
  engine retention run --json                    # one JSON object per task (docs/operations.md)")]
    Run {
        /// Run only this task (repeat for several). Default: every task.
        #[arg(long = "task", value_name = "NAME", value_parser = PossibleValuesParser::new(retention_controller::tasks::NAMES))]
        tasks: Vec<String>,
        /// Report what would be deleted; delete nothing.
        #[arg(long)]
        dry_run: bool,
        /// Pause after each batch for RATIO times its duration, sparing the foreground (default:
        /// full speed). Without a value: retention.pacing.pause_ratio. With
        /// retention.pacing.feedback (the default) the ratio starts there and follows a probe.
        #[arg(long, value_name = "RATIO", num_args = 0..=1, allow_negative_numbers = true, conflicts_with = "dry_run")]
        pace: Option<Option<f64>>,
        /// One JSON object per task on stdout, instead of a line for people.
        #[arg(long)]
        json: bool,
    },
    /// Stop a task on every replica until it is resumed (a run in progress stops after its batch in flight).
    #[command(after_help = "Example: engine retention pause task-history")]
    Pause {
        #[arg(value_parser = PossibleValuesParser::new(retention_controller::tasks::NAMES))]
        task: String,
    },
    /// Let a paused task run again, from its next scheduled run.
    #[command(after_help = "Example: engine retention resume task-history")]
    Resume {
        #[arg(value_parser = PossibleValuesParser::new(retention_controller::tasks::NAMES))]
        task: String,
    },
    /// Per task: paused or not, the last run and how it ended, rows, when it is next due, and who runs it now.
    #[command(after_help = "Example: engine retention status --json")]
    Status {
        /// One JSON object per task, with an estimate of the rows due now (docs/operations.md).
        #[arg(long)]
        json: bool,
    },
    /// Deletion receipts: per run, tenant and rule, what was deleted and the instants it spanned.
    #[command(
        after_help = "Example: engine retention receipts --tenant acme --since 2026-11-01 --json"
    )]
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

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// Every command, at every level: a one-line description and an example.
    #[test]
    fn every_command_says_what_it_does_and_shows_an_example() {
        fn check(command: &clap::Command, path: &str, checked: &mut Vec<String>) {
            let about = command
                .get_about()
                .map(|a| a.to_string())
                .unwrap_or_default();
            assert!(
                !about.is_empty() && !about.contains('\n'),
                "{path}: no one-line description"
            );
            let after = command
                .get_after_help()
                .map(|a| a.to_string())
                .unwrap_or_default();
            assert!(
                after.contains("Example") && after.contains("engine "),
                "{path}: no example"
            );
            checked.push(path.to_string());
            for sub in command.get_subcommands().filter(|s| s.get_name() != "help") {
                check(sub, &format!("{path} {}", sub.get_name()), checked);
            }
        }
        let mut checked = Vec::new();
        check(&super::Cli::command(), "engine", &mut checked);
        assert!(
            checked.contains(&"engine demo".to_string())
                && checked.contains(&"engine retention receipts".to_string()),
            "{checked:?}"
        );
        assert_eq!(checked.len(), 27, "{checked:?}");
    }
}
