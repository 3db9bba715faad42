//! How big each batch is: sizes that steer toward a target batch duration, and shrink when a
//! batch hits its statement or lock timeout.

use std::time::Duration;

use repository::batch;

/// Steers a batch size (rows, or pages for block walks) so that a batch takes about `target`.
///
/// After each batch the cost of one unit is updated (a rise is averaged in, so one slow batch
/// behind a checkpoint does not halve the next; a fall is taken at once) and the next size is
/// `target / cost`, moving at most a factor of two per batch, within `min..=max`. A batch that times out is rolled back and the size
/// halves at once; [`Settled::GaveUp`] comes after [`GIVE_UP_AFTER`] timeouts in a row at `min`.
#[derive(Debug, Clone)]
pub struct BatchSizer {
    size: u32,
    min: u32,
    max: u32,
    target: Duration,
    /// Seconds per unit, averaged over recent batches.
    unit_cost: Option<f64>,
    timeouts_at_min: u32,
    /// Batches run again in a row because they were rolled back whole (a deadlock, a change of
    /// the rules), not for their size.
    again_in_a_row: u32,
}

/// Timeouts in a row at the smallest size before a batch is given up.
pub const GIVE_UP_AFTER: u32 = 3;

/// Batches rolled back in a row by a deadlock or a change of the rules before one is given up
/// (the pauses between them add up to about 10 s).
pub const AGAIN_AT_MOST: u32 = 25;

/// What became of one batch.
#[derive(Debug)]
pub enum Settled<T, E = sqlx::Error> {
    /// Committed.
    Done(T),
    /// Timed out and rolled back: run it again, smaller.
    Retry(E),
    /// Rolled back whole by a deadlock with another session or a change of the rules committed
    /// meanwhile (see `repository::batch::is_retryable`): run it again as it is, after
    /// [`BatchSizer::again_pause`].
    Again(E),
    /// Failed for another reason, or timed out [`GIVE_UP_AFTER`] times at the smallest size.
    GaveUp(E),
}

impl BatchSizer {
    pub fn new(initial: u32, min: u32, max: u32, target: Duration) -> Self {
        let min = min.max(1);
        let max = max.max(min);
        BatchSizer {
            size: initial.clamp(min, max),
            min,
            max,
            target,
            unit_cost: None,
            timeouts_at_min: 0,
            again_in_a_row: 0,
        }
    }

    /// The size of the next batch.
    pub fn size(&self) -> u32 {
        self.size
    }

    /// Records a batch's result and how long it took (begin to commit).
    pub fn settle<T>(&mut self, elapsed: Duration, result: Result<T, sqlx::Error>) -> Settled<T> {
        let units = self.size;
        self.settle_by(
            elapsed,
            units,
            result,
            batch::is_timeout,
            batch::is_retryable,
        )
    }

    /// [`BatchSizer::settle`] for a batch that did `units`, fewer than its size when it met the
    /// end of what it walks (a table's last pages): the cost is learnt from what was done, so a
    /// run of such short batches does not take the size for cheap and grow it past the target.
    pub fn settle_units<T>(
        &mut self,
        elapsed: Duration,
        units: u32,
        result: Result<T, sqlx::Error>,
    ) -> Settled<T> {
        self.settle_by(
            elapsed,
            units,
            result,
            batch::is_timeout,
            batch::is_retryable,
        )
    }

    /// How long to wait before running a batch again after [`Settled::Again`]: a little longer
    /// each time in a row (20 ms, 40 ms, ... at most 500 ms), so that a change of the rules being
    /// committed has the time to.
    pub fn again_pause(&self) -> Duration {
        Duration::from_millis((20 * u64::from(self.again_in_a_row)).min(500))
    }

    fn settle_by<T, E>(
        &mut self,
        elapsed: Duration,
        units: u32,
        result: Result<T, E>,
        is_timeout: fn(&E) -> bool,
        is_retryable: fn(&E) -> bool,
    ) -> Settled<T, E> {
        if !matches!(&result, Err(error) if is_retryable(error)) {
            self.again_in_a_row = 0;
        }
        match result {
            Ok(value) => {
                self.succeeded(elapsed, units);
                Settled::Done(value)
            }
            Err(error) if is_retryable(&error) => {
                self.again_in_a_row += 1;
                if self.again_in_a_row > AGAIN_AT_MOST {
                    self.again_in_a_row = 0;
                    return Settled::GaveUp(error);
                }
                Settled::Again(error)
            }
            Err(error) if is_timeout(&error) => {
                if self.size == self.min {
                    self.timeouts_at_min += 1;
                    if self.timeouts_at_min >= GIVE_UP_AFTER {
                        self.timeouts_at_min = 0;
                        return Settled::GaveUp(error);
                    }
                }
                self.size = (self.size / 2).max(self.min);
                // What was learnt about the cost no longer holds (a lock, a bad plan).
                self.unit_cost = None;
                Settled::Retry(error)
            }
            Err(error) => Settled::GaveUp(error),
        }
    }

    fn succeeded(&mut self, elapsed: Duration, units: u32) {
        self.timeouts_at_min = 0;
        let cost = elapsed.as_secs_f64() / f64::from(units.clamp(1, self.size.max(1)));
        let average = match self.unit_cost {
            Some(previous) if cost > previous => 0.7 * previous + 0.3 * cost,
            _ => cost,
        };
        self.unit_cost = Some(average);
        let wanted = if average > 0.0 {
            self.target.as_secs_f64() / average
        } else {
            f64::from(self.max)
        };
        let current = f64::from(self.size);
        let next = wanted
            .clamp(current / 2.0, current * 2.0)
            .clamp(f64::from(self.min), f64::from(self.max));
        self.size = next.round() as u32;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_rolled_back_whole_runs_again_at_its_size_until_it_has_too_often() {
        let mut sizer = BatchSizer::new(100, 1, 1_000, TARGET);
        let again = |sizer: &mut BatchSizer| {
            sizer.settle_by::<(), ()>(ms(1), 100, Err(()), |_| false, |_| true)
        };
        for n in 1..=AGAIN_AT_MOST {
            assert!(matches!(again(&mut sizer), Settled::Again(())));
            assert_eq!(sizer.size(), 100, "the size is not the cause");
            assert_eq!(
                sizer.again_pause(),
                Duration::from_millis((20 * u64::from(n)).min(500))
            );
        }
        assert!(matches!(again(&mut sizer), Settled::GaveUp(())));
        // A success in between starts the count again.
        assert!(matches!(again(&mut sizer), Settled::Again(())));
        sizer.settle(ms(1), Ok(()));
        assert_eq!(sizer.again_pause(), Duration::ZERO);
    }

    const TARGET: Duration = Duration::from_millis(20);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// A batch's error: `true` when it was a timeout.
    fn settle(sizer: &mut BatchSizer, timed_out: bool) -> Settled<(), bool> {
        sizer.settle_by(
            ms(1),
            sizer.size(),
            Err(timed_out),
            |timed_out| *timed_out,
            |_| false,
        )
    }

    #[test]
    fn grows_at_most_twofold_toward_the_target() {
        let mut sizer = BatchSizer::new(100, 1, 10_000, TARGET);
        // 100 units in 1 ms: the target would allow 2,000; the size doubles.
        assert!(matches!(sizer.settle(ms(1), Ok(())), Settled::Done(())));
        assert_eq!(sizer.size(), 200);
        sizer.settle(ms(2), Ok(()));
        assert_eq!(sizer.size(), 400);
    }

    #[test]
    fn settles_at_the_size_that_meets_the_target() {
        let mut sizer = BatchSizer::new(1_000, 1, 10_000, TARGET);
        // 10 µs a unit, every time: 2,000 units make 20 ms.
        for _ in 0..20 {
            let elapsed = Duration::from_micros(10 * u64::from(sizer.size()));
            sizer.settle(elapsed, Ok(()));
        }
        assert_eq!(sizer.size(), 2_000);
    }

    #[test]
    fn one_slow_batch_shrinks_less_than_its_own_cost_says() {
        let mut sizer = BatchSizer::new(1_000, 1, 10_000, TARGET);
        sizer.settle(ms(20), Ok(()));
        assert_eq!(sizer.size(), 1_000);
        // Ten times slower once: the average cost rises 3.7x, not 10x.
        sizer.settle(ms(200), Ok(()));
        assert_eq!(sizer.size(), 500);
        let after = sizer.size();
        sizer.settle(Duration::from_micros(20 * u64::from(after)), Ok(()));
        assert!(sizer.size() > after, "{}", sizer.size());
    }

    #[test]
    fn batches_cut_short_by_the_end_of_a_table_are_costed_by_what_they_did() {
        // Tables of 100 units at 1 ms a unit: every batch stops at 100 whatever its size.
        let mut sizer = BatchSizer::new(1_000, 1, 10_000, TARGET);
        for _ in 0..10 {
            let units = sizer.size().min(100);
            sizer.settle_units(ms(u64::from(units)), units, Ok(()));
        }
        assert_eq!(sizer.size(), 20, "20 units make the 20 ms target");
    }

    #[test]
    fn stays_within_its_bounds() {
        let mut sizer = BatchSizer::new(50, 10, 64, TARGET);
        for _ in 0..5 {
            sizer.settle(Duration::ZERO, Ok(()));
        }
        assert_eq!(sizer.size(), 64);
        for _ in 0..10 {
            sizer.settle(Duration::from_secs(5), Ok(()));
        }
        assert_eq!(sizer.size(), 10);
    }

    #[test]
    fn timeouts_halve_the_size_and_give_up_after_three_at_the_smallest() {
        let mut sizer = BatchSizer::new(8, 1, 64, TARGET);
        for expected in [4, 2, 1, 1, 1] {
            assert!(matches!(settle(&mut sizer, true), Settled::Retry(true)));
            assert_eq!(sizer.size(), expected);
        }
        assert!(matches!(settle(&mut sizer, true), Settled::GaveUp(true)));
        // The count starts again: the next range gets its own three tries.
        assert!(matches!(settle(&mut sizer, true), Settled::Retry(true)));
    }

    #[test]
    fn a_success_resets_the_timeouts_at_the_smallest_size() {
        let mut sizer = BatchSizer::new(1, 1, 64, TARGET);
        settle(&mut sizer, true);
        settle(&mut sizer, true);
        sizer.settle(ms(100), Ok(()));
        settle(&mut sizer, true);
        assert!(matches!(settle(&mut sizer, true), Settled::Retry(true)));
    }

    #[test]
    fn other_errors_give_up_at_once() {
        let mut sizer = BatchSizer::new(64, 1, 64, TARGET);
        assert!(matches!(settle(&mut sizer, false), Settled::GaveUp(false)));
        assert_eq!(sizer.size(), 64);
    }
}
