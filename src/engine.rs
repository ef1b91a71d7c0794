//! The driver: for one event, load → `machine::step` → one atomic commit → durable → effects.
//! Every path that changes a subscriber (webhooks, timers, OTP, admin) goes through here.
//!
//! One writer thread owns all changes. It takes every event waiting at that moment, steps
//! each (a later event for the same number sees the earlier one's result), commits the whole
//! batch in one sled transaction and makes it durable with one `flush`; only then are the
//! callers answered (group commit). Events that arrive meanwhile wait in the channel and form
//! the next batch, so the busier the daemon, the more each flush carries.
//! sled takes a global lock for every transaction, so many threads committing at once mostly
//! wait on each other; one writer batching them does not. (A separate flusher thread, to
//! overlap a batch's flush with the next batch's commit, gains nothing: sled's `flush` holds
//! the global lock for reading while it waits for the disk, and a transaction's commit needs
//! it for writing, so the two never overlap; the extra hand-off only costs.)

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering, Ordering::Relaxed};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use chrono::{DateTime, Utc};
use tokio::sync::{oneshot, Notify};

use crate::clock::Clock;
use crate::flows::Flows;
use crate::machine::{self, Effect, Event, Outcome, Subscriber, Transition};
use crate::phone::Phone;
use crate::store::codec::{Replied, KEPT_REPLIES};
use crate::store::{Commit, DueTimer, HistoryEntry, Prepared, Store};

/// The most events one transaction carries.
const MAX_BATCH: usize = 512;

pub struct Engine {
    pub store: Arc<Store>,
    flows: Arc<ArcSwap<Flows>>,
    /// Woken when a timer is scheduled (the scheduler may need to wake earlier).
    pub timers_changed: Arc<Notify>,
    /// Woken when a message is queued.
    pub outbox_changed: Arc<Notify>,
    writer: Option<mpsc::Sender<Job>>,
    thread: Option<std::thread::JoinHandle<()>>,
    flow_swaps: AtomicU64,
    work: Arc<WriterWork>,
    clock: Clock,
}

/// What the writer thread has done since this engine started: how many commits, how many
/// events they carried, and the time spent stepping and committing, and making them durable.
/// Kept per engine (the `/metrics` counters and the benchmark read it), not per process.
#[derive(Default)]
pub struct WriterWork {
    commits: AtomicU64,
    events: AtomicU64,
    commit_nanos: AtomicU64,
    flush_nanos: AtomicU64,
}

/// A reading of [`WriterWork`]; the difference of two readings covers what happened between.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct WorkSnapshot {
    /// Commits made durable: batches that carried events, and erases (a batch of bare
    /// flushes, or one whose transaction failed, is none).
    pub commits: u64,
    /// Events they carried (an erase carries none; a duplicate webhook is no event).
    pub events: u64,
    /// Reading, stepping and committing (one sled transaction per batch).
    pub commit: Duration,
    /// Waiting for `flush` (the disk).
    pub flush: Duration,
}

impl WriterWork {
    fn record(&self, events: usize, commit: Duration, flush: Duration) {
        let nanos = |d: Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.commits.fetch_add(1, Relaxed);
        self.events.fetch_add(events as u64, Relaxed);
        self.commit_nanos.fetch_add(nanos(commit), Relaxed);
        self.flush_nanos.fetch_add(nanos(flush), Relaxed);
    }

    pub fn snapshot(&self) -> WorkSnapshot {
        WorkSnapshot {
            commits: self.commits.load(Relaxed),
            events: self.events.load(Relaxed),
            commit: Duration::from_nanos(self.commit_nanos.load(Relaxed)),
            flush: Duration::from_nanos(self.flush_nanos.load(Relaxed)),
        }
    }
}

impl WorkSnapshot {
    /// What happened between `earlier` and this reading.
    pub fn since(&self, earlier: &WorkSnapshot) -> WorkSnapshot {
        WorkSnapshot {
            commits: self.commits.saturating_sub(earlier.commits),
            events: self.events.saturating_sub(earlier.events),
            commit: self.commit.saturating_sub(earlier.commit),
            flush: self.flush.saturating_sub(earlier.flush),
        }
    }
}

/// What an event did. (No `Debug`: it may hold codes.)
#[derive(Clone)]
pub struct Applied {
    pub outcome: Outcome,
    /// Direct replies (TwiML `<Message>`s), in order.
    pub replies: Vec<String>,
    /// Codes the caller delivers itself (`Input::inline_codes`): (message text, digits).
    pub codes: Vec<(String, String)>,
    /// The stored answer to an inbound webhook, when the event was one.
    pub twiml: Option<String>,
    /// The same inbound message was already processed; `twiml` is the original answer.
    pub duplicate: bool,
}

/// An event and what else must happen in its commit.
pub struct Input<'a> {
    pub phone: &'a Phone,
    pub event: Event,
    /// The provider's id of an inbound message, for exactly-once processing.
    pub inbound_sid: Option<&'a str>,
    /// The stored timer this event consumes.
    pub fired: Option<DueTimer>,
    /// Return issued codes to the caller instead of queueing them (the OTP API sends at
    /// once so its caller learns of a failure; the voice menu reads them aloud).
    pub inline_codes: bool,
    /// The number of ours the text or call came to (Twilio's `To`), kept in the record:
    /// messages to the number are sent from it.
    pub to: Option<&'a Phone>,
}

enum Job {
    Apply {
        phone: Phone,
        event: Event,
        inbound_sid: Option<String>,
        fired: Option<DueTimer>,
        inline_codes: bool,
        to: Option<Phone>,
        done: oneshot::Sender<anyhow::Result<Applied>>,
    },
    /// Just make everything so far durable.
    Flush(oneshot::Sender<anyhow::Result<Applied>>),
    /// Erase a number and everything about it (a privacy request).
    Erase(Phone, oneshot::Sender<anyhow::Result<bool>>),
    /// Forget the numbers of these a retention may forget, silent since the time given (see
    /// [`Engine::forget`]).
    Forget(
        Vec<Phone>,
        DateTime<Utc>,
        oneshot::Sender<anyhow::Result<u64>>,
    ),
}

impl Engine {
    /// An engine on the system clock.
    pub fn new(store: Store, flows: Flows) -> Engine {
        Engine::with_clock(store, flows, Clock::system())
    }

    /// An engine whose events happen at `clock`'s time (a test's manual clock).
    pub fn with_clock(store: Store, flows: Flows, clock: Clock) -> Engine {
        let store = Arc::new(store);
        let flows = Arc::new(ArcSwap::from_pointee(flows));
        let timers_changed = Arc::new(Notify::new());
        let outbox_changed = Arc::new(Notify::new());
        let (tx, rx) = mpsc::channel();
        let work = Arc::new(WriterWork::default());
        let writer = Writer {
            work: work.clone(),
            store: store.clone(),
            flows: flows.clone(),
            timers_changed: timers_changed.clone(),
            outbox_changed: outbox_changed.clone(),
            clock: clock.clone(),
            codes_issued: store.codes_hour().into(),
        };
        let thread = std::thread::Builder::new()
            .name("smsflow-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| tracing::error!("cannot start the writer thread: {e}"))
            .ok();
        Engine {
            store,
            flows,
            timers_changed,
            outbox_changed,
            writer: Some(tx),
            thread,
            flow_swaps: Default::default(),
            work,
            clock,
        }
    }

    /// The clock events are stepped at, and timers and retries are due by.
    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    /// What the writer has done so far (commits, events, time committing and flushing).
    pub fn writer_work(&self) -> WorkSnapshot {
        self.work.snapshot()
    }

    /// How many times this engine's flows were swapped since it started (reloads).
    pub fn flow_swaps(&self) -> u64 {
        self.flow_swaps.load(Ordering::SeqCst)
    }

    pub fn flows(&self) -> Arc<Flows> {
        self.flows.load_full()
    }

    /// Swaps in a new flow set; readers see either the old or the new one, never a mix.
    pub fn set_flows(&self, flows: Flows) {
        // Counted first: whoever sees the new set sees it counted.
        self.flow_swaps.fetch_add(1, Ordering::SeqCst);
        self.flows.store(Arc::new(flows));
        // Timers may now mean something else; let the scheduler look again. And the outbox:
        // a follow-up held for quiet hours may be due under the new ones.
        self.timers_changed.notify_one();
        self.outbox_changed.notify_one();
    }

    /// Applies one event and returns once its changes are on disk.
    pub async fn apply(&self, input: Input<'_>) -> anyhow::Result<Applied> {
        let (done, answer) = oneshot::channel();
        self.send(Job::Apply {
            phone: input.phone.clone(),
            event: input.event,
            inbound_sid: input.inbound_sid.map(str::to_string),
            fired: input.fired,
            inline_codes: input.inline_codes,
            to: input.to.cloned(),
            done,
        })?;
        answer
            .await
            .map_err(|_| anyhow::anyhow!("the writer thread stopped"))?
    }

    /// Applies an event that is not a webhook, timer or inline-code request.
    pub async fn event(&self, phone: &Phone, event: Event) -> anyhow::Result<Applied> {
        self.apply(Input {
            phone,
            event,
            inbound_sid: None,
            fired: None,
            inline_codes: false,
            to: None,
        })
        .await
    }

    /// Waits until everything written so far (by any path) is on disk.
    pub async fn durable(&self) -> anyhow::Result<()> {
        let (done, answer) = oneshot::channel();
        self.send(Job::Flush(done))?;
        answer
            .await
            .map_err(|_| anyhow::anyhow!("the writer thread stopped"))?
            .map(|_| ())
    }

    fn send(&self, job: Job) -> anyhow::Result<()> {
        self.writer
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("the engine is stopped"))?
            .send(job)
            .map_err(|_| anyhow::anyhow!("the writer thread stopped"))
    }

    /// Erases a number (durably); false when it was unknown.
    pub async fn erase(&self, phone: &Phone) -> anyhow::Result<bool> {
        let (done, answer) = oneshot::channel();
        self.send(Job::Erase(phone.clone(), done))?;
        answer
            .await
            .map_err(|_| anyhow::anyhow!("the writer thread stopped"))?
    }

    /// Erases those of `phones` that a retention may forget ([`Subscriber::forgettable`]:
    /// silent since `before`) and have no message queued, as looked at again by the writer,
    /// where nothing changes them meanwhile (one may have texted since it was listed); how
    /// many were erased, durably.
    pub async fn forget(&self, phones: Vec<Phone>, before: DateTime<Utc>) -> anyhow::Result<u64> {
        let (done, answer) = oneshot::channel();
        self.send(Job::Forget(phones, before, done))?;
        answer
            .await
            .map_err(|_| anyhow::anyhow!("the writer thread stopped"))?
    }

    /// Subscribers per state, in [`crate::machine::State::NAMES`] order.
    pub fn state_counts(&self) -> [i64; 5] {
        self.store.state_counts()
    }

    /// Fires every timer due now (at most `limit`); returns how many fired.
    pub async fn fire_due_timers(&self, limit: usize) -> anyhow::Result<usize> {
        let due = self.store.due_timers(self.clock.now(), limit)?;
        let n = due.len();
        let mut waiting = Vec::with_capacity(n);
        // Hand them all to the writer at once so they share one commit.
        for d in due {
            let (done, answer) = oneshot::channel();
            self.send(Job::Apply {
                phone: d.phone.clone(),
                event: Event::TimerDue(d.timer),
                inbound_sid: None,
                fired: Some(d),
                inline_codes: false,
                to: None,
                done,
            })?;
            waiting.push(answer);
        }
        for answer in waiting {
            answer
                .await
                .map_err(|_| anyhow::anyhow!("the writer thread stopped"))??;
        }
        Ok(n)
    }
}

/// Stopping joins the writer, so the database is closed when the engine is gone and a
/// restart in the same process can open the data dir at once.
impl Drop for Engine {
    fn drop(&mut self) {
        self.writer.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Writer {
    work: Arc<WriterWork>,
    store: Arc<Store>,
    flows: Arc<ArcSwap<Flows>>,
    timers_changed: Arc<Notify>,
    outbox_changed: Arc<Notify>,
    clock: Clock,
    /// The codes of the last hour by minute, oldest first: `verify.max_codes_per_hour` is
    /// counted here, and kept in the store by each commit that changes it (a restart goes on
    /// with the same hour).
    codes_issued: VecDeque<machine::CodeMinute>,
}

type Done = oneshot::Sender<anyhow::Result<Applied>>;

/// Runs the writer's `work`; should it panic, `store` is marked failed (see [`Writer::run`]).
fn failing_on_panic(store: &Store, work: impl FnOnce()) {
    if let Err(panic) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(work)) {
        let why = format!(
            "the writer thread panicked, a bug in smsflow or sled: {}",
            crate::panic_text(&*panic)
        );
        tracing::error!("{why}");
        store.fail(why);
    }
}

/// A committed batch waiting to become durable before its callers hear back.
struct Committed {
    /// Events the batch's transaction carried (0: it carried none, or it failed).
    events: usize,
    answers: Vec<(Done, Applied)>,
    flush_only: Vec<Done>,
    timers: bool,
    outbox: bool,
    /// The kind of each history entry the batch committed.
    recorded: Vec<&'static str>,
}

impl Writer {
    /// Serves jobs until every sender is gone. Should it panic (sled 0.34 panics on some
    /// damage it meets; a bug), nothing more can change: the store is marked failed, so the
    /// daemon stops (exit 3) and `/healthz` says so, rather than answering every webhook 500
    /// while it looks alive. (Waiting callers hear "the writer thread stopped".)
    fn run(self, rx: mpsc::Receiver<Job>) {
        let store = self.store.clone();
        failing_on_panic(&store, || self.serve(rx));
    }

    fn serve(mut self, rx: mpsc::Receiver<Job>) {
        while let Ok(first) = rx.recv() {
            let mut segment = Vec::new();
            for job in std::iter::once(first).chain(rx.try_iter().take(MAX_BATCH - 1)) {
                match job {
                    // Erases are rare: commit what came before, then erase on its own, in order.
                    Job::Erase(phone, done) => {
                        self.commit_and_finish(std::mem::take(&mut segment));
                        let _ = done.send(self.erase(&phone));
                    }
                    Job::Forget(phones, before, done) => {
                        self.commit_and_finish(std::mem::take(&mut segment));
                        let _ = done.send(self.forget(&phones, before));
                    }
                    other => segment.push(other),
                }
            }
            self.commit_and_finish(segment);
        }
    }

    /// Counts the codes `t` issued (see [`machine::count_codes`]); whether that changed
    /// anything.
    fn count_codes(&mut self, t: &machine::Transition, now: DateTime<Utc>) -> bool {
        machine::count_codes(&mut self.codes_issued, t, now)
    }

    /// A batch's whole way: stepped and committed, then durable and answered.
    fn commit_and_finish(&mut self, jobs: Vec<Job>) {
        let started = Instant::now();
        let committed = self.batch(jobs);
        self.finish(committed, started.elapsed());
    }

    fn erase(&self, phone: &Phone) -> anyhow::Result<bool> {
        let started = Instant::now();
        let gone = self.store.erase(phone)?;
        let flushing = Instant::now();
        // Even when nothing was there: an earlier erase whose flush failed is made durable
        // by its retry.
        self.flush()?;
        if gone {
            // A commit that carries no event.
            self.work.record(0, flushing - started, flushing.elapsed());
        }
        Ok(gone)
    }

    /// See [`Engine::forget`].
    fn forget(&self, phones: &[Phone], before: DateTime<Utc>) -> anyhow::Result<u64> {
        let started = Instant::now();
        let mut gone = 0;
        for phone in phones {
            let still = match self.store.record(phone) {
                Ok(Some((sub, _))) => sub.forgettable(before) && !self.store.has_queued(phone)?,
                Ok(None) => false,
                // Left for an operator, as the listing leaves it.
                Err(e) if crate::store::codec::is_unreadable(&e) => false,
                Err(e) => return Err(e),
            };
            if still && self.store.erase(phone)? {
                gone += 1;
            }
        }
        let flushing = Instant::now();
        self.flush()?;
        if gone > 0 {
            self.work.record(0, flushing - started, flushing.elapsed());
        }
        Ok(gone)
    }

    /// Flushes the store, and wakes the outbox when queued messages became durable by it (those
    /// of an earlier batch whose own flush failed too).
    fn flush(&self) -> anyhow::Result<()> {
        let before = self.store.outbox_durable_below();
        let flushed = self.store.flush();
        if self.store.outbox_durable_below() > before {
            self.outbox_changed.notify_one();
        }
        flushed
    }

    /// Steps and commits a batch; answers failures at once and returns what awaits a flush.
    fn batch(&mut self, jobs: Vec<Job>) -> Option<Committed> {
        if jobs.is_empty() {
            return None;
        }
        let now = self.clock.now();
        let flows = self.flows.load_full();
        let mut rng = rand::rng();
        // The hour's codes as they were: a batch whose commit fails issued none.
        let codes_before = self.codes_issued.clone();
        // Within a batch, later events see earlier ones' results.
        let mut latest: HashMap<Phone, (Subscriber, Vec<Replied>)> = HashMap::new();
        // Whether the hour's codes changed (kept by the same commit when they did).
        let mut codes_changed = false;
        // Numbers whose state machine failed in this batch: their state within the batch is
        // lost, so their later events here are refused rather than stepped from a stale one.
        let mut failed: Vec<Phone> = Vec::new();
        let mut prepared = Vec::new();
        // Each number's last history entry as this batch left it, once looked up.
        let mut last_entry: HashMap<Phone, Option<machine::Record>> = HashMap::new();
        let mut committed = Committed {
            events: 0,
            answers: Vec::new(),
            flush_only: Vec::new(),
            timers: false,
            outbox: false,
            recorded: Vec::new(),
        };
        for job in jobs {
            let (phone, event, sid, fired, inline, to, done) = match job {
                Job::Flush(done) => {
                    committed.flush_only.push(done);
                    continue;
                }
                Job::Erase(_, done) => {
                    // `run` takes erases out of batches; never reached.
                    let _ = done.send(Err(anyhow::anyhow!("erase inside a batch")));
                    continue;
                }
                Job::Forget(_, _, done) => {
                    let _ = done.send(Err(anyhow::anyhow!("forget inside a batch")));
                    continue;
                }
                Job::Apply {
                    phone,
                    event,
                    inbound_sid,
                    fired,
                    inline_codes,
                    to,
                    done,
                } => (phone, event, inbound_sid, fired, inline_codes, to, done),
            };
            if failed.contains(&phone) {
                let _ = done.send(Err(anyhow::anyhow!(
                    "an earlier event for this number failed in the same batch; try again"
                )));
                continue;
            }
            let mut is_new = false;
            let (sub, mut replies) = match latest.remove(&phone) {
                Some(r) => r,
                None => match self.store.record(&phone) {
                    Ok(Some(r)) => r,
                    Ok(None) => {
                        is_new = true;
                        (Subscriber::new(phone.clone(), now), Vec::new())
                    }
                    Err(e) => {
                        // A due timer of a record that cannot be read would fire again every
                        // second: it is dropped (logged), and the record waits for an operator.
                        // (A storage error is not that: the timer stays and fires again.)
                        let unreadable = crate::store::codec::is_unreadable(&e);
                        if let (Some(timer), true) = (fired, unreadable) {
                            tracing::error!(phone = %phone.masked(), "dropping a due timer: {e:#}");
                            prepared.push(consume_only(timer, now));
                        }
                        let _ = done.send(Err(e));
                        continue;
                    }
                },
            };
            // The same inbound message again: the same answer, nothing changes.
            if let Some(earlier) = sid
                .as_ref()
                .and_then(|s| replies.iter().find(|r| r.sid == *s))
            {
                committed
                    .answers
                    .push((done, duplicate(earlier.twiml.clone())));
                if !is_new {
                    latest.insert(phone, (sub, replies));
                }
                continue;
            }
            // Which of our numbers it wrote to or called, for what is sent to it later.
            let mut sub = sub;
            if let Some(to) = to {
                sub.via = Some(to);
            }
            // The codes every number together may still be sent this hour.
            let most = flows.verify.max_codes_per_hour;
            let limits = machine::Limits {
                codes_refused_until: machine::codes_refused_until(&self.codes_issued, most, now),
            };
            // A bug in a rule must cost one request, not the writer thread.
            let stepped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                machine::step_within(sub, &event, &flows, now, &mut rng, limits)
            }));
            let t = match stepped {
                Ok(t) => {
                    codes_changed |= self.count_codes(&t, now);
                    t
                }
                Err(_) => {
                    tracing::error!(phone = %phone.masked(), "the state machine panicked; event not applied");
                    // A due timer would panic again every second: it is dropped, as for a
                    // record that cannot be read.
                    if let Some(timer) = fired {
                        tracing::error!(phone = %phone.masked(), "dropping the due timer it panicked on");
                        prepared.push(consume_only(timer, now));
                    }
                    failed.push(phone);
                    let _ = done.send(Err(anyhow::anyhow!(
                        "the state machine failed on this event"
                    )));
                    continue;
                }
            };
            // A code an app (or a caller) asked for a number we never met, refused because the
            // hour's codes are spent: were it kept, each refused request of a flooded sign-up
            // page would leave a record for ever.
            let refused_stranger = matches!(
                event,
                Event::OtpRequested | Event::VoiceCodeRequested | Event::VoiceOptIn
            ) && matches!(t.outcome, Outcome::RateLimited { .. });
            if is_new && (!event.creates_subscriber() || refused_stranger) {
                // Nothing to remember about a number we never met (e.g. validate_otp). A timer
                // that outlived its number is consumed all the same, or it would fire for ever.
                if let Some(timer) = fired {
                    prepared.push(consume_only(timer, now));
                }
                let (commit, applied) = to_commit(t, None, None, inline, now);
                if refused_stranger {
                    // Counted all the same: the metric is where such a flood shows.
                    (committed.recorded).extend(commit.history.iter().map(|h| h.record.name()));
                }
                committed.answers.push((done, applied));
                continue;
            }
            let (mut commit, applied) = to_commit(t, sid.as_deref(), fired, inline, now);
            if let (Some(sid), Some(twiml)) = (sid, &applied.twiml) {
                replies.push(Replied {
                    sid,
                    twiml: twiml.clone(),
                });
                let extra = replies.len().saturating_sub(KEPT_REPLIES);
                replies.drain(..extra);
            }
            commit.replies = replies;
            committed.timers |= !commit.schedule.is_empty();
            committed.outbox |= !commit.outgoing.is_empty();
            (committed.recorded).extend(commit.history.iter().map(|h| h.record.name()));
            // A refusal right after the same refusal adds nothing to the number's history (an
            // app or a texter asking again and again, or trying a locked code, would fill it);
            // the metric counts every one.
            let known = match last_entry.remove(&phone) {
                Some(last) => Some(last),
                None if commit.history.iter().any(|h| repeats(&h.record)) => {
                    Some((self.store.last_history(&phone).ok().flatten()).map(|h| h.record))
                }
                None => None,
            };
            let mut last = known.clone().flatten();
            commit.history.retain(|h| {
                let again = repeats(&h.record) && last.as_ref() == Some(&h.record);
                last = Some(h.record.clone());
                !again
            });
            // (Not looked up, and nothing added: still unknown.)
            if known.is_some() || last.is_some() {
                last_entry.insert(phone.clone(), last);
            }
            prepared.push(Prepared::new(&commit, now));
            if let Some(s) = commit.subscriber.take() {
                latest.insert(phone, (s, commit.replies));
            }
            committed.answers.push((done, applied));
        }
        if !prepared.is_empty() {
            let codes_hour = codes_changed.then(|| Vec::from(self.codes_issued.clone()));
            if let Err(e) = self.store.commit_prepared(&prepared, codes_hour.as_deref()) {
                self.codes_issued = codes_before;
                let msg = format!("{e:#}");
                for (done, _) in committed.answers {
                    let _ = done.send(Err(anyhow::anyhow!("committing the event: {msg}")));
                }
                committed.answers = Vec::new();
                committed.recorded = Vec::new();
                if committed.flush_only.is_empty() {
                    return None;
                }
            } else {
                committed.events = prepared.len();
            }
        }
        Some(committed)
    }

    /// One flush for the committed batch, then the answers and the wake-ups. A commit that
    /// carried events (`commit` long) is counted once durable, before anyone hears back.
    fn finish(&self, batch: Option<Committed>, commit: Duration) {
        let Some(b) = batch else { return };
        let flushing = Instant::now();
        let flushed = self.flush().map_err(|e| format!("{e:#}"));
        if flushed.is_ok() && b.events > 0 {
            self.work.record(b.events, commit, flushing.elapsed());
        }
        // Committed, they stand (counted as committed; a failed flush means the disk failed:
        // every later flush fails too, see `Store::flush`, and the daemon stops).
        crate::metrics::recorded(&b.recorded);
        // Even when the flush failed: the commit stands, so an earlier timer must not wait
        // for the scheduler's next look (up to an hour when it had none), and the outbox,
        // which sends only what a flush made durable, asks for one itself.
        if b.timers {
            self.timers_changed.notify_one();
        }
        if b.outbox {
            self.outbox_changed.notify_one();
        }
        for (done, applied) in b.answers {
            let _ = done.send(match &flushed {
                Ok(()) => Ok(applied),
                Err(e) => Err(anyhow::anyhow!("making the event durable: {e}")),
            });
        }
        for done in b.flush_only {
            let _ = done.send(match &flushed {
                Ok(()) => Ok(duplicate(String::new())),
                Err(e) => Err(anyhow::anyhow!("flushing: {e}")),
            });
        }
    }
}

/// A refusal kept once in a row: the same one again says nothing new. (A wrong guess is
/// always kept: each counts against its code.)
fn repeats(record: &machine::Record) -> bool {
    use machine::Record::*;
    match record {
        CodeRateLimited => true,
        CodeRejected { reason } => reason != "wrong",
        _ => false,
    }
}

/// A commit that only consumes a due timer (its number has no record, or none readable).
fn consume_only(timer: DueTimer, now: DateTime<Utc>) -> Prepared {
    Prepared::new(
        &Commit {
            fired: Some(timer),
            ..Commit::default()
        },
        now,
    )
}

fn duplicate(twiml: String) -> Applied {
    Applied {
        outcome: Outcome::Ignored,
        replies: Vec::new(),
        codes: Vec::new(),
        twiml: Some(twiml),
        duplicate: true,
    }
}

/// Turns a transition's effects into the store commit and the caller's answer.
fn to_commit(
    t: Transition,
    inbound_sid: Option<&str>,
    fired: Option<DueTimer>,
    inline_codes: bool,
    now: DateTime<Utc>,
) -> (Commit, Applied) {
    let mut c = Commit {
        follow_up: fired.is_some(),
        fired,
        ..Commit::default()
    };
    let mut replies = Vec::new();
    let mut codes = Vec::new();
    for e in t.effects {
        match e {
            Effect::Reply(text) => replies.push(text),
            Effect::Send(text) => c.outgoing.push((text, false)),
            Effect::SendCode { text, code } if inline_codes => codes.push((text, code.0)),
            Effect::SendCode { text, code } => {
                c.code_expires_at = t
                    .subscriber
                    .codes
                    .iter()
                    .rev()
                    .find(|issued| issued.code == code.0)
                    .map(|issued| issued.expires_at);
                c.outgoing.push((text, true));
            }
            Effect::Schedule(timer) => c.schedule.push(timer),
            Effect::Cancel(timer) => c.cancel.push(timer),
            Effect::Record(record) => c.history.push(HistoryEntry { at: now, record }),
            // Counted by the writer (`count_codes`), nothing to store.
            Effect::CodeWithdrawn { .. } => {}
        }
    }
    let twiml = inbound_sid.map(|_| crate::twiml::messages(&replies));
    c.subscriber = Some(t.subscriber);
    let applied = Applied {
        outcome: t.outcome,
        replies,
        codes,
        twiml,
        duplicate: false,
    };
    (c, applied)
}

#[cfg(test)]
mod tests {
    /// A panic on the writer thread fails the store (the daemon then stops, exit 3, and
    /// `/healthz` says so) instead of leaving a daemon that cannot change anything.
    #[test]
    fn a_panic_on_the_writer_thread_marks_the_store_failed() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::Store::open(dir.path()).unwrap();
        assert_eq!(store.failure(), None);
        super::failing_on_panic(&store, || {});
        assert_eq!(store.failure(), None);
        super::failing_on_panic(&store, || panic!("boom"));
        let why = store.failure().unwrap();
        assert!(
            why.contains("writer thread panicked") && why.contains("boom"),
            "{why}"
        );
    }
}
