//! Archive before delete: the first step of a task-history run. For each tenant that archives
//! (`tenants.archive_statuses`) and each status it archives, its tasks due by their window but
//! waiting for their archive are read along `tasks_due_idx`, in (coalesce(finished_at,
//! inserted_at), id) order, a chunk at a time in one REPEATABLE READ snapshot with their events,
//! payloads and log lines, and written as Parquet files (see [`crate::archive_format`]) of one
//! status, at most one day and about [`ArchiveLimits::max_file_bytes`] each. A file goes:
//!
//! 1. its manifest row, `writing`, with its key and which tasks it holds (first and last task,
//!    count), committed: no object is ever without one;
//! 2. the upload;
//! 3. the store's confirmation: the object read back has the size and SHA-256 written;
//! 4. one transaction, only while the run holds task-history's lease: the row `written`, its tasks
//!    recorded as archived as the file holds them (which lets the rule delete them, on any path,
//!    from then on), and the run's receipt (rule `archived`) naming the key.
//!
//! A failure at any step leaves the tasks where they are, not due; a tenant's failure does not
//! stop the others. A file begun and not finished (`writing`) is written again by the next run
//! under the same key with the same tasks: row groups are cut every [`ArchiveLimits::chunk`]
//! tasks from the file's first, so the same tasks give the same bytes. Memory: one file and up to
//! four chunks (two read ahead and queued, one the reader holds until there is room, one being
//! written).
//!
//! Then the step forgets the records of archived tasks that are gone, and expires archives past
//! their tenant's `archive_retention_period` that hold no live task (manifest row deleted, object
//! given to the outbox in the same transaction, receipt `archive-expired` naming the key); the
//! blobs task deletes the object, exactly once.

use std::collections::BTreeMap;

use chrono::{DateTime, NaiveDate, Utc};
use repository::archives::{self, ArchivingTenant, PendingTask};
use repository::receipts::RunReceipt;
use repository::rule::Rule;
use repository::tenants::FinalStatus;
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use uuid::Uuid;

use crate::archive_format::{
    ArchivedEvent, ArchivedLog, ArchivedPayload, ArchivedTask, FileWriter, SCHEMA_VERSION,
};
use crate::storage::{Storage, StorageError};

/// How much an archive step reads and writes at once.
#[derive(Debug, Clone, Copy)]
pub struct ArchiveLimits {
    /// Tasks read per statement, and per row group of a file.
    pub chunk: i64,
    /// A file is closed once it holds this many bytes (at a row group's end).
    pub max_file_bytes: usize,
}

impl Default for ArchiveLimits {
    fn default() -> Self {
        ArchiveLimits {
            chunk: 1000,
            max_file_bytes: 64 * 1024 * 1024,
        }
    }
}

/// Where and as whom an archive step writes.
pub struct ArchiveRun<'a> {
    pub pool: &'a PgPool,
    pub storage: &'a Storage,
    pub rule: &'a Rule,
    pub run_id: Uuid,
    /// Record files only while this run holds task-history's lease (`None`: no lease, e.g. a
    /// test driving the step directly).
    pub lease_run: Option<Uuid>,
    pub receipt: RunReceipt,
    pub limits: ArchiveLimits,
    pub interrupted: &'a (dyn Fn() -> bool + Sync),
    /// The run, whose pacing (`--pace`, the feedback) and standby throttle each step honours
    /// like a batch of deletes: a manifest row begun, a file uploaded and confirmed, a file
    /// recorded. `None`: no pauses.
    pub pace: Option<&'a crate::task::RunContext>,
}

impl ArchiveRun<'_> {
    async fn step_done(&self, started: std::time::Instant) {
        if let Some(ctx) = self.pace {
            ctx.pause_after(started.elapsed()).await;
        }
    }
}

/// What an archive step did.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Archived {
    pub files: u64,
    pub tasks: u64,
    pub bytes: u64,
    pub keys: Vec<String>,
    /// Files that failed (their tasks wait), with the first error.
    pub failures: u64,
    pub first_error: Option<String>,
    /// Archives expired and given to the outbox.
    pub expired: u64,
    /// Rows left of archived runs retention deleted (see `archives::late_rows`).
    pub late_rows: i64,
}

impl Archived {
    fn failed(&mut self, error: &ArchiveError) {
        self.failures += 1;
        crate::telemetry::archive_failures(1);
        if self.first_error.is_none() {
            self.first_error = Some(error.to_string());
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("writing the archive file {key}: {message}")]
    Format { key: String, message: String },
    #[error("the store did not confirm the archive file {key}: {what}")]
    NotConfirmed { key: String, what: String },
    #[error("the archive file {key} was not recorded: {source}")]
    NotRecorded {
        key: String,
        source: archives::NotRecorded,
    },
}

/// The key of part `part` of run `run_id`'s archive of `tenant`'s tasks of `status` whose window
/// counts from `day` (their finish, else their insertion).
pub fn archive_key(
    tenant: Uuid,
    day: NaiveDate,
    status: FinalStatus,
    run_id: Uuid,
    part: u32,
) -> String {
    format!(
        "archive/{tenant}/{day}/{}-{run_id}-{part}.parquet",
        status.as_str()
    )
}

/// The store's identity in the manifest: its location (`file:///dir`, `s3://bucket/prefix`).
pub fn store_id(storage: &Storage) -> String {
    storage.location().to_string()
}

/// The archive step (see the module's documentation). Errors of one file or tenant are counted
/// in [`Archived::failures`] and the step goes on; only the database failing for the step's
/// own bookkeeping ends it early.
pub async fn archive_due(run: &ArchiveRun<'_>) -> Result<Archived, ArchiveError> {
    let mut archived = Archived::default();
    let store = store_id(run.storage);
    let tenants = archives::archiving_tenants(run.pool).await?;
    // The tasks of begun files that failed again: the walk below leaves them to their file
    // (else every run the store is down would begin one more file for the same tasks).
    let mut still_begun: Vec<archives::Unfinished> = Vec::new();
    // First the files a run began and did not finish, under their own keys.
    for begun in archives::unfinished(run.pool).await? {
        if (run.interrupted)() {
            return Ok(archived);
        }
        if begun.store != store {
            // Another store's (storage.url changed): left as it is.
            continue;
        }
        let status = FinalStatus::parse(&begun.status);
        let tenant = tenants
            .iter()
            .find(|t| t.id == begun.tenant_id && t.statuses.contains(&begun.status));
        let result = match (tenant, status) {
            (Some(tenant), Some(status)) => {
                let skip = spans_of(&still_begun, tenant.id, status);
                rewrite_begun(run, tenant, status, &begun, &skip, &mut archived).await
            }
            // The tenant no longer archives that status: the begun file holds nothing that
            // waits; its object (if any) goes through the outbox.
            _ => archives::forget(run.pool, begun.id)
                .await
                .map(|_| ())
                .map_err(ArchiveError::from),
        };
        if let Err(error) = result {
            tracing::warn!(key = %begun.object_key, %error, "an archive file begun earlier was not finished; tried again next run");
            archived.failed(&error);
            still_begun.push(begun);
        }
    }
    for tenant in &tenants {
        for status in tenant.statuses.iter().filter_map(|s| FinalStatus::parse(s)) {
            if (run.interrupted)() {
                return Ok(archived);
            }
            let begun = spans_of(&still_begun, tenant.id, status);
            if let Err(error) =
                archive_tenant_status(run, &store, tenant, status, &begun, &mut archived).await
            {
                tracing::warn!(tenant = %tenant.slug, status = status.as_str(), %error, "archiving failed; the tenant's tasks waiting for their archive stay until a run archives them");
                archived.failed(&error);
            }
        }
    }
    // Records of archived tasks deleted since (by the last run) first: an archive expires only
    // once none of its tasks lives.
    while archives::clean_gone(run.pool, 10_000).await? == 10_000 {
        if (run.interrupted)() {
            return Ok(archived);
        }
    }
    // Archives past their time, a batch per transaction.
    loop {
        if (run.interrupted)() {
            break;
        }
        let mut tx = run.pool.begin().await?;
        let gone = archives::expire(&mut tx, &store, run.rule.now, 1000, &run.receipt).await?;
        tx.commit().await?;
        archived.expired += gone.len() as u64;
        crate::telemetry::archives_expired(gone.len() as u64);
        if gone.len() < 1000 {
            break;
        }
    }
    archived.late_rows = archives::late_rows(run.pool).await?;
    crate::telemetry::archive_late_rows(archived.late_rows);
    Ok(archived)
}

/// A file being filled: its day, the tasks not yet in a row group, what it holds so far.
struct OpenFile {
    day: NaiveDate,
    writer: FileWriter,
    /// Tasks read but not yet written: a row group is cut every `chunk` tasks from the file's
    /// first, whatever the reads were.
    buffered: Vec<ArchivedTask>,
    tasks: Vec<archives::ArchivedTask>,
    first: Option<(DateTime<Utc>, Uuid)>,
    last: Option<(DateTime<Utc>, Uuid)>,
}

impl OpenFile {
    fn new(day: NaiveDate) -> Result<OpenFile, ArchiveError> {
        Ok(OpenFile {
            day,
            writer: FileWriter::new().map_err(|e| format_error("(new file)", e))?,
            buffered: Vec::new(),
            tasks: Vec::new(),
            first: None,
            last: None,
        })
    }

    /// Bytes written so far, and those buffered (roughly).
    fn bytes_so_far(&self) -> usize {
        self.writer.bytes_so_far()
    }

    /// Adds read tasks; writes a row group each time `chunk` tasks are buffered.
    fn push(&mut self, rows: Vec<ArchivedTask>, chunk: usize) -> Result<(), ArchiveError> {
        for row in rows {
            let key = (row.finished_at.unwrap_or(row.inserted_at), row.task_id);
            self.first.get_or_insert(key);
            self.last = Some(key);
            self.tasks.push(archives::ArchivedTask {
                id: row.task_id,
                inserted_at: row.inserted_at,
                status: row.status.clone(),
                finished_at: row.finished_at,
                events: row.events.len() as i32,
                payloads: row.payloads.len() as i32,
                logs: row.logs.len() as i32,
                max_event_id: row.events.iter().map(|e| e.id).max(),
                max_payload_id: row.payloads.iter().map(|p| p.id).max(),
                max_log_id: row.logs.iter().map(|l| l.id).max(),
            });
            self.buffered.push(row);
            if self.buffered.len() >= chunk {
                self.flush()?;
            }
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), ArchiveError> {
        if !self.buffered.is_empty() {
            let rows = std::mem::take(&mut self.buffered);
            self.writer
                .write(&rows)
                .map_err(|e| format_error("(open file)", e))?;
        }
        Ok(())
    }
}

fn format_error(key: &str, error: impl std::fmt::Display) -> ArchiveError {
    ArchiveError::Format {
        key: key.to_string(),
        message: error.to_string(),
    }
}

/// One chunk of waiting tasks with everything that goes with them, read in one snapshot: the
/// counts recorded for each task are those of the rows in the file.
async fn read_chunk(
    pool: &PgPool,
    rule: &Rule,
    tenant: Uuid,
    status: FinalStatus,
    after: Option<(DateTime<Utc>, Uuid)>,
    bounds: Bounds,
    limit: i64,
) -> Result<Vec<ArchivedTask>, ArchiveError> {
    let mut tx = pool.begin().await?;
    // Settings, not statements on the schema: nothing for the checked macros to check.
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .execute(&mut *tx)
        .await?;
    // The walk's generic plan: each partition's index in order, merged, a chunk's rows read. A
    // custom plan for the first cursors estimates that most of the backlog follows and sorts
    // all of it for each chunk (measured: 70-90 ms a chunk of 1,000 against 4 ms, on 50,000
    // waiting runs; `bench history --archive`).
    sqlx::query("SET LOCAL plan_cache_mode = force_generic_plan")
        .execute(&mut *tx)
        .await?;
    let tasks = archives::pending(
        &mut tx,
        rule,
        tenant,
        status,
        after.or(bounds.from_exclusive),
        bounds.through,
        limit,
    )
    .await?;
    let rows = with_dependents(&mut tx, tasks).await?;
    tx.commit().await?;
    Ok(rows)
}

/// The chunks of one walk (a tenant's waiting tasks of one status, within `bounds`), read ahead
/// of the file being written: a task of its own reads the next chunk while the caller encodes,
/// uploads and records, so the database and the encoding overlap (the step took 5.2 s one after
/// the other against 4.0 s, at 200,000 runs; `bench history --archive`). The chunks are exactly
/// those the walk reads one after the other (each from the last task of the one before, in its
/// own snapshot), so a file's bytes do not depend on the timing. Dropping it stops the reading.
/// Up to `DEPTH` chunks wait in the queue, and the reader holds one more until there is room.
struct ReadAhead {
    chunks: tokio::sync::mpsc::Receiver<Result<Vec<ArchivedTask>, ArchiveError>>,
    reader: tokio::task::JoinHandle<()>,
}

impl ReadAhead {
    const DEPTH: usize = 2;

    fn start(
        run: &ArchiveRun<'_>,
        tenant: Uuid,
        status: FinalStatus,
        bounds: Bounds,
        limit: i64,
    ) -> ReadAhead {
        let (sender, chunks) = tokio::sync::mpsc::channel(Self::DEPTH);
        let (pool, rule) = (run.pool.clone(), run.rule.clone());
        let reader = tokio::spawn(async move {
            let mut cursor = None;
            loop {
                let read = read_chunk(&pool, &rule, tenant, status, cursor, bounds, limit).await;
                let last = match &read {
                    Ok(rows) => rows
                        .last()
                        .filter(|_| rows.len() as i64 == limit)
                        .map(|t| (t.finished_at.unwrap_or(t.inserted_at), t.task_id)),
                    Err(_) => None,
                };
                let end = last.is_none();
                if sender.send(read).await.is_err() || end {
                    return;
                }
                cursor = last;
            }
        });
        ReadAhead { chunks, reader }
    }

    /// The next chunk: empty once the walk is done (the last one may be short).
    async fn next(&mut self) -> Result<Vec<ArchivedTask>, ArchiveError> {
        self.chunks.recv().await.unwrap_or_else(|| Ok(Vec::new()))
    }
}

impl Drop for ReadAhead {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// Where a walk starts and ends.
#[derive(Debug, Clone, Copy, Default)]
struct Bounds {
    from_exclusive: Option<(DateTime<Utc>, Uuid)>,
    through: Option<(DateTime<Utc>, Uuid)>,
}

async fn archive_tenant_status(
    run: &ArchiveRun<'_>,
    store: &str,
    tenant: &ArchivingTenant,
    status: FinalStatus,
    begun: &[TaskSpan],
    archived: &mut Archived,
) -> Result<(), ArchiveError> {
    let chunk = run.limits.chunk.max(1);
    let mut part = 0u32;
    let mut open: Option<OpenFile> = None;
    let mut chunks = ReadAhead::start(run, tenant.id, status, Bounds::default(), chunk);
    loop {
        let rows = chunks.next().await?;
        if rows.is_empty() {
            break;
        }
        let short = (rows.len() as i64) < chunk;
        // Task by task: a file holds one day, and a full one closes at a row group's end,
        // wherever the reads fell.
        for row in rows {
            if within(begun, key_of(&row)) {
                continue;
            }
            let this_day = day_of(&row);
            if open.as_ref().is_some_and(|file| file.day != this_day) {
                let file = open.take().expect("an open file");
                close(run, store, tenant, status, file, part, archived).await?;
                part += 1;
            }
            if open.is_none() {
                open = Some(OpenFile::new(this_day)?);
            }
            let file = open.as_mut().expect("an open file");
            file.push(vec![row], chunk as usize)?;
            if file.buffered.is_empty() && file.bytes_so_far() >= run.limits.max_file_bytes {
                let file = open.take().expect("an open file");
                close(run, store, tenant, status, file, part, archived).await?;
                part += 1;
            }
        }
        if (run.interrupted)() {
            // What the open file holds waits for the next run.
            return Ok(());
        }
        if short {
            break;
        }
    }
    if let Some(file) = open {
        close(run, store, tenant, status, file, part, archived).await?;
    }
    Ok(())
}

/// A span of tasks in walk order: the first and the last (instant, id).
type TaskSpan = ((DateTime<Utc>, Uuid), (DateTime<Utc>, Uuid));

/// The spans of the begun files of `tenant` and `status` among `begun`.
fn spans_of(begun: &[archives::Unfinished], tenant: Uuid, status: FinalStatus) -> Vec<TaskSpan> {
    begun
        .iter()
        .filter(|b| b.tenant_id == tenant && b.status == status.as_str())
        .map(|b| (b.first(), b.last()))
        .collect()
}

/// A task's place in walk order: (its finish, else its insertion; its id).
fn key_of(row: &ArchivedTask) -> (DateTime<Utc>, Uuid) {
    (row.finished_at.unwrap_or(row.inserted_at), row.task_id)
}

fn within(spans: &[TaskSpan], key: (DateTime<Utc>, Uuid)) -> bool {
    spans
        .iter()
        .any(|(first, last)| *first <= key && key <= *last)
}

/// [`finish`], where a file the store refused or did not confirm (or could not be encoded) is
/// counted as failed and the walk goes on with the next file: its tasks wait for the next run,
/// and a key the store refuses holds back no other day. The database failing, or the run
/// losing its lease, ends the walk.
async fn close(
    run: &ArchiveRun<'_>,
    store: &str,
    tenant: &ArchivingTenant,
    status: FinalStatus,
    file: OpenFile,
    part: u32,
    archived: &mut Archived,
) -> Result<(), ArchiveError> {
    match finish(run, store, tenant, status, file, part, archived).await {
        Err(
            error @ (ArchiveError::Storage(_)
            | ArchiveError::NotConfirmed { .. }
            | ArchiveError::Format { .. }),
        ) => {
            tracing::warn!(tenant = %tenant.slug, status = status.as_str(), %error, "an archive file failed; its tasks wait for the next run, the others go on");
            archived.failed(&error);
            Ok(())
        }
        other => other,
    }
}

fn day_of(row: &ArchivedTask) -> NaiveDate {
    row.finished_at.unwrap_or(row.inserted_at).date_naive()
}

/// Reads what goes with `tasks` and nests it: tasks in the order given, their events, payloads
/// and log lines in id order.
async fn with_dependents(
    conn: &mut sqlx::PgConnection,
    tasks: Vec<PendingTask>,
) -> Result<Vec<ArchivedTask>, ArchiveError> {
    let (events, payloads, logs) = archives::dependents(conn, &tasks).await?;
    let mut rows: BTreeMap<Uuid, ArchivedTask> = BTreeMap::new();
    let order: Vec<Uuid> = tasks.iter().map(|t| t.id).collect();
    for task in tasks {
        rows.insert(
            task.id,
            ArchivedTask {
                tenant_id: task.tenant_id,
                task_id: task.id,
                status: task.status,
                inserted_at: task.inserted_at,
                finished_at: task.finished_at,
                payload: task.payload,
                events: Vec::new(),
                payloads: Vec::new(),
                logs: Vec::new(),
            },
        );
    }
    for e in events {
        if let Some(row) = rows.get_mut(&e.task_id) {
            row.events.push(ArchivedEvent {
                id: e.id,
                event_type: e.event_type,
                created_at: e.created_at,
                data: e.data,
            });
        }
    }
    for p in payloads {
        if let Some(row) = rows.get_mut(&p.task_id) {
            row.payloads.push(ArchivedPayload {
                id: p.id,
                kind: p.kind,
                location: p.location,
                inline_content: p.inline_content,
                external_key: p.external_key,
                size_bytes: p.size_bytes,
                created_at: p.created_at,
            });
        }
    }
    for l in logs {
        if let Some(row) = rows.get_mut(&l.task_id) {
            row.logs.push(ArchivedLog {
                id: l.id,
                created_at: l.created_at,
                level: l.level,
                line: l.line,
            });
        }
    }
    Ok(order.iter().filter_map(|id| rows.remove(id)).collect())
}

/// A file begun by an earlier run (`writing`): written again under its key with the tasks it
/// named (from its first to its last) that still wait: the same rows in the same row groups when
/// nothing else changed, so the same bytes. None left: the row goes, and its object (if the
/// upload got that far) through the outbox.
async fn rewrite_begun(
    run: &ArchiveRun<'_>,
    tenant: &ArchivingTenant,
    status: FinalStatus,
    begun: &archives::Unfinished,
    skip: &[TaskSpan],
    archived: &mut Archived,
) -> Result<(), ArchiveError> {
    let chunk = run.limits.chunk.max(1);
    let (first_at, first_task) = begun.first();
    // Just before the first task in (instant, id) order.
    let bounds = Bounds {
        from_exclusive: Some(before(first_at, first_task)),
        through: Some(begun.last()),
    };
    let mut file = OpenFile::new(first_at.date_naive())?;
    let mut chunks = ReadAhead::start(run, tenant.id, status, bounds, chunk);
    loop {
        let rows = chunks.next().await?;
        if rows.is_empty() {
            break;
        }
        let short = (rows.len() as i64) < chunk;
        // Not the runs of an older begun file that failed again this run: this file did not
        // hold them when it was begun (the walk that began it left them to theirs).
        let rows = rows
            .into_iter()
            .filter(|row| !within(skip, key_of(row)))
            .collect();
        file.push(rows, chunk as usize)?;
        if short {
            break;
        }
    }
    drop(chunks);
    if file.tasks.is_empty() {
        archives::forget(run.pool, begun.id).await?;
        return Ok(());
    }
    write_out(
        run,
        tenant,
        begun.id,
        begun.object_key.clone(),
        file,
        archived,
    )
    .await
}

/// The (instant, id) just before (`at`, `id`): the same instant with the previous id, or the
/// previous microsecond with the greatest.
fn before(at: DateTime<Utc>, id: Uuid) -> (DateTime<Utc>, Uuid) {
    match id.as_u128().checked_sub(1) {
        Some(previous) => (at, Uuid::from_u128(previous)),
        None => (at - chrono::Duration::microseconds(1), Uuid::max()),
    }
}

/// Steps 1 to 4 of the module's list for one file.
async fn finish(
    run: &ArchiveRun<'_>,
    store: &str,
    tenant: &ArchivingTenant,
    status: FinalStatus,
    mut file: OpenFile,
    part: u32,
    archived: &mut Archived,
) -> Result<(), ArchiveError> {
    let key = archive_key(tenant.id, file.day, status, run.run_id, part);
    file.flush()?;
    let (Some(first), Some(last)) = (file.first, file.last) else {
        return Ok(());
    };
    let started = std::time::Instant::now();
    let id = archives::begin(
        run.pool,
        &archives::Begun {
            key: &key,
            store,
            tenant: tenant.id,
            status,
            first,
            last,
            tasks: file.tasks.len() as i64,
            run_id: run.run_id,
            part: part as i32,
            schema_version: SCHEMA_VERSION,
        },
    )
    .await?;
    run.step_done(started).await;
    write_out(run, tenant, id, key, file, archived).await
}

/// Steps 2 to 4 for the begun file `id` at `key`.
async fn write_out(
    run: &ArchiveRun<'_>,
    tenant: &ArchivingTenant,
    id: i64,
    key: String,
    mut file: OpenFile,
    archived: &mut Archived,
) -> Result<(), ArchiveError> {
    file.flush()?;
    let started = std::time::Instant::now();
    let bytes = file.writer.finish().map_err(|e| format_error(&key, e))?;
    let sha256 = hex(&Sha256::digest(&bytes));
    let size = bytes.len();
    // A run that lost the lease uploads nothing: the run that holds it may be writing this key.
    if let Some(lease_run) = run.lease_run {
        if !archives::lease_held(run.pool, lease_run).await? {
            return Err(ArchiveError::NotRecorded {
                key,
                source: archives::NotRecorded::LeaseLost(lease_run),
            });
        }
    }
    run.storage.put(&key, bytes::Bytes::from(bytes)).await?;
    let stored = run
        .storage
        .get(&key)
        .await?
        .ok_or_else(|| ArchiveError::NotConfirmed {
            key: key.clone(),
            what: "it is not there after the upload".into(),
        })?;
    if stored.len() != size || hex(&Sha256::digest(&stored)) != sha256 {
        return Err(ArchiveError::NotConfirmed {
            key,
            what: format!(
                "{} bytes read back against {size} written, or a different SHA-256",
                stored.len()
            ),
        });
    }
    drop(stored);
    run.step_done(started).await;
    let started = std::time::Instant::now();
    let written = archives::Written {
        tasks: file.tasks,
        bytes: size as i64,
        sha256,
    };
    let mut tx = run.pool.begin().await?;
    if let Err(source) = archives::written(
        &mut tx,
        id,
        &written,
        tenant.retention,
        run.lease_run,
        &run.receipt,
    )
    .await
    {
        return Err(ArchiveError::NotRecorded { key, source });
    }
    tx.commit().await?;
    archived.files += 1;
    archived.tasks += written.tasks.len() as u64;
    archived.bytes += size as u64;
    crate::telemetry::archived(written.tasks.len() as u64, size as u64);
    archived.keys.push(key);
    run.step_done(started).await;
    Ok(())
}

fn hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}
