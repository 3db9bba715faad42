//! Seeding and inspection helpers shared by the workspace tests.
#![allow(dead_code)]

use chrono::{DateTime, Duration, Utc};
use sqlx::PgPool;
use uuid::Uuid;

#[allow(unused_imports)]
pub use testkit::TestDatabase;

pub const MINUTE: Duration = Duration::minutes(1);

/// The database's clock.
pub async fn db_now(pool: &PgPool) -> DateTime<Utc> {
    repository::clock::now(pool).await.unwrap()
}

pub async fn insert_user(pool: &PgPool) -> Uuid {
    sqlx::query_scalar("INSERT INTO users (id, email) VALUES ($1, $2) RETURNING id")
        .bind(Uuid::new_v4())
        .bind(format!("{}@example.test", Uuid::new_v4()))
        .fetch_one(pool)
        .await
        .unwrap()
}

/// Inserts one session naming only the contract's columns.
pub async fn insert_session(
    pool: &PgPool,
    user_id: Option<Uuid>,
    created_at: DateTime<Utc>,
    expires_at: DateTime<Utc>,
) -> Uuid {
    sqlx::query_scalar(
        "INSERT INTO user_sessions (id, user_id, created_at, updated_at, expires_at)
         VALUES ($1, $2, $3, $3, $4) RETURNING id",
    )
    .bind(Uuid::new_v4())
    .bind(user_id)
    .bind(created_at)
    .bind(expires_at)
    .fetch_one(pool)
    .await
    .unwrap()
}

/// Inserts `n` sessions in one statement: anonymous or not, created and expiring at the given
/// offsets from `now`. Returns their ids, sorted.
pub async fn insert_sessions(
    pool: &PgPool,
    n: i64,
    user_id: Option<Uuid>,
    created_at: DateTime<Utc>,
    expires_at: DateTime<Utc>,
) -> Vec<Uuid> {
    insert_padded_sessions(pool, n, user_id, created_at, expires_at, 0).await
}

/// [`insert_sessions`] with `pad` bytes of session data each (none when 0): at 300, about 24
/// rows fill a heap page.
pub async fn insert_padded_sessions(
    pool: &PgPool,
    n: i64,
    user_id: Option<Uuid>,
    created_at: DateTime<Utc>,
    expires_at: DateTime<Utc>,
    pad: i32,
) -> Vec<Uuid> {
    let mut ids: Vec<Uuid> = sqlx::query_scalar(
        "INSERT INTO user_sessions (user_id, data, created_at, updated_at, expires_at)
         SELECT $1, CASE WHEN $5 > 0 THEN jsonb_build_object('pad', repeat('x', $5)) END, $2, $2, $3
         FROM generate_series(1, $4) RETURNING id",
    )
    .bind(user_id)
    .bind(created_at)
    .bind(expires_at)
    .bind(n)
    .bind(pad)
    .fetch_all(pool)
    .await
    .unwrap();
    ids.sort();
    ids
}

/// Every session id left, sorted.
pub async fn session_ids(pool: &PgPool) -> Vec<Uuid> {
    sqlx::query_scalar("SELECT id FROM user_sessions ORDER BY id")
        .fetch_all(pool)
        .await
        .unwrap()
}

pub fn sorted(mut ids: Vec<Uuid>) -> Vec<Uuid> {
    ids.sort();
    ids
}

/// Inserts a tenant naming only the contract's columns; `retention` is SQL interval text or
/// `None` for NULL (keep forever).
pub async fn insert_tenant(
    pool: &PgPool,
    retention: Option<&str>,
    deleted_at: Option<DateTime<Utc>>,
) -> Uuid {
    let id = Uuid::new_v4();
    sqlx::query(
        "INSERT INTO tenants (id, slug, name, data_retention_period, deleted_at)
         VALUES ($1, $2, $2, $3::interval, $4)",
    )
    .bind(id)
    .bind(format!("t-{id}"))
    .bind(retention)
    .bind(deleted_at)
    .execute(pool)
    .await
    .unwrap();
    id
}

/// A task's key: `(id, inserted_at)`.
pub type TaskKey = (Uuid, DateTime<Utc>);

pub async fn insert_task(
    pool: &PgPool,
    tenant: Uuid,
    status: &str,
    inserted_at: DateTime<Utc>,
    finished_at: Option<DateTime<Utc>>,
) -> TaskKey {
    let id = Uuid::new_v4();
    sqlx::query("INSERT INTO tasks (id, tenant_id, status, inserted_at, finished_at) VALUES ($1, $2, $3, $4, $5)")
        .bind(id)
        .bind(tenant)
        .bind(status)
        .bind(inserted_at)
        .bind(finished_at)
        .execute(pool)
        .await
        .unwrap();
    (id, inserted_at)
}

/// An event, through `executor`: the pool, or a transaction a test keeps open.
pub async fn insert_event(
    executor: impl sqlx::PgExecutor<'_>,
    tenant: Uuid,
    task: TaskKey,
    created_at: DateTime<Utc>,
) -> i64 {
    sqlx::query_scalar(
        "INSERT INTO task_events (tenant_id, task_id, task_inserted_at, event_type, created_at)
         VALUES ($1, $2, $3, 'progress', $4) RETURNING id",
    )
    .bind(tenant)
    .bind(task.0)
    .bind(task.1)
    .bind(created_at)
    .fetch_one(executor)
    .await
    .unwrap()
}

pub async fn insert_queue_item(pool: &PgPool, tenant: Uuid, task: TaskKey) -> i64 {
    sqlx::query_scalar(
        "INSERT INTO queue_items (tenant_id, task_id, task_inserted_at) VALUES ($1, $2, $3) RETURNING id",
    )
    .bind(tenant)
    .bind(task.0)
    .bind(task.1)
    .fetch_one(pool)
    .await
    .unwrap()
}

pub async fn task_keys(pool: &PgPool) -> Vec<TaskKey> {
    sqlx::query_as("SELECT id, inserted_at FROM tasks ORDER BY id, inserted_at")
        .fetch_all(pool)
        .await
        .unwrap()
}

pub async fn event_ids(pool: &PgPool) -> Vec<i64> {
    sqlx::query_scalar("SELECT id FROM task_events ORDER BY id")
        .fetch_all(pool)
        .await
        .unwrap()
}

pub async fn queue_item_ids(pool: &PgPool) -> Vec<i64> {
    sqlx::query_scalar("SELECT id FROM queue_items ORDER BY id")
        .fetch_all(pool)
        .await
        .unwrap()
}

pub fn sorted_keys(mut keys: Vec<TaskKey>) -> Vec<TaskKey> {
    keys.sort();
    keys
}

pub fn sorted_ids(mut ids: Vec<i64>) -> Vec<i64> {
    ids.sort();
    ids
}

/// Full speed, with batches that never adapt (every batch is well under an hour), so that tests
/// can count them.
pub fn fixed_batches() -> retention_controller::RunOptions {
    retention_controller::RunOptions {
        batch_time: std::time::Duration::from_secs(3600),
        ..Default::default()
    }
}

/// Runs `task` once to completion (it must not be held elsewhere), at full speed with
/// [`fixed_batches`].
pub async fn run_task(
    task: &dyn retention_controller::MaintenanceTask,
    pool: &PgPool,
) -> retention_controller::RunReport {
    show_logs();
    let cancel = tokio_util::sync::CancellationToken::new();
    match retention_controller::run_once_with(task, pool, &cancel, &fixed_batches())
        .await
        .unwrap()
    {
        retention_controller::RunOutcome::Ran(summary) => summary.report,
        other => panic!("{} did not run: {other:?}", task.name()),
    }
}

/// Names of the attached partitions of `tasks` other than the default and the future ones.
pub async fn day_partitions(pool: &PgPool) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
         WHERE i.inhparent = 'tasks'::regclass AND c.relname NOT IN ('tasks_default', 'tasks_future') ORDER BY 1",
    )
    .fetch_all(pool)
    .await
    .unwrap()
}

/// Makes sure `day` has a range of its own: before the managed area, by moving its start back
/// (every day from `day` on gets one); ahead, by carving days out of the future range.
pub async fn create_day(pool: &PgPool, day: chrono::NaiveDate) {
    let mut tx = pool.begin().await.unwrap();
    repository::history::ranges::take_layout_lock(&mut tx, true)
        .await
        .unwrap();
    let wait = std::time::Duration::from_secs(5);
    repository::history::ranges::extend_back(&mut tx, day, wait)
        .await
        .unwrap();
    repository::history::ranges::carve_days(&mut tx, day, wait)
        .await
        .unwrap();
    tx.commit().await.unwrap();
}

/// A day ten days back, given a range of its own.
pub async fn a_past_day(pool: &PgPool) -> chrono::NaiveDate {
    let day = db_now(pool).await.date_naive() - chrono::Duration::days(10);
    create_day(pool, day).await;
    day
}

/// `n` tasks of `tenant` in `status`, inserted at `at` and finished at `finished_at`, each with one
/// event: in one statement, for days of thousands of rows.
pub async fn seed_tasks(
    pool: &PgPool,
    tenant: Uuid,
    status: &str,
    at: DateTime<Utc>,
    finished_at: DateTime<Utc>,
    n: i64,
) {
    sqlx::query(
        "WITH t AS (INSERT INTO tasks (tenant_id, status, inserted_at, finished_at)
                    SELECT $1, $2, $3, $4 FROM generate_series(1, $5) RETURNING id, inserted_at)
         INSERT INTO task_events (tenant_id, task_id, task_inserted_at, event_type, created_at)
         SELECT $1, id, inserted_at, 'done', inserted_at FROM t",
    )
    .bind(tenant)
    .bind(status)
    .bind(at)
    .bind(finished_at)
    .bind(n)
    .execute(pool)
    .await
    .unwrap();
}

/// The partition (table) that holds `task`.
pub async fn home_of(pool: &PgPool, task: TaskKey) -> String {
    sqlx::query_scalar(
        "SELECT tableoid::regclass::text FROM tasks WHERE id = $1 AND inserted_at = $2",
    )
    .bind(task.0)
    .bind(task.1)
    .fetch_one(pool)
    .await
    .unwrap()
}

/// Takes `task`'s lease for a run of `holder` the way a run starts (recording it as started), or
/// `None` when another runner holds it.
pub async fn take_lease(
    pool: &PgPool,
    task: &str,
    holder: &str,
    ttl: std::time::Duration,
) -> Option<repository::lease::Lease> {
    match repository::lease::start_run(pool, task, Uuid::now_v7(), holder, ttl, None)
        .await
        .unwrap()
    {
        repository::lease::Start::Started(lease) => Some(lease),
        repository::lease::Start::Busy => None,
        other => panic!("{task}: {other:?}"),
    }
}

/// The start of a UTC day.
pub fn day_start(day: chrono::NaiveDate) -> DateTime<Utc> {
    repository::history::ranges::day_start(day)
}

/// A task with one event (created at its insertion) and one queue item; returns all three keys.
pub async fn insert_task_with_children(
    pool: &PgPool,
    tenant: Uuid,
    status: &str,
    inserted_at: DateTime<Utc>,
    finished_at: Option<DateTime<Utc>>,
) -> (TaskKey, i64, i64) {
    let task = insert_task(pool, tenant, status, inserted_at, finished_at).await;
    let event = insert_event(pool, tenant, task, inserted_at).await;
    let item = insert_queue_item(pool, tenant, task).await;
    (task, event, item)
}

/// Rows expected to be left.
#[derive(Default)]
pub struct Expect {
    pub tasks: Vec<TaskKey>,
    pub events: Vec<i64>,
    pub items: Vec<i64>,
}

impl Expect {
    /// A task kept with its event and its queue item.
    pub fn add(&mut self, (task, event, item): (TaskKey, i64, i64)) {
        self.tasks.push(task);
        self.events.push(event);
        self.items.push(item);
    }

    /// A task kept with its event whose queue item is due (the queue-items rule: the task is
    /// finished, or its tenant deleted).
    pub fn add_without_item(&mut self, (task, event, _): (TaskKey, i64, i64)) {
        self.tasks.push(task);
        self.events.push(event);
    }
}

/// Fails naming only the rows that differ between what is left and what should be.
pub fn same<T: Ord + std::fmt::Debug + Clone>(actual: Vec<T>, expected: Vec<T>, what: &str) {
    if actual != expected {
        let gone_wrongly: Vec<&T> = expected.iter().filter(|x| !actual.contains(x)).collect();
        let kept_wrongly: Vec<&T> = actual.iter().filter(|x| !expected.contains(x)).collect();
        panic!("{what}: deleted but should be kept: {gone_wrongly:?}; left but should be deleted: {kept_wrongly:?}");
    }
}

/// With `RUST_LOG` set, the engine's logs go to the test's output (`--nocapture` shows them).
pub fn show_logs() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
}

/// The range whose lower bound is the start of `day`.
pub async fn range_of_day(pool: &PgPool, day: chrono::NaiveDate) -> repository::history::Range {
    repository::history::ranges::all(pool)
        .await
        .unwrap()
        .into_iter()
        .find(|r| r.lower == Some(day_start(day)))
        .unwrap()
}

/// Makes the daily sweep of every range's events (which finds orphans too) not due: for tests of
/// another path that must not share its run with it.
pub async fn swept_just_now(pool: &PgPool) {
    let now = db_now(pool).await.timestamp();
    repository::watermarks::set(pool, "task-history.orphan-sweep.swept-at", now)
        .await
        .unwrap();
}

/// A Prometheus recorder, the exporter `engine serve` uses: `metrics::set_default_local_recorder`
/// makes it record this thread's metrics, which are a `#[tokio::test]`'s (its runtime runs every
/// task on the test's thread).
pub fn prometheus_recorder() -> metrics_exporter_prometheus::PrometheusRecorder {
    metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder()
}

/// The value of the one series in Prometheus's text `text` named `name` with exactly `labels`
/// (`task="x",reason="y"`, in the order they were recorded).
pub fn series_value(text: &str, name: &str, labels: &str) -> Option<f64> {
    let prefix = format!("{name}{{{labels}}} ");
    text.lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .and_then(|value| value.trim().parse().ok())
}

/// The ids of `tenant`'s tasks of `status` now.
pub async fn task_ids_of(
    pool: &PgPool,
    tenant: Uuid,
    status: &str,
) -> std::collections::BTreeSet<Uuid> {
    sqlx::query_scalar("SELECT id FROM tasks WHERE tenant_id = $1 AND status = $2")
        .bind(tenant)
        .bind(status)
        .fetch_all(pool)
        .await
        .unwrap()
        .into_iter()
        .collect()
}

/// The task-history task with its default settings, archiving to `storage`.
pub fn archiving_history(
    storage: std::sync::Arc<retention_controller::storage::Storage>,
) -> retention_controller::tasks::task_history::TaskHistoryTask {
    retention_controller::tasks::task_history::TaskHistoryTask::new(
        retention_controller::settings::TaskHistorySettings::default(),
    )
    .with_archive_storage(storage)
}

/// A tenant keeping run history for `window` that archives its failed runs.
pub async fn archiving_tenant(pool: &PgPool, window: &str) -> Uuid {
    let tenant = insert_tenant(pool, Some(window), None).await;
    sqlx::query("UPDATE tenants SET archive_statuses = '{failed}' WHERE id = $1")
        .bind(tenant)
        .execute(pool)
        .await
        .unwrap();
    tenant
}

/// The history range holding the instant `at`.
pub async fn range_at(pool: &PgPool, at: DateTime<Utc>) -> repository::history::Range {
    repository::history::ranges::all(pool)
        .await
        .unwrap()
        .into_iter()
        .find(|r| r.lower.is_some_and(|l| l <= at) && r.upper.is_some_and(|u| u > at))
        .unwrap()
}

/// A rewrite of `range` started as `task-history`'s run `run_id` starts one (under the rule at
/// `now` with `grace`), its copy stepped through until it reaches its catch-up: the caller
/// writes, then swaps. Its id.
pub async fn rewrite_copied(
    pool: &PgPool,
    run_id: Uuid,
    range: &repository::history::Range,
    now: DateTime<Utc>,
    grace: std::time::Duration,
    limits: repository::batch::BatchLimits,
) -> i64 {
    use repository::history::rewrite::{self, copy, Phase};
    let started = rewrite::start(
        pool,
        std::slice::from_ref(range),
        ("task-history", run_id),
        &repository::rule::Rule::new(now, grace),
        limits,
        std::time::Duration::from_secs(5),
        true,
    )
    .await
    .unwrap()
    .unwrap();
    loop {
        let mut tx = repository::batch::begin(pool, limits).await.unwrap();
        let current = rewrite::lock(&mut tx, started.id).await.unwrap().unwrap();
        if current.phase == Phase::CatchUp {
            tx.commit().await.unwrap();
            return started.id;
        }
        copy::chunk(&mut tx, &current, 64).await.unwrap();
        tx.commit().await.unwrap();
    }
}
