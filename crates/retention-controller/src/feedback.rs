//! Pacing by feedback: a paced run's pause after each batch follows what the foreground feels,
//! instead of a fixed multiple of the batch's duration (`retention.pacing.feedback`).
//!
//! Once a paced run has committed its first batch, a probe on a connection of its own commits a
//! tiny transaction every `retention.pacing.probe_interval`, alternately within one of the run's
//! pauses and in the middle of one of its batches. It takes a transaction id, so its commit waits
//! for the WAL to reach the disk as any foreground write's does, behind whatever the run's batch
//! has written so far; it also reads `pg_stat_activity` for other client backends of the same
//! database waiting on a lock, a lightweight lock (the WAL's among them) or I/O. Each probe is
//! marked by when it ran: wholly within one of the run's pauses (the foreground's own baseline)
//! or while the run worked.
//!
//! The last 32 probes of each kind are kept. After every [`WINDOW`] new probes over work, the
//! pause ratio is set again:
//! - **raised** (doubled, up to `max_pause_ratio`) when the 90th percentile of the probes over
//!   work is more than `max_slowdown` times that of the pauses (plus [`SLACK`], the jitter of a
//!   probe that takes a fraction of a millisecond), or when backends were seen waiting in a
//!   share of the probes over work more than half of all probes above the pauses' share;
//! - **lowered** otherwise, down to `min_pause_ratio`: halved while that percentile is under
//!   half the bound, by a fifth nearer to it.
//!
//! A raise forgets the probes over work that asked for it: the next decision waits for
//! [`MIN_PROBES`] taken at the new ratio, so one burst of slow probes raises the ratio once.
//! Until each kind has [`MIN_PROBES`] probes the ratio stays at `pause_ratio`, where every run
//! starts. With `feedback = false` the ratio is fixed at `pause_ratio`.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, PgConnection, PgPool};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// New probes over the run's work per decision.
pub const WINDOW: usize = 4;
/// Probes of the pauses, and over work, before decisions start.
pub const MIN_PROBES: usize = 8;
/// Probes kept of each kind (the most recent): the tails compared are theirs.
const KEPT: usize = 32;
/// The tail compared: this quantile of each kind's kept probes.
const TAIL: f64 = 0.9;
/// Added to the bound: a probe's own jitter on a quiet server.
pub const SLACK: Duration = Duration::from_micros(500);
/// How much more often backends may be seen waiting while the run works than while it pauses
/// (as a share of the probes) before the pauses grow.
const MORE_WAITING: f64 = 0.5;
/// How much a decision raises the ratio, and how much it lowers it.
const RAISE: f64 = 2.0;
const LOWER: f64 = 0.8;

/// `retention.pacing.*` as a paced run with feedback uses them.
#[derive(Debug, Clone, PartialEq)]
pub struct FeedbackOptions {
    pub min_pause_ratio: f64,
    pub max_pause_ratio: f64,
    pub max_slowdown: f64,
    pub probe_interval: Duration,
}

/// One probe: how long its commit took, and how many other client backends were waiting.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Probe {
    pub latency: Duration,
    pub waiting: u32,
}

/// Why the ratio moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Not enough probes yet, or not enough new ones over work since the last decision.
    Keep,
    RaisedByLatency,
    RaisedByWaits,
    Lowered,
}

/// The pause ratio and what it is decided from; no I/O, so it can be tested by itself.
#[derive(Debug, Clone)]
pub struct Governor {
    options: FeedbackOptions,
    ratio: f64,
    pauses: VecDeque<Probe>,
    work: VecDeque<Probe>,
    new_work: usize,
    pub summary: Summary,
}

/// What a run's pacing did, for its log line and counters.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Summary {
    pub probes: u64,
    pub raised_by_latency: u64,
    pub raised_by_waits: u64,
    pub lowered: u64,
    pub lowest_ratio: Option<f64>,
    pub highest_ratio: Option<f64>,
    /// The tails compared at the last decision: the pauses' and the work's.
    pub pauses_tail: Duration,
    pub work_tail: Duration,
    /// Probes that saw another backend waiting, over work and in the pauses.
    pub waiting_over_work: u64,
    pub waiting_in_pauses: u64,
}

impl Governor {
    pub fn new(options: FeedbackOptions, start: f64) -> Self {
        let ratio = start.clamp(options.min_pause_ratio, options.max_pause_ratio);
        Governor {
            options,
            ratio,
            pauses: VecDeque::new(),
            work: VecDeque::new(),
            new_work: 0,
            summary: Summary::default(),
        }
    }

    pub fn ratio(&self) -> f64 {
        self.ratio
    }

    /// Takes one probe, marked by whether it ran wholly within a pause.
    pub fn observe(&mut self, probe: Probe, in_pause: bool) {
        self.summary.probes += 1;
        let waited = u64::from(probe.waiting > 0);
        let kept = if in_pause {
            self.summary.waiting_in_pauses += waited;
            &mut self.pauses
        } else {
            self.summary.waiting_over_work += waited;
            self.new_work += 1;
            &mut self.work
        };
        kept.push_back(probe);
        while kept.len() > KEPT {
            kept.pop_front();
        }
    }

    /// Sets the ratio from the kept probes, once [`WINDOW`] new ones over work came in.
    pub fn decide(&mut self) -> Decision {
        if self.pauses.len() < MIN_PROBES || self.work.len() < MIN_PROBES || self.new_work < WINDOW
        {
            return Decision::Keep;
        }
        self.new_work = 0;
        let (pauses_tail, work_tail) = (tail(&self.pauses), tail(&self.work));
        self.summary.pauses_tail = pauses_tail;
        self.summary.work_tail = work_tail;
        let bound = pauses_tail.mul_f64(self.options.max_slowdown) + SLACK;
        let decision = if work_tail > bound {
            Decision::RaisedByLatency
        } else if waiting_share(&self.work) > waiting_share(&self.pauses) + MORE_WAITING {
            Decision::RaisedByWaits
        } else {
            Decision::Lowered
        };
        match decision {
            Decision::RaisedByLatency => self.summary.raised_by_latency += 1,
            Decision::RaisedByWaits => self.summary.raised_by_waits += 1,
            Decision::Lowered => self.summary.lowered += 1,
            Decision::Keep => {}
        }
        let factor = if decision == Decision::Lowered {
            // Far under the bound, the ratio comes down as fast as a raise takes it up.
            if work_tail <= bound / 2 {
                1.0 / RAISE
            } else {
                LOWER
            }
        } else {
            // The probes that asked for it have had their say: the next decision waits for
            // probes taken at the new ratio.
            self.work.clear();
            RAISE
        };
        self.ratio =
            (self.ratio * factor).clamp(self.options.min_pause_ratio, self.options.max_pause_ratio);
        self.summary.lowest_ratio = Some(
            self.summary
                .lowest_ratio
                .map_or(self.ratio, |r| r.min(self.ratio)),
        );
        self.summary.highest_ratio = Some(
            self.summary
                .highest_ratio
                .map_or(self.ratio, |r| r.max(self.ratio)),
        );
        decision
    }
}

/// The [`TAIL`] quantile of the probes' latencies.
fn tail(probes: &VecDeque<Probe>) -> Duration {
    let mut latencies: Vec<Duration> = probes.iter().map(|probe| probe.latency).collect();
    latencies.sort();
    latencies[((latencies.len() as f64 * TAIL) as usize).min(latencies.len() - 1)]
}

/// The share of the probes that saw another backend waiting.
fn waiting_share(probes: &VecDeque<Probe>) -> f64 {
    probes.iter().filter(|probe| probe.waiting > 0).count() as f64 / probes.len() as f64
}

/// A run's pacer: the governor, fed by a probe that starts with the first pause and stops when
/// the run's last context is dropped.
#[derive(Debug)]
pub struct Pacer {
    options: FeedbackOptions,
    governor: Arc<Mutex<Governor>>,
    phase: Arc<Phase>,
    probe: Mutex<Option<CancellationToken>>,
}

/// Where the run is: `epoch` is odd while it pauses, so a probe that saw the same odd value
/// before and after ran wholly within one pause; `last_batch` is the last batch's duration.
#[derive(Debug)]
struct Phase {
    epoch: tokio::sync::watch::Sender<u64>,
    last_batch: Mutex<Duration>,
}

impl Pacer {
    pub fn new(options: FeedbackOptions, start: f64) -> Self {
        Pacer {
            governor: Arc::new(Mutex::new(Governor::new(options.clone(), start))),
            options,
            phase: Arc::new(Phase {
                epoch: tokio::sync::watch::Sender::new(0),
                last_batch: Mutex::new(Duration::ZERO),
            }),
            probe: Mutex::new(None),
        }
    }

    /// The pause after a batch that took `elapsed`, starting the probe on the first call.
    pub fn pause_after(&self, pool: &PgPool, elapsed: Duration) -> Duration {
        self.start_probe(pool);
        *self.phase.last_batch.lock().unwrap() = elapsed;
        let mut governor = self.governor.lock().unwrap();
        governor.decide();
        elapsed.mul_f64(governor.ratio())
    }

    /// Marks a pause from now until the guard is dropped.
    pub fn pausing(&self) -> PauseGuard<'_> {
        self.phase.epoch.send_modify(|epoch| *epoch += 1);
        PauseGuard { phase: &self.phase }
    }

    pub fn summary(&self) -> Summary {
        self.governor.lock().unwrap().summary.clone()
    }

    pub fn ratio(&self) -> f64 {
        self.governor.lock().unwrap().ratio()
    }

    fn start_probe(&self, pool: &PgPool) {
        let mut probe = self.probe.lock().unwrap();
        if probe.is_some() {
            return;
        }
        let stop = CancellationToken::new();
        *probe = Some(stop.clone());
        let connect = (*pool.connect_options()).clone();
        // In the run's span: the probe's warnings name the run, its task and replica.
        tokio::spawn(
            probe_loop(
                connect,
                self.options.probe_interval,
                self.phase.clone(),
                self.governor.clone(),
                stop,
            )
            .in_current_span(),
        );
    }
}

impl Drop for Pacer {
    fn drop(&mut self) {
        if let Some(stop) = self.probe.lock().unwrap().take() {
            stop.cancel();
        }
    }
}

pub struct PauseGuard<'a> {
    phase: &'a Phase,
}

impl Drop for PauseGuard<'_> {
    fn drop(&mut self) {
        self.phase.epoch.send_modify(|epoch| *epoch += 1);
    }
}

/// The longest a probe waits for the run to reach the phase it wants (a run plans, or waits for
/// a standby, between its batches).
const PHASE_WAIT: Duration = Duration::from_secs(1);

/// Every `every`, one probe, alternately within a pause and in the middle of a batch, so that
/// both kinds keep coming whatever the ratio.
async fn probe_loop(
    connect: PgConnectOptions,
    every: Duration,
    phase: Arc<Phase>,
    governor: Arc<Mutex<Governor>>,
    stop: CancellationToken,
) {
    let mut connection = tokio::select! {
        _ = stop.cancelled() => return,
        connected = PgConnection::connect_with(&connect) => match connected {
            Ok(connection) => connection,
            Err(error) => {
                tracing::warn!(%error, "the pacing probe cannot connect; this run keeps its starting pause ratio");
                return;
            }
        },
    };
    let mut epochs = phase.epoch.subscribe();
    let mut over_work = false;
    let mut said = false;
    loop {
        over_work = !over_work;
        let reached = async {
            tokio::time::sleep(every).await;
            // Paused when the epoch is odd: wait for the phase wanted, then, over work, for
            // the middle of a batch as long as the last.
            let _ = tokio::time::timeout(
                PHASE_WAIT,
                epochs.wait_for(|epoch| (epoch % 2 == 1) != over_work),
            )
            .await;
            if over_work {
                let half = *phase.last_batch.lock().unwrap() / 2;
                tokio::time::sleep(half).await;
            }
        };
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = reached => {}
        }
        let before = *phase.epoch.borrow();
        let started = Instant::now();
        let committed = repository::pacing::commit(&mut connection).await;
        let latency = started.elapsed();
        let in_pause = before % 2 == 1 && *phase.epoch.borrow() == before;
        // Other client backends waiting (see `repository::pacing::foreground_waiting`).
        let waiting = repository::pacing::foreground_waiting(&mut connection).await;
        match (committed, waiting) {
            (Ok(_), Ok(waiting)) => governor.lock().unwrap().observe(
                Probe {
                    latency,
                    waiting: waiting.max(0) as u32,
                },
                in_pause,
            ),
            (Err(error), _) | (_, Err(error)) => {
                if !said {
                    tracing::warn!(%error, "the pacing probe failed; the pause ratio holds until it answers");
                    said = true;
                }
            }
        }
    }
    let _ = connection.close().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options() -> FeedbackOptions {
        FeedbackOptions {
            min_pause_ratio: 0.25,
            max_pause_ratio: 8.0,
            max_slowdown: 2.0,
            probe_interval: Duration::from_millis(50),
        }
    }

    fn probe(micros: u64, waiting: u32) -> Probe {
        Probe {
            latency: Duration::from_micros(micros),
            waiting,
        }
    }

    fn observe(governor: &mut Governor, n: usize, micros: u64, waiting: u32, in_pause: bool) {
        for _ in 0..n {
            governor.observe(probe(micros, waiting), in_pause);
        }
    }

    /// A governor that has seen `MIN_PROBES` probes of 1 ms in its pauses and over work, nobody
    /// waiting, and decided once (halving the ratio from `start`).
    fn settled(start: f64) -> Governor {
        let mut governor = Governor::new(options(), start);
        observe(&mut governor, MIN_PROBES, 1_000, 0, true);
        observe(&mut governor, MIN_PROBES, 1_000, 0, false);
        governor.decide();
        governor
    }

    #[test]
    fn keeps_the_starting_ratio_until_both_kinds_of_probe_are_enough() {
        let mut governor = Governor::new(options(), 1.0);
        observe(&mut governor, MIN_PROBES, 50_000, 0, false);
        assert_eq!(governor.decide(), Decision::Keep);
        observe(&mut governor, MIN_PROBES - 1, 1_000, 0, true);
        assert_eq!(governor.decide(), Decision::Keep);
        assert_eq!(governor.ratio(), 1.0);
        // The probes over work kept meanwhile count at the first decision.
        observe(&mut governor, 1, 1_000, 0, true);
        assert_eq!(governor.decide(), Decision::RaisedByLatency);
        assert_eq!(governor.ratio(), 2.0);
    }

    #[test]
    fn decides_once_per_window_of_new_probes_over_work() {
        let mut governor = settled(1.0);
        observe(&mut governor, WINDOW - 1, 50_000, 0, false);
        observe(&mut governor, 10, 1_000, 0, true);
        assert_eq!(governor.decide(), Decision::Keep);
        observe(&mut governor, 1, 50_000, 0, false);
        assert_eq!(governor.decide(), Decision::RaisedByLatency);
        assert_eq!(governor.decide(), Decision::Keep);
        // The slow probes are forgotten: the next decision takes fresh ones, enough of them.
        observe(&mut governor, MIN_PROBES - 1, 1_000, 0, false);
        assert_eq!(governor.decide(), Decision::Keep);
        observe(&mut governor, 1, 1_000, 0, false);
        assert_eq!(governor.decide(), Decision::Lowered);
    }

    #[test]
    fn raises_when_the_tail_over_work_passes_the_bound_and_lowers_below_it() {
        // The bound: 2 x 1 ms + 0.5 ms, against the 90th percentile of the 32 probes kept.
        let mut governor = settled(1.0);
        // 1 ms is under half the bound: halved.
        assert_eq!(governor.ratio(), 0.5);
        // 2.5 ms is at the bound: lowered by a fifth.
        observe(&mut governor, KEPT, 2_500, 0, false);
        assert_eq!(governor.decide(), Decision::Lowered);
        assert!(
            (governor.ratio() - 0.4).abs() < 1e-9,
            "{}",
            governor.ratio()
        );
        // Three slow probes of the 32 kept are above the tail; four are not.
        observe(&mut governor, KEPT - 3, 1_000, 0, false);
        observe(&mut governor, 3, 9_000, 0, false);
        assert_eq!(governor.decide(), Decision::Lowered);
        observe(&mut governor, WINDOW - 1, 1_000, 0, false);
        observe(&mut governor, 1, 9_000, 0, false);
        assert_eq!(governor.decide(), Decision::RaisedByLatency);
        assert_eq!(governor.summary.work_tail, Duration::from_millis(9));
        assert_eq!(governor.summary.pauses_tail, Duration::from_millis(1));
    }

    #[test]
    fn raises_when_backends_wait_far_more_often_while_the_run_works() {
        let mut governor = settled(1.0);
        // Waits in 16 of the 32 probes over work: half, not more than half more than the pauses.
        observe(&mut governor, 16, 1_000, 0, false);
        observe(&mut governor, 16, 1_000, 1, false);
        assert_eq!(governor.decide(), Decision::Lowered);
        observe(&mut governor, WINDOW, 1_000, 2, false);
        assert_eq!(governor.decide(), Decision::RaisedByWaits);
        // As many waits in the pauses: the run is not the cause.
        observe(&mut governor, KEPT, 1_000, 1, true);
        observe(&mut governor, MIN_PROBES, 1_000, 1, false);
        assert_eq!(governor.decide(), Decision::Lowered);
        assert_eq!(
            (
                governor.summary.waiting_over_work,
                governor.summary.waiting_in_pauses
            ),
            (28, 32)
        );
    }

    #[test]
    fn stays_within_its_bounds() {
        let mut governor = Governor::new(options(), 100.0);
        assert_eq!(governor.ratio(), 8.0);
        observe(&mut governor, MIN_PROBES, 1_000, 0, true);
        observe(&mut governor, KEPT, 50_000, 0, false);
        assert_eq!(governor.decide(), Decision::RaisedByLatency);
        assert_eq!(governor.ratio(), 8.0);
        for _ in 0..40 {
            observe(&mut governor, WINDOW * 8, 1_000, 0, false);
            governor.decide();
        }
        assert_eq!(governor.ratio(), 0.25);
        let summary = &governor.summary;
        assert_eq!((summary.raised_by_latency, summary.lowered), (1, 40));
        assert_eq!(
            (summary.lowest_ratio, summary.highest_ratio),
            (Some(0.25), Some(8.0))
        );
    }

    #[test]
    fn the_baseline_follows_the_recent_pauses() {
        let mut governor = settled(1.0);
        // The server got slower by itself: 5 ms probes in the pauses too.
        observe(&mut governor, KEPT, 5_000, 0, true);
        observe(&mut governor, KEPT, 9_000, 0, false);
        assert_eq!(governor.decide(), Decision::Lowered);
        assert_eq!(governor.summary.pauses_tail, Duration::from_millis(5));
    }
}
