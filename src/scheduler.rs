//! The timer worker: sleeps until the earliest stored timer (or until an earlier one is added)
//! and fires due timers through the engine. Timers live in sled, so they survive restarts.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::engine::Engine;

/// How many timers one pass fires before looking at the clock again.
const BATCH: usize = 256;
/// The longest sleep with nothing scheduled; a safety net, not a polling interval.
const IDLE: Duration = Duration::from_secs(3600);

pub async fn run(engine: Arc<Engine>, mut stop: watch::Receiver<bool>) {
    loop {
        if *stop.borrow() {
            return;
        }
        let wait = match pass(&engine).await {
            Ok(w) => w,
            Err(e) => {
                tracing::error!("firing timers failed: {e:#}");
                Duration::from_secs(1)
            }
        };
        if wait.is_zero() {
            continue;
        }
        tokio::select! {
            _ = engine.clock().sleep(wait) => {}
            _ = engine.timers_changed.notified() => {}
            _ = stop.changed() => return,
        }
    }
}

/// Fires what is due and says how long to sleep until the next timer.
pub async fn pass(engine: &Engine) -> anyhow::Result<Duration> {
    let fired = engine.fire_due_timers(BATCH).await?;
    if fired == BATCH {
        return Ok(Duration::ZERO);
    }
    Ok(match engine.store.next_timer_at()? {
        None => IDLE,
        Some(at) => (at - engine.clock().now())
            .to_std()
            .unwrap_or(Duration::ZERO)
            .min(IDLE),
    })
}
