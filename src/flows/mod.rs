//! The validated flow set: what `flows/*.toml` declare, checked once, then trusted by the engine.

mod load;
mod template;

use std::collections::BTreeMap;

use chrono::{NaiveTime, TimeDelta};
use chrono_tz::Tz;
use regex::Regex;

pub use load::{load_dir, load_sources, read_dir, Problem, Problems};
pub use template::{Allowed, Template};

/// A complete, valid set of flows. Built only by [`load_dir`] / [`load_sources`].
#[derive(Clone, Debug)]
pub struct Flows {
    pub bot: Bot,
    pub keywords: Keywords,
    pub verify: Verify,
    pub form: Form,
    pub sequences: Vec<Sequence>,
    pub replies: Replies,
    pub ivr: Ivr,
    /// The files the set was loaded from, (path, text) in name order: hot reload compares
    /// what it reads later with them.
    sources: Vec<(std::path::PathBuf, String)>,
    /// What passes but is seldom meant, in reading order (see [`Flows::warnings`]).
    warnings: Vec<Problem>,
}

#[derive(Clone, Debug)]
pub struct Bot {
    pub name: String,
    pub timezone: Tz,
    pub quiet_hours: Option<QuietHours>,
}

/// Local hours in which follow-ups wait; `from` may be later than `to` (over midnight).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QuietHours {
    pub from: NaiveTime,
    pub to: NaiveTime,
}

/// Keyword lists, already normalized (upper case, letters and digits only).
#[derive(Clone, Debug)]
pub struct Keywords {
    pub opt_in: Vec<String>,
    pub opt_out: Vec<String>,
    pub help: Vec<String>,
    pub edit: Vec<String>,
    pub keep: Vec<String>,
}

/// What a validated phone does after `validate_otp` succeeds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AfterOtpApi {
    /// Stay `verified` and send nothing.
    Stay,
    /// Continue into the form and sequences by SMS, as after a texted code.
    Form,
}

#[derive(Clone, Debug)]
pub struct Verify {
    pub code_length: u8,
    pub ttl: TimeDelta,
    pub valid_codes: u8,
    pub max_attempts: u8,
    pub max_sends: u32,
    pub send_window: TimeDelta,
    /// Codes issued to all numbers together in any hour, at most (texts, calls, the OTP
    /// API); `None`: no such limit.
    pub max_codes_per_hour: Option<u32>,
    pub after_otp_api: AfterOtpApi,
    pub send: Template,
    /// The text of a code the OTP API sends (an app's code, which the app checks: its text
    /// need not ask for a reply); `None`: `send`.
    pub api_send: Option<Template>,
    /// With `api_send` set, to a number that texts back a code an app asked for: the app
    /// checks it, so the text neither verifies the number nor counts as a guess.
    pub api_code_texted: Template,
    pub wrong: Template,
    /// To a text, while a code is awaited, that is no code at all ("hi", "3:30"): no guess
    /// is counted, and the text says what is awaited.
    pub not_a_code: Template,
    pub expired: Template,
    pub locked: Template,
    pub rate_limited: Template,
    /// To a texter asking for a code while `max_codes_per_hour` is spent (everyone's limit).
    pub busy: Template,
    pub verified: Template,
    /// Sent instead of `verified` to a number verified before (it rejoined) when the form
    /// has nothing left to ask it; `None`: `verified` is sent.
    pub welcome_back: Option<Template>,
    pub voice: Template,
}

impl Verify {
    /// A code as the OTP API takes it: exactly `code_length` digits, or as many as one of
    /// `held` (the lengths of the codes the number holds: sent before a reload changed
    /// `code_length`), spaces around it ignored (a copy-paste accident, not a different code).
    /// `None`: not a code at all, which is refused without counting as a wrong guess.
    pub fn api_code(&self, text: &str, held: &[usize]) -> Option<String> {
        let digits = crate::ascii_digits(text);
        let t = digits.trim();
        let length = t.len() == usize::from(self.code_length) || held.contains(&t.len());
        (length && t.bytes().all(|b| b.is_ascii_digit())).then(|| t.to_string())
    }
}

#[derive(Clone, Debug)]
pub struct Form {
    pub fields: Vec<Field>,
    /// Fields that no form question asks but a sequence question may `save` into.
    pub extra_fields: Vec<String>,
    /// Appended to a question when EDIT re-asks it; `{current}` is the saved answer.
    pub current: Template,
    /// Sent when an EDIT pass is complete.
    pub saved: Template,
    /// To the form's last answer on the first pass when nothing else answers it (no
    /// sequence follows, or its first step comes later).
    pub done: Template,
}

impl Form {
    /// Every field key a subscriber may hold, form fields first.
    pub fn all_keys(&self) -> impl Iterator<Item = &str> {
        self.fields
            .iter()
            .map(|f| f.key.as_str())
            .chain(self.extra_fields.iter().map(String::as_str))
    }
}

#[derive(Clone, Debug)]
pub struct Field {
    pub key: String,
    pub ask: Template,
    pub expect: Expect,
    pub retry: Template,
}

/// What answer a question accepts.
#[derive(Clone, Debug)]
pub enum Expect {
    Any,
    /// (reply key as typed, e.g. `A`; stored label, e.g. `under_30`), in declared order.
    Choices(Vec<(String, String)>),
    Range(i64, i64),
    Pattern(Regex),
}

/// A choice named first among other words ("bike please", "the bike!", "social media, I
/// think"): the reply starts (after an article: a, an, the, my) with the words of one label.
/// Anywhere else in a reply a label is as often negated or asked about ("not over 50", "what
/// other options?"), and a question is no answer at all. (Not a key either: a one-letter
/// key among words is as often an article or a pronoun.)
fn choice_in_words(choices: &[(String, String)], answer: &str) -> Option<String> {
    if answer.contains(['?', '？']) {
        return None;
    }
    let said = words_of(answer);
    let labels: Vec<(&String, Vec<String>)> = choices
        .iter()
        .map(|(_, label)| (label, words_of(label)))
        .filter(|(_, words)| !words.is_empty())
        .collect();
    // The reply as written, or after its article ("the news" may be a label itself).
    let article = said
        .first()
        .is_some_and(|w| ["a", "an", "the", "my"].contains(&w.as_str()));
    let starts = [Some(&said[..]), article.then(|| &said[1..])];
    // Each label a start begins with, and whether another is named after it ("bike, no
    // wait, laptop"): one label and no other, or no choice.
    let mut found: Vec<(&String, &[String], bool)> = Vec::new();
    for start in starts.into_iter().flatten() {
        for (label, words) in &labels {
            if let Some(rest) = start.strip_prefix(words.as_slice()) {
                let other = labels.iter().any(|(_, w)| {
                    rest.windows(w.len()).any(|r| r == w.as_slice())
                        // A longer label this one starts, one of whose further words that
                        // says something follows ("email & text", "email and also text"
                        // beside `email_and_text`; not "pickup at 5pm" beside
                        // `pickup_at_the_store`): no telling which.
                        || (w.len() > words.len() && w.starts_with(words))
                            && (w[words.len()..].iter())
                                .any(|x| !FILLER.contains(&x.as_str()) && rest.contains(x))
                });
                found.push((label, words, other));
            }
        }
    }
    // A label that starts another found ("email" in "email and text please"): the longer
    // one is what was written.
    let longer = |words: &[String]| {
        (found.iter()).any(|(_, w, _)| w.len() > words.len() && w.starts_with(words))
    };
    let found: Vec<(&String, bool)> = (found.iter())
        .filter(|(_, words, _)| !longer(words))
        .map(|(label, _, other)| (*label, *other))
        .collect();
    match found.as_slice() {
        [(label, false)] => Some((*label).clone()),
        _ => None,
    }
}

/// Words that join a label's parts ("email and text", "pickup at the store"), and say
/// nothing of which is meant.
const FILLER: [&str; 17] = [
    "and", "or", "n", "plus", "a", "an", "the", "my", "at", "in", "on", "of", "to", "for", "by",
    "with", "via",
];

/// A text's words, lowercase ("under_30" and "under 30" are the same two).
fn words_of(s: &str) -> Vec<String> {
    s.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect()
}

/// The choice a reply marks by its key, as the question shows options ("B) social media",
/// "A. under 30", "C:"): `Some(None)` when what follows the key names another choice's label
/// ("A) bike" where B is the bike, "B: no wait, laptop"), which is no answer. (What follows
/// may be anything else: the question may show an option in other words than its label.)
fn marked_choice(choices: &[(String, String)], answer: &str) -> Option<Option<String>> {
    let (first, rest) = answer
        .split_once(char::is_whitespace)
        .unwrap_or((answer, ""));
    let marked = crate::machine::normalize(first.strip_suffix([')', '.', ':'])?);
    let (_, label) = choices
        .iter()
        .find(|(key, _)| crate::machine::normalize(key) == marked)?;
    let rest = words_of(rest);
    // Its own label may hold another's words ("email and text" beside "email"): those are no
    // other choice named.
    let own = words_of(label);
    let mut in_own = vec![false; rest.len()];
    if !own.is_empty() {
        for (at, _) in (rest.windows(own.len()).enumerate()).filter(|(_, w)| *w == own) {
            in_own[at..at + own.len()].fill(true);
        }
    }
    let names_another = choices.iter().any(|(_, other)| {
        let words = words_of(other);
        other != label
            && !words.is_empty()
            && (rest.windows(words.len()).enumerate())
                .any(|(at, w)| w == words && !in_own[at..at + words.len()].iter().all(|&c| c))
    });
    Some((!names_another).then(|| label.clone()))
}

/// Whether `rest` (the words after an answer) is only courtesy: "please", "thanks", "thank
/// you" and their short forms. Nothing else can be meant by "A please" or "4 thanks".
fn only_courtesy(rest: &str) -> bool {
    let words: Vec<String> = rest
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect();
    let mut words = words.iter().map(String::as_str).peekable();
    let mut any = false;
    while let Some(w) = words.next() {
        match w {
            "please" | "pls" | "plz" | "thanks" | "thx" | "ty" | "cheers" => {}
            "thank" if words.next_if_eq(&"you").is_some() => {}
            _ => return false,
        }
        any = true;
    }
    any
}

/// A choice's key followed only by courtesy ("A please", "b, thanks!"): that choice. (A key
/// followed by anything else is as often an article or a pronoun: "a friend told me".)
fn key_then_courtesy(choices: &[(String, String)], answer: &str) -> Option<String> {
    if answer.contains(['?', '？']) {
        return None;
    }
    let answer = answer.trim_start();
    let end = answer
        .find(|c: char| !c.is_alphanumeric())
        .unwrap_or(answer.len());
    let (first, rest) = answer.split_at(end);
    if first.is_empty() || !only_courtesy(rest) {
        return None;
    }
    let first = crate::machine::normalize(first);
    choices
        .iter()
        .find(|(key, _)| crate::machine::normalize(key) == first)
        .map(|(_, label)| label.clone())
}

/// A whole number a reply starts with, when what follows says it is the answer: nothing,
/// punctuation, or this question's own scale ("4/5", "4 out of 5" when 5 is the top), and
/// no other number ("4, thanks", "4 please", "5 - great tips!"; not "1 sec", "3/10", "4, 5", "7:30",
/// "1, no wait, 4", "4.5").
fn number_in_words(answer: &str, top: i64) -> Option<i64> {
    let answer = answer.trim();
    // A minus sign before the digits ("-3 please" on a scale from -5).
    let (negative, answer) = match answer.strip_prefix('-') {
        Some(digits) if digits.starts_with(|c: char| c.is_ascii_digit()) => (true, digits),
        _ => (false, answer),
    };
    let digits = answer.len()
        - answer
            .trim_start_matches(|c: char| c.is_ascii_digit())
            .len();
    let (number, rest) = answer.split_at(digits);
    if number.is_empty() {
        return None;
    }
    let rest = rest.trim_start().to_lowercase();
    let after = if let Some(scale) = rest.strip_prefix('/').or(rest.strip_prefix("out of ")) {
        let scale = scale.trim_start();
        let of = scale.len() - scale.trim_start_matches(|c: char| c.is_ascii_digit()).len();
        if scale[..of].parse::<i64>().ok() != Some(top) {
            return None;
        }
        &scale[of..]
    } else if rest.is_empty()
        || rest == "."
        || rest.starts_with(['-', '–', '—', ',', '!', ':', ')'])
    {
        rest.as_str()
    } else if only_courtesy(&rest) {
        ""
    } else {
        return None;
    };
    if after.chars().any(|c| c.is_ascii_digit()) {
        return None;
    }
    let n: i64 = number.parse().ok()?;
    Some(if negative { -n } else { n })
}

/// What is written for a minus besides `-`: the minus sign, hyphens and dashes (up to the en
/// dash), and the small and full-width hyphen-minus.
const MINUS_LOOKALIKES: [char; 7] = [
    '\u{2212}', '\u{2010}', '\u{2011}', '\u{2012}', '\u{2013}', '\u{FE63}', '\u{FF0D}',
];

impl Expect {
    /// The value to store for `answer`, or `None` when the answer does not fit.
    pub fn accept(&self, answer: &str) -> Option<String> {
        let answer = answer.trim();
        if answer.is_empty() {
            return None;
        }
        match self {
            Expect::Any => Some(answer.to_string()),
            Expect::Choices(choices) => {
                // A key or label typed as written (case aside) is that choice: "18+" is the
                // label "18+", not the key "18", and "👎" is not "👍".
                let lower = answer.to_lowercase();
                if let Some((_, label)) = choices.iter().find(|(key, label)| {
                    key.to_lowercase() == lower || label.to_lowercase() == lower
                }) {
                    return Some(label.clone());
                }
                let said = crate::machine::normalize(answer);
                // Nothing left once punctuation is dropped ("???", an emoji): no choice.
                if said.is_empty() {
                    return None;
                }
                // The option copied as the question shows it ("B) social media", "A. under
                // 30"): a key marked off by ) . or : counts as that key, unless another
                // choice is named after it.
                if let Some(marked) = marked_choice(choices, answer) {
                    return marked;
                }
                choices
                    .iter()
                    .find(|(key, label)| {
                        said == crate::machine::normalize(key)
                            || said == crate::machine::normalize(label)
                    })
                    .map(|(_, label)| label.clone())
                    .or_else(|| key_then_courtesy(choices, answer))
                    .or_else(|| choice_in_words(choices, answer))
            }
            Expect::Range(lo, hi) => {
                let mut answer = crate::ascii_digits(answer);
                // A minus as keyboards and word processors also write it: the minus sign
                // (U+2212), a dash or hyphen, full-width or small.
                if let Some(rest) = answer.strip_prefix(MINUS_LOOKALIKES) {
                    answer = format!("-{rest}").into();
                }
                let n = match answer.trim_end_matches(['.', '!']).parse::<i64>() {
                    Ok(n) => n,
                    Err(_) => number_in_words(&answer, *hi)?,
                };
                (*lo..=*hi).contains(&n).then(|| n.to_string())
            }
            Expect::Pattern(re) => re.is_match(answer).then(|| answer.to_string()),
        }
    }

    /// Category labels when this is a choice question.
    pub fn categories(&self) -> Option<Vec<&str>> {
        match self {
            Expect::Choices(c) => Some(c.iter().map(|(_, l)| l.as_str()).collect()),
            _ => None,
        }
    }
}

#[derive(Clone, Debug)]
pub struct Sequence {
    pub name: String,
    pub weight: u32,
    pub steps: Vec<Step>,
}

#[derive(Clone, Debug)]
pub struct Step {
    /// Delay after the previous step (or after enrolment, for the first step).
    pub after: TimeDelta,
    pub action: StepAction,
}

#[derive(Clone, Debug)]
pub enum StepAction {
    Say(Template),
    Ask(Question),
}

#[derive(Clone, Debug)]
pub struct Question {
    pub text: Template,
    pub save: Option<String>,
    pub expect: Expect,
    pub retry: Template,
    /// Move on unanswered after this long; `None` waits for an answer.
    pub timeout: Option<TimeDelta>,
    /// The reply to an answer it takes (in time or late), before any step due at once.
    pub thanks: Option<Template>,
}

#[derive(Clone, Debug)]
pub struct Replies {
    pub help: Template,
    pub opted_out: Template,
    pub unknown: Template,
    pub not_joined: Template,
    pub already_joined: Template,
    /// To a text that asks to stop in words ("please stop"), which no opt-out keyword is.
    pub stop_hint: Template,
    /// To an answer that came after its question's `timeout`, and was saved.
    pub late_answer: Template,
    /// To an answer taken in time from a question with no `thanks`, when no step is sent at
    /// once after it (so it is not met with silence).
    pub answered: Template,
}

#[derive(Clone, Debug)]
pub struct Ivr {
    pub start: String,
    pub retries: u8,
    pub reprompt: Template,
    pub goodbye: Template,
    /// Spoken by `read_code`; `{code}` is read digit by digit.
    pub read_code: Template,
    /// Spoken after `opt_in` texted the caller a code.
    pub texted: Template,
    /// Spoken to a caller the menu opted out, or who calls opted out (`replies.opted_out`
    /// is an SMS, which may tell them to reply).
    pub opted_out: Template,
    /// Spoken after `opt_in` to a caller whose number is already verified
    /// (`replies.already_joined` is an SMS, which may tell them to reply).
    pub already_joined: Template,
    /// Spoken to a caller whose number is withheld (nothing can be done for them by number).
    pub hidden_caller: Template,
    /// Which callers `read_code` reads a code to; the others are texted it.
    pub read_code_callers: ReadCodeCallers,
    pub menus: BTreeMap<String, Menu>,
}

/// Whom `read_code` trusts with a code spoken on the call. Caller ID can be spoofed: whoever
/// hears a number's code can verify it (by the OTP API, or by SMS if they can send as it).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ReadCodeCallers {
    /// Every caller with a number.
    #[default]
    Any,
    /// Only calls whose caller ID the carrier fully attested (STIR/SHAKEN level A, which
    /// Twilio reports as `StirVerstat=TN-Validation-Passed-A`); other callers are texted the
    /// code instead, so only the number's owner gets it.
    Attested,
}

impl Ivr {
    /// Whether `read_code` speaks the code on a call (else it texts it), by whether the
    /// call's caller ID was attested.
    pub fn reads_code_to(&self, attested: bool) -> bool {
        self.read_code_callers == ReadCodeCallers::Any || attested
    }
}

#[derive(Clone, Debug)]
pub struct Menu {
    pub say: Template,
    /// Digit → action.
    pub press: BTreeMap<String, IvrAction>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IvrAction {
    ReadCode,
    OptIn,
    OptOut,
    Menu(String),
    /// Speak this, then hang up (a template, parsed once when the flows load).
    Say(Template),
    Hangup,
}

impl IvrAction {
    pub fn parse(s: &str) -> Result<IvrAction, String> {
        let s = s.trim();
        Ok(match s {
            "read_code" => IvrAction::ReadCode,
            "opt_in" => IvrAction::OptIn,
            "opt_out" => IvrAction::OptOut,
            "hangup" => IvrAction::Hangup,
            _ => {
                if let Some(name) = s.strip_prefix("menu:") {
                    IvrAction::Menu(name.trim().to_string())
                } else if let Some(text) = s.strip_prefix("say:") {
                    let text = text.trim();
                    if text.is_empty() {
                        return Err("`say:` needs a text".into());
                    }
                    IvrAction::Say(Template::parse(text).map_err(|e| format!("`say:` {e}"))?)
                } else {
                    return Err(format!(
                        "unknown action {s:?} (expected read_code, opt_in, opt_out, hangup, menu:NAME or say:TEXT)"
                    ));
                }
            }
        })
    }
}

impl Flows {
    /// What `check` passes but warns of, each `warning: …` located as a problem is: a text
    /// that may be sent before a field it names has an answer (it then shows as nothing), a
    /// choice label that starts with a keyword.
    pub fn warnings(&self) -> &[Problem] {
        &self.warnings
    }

    /// The files the set was loaded from, (path, text) in name order.
    pub fn sources(&self) -> &[(std::path::PathBuf, String)] {
        &self.sources
    }

    /// Renders a text that may only refer to `{bot.name}` (voice prompts, API texts).
    pub fn render_plain(&self, t: &Template) -> String {
        t.render(|n| crate::machine::placeholder(self, None, n))
    }

    pub fn sequence(&self, name: &str) -> Option<&Sequence> {
        self.sequences.iter().find(|s| s.name == name)
    }

    /// The question at 0-based `step` of sequence `name`, if that step is one.
    pub fn question(&self, name: &str, step: usize) -> Option<&Question> {
        match &self.sequence(name)?.steps.get(step)?.action {
            StepAction::Ask(q) => Some(q),
            StepAction::Say(_) => None,
        }
    }

    /// Total weight of all sequences; the loader guarantees it is non-zero when any exist.
    pub fn total_weight(&self) -> u64 {
        self.sequences.iter().map(|s| u64::from(s.weight)).sum()
    }

    /// A one-line summary, as `smsflow check` prints on success.
    /// The places a number can hold in a sequence: each sequence's name with one letter per
    /// step (`a` a question, `s` a message). Kept in the store, so a start can tell whether
    /// flows edited while the daemon was stopped removed any.
    pub fn places(&self) -> Vec<(String, String)> {
        self.sequences
            .iter()
            .map(|s| {
                let kinds = s
                    .steps
                    .iter()
                    .map(|st| match st.action {
                        StepAction::Ask(_) => 'a',
                        StepAction::Say(_) => 's',
                    })
                    .collect();
                (s.name.clone(), kinds)
            })
            .collect()
    }

    /// Whether these flows lack a place `old` (from [`Flows::places`]) had: a sequence, a
    /// step, or a question (a step that was a question and is not one now).
    pub fn removed_places_of(&self, old: &[(String, String)]) -> bool {
        old.iter().any(|(name, kinds)| match self.sequence(name) {
            None => true,
            Some(now) => {
                now.steps.len() < kinds.len()
                    || kinds
                        .chars()
                        .zip(&now.steps)
                        .any(|(was, step)| was == 'a' && !matches!(step.action, StepAction::Ask(_)))
            }
        })
    }

    pub fn summary(&self) -> String {
        let steps: usize = self.sequences.iter().map(|s| s.steps.len()).sum();
        format!(
            "{}: {} form field(s), {} sequence(s) with {} step(s), {} voice menu(s)",
            self.bot.name,
            self.form.fields.len(),
            self.sequences.len(),
            steps,
            self.ivr.menus.len()
        )
    }
}
