//! The status page at `/` of the admin server: every task's state, rows deleted per task over
//! the last 24 hours and 30 days, the bounded tables' sizes, and recent failed runs. Plain HTML
//! and server-rendered SVG that refresh themselves; no tenant data, no script.

use std::fmt::Write;
use std::sync::Arc;

use chrono::{DateTime, Duration, DurationRound, Utc};
use repository::maintenance::{FailedRun, HourRows, TableSize};
use retention_controller::MaintenanceTask;
use sqlx::PgPool;

use crate::chart::{self, Bar};
use crate::status::{self, TaskStatus};
use retention_controller::human::{bytes, thousands};

/// Seconds between the page's refreshes.
pub const REFRESH_SECONDS: u32 = 10;
/// Failed runs shown.
const FAILED_RUNS: i64 = 10;

/// Everything the page shows, read at one moment.
pub struct Snapshot {
    /// The database's clock.
    pub now: DateTime<Utc>,
    pub tasks: Vec<TaskStatus>,
    pub hours: Vec<HourRows>,
    pub tables: Vec<TableSize>,
    pub failures: Vec<FailedRun>,
}

impl Snapshot {
    pub async fn read(
        pool: &PgPool,
        tasks: &[Arc<dyn MaintenanceTask>],
    ) -> anyhow::Result<Snapshot> {
        let now = repository::clock::now(pool).await?;
        Ok(Snapshot {
            now,
            tasks: status::tasks(pool, tasks, true).await?,
            hours: repository::maintenance::rows_by_hour(pool, day_start(now) - Duration::days(29))
                .await?,
            tables: repository::maintenance::table_sizes(pool).await?,
            failures: repository::maintenance::failed_runs(pool, FAILED_RUNS).await?,
        })
    }
}

/// How long a rendered page is served again: however many load it, the page's statements run
/// at most once per this, and loads that arrive while they run wait for the same answer.
pub const PAGE_REUSE: std::time::Duration = std::time::Duration::from_secs(1);

/// The last page rendered, and when.
#[derive(Default)]
pub struct PageCache {
    last: tokio::sync::Mutex<Option<(tokio::time::Instant, Arc<str>)>>,
}

impl PageCache {
    /// The page: the one rendered within [`PAGE_REUSE`], else a new one.
    pub async fn page(
        &self,
        pool: &PgPool,
        tasks: &[Arc<dyn MaintenanceTask>],
    ) -> anyhow::Result<Arc<str>> {
        let mut last = self.last.lock().await;
        if let Some((at, page)) = last.as_ref() {
            if at.elapsed() < PAGE_REUSE {
                return Ok(page.clone());
            }
        }
        let page: Arc<str> = render(&Snapshot::read(pool, tasks).await?).into();
        *last = Some((tokio::time::Instant::now(), page.clone()));
        Ok(page)
    }
}

fn day_start(at: DateTime<Utc>) -> DateTime<Utc> {
    at.duration_trunc(Duration::days(1)).unwrap_or(at)
}

fn hour_start(at: DateTime<Utc>) -> DateTime<Utc> {
    at.duration_trunc(Duration::hours(1)).unwrap_or(at)
}

/// The page.
pub fn render(snapshot: &Snapshot) -> String {
    let mut page = String::with_capacity(32 * 1024);
    let _ = write!(
        page,
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta http-equiv="refresh" content="{REFRESH_SECONDS}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>engine · retention status</title>
<style>{STYLE}</style></head>
<body><header><h1>Retention status</h1>
<p id="as-of">As of {} UTC (the database's clock) · refreshes every {REFRESH_SECONDS} s · <a href="/metrics">metrics</a> · <a href="/readyz">readiness</a></p></header>
"#,
        status::format_time(snapshot.now)
    );
    tasks_section(&mut page, &snapshot.tasks);
    charts_section(&mut page, snapshot);
    tables_section(&mut page, &snapshot.tables);
    failures_section(&mut page, &snapshot.failures);
    page.push_str("</body></html>\n");
    page
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;margin:1.5rem;color:#222;max-width:60rem}
h1{font-size:1.4rem;margin:0}h2{font-size:1.1rem;margin:1.6rem 0 .5rem}header p{color:#555;margin:.3rem 0}
table{border-collapse:collapse;width:100%}th,td{text-align:left;padding:.3rem .6rem;border-bottom:1px solid #e4e4e4;font-size:.9rem}
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}
.outcome-done{color:#2e7d32}.outcome-failed{color:#c62828;font-weight:600}.paused{color:#ad6800;font-weight:600}
.legend span{display:inline-block;margin-right:1rem;font-size:.85rem}.legend i{display:inline-block;width:.8rem;height:.8rem;margin-right:.3rem;vertical-align:-1px}
td:first-child{white-space:nowrap}figure{margin:.5rem 0 1rem}figcaption{font-size:.85rem;color:#555}.error{font-family:ui-monospace,monospace;font-size:.8rem;white-space:pre-wrap}";

fn tasks_section(page: &mut String, tasks: &[TaskStatus]) {
    page.push_str(
        r#"<section id="tasks"><h2>Tasks</h2><table><thead><tr><th>task</th><th>state</th><th>last run (UTC)</th><th>outcome</th><th class="n">rows deleted</th><th>next due (about, UTC)</th><th>running on</th><th class="n">rows due (estimate)</th></tr></thead><tbody>"#,
    );
    for task in tasks {
        let outcome = task.outcome.as_deref().unwrap_or("-");
        let _ = write!(
            page,
            r#"<tr data-task="{name}"><td>{name}</td><td class="{state_class}">{state}</td><td>{last}</td><td class="outcome-{outcome_class}">{outcome}</td><td class="n">{rows}</td><td>{next}</td><td>{holder}</td><td class="n">{due}</td></tr>"#,
            name = task.task,
            state_class = if task.paused { "paused" } else { "active" },
            state = if task.paused { "paused" } else { "active" },
            last = task
                .last_run_at
                .map(status::format_time)
                .unwrap_or_else(|| "never".into()),
            outcome_class = outcome.replace(' ', "-"),
            outcome = escape(outcome),
            rows = task
                .rows
                .map(|n| thousands(n as u64))
                .unwrap_or_else(|| "-".into()),
            next = escape(&task.next_due.describe()),
            holder = escape(task.holder.as_deref().unwrap_or("-")),
            due = task.rows_due.map(thousands).unwrap_or_else(|| "-".into()),
        );
    }
    page.push_str("</tbody></table>");
    if let Some(archives) = tasks.iter().find_map(|t| t.archives.as_ref()) {
        let _ = write!(
            page,
            r#"<p id="archives">Archives (runs written to Parquet before they go): {}</p>"#,
            escape(&archives.describe())
        );
    }
    if let Some(outbox) = tasks.iter().find_map(|t| t.outbox.as_ref()) {
        let _ = write!(
            page,
            r#"<p id="outbox">Outbox (stored objects to delete): {}</p>"#,
            escape(&outbox.describe())
        );
    }
    page.push_str("</section>\n");
}

fn charts_section(page: &mut String, snapshot: &Snapshot) {
    let names: Vec<&str> = snapshot.tasks.iter().map(|t| t.task).collect();
    let series = |hour: &HourRows| names.iter().position(|n| *n == hour.task);
    // The last 24 hours, this one included; the last 30 days, today included.
    let this_hour = hour_start(snapshot.now);
    let mut hourly: Vec<Bar> = (0..24)
        .map(|i| {
            let start = this_hour - Duration::hours(23 - i);
            Bar {
                label: start.format("%H h").to_string(),
                bucket: start.to_rfc3339(),
                rows: vec![0; names.len()],
            }
        })
        .collect();
    let today = day_start(snapshot.now);
    let mut daily: Vec<Bar> = (0..30)
        .map(|i| {
            let start = today - Duration::days(29 - i);
            Bar {
                label: start.format("%d %b").to_string(),
                bucket: start.to_rfc3339(),
                rows: vec![0; names.len()],
            }
        })
        .collect();
    let (mut last_day, mut last_month) = (0u64, 0u64);
    for hour in &snapshot.hours {
        let Some(s) = series(hour) else { continue };
        let rows = hour.rows.max(0) as u64;
        let hours_ago = (this_hour - hour.hour).num_hours();
        if (0..24).contains(&hours_ago) {
            hourly[(23 - hours_ago) as usize].rows[s] += rows;
            last_day += rows;
        }
        let days_ago = (today - day_start(hour.hour)).num_days();
        if (0..30).contains(&days_ago) {
            daily[(29 - days_ago) as usize].rows[s] += rows;
            last_month += rows;
        }
    }
    page.push_str(r#"<section id="deleted"><h2>Rows deleted</h2><p class="legend">"#);
    for (i, name) in names.iter().enumerate() {
        let _ = write!(
            page,
            r#"<span><i style="background:{}"></i>{name}</span>"#,
            chart::COLOURS[i % chart::COLOURS.len()]
        );
    }
    page.push_str("</p>");
    let _ = write!(
        page,
        r#"<figure>{}<figcaption>Per hour, the last 24 hours: <span id="total-24h">{}</span> rows (a run's rows count in the hour it finished).</figcaption></figure>"#,
        chart::stacked_bars(
            "chart-24h",
            "Rows deleted per hour, last 24 hours",
            &names,
            &hourly,
            3
        ),
        thousands(last_day)
    );
    let _ = write!(
        page,
        r#"<figure>{}<figcaption>Per day (UTC), the last 30 days: <span id="total-30d">{}</span> rows.</figcaption></figure></section>"#,
        chart::stacked_bars(
            "chart-30d",
            "Rows deleted per day, last 30 days",
            &names,
            &daily,
            5
        ),
        thousands(last_month)
    );
    page.push('\n');
}

fn tables_section(page: &mut String, tables: &[TableSize]) {
    page.push_str(
        r#"<section id="tables"><h2>Tables</h2><table><thead><tr><th>table</th><th class="n">live rows (statistics)</th><th class="n">size with indexes</th><th class="n">partitions</th></tr></thead><tbody>"#,
    );
    for table in tables {
        let _ = write!(
            page,
            r#"<tr data-table="{name}"><td>{name}</td><td class="n">{rows}</td><td class="n">{size}</td><td class="n">{parts}</td></tr>"#,
            name = table.table,
            rows = thousands(table.live_rows.max(0) as u64),
            size = bytes(table.bytes.max(0) as u64),
            parts = if table.partitions == 0 {
                "-".to_string()
            } else {
                table.partitions.to_string()
            },
        );
    }
    page.push_str("</tbody></table></section>\n");
}

fn failures_section(page: &mut String, failures: &[FailedRun]) {
    page.push_str(r#"<section id="failures"><h2>Recent failed runs</h2>"#);
    if failures.is_empty() {
        page.push_str("<p>None in the run log.</p></section>\n");
        return;
    }
    page.push_str(r#"<table><thead><tr><th>started (UTC)</th><th>task</th><th>replica</th><th>error</th></tr></thead><tbody>"#);
    for run in failures {
        let _ = write!(
            page,
            r#"<tr data-run="{}"><td>{}</td><td>{}</td><td>{}</td><td class="error">{}</td></tr>"#,
            run.run_id,
            status::format_time(run.started_at),
            escape(&run.task),
            escape(&run.replica),
            escape(run.error.as_deref().unwrap_or("(no message)")),
        );
    }
    page.push_str("</tbody></table></section>\n");
}

/// Text made safe inside HTML elements and quoted attributes.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::NextDue;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn task(name: &'static str) -> TaskStatus {
        TaskStatus {
            task: name,
            paused: false,
            last_run_at: None,
            outcome: None,
            rows: None,
            next_due: NextDue::OnNextStart,
            holder: None,
            rows_due: None,
            outbox: None,
            archives: None,
        }
    }

    #[test]
    fn rows_land_in_their_hour_and_day_and_text_is_escaped() {
        let now = at("2026-11-29T14:20:00Z");
        let hour = |task: &str, h: &str, rows| HourRows {
            task: task.into(),
            hour: at(h),
            rows,
            runs: 1,
            failed: 0,
        };
        let snapshot = Snapshot {
            now,
            tasks: vec![
                task("sessions"),
                TaskStatus {
                    paused: true,
                    ..task("queue-items")
                },
            ],
            hours: vec![
                hour("sessions", "2026-11-29T14:00:00Z", 1_000),
                hour("sessions", "2026-11-28T15:00:00Z", 2_000),
                // 24 hours ago: yesterday in the 30 days, not in the 24 hours.
                hour("queue-items", "2026-11-28T14:00:00Z", 30),
                hour("sessions", "2026-10-30T23:00:00Z", 7),
                hour("unknown", "2026-11-29T14:00:00Z", 5),
            ],
            tables: vec![],
            failures: vec![FailedRun {
                run_id: uuid::Uuid::nil(),
                task: "sessions".into(),
                replica: "host-a".into(),
                started_at: now,
                finished_at: Some(now),
                error: Some("relation \"x\" <gone>".into()),
            }],
        };
        let page = render(&snapshot);
        assert!(
            page.contains(r#"<span id="total-24h">3,000</span>"#),
            "{page}"
        );
        assert!(
            page.contains(r#"<span id="total-30d">3,030</span>"#),
            "{page}"
        );
        assert!(page.contains(
            r#"data-series="sessions" data-bucket="2026-11-29T14:00:00+00:00" data-rows="1000""#
        ));
        assert!(page.contains(
            r#"data-series="queue-items" data-bucket="2026-11-28T00:00:00+00:00" data-rows="30""#
        ));
        assert!(
            !page.contains(r#"data-rows="7""#) && !page.contains(r#"data-rows="5""#),
            "outside the 30 days, or no such task"
        );
        assert!(page.contains(r#"<td class="paused">paused</td>"#));
        assert!(
            page.contains("relation &quot;x&quot; &lt;gone&gt;"),
            "{page}"
        );
    }
}
