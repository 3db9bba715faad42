//! Replica-lag throttling: purges wait between batches while a streaming standby is more than
//! `retention.throttle.max_replica_lag` behind, until it is back under half of it.
//!
//! A standby's lag is the age of the oldest WAL it has not replayed: the primary's WAL position
//! is sampled at every check, and a standby whose replay position the primary passed at instant
//! `t` is at least `now - t` behind. That keeps growing while its replay is stuck, where
//! `pg_stat_replication.replay_lag` stays at its last measure; the larger of the two counts.
//!
//! What never stops retention for good (documented in docs/operations.md):
//! - only standbys connected now count: one that disconnects is no longer waited for (logged);
//! - a connected standby whose replay position has not moved for `max_replica_stall` while
//!   behind is stalled, not slow, and is no longer waited for (logged, `reason="stalled"`);
//! - replication slots with no standby attached hold WAL but are never waited for (they are
//!   counted in `retention_replication_slots_inactive` and logged once per process);
//! - when the positions cannot be read (the role lacks `pg_monitor`), nothing waits (logged once).

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use repository::replication::{self, Standby};
use sqlx::PgPool;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::settings::ThrottleSettings;
use crate::telemetry;

/// Samples of the primary's WAL position kept (an hour at the default check interval).
const HISTORY: usize = 3_600;

/// Shared by every run of a process: one view of the standbys.
#[derive(Debug)]
pub struct ReplicaThrottle {
    settings: ThrottleSettings,
    state: tokio::sync::Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    last_check: Option<Instant>,
    /// (when, the primary's WAL position then), oldest first.
    history: VecDeque<(Instant, u64)>,
    /// Per standby: its last replay position and since when it has not moved.
    seen: BTreeMap<String, (u64, Instant)>,
    /// Standbys no longer waited for because they stalled.
    stalled: Vec<String>,
    /// Waiting: the standby that made runs wait, until every standby is under half the bound.
    waiting_on: Option<String>,
    unreadable_said: bool,
    slots_said: bool,
}

/// What the last check decided.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Go,
    /// A standby is this far behind.
    Wait {
        standby: String,
        lag: Duration,
    },
}

impl ReplicaThrottle {
    pub fn new(settings: ThrottleSettings) -> Self {
        ReplicaThrottle {
            settings,
            state: tokio::sync::Mutex::new(State::default()),
        }
    }

    /// Returns once no standby that counts is too far behind, or `cancel` fires. Counts the time
    /// waited in `retention_throttled_seconds_total{reason="replica_lag"}`.
    pub async fn wait(&self, pool: &PgPool, cancel: &CancellationToken) {
        if self.settings.max_replica_lag.is_zero() {
            return;
        }
        let started = Instant::now();
        let mut waited = false;
        loop {
            match self.check(pool).await {
                Verdict::Go => break,
                Verdict::Wait { standby, lag } => {
                    if !waited {
                        tracing::info!(
                            standby, lag_ms = lag.as_millis() as u64, max_ms = self.settings.max_replica_lag.as_millis() as u64,
                            "throttled: a standby is too far behind; purges wait until it is under half the bound"
                        );
                        telemetry::throttled(true);
                        waited = true;
                    }
                }
            }
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tokio::time::sleep(self.settings.check_interval) => {}
            }
        }
        if waited {
            telemetry::throttled(false);
            telemetry::throttled_for("replica_lag", started.elapsed());
            tracing::info!(
                waited_ms = started.elapsed().as_millis() as u64,
                "throttle released: the standbys caught up"
            );
        }
    }

    /// Reads the standbys (at most every `check_interval`; the last verdict in between).
    pub async fn check(&self, pool: &PgPool) -> Verdict {
        let mut state = self.state.lock().await;
        let now = Instant::now();
        let fresh = state
            .last_check
            .is_some_and(|at| now.duration_since(at) < self.settings.check_interval);
        if fresh {
            return match &state.waiting_on {
                Some(standby) => Verdict::Wait {
                    standby: standby.clone(),
                    lag: Duration::ZERO,
                },
                None => Verdict::Go,
            };
        }
        state.last_check = Some(now);
        let (current, standbys) = match replication::standbys(pool).await {
            Ok(read) => read,
            Err(error) => {
                if !state.unreadable_said {
                    tracing::warn!(%error, "cannot read pg_stat_replication; purges do not wait for standbys");
                    state.unreadable_said = true;
                }
                state.waiting_on = None;
                return Verdict::Go;
            }
        };
        if !state.slots_said {
            state.slots_said = true;
            if let Ok(slots) = replication::inactive_slots(pool).await {
                telemetry::inactive_slots(slots.len());
                for (slot, held) in slots {
                    tracing::warn!(slot, retained_bytes = held.unwrap_or(0), "replication slot with no standby attached: retention does not wait for it, and it keeps WAL until dropped");
                }
            }
        }
        let Some(current) = parse_lsn(&current) else {
            return Verdict::Go;
        };
        state.history.push_back((now, current));
        while state.history.len() > HISTORY {
            state.history.pop_front();
        }
        let verdict = self.judge(&mut state, now, current, &standbys);
        state.waiting_on = match &verdict {
            Verdict::Wait { standby, .. } => Some(standby.clone()),
            Verdict::Go => None,
        };
        verdict
    }

    fn judge(
        &self,
        state: &mut State,
        now: Instant,
        current: u64,
        standbys: &[Standby],
    ) -> Verdict {
        let bound = if state.waiting_on.is_some() {
            self.settings.max_replica_lag / 2
        } else {
            self.settings.max_replica_lag
        };
        // Standbys gone since the last check are no longer waited for.
        let connected: Vec<&str> = standbys.iter().map(|s| s.name.as_str()).collect();
        let gone: Vec<String> = state
            .seen
            .keys()
            .filter(|name| !connected.contains(&name.as_str()))
            .cloned()
            .collect();
        for name in gone {
            tracing::warn!(
                standby = name,
                "standby disconnected: purges no longer wait for it"
            );
            state.seen.remove(&name);
            state.stalled.retain(|s| *s != name);
            telemetry::replica_lag(&name, None, None);
        }
        let mut worst: Option<(String, Duration)> = None;
        for standby in standbys {
            let Some(replayed) = standby.replay_lsn.as_deref().and_then(parse_lsn) else {
                if !state.unreadable_said {
                    tracing::warn!(standby = standby.name, "cannot read the standby's replay position (grant pg_monitor to the engine's role); purges do not wait for it");
                    state.unreadable_said = true;
                }
                continue;
            };
            let since = match state.seen.get(&standby.name) {
                Some((lsn, since)) if *lsn == replayed => *since,
                _ => now,
            };
            state.seen.insert(standby.name.clone(), (replayed, since));
            let lag = lag_of(&state.history, now, current, replayed).max(Duration::from_secs_f64(
                standby.replay_lag_seconds.unwrap_or(0.0).max(0.0),
            ));
            telemetry::replica_lag(&standby.name, Some(lag), standby.lag_bytes);
            if replayed < current && now.duration_since(since) >= self.settings.max_replica_stall {
                if !state.stalled.contains(&standby.name) {
                    tracing::warn!(
                        standby = standby.name, stalled_s = now.duration_since(since).as_secs(),
                        "standby stalled (its replay position has not moved): purges no longer wait for it until it moves again"
                    );
                    telemetry::standby_stalled();
                    state.stalled.push(standby.name.clone());
                }
                continue;
            }
            state.stalled.retain(|s| *s != standby.name);
            if lag > bound && worst.as_ref().is_none_or(|(_, w)| lag > *w) {
                worst = Some((standby.name.clone(), lag));
            }
        }
        match worst {
            Some((standby, lag)) => Verdict::Wait { standby, lag },
            None => Verdict::Go,
        }
    }
}

/// How old the oldest WAL a standby has not replayed is, at most: the WAL right after `replayed`
/// was written after the last sample at which the primary had not passed it (0 when the standby
/// has replayed everything; from the oldest sample when every sample is past it). Errs by at most
/// a check interval toward waiting early.
fn lag_of(
    history: &VecDeque<(Instant, u64)>,
    now: Instant,
    current: u64,
    replayed: u64,
) -> Duration {
    if replayed >= current {
        return Duration::ZERO;
    }
    match history.iter().position(|(_, lsn)| *lsn > replayed) {
        Some(0) => now.duration_since(history[0].0),
        Some(past) => now.duration_since(history[past - 1].0),
        None => Duration::ZERO,
    }
}

/// `pg_lsn` text ("16/B374D848") as a number.
pub fn parse_lsn(text: &str) -> Option<u64> {
    let (high, low) = text.split_once('/')?;
    Some((u64::from_str_radix(high, 16).ok()? << 32) | u64::from_str_radix(low, 16).ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> ThrottleSettings {
        ThrottleSettings {
            max_replica_lag: Duration::from_secs(10),
            max_replica_stall: Duration::from_secs(300),
            check_interval: Duration::from_secs(1),
        }
    }

    fn standby(name: &str, replayed: u64) -> Standby {
        Standby {
            name: name.into(),
            state: "streaming".into(),
            replay_lsn: Some(format!("{:X}/{:X}", replayed >> 32, replayed & 0xFFFF_FFFF)),
            lag_bytes: None,
            replay_lag_seconds: None,
        }
    }

    #[test]
    fn lsns_read_as_numbers() {
        assert_eq!(parse_lsn("0/0"), Some(0));
        assert_eq!(parse_lsn("16/B374D848"), Some((0x16 << 32) | 0xB374_D848));
        assert_eq!(parse_lsn("junk"), None);
    }

    #[tokio::test(start_paused = true)]
    async fn waits_past_the_bound_resumes_under_half_and_forgets_stalled_or_gone_standbys() {
        let throttle = ReplicaThrottle::new(settings());
        let mut state = State::default();
        let t0 = Instant::now();
        // The primary writes 100 bytes a second; the standby replays nothing after position 100.
        let at = |s: u64| t0 + Duration::from_secs(s);
        for s in 0..=12 {
            state.history.push_back((at(s), 100 + 100 * s));
        }
        let now = at(12);
        // The primary was at 100 at 0 s and past it at 1 s: the standby is up to 12 s behind.
        let verdict = throttle.judge(&mut state, now, 1_300, &[standby("a", 100)]);
        assert_eq!(
            verdict,
            Verdict::Wait {
                standby: "a".into(),
                lag: Duration::from_secs(12)
            }
        );
        state.waiting_on = Some("a".into());
        // Up to 8 s behind: under the bound, not under half of it: still waiting.
        assert!(matches!(
            throttle.judge(&mut state, now, 1_300, &[standby("a", 500)]),
            Verdict::Wait { .. }
        ));
        // Up to 4 s behind: under half, go.
        assert_eq!(
            throttle.judge(&mut state, now, 1_300, &[standby("a", 900)]),
            Verdict::Go
        );
        state.waiting_on = None;
        // Stuck at 900 for the stall bound (5 min): no longer waited for.
        let later = now + Duration::from_secs(301);
        state.history.push_back((later, 100_000));
        assert_eq!(
            throttle.judge(&mut state, later, 100_000, &[standby("a", 900)]),
            Verdict::Go
        );
        assert_eq!(state.stalled, ["a"]);
        // It moves again: counted again, and it is far behind.
        assert!(matches!(
            throttle.judge(&mut state, later, 100_000, &[standby("a", 1_000)]),
            Verdict::Wait { .. }
        ));
        // Disconnected: forgotten.
        assert_eq!(throttle.judge(&mut state, later, 100_000, &[]), Verdict::Go);
        assert!(state.seen.is_empty());
    }
}
