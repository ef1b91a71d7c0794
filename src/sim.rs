//! A sandbox: the real state machine over in-memory subscribers with a virtual clock and a
//! seeded RNG. `smsflow test` and `smsflow simulate` drive it.

use std::collections::BTreeMap;

use chrono::{DateTime, TimeDelta, Utc};
use rand::rngs::StdRng;
use rand::SeedableRng;

use crate::flows::Flows;
use crate::machine::{self, Effect, Event, Outcome, Subscriber};
use crate::phone::Phone;

/// A message the bot sent, and how it went out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sent {
    pub phone: Phone,
    pub text: String,
    /// `reply` (TwiML answer), `send` (outbox) or `code` (a verification code).
    pub channel: &'static str,
    /// The bare digits, for a code.
    pub code: Option<String>,
}

/// The latest time the sandbox's clock reaches (and a transcript's `! at` may set): the end
/// of year 9999. Beyond it lie only dates whose timers and local times could overflow.
pub fn latest() -> DateTime<Utc> {
    DateTime::from_timestamp(253_402_300_799, 0).unwrap_or(DateTime::<Utc>::MAX_UTC)
}

pub struct Sandbox {
    pub flows: Flows,
    pub now: DateTime<Utc>,
    rng: StdRng,
    subscribers: BTreeMap<Phone, Subscriber>,
    /// The codes issued, by minute, for `verify.max_codes_per_hour` (as the engine counts).
    codes_issued: std::collections::VecDeque<machine::CodeMinute>,
}

/// The default start of the virtual clock: a Monday, 15:00 UTC (10:00 in New York).
pub fn default_start() -> DateTime<Utc> {
    DateTime::from_timestamp(1_767_625_200, 0).unwrap_or_default()
}

impl Sandbox {
    pub fn new(flows: Flows, now: DateTime<Utc>, seed: u64) -> Sandbox {
        Sandbox {
            flows,
            now,
            rng: StdRng::seed_from_u64(seed),
            subscribers: BTreeMap::new(),
            codes_issued: std::collections::VecDeque::new(),
        }
    }

    pub fn reseed(&mut self, seed: u64) {
        self.rng = StdRng::seed_from_u64(seed);
    }

    /// Whether no number has texted yet.
    pub fn is_empty(&self) -> bool {
        self.subscribers.is_empty()
    }

    pub fn subscriber(&self, phone: &Phone) -> Option<&Subscriber> {
        self.subscribers.get(phone)
    }

    /// A text from `phone`; returns what the bot sent.
    pub fn text(&mut self, phone: &Phone, text: &str) -> Vec<Sent> {
        self.event(phone, Event::Inbound(text.to_string())).1
    }

    pub fn event(&mut self, phone: &Phone, event: Event) -> (Outcome, Vec<Sent>) {
        let known = self.subscribers.remove(phone);
        // As the engine: an event that creates no record (validate_otp, a provider's
        // opt-out) leaves a number it never met unknown.
        let keep = known.is_some() || event.creates_subscriber();
        let sub = known.unwrap_or_else(|| Subscriber::new(phone.clone(), self.now));
        // Within the daemon-wide code limit, as the engine steps.
        let most = self.flows.verify.max_codes_per_hour;
        let limits = machine::Limits {
            codes_refused_until: machine::codes_refused_until(&self.codes_issued, most, self.now),
        };
        let t = machine::step_within(sub, &event, &self.flows, self.now, &mut self.rng, limits);
        machine::count_codes(&mut self.codes_issued, &t, self.now);
        if keep {
            self.subscribers.insert(phone.clone(), t.subscriber);
        }
        let sent = t
            .effects
            .into_iter()
            .filter_map(|e| {
                let (text, channel, code) = match e {
                    Effect::Reply(t) => (t, "reply", None),
                    Effect::Send(t) => (t, "send", None),
                    Effect::SendCode { text, code } => (text, "code", Some(code.0)),
                    _ => return None,
                };
                Some(Sent {
                    phone: phone.clone(),
                    text,
                    channel,
                    code,
                })
            })
            .collect();
        (t.outcome, sent)
    }

    /// Moves the clock forward by `by`, firing every timer that comes due, in time order.
    pub fn advance(&mut self, by: TimeDelta) -> Vec<Sent> {
        // (`transcript::parse_delay` keeps jumps within a century; the clock stops at the
        // end of year 9999 all the same, far from the end of what a date can hold.)
        let target = self
            .now
            .checked_add_signed(by)
            .map_or(latest(), |t| t.min(latest()));
        let mut sent = Vec::new();
        // Bounded: a flow cannot fire more timers than this within one jump.
        for _ in 0..1_000_000 {
            let next = self
                .subscribers
                .values()
                .filter_map(|s| s.timer.map(|t| (t, s.phone.clone())))
                .filter(|(t, _)| t.at <= target)
                .min_by_key(|(t, _)| t.at);
            let Some((timer, phone)) = next else { break };
            self.now = self.now.max(timer.at);
            sent.extend(self.event(&phone, Event::TimerDue(timer)).1);
        }
        self.now = target;
        sent
    }
}
