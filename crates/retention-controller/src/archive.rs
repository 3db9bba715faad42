//! Archive before delete: the first step of a task-history run. For each tenant that archives
//! (`tenants.archive_statuses`), its tasks due by their window but waiting for their archive are
//! read in chunks, in (inserted_at, id) order, with their events, payloads and log lines, and
//! written as Parquet files (see [`crate::archive_format`]) of at most one day and
//! [`ArchiveLimits::max_file_bytes`] each. A file goes:
//!
//! 1. its manifest row, `writing`, with its key, committed (no object is ever without one);
//! 2. the upload;
//! 3. the store's confirmation: the object read back has the size and SHA-256 written;
//! 4. one transaction: the row `written` and its tasks recorded as archived, which is what lets
//!    the rule delete them (on any path, from then on).
//!
//! A failure at any step leaves the tasks where they are, not due. Memory: one chunk and one
//! file.

use std::collections::BTreeMap;

use chrono::{DateTime, NaiveDate, Utc};
use repository::archives::{self, ArchivingTenant, PendingTask};
use repository::rule::Rule;
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
    /// Tasks read per statement.
    pub chunk: i64,
    /// A file is closed once it holds this many bytes.
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

/// What an archive step wrote.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Archived {
    pub files: u64,
    pub tasks: u64,
    pub bytes: u64,
    pub keys: Vec<String>,
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
}

/// The key of part `part` of run `run_id`'s archive of `tenant`'s tasks of `day`.
pub fn archive_key(tenant: Uuid, day: NaiveDate, run_id: Uuid, part: u32) -> String {
    format!("archive/{tenant}/{day}/{run_id}-{part}.parquet")
}

/// Archives every archiving tenant's tasks waiting for their archive under `rule`; stops
/// between files once `interrupted` says so.
pub async fn archive_due(
    pool: &PgPool,
    storage: &Storage,
    rule: &Rule,
    run_id: Uuid,
    limits: ArchiveLimits,
    interrupted: &(dyn Fn() -> bool + Sync),
) -> Result<Archived, ArchiveError> {
    let mut archived = Archived::default();
    let tenants = archives::archiving_tenants(pool).await?;
    // First the files a run began and did not finish, under their own keys.
    for begun in archives::unfinished(pool).await? {
        if interrupted() {
            return Ok(archived);
        }
        match tenants.iter().find(|t| t.id == begun.tenant_id) {
            Some(tenant) => {
                rewrite_begun(pool, storage, rule, limits, tenant, &begun, &mut archived).await?
            }
            // The tenant no longer archives: the begun file holds nothing that waits.
            None => {
                storage.delete(&begun.object_key).await?;
                archives::forget(pool, begun.id).await?;
            }
        }
    }
    for tenant in tenants {
        if interrupted() {
            break;
        }
        archive_tenant(
            pool,
            storage,
            rule,
            run_id,
            limits,
            &tenant,
            &mut archived,
            interrupted,
        )
        .await?;
    }
    Ok(archived)
}

/// A file being filled: its day, what it holds so far.
struct OpenFile {
    day: NaiveDate,
    writer: FileWriter,
    tasks: Vec<(Uuid, DateTime<Utc>)>,
    events: i64,
    payloads: i64,
    logs: i64,
    statuses: BTreeMap<String, i64>,
}

impl OpenFile {
    fn new(day: NaiveDate, key: &str) -> Result<OpenFile, ArchiveError> {
        Ok(OpenFile {
            day,
            writer: FileWriter::new().map_err(|e| format_error(key, e))?,
            tasks: Vec::new(),
            events: 0,
            payloads: 0,
            logs: 0,
            statuses: BTreeMap::new(),
        })
    }
}

fn format_error(key: &str, error: impl std::fmt::Display) -> ArchiveError {
    ArchiveError::Format {
        key: key.to_string(),
        message: error.to_string(),
    }
}

#[allow(clippy::too_many_arguments)]
async fn archive_tenant(
    pool: &PgPool,
    storage: &Storage,
    rule: &Rule,
    run_id: Uuid,
    limits: ArchiveLimits,
    tenant: &ArchivingTenant,
    archived: &mut Archived,
    interrupted: &(dyn Fn() -> bool + Sync),
) -> Result<(), ArchiveError> {
    let mut conn = pool.acquire().await?;
    let mut cursor = None;
    let mut part = 0u32;
    let mut open: Option<OpenFile> = None;
    loop {
        let chunk = archives::pending(&mut conn, rule, tenant.id, cursor, limits.chunk).await?;
        let Some(last) = chunk.last() else { break };
        cursor = Some((last.inserted_at, last.id));
        for day_tasks in chunk.chunk_by(|a, b| day(a) == day(b)) {
            let this_day = day(&day_tasks[0]);
            let full = open.as_ref().is_some_and(|file| {
                file.day != this_day || file.writer.bytes_so_far() >= limits.max_file_bytes
            });
            if full {
                let file = open.take().expect("an open file");
                finish(pool, storage, run_id, tenant, file, part, archived).await?;
                part += 1;
                if interrupted() {
                    return Ok(());
                }
            }
            let file = match &mut open {
                Some(file) => file,
                None => open.insert(OpenFile::new(
                    this_day,
                    &archive_key(tenant.id, this_day, run_id, part),
                )?),
            };
            add(
                &mut conn,
                file,
                day_tasks,
                &archive_key(tenant.id, this_day, run_id, part),
            )
            .await?;
        }
    }
    if let Some(file) = open {
        finish(pool, storage, run_id, tenant, file, part, archived).await?;
    }
    Ok(())
}

fn day(task: &PendingTask) -> NaiveDate {
    task.inserted_at.date_naive()
}

/// Reads what goes with `tasks` and writes them into `file` as one row group.
async fn add(
    conn: &mut sqlx::PgConnection,
    file: &mut OpenFile,
    tasks: &[PendingTask],
    key: &str,
) -> Result<(), ArchiveError> {
    let (events, payloads, logs) = archives::dependents(conn, tasks).await?;
    let mut rows: BTreeMap<Uuid, ArchivedTask> = BTreeMap::new();
    for task in tasks {
        rows.insert(
            task.id,
            ArchivedTask {
                tenant_id: task.tenant_id,
                task_id: task.id,
                status: task.status.clone(),
                inserted_at: task.inserted_at,
                finished_at: task.finished_at,
                payload: task.payload.clone(),
                events: Vec::new(),
                payloads: Vec::new(),
                logs: Vec::new(),
            },
        );
    }
    file.events += events.len() as i64;
    file.payloads += payloads.len() as i64;
    file.logs += logs.len() as i64;
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
    // In the order read: (inserted_at, id).
    let ordered: Vec<ArchivedTask> = tasks
        .iter()
        .filter_map(|task| rows.remove(&task.id))
        .collect();
    file.writer
        .write(&ordered)
        .map_err(|e| format_error(key, e))?;
    for task in tasks {
        file.tasks.push((task.id, task.inserted_at));
        *file.statuses.entry(task.status.clone()).or_default() += 1;
    }
    Ok(())
}

/// A file begun by an earlier run (`writing`): written again under its key, with the tasks of
/// its day that still wait (up to one file), the same rows in the same order when nothing else
/// changed, so the same bytes. None left: its object and its row go.
async fn rewrite_begun(
    pool: &PgPool,
    storage: &Storage,
    rule: &Rule,
    limits: ArchiveLimits,
    tenant: &ArchivingTenant,
    begun: &archives::Unfinished,
    archived: &mut Archived,
) -> Result<(), ArchiveError> {
    let start = begun
        .first_day
        .and_hms_opt(0, 0, 0)
        .expect("midnight")
        .and_utc();
    let end = start + chrono::Duration::days(1);
    let mut conn = pool.acquire().await?;
    let mut file = OpenFile::new(begun.first_day, &begun.object_key)?;
    let mut cursor = Some((start - chrono::Duration::microseconds(1), Uuid::max()));
    while file.writer.bytes_so_far() < limits.max_file_bytes {
        let chunk =
            archives::pending_before(&mut conn, rule, tenant.id, cursor, Some(end), limits.chunk)
                .await?;
        let Some(last) = chunk.last() else { break };
        cursor = Some((last.inserted_at, last.id));
        add(&mut conn, &mut file, &chunk, &begun.object_key).await?;
    }
    drop(conn);
    if file.tasks.is_empty() {
        storage.delete(&begun.object_key).await?;
        archives::forget(pool, begun.id).await?;
        return Ok(());
    }
    write_out(
        pool,
        storage,
        tenant,
        begun.id,
        begun.object_key.clone(),
        file,
        archived,
    )
    .await
}

/// Steps 1 to 4 of the module's list for one file.
async fn finish(
    pool: &PgPool,
    storage: &Storage,
    run_id: Uuid,
    tenant: &ArchivingTenant,
    file: OpenFile,
    part: u32,
    archived: &mut Archived,
) -> Result<(), ArchiveError> {
    let key = archive_key(tenant.id, file.day, run_id, part);
    let id = archives::begin(
        pool,
        &key,
        tenant.id,
        file.day,
        file.day,
        run_id,
        part as i32,
        SCHEMA_VERSION,
    )
    .await?;
    write_out(pool, storage, tenant, id, key, file, archived).await
}

/// Steps 2 to 4 for the begun file `id` at `key`.
async fn write_out(
    pool: &PgPool,
    storage: &Storage,
    tenant: &ArchivingTenant,
    id: i64,
    key: String,
    file: OpenFile,
    archived: &mut Archived,
) -> Result<(), ArchiveError> {
    let bytes = file.writer.finish().map_err(|e| format_error(&key, e))?;
    let sha256 = hex(&Sha256::digest(&bytes));
    let size = bytes.len();
    storage.put(&key, bytes::Bytes::from(bytes)).await?;
    let stored = storage
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
    let written = archives::Written {
        tasks: file.tasks,
        events: file.events,
        payloads: file.payloads,
        logs: file.logs,
        statuses: serde_json::to_value(&file.statuses).expect("counts are JSON"),
        bytes: size as i64,
        sha256,
    };
    let mut tx = pool.begin().await?;
    archives::written(&mut tx, id, &written, tenant.retention).await?;
    tx.commit().await?;
    archived.files += 1;
    archived.tasks += written.tasks.len() as u64;
    archived.bytes += size as u64;
    archived.keys.push(key);
    Ok(())
}

fn hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}
