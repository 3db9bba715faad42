//! The sessions rule, row for row: a session is deleted when it has expired, or when it is
//! anonymous and older than the anonymous TTL; nothing else is ever deleted.

mod common;

use std::time::Duration as StdDuration;

use common::*;
use repository::sessions::{self, SessionRule};
use retention_controller::settings::SessionsSettings;
use retention_controller::tasks::sessions::SessionsTask;
use retention_controller::{run_once_with, Completion, MaintenanceTask, RunOutcome, RunSummary};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

fn task(settings: SessionsSettings) -> SessionsTask {
    SessionsTask::new(settings)
}

async fn run(task: &SessionsTask, pool: &sqlx::PgPool) -> RunSummary {
    match run_once_with(task, pool, &CancellationToken::new(), &fixed_batches())
        .await
        .expect("run succeeds")
    {
        RunOutcome::Ran(summary) => summary,
        other => panic!("nobody else holds the task, nor paused it: {other:?}"),
    }
}

/// Rows a minute on either side of both cutoffs, anonymous and logged in.
struct Boundaries {
    deleted: Vec<Uuid>,
    kept: Vec<Uuid>,
}

async fn seed_boundaries(pool: &sqlx::PgPool, ttl: chrono::Duration) -> Boundaries {
    let now = db_now(pool).await;
    let user = Some(insert_user(pool).await);
    let far = now + chrono::Duration::days(365);
    let deleted = vec![
        // expired a minute ago: logged in, and anonymous but young
        insert_session(pool, user, now - chrono::Duration::days(3), now - MINUTE).await,
        insert_session(pool, None, now - MINUTE * 5, now - MINUTE).await,
        // anonymous, a minute past the TTL, not expired
        insert_session(pool, None, now - ttl - MINUTE, far).await,
        // anonymous, far past the TTL and expired
        insert_session(pool, None, now - ttl * 10, now - ttl).await,
    ];
    let kept = vec![
        // expires in a minute: logged in, and anonymous but young
        insert_session(pool, user, now - chrono::Duration::days(3), now + MINUTE).await,
        insert_session(pool, None, now - MINUTE * 5, now + MINUTE).await,
        // anonymous, a minute short of the TTL
        insert_session(pool, None, now - ttl + MINUTE, far).await,
        // logged in and far older than the TTL, not expired: the TTL is for anonymous sessions
        insert_session(pool, user, now - ttl * 10, far).await,
    ];
    Boundaries { deleted, kept }
}

#[tokio::test]
async fn deletes_exactly_the_due_sessions_on_both_sides_of_each_cutoff() {
    let db = TestDatabase::new().await;
    let rows = seed_boundaries(&db.pool, chrono::Duration::hours(24)).await;

    let summary = run(&task(SessionsSettings::default()), &db.pool).await;

    assert_eq!(session_ids(&db.pool).await, sorted(rows.kept));
    assert_eq!(summary.report.deleted, rows.deleted.len() as u64);
    assert_eq!(
        summary.report.by_rule,
        vec![("expired", 3), ("anonymous", 1)]
    );
    assert_eq!(summary.report.completion, Completion::Done);
}

#[tokio::test]
async fn the_configured_anonymous_ttl_is_the_cutoff() {
    let db = TestDatabase::new().await;
    let ttl = StdDuration::from_secs(2 * 3600);
    let rows = seed_boundaries(&db.pool, chrono::Duration::hours(2)).await;
    // Between 2h and 24h old: kept under the default TTL, due under 2h.
    let now = db_now(&db.pool).await;
    let between = insert_session(
        &db.pool,
        None,
        now - chrono::Duration::hours(5),
        now + chrono::Duration::days(1),
    )
    .await;

    let settings = SessionsSettings {
        anonymous_ttl: ttl,
        ..Default::default()
    };
    run(&task(settings), &db.pool).await;

    assert_eq!(session_ids(&db.pool).await, sorted(rows.kept));
    assert!(!session_ids(&db.pool).await.contains(&between));
}

#[tokio::test]
async fn nothing_due_is_success() {
    let db = TestDatabase::new().await;
    let summary = run(&task(SessionsSettings::default()), &db.pool).await;
    assert_eq!(summary.report.deleted, 0);
    assert_eq!(summary.report.completion, Completion::Done);
}

#[tokio::test]
async fn dry_run_counts_each_part_and_deletes_nothing() {
    let db = TestDatabase::new().await;
    let rows = seed_boundaries(&db.pool, chrono::Duration::hours(24)).await;
    let before = session_ids(&db.pool).await;

    let report = task(SessionsSettings::default())
        .dry_run(&db.pool)
        .await
        .unwrap();

    assert_eq!(report.due, rows.deleted.len() as u64);
    assert_eq!(report.by_rule, vec![("expired", 3), ("anonymous", 1)]);
    assert_eq!(session_ids(&db.pool).await, before);
}

#[tokio::test]
async fn a_run_with_few_rows_due_deletes_both_parts_in_one_batch() {
    // The usual hourly run: one statement and one transaction for the whole rule, where the walks
    // take one per part (steady-state runs cost 6.4x a bare DELETE).
    let db = TestDatabase::new().await;
    let now = db_now(&db.pool).await;
    let day = chrono::Duration::days(1);
    let user = Some(insert_user(&db.pool).await);
    insert_sessions(&db.pool, 300, user, now - day * 3, now - MINUTE).await;
    insert_sessions(&db.pool, 200, None, now - day * 2, now + day).await;
    let mut kept = insert_sessions(&db.pool, 40, user, now - day * 3, now + MINUTE).await;
    kept.extend(insert_sessions(&db.pool, 40, None, now - MINUTE, now + day).await);

    let summary = run(&task(SessionsSettings::default()), &db.pool).await;

    assert_eq!(session_ids(&db.pool).await, sorted(kept));
    assert_eq!(
        summary.report.by_rule,
        vec![("expired", 300), ("anonymous", 200)]
    );
    assert_eq!(summary.report.batches, 1, "{:?}", summary.report);
    assert_eq!(summary.report.completion, Completion::Done);
}

#[tokio::test]
async fn many_batches_walk_each_index_once_and_stop_on_a_short_batch() {
    let db = TestDatabase::new().await;
    let now = db_now(&db.pool).await;
    let day = chrono::Duration::days(1);
    let user = Some(insert_user(&db.pool).await);
    // 250 expired (all created at the same instant, so the cursor's id tiebreak matters),
    // 130 anonymous past the TTL, and keepers of each kind.
    insert_sessions(&db.pool, 250, user, now - day * 3, now - MINUTE).await;
    insert_sessions(&db.pool, 130, None, now - day * 2, now + day).await;
    let mut kept = insert_sessions(&db.pool, 40, user, now - day * 3, now + MINUTE).await;
    kept.extend(insert_sessions(&db.pool, 40, None, now - MINUTE, now + day).await);

    let settings = SessionsSettings {
        batch_size: 50,
        ..Default::default()
    };
    let summary = run(&task(settings), &db.pool).await;

    assert_eq!(session_ids(&db.pool).await, sorted(kept));
    assert_eq!(
        summary.report.by_rule,
        vec![("expired", 250), ("anonymous", 130)]
    );
    // 250 = five full batches and an empty one; 130 = two full batches and a short one.
    assert_eq!(summary.report.batches, 6 + 3);
}

#[tokio::test]
async fn sessions_at_infinite_times_are_handled() {
    let db = TestDatabase::new().await;
    let user = Some(insert_user(&db.pool).await);
    let due: Vec<Uuid> = sqlx::query_scalar(
        "INSERT INTO user_sessions (user_id, created_at, expires_at) VALUES
             ($1, now(), '-infinity'), (NULL, '-infinity', 'infinity'), ($1, now(), '-infinity')
         RETURNING id",
    )
    .bind(user)
    .fetch_all(&db.pool)
    .await
    .unwrap();
    let kept: Vec<Uuid> = sqlx::query_scalar(
        "INSERT INTO user_sessions (user_id, created_at, expires_at) VALUES ($1, '-infinity', 'infinity') RETURNING id",
    )
    .bind(user)
    .fetch_all(&db.pool)
    .await
    .unwrap();

    // Batches of one move the cursor through -infinity keys.
    let summary = run(
        &task(SessionsSettings {
            batch_size: 1,
            ..Default::default()
        }),
        &db.pool,
    )
    .await;

    assert_eq!(summary.report.deleted, due.len() as u64);
    assert_eq!(session_ids(&db.pool).await, kept);
}

#[tokio::test]
async fn each_batch_reads_its_rule_index_not_the_table() {
    let db = TestDatabase::new().await;
    let now = db_now(&db.pool).await;
    let user = Some(insert_user(&db.pool).await);
    let day = chrono::Duration::days(1);
    insert_sessions(&db.pool, 20_000, user, now - day, now + day).await;
    insert_sessions(&db.pool, 20_000, None, now - MINUTE, now + day).await;
    sqlx::query("ANALYZE user_sessions")
        .execute(&db.pool)
        .await
        .unwrap();

    // The very statements the task issues, for a first batch and for later ones.
    let limit = i64::from(SessionsSettings::default().batch_size);
    let cases = [
        (SessionRule::Expired, "user_sessions_expires_at_idx"),
        (
            SessionRule::AnonymousStale,
            "user_sessions_anonymous_created_at_idx",
        ),
    ];
    for ((rule, index), with_cursor) in cases
        .into_iter()
        .flat_map(|case| [(case, false), (case, true)])
    {
        let explain = format!("EXPLAIN {}", sessions::delete_batch_sql(rule, with_cursor));
        let mut query = sqlx::query_scalar::<_, String>(&explain)
            .bind(now)
            .bind(limit);
        if with_cursor {
            query = query.bind(now.to_rfc3339()).bind(Uuid::nil());
        }
        let plan = query.fetch_all(&db.pool).await.unwrap().join("\n");
        // Picking walks the rule's index in order: no sort, no scan of the table. (The batch's
        // last row is found by sorting the batch itself, after the delete.)
        let picking = plan
            .split("CTE picked")
            .nth(1)
            .and_then(|rest| rest.split("CTE deleted").next())
            .unwrap_or("");
        assert!(
            picking.contains(&format!("Index Scan using {index}")),
            "{rule:?}, cursor {with_cursor}: {plan}"
        );
        assert!(
            !picking.contains("Sort"),
            "{rule:?}, cursor {with_cursor}: {plan}"
        );
        assert!(
            !plan.contains("Seq Scan"),
            "{rule:?}, cursor {with_cursor}: {plan}"
        );
    }
}
