//! The open HTTP connections, so that at the connection limit the one idle longest can be
//! closed to make room. Clients that hold connections open and send nothing (or a request
//! head a byte a minute) would otherwise keep Twilio's webhooks waiting in the kernel's
//! queue until the header read timeout: Twilio gives up on a webhook after 15 seconds.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::Notify;

/// Every open connection, by a number of its own.
pub struct Conns {
    open: Mutex<HashMap<u64, Arc<Conn>>>,
    next: AtomicU64,
    /// What `Conn::idle_since` counts from.
    epoch: Instant,
}

/// One connection as [`Conns`] sees it.
pub struct Conn {
    /// Requests in the handler or still sending their answer's body.
    busy: AtomicUsize,
    /// Of those, requests whose body has not all arrived: nothing of theirs has been acted on
    /// (every handler reads its whole body, or drops it unread, before it acts).
    arriving: AtomicUsize,
    /// When the connection opened or last finished an answer, in microseconds since
    /// [`Conns`]'s epoch.
    idle_since: AtomicU64,
    /// It has begun a request (so hyper has its answer to finish, or is idle between requests).
    served: AtomicBool,
    /// It has been asked to close (once is enough).
    asked: AtomicBool,
    ask: Notify,
}

impl Default for Conns {
    fn default() -> Self {
        Conns {
            open: Mutex::default(),
            next: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }
}

impl Conns {
    fn micros(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    fn open(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Conn>>> {
        // A panic elsewhere while holding it leaves the map as it was: still usable.
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new connection, idle since now; it is forgotten when the returned handle drops.
    pub fn add(self: &Arc<Self>) -> Opened {
        let conn = Arc::new(Conn {
            busy: AtomicUsize::new(0),
            arriving: AtomicUsize::new(0),
            idle_since: AtomicU64::new(self.micros()),
            served: AtomicBool::new(false),
            asked: AtomicBool::new(false),
            ask: Notify::new(),
        });
        let id = self.next.fetch_add(1, SeqCst);
        self.open().insert(id, conn.clone());
        Opened {
            id,
            tracker: Tracker {
                conns: self.clone(),
                conn,
            },
        }
    }

    /// Asks the connection idle longest (no request under way, or only one whose body is
    /// still arriving; not asked already) to close. Returns whether there was one.
    pub fn close_longest_idle(&self) -> bool {
        let open = self.open();
        // (Ties go to the one opened first.)
        let longest = open
            .iter()
            .filter(|(_, c)| c.idle() && !c.asked.load(SeqCst))
            .min_by_key(|(id, c)| (c.idle_since.load(SeqCst), **id));
        match longest {
            Some((_, conn)) => {
                conn.asked.store(true, SeqCst);
                // Stored if the connection is not waiting for it yet.
                conn.ask.notify_one();
                true
            }
            None => false,
        }
    }

    /// How many connections are open.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.open().len()
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Conn {
    /// Nothing of it is being acted on: no request, or only one whose body is still arriving.
    fn idle(&self) -> bool {
        let busy = self.busy.load(SeqCst);
        busy == 0 || busy == self.arriving.load(SeqCst)
    }
}

/// An open connection's handle: hears when it is asked to close; the connection is
/// forgotten when it drops.
pub struct Opened {
    id: u64,
    tracker: Tracker,
}

/// What marks a connection's requests busy (for its service, which hyper holds).
#[derive(Clone)]
pub struct Tracker {
    conns: Arc<Conns>,
    conn: Arc<Conn>,
}

impl Tracker {
    /// A request begins; it ends when the returned guard drops (keep it until the answer's
    /// body is sent).
    pub fn busy(&self) -> Busy {
        self.conn.served.store(true, SeqCst);
        self.conn.busy.fetch_add(1, SeqCst);
        // Counted from its start while its body arrives (see `Conns::close_longest_idle`).
        self.conn.idle_since.store(self.conns.micros(), SeqCst);
        Busy {
            conns: self.conns.clone(),
            conn: self.conn.clone(),
        }
    }

    /// A request's body, which must arrive whole within `within` of its head; while it
    /// arrives, the connection may be closed to make room (see [`Conns::close_longest_idle`]).
    pub fn arriving<B>(&self, body: B, within: std::time::Duration) -> Arriving<B>
    where
        B: http_body::Body + Unpin,
    {
        let whole = body.is_end_stream();
        if !whole {
            self.conn.arriving.fetch_add(1, SeqCst);
        }
        Arriving {
            body,
            conn: (!whole).then(|| self.conn.clone()),
            // (A body that is already whole, a GET's, has no use for a timer.)
            deadline: (!whole).then(|| Box::pin(tokio::time::sleep(within))),
            within,
        }
    }
}

/// A request body on its way in: refused once its time is up (a client sending it a byte at
/// a time holds its connection no longer), and counted as arriving until its end is read or
/// it is dropped (a handler that has no use for a body drops it before it runs).
pub struct Arriving<B> {
    body: B,
    /// Its connection, until the body has all arrived.
    conn: Option<Arc<Conn>>,
    deadline: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    within: std::time::Duration,
}

impl<B> Arriving<B> {
    fn arrived(&mut self) {
        if let Some(conn) = self.conn.take() {
            conn.arriving.fetch_sub(1, SeqCst);
        }
    }
}

impl<B> Drop for Arriving<B> {
    fn drop(&mut self) {
        self.arrived();
    }
}

/// Why a request body was refused: it took too long.
#[derive(Debug, thiserror::Error)]
#[error("the request body did not all arrive within {} s of the request's head", .0.as_secs_f64())]
pub struct TooSlow(std::time::Duration);

impl<B> http_body::Body for Arriving<B>
where
    B: http_body::Body + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = B::Data;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        use std::future::Future;
        use std::task::Poll;
        let this = self.get_mut();
        let late = |d: &mut std::pin::Pin<Box<tokio::time::Sleep>>| d.as_mut().poll(cx).is_ready();
        if this.conn.is_some() && this.deadline.as_mut().is_some_and(late) {
            this.arrived();
            return Poll::Ready(Some(Err(TooSlow(this.within).into())));
        }
        let polled = std::pin::Pin::new(&mut this.body).poll_frame(cx);
        match &polled {
            Poll::Ready(None) | Poll::Ready(Some(Err(_))) => this.arrived(),
            Poll::Ready(Some(Ok(_))) if this.body.is_end_stream() => this.arrived(),
            _ => {}
        }
        polled.map_err(Into::into)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

impl Opened {
    pub fn tracker(&self) -> Tracker {
        self.tracker.clone()
    }

    #[cfg(test)]
    pub fn busy(&self) -> Busy {
        self.tracker.busy()
    }

    #[cfg(test)]
    pub fn is_busy(&self) -> bool {
        self.tracker.conn.busy.load(SeqCst) > 0
    }

    /// Whether its one request under way is still receiving its body (so nothing of it has
    /// been acted on).
    pub fn only_arriving(&self) -> bool {
        let conn = &self.tracker.conn;
        conn.busy.load(SeqCst) > 0 && conn.idle()
    }

    /// Whether it has begun a request since it opened.
    pub fn has_served(&self) -> bool {
        self.tracker.conn.served.load(SeqCst)
    }

    /// Resolves once [`Conns::close_longest_idle`] picked this connection.
    pub async fn asked_to_close(&self) {
        self.tracker.conn.ask.notified().await;
    }
}

impl Drop for Opened {
    fn drop(&mut self) {
        self.tracker.conns.open().remove(&self.id);
    }
}

/// A request under way on a connection.
pub struct Busy {
    conns: Arc<Conns>,
    conn: Arc<Conn>,
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.conn.idle_since.store(self.conns.micros(), SeqCst);
        self.conn.busy.fetch_sub(1, SeqCst);
    }
}

/// A connection's socket, noting since when a write has waited for the client to read.
pub struct Watched<S> {
    inner: S,
    stall: Arc<Stall>,
}

/// Since when a connection's writes have waited, shared with the task that serves it.
pub struct Stall {
    epoch: Instant,
    /// Microseconds since `epoch` plus one when a write began to wait; 0 while none waits.
    since: AtomicU64,
}

impl Stall {
    /// Whether a write has waited `limit` or longer (the client reads nothing of it).
    pub fn for_at_least(&self, limit: std::time::Duration) -> bool {
        match self.since.load(SeqCst) {
            0 => false,
            since => self.epoch.elapsed().as_micros() >= u128::from(since - 1) + limit.as_micros(),
        }
    }

    fn note(&self, waiting: bool) {
        if !waiting {
            self.since.store(0, SeqCst);
        } else if self.since.load(SeqCst) == 0 {
            let now = u64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(u64::MAX - 1);
            self.since.store(now + 1, SeqCst);
        }
    }
}

impl<S> Watched<S> {
    pub fn new(inner: S) -> (Watched<S>, Arc<Stall>) {
        let stall = Arc::new(Stall {
            epoch: Instant::now(),
            since: AtomicU64::new(0),
        });
        (
            Watched {
                inner,
                stall: stall.clone(),
            },
            stall,
        )
    }

    fn noted<T>(&self, polled: std::task::Poll<T>) -> std::task::Poll<T> {
        self.stall.note(polled.is_pending());
        polled
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Watched<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Watched<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
        self.noted(polled)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.noted(polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_flush(cx);
        self.noted(polled)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_shutdown(cx);
        self.noted(polled)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::Conns;

    #[tokio::test]
    async fn the_connection_idle_longest_is_asked_to_close_and_one_under_way_never_is() {
        let conns = Arc::new(Conns::default());
        let first = conns.add();
        let second = conns.add();
        let third = conns.add();
        // The first is answering a request; the third finished one after the second opened.
        let under_way = first.busy();
        drop(third.busy());
        assert_eq!(conns.len(), 3);
        assert!(!second.has_served() && third.has_served());

        assert!(conns.close_longest_idle());
        second.asked_to_close().await;
        assert!(conns.close_longest_idle(), "the next idle one");
        third.asked_to_close().await;
        assert!(
            !conns.close_longest_idle(),
            "none left but the one under way"
        );

        drop(under_way);
        assert!(!first.is_busy());
        assert!(conns.close_longest_idle(), "idle once its answer is sent");
        first.asked_to_close().await;

        drop((first, second));
        assert_eq!(conns.len(), 1, "a closed connection is forgotten");
        drop(third);
        assert!(conns.is_empty());
    }
}
