//! The outbox worker: delivers queued messages through the provider, in order per number,
//! at most `send_rate` per second from each sender, retrying temporary failures with backoff
//! and jitter.
//! Nothing is dropped silently: every message ends as a delivery record.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use rand::RngExt;
use tokio::sync::watch;
use tokio::task::{self, JoinSet};
use tokio::time::Instant;

use crate::clock::Wait;
use crate::engine::Engine;
use crate::machine::{Event, State};
use crate::phone::Phone;
use crate::provider::{Provider, SendError};
use crate::store::codec;
use crate::store::{Delivery, OutMessage};

/// After this many temporary failures a message is recorded as failed (not for a failure
/// that is no fault of the message, such as a refused account: see [`SendError::Temporary`]).
const MAX_ATTEMPTS: u32 = 30;
/// Tries that may have reached Twilio (no answer came: see [`SendError::Temporary`]) a
/// message has at most: a Twilio slow to answer but sending would otherwise send it up to
/// `MAX_ATTEMPTS` times. (Tries Twilio surely did not take, such as a 503 or a refused
/// connection, do not count.)
const MAYBE_SENT_ATTEMPTS: u32 = 2;
/// The tries a message counts at most for failures that are no fault of its own (see
/// [`SendError::Temporary`]).
const ACCOUNT_ATTEMPTS: u32 = MAX_ATTEMPTS / 2;
const MAX_BACKOFF: Duration = Duration::from_secs(600);
/// The longest wait a provider's `Retry-After` is obeyed for; asking longer is read as this.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);
/// The longest a `Retry-After` holds every send (see [`Hold`]); the refused message itself
/// waits up to [`MAX_RETRY_AFTER`]. One answer must not hold the codes numbers ask for
/// meanwhile until they expire.
const MAX_HOLD: Duration = Duration::from_secs(120);
/// Twilio: "Attempt to send to unsubscribed recipient".
pub const UNSUBSCRIBED: u32 = 21610;

pub struct Outbox {
    engine: Arc<Engine>,
    provider: Arc<Provider>,
    interval: Duration,
    retry_base: Duration,
    /// How many queued messages one look reads at most (see [`READ_BUDGET`]).
    read_budget: usize,
    /// Each sender's next send slot, by the `From` (or messaging service) it sends as.
    next_slot: HashMap<String, Instant>,
    /// Queued entries that cannot be read, already logged (each is logged once, then skipped).
    unreadable: HashSet<String>,
    /// What the last look found when nothing was ready, so that a wake-up for a newly queued
    /// message reads only the new ones instead of the whole backlog (a long outage).
    waiting: Option<Waiting>,
    /// Messages whose send is in flight (at most [`IN_FLIGHT`]), and their numbers: none of
    /// a number's messages is picked while one of its own is.
    flying: HashMap<u64, Phone>,
    /// The sends in flight, each recording its outcome and making it durable.
    sends: JoinSet<anyhow::Result<()>>,
    /// The message each send in flight is for.
    task_of: HashMap<task::Id, u64>,
    /// The flows the last look ran under: when others go live, follow-ups held for the old
    /// quiet hours are looked at again.
    flows_seen: Arc<crate::flows::Flows>,
    /// Until when no send starts at all: Twilio answered a `Retry-After` (see [`Hold`]).
    hold: Hold,
    stop: watch::Receiver<bool>,
}

/// A time before which the outbox starts no send, whoever it is for. A 429 (Twilio's 20429:
/// too many requests at once for the account) or a 5xx with a `Retry-After` speaks of
/// Twilio or the account, not of the message refused: the others would only meet it too.
#[derive(Clone, Default)]
struct Hold(Arc<std::sync::Mutex<Option<Instant>>>);

impl Hold {
    /// No send starts for `wait` from now (or until a later time already set).
    fn at_least(&self, wait: Duration) {
        let until = Instant::now() + wait;
        let mut held = self.0.lock().unwrap_or_else(|e| e.into_inner());
        *held = Some(held.map_or(until, |at| at.max(until)));
    }

    /// Until when, if that is still to come.
    fn until(&self) -> Option<Instant> {
        let held = *self.0.lock().unwrap_or_else(|e| e.into_inner());
        held.filter(|at| *at > Instant::now())
    }
}

/// How many sends may be in flight at once, each to a different number: with one at a time,
/// the provider's answer time (100 to 300 ms for Twilio) capped the outbox at a few messages
/// a second, whatever the senders' rates allowed.
pub const IN_FLIGHT: usize = 16;

/// What a send in flight needs, apart from the outbox.
struct Flight {
    engine: Arc<Engine>,
    provider: Arc<Provider>,
    retry_base: Duration,
    hold: Hold,
}

/// What one unit of work did.
#[derive(Debug, PartialEq, Eq)]
pub enum Worked {
    /// One message's send began, or it was held, suppressed or failed, or a send landed (or
    /// a queued one is now on disk, or this look read its share of a long queue): look again
    /// at once.
    One,
    /// Nothing is ready: the earliest retry is due at `retry` (on the daemon's clock), and
    /// the earliest message waiting for its sender's turn may go at `turn` (real time).
    Idle {
        retry: Option<DateTime<Utc>>,
        turn: Option<Instant>,
    },
}

/// What a look at the newly queued messages found.
enum Read {
    /// The first that can be sent now.
    Found(u64, OutMessage),
    /// None that can be sent now.
    Nothing,
    /// One committed but not yet flushed: nothing after it is read until it is on disk.
    Unflushed,
    /// This look has read its share ([`READ_BUDGET`]): the next reads on.
    More,
}

/// How many queued messages one look reads at most: a backlog whose messages all wait for
/// their sender's turn is read in slices, the runtime's other tasks served in between.
pub const READ_BUDGET: usize = 512;

impl Outbox {
    pub fn new(
        engine: Arc<Engine>,
        provider: Arc<Provider>,
        send_rate: f64,
        retry_base: Duration,
        read_budget: usize,
        stop: watch::Receiver<bool>,
    ) -> Outbox {
        Outbox {
            flows_seen: engine.flows(),
            engine,
            provider,
            interval: Duration::from_secs_f64(1.0 / send_rate),
            retry_base,
            read_budget: read_budget.max(1),
            next_slot: HashMap::new(),
            unreadable: HashSet::new(),
            waiting: None,
            flying: HashMap::new(),
            sends: JoinSet::new(),
            task_of: HashMap::new(),
            hold: Hold::default(),
            stop,
        }
    }

    pub async fn run(mut self) {
        let mut stop = self.stop.clone();
        loop {
            if *stop.borrow() {
                break;
            }
            if self.engine.store.failure().is_some() {
                // What it sent could not be recorded, to be sent again after the restart:
                // nothing more goes out; the daemon is stopping.
                let _ = stop.wait_for(|s| *s).await;
                break;
            }
            let (wait, turn) = match self.try_deliver_one().await {
                // (A look may send nothing and await nothing: the others' turn first.)
                Ok(Worked::One) => {
                    tokio::task::yield_now().await;
                    continue;
                }
                // The next retry's time; or nothing queued (a new message wakes the outbox).
                Ok(Worked::Idle { retry, turn }) => (retry.map_or(Wait::Idle, Wait::Until), turn),
                Err(e) => {
                    tracing::error!("outbox: {e:#}");
                    (Wait::Retry, None)
                }
            };
            let turn_comes = async {
                match turn {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            let flying = !self.sends.is_empty();
            tokio::select! {
                _ = self.engine.clock().wait(wait) => {}
                _ = turn_comes => {}
                _ = self.engine.outbox_changed.notified() => {}
                Some(landed) = self.sends.join_next_with_id(), if flying => self.land(landed),
                _ = stop.changed() => break,
            }
        }
        // The sends in flight are waited for: cut off, a message Twilio took would be left
        // unrecorded, to be sent again after the restart.
        while let Some(landed) = self.sends.join_next_with_id().await {
            self.land(landed);
        }
    }

    /// A send is done (sent, retried later, failed): its number's next message may go.
    fn land(&mut self, landed: Result<(task::Id, anyhow::Result<()>), task::JoinError>) {
        let (task, outcome) = match landed {
            Ok(done) => done,
            // (A send never panics; should one, its number must not wait for ever.)
            Err(e) => (e.id(), Err(anyhow::anyhow!("a send stopped: {e}"))),
        };
        let Some(id) = self.task_of.remove(&task) else {
            return;
        };
        let Some(phone) = self.flying.remove(&id) else {
            return;
        };
        let Some(mut w) = self.waiting.take() else {
            return;
        };
        // Where its number stands now: retried (the same first message, later), or done
        // (its next message, if one was read already, comes first now). Any error: the next
        // look reads everything again.
        let placed = outcome.and_then(|()| match still_queued(&self.engine.store, id)? {
            Some(m) => {
                w.set_head(id, phone, m.next_try);
                Ok(())
            }
            None => self.advance(&mut w, id, phone),
        });
        match placed {
            Ok(()) => self.waiting = Some(w),
            Err(e) => tracing::error!("outbox: {e:#}"),
        }
    }

    /// Picks the oldest ready message whose number has no earlier message waiting or in
    /// flight and whose sender's turn has come, and starts its send (or holds or ends it).
    /// One whose sender's turn is still to come waits for it while others' messages go.
    pub async fn try_deliver_one(&mut self) -> anyhow::Result<Worked> {
        while let Some(landed) = self.sends.try_join_next_with_id() {
            self.land(landed);
        }
        if self.flying.len() >= IN_FLIGHT {
            // Every send slot is taken: the first send to land frees one.
            if let Some(landed) = self.sends.join_next_with_id().await {
                self.land(landed);
            }
            return Ok(Worked::One);
        }
        // Twilio asked to wait: nothing starts until then (a newly queued message too).
        if let Some(until) = self.hold.until() {
            return Ok(Worked::Idle {
                retry: None,
                turn: Some(until),
            });
        }
        let now = self.engine.clock().now();
        let erasures = self.engine.store.erasures();
        // What earlier looks learnt holds until a number is erased (only this worker sends,
        // retries or finishes messages otherwise).
        let mut w = self
            .waiting
            .take()
            .filter(|w| w.erasures == erasures)
            .unwrap_or_else(|| Waiting {
                erasures,
                ..Waiting::default()
            });
        // New flows (a reload): follow-ups held for quiet hours they no longer have, or that
        // end at another time now, are looked at again (`deliver` holds them anew if need be).
        let flows = self.engine.flows();
        if !Arc::ptr_eq(&flows, &self.flows_seen) {
            self.flows_seen = flows;
            let held: Vec<u64> = (w.later.iter())
                .filter(|(at, _)| *at > now)
                .map(|(_, id)| *id)
                .collect();
            for id in held {
                if still_queued(&self.engine.store, id)?.is_some_and(|m| self.held_astray(&m, now))
                {
                    w.release(id, now);
                }
            }
        }
        let mut budget = self.read_budget;
        let (id, msg) = loop {
            // The oldest number whose first message can be tried now; failing that, whatever
            // was queued since the last look.
            if let Some((id, phone)) = w.due(now) {
                // Its number's send is in flight: it waits until that lands.
                if self.flying.values().any(|p| *p == phone) {
                    w.fly(id);
                    continue;
                }
                match still_queued(&self.engine.store, id)? {
                    Some(msg) => match self.must_wait(&w, id, &msg) {
                        Some((sender, turn)) => {
                            w.wait_for_turn(id, sender, turn, msg.secret);
                            continue;
                        }
                        None => break (id, msg),
                    },
                    // Gone or unreadable since: its number's next message takes its place.
                    None => {
                        self.advance(&mut w, id, phone)?;
                        continue;
                    }
                }
            }
            match self.read_new(&mut w, now, &mut budget)? {
                // (Met again when this look reads everything anew.)
                Read::Found(id, msg) if self.flying.values().any(|p| *p == msg.phone) => {
                    w.set_head(id, msg.phone, msg.next_try);
                    w.fly(id);
                }
                Read::Found(id, msg) => match self.must_wait(&w, id, &msg) {
                    Some((sender, turn)) => {
                        w.set_head(id, msg.phone, msg.next_try);
                        w.wait_for_turn(id, sender, turn, msg.secret);
                    }
                    None => break (id, msg),
                },
                Read::Nothing => {
                    let (retry, turn) = (w.earliest(), w.next_turn());
                    self.waiting = Some(w);
                    return Ok(Worked::Idle { retry, turn });
                }
                Read::More => {
                    self.waiting = Some(w);
                    return Ok(Worked::One);
                }
                Read::Unflushed => {
                    // Queued but not on disk yet: wait for a flush (usually the writer's own,
                    // under way) and look again, rather than for a wake-up that a failed
                    // flush would never send.
                    self.waiting = Some(w);
                    self.engine.durable().await?;
                    return Ok(Worked::One);
                }
            }
        };
        let phone = msg.phone.clone();
        let next_try = msg.next_try;
        if self.deliver(id, msg).await? {
            // In flight: its number's later messages wait until it lands (see `land`).
            w.set_head(id, phone, next_try);
            w.fly(id);
            self.waiting = Some(w);
            return Ok(Worked::One);
        }
        // Held or ended unsent: on disk before it is looked at again.
        self.engine.durable().await?;
        // Where its number stands now: retried (the same first message, later), or done
        // (its next message, if one was read already, comes first now). A storage error
        // returns before `w` is kept, so the next look reads everything again.
        match still_queued(&self.engine.store, id)? {
            Some(m) => w.set_head(id, phone, m.next_try),
            None => self.advance(&mut w, id, phone)?,
        }
        self.waiting = Some(w);
        Ok(Worked::One)
    }

    /// Reads the messages queued after the last one read, up to the first that can be sent
    /// now; each number met for the first time that must wait gets its first message noted.
    fn read_new(
        &mut self,
        w: &mut Waiting,
        now: DateTime<Utc>,
        budget: &mut usize,
    ) -> anyhow::Result<Read> {
        for entry in self.engine.store.outbox_after(w.upto) {
            let (id, msg) = match entry {
                Ok(e) => e,
                // A storage error is the caller's (it waits, then reads everything again):
                // sled's walk does not move past a page it failed to read, so going on here
                // would meet the same error for ever.
                Err(e) if !codec::is_unreadable(&e) => return Err(e),
                // One unreadable entry (corrupt, or from a newer smsflow) must not stop the others.
                Err(e) => {
                    let e = format!("{e:#}");
                    if self.unreadable.insert(e.clone()) {
                        tracing::error!(
                            "outbox: skipping a queued message that cannot be read: {e}"
                        );
                    }
                    continue;
                }
            };
            // (Counted in entries read, which the next look does not read again: one that
            // cannot be read is met again by every look, as `upto` cannot move past it.)
            if *budget == 0 {
                return Ok(Read::More);
            }
            *budget -= 1;
            // Committed but not yet flushed: the caller has it flushed, then looks again. (Sent
            // now, a crash before the flush would queue it again when its event came back.)
            if !self.engine.store.outbox_durable(id) {
                return Ok(Read::Unflushed);
            }
            w.upto = Some(id);
            if let Some(&head) = w.head_of.get(&msg.phone) {
                // A code behind a follow-up held for quiet hours must not wait with it till
                // morning and expire: the follow-up goes now, and then the code (see
                // `deliver`). (A first message waiting for a retry keeps its wait: the
                // provider's `Retry-After` is obeyed.)
                if msg.secret && self.held_for_quiet_hours(head, now) {
                    w.release(head, now);
                }
                continue;
            }
            if msg.next_try > now && !self.held_astray(&msg, now) {
                w.set_head(id, msg.phone, msg.next_try);
                continue;
            }
            return Ok(Read::Found(id, msg));
        }
        Ok(Read::Nothing)
    }

    /// The sender whose rate a send to `record`'s number counts against: the `From` it
    /// goes from (the number of ours it last wrote to, when texts go from that one, else the
    /// first; or the messaging service). A record that cannot be read counts as the default.
    fn sender_of(&self, record: &anyhow::Result<Option<crate::machine::Subscriber>>) -> String {
        let via = record
            .as_ref()
            .ok()
            .and_then(Option::as_ref)
            .and_then(|s| s.via.as_ref());
        self.provider.sender(via)
    }

    /// Whom message `id` must wait for, if it is to be sent (one that will not be, its
    /// number opted out or its code stale, takes no turn: `deliver` ends it at once): its
    /// sender, and the sender's next turn if it is still to come (`None`: it waits behind
    /// the sender's older messages that wait for their turn, as they do).
    fn must_wait(
        &self,
        w: &Waiting,
        id: u64,
        msg: &OutMessage,
    ) -> Option<(String, Option<Instant>)> {
        // (No record to read when no sender's turn is still to come and none has a queue.)
        let now = Instant::now();
        if self.next_slot.values().all(|turn| *turn <= now) && w.senders.is_empty() {
            return None;
        }
        let record = sendable(&self.engine.store, msg, id);
        if matches!(record, Ok(None)) || self.unwanted(id, msg, &record).is_some() {
            return None;
        }
        // (A record that cannot be read counts against the default sender, as in `deliver`.)
        let sender = self.sender_of(&record);
        if let Some(turn) = self.next_slot.get(&sender).filter(|turn| **turn > now) {
            return Some((sender, Some(*turn)));
        }
        // The one let go at the sender's turn goes; a newer one found meanwhile (its turn
        // came while the queue was read) does not pass the older ones.
        (w.senders.contains_key(&sender) && !w.let_go.contains_key(&id)).then_some((sender, None))
    }

    /// Whether `m` is a follow-up held for quiet hours (never tried, its time to come: a hold
    /// is the only thing that sets a later time for such a one) until another time than the
    /// live flows' quiet hours end at (as this look saw them): they changed since, by a
    /// reload or a restart.
    fn held_astray(&self, m: &OutMessage, now: DateTime<Utc>) -> bool {
        m.follow_up
            && m.attempts == 0
            && m.next_try > now
            && crate::machine::quiet_end(&self.flows_seen.bot, now) != Some(m.next_try)
    }

    /// Whether queued message `id` is a follow-up `deliver` held until quiet hours end.
    fn held_for_quiet_hours(&self, id: u64, now: DateTime<Utc>) -> bool {
        let Some(end) = crate::machine::quiet_end(&self.engine.flows().bot, now) else {
            return false;
        };
        matches!(
            still_queued(&self.engine.store, id),
            Ok(Some(m)) if m.follow_up && m.next_try == end
        )
    }

    /// Message `id`, the first of `phone`'s, is gone: its next message, if it was read
    /// already, becomes the first.
    fn advance(&self, w: &mut Waiting, id: u64, phone: Phone) -> anyhow::Result<()> {
        w.remove_head(id);
        if let Some((next, m)) = self.engine.store.next_queued_of(&phone, id)? {
            if w.upto.is_some_and(|upto| next <= upto) {
                w.set_head(next, phone, m.next_try);
            }
        }
        Ok(())
    }

    /// Sends message `id` (its send in flight: `true`), or holds it for quiet hours, or
    /// ends it unsent.
    async fn deliver(&mut self, id: u64, mut msg: OutMessage) -> anyhow::Result<bool> {
        let store = &self.engine.store;
        if self.held_for_quiet(id, &mut msg)? {
            return Ok(false);
        }
        // The send rate, per sender (the number of ours the message goes from); a shutdown
        // does not wait for the slot. A message that will not be sent (its number opted
        // out, or is gone, or its code expired) takes no slot from the others.
        // `try_deliver_one` picked one whose sender's turn has come, so this waits only when
        // its number wrote to another of ours since, whose turn it is not.
        let mut record = sendable(store, &msg, id);
        let mut stale = self.unwanted(id, &msg, &record);
        let mut waited = None;
        while !matches!(record, Ok(None)) && stale.is_none() {
            let from = self.sender_of(&record);
            let slot = self.next_slot.get(&from).copied();
            // (A record unreadable since the wait is not sent: no other sender's turn to
            // wait for.)
            if waited.as_ref() == Some(&from) || (waited.is_some() && record.is_err()) {
                // Only a send takes the slot: one suppressed meanwhile (an opt-out, an
                // erase, a code that expired while it waited) leaves it to the next message.
                if matches!(record, Ok(Some(_))) {
                    let next = Instant::now().max(slot.unwrap_or_else(Instant::now));
                    self.next_slot.insert(from, next + self.interval);
                }
                break;
            }
            tokio::select! {
                _ = tokio::time::sleep_until(slot.unwrap_or_else(Instant::now)) => {}
                _ = self.stop.wait_for(|stopped| *stopped) => return Ok(false),
                _ = store.failed() => break,
            }
            // Read again after the wait: it may go from another of our numbers now (it
            // wrote to one meanwhile), whose slot is then waited for.
            waited = Some(from);
            record = sendable(store, &msg, id);
            stale = self.unwanted(id, &msg, &record);
        }
        // What is sent once the store failed could not be recorded, and would be sent again
        // after the restart: nothing goes (the daemon is stopping).
        if let Some(why) = store.failure() {
            anyhow::bail!("not sending: the store failed ({why})");
        }
        // While it waited for its sender's turn, Twilio asked to wait, or quiet hours began:
        // it is looked at again then (the turn it took goes unused).
        if waited.is_some() && matches!(record, Ok(Some(_))) && stale.is_none() {
            if self.hold.until().is_some() {
                return Ok(false);
            }
            if self.held_for_quiet(id, &mut msg)? {
                return Ok(false);
            }
        }
        let flight = Flight {
            engine: self.engine.clone(),
            provider: self.provider.clone(),
            retry_base: self.retry_base,
            hold: self.hold.clone(),
        };
        // How a message that will not be sent ends: its status, why, and the code it carried,
        // to withdraw.
        let (status, error, withdraw) = match record {
            // A storage error: try again later.
            Err(e) if !codec::is_unreadable(&e) => return Err(e),
            Err(e) => {
                // A record that cannot be read: whether it opted out cannot be known. Do not
                // text it, and do not let this message hold up everyone queued after it.
                let e = format!("the number's record cannot be read: {e:#}");
                tracing::error!(phone = %msg.phone.masked(), "outbox: not sending: {e}");
                ("failed", Some(e), None)
            }
            Ok(None) => {
                tracing::info!(phone = %msg.phone.masked(), "outbox: not sending to a number that opted out (since this was queued) or was erased");
                ("suppressed", None, None)
            }
            // A code held up (by retries, or a backlog behind the rate limit) past its life,
            // or displaced by newer ones, would only be refused when typed back (and count
            // as a wrong guess): the number asks for a new one, or has one, instead. A step
            // of a sequence ended since is no longer meant.
            Ok(Some(s)) if stale.is_some() => {
                let why = stale.unwrap_or_default();
                tracing::info!(phone = %msg.phone.masked(), "outbox: not sending: {why}");
                // Withdrawn as an undeliverable one is: its send no longer counts against the
                // limit, and a number waiting for it alone is back where it was. (Found by the
                // expiry it carries, and its text.)
                ("suppressed", Some(why.to_string()), queued_code(&s, &msg))
            }
            Ok(Some(_)) => {
                let phone = msg.phone.clone();
                let send = self.sends.spawn(async move { flight.send(id, msg).await });
                self.task_of.insert(send.id(), id);
                self.flying.insert(id, phone);
                return Ok(true);
            }
        };
        let ending = Ending {
            status,
            sid: None,
            code: None,
            error,
        };
        flight.finish(id, &msg, ending, withdraw).await?;
        Ok(false)
    }

    /// Holds follow-up `id` until quiet hours end if they hold now (`true`, on disk by the
    /// next flush). A follow-up due before quiet hours but reached only in them (a backlog
    /// behind the rate limit, an outage's retries) waits until they end, as its timer would
    /// have: no attempt counted, no send slot taken. The number's later messages wait behind
    /// it. Unless a code waits behind it: the number's owner is awake and asking, and the
    /// code must not wait for the morning (it would expire).
    fn held_for_quiet(&self, id: u64, msg: &mut OutMessage) -> anyhow::Result<bool> {
        if !msg.follow_up {
            return Ok(false);
        }
        let store = &self.engine.store;
        let quiet = crate::machine::quiet_end(&self.engine.flows().bot, self.engine.clock().now());
        let Some(end) = quiet.filter(|_| !code_behind(store, &msg.phone, id)) else {
            return Ok(false);
        };
        tracing::info!(phone = %msg.phone.masked(), until = %end, "outbox: holding a follow-up until quiet hours end");
        msg.next_try = end;
        store.outbox_update(id, msg)?;
        Ok(true)
    }

    /// Why queued message `id` is not to be sent after all, if it is not (its number may be
    /// texted): a follow-up whose sequence a reload ended since it was queued (the number
    /// is `verified` and sent nothing more); a code that expired (by the expiry it was
    /// issued with, which is what the machine checks when it is typed back), or that the
    /// number's record no longer holds among its `valid_codes` latest (newer codes displaced
    /// it, as the OTP API checks too, or the number verified since).
    fn unwanted(
        &self,
        id: u64,
        msg: &OutMessage,
        record: &anyhow::Result<Option<crate::machine::Subscriber>>,
    ) -> Option<&'static str> {
        if msg.follow_up && matches!(record, Ok(Some(_))) {
            match self.engine.store.sequence_ended_since(&msg.phone, id) {
                Ok(true) => return Some("its sequence ended since it was queued (a reload)"),
                Ok(false) => {}
                // (Sent as if not: the store's own failure stops the daemon.)
                Err(e) => {
                    tracing::warn!(phone = %msg.phone.masked(), "outbox: reading the history: {e:#}")
                }
            }
        }
        let expires_at = msg.code_expires_at.filter(|_| msg.secret)?;
        if self.engine.clock().now() >= expires_at {
            return Some("the code expired before it could be sent");
        }
        let valid_codes = self.engine.flows().verify.valid_codes;
        match record {
            Ok(Some(s)) if queued_code(s, msg).is_none_or(|c| !s.holds_code(&c, valid_codes)) => {
                Some("newer codes were issued meanwhile, or the number no longer waits for one")
            }
            _ => None,
        }
    }
}

/// How a message ends: its delivery's status, provider id, error code and error.
struct Ending {
    status: &'static str,
    sid: Option<String>,
    code: Option<u32>,
    error: Option<String>,
}

impl Flight {
    /// Sends message `id` to its number (if it may still be texted) and records how it went
    /// (sent, retried later, or failed), on disk before it returns.
    async fn send(&self, id: u64, mut msg: OutMessage) -> anyhow::Result<()> {
        let store = &self.engine.store;
        // What is sent once the store failed could not be recorded (another send may have met
        // the failure since this one was started).
        if let Some(why) = store.failure() {
            anyhow::bail!("not sending: the store failed ({why})");
        }
        // Until its record is stored, a delivery report for an unknown id may be this send's.
        let _in_flight = store.send_in_flight();
        // A code that will not arrive, to withdraw.
        let mut withdraw = None;
        // Tries cut off by crashes (each counted below) may each have sent it: no more.
        if msg.uncertain >= MAYBE_SENT_ATTEMPTS {
            tracing::error!(phone = %msg.phone.masked(), "outbox: not trying again: {} tries may have sent it", msg.uncertain);
            let ending = Ending {
                status: "failed",
                sid: None,
                code: None,
                error: Some(format!(
                    "{} tries were cut off (by a restart, or with no answer from Twilio), each \
                     of which may have sent it; not tried again, so as not to send it many times",
                    msg.uncertain
                )),
            };
            return self.finish(id, &msg, ending, None).await;
        }
        msg.attempts = msg.attempts.saturating_add(1);
        // Counted on disk before it is made, as a try that may reach Twilio: should the
        // daemon die while it is under way, the try counts all the same, so a daemon that
        // crashes again and again does not send the message again at each start. A try
        // Twilio surely did not take (an answer, a 503, a refused connection) is uncounted
        // once its answer is in.
        msg.uncertain = msg.uncertain.saturating_add(1);
        // A code goes with its life left: Twilio drops it rather than deliver it expired.
        let now = self.engine.clock().now();
        let valid_for = (msg.code_expires_at.filter(|_| msg.secret))
            .map(|expires| crate::provider::life_left(expires, now).unwrap_or_default());
        store.outbox_update(id, &msg)?;
        self.engine.durable().await?;
        // Asked again after that flush: a STOP or an erase committed meanwhile stops it, as
        // one before would have (the next look at it ends it, suppressed).
        let Some(s) = sendable(store, &msg, id)? else {
            return Ok(());
        };
        let result = self
            .provider
            .send(&msg.phone, &msg.body, s.via.as_ref(), valid_for)
            .await;
        if !matches!(
            &result,
            Err(SendError::Temporary {
                maybe_sent: true,
                ..
            })
        ) {
            msg.uncertain = msg.uncertain.saturating_sub(1);
        }
        // What a provider's error may quote of the number or of a code's message is hidden,
        // from the log and from the record the admin API shows.
        let code_text = msg.secret.then_some(msg.body.as_str());
        let result = result.map_err(|e| e.map_message(|m| redact(m, code_text)));
        let ending = match result {
            Ok(accepted) => {
                tracing::info!(phone = %msg.phone.masked(), sid = accepted.sid.as_deref().unwrap_or("none"), "outbox: sent");
                Ending {
                    status: "sent",
                    sid: accepted.sid,
                    code: None,
                    error: None,
                }
            }
            // A refused account is retried for as long as it takes: fixed (and the
            // daemon restarted), it sends what waited; so is a message from a sender
            // Twilio refused, and one whose sender's queue at Twilio is full, until it drains. Its tries stop counting half
            // way (the backoff is at its cap by then), so an ordinary failure after
            // the fix still has its share of tries; the provider logs the refusal.
            Err(SendError::Temporary {
                message,
                retry_after,
                not_the_message,
                maybe_sent,
            }) if not_the_message
                || (msg.attempts < MAX_ATTEMPTS
                    && !(maybe_sent && msg.uncertain >= MAYBE_SENT_ATTEMPTS)) =>
            {
                if not_the_message {
                    msg.attempts = msg.attempts.min(ACCOUNT_ATTEMPTS);
                }
                let wait = retry_wait(self.backoff(msg.attempts), retry_after);
                // Twilio's own wait holds every send, not this one alone (for a while).
                if let Some(asked) = retry_after.filter(|_| !not_the_message) {
                    self.hold.at_least(asked.min(MAX_HOLD));
                }
                if not_the_message {
                    tracing::debug!(
                        phone = %msg.phone.masked(), retry_in = ?wait,
                        "outbox: no fault of the message (a refused account or sender, or a \
                         full queue at Twilio); waiting"
                    );
                } else {
                    tracing::warn!(
                        phone = %msg.phone.masked(), attempt = msg.attempts, retry_in = ?wait,
                        "outbox: temporary failure: {message}"
                    );
                }
                crate::metrics::outbound("retried");
                msg.next_try = self.engine.clock().now()
                    + TimeDelta::from_std(wait).unwrap_or(TimeDelta::seconds(1));
                msg.last_error = Some(message);
                store.outbox_update(id, &msg)?;
                return self.engine.durable().await;
            }
            // Not withdrawn: one of its tries may have reached the number all the same
            // (a timeout after Twilio accepted it), and the code would then be refused.
            Err(SendError::Temporary {
                message,
                maybe_sent,
                ..
            }) => {
                tracing::error!(phone = %msg.phone.masked(), "outbox: giving up after {} attempts: {message}", msg.attempts);
                let message = if maybe_sent && msg.attempts < MAX_ATTEMPTS {
                    format!(
                        "{message}, to {} tries that reached it, each of which may have \
                         sent it; not tried again, so as not to send it many times",
                        msg.uncertain
                    )
                } else {
                    message
                };
                Ending {
                    status: "failed",
                    sid: None,
                    code: None,
                    error: Some(message),
                }
            }
            // A code Twilio refused will never arrive: it is withdrawn as one that
            // expired is (the OTP API withdraws its own the same way). An unsubscribed
            // number is opted out instead, which ends everything it waited for.
            Err(SendError::Permanent { code, message }) => {
                tracing::warn!(phone = %msg.phone.masked(), code, "outbox: refused: {message}");
                if code != Some(UNSUBSCRIBED) {
                    withdraw = queued_code(&s, &msg);
                }
                Ending {
                    status: "failed",
                    sid: None,
                    code,
                    error: Some(message),
                }
            }
        };
        self.finish(id, &msg, ending, withdraw).await?;
        // On disk before the send lands, so that a crash sends it again only if it falls
        // between Twilio's answer and this flush (shared with whatever else is committed).
        self.engine.durable().await
    }

    /// Records how message `id` ended, and what that does to its number: an opt-out (21610),
    /// or a code withdrawn.
    async fn finish(
        &self,
        id: u64,
        msg: &OutMessage,
        ending: Ending,
        withdraw: Option<String>,
    ) -> anyhow::Result<()> {
        let store = &self.engine.store;
        crate::metrics::outbound(ending.status);
        // The opt-out first: should it fail, the message is still queued, and its next try
        // (refused again) applies it; recorded first, nothing would. Not for a number erased
        // while the send was in flight (its message is gone with it), which may have texted
        // JOIN since: the refusal was of the erased number's message.
        if ending.code == Some(UNSUBSCRIBED) && store.outbox_holds(id)? {
            self.engine
                .event(&msg.phone, Event::ProviderUnsubscribed)
                .await?;
        }
        // Not for a number erased meanwhile (its message is gone with it), which may have
        // texted JOIN since: the code was the erased number's.
        if let Some(code) = withdraw {
            if store.outbox_holds(id)? {
                self.engine
                    .event(&msg.phone, Event::CodeUndeliverable(code))
                    .await?;
            }
        }
        let Ending {
            status,
            sid,
            code,
            error,
        } = ending;
        store.outbox_finish(
            id,
            &delivery(msg, status, sid, code, error, self.engine.clock().now()),
        )
    }

    /// Exponential backoff with jitter: base·2^(n-1), capped, times a random 50–100 %.
    fn backoff(&self, attempts: u32) -> Duration {
        let exp = self
            .retry_base
            .saturating_mul(1u32 << attempts.saturating_sub(1).min(20));
        let capped = exp.min(MAX_BACKOFF);
        capped.mul_f64(rand::rng().random_range(0.5..=1.0))
    }
}

/// The code queued message `msg` carries, as the number's record holds it (found by the
/// expiry it was issued with, and its text); `None` for any other message.
fn queued_code(s: &crate::machine::Subscriber, msg: &OutMessage) -> Option<String> {
    if !msg.secret {
        return None;
    }
    s.codes
        .iter()
        .find(|c| Some(c.expires_at) == msg.code_expires_at && msg.body.contains(&c.code))
        .map(|c| c.code.clone())
}

/// The record of the number queued message `id` goes to, when it may still be sent; `None`
/// when not. Asked again at send time (after the rate limit's wait): a STOP may have arrived
/// since queueing (even if a START followed it: consent withdrawn covers what was queued
/// before), or the number may have been erased, message and all (even if it has texted
/// since: its new record has no opt-out to stop the erased one's message).
fn sendable(
    store: &crate::store::Store,
    msg: &OutMessage,
    id: u64,
) -> anyhow::Result<Option<crate::machine::Subscriber>> {
    if !store.outbox_holds(id)? {
        return Ok(None);
    }
    match store.subscriber(&msg.phone) {
        Ok(Some(s)) if s.state != State::OptedOut => store
            .opted_out_since(&msg.phone, id)
            .map(|since| (!since).then_some(s)),
        Ok(_) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Whether a code is queued for `phone` after message `id`. (A storage error reads as no:
/// the follow-up is held, as without a code.)
fn code_behind(store: &crate::store::Store, phone: &Phone, mut id: u64) -> bool {
    loop {
        match store.next_queued_of(phone, id) {
            Ok(Some((_, m))) if m.secret => return true,
            Ok(Some((next, _))) => id = next,
            Ok(None) => return false,
            Err(e) => {
                tracing::warn!(phone = %phone.masked(), "outbox: looking for a queued code: {e:#}");
                return false;
            }
        }
    }
}

/// A queued message as it is now: `None` when it is gone, or cannot be read (logged). A
/// storage error is an error: the caller must not take the message for gone.
fn still_queued(store: &crate::store::Store, id: u64) -> anyhow::Result<Option<OutMessage>> {
    match store.outbox_get(id) {
        Ok(m) => Ok(m),
        Err(e) if codec::is_unreadable(&e) => {
            tracing::error!(
                "outbox: passing over queued message {id}, which cannot be read: {e:#}"
            );
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// Messages waiting for a sender's turn, keyed `(not a code, id)`: codes first, then in
/// queue order.
type TurnQueue = BTreeSet<(bool, u64)>;

/// What the outbox knows of the messages it has read (ids up to `upto`): each waiting
/// number's first message and when it can be tried. A number's later messages wait behind
/// its first, so they need no reading until it is gone: a wake-up for a new message reads
/// only the new ones, and a retry coming due costs a look at the first messages only.
/// Finding the next one to try is O(log n) in waiting numbers, so draining a backlog of n
/// (after an outage) is O(n log n), not O(n²).
#[derive(Default)]
struct Waiting {
    upto: Option<u64>,
    /// First message id → (number, next try).
    heads: HashMap<u64, (Phone, DateTime<Utc>)>,
    /// Number → the id of its first message.
    head_of: HashMap<Phone, u64>,
    /// First messages whose time had come at the last look, in queue order.
    ready: BTreeSet<u64>,
    /// The other first messages, by next try.
    later: BTreeSet<(DateTime<Utc>, u64)>,
    /// Senders with first messages that could be tried but wait for the sender's turn (real
    /// time: the send rate is), codes first, then in queue order (in neither `ready` nor
    /// `later` meanwhile; keyed `(not a code, id)`), and when the turn comes (`None`: once
    /// the one let go at the last turn is done).
    /// (A code is not to wait behind a backlog of follow-ups, all due when quiet hours end,
    /// say, and expire: its owner is waiting for it now.)
    senders: HashMap<String, (Option<Instant>, TurnQueue)>,
    /// Those senders' turns that are known, by time.
    turns: BTreeSet<(Instant, String)>,
    /// The sender each of those messages waits for.
    sender_of: HashMap<u64, String>,
    /// Messages let go at their sender's turn, while the sender's others wait: its sender.
    let_go: HashMap<u64, String>,
    /// First messages being sent, or waiting for their number's send in flight (in neither
    /// `ready` nor `later` meanwhile).
    flying: HashSet<u64>,
    /// [`crate::store::Store::erasures`] when this was learnt.
    erasures: u64,
}

impl Waiting {
    fn set_head(&mut self, id: u64, phone: Phone, at: DateTime<Utc>) {
        self.remove_head(id);
        self.head_of.insert(phone.clone(), id);
        self.heads.insert(id, (phone, at));
        self.later.insert((at, id));
    }

    /// First message `id` may be tried from `now` on, if it waits for later.
    fn release(&mut self, id: u64, now: DateTime<Utc>) {
        if let Some((phone, at)) = self.heads.get(&id).cloned() {
            if at > now {
                self.set_head(id, phone, now);
            }
        }
    }

    fn remove_head(&mut self, id: u64) {
        if let Some((phone, at)) = self.heads.remove(&id) {
            self.head_of.remove(&phone);
            self.ready.remove(&id);
            self.later.remove(&(at, id));
            self.flying.remove(&id);
        }
        if let Some(sender) = self.sender_of.remove(&id) {
            if let Some((turn, ids)) = self.senders.get_mut(&sender) {
                // (Under whichever key it waits: a code's or another message's.)
                let _ = ids.remove(&(false, id)) || ids.remove(&(true, id));
                if ids.is_empty() {
                    if let Some(turn) = turn {
                        self.turns.remove(&(*turn, sender.clone()));
                    }
                    self.senders.remove(&sender);
                }
            }
        }
        // Done with (sent, retried, held, or gone): whether it took the turn or not, the
        // sender's next is looked at now (and waits again for the turn after, if it did).
        if let Some(sender) = self.let_go.remove(&id) {
            self.pass_turn_on(sender);
        }
    }

    /// First message `id` is being sent, or waits for its number's send in flight: passed
    /// over until that lands. If it was let go at its sender's turn, the sender's next is
    /// looked at now (the send took the turn: it waits for the one after).
    fn fly(&mut self, id: u64) {
        if let Some((_, at)) = self.heads.get(&id) {
            self.ready.remove(&id);
            self.later.remove(&(*at, id));
            self.flying.insert(id);
        }
        if let Some(sender) = self.let_go.remove(&id) {
            self.pass_turn_on(sender);
        }
    }

    /// `sender`'s next waiting message is looked at now, if it waits only until the one let
    /// go at the last turn is done.
    fn pass_turn_on(&mut self, sender: String) {
        if let Some((turn @ None, _)) = self.senders.get_mut(&sender) {
            let now = Instant::now();
            *turn = Some(now);
            self.turns.insert((now, sender));
        }
    }

    /// First message `id` (a `code`, or not) waits for `sender`'s turn, at `turn` (`None`:
    /// when the sender's older messages waiting for it go): until then it is passed over
    /// (and its number's later messages wait behind it). When the turn comes, the sender's
    /// oldest waiting code, or else its oldest waiting message, is let go (ready again), and
    /// the others wait until it is done.
    fn wait_for_turn(&mut self, id: u64, sender: String, turn: Option<Instant>, code: bool) {
        let Some((_, at)) = self.heads.get(&id) else {
            return;
        };
        self.ready.remove(&id);
        self.later.remove(&(*at, id));
        // Let go by another sender (its number wrote to another of ours since): that
        // sender's next is looked at now, as when it is done.
        if let Some(was) = self.let_go.remove(&id).filter(|was| *was != sender) {
            self.pass_turn_on(was);
        }
        let (known, ids) = self
            .senders
            .entry(sender.clone())
            .or_insert_with(|| (None, BTreeSet::new()));
        // The turn as the send rate has it now.
        if let Some(turn) = turn {
            if let Some(earlier) = known.replace(turn) {
                self.turns.remove(&(earlier, sender.clone()));
            }
            self.turns.insert((turn, sender.clone()));
        }
        // (Waiting already for this sender, when its turn is told anew: it keeps its place.)
        ids.insert((!code, id));
        self.sender_of.insert(id, sender);
    }

    /// When the first sender whose messages wait for its turn may send.
    fn next_turn(&self) -> Option<Instant> {
        self.turns.first().map(|(turn, _)| *turn)
    }

    /// The oldest first message that can be tried at `now`, and its number. (One found
    /// ready stays so: a clock stepped back does not make it wait again.)
    fn due(&mut self, now: DateTime<Utc>) -> Option<(u64, Phone)> {
        // A sender whose turn came: its oldest waiting message is let go, ready (its time had
        // come when it began to wait); the others wait until it is done. (One message per
        // turn, not all: each would only wait again, and a backlog behind one sender would be
        // read again at every send.)
        let instant = Instant::now();
        while let Some((turn, sender)) = self.turns.first().cloned() {
            if turn > instant {
                break;
            }
            self.turns.pop_first();
            let Some((known, ids)) = self.senders.get_mut(&sender) else {
                continue;
            };
            *known = None;
            if let Some((_, first)) = ids.pop_first() {
                self.sender_of.remove(&first);
                self.ready.insert(first);
                self.let_go.insert(first, sender.clone());
            }
            if ids.is_empty() {
                self.senders.remove(&sender);
            }
        }
        while let Some(&(at, id)) = self.later.first() {
            if at > now {
                break;
            }
            self.later.pop_first();
            self.ready.insert(id);
        }
        // (`ready`, `later`, `senders` and `flying` hold exactly the ids of `heads`: see
        // set_head, remove_head, wait_for_turn, fly.)
        let id = *self.ready.first()?;
        self.heads.get(&id).map(|(phone, _)| (id, phone.clone()))
    }

    /// When the next first message can be tried.
    fn earliest(&self) -> Option<DateTime<Utc>> {
        let ready = self.ready.first().and_then(|id| self.heads.get(id));
        ready
            .map(|(_, at)| *at)
            .or_else(|| self.later.first().map(|(at, _)| *at))
    }
}

/// How long to wait before the next try: the backoff, or longer if the provider asked for
/// it (up to [`MAX_RETRY_AFTER`]: a provider's number is not trusted to be sane).
fn retry_wait(backoff: Duration, retry_after: Option<Duration>) -> Duration {
    backoff.max(retry_after.unwrap_or_default().min(MAX_RETRY_AFTER))
}

fn delivery(
    msg: &OutMessage,
    status: &str,
    sid: Option<String>,
    code: Option<u32>,
    error: Option<String>,
    now: DateTime<Utc>,
) -> Delivery {
    Delivery {
        phone: msg.phone.clone(),
        status: status.to_string(),
        provider_sid: sid,
        error_code: code,
        error,
        attempts: msg.attempts,
        updated_at: now,
    }
}

/// Provider error texts may quote the number (Twilio's 21211 does), and might quote the text
/// sent: runs of 7 digits or more are hidden, and, in the error of a message that carries a
/// code (`sent`: its text), any run of 4 or more that the text holds (its code; Twilio's own
/// error code stays).
pub fn redact(text: &str, sent: Option<&str>) -> String {
    // A number written with separators, as `(415) 555-0304`, `+1 415.555.0304`,
    // `+1/415/555/0116` or `415 - 555 - 0116`: seven digits or more in groups parted by one
    // separator, or by a dash or a parenthesis with spaces.
    static SPACED: std::sync::LazyLock<regex::Regex> = std::sync::LazyLock::new(|| {
        regex::Regex::new(r"\+?\(?\d(?:(?:\) | \(| - | \u{2013} |[ .\-/()\u{a0}\u{2013}])?\d)*")
            .expect("a valid pattern")
    });
    // What such a run may be and is no number, when it is that alone: a date (Twilio's API
    // version, `2010-04-01`, is in its paths) or a US date, with the hour of a time after it,
    // or an IP address (no octet with a leading zero, as in `079.123.45.67`). A run with more
    // in it is taken for a number, date and all: better hidden than a number shown.
    static NO_NUMBER: std::sync::LazyLock<regex::Regex> = std::sync::LazyLock::new(|| {
        let octet = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)";
        regex::Regex::new(&format!(
            r"^(?:\d{{4}}-(?:0[1-9]|1[0-2])-(?:0[1-9]|[12]\d|3[01])|\d{{1,2}}/\d{{1,2}}/\d{{4}})(?:[T ]\d{{2}})?$|^{octet}(?:\.{octet}){{3}}$"
        ))
        .expect("a valid pattern")
    });
    let text = SPACED.replace_all(text, |m: &regex::Captures| {
        let found = &m[0];
        let digits = found.chars().filter(char::is_ascii_digit).count();
        // Unspaced runs are left to the walk below, which also knows a code's digits.
        // (What is not a digit in it, but for a leading `+`, is a separator.)
        let spaced = (found.trim_start_matches('+').chars()).any(|c| !c.is_ascii_digit());
        if digits >= 7 && spaced && !NO_NUMBER.is_match(found) {
            "[number]".to_string()
        } else {
            found.to_string()
        }
    });
    let mut out = String::with_capacity(text.len());
    let mut digits = String::new();
    let flush = |digits: &mut String, out: &mut String| {
        let bare = digits.trim_start_matches('+');
        match bare.len() {
            7.. => out.push_str("[number]"),
            4.. if sent.is_some_and(|t| t.contains(bare)) => {
                out.push_str(&digits[..digits.len() - bare.len()]);
                out.push_str("[digits]");
            }
            _ => out.push_str(digits),
        }
        digits.clear();
    };
    for c in text.chars() {
        if c.is_ascii_digit() || (c == '+' && digits.is_empty()) {
            digits.push(c);
        } else {
            flush(&mut digits, &mut out);
            out.push(c);
        }
    }
    flush(&mut digits, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::{redact, retry_wait, Waiting, MAX_RETRY_AFTER};
    use std::time::Duration;

    #[test]
    fn a_providers_retry_after_is_obeyed_up_to_an_hour_and_never_shortens_the_backoff() {
        let backoff = Duration::from_secs(20);
        assert_eq!(retry_wait(backoff, None), backoff);
        assert_eq!(retry_wait(backoff, Some(Duration::from_secs(5))), backoff);
        assert_eq!(
            retry_wait(backoff, Some(Duration::from_secs(90))),
            Duration::from_secs(90)
        );
        // A nonsense value (it once overflowed the date arithmetic) is read as the cap.
        let absurd = Some(Duration::from_secs(10_000_000_000_000));
        assert_eq!(retry_wait(backoff, absurd), MAX_RETRY_AFTER);
    }

    #[test]
    fn phone_numbers_and_a_messages_code_in_provider_errors_are_hidden() {
        assert_eq!(
            redact(
                "The 'To' number +15550001111 is not valid (HTTP 400, code 21211)",
                None
            ),
            "The 'To' number [number] is not valid (HTTP 400, code 21211)"
        );
        // A code's message: its code is hidden too, should an error quote the text; the
        // error's own code stays.
        let sent = "Acme: your code is 748588.";
        assert_eq!(
            redact(
                "Body was: your code is +748588. (HTTP 400, code 21211)",
                Some(sent)
            ),
            "Body was: your code is +[digits]. (HTTP 400, code 21211)"
        );
        // A number written with separators, however it is written; short numbers with them
        // stay (Twilio's own words have some: a status, a date is rare).
        for (quoted, hidden) in [
            (
                "'To' number (415) 555-0304 is not",
                "'To' number [number] is not",
            ),
            ("to +1 415.555.0304.", "to [number]."),
            ("to +44 20-7946-0958 failed", "to [number] failed"),
            ("HTTP 400 (code 21614)", "HTTP 400 (code 21614)"),
            ("version 2010-04-01", "version 2010-04-01"),
            ("to +1/415/555/0116 x", "to [number] x"),
            ("to 415\u{a0}555\u{2013}0116 x", "to [number] x"),
            ("to 415 - 555 - 0116 x", "to [number] x"),
            ("at 2026-11-24 10:15:30", "at 2026-11-24 10:15:30"),
            (
                "upstream 10.20.30.40 timed out",
                "upstream 10.20.30.40 timed out",
            ),
            ("at 10.20.30.40:443", "at 10.20.30.40:443"),
            ("on 11/24/2026 10:15", "on 11/24/2026 10:15"),
            ("length 1700 / 1600", "length 1700 / 1600"),
            // Shaped a little like a date or an address, or beside one, a number is still
            // one (and the date or address goes with it).
            ("number 0467-23-1234 is", "number [number] is"),
            ("0612-34-56-78", "[number]"),
            ("0612-10-20-30", "[number]"),
            ("06.12.34.56.78", "[number]"),
            ("+33 6.12.34.56.78", "[number]"),
            ("079.123.45.67", "[number]"),
            ("2026-11-24 (415) 555-0116", "[number]"),
            ("415 555 0116 2026-11-24", "[number]"),
        ] {
            assert_eq!(redact(quoted, None), hidden, "{quoted}");
        }
    }

    #[test]
    fn the_oldest_number_whose_time_has_come_goes_first_and_retries_wait_their_turn() {
        use crate::phone::Phone;
        use chrono::{TimeDelta, TimeZone, Utc};
        let t0 = Utc.with_ymd_and_hms(2026, 11, 22, 12, 0, 0).unwrap();
        let secs = |n: i64| t0 + TimeDelta::seconds(n);
        let phone = |n: u32| Phone::parse(&format!("+1415555{n:04}")).unwrap();
        let mut w = Waiting::default();
        w.set_head(5, phone(5), secs(30));
        w.set_head(3, phone(3), secs(10));
        w.set_head(9, phone(9), secs(0));
        assert_eq!(w.earliest(), Some(secs(0)));
        assert_eq!(w.due(t0), Some((9, phone(9))));
        // Once several are due, queue order decides, not the time they came due.
        assert_eq!(w.due(secs(40)), Some((3, phone(3))));
        // A retry moves a message back to its new time.
        w.set_head(3, phone(3), secs(100));
        assert_eq!(w.due(secs(40)), Some((5, phone(5))));
        w.remove_head(5);
        w.remove_head(9);
        assert_eq!(w.due(secs(40)), None);
        assert_eq!(w.earliest(), Some(secs(100)));
        assert_eq!(w.due(secs(100)), Some((3, phone(3))));
        w.remove_head(3);
        assert_eq!((w.due(secs(1000)), w.earliest()), (None, None));
        assert!(w.head_of.is_empty() && w.heads.is_empty());
        assert!(w.ready.is_empty() && w.later.is_empty());
    }

    #[test]
    fn messages_waiting_for_their_senders_turn_are_passed_over_and_go_one_per_turn() {
        use crate::phone::Phone;
        use chrono::{TimeZone, Utc};
        use tokio::time::Instant;
        let t0 = Utc.with_ymd_and_hms(2026, 11, 22, 12, 0, 0).unwrap();
        let phone = |n: u32| Phone::parse(&format!("+1415555{n:04}")).unwrap();
        let minute = Duration::from_secs(60);
        let mut w = Waiting::default();
        for id in 1..=4 {
            w.set_head(id, phone(id as u32), t0);
        }
        assert_eq!(w.due(t0), Some((1, phone(1))));
        // The first two wait for sender A's turn, a minute away: the third (B's) goes.
        let turn = Instant::now() + minute;
        w.wait_for_turn(1, "A".into(), Some(turn), false);
        w.wait_for_turn(2, "A".into(), Some(turn), false);
        assert_eq!(w.due(t0), Some((3, phone(3))));
        w.remove_head(3);
        // The fourth, A's too, found when A's turn had come: behind the older two.
        w.wait_for_turn(4, "A".into(), None, false);
        assert_eq!(w.due(t0), None);
        assert_eq!((w.next_turn(), w.earliest()), (Some(turn), None));
        // A's turn as the rate has it now (come already): its oldest is let go, the others
        // wait until it is done.
        w.wait_for_turn(2, "A".into(), Some(Instant::now()), false);
        assert_eq!(w.due(t0), Some((1, phone(1))));
        assert_eq!(w.next_turn(), None);
        // Let go again, it finds the turn taken since: it waits for the next one.
        w.wait_for_turn(1, "A".into(), Some(turn), false);
        assert_eq!((w.due(t0), w.next_turn()), (None, Some(turn)));
        w.wait_for_turn(1, "A".into(), Some(Instant::now()), false);
        assert_eq!(w.due(t0), Some((1, phone(1))));
        // Done (sent, or not): the next one is looked at at once.
        w.remove_head(1);
        assert_eq!(w.due(t0), Some((2, phone(2))));
        // Let go, it now goes from B (its number wrote to B since) and waits for B's turn:
        // A's next is looked at at once all the same.
        w.wait_for_turn(2, "B".into(), Some(turn), false);
        assert_eq!(w.due(t0), Some((4, phone(4))));
        w.remove_head(4);
        w.remove_head(2);
        assert_eq!((w.due(t0), w.next_turn()), (None, None));
        assert!(w.senders.is_empty() && w.turns.is_empty());
        assert!(w.sender_of.is_empty() && w.let_go.is_empty());
        assert!(w.heads.is_empty() && w.ready.is_empty() && w.later.is_empty());
    }

    /// Follow-ups all due at once (quiet hours ending) wait for their sender's turns; a code
    /// queued after them goes at the next turn, not behind them all (it would expire).
    #[test]
    fn a_code_waiting_for_its_senders_turn_goes_before_older_follow_ups() {
        use crate::phone::Phone;
        use chrono::{TimeZone, Utc};
        use tokio::time::Instant;
        let t0 = Utc.with_ymd_and_hms(2026, 11, 22, 8, 0, 0).unwrap();
        let phone = |n: u32| Phone::parse(&format!("+1415555{n:04}")).unwrap();
        let mut w = Waiting::default();
        let later = Instant::now() + Duration::from_secs(60);
        for id in 1..=4 {
            w.set_head(id, phone(id as u32), t0);
            assert_eq!(w.due(t0), Some((id, phone(id as u32))));
            w.wait_for_turn(id, "A".into(), Some(later), id == 3);
        }
        // The turn comes: the code (3) goes first, then the follow-ups in queue order.
        w.wait_for_turn(4, "A".into(), Some(Instant::now()), false);
        for id in [3, 1, 2, 4] {
            assert_eq!(w.due(t0), Some((id, phone(id as u32))));
            w.remove_head(id);
        }
        assert_eq!(w.due(t0), None);
        assert!(w.senders.is_empty() && w.sender_of.is_empty());
    }
}
