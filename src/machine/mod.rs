//! The per-phone state machine: a pure function from (subscriber, event, flows, now, rng) to a
//! new subscriber and the effects to carry out. No IO, no clock, no global randomness here.

mod quiet;

use std::collections::BTreeMap;
use std::fmt;

use chrono::{DateTime, TimeDelta, Utc};
use rand::{Rng, RngExt};
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

use crate::flows::{AfterOtpApi, Flows, StepAction, Template};
use crate::phone::Phone;

pub use quiet::quiet_end;

/// Everything smsflow knows about one phone number.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subscriber {
    pub phone: Phone,
    pub state: State,
    /// Form answers and saved sequence answers, by field key.
    pub fields: BTreeMap<String, String>,
    /// The latest issued codes, oldest first. Only the last `verify.valid_codes` count; one
    /// more is kept, so that withdrawing a newest code that could not be sent brings back
    /// the one it displaced.
    pub codes: Vec<IssuedCode>,
    /// When codes were sent, within the current rate-limit window.
    pub code_sends: Vec<DateTime<Utc>>,
    /// The form question being asked, if any.
    pub form: Option<FormCursor>,
    /// The follow-up sequence this number was assigned (kept after it finishes).
    pub sequence: Option<String>,
    /// The one pending timer, if any.
    pub timer: Option<Timer>,
    /// Bumped by every new timer, so a timer that was replaced is recognised as stale.
    pub epoch: u64,
    pub created_at: DateTime<Utc>,
    pub verified_at: Option<DateTime<Utc>>,
    pub last_inbound_at: Option<DateTime<Utc>>,
    /// The codes the number held when it verified (the one it used, and any other it was
    /// sent), each until it expires (dropped at the next event after, or an opt-out):
    /// texted again (its owner thought the first did not arrive, or had asked twice), one is
    /// not taken as an answer. They verify nothing. (Stored from record v6 on, which kept
    /// the one used, v7 all; the older serde layouts never held any.)
    #[serde(skip)]
    pub used_codes: Vec<IssuedCode>,
    /// The sequence question that last went unanswered, while its answer is still taken
    /// (see [`LateQuestion`]). Stored from record v8 on; older records never held one.
    #[serde(skip)]
    pub late: Option<LateQuestion>,
    /// The number of ours it last texted or called (Twilio's `To`): messages to it are sent
    /// from there, when that is one of the configured senders. Kept by the engine, not the
    /// rules (stored from record v8 on).
    #[serde(skip)]
    pub via: Option<Phone>,
}

/// A sequence question whose `timeout` ran out: people answer late, and an answer it takes
/// is saved (and acknowledged) until `until`, the question's `timeout` again after it ran
/// out (or later, while quiet hours hold the next step past that), unless another question
/// (a sequence's or the form's) is asked first. Only a
/// question that saves its answer, and is not free text (which would take any text).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LateQuestion {
    pub sequence: String,
    pub step: usize,
    /// The field it saves into: a reload that moves another question to its step does not
    /// give that one its late answer.
    pub field: String,
    pub until: DateTime<Utc>,
}

/// Where a number is in its conversation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum State {
    Unverified,
    AwaitingCode,
    Verified,
    InSequence {
        name: String,
        step: usize,
        /// The step is a question that was asked and is waiting for its answer.
        waiting: bool,
    },
    OptedOut,
}

impl State {
    /// The name operators see in the admin API and the export.
    pub fn name(&self) -> &'static str {
        match self {
            State::Unverified => "unverified",
            State::AwaitingCode => "awaiting_code",
            State::Verified => "verified",
            State::InSequence { .. } => "in_sequence",
            State::OptedOut => "opted_out",
        }
    }

    pub const NAMES: [&'static str; 5] = [
        "unverified",
        "awaiting_code",
        "verified",
        "in_sequence",
        "opted_out",
    ];
}

/// The digits of a code on their way out. `Debug` hides them.
#[derive(Clone, PartialEq, Eq)]
pub struct Code(pub String);

impl fmt::Debug for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Code(******)")
    }
}

/// A verification code that was sent. `Debug` hides the digits.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IssuedCode {
    pub code: String,
    pub issued_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    /// Wrong guesses made while this code was valid.
    pub wrong: u8,
    /// Asked for by an app through the OTP API, to be entered there. (Stored from record v9
    /// on; older records read as not.)
    #[serde(skip)]
    pub by_app: bool,
}

impl IssuedCode {
    /// Still good for a guess at `now`: not expired, and not out of guesses.
    fn usable(&self, now: DateTime<Utc>, max_wrong: u8) -> bool {
        self.expires_at > now && self.wrong < max_wrong
    }

    /// Whether `guess` (see [`code_guess`]) is this code, compared in constant time.
    fn is(&self, guess: &str) -> bool {
        bool::from(self.code.as_bytes().ct_eq(guess.as_bytes()))
    }
}

impl fmt::Debug for IssuedCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssuedCode")
            .field("code", &"******")
            .field("issued_at", &self.issued_at)
            .field("expires_at", &self.expires_at)
            .field("wrong", &self.wrong)
            .field("by_app", &self.by_app)
            .finish()
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FormCursor {
    pub index: usize,
    /// Re-asking after EDIT: every field is asked, showing its current value.
    pub editing: bool,
    /// The key of the field asked, so that a reload that moves fields does not move the
    /// question (`None` in records written before it was kept: then `index` alone). The
    /// record layout stores it (`store::codec`, v5), not this derive, which v1 to v3 read.
    #[serde(skip)]
    pub key: Option<String>,
}

/// A durable timer. The store keys it by (at, phone, kind) and keeps `epoch` to spot stale ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timer {
    pub at: DateTime<Utc>,
    pub kind: TimerKind,
    pub epoch: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TimerKind {
    /// The next sequence step is due.
    Step,
    /// A sequence question went unanswered for its `timeout`.
    AskTimeout,
}

impl TimerKind {
    /// The name operators see (the admin API, the simulator).
    pub fn name(self) -> &'static str {
        match self {
            TimerKind::Step => "step",
            TimerKind::AskTimeout => "answer_timeout",
        }
    }
}

/// Something that happened to a number. `Debug` hides the codes it may carry.
#[derive(Clone, PartialEq, Eq)]
pub enum Event {
    /// A text from the number.
    Inbound(String),
    /// A text from the number that Twilio's Advanced Opt-Out took for one of its keywords
    /// (its `OptOutType`), which may be one the flows do not know (`PARAR`, say).
    InboundKeyword(String, OptOutType),
    /// A timer came due.
    TimerDue(Timer),
    /// An app asked for a code through the OTP API.
    OtpRequested,
    /// An app submitted a code through the OTP API.
    OtpSubmitted(String),
    /// This code (just issued) could not be delivered: it must not stay valid.
    CodeUndeliverable(String),
    /// A caller chose "read me a code" in the voice menu (the caller hears it).
    VoiceCodeRequested,
    /// A caller chose "opt in" in the voice menu: send a code by SMS.
    VoiceOptIn,
    /// A caller chose "opt out" in the voice menu.
    VoiceOptOut,
    /// An operator opted the number out.
    AdminOptOut,
    /// The provider reported the number unsubscribed (Twilio error 21610).
    ProviderUnsubscribed,
    /// The flows were reloaded: the sequence or step this number is in may be gone.
    FlowsChanged,
}

impl fmt::Debug for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // A text may be a code, and so are the other two: only their length shows.
        let hidden = |f: &mut fmt::Formatter<'_>, name: &str, t: &str| {
            write!(f, "{name}(<{} characters>)", t.chars().count())
        };
        match self {
            Event::Inbound(t) => hidden(f, "Inbound", t),
            Event::InboundKeyword(t, k) => {
                hidden(f, "InboundKeyword", t)?;
                write!(f, " {k:?}")
            }
            Event::OtpSubmitted(c) => hidden(f, "OtpSubmitted", c),
            Event::CodeUndeliverable(c) => hidden(f, "CodeUndeliverable", c),
            Event::TimerDue(t) => f.debug_tuple("TimerDue").field(t).finish(),
            Event::OtpRequested => f.write_str("OtpRequested"),
            Event::VoiceCodeRequested => f.write_str("VoiceCodeRequested"),
            Event::VoiceOptIn => f.write_str("VoiceOptIn"),
            Event::VoiceOptOut => f.write_str("VoiceOptOut"),
            Event::AdminOptOut => f.write_str("AdminOptOut"),
            Event::ProviderUnsubscribed => f.write_str("ProviderUnsubscribed"),
            Event::FlowsChanged => f.write_str("FlowsChanged"),
        }
    }
}

impl Event {
    /// Whether this event makes an unknown number worth remembering. (Not a provider's
    /// "unsubscribed" report: it can come late for a number erased since, which must stay
    /// erased.)
    pub fn creates_subscriber(&self) -> bool {
        matches!(
            self,
            Event::Inbound(_)
                | Event::InboundKeyword(..)
                | Event::OtpRequested
                | Event::VoiceCodeRequested
                | Event::VoiceOptIn
                | Event::VoiceOptOut
        )
    }
}

/// What Twilio's Advanced Opt-Out took a text for (the inbound webhook's `OptOutType`): it
/// has acted on it already (on `Stop`, it blocks the number), with keywords the operator may
/// have set in Twilio's console, in any language. `Stop` and `Help` count as the flows' own
/// keywords in every state; `Start` only for a number opted out (Twilio takes `YES` for
/// one, and elsewhere a `YES` is an answer).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OptOutType {
    Stop,
    Start,
    Help,
}

impl OptOutType {
    /// Twilio's word for it (`STOP`, `START`, `HELP`); any other is none of these.
    pub fn parse(word: &str) -> Option<OptOutType> {
        match word.trim().to_ascii_uppercase().as_str() {
            "STOP" => Some(OptOutType::Stop),
            "START" => Some(OptOutType::Start),
            "HELP" => Some(OptOutType::Help),
            _ => None,
        }
    }
}

/// Why a number in a sequence has lost its place in `flows` (after a reload): its sequence,
/// its step, or (while an answer is awaited) its question is gone. `None` when it has not.
pub fn lost_place(state: &State, flows: &Flows) -> Option<&'static str> {
    let State::InSequence {
        name,
        step,
        waiting,
    } = state
    else {
        return None;
    };
    match flows.sequence(name).map(|s| s.steps.get(*step)) {
        None => Some("sequence no longer exists"),
        Some(None) => Some("step no longer exists"),
        Some(Some(s)) if *waiting && !matches!(s.action, StepAction::Ask(_)) => {
            Some("the step at its place is no longer a question")
        }
        Some(Some(_)) => None,
    }
}

/// What the engine must do after a step. Effects are data; the engine carries them out.
/// `Debug` hides the text of a code's message (its code is a [`Code`], hidden too).
#[derive(Clone, PartialEq, Eq)]
pub enum Effect {
    /// Answer the inbound message directly (TwiML).
    Reply(String),
    /// Send a message through the outbox.
    Send(String),
    /// Send a verification code; the engine delivers it (queued, or at once for the OTP API
    /// and the voice menu, which need the bare `code` too).
    SendCode {
        text: String,
        code: Code,
    },
    Schedule(Timer),
    Cancel(Timer),
    Record(Record),
    /// A code issued at `issued_at` was withdrawn unsent: it no longer counts against
    /// `verify.max_codes_per_hour` (see [`count_codes`]).
    CodeWithdrawn {
        issued_at: DateTime<Utc>,
    },
}

impl fmt::Debug for Effect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Effect::Reply(t) => f.debug_tuple("Reply").field(t).finish(),
            Effect::Send(t) => f.debug_tuple("Send").field(t).finish(),
            Effect::SendCode { code, .. } => f
                .debug_struct("SendCode")
                .field("text", &"<hidden: it holds the code>")
                .field("code", code)
                .finish(),
            Effect::Schedule(t) => f.debug_tuple("Schedule").field(t).finish(),
            Effect::Cancel(t) => f.debug_tuple("Cancel").field(t).finish(),
            Effect::Record(r) => f.debug_tuple("Record").field(r).finish(),
            Effect::CodeWithdrawn { issued_at } => f
                .debug_struct("CodeWithdrawn")
                .field("issued_at", issued_at)
                .finish(),
        }
    }
}

/// A history entry: what happened, without secrets (codes are never recorded).
/// Externally tagged (bincode cannot read internally tagged enums).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Record {
    OptedIn { via: String },
    CodeSent,
    CodeWithdrawn,
    CodeRateLimited,
    CodeRejected { reason: String },
    Verified { via: String },
    FieldSaved { key: String, value: String },
    SequenceAssigned { name: String },
    StepSent { sequence: String, step: usize },
    Answered { sequence: String, step: usize },
    AnswerTimedOut { sequence: String, step: usize },
    SequenceFinished { name: String },
    SequenceEnded { name: String, reason: String },
    Deferred { until: DateTime<Utc> },
    OptedOut { reason: String },
}

impl Record {
    /// Every kind, by [`Record::name`].
    pub const NAMES: [&'static str; 15] = [
        "opted_in",
        "code_sent",
        "code_withdrawn",
        "code_rate_limited",
        "code_rejected",
        "verified",
        "field_saved",
        "sequence_assigned",
        "step_sent",
        "answered",
        "answer_timed_out",
        "sequence_finished",
        "sequence_ended",
        "deferred",
        "opted_out",
    ];

    /// Its kind, as the admin API's history names it (`event`) and metrics count it.
    pub fn name(&self) -> &'static str {
        match self {
            Record::OptedIn { .. } => "opted_in",
            Record::CodeSent => "code_sent",
            Record::CodeWithdrawn => "code_withdrawn",
            Record::CodeRateLimited => "code_rate_limited",
            Record::CodeRejected { .. } => "code_rejected",
            Record::Verified { .. } => "verified",
            Record::FieldSaved { .. } => "field_saved",
            Record::SequenceAssigned { .. } => "sequence_assigned",
            Record::StepSent { .. } => "step_sent",
            Record::Answered { .. } => "answered",
            Record::AnswerTimedOut { .. } => "answer_timed_out",
            Record::SequenceFinished { .. } => "sequence_finished",
            Record::SequenceEnded { .. } => "sequence_ended",
            Record::Deferred { .. } => "deferred",
            Record::OptedOut { .. } => "opted_out",
        }
    }
}

/// How an event went, for callers that answer someone (the OTP API, the voice menu).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Done,
    CodeSent,
    Verified,
    WrongCode,
    Expired,
    /// Too many wrong guesses on every valid code; a new code may be requested from
    /// `new_code_at` (the send limit's window).
    Locked {
        new_code_at: DateTime<Utc>,
    },
    /// Too many codes sent (to this number, or by everyone this hour: `everyone`); another
    /// may be sent from `retry_at`.
    RateLimited {
        retry_at: DateTime<Utc>,
        everyone: bool,
    },
    OptedOut,
    /// Nothing to do (a stale timer, a repeated STOP).
    Ignored,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transition {
    pub subscriber: Subscriber,
    pub effects: Vec<Effect>,
    pub outcome: Outcome,
}

impl Subscriber {
    pub fn new(phone: Phone, now: DateTime<Utc>) -> Subscriber {
        Subscriber {
            phone,
            state: State::Unverified,
            fields: BTreeMap::new(),
            codes: Vec::new(),
            code_sends: Vec::new(),
            form: None,
            sequence: None,
            timer: None,
            epoch: 0,
            created_at: now,
            verified_at: None,
            last_inbound_at: None,
            used_codes: Vec::new(),
            late: None,
            via: None,
        }
    }

    /// The latest of its creation, its last text, its last code sent, and the expiry of the
    /// codes it holds (one still valid may yet be entered). (A call is no event of its own:
    /// only what its menu does, such as sending a code.)
    pub fn last_active(&self) -> DateTime<Utc> {
        let codes = (self.codes.iter()).flat_map(|c| [c.issued_at, c.expires_at]);
        (codes.chain(self.code_sends.iter().copied()))
            .chain(self.last_inbound_at)
            .fold(self.created_at, DateTime::max)
    }

    /// A number that never got anywhere and has been silent since `before`: never verified,
    /// nothing answered, no sequence, nothing pending, and not opted out (an opt-out is kept
    /// for ever: it is what stops a message). A retention forgets it.
    pub fn forgettable(&self, before: DateTime<Utc>) -> bool {
        matches!(self.state, State::Unverified | State::AwaitingCode)
            && self.verified_at.is_none()
            && self.fields.is_empty()
            && self.sequence.is_none()
            && self.form.is_none()
            && self.timer.is_none()
            && self.late.is_none()
            && self.last_active() < before
    }

    /// Opted in and not opted out since.
    pub fn opted_in(&self) -> bool {
        matches!(
            self.state,
            State::AwaitingCode | State::Verified | State::InSequence { .. }
        )
    }

    /// Where the codes that count start in `codes`: only the latest `valid_codes` (the
    /// flows' `verify.valid_codes`) do; the one before them is kept but is no code.
    fn first_counted_code(&self, valid_codes: u8) -> usize {
        self.codes.len().saturating_sub(usize::from(valid_codes))
    }

    /// Whether `code` is one of the codes that count (of the latest `valid_codes`): not one
    /// newer codes displaced, which may still be kept (see `codes`).
    pub fn holds_code(&self, code: &str, valid_codes: u8) -> bool {
        self.codes[self.first_counted_code(valid_codes)..]
            .iter()
            .any(|c| c.code == code)
    }

    /// The sequence name and step shown to operators.
    pub fn sequence_step(&self) -> (Option<&str>, Option<usize>) {
        match &self.state {
            State::InSequence { name, step, .. } => (Some(name), Some(*step)),
            _ => (self.sequence.as_deref(), None),
        }
    }
}

fn ceil_millis(t: DateTime<Utc>) -> DateTime<Utc> {
    let ms = t.timestamp_millis();
    let exact = i64::from(t.timestamp_subsec_nanos().is_multiple_of(1_000_000));
    DateTime::from_timestamp_millis(ms + 1 - exact).unwrap_or(t)
}

/// Compatibility forms read as the letters and digits they show (Unicode NFKC): full-width
/// `ＳＴＯＰ`, as an East Asian keyboard types it, is `STOP`; `①` is `1`.
fn folded(text: &str) -> std::borrow::Cow<'_, str> {
    use unicode_normalization::UnicodeNormalization;
    if text.is_ascii() {
        text.into()
    } else {
        text.nfkc().collect::<String>().into()
    }
}

/// Upper-cases and keeps only letters and digits: `" stop. "`, `"Stop all"` and `"opt-out"`
/// read `"STOP"`, `"STOPALL"` and `"OPTOUT"`; an option copied as shown, `"under 30"`, reads
/// as its label `under_30`. Keywords and choices are compared in this form.
pub fn normalize(text: &str) -> String {
    crate::ascii_digits(&folded(text))
        .chars()
        .filter(|c| c.is_alphanumeric())
        .flat_map(char::to_uppercase)
        .collect()
}

/// What a placeholder of a number's texts stands for: `{bot.name}`, and with the number's
/// record, `{sequence}` and `{field.KEY}` (`{code}` and `{current}` belong to the moment).
pub fn placeholder(flows: &Flows, sub: Option<&Subscriber>, name: &str) -> Option<String> {
    match name {
        "bot.name" => Some(flows.bot.name.clone()),
        "sequence" => sub.and_then(|s| s.sequence.clone()),
        other => other
            .strip_prefix("field.")
            .and_then(|k| sub.and_then(|s| s.fields.get(k).cloned())),
    }
}

/// Twilio's limit for one message body, counted here in UTF-16 code units (an emoji is two),
/// which is never fewer than Twilio's count.
pub const MAX_BODY: usize = 1600;

/// How many UTF-16 units of a value a placeholder keeps when the whole text would not fit.
pub const SHORTENED: usize = 40;

fn fits(text: &str) -> bool {
    text.encode_utf16().count() <= MAX_BODY
}

/// `value` kept to `most` UTF-16 units (whole characters), then `…` (one unit): at most
/// `most + 1` units, as Twilio counts them, which `check` reckons with.
fn shortened(value: &str, most: usize) -> String {
    let mut units = 0;
    for (i, c) in value.char_indices() {
        units += c.len_utf16();
        if units > most {
            return format!("{}…", &value[..i]);
        }
    }
    value.to_string()
}

/// A text within [`MAX_BODY`]: `check` holds every flow text to it, but an answer filled into
/// `{field.KEY}` may be as long as a message itself (and is shortened first, see
/// `render_with`). What is still too long is cut, ending in `…`, rather than refused by Twilio.
fn fit(text: String) -> String {
    if fits(&text) {
        return text;
    }
    let (mut units, mut end) = (0, 0);
    for (i, c) in text.char_indices() {
        units += c.len_utf16();
        // One unit left for the `…`.
        if units > MAX_BODY - 1 {
            break;
        }
        end = i + c.len_utf8();
    }
    format!("{}…", &text[..end])
}

/// A text as a code guess, as people type codes: "123 456", "123-456", "123456." are the
/// code; "3:30" or "10.5" stay what they are (not a guess that could cost an attempt). A
/// code within words ("My code is 123456", "123456 thanks") is the code too: the run of
/// `digits` digits in the text (spaces and dashes within it allowed), or the same one
/// pasted twice; two different ones are no guess. Digits alone of another length are a
/// guess (a wrong one).
fn code_guess(text: &str, digits: usize) -> String {
    let text = crate::ascii_digits(text);
    let plain: String = text
        .trim_matches(|c: char| c.is_whitespace() || c.is_ascii_punctuation())
        .chars()
        .filter(|c| !c.is_whitespace() && *c != '-')
        .collect();
    if plain.len() == digits && plain.chars().all(|c| c.is_ascii_digit()) {
        return plain;
    }
    // Runs of digits (a space or dash within one goes on with it); a run of a code's length
    // is a code, and so is one of several, each that code ("123456 123456").
    let mut runs: Vec<String> = Vec::new();
    let mut run = String::new();
    for c in text.chars() {
        if c.is_ascii_digit() {
            run.push(c);
        } else if !(run.is_empty() || c == ' ' || c == '-') {
            runs.push(std::mem::take(&mut run));
        }
    }
    runs.push(run);
    let mut coded: Vec<String> = Vec::new();
    for run in runs
        .iter()
        .filter(|r| r.len() >= digits && r.len() % digits == 0)
    {
        let chunks: Vec<&str> = (0..run.len())
            .step_by(digits)
            .map(|i| &run[i..i + digits])
            .collect();
        coded.extend(chunks.into_iter().map(str::to_string));
    }
    match coded.first() {
        Some(first) if coded.iter().all(|c| c == first) => first.clone(),
        // Two different codes: no guess (the text as it is, which no code is).
        Some(_) => text.to_string(),
        None => plain,
    }
}

/// The question whose late answer a number's next text may be, with its place: still in
/// time, and still the question that ran out by the rules it was kept by (a reload may have
/// moved or changed it since). What `simulate` and the admin page show, too.
pub fn late_question<'s, 'f>(
    sub: &'s Subscriber,
    flows: &'f Flows,
    now: DateTime<Utc>,
) -> Option<(&'s LateQuestion, &'f crate::flows::Question)> {
    let late = sub.late.as_ref().filter(|l| l.until > now)?;
    let q = flows
        .question(&late.sequence, late.step)
        .filter(|q| late_window(q).is_some_and(|(field, _)| *field == late.field))?;
    Some((late, q))
}

/// Whether a question takes a late answer (see [`LateQuestion`]): the field it saves into,
/// and for how long after its timeout ran out (the timeout again). Not free text, which
/// would take any text at all, nor one that saves nothing.
fn late_window(q: &crate::flows::Question) -> Option<(&String, chrono::TimeDelta)> {
    let free = matches!(q.expect, crate::flows::Expect::Any);
    Some((q.save.as_ref()?, q.timeout.filter(|_| !free)?))
}

/// Whether a text asks to stop in words: it has the word "stop" or "unsubscribe" in it.
/// (`check` refuses a choice with one of those words in both its key and its label, which
/// no reply could give.)
pub fn asks_to_stop(text: &str) -> bool {
    folded(text)
        .split(|c: char| !c.is_alphanumeric())
        .any(|w| w.eq_ignore_ascii_case("stop") || w.eq_ignore_ascii_case("unsubscribe"))
}

/// What the daemon as a whole allows at the moment, beyond each number's own limits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Limits {
    /// No code is issued to anyone before this: `verify.max_codes_per_hour` is spent (see
    /// [`codes_refused_until`]).
    pub codes_refused_until: Option<DateTime<Utc>>,
}

/// The codes issued in one minute (its first instant, and how many), as counted against
/// `verify.max_codes_per_hour`.
pub type CodeMinute = (DateTime<Utc>, u32);

/// How long a minute's codes count: until the hour after its last instant has passed (so
/// a code may count up to a minute longer than its hour, never shorter).
pub const CODES_COUNTED: TimeDelta = TimeDelta::minutes(61);

/// Until when the codes issued in minute `m` count against `verify.max_codes_per_hour`. (A
/// minute read back from the store is not trusted not to be the end of time.)
pub fn counted_until(m: DateTime<Utc>) -> DateTime<Utc> {
    m.checked_add_signed(CODES_COUNTED)
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}

/// Counts the codes `t` issued into `minutes` (oldest first), and forgets the minutes that
/// no longer count at `now`; whether that changed anything. (Counted whatever
/// `verify.max_codes_per_hour` says: a limit set or raised by a reload counts the hour's
/// codes all the same.)
pub fn count_codes(
    minutes: &mut std::collections::VecDeque<CodeMinute>,
    t: &Transition,
    now: DateTime<Utc>,
) -> bool {
    let before = minutes.len();
    while (minutes.front()).is_some_and(|(m, _)| counted_until(*m) <= now) {
        minutes.pop_front();
    }
    // The clock went back (an NTP step): codes counted in minutes still to come are counted
    // in this one, so they hold the limit for an hour from now, not until the clock is back
    // there.
    let this_minute = minute_of(now);
    let ahead = (minutes.iter())
        .filter(|(m, _)| *m > this_minute)
        .fold(0u32, |sum, (_, n)| sum.saturating_add(*n));
    if ahead > 0 {
        minutes.retain(|(m, _)| *m <= this_minute);
        match minutes.back_mut() {
            Some((m, n)) if *m == this_minute => *n = n.saturating_add(ahead),
            _ => minutes.push_back((this_minute, ahead)),
        }
    }
    let issued = (t.effects.iter())
        .filter(|e| matches!(e, Effect::SendCode { .. }))
        .count();
    let issued = u32::try_from(issued).unwrap_or(u32::MAX);
    if issued > 0 {
        let minute = minute_of(now);
        match minutes.back_mut() {
            Some((m, n)) if *m == minute => *n = n.saturating_add(issued),
            _ => minutes.push_back((minute, issued)),
        }
    }
    // Codes withdrawn unsent (the provider refused them, or newer ones displaced them)
    // cost nothing: a provider outage must not spend everyone's hour.
    let mut given_back = false;
    for e in &t.effects {
        if let Effect::CodeWithdrawn { issued_at } = e {
            let minute = minute_of(*issued_at);
            if let Some(i) = minutes.iter().position(|(m, _)| *m == minute) {
                given_back = true;
                match minutes.get_mut(i) {
                    Some((_, n)) if *n > 1 => *n -= 1,
                    _ => {
                        minutes.remove(i);
                    }
                }
            }
        }
    }
    issued > 0 || given_back || ahead > 0 || minutes.len() != before
}

/// The start of the minute `at` falls in.
fn minute_of(at: DateTime<Utc>) -> DateTime<Utc> {
    let second = at.timestamp();
    DateTime::from_timestamp(second - second.rem_euclid(60), 0).unwrap_or(at)
}

/// When a code may be issued again, given the codes of the last hour by minute (oldest
/// first) and `verify.max_codes_per_hour`: `None` while the hour has room.
pub fn codes_refused_until(
    minutes: &std::collections::VecDeque<CodeMinute>,
    max_per_hour: Option<u32>,
    now: DateTime<Utc>,
) -> Option<DateTime<Utc>> {
    let max = u64::from(max_per_hour?);
    // A minute still to come (the clock went back) counts as this one (see `count_codes`).
    let this_minute = minute_of(now);
    let until = |m: &DateTime<Utc>| counted_until((*m).min(this_minute));
    let counted = || minutes.iter().filter(|(m, _)| until(m) > now);
    let mut total: u64 = counted().map(|(_, n)| u64::from(*n)).sum();
    // The minute whose codes, once they no longer count, leave room for the next.
    for (m, n) in counted() {
        if total < max {
            break;
        }
        total -= u64::from(*n);
        if total < max {
            return Some(until(m));
        }
    }
    None
}

/// The heart of smsflow: one event applied to one number.
pub fn step<R: Rng + ?Sized>(
    subscriber: Subscriber,
    event: &Event,
    flows: &Flows,
    now: DateTime<Utc>,
    rng: &mut R,
) -> Transition {
    step_within(subscriber, event, flows, now, rng, Limits::default())
}

/// The most messages one reply (TwiML) carries: Twilio's limit.
pub const MAX_REPLIES: usize = 10;

/// [`step`], within the daemon's limits of the moment.
pub fn step_within<R: Rng + ?Sized>(
    subscriber: Subscriber,
    event: &Event,
    flows: &Flows,
    now: DateTime<Utc>,
    rng: &mut R,
    limits: Limits,
) -> Transition {
    let reply = matches!(event, Event::Inbound(_) | Event::InboundKeyword(..));
    let mut m = Run {
        sub: subscriber,
        flows,
        now,
        rng,
        effects: Vec::new(),
        outcome: Outcome::Done,
        reply,
        code: None,
        limits,
    };
    m.handle(event);
    Transition {
        subscriber: m.sub,
        effects: m.effects,
        outcome: m.outcome,
    }
}

struct Run<'a, R: ?Sized> {
    sub: Subscriber,
    flows: &'a Flows,
    now: DateTime<Utc>,
    rng: &'a mut R,
    effects: Vec<Effect>,
    outcome: Outcome,
    /// Messages answer the inbound text (TwiML) rather than go through the outbox.
    reply: bool,
    /// The code just issued, for `{code}`.
    code: Option<String>,
    limits: Limits,
}

impl<R: Rng + ?Sized> Run<'_, R> {
    fn handle(&mut self, event: &Event) {
        // Kept codes go at expiry, whatever the event (a number that never texts again
        // does not carry them in every rewrite).
        let now = self.now;
        self.sub.used_codes.retain(|c| c.expires_at > now);
        if self.sub.late.as_ref().is_some_and(|l| l.until <= now) {
            self.sub.late = None;
        }
        match event {
            Event::Inbound(text) => self.inbound(text, None),
            Event::InboundKeyword(text, kind) => self.inbound(text, Some(*kind)),
            Event::TimerDue(t) => self.timer_due(*t),
            Event::OtpRequested => self.unless_opted_out(|r| r.issue_code("otp_api")),
            Event::VoiceCodeRequested => self.unless_opted_out(|r| r.issue_code("voice")),
            Event::OtpSubmitted(code) => self.unless_opted_out(|r| r.check_code(code, false)),
            Event::CodeUndeliverable(code) => {
                // Withdraw exactly that code and give back its place in the rate limit.
                // The newest of that value: the one just issued.
                if let Some(i) = self.sub.codes.iter().rposition(|c| c.code == *code) {
                    let gone = self.sub.codes.remove(i);
                    if let Some(j) = self
                        .sub
                        .code_sends
                        .iter()
                        .position(|t| *t == gone.issued_at)
                    {
                        self.sub.code_sends.remove(j);
                    }
                    self.record(Record::CodeWithdrawn);
                    self.effects.push(Effect::CodeWithdrawn {
                        issued_at: gone.issued_at,
                    });
                    // Its request is what made the number wait for a code: with no code
                    // ever given out, it is back where it was, not opted in.
                    if self.sub.state == State::AwaitingCode && self.sub.codes.is_empty() {
                        self.sub.state = State::Unverified;
                    }
                } else if let Some(its) = (0..self.sub.code_sends.len())
                    .filter(|&j| {
                        // More sends at this time than kept codes issued at it: one is a
                        // displaced code's (codes asked for in one batch share a time).
                        let at = self.sub.code_sends[j];
                        let sends = self.sub.code_sends.iter().filter(|t| **t == at).count();
                        sends > self.sub.codes.iter().filter(|c| c.issued_at == at).count()
                    })
                    .max_by_key(|&j| self.sub.code_sends[j])
                {
                    // Newer codes displaced it before its send failed (several asked for at
                    // once): it can no longer be used, but its send still counts against the
                    // limit. Its time went with it: the newest send of no kept code is given
                    // back for it.
                    let issued_at = self.sub.code_sends.remove(its);
                    self.record(Record::CodeWithdrawn);
                    self.effects.push(Effect::CodeWithdrawn { issued_at });
                }
                self.outcome = Outcome::Done;
            }
            Event::VoiceOptIn => match self.sub.state {
                State::Unverified | State::AwaitingCode => self.issue_code("voice"),
                // Caller ID can be spoofed: a call does not undo an opt-out (and Twilio
                // blocks texts to a number that sent STOP until it texts START).
                State::OptedOut => self.outcome = Outcome::OptedOut,
                _ => self.outcome = Outcome::Ignored,
            },
            // The call itself speaks the confirmation; a text would be suppressed anyway.
            Event::VoiceOptOut => self.opt_out("voice menu", false),
            Event::AdminOptOut => self.opt_out("admin", false),
            Event::ProviderUnsubscribed => {
                self.opt_out("provider reported unsubscribed (21610)", false)
            }
            Event::FlowsChanged => {
                if !self.end_if_gone() {
                    self.outcome = Outcome::Ignored;
                }
            }
        }
    }

    /// Ends the number's sequence if the live flows no longer have its place in it; says
    /// whether it did.
    fn end_if_gone(&mut self) -> bool {
        let Some(reason) = lost_place(&self.sub.state, self.flows) else {
            return false;
        };
        if let State::InSequence { name, .. } = self.sub.state.clone() {
            self.end_sequence(&name, reason);
        }
        true
    }

    // ---- messages ----------------------------------------------------------

    fn render(&self, t: &Template) -> String {
        self.render_with(t, None)
    }

    fn render_with(&self, t: &Template, current: Option<&str>) -> String {
        self.render_joined(&[("", t, current)])
    }

    /// Texts filled in and joined, each after its separator, as one message. When the whole
    /// would not fit, an answer as long as a text fills a placeholder: every placeholder is
    /// shortened where it stands, so what the flow wrote around them (a code, what to reply)
    /// is still sent.
    fn render_joined(&self, parts: &[(&str, &Template, Option<&str>)]) -> String {
        let joined = |most: usize| {
            parts
                .iter()
                .map(|(sep, t, current)| {
                    let filled = t.render(|name| match name {
                        "code" => self.code.clone(),
                        "current" => current.map(|c| shortened(c, most)),
                        other => placeholder(self.flows, Some(&self.sub), other)
                            .map(|v| shortened(&v, most)),
                    });
                    format!("{sep}{filled}")
                })
                .collect::<String>()
        };
        let text = joined(usize::MAX);
        if fits(&text) {
            return text;
        }
        fit(joined(SHORTENED))
    }

    fn say(&mut self, text: String) {
        // (Already within the limit: every text is filled in by `render_joined`.)
        let text = text.trim().to_string();
        if text.is_empty() {
            return;
        }
        let replies = (self.effects.iter())
            .filter(|e| matches!(e, Effect::Reply(_)))
            .count();
        // Twilio sends at most 10 of a reply's messages (warning 14109) and drops the rest
        // unsaid: those go through the outbox.
        self.effects.push(if self.reply && replies < MAX_REPLIES {
            Effect::Reply(text)
        } else {
            Effect::Send(text)
        });
    }

    fn say_t(&mut self, t: &Template) {
        let text = self.render(t);
        self.say(text);
    }

    fn record(&mut self, r: Record) {
        self.effects.push(Effect::Record(r));
    }

    // ---- inbound texts -----------------------------------------------------

    /// A text; `twilio`: the keyword Twilio took it for, if any (see [`OptOutType`]).
    fn inbound(&mut self, text: &str, twilio: Option<OptOutType>) {
        self.sub.last_inbound_at = Some(self.now);
        let word = normalize(text);
        let kw = &self.flows.keywords;
        let is = |list: &[String]| list.contains(&word);
        // Global keywords first, whatever the state.
        if is(&kw.opt_out) || twilio == Some(OptOutType::Stop) {
            if self.sub.state == State::OptedOut {
                self.outcome = Outcome::Ignored;
            } else {
                self.opt_out("keyword", true);
            }
            return;
        }
        if is(&kw.help) || twilio == Some(OptOutType::Help) {
            self.say_t(&self.flows.replies.help);
            // Then the question still open, which the next text answers: help is no answer.
            self.ask_open_again();
            return;
        }
        // "Please stop", "stop texting me": an opt-out asked for in words is no answer, and
        // is told the word that works. (The word alone, "stop.", was the keyword above.)
        if self.sub.state != State::OptedOut && asks_to_stop(text) {
            self.say_t(&self.flows.replies.stop_hint);
            self.ask_open_again();
            return;
        }
        let opt_in = is(&kw.opt_in);
        let edit = is(&kw.edit);
        match self.sub.state.clone() {
            State::OptedOut => {
                // Twilio lifts its own block on YES as on START (no question is open to
                // take it as an answer): staying opted out would leave the number told by
                // Twilio that it is back, and never sent a code.
                if opt_in || word == "YES" || twilio == Some(OptOutType::Start) {
                    self.issue_code("sms");
                    if self.sub.state == State::OptedOut {
                        // Refused a code (the hour's are spent), yet back in by its own
                        // word, as Twilio has it: no longer opted out, only not verified.
                        // Told to try again later, it can then text JOIN (and a text is
                        // answered, not ignored, meanwhile).
                        self.record(Record::OptedIn {
                            via: "sms".to_string(),
                        });
                        self.sub.state = State::Unverified;
                    }
                } else {
                    self.outcome = Outcome::Ignored;
                }
            }
            State::Unverified => {
                if opt_in {
                    self.issue_code("sms");
                } else {
                    self.say_t(&self.flows.replies.not_joined);
                }
            }
            State::AwaitingCode => {
                if opt_in {
                    self.issue_code("sms");
                } else if self.awaits_only_app_codes() {
                    self.text_while_app_code(text);
                } else {
                    self.check_code(text, true);
                }
            }
            State::Verified | State::InSequence { .. } => {
                let guess = code_guess(text, usize::from(self.flows.verify.code_length));
                if opt_in && self.joins_by_text() {
                    // Verified, and never in the conversation (by an app's OTP API with
                    // `after_otp_api = "stay"`, or by text while the flows had nothing more
                    // to ask or send), and now asking for it: what joining by text gives.
                    self.record(Record::OptedIn {
                        via: "sms".to_string(),
                    });
                    self.welcome(true);
                    self.continue_form();
                } else if opt_in {
                    self.say_t(&self.flows.replies.already_joined);
                    self.ask_open_again();
                } else if self.holds_live_code() && self.reads_as_code(text) {
                    // An app asked for a code for a number already verified, and it was texted
                    // back: not an answer (it would be recorded), and still the app's to
                    // validate. Any text that reads as a code gets the same while the app's
                    // code lives, whether it is the code or not (were only the code kept out,
                    // the answer would tell a guess right; texting is no guess counted against
                    // it, see `text_while_app_code`), and is told why; then an open question
                    // (the form's, or a sequence's) is asked again.
                    self.say_t(&self.flows.verify.api_code_texted);
                    self.ask_open_again();
                } else if self.echoes_used_code(&guess) {
                    // The code it verified with, texted again: an open question is asked
                    // again.
                    if !self.ask_open_again() {
                        self.outcome = Outcome::Ignored;
                    }
                } else if let (true, Some(onboarding)) =
                    (edit, self.sub.form.clone().filter(|c| !c.editing))
                {
                    // The first pass through the form is not done: an editing pass now would
                    // end without the sequence that pass leads to. Its question again; EDIT
                    // works once it is answered.
                    self.ask_again(&onboarding);
                } else if edit && !self.flows.form.fields.is_empty() {
                    // A question of a sequence waiting for its answer gets its whole time
                    // again for the edit (and again once the pass asks it again), so it does
                    // not run out in the middle of a pass, nor wait for ever on one left.
                    self.restart_question_timeout();
                    self.ask_field(0, true);
                } else if edit {
                    // No form to edit: EDIT is still a keyword, never an answer. The open
                    // question (a sequence's) is asked again.
                    self.say_t(&self.flows.replies.unknown);
                    self.ask_open_again();
                } else if self.sub.form.is_some() {
                    self.answer_form(text);
                } else if let State::InSequence {
                    name,
                    step,
                    waiting: true,
                } = &self.sub.state
                {
                    let (name, step) = (name.clone(), *step);
                    self.answer_question(&name, step, text);
                } else if !self.answer_late(text) {
                    self.say_t(&self.flows.replies.unknown);
                }
            }
        }
    }

    /// Whether an opt-in keyword from this verified number starts the conversation: it was
    /// verified without it (by the OTP API, which then leaves it be) and has never been in
    /// it (no form question open, never drawn a sequence), and the flows have something to
    /// ask or send.
    fn joins_by_text(&self) -> bool {
        let nothing_yet = self.sub.state == State::Verified
            && self.sub.form.is_none()
            && self.sub.sequence.is_none();
        nothing_yet && (self.form_asks() || self.flows.total_weight() > 0)
    }

    /// Whether the form has a field this number has not answered.
    fn form_asks(&self) -> bool {
        (self.flows.form.fields.iter()).any(|f| !self.sub.fields.contains_key(&f.key))
    }

    fn opt_out(&mut self, reason: &str, confirm: bool) {
        if self.sub.state == State::OptedOut {
            self.outcome = Outcome::Ignored;
            return;
        }
        self.clear_timer();
        self.sub.state = State::OptedOut;
        self.sub.form = None;
        self.sub.codes.clear();
        self.sub.used_codes.clear();
        self.sub.late = None;
        self.record(Record::OptedOut {
            reason: reason.to_string(),
        });
        if confirm {
            self.say_t(&self.flows.replies.opted_out);
        }
        self.outcome = Outcome::OptedOut;
    }

    // ---- verification ------------------------------------------------------

    /// What an app or a caller asks of a number (a code, a code's check) is done unless the
    /// number opted out.
    fn unless_opted_out(&mut self, act: impl FnOnce(&mut Self)) {
        if self.sub.state == State::OptedOut {
            self.outcome = Outcome::OptedOut;
        } else {
            act(self);
        }
    }

    /// Where the send limit's window starts: sends before it no longer count.
    fn send_window_start(&self) -> DateTime<Utc> {
        self.now
            .checked_sub_signed(self.flows.verify.send_window)
            .unwrap_or(self.now)
    }

    /// Until when the send limit refuses another code; `None` when it allows one now.
    fn codes_refused_until(&self) -> Option<DateTime<Utc>> {
        let v = &self.flows.verify;
        let start = self.send_window_start();
        let mut counted: Vec<DateTime<Utc>> = (self.sub.code_sends.iter())
            .filter(|t| **t > start)
            .copied()
            .collect();
        let over = counted.len().checked_sub(v.max_sends as usize)?;
        // Room once all but `max_sends - 1` have left the window: more than `max_sends` are
        // counted when a reload lowered it.
        counted.sort();
        let last_to_leave = counted.get(over).copied().unwrap_or(self.now);
        Some(
            last_to_leave
                .checked_add_signed(v.send_window)
                .unwrap_or(self.now),
        )
    }

    fn issue_code(&mut self, via: &str) {
        // The number's own limit, or everyone's (a texter is then told `verify.busy`, which
        // says nothing of the others).
        let own = self.codes_refused_until();
        let everyone = self.limits.codes_refused_until.filter(|t| *t > self.now);
        let start = self.send_window_start();
        self.sub.code_sends.retain(|t| *t > start);
        if let Some(retry_at) = own.into_iter().chain(everyone).max() {
            self.outcome = Outcome::RateLimited {
                retry_at,
                everyone: own.is_none(),
            };
            self.record(Record::CodeRateLimited);
            // A texter is told in the reply to their own text. An API caller or a voice
            // caller hears it from the outcome: texting the number for each refused request
            // would let anyone who can call the API make smsflow text any number, unlimited.
            if self.reply {
                let v = &self.flows.verify;
                self.say_t(if own.is_some() {
                    &v.rate_limited
                } else {
                    &v.busy
                });
            }
            return;
        }
        let v = &self.flows.verify;
        let code: String = (0..v.code_length)
            .map(|_| char::from(b'0' + self.rng.random_range(0..10u8)))
            .collect();
        self.sub.codes.push(IssuedCode {
            code: code.clone(),
            issued_at: self.now,
            expires_at: self.now.checked_add_signed(v.ttl).unwrap_or(self.now),
            wrong: 0,
            // Sent with `api_send`, which tells its owner to enter it in the app (decided
            // now: a reload may change the texts while it is out).
            by_app: via == "otp_api" && v.api_send.is_some(),
        });
        // The counted ones, and the one before them (see `Subscriber::codes`).
        let keep = usize::from(v.valid_codes) + 1;
        if self.sub.codes.len() > keep {
            let drop = self.sub.codes.len() - keep;
            self.sub.codes.drain(..drop);
        }
        self.sub.code_sends.push(self.now);
        if matches!(self.sub.state, State::Unverified | State::OptedOut) {
            self.record(Record::OptedIn {
                via: via.to_string(),
            });
        }
        if matches!(
            self.sub.state,
            State::Unverified | State::OptedOut | State::AwaitingCode
        ) {
            self.sub.state = State::AwaitingCode;
        }
        self.code = Some(code);
        let v = &self.flows.verify;
        let template = match (via, &v.api_send) {
            ("otp_api", Some(api)) => api,
            _ => &v.send,
        };
        let text = self.render(template);
        self.effects.push(Effect::SendCode {
            text,
            code: Code(self.code.clone().unwrap_or_default()),
        });
        self.record(Record::CodeSent);
        self.outcome = Outcome::CodeSent;
    }

    /// Whether a guess (read by [`code_guess`]) is a code the number held when it verified
    /// (by text or by an app), still unexpired.
    fn echoes_used_code(&self, guess: &str) -> bool {
        self.sub
            .used_codes
            .iter()
            .any(|c| c.expires_at > self.now && c.is(guess))
    }

    /// Whether the number holds one of the latest codes, still usable (whatever its digits).
    fn holds_live_code(&self) -> bool {
        self.live_codes().next().is_some()
    }

    /// Whether a text reads as a code ([`Self::code_readings`]). Only lengths are looked at,
    /// never a code's digits, so what follows from it tells nothing of them.
    fn reads_as_code(&self, text: &str) -> bool {
        !self.code_readings(text).is_empty()
    }

    /// The readings of a text as a code (by [`code_guess`]): at the length codes have now,
    /// then at each held code's (sent before a reload changed `code_length`), those that are
    /// that many digits.
    fn code_readings(&self, text: &str) -> Vec<String> {
        let length = usize::from(self.flows.verify.code_length);
        std::iter::once(length)
            .chain(self.sub.codes.iter().map(|c| c.code.len()))
            .map(|l| (l, code_guess(text, l)))
            .filter(|(l, g)| g.len() == *l && g.bytes().all(|b| b.is_ascii_digit()))
            .map(|(_, g)| g)
            .collect()
    }

    /// The latest codes, still usable.
    fn live_codes(&self) -> impl Iterator<Item = &IssuedCode> {
        let max = self.flows.verify.max_attempts;
        self.sub.codes[self.first_counted()..]
            .iter()
            .filter(move |c| c.usable(self.now, max))
    }

    /// The latest code, still usable, that a guess is.
    fn live_code(&self, guess: &str) -> Option<&IssuedCode> {
        self.live_codes().find(|c| c.is(guess))
    }

    /// Where the codes still counted start: only the latest `valid_codes` are.
    fn first_counted(&self) -> usize {
        self.sub.first_counted_code(self.flows.verify.valid_codes)
    }

    /// Whether every code the number holds (the counted ones, expired or not) was asked for
    /// by an app and sent with `verify.api_send`, which tells it to enter the code there.
    fn awaits_only_app_codes(&self) -> bool {
        let counted = &self.sub.codes[self.first_counted()..];
        !counted.is_empty() && counted.iter().all(|c| c.by_app)
    }

    /// A text from a number that awaits only an app's codes ([`Self::awaits_only_app_codes`]):
    /// no guess, so texting can neither use up the app's code (the app's check would then
    /// fail) nor try codes against it. A text that reads as a code ([`Self::reads_as_code`])
    /// gets `verify.api_code_texted`, whether it is the code or not (were only the code told
    /// so, texting would be a guess with no limit); anything else `replies.not_joined`, since
    /// the conversation by text starts with JOIN.
    fn text_while_app_code(&mut self, text: &str) {
        self.say_t(if self.reads_as_code(text) {
            &self.flows.verify.api_code_texted
        } else {
            &self.flows.replies.not_joined
        });
    }

    /// Checks a guess against the latest unexpired codes; `by_sms` answers the guess by text.
    fn check_code(&mut self, guess: &str, by_sms: bool) {
        // A code sent before a reload changed `code_length`, as it was sent: read with the
        // new length, `12341234` would be two 4-digit codes.
        let plain = crate::ascii_digits(guess);
        let plain = plain.trim();
        let length = usize::from(self.flows.verify.code_length);
        let guess = if plain.bytes().all(|b| b.is_ascii_digit()) && self.live_code(plain).is_some()
        {
            plain.to_string()
        } else {
            // Read at the length codes have now, or at a held one's (in words too: `my code
            // is 1234`): the reading that is a live code, else the first; still one guess.
            let readings = self.code_readings(guess);
            (readings.iter())
                .find(|g| self.live_code(g).is_some())
                .or(readings.first())
                .cloned()
                .unwrap_or_else(|| code_guess(guess, length))
        };
        if self.live_code(&guess).is_some() {
            // Kept for a text that repeats one (see `used_codes`): every code the number
            // holds, the one it used and any other it was sent, by text or by an app (one
            // an app validated, texted back, is no answer either). For a number already
            // verified (an app's login code) they join the ones kept from before.
            let now = self.now;
            // (Who asked for them no longer matters: they verify nothing more.)
            let held = (self.sub.codes.iter())
                .filter(|c| c.expires_at > now)
                .map(|c| IssuedCode {
                    by_app: false,
                    ..c.clone()
                });
            if matches!(self.sub.state, State::Unverified | State::AwaitingCode) {
                self.sub.used_codes = held.collect();
            } else {
                for code in held {
                    // The same digits kept from before: until the later expiry.
                    match self.sub.used_codes.iter_mut().find(|u| u.code == code.code) {
                        Some(kept) => kept.expires_at = kept.expires_at.max(code.expires_at),
                        None => self.sub.used_codes.push(code),
                    }
                }
            }
            self.verified(if by_sms { "sms" } else { "otp_api" });
            return;
        }
        let v = &self.flows.verify;
        let (now, max) = (self.now, v.max_attempts);
        let skip = self.first_counted();
        let codes = &mut self.sub.codes[skip..];
        let matches = |c: &IssuedCode| c.is(&guess);
        let usable = |c: &IssuedCode| c.usable(now, max);

        let digits = !guess.is_empty() && guess.chars().all(|c| c.is_ascii_digit());
        let (outcome, reason) = if codes.iter().any(|c| c.expires_at <= now && matches(c)) {
            (Outcome::Expired, "expired")
        } else if codes.is_empty() {
            (Outcome::WrongCode, "no code issued")
        } else if codes.iter().any(usable)
            && codes
                .iter()
                .any(|c| c.expires_at > now && !usable(c) && matches(c))
        {
            // The code it was sent, locked by wrong guesses since, while a newer one still
            // counts: pointed to the latest, with no guess counted against that one.
            (Outcome::WrongCode, "a code locked by wrong guesses")
        } else if !codes.iter().any(usable) {
            if codes.iter().any(|c| c.expires_at > now) {
                (Outcome::Locked { new_code_at: now }, "locked")
            } else {
                (Outcome::Expired, "expired")
            }
        } else if digits {
            for c in codes.iter_mut().filter(|c| usable(c)) {
                c.wrong += 1;
            }
            if codes.iter().any(usable) {
                (Outcome::WrongCode, "wrong")
            } else {
                (Outcome::Locked { new_code_at: now }, "locked")
            }
        } else {
            // No guess (`hi`, `3:30`): a text is answered, but no wrong code to count. (The
            // OTP API takes only digits; one it let through is still refused as invalid.)
            let outcome = if by_sms {
                Outcome::Done
            } else {
                Outcome::WrongCode
            };
            (outcome, "not a code")
        };
        self.outcome = match outcome {
            // A new code may be asked for once both this number's limit and everyone's
            // (`max_codes_per_hour`) allow it.
            Outcome::Locked { .. } => Outcome::Locked {
                new_code_at: (self.codes_refused_until().into_iter())
                    .chain(self.limits.codes_refused_until)
                    .max()
                    .unwrap_or(self.now)
                    .max(self.now),
            },
            other => other,
        };
        self.record(Record::CodeRejected {
            reason: reason.to_string(),
        });
        if by_sms {
            let t = match outcome {
                Outcome::Expired => &v.expired,
                Outcome::Locked { .. } => &v.locked,
                _ if reason == "not a code" => &v.not_a_code,
                _ => &v.wrong,
            };
            self.say_t(t);
        }
    }

    fn verified(&mut self, via: &str) {
        self.outcome = Outcome::Verified;
        self.sub.codes.clear();
        self.record(Record::Verified {
            via: via.to_string(),
        });
        if !matches!(self.sub.state, State::Unverified | State::AwaitingCode) {
            return; // already verified (e.g. an app re-checking a known number)
        }
        self.sub.state = State::Verified;
        let returning = self.sub.verified_at.replace(self.now).is_some();
        if via == "otp_api" && self.flows.verify.after_otp_api == AfterOtpApi::Stay {
            return;
        }
        self.welcome(returning);
        self.continue_form();
    }

    /// `verify.verified`, or `welcome_back` to a number that was verified before and has
    /// nothing left to be asked.
    fn welcome(&mut self, returning: bool) {
        let v = &self.flows.verify;
        match (&v.welcome_back, returning && !self.form_asks()) {
            (Some(back), true) => self.say_t(back),
            _ => self.say_t(&v.verified),
        }
    }

    // ---- the form ----------------------------------------------------------

    /// Asks the first field without an answer, or enrols when there is none. From the top:
    /// a field a reload added above the one being asked is asked too.
    fn continue_form(&mut self) {
        let next = self
            .flows
            .form
            .fields
            .iter()
            .enumerate()
            .find(|(_, f)| !self.sub.fields.contains_key(&f.key));
        match next {
            Some((index, _)) => self.ask_field(index, false),
            None => {
                self.sub.form = None;
                self.enrol();
            }
        }
    }

    /// Asks field `index` (with its current answer when `editing`), and notes it as asked.
    fn ask_field(&mut self, index: usize, editing: bool) {
        // A reply now answers this question, not a sequence's that ran out before it.
        self.sub.late = None;
        self.sub.form = Some(FormCursor {
            index,
            editing,
            key: self.flows.form.fields.get(index).map(|f| f.key.clone()),
        });
        let text = self.field_question(index, editing);
        self.say(text);
    }

    /// Where the asked field is in the live form: found by its key (a reload may have moved
    /// it), or by its index in a record from before keys were kept. `None`: it is gone.
    fn place_of(&self, cursor: &FormCursor) -> Option<usize> {
        let fields = &self.flows.form.fields;
        match &cursor.key {
            Some(key) => fields.iter().position(|f| &f.key == key),
            None => (cursor.index < fields.len()).then_some(cursor.index),
        }
    }

    /// Asks again the question the next text would answer (the form's, or a sequence's),
    /// if one is open and still in the flows; says whether it did.
    fn ask_open_again(&mut self) -> bool {
        match (self.sub.form.clone(), self.sub.state.clone()) {
            // A question a reload removed is left to a real answer, which moves the form
            // on: no help or hint may do that.
            (Some(cursor), _) if self.place_of(&cursor).is_none() => return false,
            (Some(cursor), _) => self.ask_again(&cursor),
            (
                None,
                State::InSequence {
                    name,
                    step,
                    waiting: true,
                },
            ) => self.ask_step_again(&name, step),
            _ => return false,
        }
        true
    }

    /// A sequence's question asked again, as it was (its timeout runs on); gone since (a
    /// reload), nothing is said.
    fn ask_step_again(&mut self, name: &str, step: usize) {
        match self.flows.question(name, step) {
            Some(q) => self.say_t(&q.text),
            None => self.outcome = Outcome::Ignored,
        }
    }

    /// A form question asked again; if a reload removed it, the form goes on as
    /// [`Self::answer_form`] does.
    fn ask_again(&mut self, cursor: &FormCursor) {
        match self.place_of(cursor) {
            Some(index) => self.ask_field(index, cursor.editing),
            None => self.question_gone(cursor.editing),
        }
    }

    /// The question asked is gone (a reload removed its field): an edit ends; a first pass
    /// asks what is still unanswered.
    fn question_gone(&mut self, editing: bool) {
        if editing {
            self.finish_form(true);
        } else {
            self.continue_form();
        }
    }

    fn field_question(&self, index: usize, editing: bool) -> String {
        self.render_joined(&self.question_parts(index, editing))
    }

    /// A form field's question, and while editing, what it holds now.
    fn question_parts(
        &self,
        index: usize,
        editing: bool,
    ) -> Vec<(&'static str, &Template, Option<&str>)> {
        let Some(field) = self.flows.form.fields.get(index) else {
            return Vec::new();
        };
        let mut parts = vec![("", &field.ask, None)];
        if editing {
            if let Some(current) = self.sub.fields.get(&field.key) {
                // A choice's answer as the number gave it: its key, which the question
                // lists, not the label the dataset keeps (one no longer offered: the label).
                let shown = match &field.expect {
                    crate::flows::Expect::Choices(c) => c
                        .iter()
                        .find(|(_, label)| label == current)
                        .map_or(current.as_str(), |(key, _)| key.as_str()),
                    _ => current.as_str(),
                };
                parts.push((" ", &self.flows.form.current, Some(shown)));
            }
        }
        parts
    }

    fn answer_form(&mut self, text: &str) {
        let Some(cursor) = self.sub.form.clone() else {
            return;
        };
        // Found by key: a field a reload moved keeps its answers coming to it.
        let Some(index) = self.place_of(&cursor) else {
            // The reply was to a question no longer in the form.
            self.question_gone(cursor.editing);
            return;
        };
        let flows = self.flows;
        let field = &flows.form.fields[index];
        // KEEP while editing keeps the current answer; with none to keep (a field added since,
        // or a first pass through the form) it is no answer either, and the question is asked
        // again. (`check` keeps it from being any form field's choice.)
        let said_keep = self.flows.keywords.keep.contains(&normalize(text));
        let keep = said_keep && cursor.editing && self.sub.fields.contains_key(&field.key);
        if !keep {
            let accepted = if said_keep {
                None
            } else {
                field.expect.accept(text)
            };
            match accepted {
                Some(value) => {
                    self.sub.fields.insert(field.key.clone(), value.clone());
                    self.record(Record::FieldSaved {
                        key: field.key.clone(),
                        value,
                    });
                }
                None => {
                    let mut parts = vec![("", &field.retry, None)];
                    let mut question = self.question_parts(index, cursor.editing);
                    if let Some(first) = question.first_mut() {
                        first.0 = "\n";
                    }
                    parts.extend(question);
                    let retry = self.render_joined(&parts);
                    self.say(retry);
                    return;
                }
            }
        }
        if cursor.editing {
            if index + 1 < self.flows.form.fields.len() {
                self.ask_field(index + 1, true);
            } else {
                self.finish_form(true);
            }
        } else {
            self.continue_form();
            // The form's last answer: when no sequence step answers it at once (none
            // follows, or its first comes later), it still gets a reply, not silence.
            if !self.says_anything() {
                self.say_t(&self.flows.form.done);
            }
        }
    }

    /// Whether this transition sends or replies anything so far.
    fn says_anything(&self) -> bool {
        (self.effects.iter()).any(|e| matches!(e, Effect::Reply(_) | Effect::Send(_)))
    }

    /// A sequence question waiting for its answer gets its whole `timeout` from now.
    fn restart_question_timeout(&mut self) {
        if let State::InSequence {
            name,
            step,
            waiting: true,
        } = self.sub.state.clone()
        {
            let timeout = self.flows.question(&name, step).and_then(|q| q.timeout);
            if let Some(t) = timeout {
                let at = quiet::step_due(&self.flows.bot, self.now, t);
                self.set_timer(at, TimerKind::AskTimeout);
            }
        }
    }

    fn finish_form(&mut self, editing: bool) {
        self.sub.form = None;
        if editing {
            self.say_t(&self.flows.form.saved);
            // An edit pass taken while a sequence's question was open: that question is
            // still what the next text answers, so it is asked again, with its whole time
            // to answer from now (the edit pass took some of it).
            self.ask_open_again();
            self.restart_question_timeout();
        } else {
            self.enrol();
        }
    }

    // ---- sequences ---------------------------------------------------------

    /// Starts the number's sequence: the one it was assigned before (a number that rejoins
    /// keeps its draw, so the dataset's assignment stands), or one picked at random by
    /// weight and recorded. A sequence since removed, or weighted 0, is drawn again.
    fn enrol(&mut self) {
        if self.flows.total_weight() == 0 {
            return; // no sequences: the number stays verified
        }
        let kept = self
            .sub
            .sequence
            .as_deref()
            .and_then(|n| self.flows.sequence(n))
            .filter(|s| s.weight > 0)
            .map(|s| s.name.clone());
        let Some(name) = kept.or_else(|| self.draw()) else {
            return;
        };
        self.sub.state = State::InSequence {
            name: name.clone(),
            step: 0,
            waiting: false,
        };
        self.schedule_step(&name, 0);
    }

    /// Picks a sequence at random by weight, and records the draw.
    fn draw(&mut self) -> Option<String> {
        let total = self.flows.total_weight();
        if total == 0 {
            return None;
        }
        let mut pick = self.rng.random_range(0..total);
        let seq = self.flows.sequences.iter().find(|s| {
            let w = u64::from(s.weight);
            if pick < w {
                true
            } else {
                pick -= w;
                false
            }
        })?;
        let name = seq.name.clone();
        self.sub.sequence = Some(name.clone());
        self.record(Record::SequenceAssigned { name: name.clone() });
        Some(name)
    }

    /// Runs step `k` and every following step already due; schedules the first one that is not.
    fn schedule_step(&mut self, name: &str, mut k: usize) {
        let flows = self.flows;
        loop {
            let Some(seq) = flows.sequence(name) else {
                self.end_sequence(name, "sequence no longer exists");
                return;
            };
            let Some(step) = seq.steps.get(k) else {
                self.clear_timer();
                self.sub.state = State::Verified;
                self.record(Record::SequenceFinished {
                    name: name.to_string(),
                });
                return;
            };
            self.sub.state = State::InSequence {
                name: name.to_string(),
                step: k,
                waiting: false,
            };
            let due = quiet::step_due(&flows.bot, self.now, step.after);
            // A reply to the user's own text is never held back; anything else is a
            // follow-up, and waits out quiet hours even when it is due at once.
            let quiet = if self.reply && step.after <= chrono::TimeDelta::zero() {
                None
            } else {
                quiet_end(&flows.bot, due)
            };
            if step.after > chrono::TimeDelta::zero() || quiet.is_some() {
                self.set_timer(quiet.unwrap_or(due), TimerKind::Step);
                return;
            }
            if !self.run_step(name, k) {
                return;
            }
            k += 1;
        }
    }

    /// Sends step `k`; true when the sequence may go straight on to the next step.
    fn run_step(&mut self, name: &str, k: usize) -> bool {
        let flows = self.flows;
        let Some(step) = flows.sequence(name).and_then(|s| s.steps.get(k)) else {
            return true;
        };
        self.record(Record::StepSent {
            sequence: name.to_string(),
            step: k,
        });
        match &step.action {
            StepAction::Say(t) => {
                self.say_t(t);
                true
            }
            StepAction::Ask(q) => {
                self.say_t(&q.text);
                // A reply now answers this question, not one that ran out before it.
                self.sub.late = None;
                // The question is now the last thing asked: an unfinished edit pass ends
                // (what it saved stays), or the reply would go to the old edit prompt.
                if self.sub.form.as_ref().is_some_and(|c| c.editing) {
                    self.sub.form = None;
                }
                self.sub.state = State::InSequence {
                    name: name.to_string(),
                    step: k,
                    waiting: true,
                };
                match q.timeout {
                    Some(t) => {
                        let at = quiet::step_due(&self.flows.bot, self.now, t);
                        self.set_timer(at, TimerKind::AskTimeout)
                    }
                    None => self.clear_timer(),
                }
                false
            }
        }
    }

    fn answer_question(&mut self, name: &str, k: usize, text: &str) {
        let Some(q) = self.flows.question(name, k) else {
            // The flows changed under a number mid-question: end the sequence, and answer
            // the text as a verified number's (never with silence).
            self.end_if_gone();
            self.say_t(&self.flows.replies.unknown);
            return;
        };
        let Some(value) = q.expect.accept(text) else {
            let retry = self.render_joined(&[("", &q.retry, None), ("\n", &q.text, None)]);
            self.say(retry);
            return;
        };
        if let Some(key) = &q.save {
            self.sub.fields.insert(key.clone(), value.clone());
            self.record(Record::FieldSaved {
                key: key.clone(),
                value,
            });
        }
        self.record(Record::Answered {
            sequence: name.to_string(),
            step: k,
        });
        if let Some(thanks) = &q.thanks {
            self.say_t(thanks);
        }
        self.clear_timer();
        self.schedule_step(name, k + 1);
        // No thanks, and the next step comes later (or there is none): still a reply.
        if !self.says_anything() {
            self.say_t(&self.flows.replies.answered);
        }
    }

    /// Takes a text as the late answer to the question that last ran out (see
    /// [`LateQuestion`]), if one is still taken, is still in the flows, and accepts the text:
    /// saved as a timely answer is, and acknowledged with the question's `thanks`, or
    /// `replies.late_answer` (the sequence has moved on, so no step follows it). Says
    /// whether it did.
    fn answer_late(&mut self, text: &str) -> bool {
        let flows = self.flows;
        let Some((late, q)) = late_question(&self.sub, flows, self.now) else {
            return false;
        };
        let late = late.clone();
        let Some(value) = q.expect.accept(text) else {
            return false;
        };
        self.sub.late = None;
        self.sub.fields.insert(late.field.clone(), value.clone());
        self.record(Record::FieldSaved {
            key: late.field,
            value,
        });
        self.record(Record::Answered {
            sequence: late.sequence,
            step: late.step,
        });
        self.say_t(q.thanks.as_ref().unwrap_or(&flows.replies.late_answer));
        true
    }

    /// The question that ran out stays the last thing asked until step `next` is sent: when
    /// quiet hours hold that step past the end of the late window it would have come
    /// within, the window lasts until the step is due, and then its whole length again. (The
    /// question itself may have reached the number only as quiet hours ended, together with
    /// that step: the outbox holds a follow-up it reaches in them.)
    fn hold_late_window_for_quiet_hours(&mut self, name: &str, next: usize) {
        let due = (self.flows.sequence(name))
            .and_then(|s| s.steps.get(next))
            .map(|s| quiet::step_due(&self.flows.bot, self.now, s.after));
        let held = match (&self.sub.state, self.sub.timer) {
            (State::InSequence { step, .. }, Some(t))
                if *step == next && t.kind == TimerKind::Step =>
            {
                Some(t.at)
            }
            _ => None,
        };
        if let (Some(late), Some(due), Some(held)) = (self.sub.late.as_mut(), due, held) {
            // (Timers are kept to the millisecond, rounded up: a step due right as the window
            // ends is not held past it by that rounding.)
            if due <= late.until && held > ceil_millis(late.until) {
                let length = late.until - self.now;
                late.until = held.checked_add_signed(length).unwrap_or(held);
            }
        }
    }

    fn end_sequence(&mut self, name: &str, reason: &str) {
        self.clear_timer();
        self.sub.state = State::Verified;
        self.record(Record::SequenceEnded {
            name: name.to_string(),
            reason: reason.to_string(),
        });
    }

    // ---- timers ------------------------------------------------------------

    fn set_timer(&mut self, at: DateTime<Utc>, kind: TimerKind) {
        // Timers are stored with millisecond keys: round up so the stored key and the
        // subscriber's copy are the same value and still lie after `now`.
        let at = ceil_millis(at);
        self.clear_timer();
        // (Saturating: a damaged record's epoch must not panic the step.)
        self.sub.epoch = self.sub.epoch.saturating_add(1);
        let timer = Timer {
            at,
            kind,
            epoch: self.sub.epoch,
        };
        self.sub.timer = Some(timer);
        self.effects.push(Effect::Schedule(timer));
    }

    fn clear_timer(&mut self) {
        if let Some(old) = self.sub.timer.take() {
            self.effects.push(Effect::Cancel(old));
        }
    }

    fn timer_due(&mut self, t: Timer) {
        if self.sub.timer != Some(t) {
            self.outcome = Outcome::Ignored; // replaced or cancelled since it was set
            return;
        }
        self.sub.timer = None;
        let State::InSequence {
            name,
            step,
            waiting,
        } = self.sub.state.clone()
        else {
            self.outcome = Outcome::Ignored;
            return;
        };
        if self.end_if_gone() {
            return;
        }
        let flows = self.flows;
        match t.kind {
            TimerKind::Step if !waiting => {
                // Flows may have changed since the timer was set: check quiet hours again.
                if let Some(later) = quiet_end(&flows.bot, self.now) {
                    self.record(Record::Deferred { until: later });
                    self.set_timer(later, TimerKind::Step);
                    return;
                }
                if self.run_step(&name, step) {
                    self.schedule_step(&name, step + 1);
                }
            }
            TimerKind::AskTimeout if waiting => {
                self.record(Record::AnswerTimedOut {
                    sequence: name.clone(),
                    step,
                });
                // Not while a form question is open (an EDIT pass that outlasted this one):
                // that is the last thing asked, which replies answer.
                let question = flows
                    .question(&name, step)
                    .filter(|_| self.sub.form.is_none());
                self.sub.late =
                    question
                        .and_then(late_window)
                        .map(|(field, timeout)| LateQuestion {
                            sequence: name.clone(),
                            step,
                            field: field.clone(),
                            until: quiet::step_due(&flows.bot, self.now, timeout),
                        });
                self.schedule_step(&name, step + 1);
                self.hold_late_window_for_quiet_hours(&name, step + 1);
            }
            _ => self.outcome = Outcome::Ignored,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{asks_to_stop, fit, normalize, shortened, Record, MAX_BODY};

    #[test]
    fn a_retention_may_forget_only_a_number_that_never_got_anywhere_and_went_silent() {
        use super::{FormCursor, IssuedCode, State, Subscriber};
        use chrono::{Duration, TimeZone, Utc};
        let t0 = Utc.with_ymd_and_hms(2026, 1, 1, 12, 0, 0).unwrap();
        let before = t0 + Duration::days(30);
        let phone = crate::phone::Phone::parse("+15550000001").unwrap();
        let silent = Subscriber::new(phone, t0);
        let code = |at| IssuedCode {
            code: "123456".into(),
            issued_at: at,
            expires_at: at + Duration::minutes(10),
            wrong: 0,
            by_app: false,
        };
        let with = |f: &dyn Fn(&mut Subscriber)| {
            let mut s = silent.clone();
            f(&mut s);
            s
        };
        let cases: Vec<(&str, Subscriber, bool)> = vec![
            ("silent since it was made", silent.clone(), true),
            (
                "sent a code long ago",
                with(&|s| {
                    s.state = State::AwaitingCode;
                    s.codes.push(code(t0));
                    s.code_sends.push(t0);
                }),
                true,
            ),
            (
                "made since",
                Subscriber::new(silent.phone.clone(), before),
                false,
            ),
            (
                "texted since",
                with(&|s| s.last_inbound_at = Some(before)),
                false,
            ),
            (
                "sent a code since",
                with(&|s| {
                    s.state = State::AwaitingCode;
                    s.codes.push(code(before + Duration::seconds(1)));
                }),
                false,
            ),
            (
                "holds a code sent before that is valid still",
                with(&|s| {
                    s.state = State::AwaitingCode;
                    let mut long_lived = code(before - Duration::hours(2));
                    long_lived.expires_at = before + Duration::hours(1);
                    s.codes.push(long_lived);
                }),
                false,
            ),
            (
                "a send counted since",
                with(&|s| s.code_sends.push(before)),
                false,
            ),
            ("opted out", with(&|s| s.state = State::OptedOut), false),
            ("verified once", with(&|s| s.verified_at = Some(t0)), false),
            (
                "answered",
                with(&|s| {
                    s.fields.insert("name".into(), "Ann".into());
                }),
                false,
            ),
            (
                "given a sequence",
                with(&|s| s.sequence = Some("main".into())),
                false,
            ),
            (
                "a timer pending",
                with(&|s| {
                    s.timer = Some(super::Timer {
                        at: before,
                        kind: super::TimerKind::Step,
                        epoch: 1,
                    })
                }),
                false,
            ),
            (
                "asked a question",
                with(&|s| {
                    s.form = Some(FormCursor {
                        index: 0,
                        editing: false,
                        key: None,
                    })
                }),
                false,
            ),
        ];
        for (what, sub, forgettable) in cases {
            assert_eq!(sub.forgettable(before), forgettable, "{what}");
        }
    }

    #[test]
    fn a_text_past_twilios_limit_is_cut_on_a_whole_character_and_ends_in_an_ellipsis() {
        let short = "é🙂".repeat(10);
        assert_eq!(fit(short.clone()), short);
        // 1 + three UTF-16 units a pair: the emoji that would fill the last unit but one is
        // not split, and that unit stays empty.
        let cut = fit(format!("x{}", "é🙂".repeat(600)));
        assert_eq!(cut.encode_utf16().count(), MAX_BODY - 1);
        assert!(cut.ends_with("🙂é…"));
        assert_eq!(shortened("Annabelle", 4), "Anna…");
        assert_eq!(shortened("Ann", 4), "Ann");
        // Counted as Twilio counts: an emoji is two units, and is not split.
        assert_eq!(shortened("🙂🙂🙂", 4), "🙂🙂…");
        assert_eq!(shortened("a🙂🙂", 4), "a🙂…");
    }

    #[test]
    fn full_width_letters_read_as_the_keyword_they_show() {
        assert_eq!(normalize("ＳＴＯＰ"), "STOP");
        assert_eq!(normalize("ｓｔｏｐ！"), "STOP");
        assert!(asks_to_stop("ｓｔｏｐ please"));
        assert_eq!(normalize("Stop."), "STOP");
    }

    #[test]
    fn a_record_is_named_as_the_history_stores_it_and_every_name_is_listed() {
        let at = "2026-01-05T15:00:00Z".parse().unwrap();
        let (s, n) = (String::new, 0);
        let every = [
            Record::OptedIn { via: s() },
            Record::CodeSent,
            Record::CodeWithdrawn,
            Record::CodeRateLimited,
            Record::CodeRejected { reason: s() },
            Record::Verified { via: s() },
            Record::FieldSaved {
                key: s(),
                value: s(),
            },
            Record::SequenceAssigned { name: s() },
            Record::StepSent {
                sequence: s(),
                step: n,
            },
            Record::Answered {
                sequence: s(),
                step: n,
            },
            Record::AnswerTimedOut {
                sequence: s(),
                step: n,
            },
            Record::SequenceFinished { name: s() },
            Record::SequenceEnded {
                name: s(),
                reason: s(),
            },
            Record::Deferred { until: at },
            Record::OptedOut { reason: s() },
        ];
        let names: Vec<&str> = every.iter().map(Record::name).collect();
        assert_eq!(names, Record::NAMES);
        for record in every {
            let stored = match serde_json::to_value(&record).unwrap() {
                serde_json::Value::String(name) => name,
                serde_json::Value::Object(tagged) => tagged.keys().next().unwrap().clone(),
                other => panic!("{other}"),
            };
            assert_eq!(record.name(), stored);
        }
    }
}
