//! Group commit: one thread flushes sled for every caller waiting at that moment.
//!
//! Calling `flush_async` per request collapses under concurrency (about 10 requests/s at 16
//! connections on this kind of machine); one flusher that batches every waiting commit into a
//! single `flush` keeps durable writes cheap.

use std::sync::mpsc;

use tokio::sync::oneshot;

type Waiter = oneshot::Sender<Result<(), String>>;

pub struct Flusher {
    tx: Option<mpsc::Sender<Waiter>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Flusher {
    pub fn start(db: sled::Db) -> Flusher {
        let (tx, rx) = mpsc::channel::<Waiter>();
        let spawned = std::thread::Builder::new()
            .name("smsflow-flusher".into())
            .spawn(move || {
                // Ends when every Store (and so every sender) is gone.
                while let Ok(first) = rx.recv() {
                    let mut batch = vec![first];
                    batch.extend(rx.try_iter());
                    let result = db.flush().map(|_| ()).map_err(|e| e.to_string());
                    for waiter in batch {
                        let _ = waiter.send(result.clone());
                    }
                }
            });
        let thread = spawned
            .map_err(|e| {
                tracing::error!("cannot start the flusher thread: {e}; durability waits will fail")
            })
            .ok();
        Flusher {
            tx: Some(tx),
            thread,
        }
    }

    /// Resolves once a flush that began after this call has finished.
    pub async fn flush(&self) -> anyhow::Result<()> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("the flusher is stopped"))?
            .send(tx)
            .map_err(|_| anyhow::anyhow!("the flusher thread is gone"))?;
        rx.await
            .map_err(|_| anyhow::anyhow!("the flusher thread is gone"))?
            .map_err(|e| anyhow::anyhow!("flushing the store: {e}"))
    }
}

/// Stopping joins the thread, so its handle on the database is gone when the store is:
/// a restart in the same process can open the data dir again at once.
impl Drop for Flusher {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
