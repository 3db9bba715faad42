//! What to do with run history, decided from the facts and measured costs; the repository's
//! `history` modules carry it out. Pure functions, so every decision is tested without a database.
//!
//! * [`choose`]: remove a range's due rows by row deletes, or rewrite the range (copy what it
//!   keeps, drop the rest whole), whichever costs less by the costs measured on this database.
//! * [`merge_plan`]: which adjacent ranges to merge so the number of attached partitions stays
//!   bounded whatever is kept forever: ranges older than every finite retention ("cold") merge
//!   within a quarter of a month (days 1-7, 8-14, 15-21, 22-end), complete cold months merge into
//!   one, complete cold years into one.

use chrono::{DateTime, Datelike, Duration, NaiveDate, Utc};

/// Seconds per unit of the two ways to remove history, as measured (or the defaults below until
/// measured). A row delete costs per task deleted (with its events and queue items); a rewrite
/// costs per row read (every task of the range is read once) and per row kept (copied, indexed),
/// plus a fixed cost (tables, catalog, the lock).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Costs {
    pub row_delete_per_task: f64,
    pub rewrite_per_task_read: f64,
    pub rewrite_per_task_kept: f64,
    pub rewrite_fixed: f64,
}

impl Default for Costs {
    /// Measured with `bench history` on a 2-core machine (docs/benchmarks.md): row deletes of
    /// tasks with two events each ~15 µs a task; a rewrite reads ~1 µs a task and copies ~15 µs
    /// a kept task with its events; ~30 ms of tables and catalog changes.
    fn default() -> Self {
        Costs {
            row_delete_per_task: 15e-6,
            rewrite_per_task_read: 1e-6,
            rewrite_per_task_kept: 15e-6,
            rewrite_fixed: 0.03,
        }
    }
}

impl Costs {
    /// Seconds to row-delete `due` tasks.
    pub fn row_deletes(&self, due: f64) -> f64 {
        due * self.row_delete_per_task
    }

    /// Seconds to rewrite a range of `rows` tasks keeping `kept`.
    pub fn rewrite(&self, rows: f64, kept: f64) -> f64 {
        self.rewrite_fixed + rows * self.rewrite_per_task_read + kept * self.rewrite_per_task_kept
    }
}

/// How a range's due rows leave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removal {
    RowDeletes,
    /// Copy the kept rows into a new range, drop the old one whole.
    Rewrite,
}

/// A range with due rows, as the facts estimate it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Estimate {
    /// Tasks in the range.
    pub rows: f64,
    /// Of which due now.
    pub due: f64,
    /// Whether the range may be rewritten at all: a finite range whose facts are settled (not
    /// live: the rows of its own day are still arriving).
    pub rewritable: bool,
}

/// Row deletes or a rewrite, whichever is cheaper by `costs`. A range that keeps almost nothing
/// is rewritten (read once, nothing written but what it keeps); one that keeps almost everything
/// loses its few due rows one by one.
pub fn choose(estimate: Estimate, costs: &Costs) -> Removal {
    if !estimate.rewritable || estimate.due <= 0.0 {
        return Removal::RowDeletes;
    }
    let kept = (estimate.rows - estimate.due).max(0.0);
    if costs.rewrite(estimate.rows, kept) < costs.row_deletes(estimate.due) {
        Removal::Rewrite
    } else {
        Removal::RowDeletes
    }
}

/// A range as the merge plan sees it: `[lower, upper)`, and whether it may take part.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    pub lower: DateTime<Utc>,
    pub upper: DateTime<Utc>,
    /// An ordinary range (not the default or the future one) whose facts are settled.
    pub mergeable: bool,
}

/// Ranges that end at or before `cold_before` hold no row of any finite retention's window.
/// `cold_before` is the start of the day `longest` (the longest finite retention, rounded up to
/// whole days) plus one before `now`'s day: a day leaves every window one day after the longest.
pub fn cold_horizon(now: DateTime<Utc>, longest: Option<std::time::Duration>) -> DateTime<Utc> {
    let days = longest.map_or(0, |d| d.as_secs().div_ceil(86_400) as i64);
    let today = now.date_naive();
    day_start(today - Duration::days(days + 1))
}

fn day_start(day: NaiveDate) -> DateTime<Utc> {
    day.and_time(chrono::NaiveTime::MIN).and_utc()
}

/// The quarter of the month a day belongs to: its first day (the 1st, 8th, 15th or 22nd).
fn quarter_start(day: NaiveDate) -> NaiveDate {
    let first = match day.day() {
        1..=7 => 1,
        8..=14 => 8,
        15..=21 => 15,
        _ => 22,
    };
    day.with_day(first).expect("a day of the month")
}

fn next_quarter(start: NaiveDate) -> NaiveDate {
    match start.day() {
        1 => start.with_day(8).unwrap(),
        8 => start.with_day(15).unwrap(),
        15 => start.with_day(22).unwrap(),
        _ => next_month(start),
    }
}

fn month_start(day: NaiveDate) -> NaiveDate {
    day.with_day(1).expect("the first of the month")
}

fn next_month(day: NaiveDate) -> NaiveDate {
    let first = month_start(day);
    if first.month() == 12 {
        NaiveDate::from_ymd_opt(first.year() + 1, 1, 1).unwrap()
    } else {
        NaiveDate::from_ymd_opt(first.year(), first.month() + 1, 1).unwrap()
    }
}

/// The calendar buckets a range can merge into, narrowest first: its quarter of a month, its
/// month, its year (each as `[start, end)`), and whether a merge there must wait until the bucket
/// is complete (months and years merge once; a quarter takes cold days as they come).
fn buckets(lower: DateTime<Utc>) -> [(DateTime<Utc>, DateTime<Utc>, bool); 3] {
    let day = lower.date_naive();
    let quarter = quarter_start(day);
    let year = NaiveDate::from_ymd_opt(day.year(), 1, 1).unwrap();
    [
        (day_start(quarter), day_start(next_quarter(quarter)), false),
        (
            day_start(month_start(day)),
            day_start(next_month(day)),
            true,
        ),
        (
            day_start(year),
            day_start(NaiveDate::from_ymd_opt(day.year() + 1, 1, 1).unwrap()),
            true,
        ),
    ]
}

/// Groups of adjacent ranges (indexes into `spans`, which are in order and contiguous) to merge
/// now, each into one range. Only cold, mergeable ranges that lie within one bucket take part; a
/// year is merged once it is complete and cold, then a month, then runs within a quarter.
pub fn merge_plan(spans: &[Span], cold_before: DateTime<Utc>) -> Vec<Vec<usize>> {
    let cold = |s: &Span| s.mergeable && s.upper <= cold_before;
    let mut taken = vec![false; spans.len()];
    let mut plan = Vec::new();
    // Widest buckets first: a complete cold year (or month) merges in one copy.
    for level in [2usize, 1, 0] {
        let mut i = 0;
        while i < spans.len() {
            if taken[i] || !cold(&spans[i]) {
                i += 1;
                continue;
            }
            let (start, end, whole) = buckets(spans[i].lower)[level];
            if spans[i].lower < start || spans[i].upper > end {
                i += 1;
                continue;
            }
            let mut j = i;
            while j + 1 < spans.len()
                && !taken[j + 1]
                && cold(&spans[j + 1])
                && spans[j + 1].lower == spans[j].upper
                && spans[j + 1].upper <= end
            {
                j += 1;
            }
            let complete = spans[i].lower == start && spans[j].upper == end;
            if j > i && (!whole || complete) {
                plan.push((i..=j).collect::<Vec<_>>());
                for t in &mut taken[i..=j] {
                    *t = true;
                }
            }
            i = j + 1;
        }
    }
    plan.sort();
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn at(y: i32, m: u32, d: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, m, d, 0, 0, 0).unwrap()
    }

    fn days(from: DateTime<Utc>, n: i64) -> Vec<Span> {
        (0..n)
            .map(|k| Span {
                lower: from + Duration::days(k),
                upper: from + Duration::days(k + 1),
                mergeable: true,
            })
            .collect()
    }

    #[test]
    fn a_range_that_keeps_little_is_rewritten_and_one_that_keeps_much_loses_rows_one_by_one() {
        let costs = Costs::default();
        let range = |rows: f64, due: f64| Estimate {
            rows,
            due,
            rewritable: true,
        };
        assert_eq!(choose(range(100_000.0, 99_000.0), &costs), Removal::Rewrite);
        assert_eq!(choose(range(100_000.0, 100.0), &costs), Removal::RowDeletes);
        assert_eq!(choose(range(100_000.0, 0.0), &costs), Removal::RowDeletes);
        assert_eq!(
            choose(
                Estimate {
                    rewritable: false,
                    ..range(100_000.0, 100_000.0)
                },
                &costs
            ),
            Removal::RowDeletes
        );
        // A tiny range: the fixed cost of a rewrite outweighs a handful of deletes.
        assert_eq!(choose(range(10.0, 10.0), &costs), Removal::RowDeletes);
        // Where they break even: due * 15 µs = 30 ms + rows * 1 µs + kept * 15 µs.
        let even = |rows: f64| {
            (costs.rewrite_fixed
                + rows * (costs.rewrite_per_task_read + costs.rewrite_per_task_kept))
                / (costs.row_delete_per_task + costs.rewrite_per_task_kept)
        };
        assert_eq!(
            choose(range(200_000.0, even(200_000.0) + 10.0), &costs),
            Removal::Rewrite
        );
        assert_eq!(
            choose(range(200_000.0, even(200_000.0) - 10.0), &costs),
            Removal::RowDeletes
        );
    }

    #[test]
    fn the_cold_horizon_is_one_day_past_the_longest_window() {
        let now = Utc.with_ymd_and_hms(2026, 11, 29, 13, 0, 0).unwrap();
        assert_eq!(
            cold_horizon(now, Some(std::time::Duration::from_secs(14 * 86_400))),
            at(2026, 11, 14)
        );
        assert_eq!(
            cold_horizon(now, Some(std::time::Duration::from_secs(3600))),
            at(2026, 11, 27)
        );
        assert_eq!(cold_horizon(now, None), at(2026, 11, 28));
    }

    #[test]
    fn cold_days_merge_within_their_quarter_of_the_month() {
        let spans = days(at(2026, 11, 1), 20); // Nov 1 .. Nov 20
                                               // Cold up to Nov 12: quarter 1-7 whole, 8-11 so far.
        let plan = merge_plan(&spans, at(2026, 11, 12));
        assert_eq!(
            plan,
            vec![(0..7).collect::<Vec<_>>(), (7..11).collect::<Vec<_>>()]
        );
        // Nothing cold: nothing merges.
        assert!(merge_plan(&spans, at(2026, 11, 1)).is_empty());
    }

    #[test]
    fn a_complete_cold_month_merges_whole_and_a_complete_cold_year_too() {
        // October as one quarter range and single days; November 1-3 as days.
        let mut spans = vec![
            Span {
                lower: at(2026, 10, 1),
                upper: at(2026, 10, 8),
                mergeable: true,
            },
            Span {
                lower: at(2026, 10, 8),
                upper: at(2026, 10, 15),
                mergeable: true,
            },
            Span {
                lower: at(2026, 10, 15),
                upper: at(2026, 10, 22),
                mergeable: true,
            },
        ];
        spans.extend(days(at(2026, 10, 22), 10 + 3)); // Oct 22 .. Nov 3
        let plan = merge_plan(&spans, at(2026, 11, 3));
        assert_eq!(plan[0], (0..13).collect::<Vec<_>>(), "October whole");
        assert_eq!(plan[1], vec![13, 14], "November 1-2 so far");
        // Twelve months of a past year merge into one.
        let mut year: Vec<Span> = (1..=12)
            .map(|m| Span {
                lower: at(2025, m, 1),
                upper: if m == 12 {
                    at(2026, 1, 1)
                } else {
                    at(2025, m + 1, 1)
                },
                mergeable: true,
            })
            .collect();
        year.push(Span {
            lower: at(2026, 1, 1),
            upper: at(2026, 2, 1),
            mergeable: true,
        });
        assert_eq!(
            merge_plan(&year, at(2026, 6, 1)),
            vec![(0..12).collect::<Vec<_>>()]
        );
    }

    #[test]
    fn ranges_that_cannot_take_part_are_left_alone() {
        let mut spans = days(at(2026, 11, 1), 7);
        spans[3].mergeable = false; // live, or the engine does not manage it
        assert_eq!(
            merge_plan(&spans, at(2026, 12, 1)),
            vec![vec![0, 1, 2], vec![4, 5, 6]]
        );
        // A range crossing a quarter's edge stays as it is.
        let odd = vec![
            Span {
                lower: at(2026, 11, 5),
                upper: at(2026, 11, 10),
                mergeable: true,
            },
            Span {
                lower: at(2026, 11, 10),
                upper: at(2026, 11, 11),
                mergeable: true,
            },
        ];
        assert!(merge_plan(&odd, at(2026, 12, 1)).is_empty());
    }

    /// Over a year of days passing one at a time with merges applied, the cold ranges stay few.
    #[test]
    fn over_a_year_the_number_of_ranges_stays_bounded() {
        let start = at(2026, 1, 1);
        let mut spans: Vec<Span> = Vec::new();
        let mut most = 0;
        for day in 0..400 {
            let now = start + Duration::days(day);
            spans.push(Span {
                lower: now,
                upper: now + Duration::days(1),
                mergeable: true,
            });
            let horizon = cold_horizon(
                now + Duration::hours(12),
                Some(std::time::Duration::from_secs(14 * 86_400)),
            );
            for group in merge_plan(&spans, horizon).into_iter().rev() {
                let merged = Span {
                    lower: spans[group[0]].lower,
                    upper: spans[*group.last().unwrap()].upper,
                    mergeable: true,
                };
                spans.splice(group[0]..=*group.last().unwrap(), [merged]);
            }
            most = most.max(spans.len());
        }
        // 16 days within the window and today, plus at most one partial quarter, three quarters,
        // eleven months and a year.
        assert!(most <= 16 + 1 + 3 + 11 + 1, "{most}");
    }
}
