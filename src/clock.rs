//! The daemon's wall clock. The runtime pieces (engine, scheduler, outbox, HTTP routes) read
//! the time and wait through a [`Clock`], so a test can run the daemon on a manual clock and
//! move it forward instead of sleeping: a due timer fires, a code expires, a retry comes due
//! as soon as the clock is advanced past it. The pure core never reads a clock at all; it is
//! given the time.
//!
//! Only wall-clock time goes through here. Pacing that is about real elapsed time (the
//! send rate, HTTP timeouts, a stop's grace period) stays on tokio's clock.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use tokio::sync::watch;

/// The longest wait for a due time before the wall clock is read again: a clock set forward,
/// or a host that slept (tokio's timers do not count suspended time), delays a due timer or
/// retry by at most this much.
pub const RECHECK: Duration = Duration::from_secs(60);
/// The longest wait with nothing due; a safety net (the worker is woken when something is
/// added), not a polling interval.
const IDLE: Duration = Duration::from_secs(3600);

/// What a worker (the scheduler, the outbox) waits for before its next pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wait {
    /// Something is due at this time, on the daemon's clock.
    Until(DateTime<Utc>),
    /// Nothing is due.
    Idle,
    /// The pass failed: a second of real time (a storage error is not retried faster or
    /// slower by a manual clock).
    Retry,
}

/// The system clock, or a manual one that moves only when told.
#[derive(Clone, Default)]
pub struct Clock {
    manual: Option<Arc<watch::Sender<DateTime<Utc>>>>,
}

impl std::fmt::Debug for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.manual {
            None => f.write_str("Clock::system"),
            Some(t) => write!(f, "Clock::manual({})", *t.borrow()),
        }
    }
}

impl Clock {
    /// The system's wall clock.
    pub fn system() -> Clock {
        Clock::default()
    }

    /// A clock that reads `start` until [`Clock::advance`] moves it.
    pub fn manual(start: DateTime<Utc>) -> Clock {
        Clock {
            manual: Some(Arc::new(watch::Sender::new(start))),
        }
    }

    pub fn now(&self) -> DateTime<Utc> {
        match &self.manual {
            None => Utc::now(),
            Some(t) => *t.borrow(),
        }
    }

    /// Moves a manual clock forward by `by`, waking whoever waits for a time it reaches.
    /// The system clock cannot be moved: there it is an error.
    pub fn advance(&self, by: Duration) -> anyhow::Result<()> {
        let manual = self
            .manual
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("the system clock cannot be advanced"))?;
        let by = TimeDelta::from_std(by)?;
        manual.send_modify(|t| *t += by);
        Ok(())
    }

    /// Waits as `wait` says (see [`Wait`]).
    pub async fn wait(&self, wait: Wait) {
        match wait {
            Wait::Until(at) => self.sleep_until(at, RECHECK).await,
            Wait::Idle => tokio::time::sleep(IDLE).await,
            Wait::Retry => tokio::time::sleep(Duration::from_secs(1)).await,
        }
    }

    /// Waits until this clock reads `at` or later, or for `most` of real time, whichever
    /// comes first (the system clock may be set back meanwhile: the caller looks again). A
    /// manual clock waits until it is advanced that far; `most` does not apply to it.
    /// The deadline is absolute, so a clock advanced between reading it and waiting is seen.
    pub async fn sleep_until(&self, at: DateTime<Utc>, most: Duration) {
        let Some(manual) = &self.manual else {
            let left = (at - Utc::now()).to_std().unwrap_or(Duration::ZERO);
            return tokio::time::sleep(left.min(most)).await;
        };
        let mut moved = manual.subscribe();
        // `changed` fails only when the sender is gone, and this clock holds it.
        while *moved.borrow_and_update() < at && moved.changed().await.is_ok() {}
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use chrono::{TimeZone, Utc};

    use super::Clock;

    #[tokio::test]
    async fn a_manual_clock_wakes_a_sleeper_only_once_advanced_past_its_time() {
        let start = Utc.with_ymd_and_hms(2026, 1, 1, 12, 0, 0).unwrap();
        let clock = Clock::manual(start);
        let at = start + chrono::TimeDelta::seconds(60);
        // Advanced before the sleeper first runs: the deadline is absolute, so it counts.
        clock.advance(Duration::from_secs(30)).unwrap();
        let sleeper = tokio::spawn({
            let clock = clock.clone();
            async move { clock.sleep_until(at, Duration::from_secs(1)).await }
        });
        tokio::task::yield_now().await;
        clock.advance(Duration::from_secs(29)).unwrap();
        tokio::task::yield_now().await;
        assert!(!sleeper.is_finished(), "woke at 59 s of 60");
        clock.advance(Duration::from_secs(1)).unwrap();
        tokio::time::timeout(Duration::from_secs(5), sleeper)
            .await
            .expect("not woken at 60 s")
            .unwrap();
        assert_eq!(clock.now(), start + chrono::TimeDelta::seconds(60));
    }

    #[tokio::test]
    async fn a_past_deadline_returns_at_once_and_the_system_clock_waits_at_most_as_told() {
        let clock = Clock::manual(Utc.with_ymd_and_hms(2026, 1, 1, 12, 0, 0).unwrap());
        let past = clock.now() - chrono::TimeDelta::seconds(1);
        tokio::time::timeout(
            Duration::from_secs(5),
            clock.sleep_until(past, Duration::ZERO),
        )
        .await
        .expect("a past deadline is no wait");
        let system = Clock::system();
        let later = Utc::now() + chrono::TimeDelta::hours(1);
        tokio::time::timeout(
            Duration::from_secs(5),
            system.sleep_until(later, Duration::from_millis(20)),
        )
        .await
        .expect("the system clock waits at most `most`, then its caller reads it again");
    }

    #[test]
    fn the_system_clock_reads_the_time_and_cannot_be_moved() {
        let clock = Clock::system();
        let before = Utc::now();
        assert!(clock.now() >= before);
        assert!(clock.advance(Duration::from_secs(1)).is_err());
    }
}
