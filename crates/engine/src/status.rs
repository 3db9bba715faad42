//! Where each retention task stands: what `engine retention status` prints (as a table or JSON)
//! and the status page shows.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use retention_controller::human::{bytes, count, thousands};
use retention_controller::MaintenanceTask;
use serde::Serialize;
use sqlx::PgPool;

/// How long an estimate of the rows due may take before it is left out.
const ESTIMATE_TIMEOUT: Duration = Duration::from_secs(2);

/// One task's state.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TaskStatus {
    pub task: &'static str,
    pub paused: bool,
    /// When its last run started, on any replica.
    pub last_run_at: Option<DateTime<Utc>>,
    /// `done`, `deadline reached`, `cancelled`, `failed`; `running` while it runs; none before a first run.
    pub outcome: Option<String>,
    /// Rows its last finished run deleted.
    pub rows: Option<i64>,
    pub next_due: NextDue,
    /// The replica running it now.
    pub holder: Option<String>,
    /// An estimate of the rows due now, when the task can tell cheaply (`with_estimates`).
    pub rows_due: Option<u64>,
    /// The `blobs` task's outbox: the stored objects waiting to be deleted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outbox: Option<OutboxStatus>,
    /// The `task-history` task's archives, when a tenant archives or an archive exists.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub archives: Option<ArchivesStatus>,
}

/// The archives (`retention_archives`), at a glance: the repository's summary, as it is.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(transparent)]
pub struct ArchivesStatus(pub repository::archives::Summary);

impl ArchivesStatus {
    /// `None` when no tenant archives and no archive exists.
    pub async fn read(pool: &PgPool) -> anyhow::Result<Option<ArchivesStatus>> {
        let s = repository::archives::summary(pool).await?;
        if s.tenants == 0 && s.files == 0 && s.writing == 0 {
            return Ok(None);
        }
        Ok(Some(ArchivesStatus(s)))
    }

    /// "2 tenants archive; 14 files (3,120 runs, 1.2 MB), last written 2026-12-04 07:00:00; 1 begun
    /// and not finished (written again next run)".
    pub fn describe(&self) -> String {
        let s = &self.0;
        let n = |v: i64| v.max(0) as u64;
        let mut text = format!(
            "{} {}; {} ({}, {}), last written {}",
            count(n(s.tenants), "tenant", "tenants"),
            if s.tenants == 1 {
                "archives"
            } else {
                "archive"
            },
            count(n(s.files), "file", "files"),
            count(n(s.tasks), "run", "runs"),
            bytes(n(s.bytes)),
            s.last_written_at
                .map(format_time)
                .unwrap_or_else(|| "never".into())
        );
        if s.writing > 0 {
            text.push_str(&format!(
                "; {} begun and not finished (written again next run)",
                thousands(n(s.writing))
            ));
        }
        text
    }
}

/// The outbox of stored objects to delete (`object_deletions`), at a glance.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OutboxStatus {
    pub entries: i64,
    pub bytes: i64,
    pub oldest_enqueued_at: Option<DateTime<Utc>>,
    /// Entries whose delete failed at least once (waiting their backoff), and the latest error.
    pub failing: i64,
    pub last_error: Option<String>,
}

impl OutboxStatus {
    pub async fn read(pool: &PgPool) -> anyhow::Result<OutboxStatus> {
        let depth = repository::outbox::depth(pool).await?;
        Ok(OutboxStatus {
            entries: depth.entries,
            bytes: depth.bytes,
            oldest_enqueued_at: depth.oldest_enqueued_at,
            failing: depth.failing,
            last_error: depth.last_error,
        })
    }

    /// "12 objects (3.1 MB), oldest 2026-12-04 07:00:00, 2 failing: <error>".
    pub fn describe(&self) -> String {
        if self.entries == 0 {
            return "empty".into();
        }
        let mut text = format!(
            "{} ({}), oldest {}",
            count(self.entries.max(0) as u64, "object", "objects"),
            bytes(self.bytes.max(0) as u64),
            self.oldest_enqueued_at
                .map(format_time)
                .unwrap_or_else(|| "-".into())
        );
        if self.failing > 0 {
            text.push_str(&format!(", {} failing", thousands(self.failing as u64)));
            if let Some(error) = &self.last_error {
                text.push_str(&format!(": {error}"));
            }
        }
        text
    }
}

/// When a task runs next.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "state", content = "at", rename_all = "snake_case")]
pub enum NextDue {
    Paused,
    RunningNow,
    /// About then: an interval after the last run finished (each replica adds ±10% jitter).
    At(DateTime<Utc>),
    /// It never ran: as soon as a controller starts.
    OnNextStart,
}

impl NextDue {
    pub fn describe(&self) -> String {
        match self {
            NextDue::Paused => "paused".into(),
            NextDue::RunningNow => "running now".into(),
            NextDue::At(at) => format_time(*at),
            NextDue::OnNextStart => "on the next start".into(),
        }
    }
}

/// "2026-11-29 14:03:07".
pub fn format_time(at: DateTime<Utc>) -> String {
    at.format("%Y-%m-%d %H:%M:%S").to_string()
}

/// Every task's state, in `tasks`' order; with `with_estimates`, also the rows due now (each
/// estimate bounded by [`ESTIMATE_TIMEOUT`], left out when it fails or takes longer).
pub async fn tasks(
    pool: &PgPool,
    tasks: &[Arc<dyn MaintenanceTask>],
    with_estimates: bool,
) -> anyhow::Result<Vec<TaskStatus>> {
    let mut out = Vec::with_capacity(tasks.len());
    for task in tasks {
        let state = repository::maintenance::state(pool, task.name()).await?;
        let running = state.holder.is_some();
        let next_due = match (state.paused, state.last_finished_at) {
            (true, _) => NextDue::Paused,
            (false, _) if running => NextDue::RunningNow,
            (false, Some(finished)) => {
                let interval = chrono::Duration::from_std(task.schedule().interval)
                    .unwrap_or(chrono::Duration::MAX);
                finished
                    .checked_add_signed(interval)
                    .map_or(NextDue::OnNextStart, NextDue::At)
            }
            (false, None) => NextDue::OnNextStart,
        };
        let rows_due = if with_estimates {
            match tokio::time::timeout(ESTIMATE_TIMEOUT, task.estimate_due(pool)).await {
                Ok(Ok(estimate)) => estimate,
                Ok(Err(error)) => {
                    tracing::warn!(task = task.name(), error = %error, "estimating the rows due");
                    None
                }
                Err(_) => None,
            }
        } else {
            None
        };
        out.push(TaskStatus {
            task: task.name(),
            paused: state.paused,
            last_run_at: state.last_started_at,
            outcome: state
                .last_outcome
                .or_else(|| running.then(|| "running".to_string())),
            rows: state.last_rows,
            next_due,
            holder: state.holder,
            rows_due,
            outbox: if task.name() == retention_controller::tasks::blobs::NAME {
                Some(OutboxStatus::read(pool).await?)
            } else {
                None
            },
            archives: if task.name() == retention_controller::tasks::task_history::NAME {
                ArchivesStatus::read(pool).await?
            } else {
                None
            },
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_due_serialises_with_its_state() {
        let at = DateTime::parse_from_rfc3339("2026-11-29T14:03:07Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(
            serde_json::to_value(NextDue::At(at)).unwrap(),
            serde_json::json!({"state": "at", "at": "2026-11-29T14:03:07Z"})
        );
        assert_eq!(
            serde_json::to_value(NextDue::Paused).unwrap(),
            serde_json::json!({"state": "paused"})
        );
        assert_eq!(NextDue::At(at).describe(), "2026-11-29 14:03:07");
    }

    #[test]
    fn archives_and_outbox_read_with_separators_units_and_plurals() {
        let at = DateTime::parse_from_rfc3339("2026-12-04T07:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let archives = ArchivesStatus(repository::archives::Summary {
            tenants: 2,
            files: 14,
            tasks: 3_120,
            bytes: 1_234_567,
            last_written_at: Some(at),
            writing: 1,
        });
        assert_eq!(
            archives.describe(),
            "2 tenants archive; 14 files (3,120 runs, 1.2 MB), last written 2026-12-04 07:00:00; \
             1 begun and not finished (written again next run)"
        );
        let one = ArchivesStatus(repository::archives::Summary {
            tenants: 1,
            files: 1,
            tasks: 1,
            bytes: 900,
            last_written_at: None,
            writing: 0,
        });
        assert_eq!(
            one.describe(),
            "1 tenant archives; 1 file (1 run, 900 B), last written never"
        );
        let outbox = OutboxStatus {
            entries: 12_000,
            bytes: 3_100_000,
            oldest_enqueued_at: Some(at),
            failing: 2,
            last_error: Some("refused".into()),
        };
        assert_eq!(
            outbox.describe(),
            "12,000 objects (3.1 MB), oldest 2026-12-04 07:00:00, 2 failing: refused"
        );
    }
}
