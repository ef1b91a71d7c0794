//! The timer worker: sleeps until the earliest stored timer (or until an earlier one is added)
//! and fires due timers through the engine. Timers live in sled, so they survive restarts.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::watch;

use crate::engine::Engine;

/// How many timers one pass fires before looking at the clock again.
const BATCH: usize = 256;
/// The longest sleep with nothing scheduled; a safety net, not a polling interval.
const IDLE: Duration = Duration::from_secs(3600);
/// The longest wait for a timer before the wall clock is read again: a clock set forward, or
/// a host that slept (tokio's timers do not count suspended time), delays a due timer by at
/// most this much.
pub const RECHECK: Duration = Duration::from_secs(60);

pub async fn run(engine: Arc<Engine>, mut stop: watch::Receiver<bool>) {
    loop {
        if *stop.borrow() {
            return;
        }
        let next = pass(&engine).await.unwrap_or_else(|e| {
            tracing::error!("firing timers failed: {e:#}");
            Next::Retry
        });
        let clock = engine.clock();
        let wait = async {
            match next {
                Next::Again => {}
                Next::At(at) => clock.sleep_until(at, RECHECK).await,
                Next::Nothing => tokio::time::sleep(IDLE).await,
                // Real time: a storage error is not retried faster or slower by the clock.
                Next::Retry => tokio::time::sleep(Duration::from_secs(1)).await,
            }
        };
        if matches!(next, Next::Again) {
            continue;
        }
        tokio::select! {
            _ = wait => {}
            _ = engine.timers_changed.notified() => {}
            _ = stop.changed() => return,
        }
    }
}

/// What a pass leaves to wait for.
pub enum Next {
    /// It fired a whole batch: more may be due at once.
    Again,
    /// The earliest timer's due time.
    At(DateTime<Utc>),
    /// No timer at all (a new one wakes the scheduler).
    Nothing,
    /// The pass failed: try again in a second.
    Retry,
}

/// Fires what is due and says what to wait for next.
pub async fn pass(engine: &Engine) -> anyhow::Result<Next> {
    let fired = engine.fire_due_timers(BATCH).await?;
    if fired == BATCH {
        return Ok(Next::Again);
    }
    Ok(match engine.store.next_timer_at()? {
        None => Next::Nothing,
        Some(at) => Next::At(at),
    })
}
