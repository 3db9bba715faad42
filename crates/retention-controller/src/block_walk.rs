//! Walking a table's heap once, in block-range batches (see [`repository::heap`]), each in its
//! own short transaction, sized toward the run's batch duration and paced like every batch.

use std::future::Future;
use std::sync::Mutex;

use repository::heap::BlockRange;
use tokio::time::Instant;

use crate::batching::{BatchSizer, Settled};
use crate::task::{RunContext, RunReport, TaskError};

/// Deletes through pages `0..pages` in ranges, calling `delete` for each; `delete` runs one
/// transaction and returns the rows it deleted by rule.
///
/// At full speed, [`RunContext::block_workers`] workers (`retention.parallelism`) each take the
/// next range not yet taken, so that their statements never touch the same pages: one DELETE
/// uses one core, and independent ranges can use the others.
///
/// A range that times out is retried smaller; one that still times out at a single page (a row
/// lock held for longer than `lock_timeout`, again and again) is left for the next run and
/// counted as `pages skipped`. Stops between batches when the run is interrupted, and every
/// worker stops after its batch in flight when one fails. The pages passed are counted as
/// `heap pages walked`.
pub async fn walk_blocks<F, Fut>(
    ctx: &RunContext,
    report: &mut RunReport,
    pages: u32,
    delete: F,
) -> Result<(), TaskError>
where
    F: Fn(BlockRange) -> Fut,
    Fut: Future<Output = Result<Vec<(&'static str, u64)>, sqlx::Error>> + Send,
{
    walk_blocks_sized(ctx, report, pages, &mut ctx.block_sizer(), delete).await
}

/// [`walk_blocks`] with the caller's sizer: walks of several tables alike (the ranges of run
/// history) start each from the size the last one reached. The workers share it.
pub async fn walk_blocks_sized<F, Fut>(
    ctx: &RunContext,
    report: &mut RunReport,
    pages: u32,
    sizer: &mut BatchSizer,
    delete: F,
) -> Result<(), TaskError>
where
    F: Fn(BlockRange) -> Fut,
    Fut: Future<Output = Result<Vec<(&'static str, u64)>, sqlx::Error>> + Send,
{
    let walk = Mutex::new(Walk {
        next: 0,
        walked: 0,
        pages,
        deleted_before: report.deleted,
        failed: false,
        sizer,
        report,
    });
    let workers = (0..ctx.block_workers()).map(|_| worker(ctx, &walk, &delete));
    let outcomes = futures::future::join_all(workers).await;
    outcomes.into_iter().collect()
}

/// What the workers of one walk share.
struct Walk<'a> {
    /// The first page no worker has taken yet.
    next: u32,
    /// Pages done (deleted through, or skipped).
    walked: u32,
    pages: u32,
    deleted_before: u64,
    /// A worker failed: the others stop after their batch in flight.
    failed: bool,
    sizer: &'a mut BatchSizer,
    report: &'a mut RunReport,
}

impl Walk<'_> {
    /// The next batch's pages: the rest of `taken` (a range this worker took and has not finished),
    /// else a new range from `next`, cut to the sizer's size; `None` when nothing is left or the
    /// walk must stop.
    fn next_batch(
        &mut self,
        ctx: &RunContext,
        taken: &mut Option<BlockRange>,
    ) -> Option<BlockRange> {
        if self.failed {
            return None;
        }
        if let Some(stop) = ctx.interrupted() {
            self.report.completion = stop;
            return None;
        }
        let size = self.sizer.size();
        let rest = match taken.take() {
            Some(rest) => rest,
            None if self.next < self.pages => {
                let range = BlockRange {
                    start: self.next,
                    end: self.next.saturating_add(size).min(self.pages),
                };
                self.next = range.end;
                range
            }
            None => return None,
        };
        let batch = BlockRange {
            start: rest.start,
            end: rest.start.saturating_add(size).min(rest.end),
        };
        if batch.end < rest.end {
            *taken = Some(BlockRange {
                start: batch.end,
                end: rest.end,
            });
        }
        Some(batch)
    }
}

/// One worker: batches until the walk is done, stopped or failed.
async fn worker<F, Fut>(
    ctx: &RunContext,
    walk: &Mutex<Walk<'_>>,
    delete: &F,
) -> Result<(), TaskError>
where
    F: Fn(BlockRange) -> Fut,
    Fut: Future<Output = Result<Vec<(&'static str, u64)>, sqlx::Error>> + Send,
{
    let mut taken = None;
    loop {
        let (range, shared) = {
            let mut walk = walk.lock().unwrap();
            let Some(range) = walk.next_batch(ctx, &mut taken) else {
                return Ok(());
            };
            // Pages left to take: the other workers are busy too.
            (range, walk.next < walk.pages)
        };
        let started = Instant::now();
        let result = delete(range).await;
        let elapsed = started.elapsed();
        let (more, again) = {
            let mut walk = walk.lock().unwrap();
            let walk = &mut *walk;
            let settled = match result {
                // The walk's tail, where some workers are done, runs faster than its body: learning
                // from it would size the next walk's first batches (all workers busy) 2-3x over.
                Ok(parts) if !shared => Settled::Done(parts),
                result => walk.sizer.settle_units(elapsed, range.pages(), result),
            };
            match settled {
                Settled::Done(parts) => {
                    walk.report.record_batch_parts(&parts);
                    walk.report
                        .count("heap pages walked", u64::from(range.pages()));
                    walk.walked += range.pages();
                    let left = estimate_left(
                        walk.report.deleted - walk.deleted_before,
                        walk.walked,
                        walk.pages,
                    );
                    tracing::debug!(
                        from = range.start,
                        to = range.end,
                        elapsed_ms = elapsed.as_millis() as u64,
                        "block batch committed"
                    );
                    ctx.batch_recorded(elapsed, walk.report, Some(left));
                    (taken.is_some() || walk.next < walk.pages, None)
                }
                Settled::Retry(error) => {
                    tracing::warn!(from = range.start, to = range.end, %error, next_pages = walk.sizer.size(), "batch timed out; retrying smaller");
                    taken = Some(BlockRange {
                        start: range.start,
                        end: taken.map_or(range.end, |rest| rest.end),
                    });
                    continue;
                }
                Settled::Again(error) => {
                    tracing::debug!(from = range.start, to = range.end, %error, "batch rolled back (a deadlock or a change of the rules); running it again");
                    walk.report.count("batches run again", 1);
                    taken = Some(BlockRange {
                        start: range.start,
                        end: taken.map_or(range.end, |rest| rest.end),
                    });
                    (true, Some(walk.sizer.again_pause()))
                }
                Settled::GaveUp(error) if repository::batch::is_timeout(&error) => {
                    tracing::warn!(page = range.start, %error, "page skipped: it kept timing out; the next run retries it");
                    walk.report.count("pages skipped", u64::from(range.pages()));
                    walk.report
                        .count("heap pages walked", u64::from(range.pages()));
                    walk.walked += range.pages();
                    continue;
                }
                Settled::GaveUp(error) => {
                    walk.failed = true;
                    return Err(error.into());
                }
            }
        };
        if let Some(pause) = again {
            tokio::time::sleep(pause).await;
            continue;
        }
        // No pause and no wait for the standbys after a worker's last batch: nothing follows
        // that they would protect, and the run would end that much later.
        if more {
            ctx.pause_after(elapsed).await;
        }
    }
}

/// Rows still due on the pages not yet walked, assuming they hold as many as the pages walked.
fn estimate_left(deleted: u64, walked: u32, pages: u32) -> u64 {
    if walked == 0 {
        return 0;
    }
    (deleted as f64 * f64::from(pages - walked) / f64::from(walked)).round() as u64
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use tokio_util::sync::CancellationToken;
    use uuid::Uuid;

    use super::*;
    use crate::RunOptions;

    fn context(parallelism: u32, pause_ratio: f64) -> RunContext {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .connect_lazy("postgres://nobody@localhost/none")
            .unwrap();
        let options = RunOptions {
            parallelism,
            pause_ratio,
            ..Default::default()
        };
        RunContext::new(
            pool,
            Uuid::nil(),
            CancellationToken::new(),
            Duration::from_secs(60),
            options,
        )
    }

    /// Walks 1,000 pages in batches of 7 with `delete` taking 1 ms a batch (one row deleted a
    /// page); returns the ranges deleted, in the order they started, and the most in flight at once.
    async fn walk(
        ctx: &RunContext,
        fail_at: Option<u32>,
    ) -> (Result<(), TaskError>, Vec<BlockRange>, usize, RunReport) {
        let (ranges, in_flight, most) = (
            Mutex::new(Vec::new()),
            AtomicUsize::new(0),
            AtomicUsize::new(0),
        );
        let mut report = RunReport::default();
        let mut sizer = BatchSizer::new(7, 7, 7, Duration::from_millis(50));
        let result = walk_blocks_sized(ctx, &mut report, 1_000, &mut sizer, |range| {
            ranges.lock().unwrap().push(range);
            let (in_flight, most) = (&in_flight, &most);
            async move {
                most.fetch_max(
                    in_flight.fetch_add(1, Ordering::SeqCst) + 1,
                    Ordering::SeqCst,
                );
                tokio::time::sleep(Duration::from_millis(1)).await;
                in_flight.fetch_sub(1, Ordering::SeqCst);
                if fail_at.is_some_and(|page| range.start <= page && page < range.end) {
                    return Err(sqlx::Error::RowNotFound);
                }
                Ok(vec![("rule", u64::from(range.pages()))])
            }
        })
        .await;
        (
            result,
            ranges.into_inner().unwrap(),
            most.into_inner(),
            report,
        )
    }

    /// Every page exactly once: sorted, the ranges tile `0..pages` with no gap and no overlap.
    fn assert_tiles(ranges: &[BlockRange], pages: u32) {
        let mut sorted = ranges.to_vec();
        sorted.sort_by_key(|r| r.start);
        let mut next = 0;
        for range in &sorted {
            assert_eq!(range.start, next, "{sorted:?}");
            assert!(range.end > range.start);
            next = range.end;
        }
        assert_eq!(next, pages);
    }

    #[tokio::test]
    async fn workers_share_the_pages_each_once_and_run_at_once() {
        let ctx = context(2, 0.0);
        let (result, ranges, most, report) = walk(&ctx, None).await;
        result.unwrap();
        assert_tiles(&ranges, 1_000);
        assert_eq!(most, 2, "two workers at full speed");
        assert_eq!(report.deleted, 1_000);
        assert_eq!(report.batches, ranges.len() as u64);
        assert_eq!(report.counters, vec![("heap pages walked", 1_000)]);
    }

    #[tokio::test]
    async fn a_paced_walk_uses_one_connection() {
        let ctx = context(4, 0.01);
        let (result, ranges, most, report) = walk(&ctx, None).await;
        result.unwrap();
        assert_tiles(&ranges, 1_000);
        assert_eq!(most, 1);
        assert_eq!(report.deleted, 1_000);
        assert_eq!(context(4, 0.0).block_workers(), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn a_walk_ends_with_its_last_batch_not_a_pause_after_it() {
        // Paced at 100 pauses to 1 of work: 143 batches of 1 ms, 142 pauses of 100 ms.
        let ctx = context(1, 100.0);
        let started = tokio::time::Instant::now();
        let (result, ranges, _, _) = walk(&ctx, None).await;
        result.unwrap();
        assert_eq!(ranges.len(), 143);
        assert_eq!(started.elapsed(), Duration::from_millis(143 + 142 * 100));
    }

    #[tokio::test]
    async fn a_failing_batch_stops_every_worker_after_its_batch_in_flight() {
        let ctx = context(3, 0.0);
        let (result, ranges, _, report) = walk(&ctx, Some(500)).await;
        assert!(
            matches!(result, Err(TaskError::Database(sqlx::Error::RowNotFound))),
            "{result:?}"
        );
        // Nothing started after the failure but the other two workers' batches in flight.
        let failed = ranges
            .iter()
            .position(|r| r.start <= 500 && 500 < r.end)
            .unwrap();
        assert!(
            ranges.len() <= failed + 3,
            "{} batches after the failing one",
            ranges.len() - failed - 1
        );
        assert!(ranges.iter().all(|r| r.end <= 500 + 3 * 7), "{ranges:?}");
        assert_eq!(
            report.deleted,
            u64::from(ranges.iter().map(|r| r.pages()).sum::<u32>()) - 7
        );
    }

    #[tokio::test]
    async fn an_interrupted_walk_starts_no_batch() {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .connect_lazy("postgres://nobody@localhost/none")
            .unwrap();
        let cancel = CancellationToken::new();
        cancel.cancel();
        let ctx = RunContext::new(
            pool,
            Uuid::nil(),
            cancel,
            Duration::from_secs(60),
            RunOptions::default(),
        );
        let (result, ranges, _, report) = walk(&ctx, None).await;
        result.unwrap();
        assert!(ranges.is_empty());
        assert_eq!(report.completion, crate::Completion::Cancelled);
    }

    #[test]
    fn what_is_left_is_extrapolated_from_the_pages_walked() {
        assert_eq!(super::estimate_left(1_000, 25, 100), 3_000);
        assert_eq!(super::estimate_left(1_000, 100, 100), 0);
        assert_eq!(super::estimate_left(0, 0, 100), 0);
    }
}
