//! The timer worker: sleeps until the earliest stored timer (or until an earlier one is added)
//! and fires due timers through the engine. Timers live in sled, so they survive restarts.

use std::sync::Arc;

use tokio::sync::watch;

use crate::clock::Wait;
use crate::engine::Engine;

/// How many timers one pass fires before looking at the clock again.
const BATCH: usize = 256;

pub async fn run(engine: Arc<Engine>, mut stop: watch::Receiver<bool>) {
    loop {
        if *stop.borrow() {
            return;
        }
        let wait = match pass(&engine).await {
            // A whole batch fired: more may be due at once.
            Ok(None) => continue,
            Ok(Some(wait)) => wait,
            Err(e) => {
                tracing::error!("firing timers failed: {e:#}");
                Wait::Retry
            }
        };
        tokio::select! {
            _ = engine.clock().wait(wait) => {}
            _ = engine.timers_changed.notified() => {}
            _ = stop.changed() => return,
        }
    }
}

/// Fires what is due and says what to wait for next: the earliest timer's due time, or
/// nothing (a new timer wakes the scheduler); `None` when it fired a whole batch.
pub async fn pass(engine: &Engine) -> anyhow::Result<Option<Wait>> {
    let fired = engine.fire_due_timers(BATCH).await?;
    if fired == BATCH {
        return Ok(None);
    }
    Ok(Some(
        engine
            .store
            .next_timer_at()?
            .map_or(Wait::Idle, Wait::Until),
    ))
}
