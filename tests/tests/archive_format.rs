//! The archive's files read by a reader no one here wrote: DuckDB (PyPI `duckdb`), over a
//! directory of them by glob, runs and their nested events, payloads and logs.

use chrono::{DateTime, Utc};
use retention_controller::archive_format::{
    ArchivedEvent, ArchivedLog, ArchivedPayload, ArchivedTask, FileWriter,
};
use uuid::Uuid;

fn at(s: &str) -> DateTime<Utc> {
    s.parse().unwrap()
}

fn task(n: u128, status: &str, events: usize) -> ArchivedTask {
    ArchivedTask {
        tenant_id: Uuid::from_u128(1),
        task_id: Uuid::from_u128(n),
        status: status.into(),
        inserted_at: at("2026-11-01T10:00:00Z"),
        finished_at: Some(at("2026-11-01T10:05:00.5Z")),
        payload: Some(format!(r#"{{"n": {n}}}"#)),
        events: (0..events)
            .map(|i| ArchivedEvent {
                id: (n * 100) as i64 + i as i64,
                event_type: format!("step-{i}"),
                created_at: at("2026-11-01T10:01:00Z"),
                data: (i % 2 == 0).then(|| r#"{"ok": true}"#.to_string()),
            })
            .collect(),
        payloads: vec![ArchivedPayload {
            id: n as i64,
            kind: "output".into(),
            location: "external".into(),
            inline_content: None,
            external_key: Some(format!("payloads/t/{n}")),
            size_bytes: 1234,
            created_at: at("2026-11-01T10:05:00Z"),
        }],
        logs: vec![ArchivedLog {
            id: n as i64,
            created_at: at("2026-11-01T10:02:00Z"),
            level: "info".into(),
            line: format!("line of {n}"),
        }],
    }
}

#[test]
fn duckdb_reads_the_runs_with_their_events_payloads_and_logs() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("archive/t/2026-11-01")).unwrap();
    // Two files, as two parts of one run would be; three row groups in the first.
    let mut first = FileWriter::new().unwrap();
    first
        .write(&[task(1, "failed", 3), task(2, "succeeded", 0)])
        .unwrap();
    first.write(&[task(3, "failed", 1)]).unwrap();
    first.write(&[]).unwrap();
    std::fs::write(
        dir.path().join("archive/t/2026-11-01/r-a-0.parquet"),
        first.finish().unwrap(),
    )
    .unwrap();
    let mut second = FileWriter::new().unwrap();
    second.write(&[task(4, "cancelled", 2)]).unwrap();
    std::fs::write(
        dir.path().join("archive/t/2026-11-01/r-a-1.parquet"),
        second.finish().unwrap(),
    )
    .unwrap();

    let runs = testkit::duckdb::rows(
        dir.path(),
        "SELECT task_id, status, len(events), len(payloads), len(logs), schema_version, epoch_us(finished_at)
           FROM 'archive/**/*.parquet' ORDER BY task_id",
    );
    let id = |n: u128| Uuid::from_u128(n).to_string();
    let finished = at("2026-11-01T10:05:00.5Z").timestamp_micros().to_string();
    assert_eq!(
        runs,
        vec![
            vec![
                id(1),
                "failed".into(),
                "3".into(),
                "1".into(),
                "1".into(),
                "1".into(),
                finished.clone()
            ],
            vec![
                id(2),
                "succeeded".into(),
                "0".into(),
                "1".into(),
                "1".into(),
                "1".into(),
                finished.clone()
            ],
            vec![
                id(3),
                "failed".into(),
                "1".into(),
                "1".into(),
                "1".into(),
                "1".into(),
                finished.clone()
            ],
            vec![
                id(4),
                "cancelled".into(),
                "2".into(),
                "1".into(),
                "1".into(),
                "1".into(),
                finished.clone()
            ],
        ]
    );
    // The failed runs' events, unnested, each once.
    let events = testkit::duckdb::rows(
        dir.path(),
        "SELECT t.task_id, e.event.event_type, e.event.data
           FROM 'archive/**/*.parquet' t, unnest(t.events) AS e(event)
          WHERE t.status = 'failed' ORDER BY e.event.id",
    );
    assert_eq!(
        events,
        vec![
            vec![id(1), "step-0".into(), r#"{"ok": true}"#.into()],
            vec![id(1), "step-1".into(), "None".into()],
            vec![id(1), "step-2".into(), r#"{"ok": true}"#.into()],
            vec![id(3), "step-0".into(), r#"{"ok": true}"#.into()],
        ]
    );
    let keys = testkit::duckdb::rows(
        dir.path(),
        "SELECT p.payload.external_key, l.log.line FROM 'archive/**/*.parquet' t,
                unnest(t.payloads) AS p(payload), unnest(t.logs) AS l(log) WHERE t.task_id = '00000000-0000-0000-0000-000000000004'",
    );
    assert_eq!(
        keys,
        vec![vec!["payloads/t/4".to_string(), "line of 4".to_string()]]
    );
}
