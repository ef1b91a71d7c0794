//! Flow hot reload: a change to the flow directory (watched with `notify`), SIGHUP or
//! `POST /admin/reload` loads the set again; a valid set is swapped in atomically, an invalid
//! one is logged with every problem and the live set stays.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::{mpsc, watch};

use crate::engine::Engine;
use crate::flows::{self, Problems};

pub struct Reloader {
    engine: Arc<Engine>,
    dir: PathBuf,
}

impl Reloader {
    pub fn new(engine: Arc<Engine>, dir: PathBuf) -> Reloader {
        Reloader { engine, dir }
    }

    /// Loads the flow directory; on success the new set is live. Returns its summary.
    pub fn reload(&self, why: &str) -> Result<String, Problems> {
        match flows::load_dir(&self.dir) {
            Ok(f) => {
                let summary = f.summary();
                self.engine.set_flows(f);
                crate::metrics::reload(true);
                tracing::info!(trigger = why, "flows reloaded: {summary}");
                Ok(summary)
            }
            Err(p) => {
                crate::metrics::reload(false);
                tracing::error!(
                    trigger = why,
                    "flow reload failed; the previous flows stay live. {} problem(s):\n{p}",
                    p.0.len()
                );
                Err(p)
            }
        }
    }

    /// Watches the flow directory until `stop`; edits settle for a moment before a reload.
    pub async fn watch(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let (tx, mut rx) = mpsc::unbounded_channel::<()>();
        let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            if let Ok(e) = event {
                let relevant = e
                    .paths
                    .iter()
                    .any(|p| p.extension().is_some_and(|x| x == "toml"));
                if relevant && !matches!(e.kind, notify::EventKind::Access(_)) {
                    let _ = tx.send(());
                }
            }
        });
        let mut watcher = match watcher {
            Ok(w) => w,
            Err(e) => {
                tracing::error!(
                    "cannot watch {}: {e}; use SIGHUP or POST /admin/reload",
                    self.dir.display()
                );
                return;
            }
        };
        if let Err(e) = watcher.watch(&self.dir, RecursiveMode::NonRecursive) {
            tracing::error!(
                "cannot watch {}: {e}; use SIGHUP or POST /admin/reload",
                self.dir.display()
            );
            return;
        }
        loop {
            tokio::select! {
                got = rx.recv() => {
                    if got.is_none() {
                        return;
                    }
                    // An editor's save is several events: wait until they stop.
                    loop {
                        tokio::select! {
                            more = rx.recv() => if more.is_none() { return },
                            _ = tokio::time::sleep(Duration::from_millis(250)) => break,
                        }
                    }
                    let _ = self.reload("file change");
                }
                _ = stop.changed() => return,
            }
        }
    }

    /// Reloads on SIGHUP until `stop`.
    pub async fn on_sighup(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            let Ok(mut hup) = signal(SignalKind::hangup()) else {
                return;
            };
            loop {
                tokio::select! {
                    got = hup.recv() => {
                        if got.is_none() {
                            return;
                        }
                        let _ = self.reload("SIGHUP");
                    }
                    _ = stop.changed() => return,
                }
            }
        }
        #[cfg(not(unix))]
        let _ = stop.changed().await;
    }
}
