//! `blobs`: deletes the stored objects of payload rows that are gone, and the files of archives
//! that expired, exactly once and only after the rows' delete committed; and, as a backstop,
//! objects under the engine's prefix that no row and no outbox entry names.
//!
//! The intent is in the outbox (`object_deletions`), written by trigger in the transaction that
//! deleted the payload row ([`repository::outbox`]). A batch reads entries, deletes their objects
//! with no transaction open, and removes only the entries whose deletion the store confirmed ("not
//! found" counts as deleted); an entry that failed is tried again after a backoff that doubles up
//! to [`MAX_BACKOFF`]. A crash anywhere leaves the entry for the next run: deleting an object
//! twice is harmless, forgetting one is not.
//!
//! The sweep, every `storage.sweep_interval`, lists the store under `payloads/` and `archive/` and
//! deletes objects older than `storage.orphan_grace` that no payload row, archive (manifest row)
//! or outbox entry names (an object put by a writer that crashed before inserting its row). Its first run only counts,
//! unless `storage.sweep_dry_run = false`.

use std::sync::Arc;
use std::time::Duration;

use futures::TryStreamExt;
use repository::{outbox, watermarks, PgPool};
use tokio::time::Instant;

use crate::schedule::Schedule;
pub use crate::settings::BlobsSettings;
use crate::storage::{Storage, ARCHIVE_PREFIX, PAYLOADS_PREFIX};
use crate::task::{DryRunReport, MaintenanceTask, RunContext, RunReport, TaskError};

pub const NAME: &str = "blobs";
/// When the last sweep started (Unix seconds), in `retention_watermarks`.
const SWEPT_AT: &str = "blobs.swept-at";
/// Sweeps done so far (the first only counts unless configured otherwise).
const SWEEPS: &str = "blobs.sweeps";
/// Retries of a failed object delete wait twice as long each time, up to this.
pub const MAX_BACKOFF: Duration = Duration::from_secs(3600);

pub struct BlobsTask {
    settings: BlobsSettings,
    storage: Arc<Storage>,
}

impl BlobsTask {
    pub fn new(settings: BlobsSettings, storage: Arc<Storage>) -> Self {
        BlobsTask { settings, storage }
    }

    /// The orphan sweep's grace and dry-run choice (`storage.orphan_grace`, `storage.sweep_dry_run`).
    pub fn with_sweep(self, orphan_grace: Duration, sweep_dry_run: Option<bool>) -> Self {
        BlobsTask {
            settings: BlobsSettings {
                orphan_grace,
                sweep_dry_run,
                ..self.settings
            },
            ..self
        }
    }

    /// The backoff after the `attempts`-th failure (1: the first).
    pub fn backoff(&self, attempts: i32) -> Duration {
        let doublings = attempts.clamp(1, 17) as u32 - 1;
        self.settings
            .first_backoff
            .saturating_mul(1u32 << doublings)
            .min(MAX_BACKOFF.max(self.settings.first_backoff))
    }

    /// One batch of the outbox: returns the entries it took (0: nothing was due).
    async fn drain_batch(
        &self,
        ctx: &RunContext,
        report: &mut RunReport,
    ) -> Result<usize, TaskError> {
        let pool = &ctx.pool;
        let now = ctx.now();
        let entries = outbox::due(pool, now, i64::from(self.settings.batch_size)).await?;
        if entries.is_empty() {
            return Ok(0);
        }
        if let Err(error) = self.storage.check_available() {
            return Err(TaskError::Incomplete(format!(
                "the object store is not there; {} objects wait in the outbox: {error}",
                entries.len()
            )));
        }
        let unreferenced = outbox::unreferenced(pool, &entries).await?;
        let (free, in_use): (Vec<_>, Vec<_>) = entries
            .iter()
            .partition(|entry| unreferenced.binary_search(&entry.id).is_ok());
        if !in_use.is_empty() {
            // A payload row points at the key again (a writer reused it): its object stays.
            let ids: Vec<i64> = in_use.iter().map(|e| e.id).collect();
            tracing::warn!(keys = ?in_use.iter().map(|e| &e.object_key).collect::<Vec<_>>(), "outbox entries whose key a payload row names again: their objects are kept");
            outbox::remove(pool, &ids).await?;
            report.count("objects kept (key in use)", ids.len() as u64);
        }
        if free.is_empty() {
            return Ok(entries.len());
        }
        // No transaction is open while the store works.
        let started = Instant::now();
        let keys: Vec<String> = free.iter().map(|e| e.object_key.clone()).collect();
        let outcomes = self.storage.delete_many(keys).await;
        let mut done = Vec::new();
        let mut failed = 0u64;
        let mut last_error = None;
        // Matched by key, not by position: the store answers in an order of its own.
        let by_key: std::collections::HashMap<String, Result<(), crate::storage::StorageError>> =
            outcomes.into_iter().collect();
        for entry in &free {
            let outcome = by_key.get(&entry.object_key).cloned().unwrap_or_else(|| {
                Err(crate::storage::StorageError::Failed {
                    operation: "delete",
                    key: entry.object_key.clone(),
                    message: "the store gave no answer for this key".into(),
                })
            });
            match outcome {
                Ok(_) => done.push(entry.id),
                Err(error) => {
                    failed += 1;
                    let message = error.to_string();
                    outbox::put_off(
                        pool,
                        entry.id,
                        now,
                        self.backoff(entry.attempts + 1),
                        &message,
                    )
                    .await?;
                    last_error = Some(message);
                }
            }
        }
        outbox::remove(pool, &done).await?;
        let bytes: i64 = free
            .iter()
            .filter(|e| done.contains(&e.id))
            .map(|e| e.size_bytes)
            .sum();
        crate::telemetry::objects_deleted("outbox", done.len() as u64, failed);
        report.record_batch("objects", done.len() as u64);
        report.count("object bytes deleted", bytes.max(0) as u64);
        report.count("object deletes failed", failed);
        ctx.batch_done(started.elapsed(), report, None).await;
        if let Some(error) = last_error {
            if done.is_empty() {
                // The store refused the whole batch: down, or refusing. The entries wait their
                // backoff; the run ends here rather than hammer it.
                return Err(TaskError::Incomplete(format!(
                    "the object store refused every delete of a batch ({failed} objects); they are tried again after a backoff: {error}"
                )));
            }
            tracing::warn!(failed, %error, "some object deletes failed; tried again after a backoff");
        }
        Ok(entries.len())
    }

    /// Whether this run's sweep deletes (or only counts).
    async fn sweep_deletes(&self, pool: &PgPool) -> Result<bool, TaskError> {
        Ok(match self.settings.sweep_dry_run {
            Some(dry) => !dry,
            None => watermarks::get(pool, SWEEPS).await? > 0,
        })
    }

    /// The backstop: objects under `payloads/` and `archive/` older than the grace that no
    /// payload row, archive and outbox entry names.
    async fn sweep(
        &self,
        ctx: &RunContext,
        report: &mut RunReport,
        dry: bool,
    ) -> Result<bool, TaskError> {
        let started = ctx.now();
        let cutoff = started
            - chrono::Duration::from_std(self.settings.orphan_grace)
                .unwrap_or(chrono::Duration::MAX);
        if let Err(error) = self.storage.check_available() {
            return Err(TaskError::Incomplete(format!(
                "the object store is not there; no sweep: {error}"
            )));
        }
        // The listing is streamed and judged a batch at a time: memory and round trips stay
        // bounded by the batch, whatever the bucket holds.
        let batch = self.settings.batch_size.max(1) as usize;
        let (mut listed, mut found) = (0u64, 0u64);
        for prefix in [PAYLOADS_PREFIX, ARCHIVE_PREFIX] {
            let mut objects = self.storage.list(prefix);
            let mut old = Vec::with_capacity(batch);
            loop {
                let next = objects.try_next().await.map_err(|error| {
                    TaskError::Incomplete(format!("listing the object store: {error}"))
                })?;
                let end = next.is_none();
                if let Some(object) = next {
                    listed += 1;
                    if object.last_modified < cutoff {
                        old.push(object.key);
                    }
                }
                if old.len() >= batch || (end && !old.is_empty()) {
                    found += self
                        .sweep_batch(ctx, report, std::mem::take(&mut old), dry)
                        .await?;
                }
                if end {
                    break;
                }
                if ctx.interrupted().is_some() {
                    return Ok(false);
                }
            }
        }
        report.count("objects listed", listed);
        report.count("orphan objects found", found);
        crate::telemetry::orphan_objects(found as usize);
        if dry && found > 0 {
            tracing::warn!(orphans = found, "the sweep found objects no row names; this first sweep only counts them (storage.sweep_dry_run)");
        }
        Ok(true)
    }

    /// One batch of the sweep: of `keys` (objects older than the grace), those no row, archive
    /// or outbox entry names, checked right before they are deleted (a writer may have inserted
    /// a row since it put its object); counted only, in a dry run. How many were orphans.
    async fn sweep_batch(
        &self,
        ctx: &RunContext,
        report: &mut RunReport,
        keys: Vec<String>,
        dry: bool,
    ) -> Result<u64, TaskError> {
        let orphans = outbox::keys_unknown(&ctx.pool, &keys).await?;
        let found = orphans.len() as u64;
        if dry || orphans.is_empty() {
            return Ok(found);
        }
        let started = Instant::now();
        let outcomes = self.storage.delete_many(orphans).await;
        let deleted = outcomes.iter().filter(|(_, r)| r.is_ok()).count();
        crate::telemetry::objects_deleted(
            "sweep",
            deleted as u64,
            (outcomes.len() - deleted) as u64,
        );
        report.record_batch("orphan-objects", deleted as u64);
        ctx.batch_done(started.elapsed(), report, None).await;
        Ok(found)
    }
}

#[async_trait::async_trait]
impl MaintenanceTask for BlobsTask {
    fn name(&self) -> &'static str {
        NAME
    }

    fn schedule(&self) -> Schedule {
        Schedule {
            interval: self.settings.interval,
            max_run_time: self.settings.max_run_time,
        }
    }

    async fn run(&self, ctx: &RunContext) -> Result<RunReport, TaskError> {
        let result = self.drain_and_sweep(ctx).await;
        // The outbox's depth and age, whatever the run did (a store down shows here).
        if let Ok(depth) = outbox::depth(&ctx.pool).await {
            let age = depth
                .oldest_enqueued_at
                .map(|at| (ctx.now() - at).to_std().unwrap_or_default())
                .unwrap_or_default();
            crate::telemetry::outbox(depth.entries, age);
        }
        result
    }

    async fn dry_run(&self, pool: &PgPool) -> Result<DryRunReport, TaskError> {
        let depth = outbox::depth(pool).await?;
        let mut report = DryRunReport::default();
        report.add("objects", depth.entries.max(0) as u64);
        Ok(report)
    }

    async fn estimate_due(&self, pool: &PgPool) -> Result<Option<u64>, TaskError> {
        Ok(Some(outbox::depth(pool).await?.entries.max(0) as u64))
    }
}

impl BlobsTask {
    async fn drain_and_sweep(&self, ctx: &RunContext) -> Result<RunReport, TaskError> {
        let mut report = RunReport::default();
        loop {
            if let Some(stop) = ctx.interrupted() {
                report.completion = stop;
                return Ok(report);
            }
            if self.drain_batch(ctx, &mut report).await? == 0 {
                break;
            }
        }
        let now = ctx.now();
        let last = watermarks::get(&ctx.pool, SWEPT_AT).await?;
        if now.timestamp() - last >= self.settings.sweep_interval.as_secs() as i64 {
            let deletes = self.sweep_deletes(&ctx.pool).await?;
            if self.sweep(ctx, &mut report, !deletes).await? {
                watermarks::set(&ctx.pool, SWEPT_AT, now.timestamp()).await?;
                let sweeps = watermarks::get(&ctx.pool, SWEEPS).await?;
                watermarks::set(&ctx.pool, SWEEPS, sweeps + 1).await?;
            }
        }
        Ok(report)
    }
}
