//! The controller's metrics, through the `metrics` facade (the engine installs a Prometheus
//! recorder for `GET /metrics`; without one, these calls do nothing).
//!
//! | metric | labels | meaning |
//! |---|---|---|
//! | `retention_runs_total` | `task`, `outcome` | runs by outcome: `done`, `deadline reached`, `cancelled`, `failed`, and skipped ones: `busy` (held elsewhere), `paused` |
//! | `retention_rows_deleted_total` | `task`, `rule` | rows deleted, by part of the task's rule |
//! | `retention_tenant_rows_deleted_total` | `task`, `tenant` | tasks deleted row by row, per tenant id (`task-history`); the first [`configure`]d number of tenants this process sees get a series each, every other tenant is counted under `tenant="other"` |
//! | `retention_partitions_dropped_total` | `task` | ranges of run history replaced by a rewrite (compaction or merge), each a `tasks` and a `task_events` partition dropped whole |
//! | `retention_history_lock_seconds` | `task` | histogram of how long the history tables' exclusive lock was held to attach or swap ranges |
//! | `retention_rows_due` | `task` | estimate of rows still due: live during a run that can tell (`sessions`), 0 when a run leaves nothing due |
//! | `retention_run_events_total` | `task`, `event` | other things runs did: `days dropped`, `days created`, `heap pages walked`, `pages skipped`, `analyzed`, ... |
//! | `retention_run_duration_seconds` | `task` | histogram of run durations |
//! | `retention_last_success_timestamp_seconds` | `task` | Unix time of the last run that did not fail |
//! | `retention_clock_skew_seconds` | | the database's clock minus this process's at the last check before a run; past `retention.max_clock_skew` either way, runs fail and delete nothing |
//! | `retention_lease_held` | `task`, `replica` | 1 while this replica holds the task's lease (runs it); `replica` is the configured name, by default the host name (a pod's name), the same across restarts |
//! | `retention_throttled` | | 1 while a run waits for a standby (see [`crate::throttle`]) |
//! | `retention_throttled_seconds_total` | `reason` | time runs waited between batches: `replica_lag`, `pace` |
//! | `retention_replica_lag_seconds`, `retention_replica_lag_bytes` | `standby` | each connected standby's lag as last seen |
//! | `retention_replication_slots_inactive` | | replication slots with no standby attached |
//! | `retention_standbys_stalled_total` | | standbys no longer waited for after standing still |
//! | `retention_pause_ratio` | `task` | the pause ratio a paced run with feedback ended at (see [`crate::feedback`]) |
//! | `retention_task_interval_seconds`, `retention_task_max_run_time_seconds` | `task` | the task's schedule as its loop last read it: what "no successful run within a few intervals" is measured against |
//! | `retention_leases_lost_total` | `task`, `reason` | runs that lost their lease before they ended: `lost` (it expired and another runner took it, or an operator cleared it), `not renewed` (no renewal got through for half its time to live) |
//! | `retention_clock_refusals_total` | `reason` | runs that refused to delete because the clocks disagree: `skewed` (the database's clock is off from this process's), `jumped` (it moved further than the time that passed) |
//!
//! [`METRICS`] gives each its HELP text and unit ([`describe`]).

use std::collections::HashSet;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use repository::maintenance::Outcome;
use uuid::Uuid;

use crate::task::RunReport;

pub const RUN_DURATION: &str = "retention_run_duration_seconds";

/// Bucket bounds of [`RUN_DURATION`] (seconds): 10 ms to 30 min.
pub const RUN_DURATION_BUCKETS: &[f64] = &[
    0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 600.0, 1800.0,
];

/// The histograms `GET /metrics` exports with buckets (`_bucket`, `_sum`, `_count`), and their
/// bounds; the other histograms are exported as summaries (quantiles, `_sum`, `_count`).
pub const BUCKETS: &[(&str, &[f64])] = &[(RUN_DURATION, RUN_DURATION_BUCKETS)];

/// Tenants with a series of their own unless [`configure`]d otherwise: none, since a tenant id on
/// an open `/metrics` tells who the customers are; every tenant is summed under `tenant="other"`.
pub const DEFAULT_TENANT_SERIES: usize = 0;
/// The `tenant` label of the tenants beyond the limit.
pub const OTHER_TENANTS: &str = "other";

static TENANTS: Mutex<Option<TenantLabels>> = Mutex::new(None);
static REPLICA: OnceLock<String> = OnceLock::new();

/// Sets, once per process and before any run, how many tenants get a series of their own and
/// the `replica` label. Unset: [`DEFAULT_TENANT_SERIES`] and the host name.
pub fn configure(tenant_series: usize, replica: Option<String>) {
    *TENANTS.lock().unwrap() = Some(TenantLabels::new(tenant_series));
    if let Some(replica) = replica {
        let _ = REPLICA.set(replica);
    }
}

/// The `replica` label: stable across restarts, unlike the `host:pid` that names a process in
/// the run log.
pub fn replica_label() -> &'static str {
    REPLICA.get_or_init(crate::controller::host_name)
}

/// `tenant` labels, bounded: the first `limit` tenants seen keep their id, the rest share
/// [`OTHER_TENANTS`], so a process exports at most `limit + 1` series per task whatever the
/// number of tenants.
#[derive(Debug)]
pub struct TenantLabels {
    limit: usize,
    named: HashSet<Uuid>,
}

impl TenantLabels {
    pub fn new(limit: usize) -> Self {
        TenantLabels {
            limit,
            named: HashSet::new(),
        }
    }

    pub fn label(&mut self, tenant: Uuid) -> String {
        if self.named.contains(&tenant)
            || (self.named.len() < self.limit && self.named.insert(tenant))
        {
            tenant.to_string()
        } else {
            OTHER_TENANTS.to_string()
        }
    }
}

/// What kind of series a metric is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// Every metric: name, kind, unit and what it means (its Prometheus HELP).
pub const METRICS: &[(&str, Kind, metrics::Unit, &str)] = &[
    ("retention_runs_total", Kind::Counter, metrics::Unit::Count, "Runs by task and outcome: done, deadline reached, cancelled, failed; skipped ones: busy (held elsewhere), paused."),
    ("retention_rows_deleted_total", Kind::Counter, metrics::Unit::Count, "Rows deleted, by task and part of its rule (rows)."),
    ("retention_tenant_rows_deleted_total", Kind::Counter, metrics::Unit::Count, "Tasks deleted row by row per tenant, each with its events and queue items (rows); tenants past metrics.tenant_series are summed under tenant=\"other\"."),
    ("retention_partitions_dropped_total", Kind::Counter, metrics::Unit::Count, "Ranges of run history replaced by a rewrite (compaction or merge), each a tasks and a task_events partition dropped whole."),
    ("retention_history_lock_seconds", Kind::Histogram, metrics::Unit::Seconds, "How long the history tables' exclusive lock was held to attach, swap or drop ranges (seconds)."),
    ("retention_rows_due", Kind::Gauge, metrics::Unit::Count, "Estimate of the rows still due (rows): live during a run that can tell, 0 when a run leaves nothing due."),
    ("retention_run_events_total", Kind::Counter, metrics::Unit::Count, "Other things runs did, by event: days created, ranges compacted, heap pages walked, pages skipped, analyzed, ..."),
    (RUN_DURATION, Kind::Histogram, metrics::Unit::Seconds, "Run durations, by task (seconds)."),
    ("retention_last_success_timestamp_seconds", Kind::Gauge, metrics::Unit::Seconds, "Unix time of the task's last run that did not fail (seconds since the epoch)."),
    ("retention_clock_skew_seconds", Kind::Gauge, metrics::Unit::Seconds, "The database's clock minus this process's at the last check before a run (seconds); past retention.max_clock_skew either way, runs fail and delete nothing."),
    ("retention_lease_held", Kind::Gauge, metrics::Unit::Count, "1 while this replica holds the task's lease (runs it), else 0."),
    ("retention_throttled", Kind::Gauge, metrics::Unit::Count, "1 while a run waits for a standby to catch up (retention.throttle.max_replica_lag), else 0."),
    ("retention_throttled_seconds_total", Kind::Counter, metrics::Unit::Seconds, "Time runs spent waiting between batches, by reason: replica_lag (a standby too far behind), pace (the pause of a paced run) (seconds)."),
    ("retention_replica_lag_seconds", Kind::Gauge, metrics::Unit::Seconds, "How far each connected standby is behind as the throttle last saw it: the age of the oldest WAL it has not replayed (seconds)."),
    ("retention_replica_lag_bytes", Kind::Gauge, metrics::Unit::Bytes, "WAL written on the primary and not yet replayed by each connected standby, as the throttle last saw it (bytes)."),
    ("retention_replication_slots_inactive", Kind::Gauge, metrics::Unit::Count, "Replication slots with no standby attached, seen at the throttle's first check: they keep WAL, and retention does not wait for them."),
    ("retention_standbys_stalled_total", Kind::Counter, metrics::Unit::Count, "Times a standby's replay position stood still for retention.throttle.max_replica_stall while behind, after which purges stopped waiting for it."),
    ("retention_pause_ratio", Kind::Gauge, metrics::Unit::Count, "The pause after each batch, in multiples of the batch's duration, that the task's last paced run with feedback ended at (retention.pacing.feedback)."),
    ("retention_objects_deleted_total", Kind::Counter, metrics::Unit::Count, "Stored objects deleted by the blobs task, by source: outbox (their payload rows gone) or sweep (no row named them past storage.orphan_grace)."),
    ("retention_object_delete_failures_total", Kind::Counter, metrics::Unit::Count, "Object deletes the store refused or could not answer; each is tried again after a backoff."),
    ("retention_outbox_entries", Kind::Gauge, metrics::Unit::Count, "Objects waiting in the outbox (object_deletions) for the blobs task, as its last run ended."),
    ("retention_outbox_oldest_age_seconds", Kind::Gauge, metrics::Unit::Seconds, "Age of the oldest outbox entry as the blobs task's last run ended (seconds; 0 when empty)."),
    ("retention_archived_tasks_total", Kind::Counter, metrics::Unit::Count, "Tasks written to archive files confirmed by the store (tasks), each with its events, payloads and log lines."),
    ("retention_archive_bytes_total", Kind::Counter, metrics::Unit::Bytes, "Bytes of archive files confirmed by the store (bytes)."),
    ("retention_archive_failures_total", Kind::Counter, metrics::Unit::Count, "Archive files not written (the store refused or failed, the read-back differed, the database failed): their tasks wait, by the rule, for a later run."),
    ("retention_archive_lag_seconds", Kind::Gauge, metrics::Unit::Seconds, "How long the oldest task waiting for its archive has been due (seconds), as the last task-history run ended; 0 when none waits."),
    ("retention_archive_late_rows", Kind::Gauge, metrics::Unit::Count, "Rows (events, payloads, log lines) written to an archived run while retention deleted it, so in no archive: kept, as the last task-history run counted them (docs/operations.md, \"Archiving\")."),
    ("retention_archives_expired_total", Kind::Counter, metrics::Unit::Count, "Archive files past their tenant's archive_retention_period, their manifest rows deleted and their objects given to the outbox."),
    ("retention_orphan_objects", Kind::Gauge, metrics::Unit::Count, "Objects the last sweep found that no payload row and no outbox entry names, older than storage.orphan_grace (deleted unless the sweep was a dry run)."),
    ("retention_task_interval_seconds", Kind::Gauge, metrics::Unit::Seconds, "The task's interval (retention.<task>.interval) as its loop last read it (seconds)."),
    ("retention_task_max_run_time_seconds", Kind::Gauge, metrics::Unit::Seconds, "The task's longest run (retention.<task>.max_run_time) as its loop last read it (seconds)."),
    ("retention_leases_lost_total", Kind::Counter, metrics::Unit::Count, "Runs that lost their task's lease before they ended, by reason: lost (it expired and another runner took it, or an operator cleared it), not renewed (no renewal got through for half its time to live)."),
    ("retention_clock_refusals_total", Kind::Counter, metrics::Unit::Count, "Runs that deleted nothing because the clocks disagree by more than retention.max_clock_skew, by reason: skewed (the database's clock is off from this process's), jumped (it moved further than the time that passed)."),
];

/// Every series name `GET /metrics` can show for [`METRICS`], as the engine's Prometheus
/// exporter writes them (no unit suffixes): a counter or a gauge under its name; a histogram of
/// [`BUCKETS`] as `_bucket`, `_sum` and `_count`; any other histogram as a summary, its name
/// (with `quantile`), `_sum` and `_count`.
pub fn exported_names() -> Vec<String> {
    let mut names = Vec::new();
    for (name, kind, _, _) in METRICS {
        match kind {
            Kind::Counter | Kind::Gauge => names.push(name.to_string()),
            Kind::Histogram => {
                let bucketed = BUCKETS.iter().any(|(bucketed, _)| bucketed == name);
                let first = if bucketed { "_bucket" } else { "" };
                for suffix in [first, "_sum", "_count"] {
                    names.push(format!("{name}{suffix}"));
                }
            }
        }
    }
    names
}

/// Gives every metric of [`METRICS`] its HELP text and unit. Call once the process's recorder
/// is installed (descriptions go to the recorder installed when they are given).
pub fn describe() {
    for (name, kind, unit, help) in METRICS {
        match kind {
            Kind::Counter => metrics::describe_counter!(*name, *unit, *help),
            Kind::Gauge => metrics::describe_gauge!(*name, *unit, *help),
            Kind::Histogram => metrics::describe_histogram!(*name, *unit, *help),
        }
    }
}

/// Objects deleted (from the outbox, or by the sweep) and deletes that failed.
pub(crate) fn objects_deleted(source: &'static str, deleted: u64, failed: u64) {
    metrics::counter!("retention_objects_deleted_total", "source" => source).increment(deleted);
    metrics::counter!("retention_object_delete_failures_total").increment(failed);
}

/// The outbox as the blobs task's run ended.
pub(crate) fn outbox(entries: i64, oldest_age: Duration) {
    metrics::gauge!("retention_outbox_entries").set(entries as f64);
    metrics::gauge!("retention_outbox_oldest_age_seconds").set(oldest_age.as_secs_f64());
}

/// Archive files confirmed and recorded.
pub(crate) fn archived(tasks: u64, bytes: u64) {
    metrics::counter!("retention_archived_tasks_total").increment(tasks);
    metrics::counter!("retention_archive_bytes_total").increment(bytes);
}

/// Archive files that failed.
pub(crate) fn archive_failures(failed: u64) {
    metrics::counter!("retention_archive_failures_total").increment(failed);
}

/// The archive lag as a task-history run ended.
pub(crate) fn archive_lag(lag: Duration) {
    metrics::gauge!("retention_archive_lag_seconds").set(lag.as_secs_f64());
}

/// Rows of archived runs left after their delete.
pub(crate) fn archive_late_rows(rows: i64) {
    metrics::gauge!("retention_archive_late_rows").set(rows as f64);
}

/// Archive files expired.
pub(crate) fn archives_expired(files: u64) {
    metrics::counter!("retention_archives_expired_total").increment(files);
}

/// Orphan objects the last sweep found.
pub(crate) fn orphan_objects(found: usize) {
    metrics::gauge!("retention_orphan_objects").set(found as f64);
}

pub(crate) fn throttled(waiting: bool) {
    metrics::gauge!("retention_throttled").set(if waiting { 1.0 } else { 0.0 });
}

/// A standby stood still past `max_replica_stall`: no longer waited for.
pub(crate) fn standby_stalled() {
    metrics::counter!("retention_standbys_stalled_total").increment(1);
}

/// The pause ratio a paced run's feedback ended at (see [`crate::feedback`]); its decisions are
/// among the run's counters (`retention_run_events_total`).
pub(crate) fn paced(task: &'static str, ratio: f64) {
    metrics::gauge!("retention_pause_ratio", "task" => task).set(ratio);
}

/// Time spent waiting for `reason`.
pub(crate) fn throttled_for(reason: &'static str, waited: Duration) {
    // Counters count whole units: the fraction of a second is carried to the next wait.
    static CARRIED: Mutex<Vec<(&'static str, Duration)>> = Mutex::new(Vec::new());
    let mut carried = CARRIED.lock().unwrap();
    let total = match carried.iter_mut().find(|(r, _)| *r == reason) {
        Some((_, left)) => {
            *left += waited;
            left
        }
        None => {
            carried.push((reason, waited));
            &mut carried.last_mut().unwrap().1
        }
    };
    let whole = total.as_secs();
    *total -= Duration::from_secs(whole);
    metrics::counter!("retention_throttled_seconds_total", "reason" => reason).increment(whole);
}

/// A standby's lag as last seen; `None` once it disconnected (the series then reads 0).
pub(crate) fn replica_lag(standby: &str, lag: Option<Duration>, bytes: Option<i64>) {
    metrics::gauge!("retention_replica_lag_seconds", "standby" => standby.to_string())
        .set(lag.map_or(0.0, |l| l.as_secs_f64()));
    metrics::gauge!("retention_replica_lag_bytes", "standby" => standby.to_string())
        .set(bytes.unwrap_or(0) as f64);
}

pub(crate) fn inactive_slots(n: usize) {
    metrics::gauge!("retention_replication_slots_inactive").set(n as f64);
}

pub(crate) fn run_skipped(task: &'static str, why: &'static str) {
    metrics::counter!("retention_runs_total", "task" => task, "outcome" => why).increment(1);
}

pub(crate) fn lease_held(task: &'static str, held: bool) {
    metrics::gauge!("retention_lease_held", "task" => task, "replica" => replica_label())
        .set(if held { 1.0 } else { 0.0 });
}

pub(crate) fn clock_skew(seconds: f64) {
    metrics::gauge!("retention_clock_skew_seconds").set(seconds);
}

/// A run refused to delete: the clocks disagree (`skewed` or `jumped`).
pub(crate) fn clock_refused(reason: &'static str) {
    metrics::counter!("retention_clock_refusals_total", "reason" => reason).increment(1);
}

/// A run lost its lease before it ended (`lost` or `not renewed`).
pub(crate) fn lease_lost(task: &'static str, reason: &'static str) {
    metrics::counter!("retention_leases_lost_total", "task" => task, "reason" => reason)
        .increment(1);
}

/// The task's schedule as its loop read it before a run. Also makes the counters that alert
/// rules watch for the task exist from the start, at 0: Prometheus's `increase()` cannot see the
/// first event of a series that appears with it.
pub(crate) fn schedule(task: &'static str, schedule: &crate::schedule::Schedule) {
    metrics::gauge!("retention_task_interval_seconds", "task" => task)
        .set(schedule.interval.as_secs_f64());
    metrics::gauge!("retention_task_max_run_time_seconds", "task" => task)
        .set(schedule.max_run_time.as_secs_f64());
    metrics::counter!("retention_runs_total", "task" => task, "outcome" => Outcome::Failed.as_str())
        .increment(0);
    for reason in ["lost", "not renewed"] {
        metrics::counter!("retention_leases_lost_total", "task" => task, "reason" => reason)
            .increment(0);
    }
}

/// The controller started: the process-wide counters that alert rules watch exist from now on,
/// at 0 (see [`schedule`]).
/// At the controller's start: the task's last run that did not fail, as the database recorded
/// it (any replica's), else this start. So "no successful run within a few intervals" is
/// measured across restarts, and from the start for a task that never succeeded.
pub(crate) fn last_success_known(task: &'static str, at: std::time::SystemTime) {
    let seconds = at
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64();
    metrics::gauge!("retention_last_success_timestamp_seconds", "task" => task).set(seconds);
}

pub(crate) fn controller_started() {
    for reason in ["skewed", "jumped"] {
        metrics::counter!("retention_clock_refusals_total", "reason" => reason).increment(0);
    }
    metrics::counter!("retention_standbys_stalled_total").increment(0);
    metrics::counter!("retention_object_delete_failures_total").increment(0);
    metrics::counter!("retention_archive_failures_total").increment(0);
}

pub(crate) fn history_lock_held(task: &'static str, held: Duration) {
    metrics::histogram!("retention_history_lock_seconds", "task" => task)
        .record(held.as_secs_f64());
}

pub(crate) fn rows_due(task: &'static str, rows: u64) {
    metrics::gauge!("retention_rows_due", "task" => task).set(rows as f64);
}

/// A run ended with `outcome`; `report` is what it did, unless it failed.
pub(crate) fn run_finished(
    task: &'static str,
    elapsed: Duration,
    outcome: Outcome,
    report: Option<&RunReport>,
) {
    metrics::histogram!(RUN_DURATION, "task" => task).record(elapsed.as_secs_f64());
    metrics::counter!("retention_runs_total", "task" => task, "outcome" => outcome.as_str())
        .increment(1);
    let Some(report) = report else { return };
    for (rule, rows) in &report.by_rule {
        metrics::counter!("retention_rows_deleted_total", "task" => task, "rule" => *rule)
            .increment(*rows);
    }
    if !report.by_tenant.is_empty() {
        let mut labels = TENANTS.lock().unwrap();
        let labels = labels.get_or_insert_with(|| TenantLabels::new(DEFAULT_TENANT_SERIES));
        for (tenant, rows) in &report.by_tenant {
            metrics::counter!("retention_tenant_rows_deleted_total", "task" => task, "tenant" => labels.label(*tenant)).increment(*rows);
        }
    }
    for (event, n) in &report.counters {
        metrics::counter!("retention_run_events_total", "task" => task, "event" => *event)
            .increment(*n);
        if *event == crate::history::RANGES_REPLACED {
            metrics::counter!("retention_partitions_dropped_total", "task" => task).increment(*n);
        }
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    metrics::gauge!("retention_last_success_timestamp_seconds", "task" => task)
        .set(now.as_secs_f64());
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 10,000 tenants make at most `limit + 1` series; a named tenant stays named.
    #[test]
    fn tenant_labels_are_bounded() {
        let mut labels = TenantLabels::new(3);
        let tenants: Vec<Uuid> = (0..10_000).map(|_| Uuid::new_v4()).collect();
        let seen: HashSet<String> = tenants.iter().map(|t| labels.label(*t)).collect();
        assert_eq!(seen.len(), 4, "{seen:?}");
        assert!(seen.contains(OTHER_TENANTS));
        assert_eq!(labels.label(tenants[1]), tenants[1].to_string());
        assert_eq!(labels.label(tenants[9_999]), OTHER_TENANTS);
        let mut none = TenantLabels::new(0);
        assert_eq!(none.label(tenants[0]), OTHER_TENANTS);
    }

    /// Records every metric through this module's functions, as runs do.
    fn record_every_metric() {
        objects_deleted("outbox", 3, 1);
        outbox(4, Duration::from_secs(60));
        orphan_objects(2);
        archived(30, 4096);
        archive_failures(1);
        archive_lag(Duration::from_secs(90));
        archives_expired(2);
        archive_late_rows(1);
        throttled(true);
        standby_stalled();
        paced("sessions", 1.5);
        throttled_for("replica_lag", Duration::from_secs(2));
        replica_lag("standby1", Some(Duration::from_secs(1)), Some(1024));
        inactive_slots(1);
        run_skipped("sessions", "busy");
        lease_held("sessions", true);
        clock_skew(0.25);
        controller_started();
        clock_refused("skewed");
        lease_lost("sessions", "lost");
        schedule(
            "sessions",
            &crate::schedule::Schedule {
                interval: Duration::from_secs(3600),
                max_run_time: Duration::from_secs(600),
            },
        );
        history_lock_held("partitions", Duration::from_millis(3));
        rows_due("sessions", 10);
        let report = RunReport {
            by_rule: vec![("expired", 5)],
            by_tenant: vec![(Uuid::new_v4(), 2)],
            counters: vec![(crate::history::RANGES_REPLACED, 1)],
            ..Default::default()
        };
        run_finished(
            "task-history",
            Duration::from_millis(20),
            Outcome::Done,
            Some(&report),
        );
    }

    /// [`METRICS`] is what this module records, each under its kind, and the exporter the engine
    /// serves `/metrics` with (configured from [`BUCKETS`]) shows exactly [`exported_names`], each
    /// family with its HELP text: so a dashboard or an alert rule checked against
    /// [`exported_names`] names only series that exist.
    #[test]
    fn every_metric_is_recorded_and_exported_as_listed() {
        use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
        let mut builder = PrometheusBuilder::new();
        for (name, buckets) in BUCKETS {
            builder = builder
                .set_buckets_for_metric(Matcher::Full(name.to_string()), buckets)
                .unwrap();
        }
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            describe();
            record_every_metric();
        });
        let text = handle.render();

        let mut families: Vec<(String, String)> = text
            .lines()
            .filter_map(|line| {
                let mut words = line.strip_prefix("# TYPE ")?.split(' ');
                Some((words.next()?.to_string(), words.next()?.to_string()))
            })
            .collect();
        families.sort();
        let mut listed: Vec<(String, String)> = METRICS
            .iter()
            .map(|(name, kind, _, _)| {
                let bucketed = BUCKETS.iter().any(|(b, _)| b == name);
                let kind = match kind {
                    Kind::Counter => "counter",
                    Kind::Gauge => "gauge",
                    Kind::Histogram if bucketed => "histogram",
                    Kind::Histogram => "summary",
                };
                (name.to_string(), kind.to_string())
            })
            .collect();
        listed.sort();
        assert_eq!(
            families, listed,
            "recorded families against METRICS:\n{text}"
        );

        let mut series: Vec<&str> = text
            .lines()
            .filter(|line| !line.starts_with('#') && !line.is_empty())
            .filter_map(|line| line.split(['{', ' ']).next())
            .collect();
        series.sort();
        series.dedup();
        let mut exported = exported_names();
        exported.sort();
        assert_eq!(series, exported, "{text}");

        for (name, _) in &families {
            assert!(
                text.contains(&format!("# HELP {name} ")),
                "{name} has no HELP text:\n{text}"
            );
        }
    }

    /// Every metric the Grafana dashboard in `deploy/` queries is one this module records.
    #[test]
    fn the_dashboard_queries_only_metrics_that_exist() {
        let dashboard = include_str!("../../../deploy/grafana/retention-dashboard.json");
        let source = include_str!("telemetry.rs");
        let mut queried: Vec<&str> = dashboard
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .filter(|word| word.starts_with("retention_"))
            .map(|word| word.strip_suffix("_bucket").unwrap_or(word))
            .collect();
        queried.sort();
        queried.dedup();
        assert!(queried.len() >= 8, "{queried:?}");
        for metric in queried {
            assert!(
                source.contains(&format!("\"{metric}\"")),
                "{metric} is not recorded"
            );
        }
    }
}
