//! Progress of `engine retention run`: on a terminal, one line redrawn a few times a second (rows
//! deleted, rate, estimate of what is left); otherwise a plain line every half minute, so logs
//! stay line-oriented and quiet.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use retention_controller::{Progress, ProgressFn};

use retention_controller::human::thousands;

const TERMINAL_EVERY: Duration = Duration::from_millis(200);
const LINES_EVERY: Duration = Duration::from_secs(30);

pub struct Meter {
    task: &'static str,
    terminal: bool,
    started: Instant,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Rows deleted by the task's earlier runs in this command (a run stopped at its deadline is
    /// followed by another).
    earlier_runs: u64,
    last_shown: Option<Instant>,
    drawn: bool,
}

impl Meter {
    pub fn new(task: &'static str, terminal: bool) -> Arc<Meter> {
        Arc::new(Meter {
            task,
            terminal,
            started: Instant::now(),
            state: Mutex::new(State::default()),
        })
    }

    /// What the task's runs call after every batch.
    pub fn callback(self: &Arc<Self>) -> ProgressFn {
        let meter = self.clone();
        Arc::new(move |progress| meter.update(progress))
    }

    /// A run ended having deleted `deleted` rows; the next one counts on from there.
    pub fn run_ended(&self, deleted: u64) {
        self.state.lock().unwrap().earlier_runs += deleted;
    }

    /// Clears the terminal line before the summary is printed.
    pub fn finish(&self) {
        let state = self.state.lock().unwrap();
        if self.terminal && state.drawn {
            eprint!("\x1b[2K");
            let _ = std::io::stderr().flush();
        }
    }

    fn update(&self, progress: Progress) {
        let mut state = self.state.lock().unwrap();
        let every = if self.terminal {
            TERMINAL_EVERY
        } else {
            LINES_EVERY
        };
        let now = Instant::now();
        // The first line waits a full period too: short runs print only their summary.
        if now.duration_since(state.last_shown.unwrap_or(self.started)) < every {
            return;
        }
        state.last_shown = Some(now);
        let line = describe(
            self.task,
            state.earlier_runs + progress.deleted,
            progress.left,
            now - self.started,
        );
        if self.terminal {
            // Cursor back to the start: a log line printed meanwhile overwrites the meter, and the
            // next redraw follows it.
            eprint!("\x1b[2K{line}\r");
            let _ = std::io::stderr().flush();
            state.drawn = true;
        } else {
            eprintln!("{line}");
        }
    }
}

/// "sessions: 1,200,000 rows deleted, 850,000 rows/s, about 1,400,000 left (2s)".
pub fn describe(task: &str, deleted: u64, left: Option<u64>, elapsed: Duration) -> String {
    let rate = deleted as f64 / elapsed.as_secs_f64().max(0.001);
    let mut line = format!(
        "{task}: {} rows deleted, {} rows/s",
        thousands(deleted),
        thousands(rate as u64)
    );
    if let Some(left) = left {
        line.push_str(&format!(", about {} left", thousands(left)));
        if rate >= 1.0 {
            let eta = Duration::from_secs((left as f64 / rate).ceil() as u64);
            line.push_str(&format!(" ({})", humantime::format_duration(eta)));
        }
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_says_rows_rate_and_what_is_left() {
        let line = describe(
            "sessions",
            1_200_000,
            Some(1_400_000),
            Duration::from_secs(2),
        );
        assert_eq!(
            line,
            "sessions: 1,200,000 rows deleted, 600,000 rows/s, about 1,400,000 left (3s)"
        );
        assert_eq!(
            describe("task-history", 999, None, Duration::from_secs(1)),
            "task-history: 999 rows deleted, 999 rows/s"
        );
    }
}
