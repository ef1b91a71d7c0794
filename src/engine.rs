//! The driver: for one event, load → `machine::step` → one atomic commit → durable → effects.
//! Every path that changes a subscriber (webhooks, timers, OTP, admin) goes through here.

use std::hash::{Hash, Hasher};
use std::sync::Arc;

use arc_swap::ArcSwap;
use chrono::{DateTime, Utc};
use tokio::sync::{Mutex, MutexGuard, Notify};

use crate::flows::Flows;
use crate::machine::{self, Effect, Event, Outcome, Subscriber, Transition};
use crate::phone::Phone;
use crate::store::{Commit, DueTimer, HistoryEntry, Store};

/// Events for one number are serialized by one of these locks (chosen by hash).
const STRIPES: usize = 256;

pub struct Engine {
    pub store: Store,
    flows: ArcSwap<Flows>,
    locks: Vec<Mutex<()>>,
    /// Woken when a timer is scheduled (the scheduler may need to wake earlier).
    pub timers_changed: Notify,
    /// Woken when a message is queued.
    pub outbox_changed: Notify,
}

/// What an event did.
#[derive(Debug)]
pub struct Applied {
    pub outcome: Outcome,
    /// Direct replies (TwiML `<Message>`s), in order.
    pub replies: Vec<String>,
    /// The stored answer to an inbound webhook, when the event was one.
    pub twiml: Option<String>,
    /// The same inbound message was already processed; `twiml` is the original answer.
    pub duplicate: bool,
    pub subscriber: Option<Subscriber>,
}

/// An event and what else must happen in its commit.
pub struct Input<'a> {
    pub phone: &'a Phone,
    pub event: Event,
    /// The provider's id of an inbound message, for exactly-once processing.
    pub inbound_sid: Option<&'a str>,
    /// The stored timer this event consumes.
    pub fired: Option<DueTimer>,
}

impl Engine {
    pub fn new(store: Store, flows: Flows) -> Engine {
        Engine {
            store,
            flows: ArcSwap::from_pointee(flows),
            locks: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            timers_changed: Notify::new(),
            outbox_changed: Notify::new(),
        }
    }

    pub fn flows(&self) -> Arc<Flows> {
        self.flows.load_full()
    }

    /// Swaps in a new flow set; readers see either the old or the new one, never a mix.
    pub fn set_flows(&self, flows: Flows) {
        self.flows.store(Arc::new(flows));
        // Timers may now mean something else; let the scheduler look again.
        self.timers_changed.notify_one();
    }

    pub async fn lock(&self, phone: &Phone) -> MutexGuard<'_, ()> {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        phone.hash(&mut h);
        self.locks[(h.finish() % STRIPES as u64) as usize]
            .lock()
            .await
    }

    /// Applies one event and returns once its changes are on disk.
    pub async fn apply(&self, input: Input<'_>) -> anyhow::Result<Applied> {
        let guard = self.lock(input.phone).await;
        if let Some(sid) = input.inbound_sid {
            if let Some(twiml) = self.store.inbound_reply(sid)? {
                drop(guard);
                return Ok(Applied {
                    outcome: Outcome::Ignored,
                    replies: Vec::new(),
                    twiml: Some(twiml),
                    duplicate: true,
                    subscriber: None,
                });
            }
        }
        let now = Utc::now();
        let (transition, _) = self.step(input.phone, &input.event, now)?;
        let applied = self.commit(transition, input.inbound_sid, input.fired, now)?;
        drop(guard);
        self.store.durable().await?;
        Ok(applied)
    }

    /// Runs the machine for `phone` without committing (the caller holds the lock).
    pub fn step(
        &self,
        phone: &Phone,
        event: &Event,
        now: DateTime<Utc>,
    ) -> anyhow::Result<(Transition, Arc<Flows>)> {
        let sub = self
            .store
            .subscriber(phone)?
            .unwrap_or_else(|| Subscriber::new(phone.clone(), now));
        let flows = self.flows();
        let t = machine::step(sub, event, &flows, now, &mut rand::rng());
        Ok((t, flows))
    }

    /// Turns a transition's effects into one store commit (not yet durable).
    pub fn commit(
        &self,
        t: Transition,
        inbound_sid: Option<&str>,
        fired: Option<DueTimer>,
        now: DateTime<Utc>,
    ) -> anyhow::Result<Applied> {
        let mut c = Commit {
            fired,
            ..Commit::default()
        };
        let mut replies = Vec::new();
        for e in t.effects {
            match e {
                Effect::Reply(text) => replies.push(text),
                Effect::Send(text) => c.outgoing.push((text, false)),
                Effect::SendCode(text) => c.outgoing.push((text, true)),
                Effect::Schedule(timer) => c.schedule.push(timer),
                Effect::Cancel(timer) => c.cancel.push(timer),
                Effect::Record(record) => c.history.push(HistoryEntry { at: now, record }),
            }
        }
        let twiml = inbound_sid.map(|_| crate::http::twiml::messages(&replies));
        c.inbound = inbound_sid
            .zip(twiml.clone())
            .map(|(s, x)| (s.to_string(), x));
        c.subscriber = Some(t.subscriber);
        self.store.commit(&c, now)?;
        if !c.schedule.is_empty() {
            self.timers_changed.notify_one();
        }
        if !c.outgoing.is_empty() {
            self.outbox_changed.notify_one();
        }
        Ok(Applied {
            outcome: t.outcome,
            replies,
            twiml,
            duplicate: false,
            subscriber: c.subscriber,
        })
    }

    /// Fires every timer due now (at most `limit`); returns how many fired.
    pub async fn fire_due_timers(&self, limit: usize) -> anyhow::Result<usize> {
        let due = self.store.due_timers(Utc::now(), limit)?;
        let n = due.len();
        for d in due {
            let phone = d.phone.clone();
            let event = Event::TimerDue(d.timer);
            self.apply(Input {
                phone: &phone,
                event,
                inbound_sid: None,
                fired: Some(d),
            })
            .await?;
        }
        Ok(n)
    }
}
