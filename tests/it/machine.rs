//! The pure state machine: table-driven rules and property tests over random event sequences.

use chrono::{DateTime, TimeDelta, Utc};
use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::SeedableRng;
use smsflow::flows::Flows;
use smsflow::machine::{step, Effect, Event, IssuedCode, Outcome, State, Subscriber};
use smsflow::phone::Phone;
use smsflow::store::codec;

fn flows() -> Flows {
    smsflow::flows::load_dir("flows".as_ref()).expect("shipped flows load")
}

fn t0() -> DateTime<Utc> {
    "2026-01-05T15:00:00Z".parse().unwrap()
}

fn subscriber(state: State) -> Subscriber {
    let mut s = Subscriber::new(Phone::parse("+15550001111").unwrap(), t0());
    s.state = state;
    s
}

fn messages(effects: &[Effect]) -> Vec<String> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Reply(t) | Effect::Send(t) | Effect::SendCode { text: t, .. } => {
                Some(t.clone())
            }
            _ => None,
        })
        .collect()
}

fn seq_state() -> State {
    State::InSequence {
        name: "daily".into(),
        step: 1,
        waiting: false,
    }
}

/// One row: a number in `state` texts `text`; it ends in `after` and the first message starts
/// with `reply`, or, when `reply` is empty, nothing is sent at all.
fn check(state: State, text: &str, after: &str, reply: &str) {
    let f = flows();
    let t = step(
        subscriber(state.clone()),
        &Event::Inbound(text.into()),
        &f,
        t0(),
        &mut StdRng::seed_from_u64(1),
    );
    assert_eq!(t.subscriber.state.name(), after, "{state:?} + {text:?}");
    let msgs = messages(&t.effects);
    match msgs.first() {
        Some(m) => assert!(
            !reply.is_empty() && m.starts_with(reply),
            "{state:?} + {text:?}: got {m:?}, want {reply:?}"
        ),
        None => assert!(
            reply.is_empty(),
            "{state:?} + {text:?}: nothing sent, want {reply:?}"
        ),
    }
}

#[test]
fn keywords_work_in_every_state_as_the_rules_say() {
    let unsubscribed = "You're unsubscribed";
    let help = "Acme Contest: reply JOIN to enter, PROFILE";
    let code = "Acme Contest: your code is";
    let rows: Vec<(State, &str, &str, &str)> = vec![
        (State::Unverified, "STOP", "opted_out", unsubscribed),
        (State::AwaitingCode, " stop. ", "opted_out", unsubscribed),
        (State::Verified, "Unsubscribe!", "opted_out", unsubscribed),
        (State::Verified, "Stop all", "opted_out", unsubscribed),
        (seq_state(), "opt out", "opted_out", unsubscribed),
        (seq_state(), "quit", "opted_out", unsubscribed),
        (State::OptedOut, "STOP", "opted_out", ""),
        (State::Unverified, "help", "unverified", help),
        (State::AwaitingCode, "INFO", "awaiting_code", help),
        (seq_state(), "Help?", "in_sequence", help),
        (State::OptedOut, "HELP", "opted_out", help),
        (State::Unverified, "join", "awaiting_code", code),
        (State::OptedOut, "Start", "awaiting_code", code),
        // Twilio lifts its block on YES too; only an opted-out number takes it so.
        (State::OptedOut, "Yes!", "awaiting_code", code),
        (
            State::Unverified,
            "yes",
            "unverified",
            "Acme Contest: reply JOIN",
        ),
        (State::OptedOut, "unstop", "awaiting_code", code),
        (State::OptedOut, "subscribe", "awaiting_code", code),
        (State::AwaitingCode, "JOIN", "awaiting_code", code),
        (seq_state(), "JOIN", "in_sequence", "You're already entered"),
        // Verified but never in the conversation (as the OTP API leaves a number): it starts.
        (State::Verified, "JOIN", "verified", "You're in!"),
        (State::OptedOut, "hello", "opted_out", ""),
        (
            State::Unverified,
            "hello",
            "unverified",
            "Acme Contest: reply JOIN to enter the contest.",
        ),
        // An opt-out asked for in words is told the word that works; a word that only
        // starts with "stop" is no such text.
        (
            State::Unverified,
            "stop now please",
            "unverified",
            "To stop all messages from Acme Contest, reply STOP.",
        ),
        (
            seq_state(),
            "Please STOP texting me!",
            "in_sequence",
            "To stop all messages",
        ),
        (
            State::AwaitingCode,
            "unsubscribe me",
            "awaiting_code",
            "To stop all messages",
        ),
        (State::OptedOut, "please stop", "opted_out", ""),
        (
            State::Unverified,
            "stopwatch",
            "unverified",
            "Acme Contest: reply JOIN",
        ),
        (
            seq_state(),
            "what?",
            "in_sequence",
            "Acme Contest: sorry, I didn't get that.",
        ),
    ];
    for (state, text, after, reply) in rows {
        check(state, text, after, reply);
    }
}

#[test]
fn a_stale_timer_does_nothing() {
    let f = flows();
    let mut sub = subscriber(seq_state());
    let t = smsflow::machine::Timer {
        at: t0(),
        kind: smsflow::machine::TimerKind::Step,
        epoch: 3,
    };
    sub.timer = Some(smsflow::machine::Timer { epoch: 4, ..t });
    let out = step(
        sub.clone(),
        &Event::TimerDue(t),
        &f,
        t0(),
        &mut StdRng::seed_from_u64(0),
    );
    assert_eq!(out.outcome, Outcome::Ignored);
    assert!(out.effects.is_empty());
    assert_eq!(out.subscriber, sub);
}

/// Which sequence each of `n` numbers is drawn into as it verifies.
fn draws(f: &Flows, n: usize) -> std::collections::BTreeMap<String, u32> {
    let mut counts = std::collections::BTreeMap::<String, u32>::new();
    let mut rng = StdRng::seed_from_u64(42);
    for _ in 0..n {
        let mut sub = subscriber(State::Verified);
        for field in &f.form.fields {
            sub.fields.insert(field.key.clone(), "x".into());
        }
        sub.state = State::AwaitingCode;
        sub.codes.push(IssuedCode {
            code: "123456".into(),
            issued_at: t0(),
            expires_at: t0() + TimeDelta::minutes(10),
            wrong: 0,
            by_app: false,
        });
        let out = step(sub, &Event::Inbound("123456".into()), f, t0(), &mut rng);
        *counts.entry(out.subscriber.sequence.unwrap()).or_default() += 1;
    }
    counts
}

#[test]
fn sequence_draws_follow_the_weights() {
    let counts = draws(&flows(), 600);
    assert_eq!(counts.len(), 3, "{counts:?}");
    assert!(
        counts.values().all(|&n| (150..=250).contains(&n)),
        "equal weights, got {counts:?}"
    );
    // Weights 3, 1 and 0: three draws to one, and never the one weighted 0.
    let mut sources = smsflow::flows::read_dir("flows".as_ref()).unwrap();
    let bot = sources
        .iter_mut()
        .find(|(path, _)| path.ends_with("bot.toml"))
        .unwrap();
    assert_eq!(bot.1.matches("weight = 1").count(), 3);
    bot.1 = bot.1.replacen("weight = 1", "weight = 3", 1);
    let at = bot.1.rfind("weight = 1").unwrap();
    bot.1
        .replace_range(at..at + "weight = 1".len(), "weight = 0");
    let weighted = smsflow::flows::load_sources(sources).unwrap();
    let counts = draws(&weighted, 600);
    assert_eq!(counts.get("quiz"), None, "{counts:?}");
    assert!((400..=500).contains(&counts["gentle"]), "{counts:?}");
    assert!((100..=200).contains(&counts["daily"]), "{counts:?}");
}

#[test]
fn an_admin_or_provider_opt_out_is_silent_and_cancels_the_timer() {
    let f = flows();
    for event in [Event::AdminOptOut, Event::ProviderUnsubscribed] {
        let mut sub = subscriber(seq_state());
        let timer = smsflow::machine::Timer {
            at: t0() + TimeDelta::days(1),
            kind: smsflow::machine::TimerKind::Step,
            epoch: 1,
        };
        sub.timer = Some(timer);
        let out = step(sub, &event, &f, t0(), &mut StdRng::seed_from_u64(0));
        assert_eq!(out.subscriber.state, State::OptedOut);
        assert!(messages(&out.effects).is_empty());
        assert!(out.effects.contains(&Effect::Cancel(timer)));
    }
}

// ---- properties -------------------------------------------------------------

#[derive(Clone, Debug)]
enum Act {
    Text(&'static str),
    LatestCode,
    SecondCode,
    ThirdCode,
    RandomCode(u32),
    FireTimer,
    Jump(i64),
    OtpRequest,
    OtpLatest,
    OtpRandom(u32),
    Admin,
    Provider,
    /// The newest code could not be sent (the OTP API withdraws it).
    Unsent,
    /// A call's menu: `opt_in`, `read_code`, `opt_out` (the caller ID may be spoofed).
    VoiceOptIn,
    VoiceCode,
    VoiceOptOut,
}

fn act() -> impl Strategy<Value = Act> {
    prop_oneof![
        4 => prop::sample::select(vec![
            "JOIN", "join!", "STOP", "stop.", "HELP", "info", "EDIT", "KEEP", "Ann", "A", "b", "4", "9",
            "hello", "START", "cancel", "", "PROFILE", "yes",
        ]).prop_map(Act::Text),
        3 => Just(Act::LatestCode),
        1 => Just(Act::SecondCode),
        1 => Just(Act::ThirdCode),
        2 => (0u32..1_000_000).prop_map(Act::RandomCode),
        3 => Just(Act::FireTimer),
        2 => (0i64..200_000).prop_map(Act::Jump),
        1 => Just(Act::OtpRequest),
        1 => Just(Act::OtpLatest),
        1 => (0u32..1_000_000).prop_map(Act::OtpRandom),
        1 => Just(Act::Admin),
        1 => Just(Act::Provider),
        1 => Just(Act::Unsent),
        1 => Just(Act::VoiceOptIn),
        1 => Just(Act::VoiceCode),
        1 => Just(Act::VoiceOptOut),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn the_rules_hold_over_random_event_sequences(
        acts in prop::collection::vec(act(), 1..60),
        seed in 0u64..1000,
        start in prop::sample::select(vec![State::Unverified, State::Verified, State::OptedOut]),
    ) {
        let f = flows();
        let v = &f.verify;
        let mut rng = StdRng::seed_from_u64(seed);
        let mut now = t0();
        // From a new number, a verified one with its profile filled in, or an opted-out one.
        let mut sub = subscriber(start.clone());
        if start == State::Verified {
            sub.verified_at = Some(now);
            for field in &f.form.fields {
                sub.fields.insert(field.key.clone(), "x".into());
            }
        }
        // Every code ever issued, in order, as the test sees them.
        let mut issued: Vec<(String, DateTime<Utc>)> = Vec::new();

        for a in acts {
            let nth = |n: usize| issued.iter().rev().nth(n).map(|(c, _)| c.clone()).unwrap_or_default();
            let event = match &a {
                Act::Text(t) => Event::Inbound(t.to_string()),
                Act::LatestCode => Event::Inbound(nth(0)),
                Act::SecondCode => Event::Inbound(nth(1)),
                Act::ThirdCode => Event::Inbound(nth(2)),
                Act::RandomCode(n) => Event::Inbound(format!("{n:06}")),
                Act::FireTimer => match sub.timer {
                    Some(t) => { now = now.max(t.at); Event::TimerDue(t) }
                    None => continue,
                },
                Act::Jump(secs) => { now += TimeDelta::seconds(*secs); continue; }
                Act::OtpRequest => Event::OtpRequested,
                Act::OtpLatest => Event::OtpSubmitted(nth(0)),
                Act::OtpRandom(n) => Event::OtpSubmitted(format!("{n:06}")),
                Act::Admin => Event::AdminOptOut,
                Act::Provider => Event::ProviderUnsubscribed,
                Act::Unsent => match sub.codes.last() {
                    Some(c) => Event::CodeUndeliverable(c.code.clone()),
                    None => continue,
                },
                Act::VoiceOptIn => Event::VoiceOptIn,
                Act::VoiceCode => Event::VoiceCodeRequested,
                Act::VoiceOptOut => Event::VoiceOptOut,
            };
            let before = sub.clone();
            let t = step(sub, &event, &f, now, &mut rng);
            let msgs = messages(&t.effects);

            // An opted-out number is sent nothing but help replies (and a code if it opts back in).
            if before.state == State::OptedOut {
                // (YES opts an opted-out number back in, as Twilio's own rule does.)
                let opting_in = matches!(&event, Event::Inbound(x) if f.keywords.opt_in.contains(&smsflow::machine::normalize(x)) || smsflow::machine::normalize(x) == "YES");
                for m in &msgs {
                    let help = *m == f.replies.help.render(|n| (n == "bot.name").then(|| f.bot.name.clone()));
                    prop_assert!(help || opting_in, "opted-out number was sent {m:?} after {event:?}");
                }
            }
            // Becoming opted out sends at most the one confirmation: exactly one for an opt-out
            // keyword, none for an admin's or the provider's opt-out.
            if before.state != State::OptedOut && t.subscriber.state == State::OptedOut {
                let keyword = matches!(&event, Event::Inbound(x) if f.keywords.opt_out.contains(&smsflow::machine::normalize(x)));
                prop_assert_eq!(msgs.len(), usize::from(keyword), "{:?} after {:?}", msgs, event);
            }
            // A withdrawn code was never received: it leaves the test's list too, and the
            // code before it moves up (the machine brings back the one it displaced).
            if let Event::CodeUndeliverable(c) = &event {
                if let Some(i) = issued.iter().rposition(|(code, _)| code == c) {
                    issued.remove(i);
                }
            // Track newly issued codes.
            } else if let Some(last) = t.subscriber.codes.last() {
                if before.codes.last().map(|c| c.issued_at != last.issued_at || c.code != last.code).unwrap_or(true) {
                    issued.push((last.code.clone(), last.issued_at));
                }
            }
            // A code is accepted only if it is one of the valid_codes latest and unexpired.
            if t.outcome == Outcome::Verified {
                let guess = match &event {
                    Event::Inbound(g) | Event::OtpSubmitted(g) => g.clone(),
                    _ => String::new(),
                };
                let latest: Vec<_> = issued.iter().rev().take(v.valid_codes as usize).collect();
                let ok = latest.iter().any(|(c, at)| *c == guess && *at + v.ttl > now);
                prop_assert!(ok, "accepted {guess:?} which is not among the latest unexpired codes");
            }
            // Wrong guesses never exceed max_attempts.
            for c in &t.subscriber.codes {
                prop_assert!(c.wrong <= v.max_attempts, "{} wrong guesses", c.wrong);
            }
            // Every scheduled timer lies in the future.
            for e in &t.effects {
                if let Effect::Schedule(timer) = e {
                    prop_assert!(timer.at > now, "timer at {} is not after now {}", timer.at, now);
                }
            }
            // The subscriber round-trips through its stored form.
            let stored = codec::encode_subscriber(&t.subscriber);
            prop_assert_eq!(&codec::decode_subscriber(&stored).unwrap(), &t.subscriber);
            sub = t.subscriber;
        }
    }
}

/// Three codes asked for (two count, as the shipped flows say), the third could not be sent:
/// withdrawing it brings back the first, so the number again has the two latest codes it
/// received.
#[test]
fn withdrawing_an_unsent_newest_code_brings_back_the_code_it_displaced() {
    let f = flows();
    assert_eq!(f.verify.valid_codes, 2);
    let mut rng = StdRng::seed_from_u64(5);
    let mut sub = subscriber(State::Unverified);
    let mut codes = Vec::new();
    for i in 0..3 {
        let out = step(
            sub,
            &Event::OtpRequested,
            &f,
            t0() + TimeDelta::seconds(i),
            &mut rng,
        );
        assert_eq!(out.outcome, Outcome::CodeSent);
        codes.push(out.subscriber.codes.last().unwrap().code.clone());
        sub = out.subscriber;
    }
    let later = t0() + TimeDelta::seconds(3);
    let submit = |sub: &Subscriber, code: &str, rng: &mut StdRng| {
        step(
            sub.clone(),
            &Event::OtpSubmitted(code.to_string()),
            &f,
            later,
            rng,
        )
        .outcome
    };
    assert_ne!(
        submit(&sub, &codes[0], &mut rng),
        Outcome::Verified,
        "superseded"
    );
    let withdrawn = step(
        sub,
        &Event::CodeUndeliverable(codes[2].clone()),
        &f,
        later,
        &mut rng,
    )
    .subscriber;
    assert_ne!(
        submit(&withdrawn, &codes[2], &mut rng),
        Outcome::Verified,
        "never sent"
    );
    assert_eq!(submit(&withdrawn, &codes[1], &mut rng), Outcome::Verified);
    assert_eq!(
        submit(&withdrawn, &codes[0], &mut rng),
        Outcome::Verified,
        "counts again"
    );
}

/// Guesses `wrong` until the number's codes lock; returns when a new code may be asked for.
fn guess_until_locked(mut sub: Subscriber, f: &Flows, at: DateTime<Utc>) -> DateTime<Utc> {
    let mut rng = StdRng::seed_from_u64(9);
    for _ in 0..=f.verify.max_attempts {
        let out = step(sub, &Event::OtpSubmitted("999999".into()), f, at, &mut rng);
        if let Outcome::Locked { new_code_at } = out.outcome {
            return new_code_at;
        }
        assert_eq!(out.outcome, Outcome::WrongCode);
        sub = out.subscriber;
    }
    panic!("never locked");
}

#[test]
fn a_locked_code_says_a_new_one_may_be_asked_for_at_once_or_when_the_send_limit_allows() {
    let mut f = flows();
    // Guessed wrong on purpose: no code may be 999999.
    f.verify.code_length = 5;
    let mut rng = StdRng::seed_from_u64(5);
    let mut sub = subscriber(State::Unverified);
    let sent_at = |i: u32| t0() + TimeDelta::minutes(i64::from(i));
    for i in 0..f.verify.max_sends {
        if i == 1 {
            // One code sent, well under the limit: a new one may be asked for now.
            let now = sent_at(1);
            assert_eq!(guess_until_locked(sub.clone(), &f, now), now);
        }
        let out = step(sub, &Event::OtpRequested, &f, sent_at(i), &mut rng);
        assert_eq!(out.outcome, Outcome::CodeSent);
        sub = out.subscriber;
    }
    // At the limit: not before the first of those sends leaves the window.
    let now = sent_at(f.verify.max_sends);
    assert_eq!(
        guess_until_locked(sub.clone(), &f, now),
        t0() + f.verify.send_window
    );
    let refused = step(sub, &Event::OtpRequested, &f, now, &mut rng);
    assert_eq!(
        refused.outcome,
        Outcome::RateLimited {
            retry_at: t0() + f.verify.send_window,
            everyone: false
        }
    );
}

/// The code a number was sent, typed once wrong guesses have locked it while a newer code
/// still counts: pointed to the latest code (`verify.wrong`), with no guess counted
/// against that one.
#[test]
fn a_locked_code_typed_while_a_newer_one_counts_costs_the_newer_one_no_guess() {
    let f = flows();
    let mut rng = StdRng::seed_from_u64(5);
    let text = |sub: Subscriber, body: &str, rng: &mut StdRng| {
        step(sub, &Event::Inbound(body.into()), &f, t0(), rng)
    };
    let mut sub = text(subscriber(State::Unverified), "JOIN", &mut rng).subscriber;
    let old = sub.codes[0].code.clone();
    let wrong = (0..10)
        .map(|d| d.to_string().repeat(6))
        .find(|w| *w != old)
        .unwrap();
    for _ in 1..f.verify.max_attempts {
        sub = text(sub, &wrong, &mut rng).subscriber;
    }
    sub = text(sub, "JOIN", &mut rng).subscriber;
    let new = sub.codes.last().unwrap().code.clone();
    let wrong = (0..10)
        .map(|d| d.to_string().repeat(6))
        .find(|w| *w != old && *w != new)
        .unwrap();
    // The old code's last guess: it is locked, the new one has one wrong guess.
    sub = text(sub, &wrong, &mut rng).subscriber;
    let out = text(sub, &old, &mut rng);
    assert_eq!(out.outcome, Outcome::WrongCode);
    assert_eq!(messages(&out.effects), [f.verify.wrong.render(|_| None)]);
    let newest = out.subscriber.codes.last().unwrap();
    assert_eq!((newest.code.as_str(), newest.wrong), (new.as_str(), 1));
    assert_eq!(
        text(out.subscriber, &new, &mut rng).outcome,
        Outcome::Verified
    );
}

/// Three codes sent, then a reload lowers `max_sends` to 1: another may be asked for once
/// the newest of them has left the window (not the oldest, which leaves two still counted).
#[test]
fn a_lowered_send_limit_names_when_enough_sends_have_left_the_window() {
    let mut f = flows();
    let mut rng = StdRng::seed_from_u64(5);
    let mut sub = subscriber(State::Unverified);
    let sent_at = |i: i64| t0() + TimeDelta::seconds(10 * i);
    for i in 0..3 {
        let out = step(sub, &Event::OtpRequested, &f, sent_at(i), &mut rng);
        assert_eq!(out.outcome, Outcome::CodeSent);
        sub = out.subscriber;
    }
    f.verify.max_sends = 1;
    let refused = step(sub.clone(), &Event::OtpRequested, &f, sent_at(3), &mut rng);
    let newest_leaves = sent_at(2) + f.verify.send_window;
    assert_eq!(
        refused.outcome,
        Outcome::RateLimited {
            retry_at: newest_leaves,
            everyone: false
        }
    );
    let at_that_time = step(sub, &Event::OtpRequested, &f, newest_leaves, &mut rng);
    assert_eq!(at_that_time.outcome, Outcome::CodeSent);
}

/// Locked while everyone's codes for the hour are spent: a new code may be asked for once
/// `max_codes_per_hour` allows it, not at once.
#[test]
fn a_locked_code_says_a_new_one_may_be_asked_for_when_everyones_limit_allows() {
    let mut f = flows();
    f.verify.code_length = 5;
    let mut rng = StdRng::seed_from_u64(5);
    let now = t0();
    let mut sub = step(
        subscriber(State::Unverified),
        &Event::OtpRequested,
        &f,
        now,
        &mut rng,
    )
    .subscriber;
    let spent_until = now + TimeDelta::minutes(40);
    let limits = smsflow::machine::Limits {
        codes_refused_until: Some(spent_until),
    };
    for _ in 0..=f.verify.max_attempts {
        let guess = Event::OtpSubmitted("999999".into());
        let out = smsflow::machine::step_within(sub, &guess, &f, now, &mut rng, limits);
        if let Outcome::Locked { new_code_at } = out.outcome {
            assert_eq!(new_code_at, spent_until);
            return;
        }
        sub = out.subscriber;
    }
    panic!("never locked");
}

#[test]
fn a_number_whose_only_code_was_undeliverable_is_unverified_again_and_not_opted_in() {
    let f = flows();
    let mut rng = StdRng::seed_from_u64(4);
    let asked = step(
        subscriber(State::Unverified),
        &Event::OtpRequested,
        &f,
        t0(),
        &mut rng,
    )
    .subscriber;
    assert_eq!(asked.state, State::AwaitingCode);
    let code = asked.codes[0].code.clone();
    let out = step(asked, &Event::CodeUndeliverable(code), &f, t0(), &mut rng);
    assert_eq!(out.subscriber.state, State::Unverified);
    assert!(!out.subscriber.opted_in());
    assert!(out.subscriber.code_sends.is_empty());
}

/// Codes asked for at once, whose sends all fail: one displaced by the newer ones before its
/// failure is heard still gives back its send, so an outage does not use up the limit.
#[test]
fn an_undeliverable_code_displaced_by_newer_ones_still_gives_back_its_send() {
    let f = flows();
    let mut rng = StdRng::seed_from_u64(5);
    // A second apart, or all in the same instant (one writer batch).
    for apart in [1, 0] {
        let mut sub = subscriber(State::Unverified);
        let mut codes = Vec::new();
        // valid_codes = 2: three codes are kept, the fourth request displaces the first.
        for n in 0..4 {
            let at = t0() + TimeDelta::seconds(n * apart);
            sub = step(sub, &Event::OtpRequested, &f, at, &mut rng).subscriber;
            codes.push(sub.codes.last().unwrap().code.clone());
        }
        assert_eq!(sub.code_sends.len(), 4);
        assert_eq!(sub.codes.len(), 3, "the first is displaced");
        // The failures heard in any order: the displaced one first, or last.
        if apart == 0 {
            codes.reverse();
        }
        for code in &codes {
            sub = step(
                sub,
                &Event::CodeUndeliverable(code.clone()),
                &f,
                t0() + TimeDelta::seconds(5),
                &mut rng,
            )
            .subscriber;
        }
        assert!(sub.code_sends.is_empty(), "{apart}: {:?}", sub.code_sends);
        assert!(sub.codes.is_empty());
        assert_eq!(sub.state, State::Unverified);
    }
}

#[test]
fn an_undeliverable_code_is_withdrawn_and_no_other() {
    let f = flows();
    let mut rng = StdRng::seed_from_u64(3);
    let sub = subscriber(State::Unverified);
    let first = step(sub, &Event::OtpRequested, &f, t0(), &mut rng).subscriber;
    let later = t0() + TimeDelta::seconds(1);
    let both = step(first, &Event::OtpRequested, &f, later, &mut rng).subscriber;
    let (c1, c2) = (both.codes[0].code.clone(), both.codes[1].code.clone());
    let out = step(
        both,
        &Event::CodeUndeliverable(c1.clone()),
        &f,
        later,
        &mut rng,
    );
    let left: Vec<&str> = out
        .subscriber
        .codes
        .iter()
        .map(|c| c.code.as_str())
        .collect();
    assert_eq!(left, [c2.as_str()]);
    assert_eq!(
        out.subscriber.state,
        State::AwaitingCode,
        "another code went out: still waiting for it"
    );
    assert_eq!(
        out.subscriber.code_sends,
        [later],
        "the withdrawn send no longer counts"
    );
    let tried = step(
        out.subscriber,
        &Event::OtpSubmitted(c1),
        &f,
        later,
        &mut rng,
    );
    assert_ne!(tried.outcome, Outcome::Verified);
}

#[test]
fn a_number_whose_sequence_a_reload_removed_ends_it_and_its_answer_is_not_met_with_silence() {
    let mut f = flows();
    let asking = State::InSequence {
        name: "quiz".into(),
        step: 1,
        waiting: true,
    };
    f.sequences.retain(|s| s.name != "quiz");
    let mut rng = StdRng::seed_from_u64(1);

    // The reload's event ends it at once...
    let t = step(
        subscriber(asking.clone()),
        &Event::FlowsChanged,
        &f,
        t0(),
        &mut rng,
    );
    assert_eq!(t.subscriber.state, State::Verified);
    assert_eq!(t.outcome, Outcome::Done);
    assert!(messages(&t.effects).is_empty(), "ending is silent");

    // ...and an answer that arrives first ends it too, and gets a reply.
    let t = step(
        subscriber(asking),
        &Event::Inbound("B".into()),
        &f,
        t0(),
        &mut rng,
    );
    assert_eq!(t.subscriber.state, State::Verified);
    assert_eq!(
        messages(&t.effects),
        ["Acme Contest: sorry, I didn't get that. Reply HELP for help, or STOP to opt out."]
    );

    // A number whose place still exists is left alone.
    let t = step(
        subscriber(seq_state()),
        &Event::FlowsChanged,
        &f,
        t0(),
        &mut rng,
    );
    assert_eq!(
        (t.subscriber.state, t.outcome),
        (seq_state(), Outcome::Ignored)
    );
}

/// A number awaiting its code 123456, sent at `t0`.
fn awaiting_123456() -> Subscriber {
    awaiting("123456")
}

/// A number awaiting `code`, sent at `t0`.
fn awaiting(code: &str) -> Subscriber {
    let mut s = subscriber(State::AwaitingCode);
    s.codes.push(IssuedCode {
        code: code.into(),
        issued_at: t0(),
        expires_at: t0() + TimeDelta::minutes(10),
        wrong: 0,
        by_app: false,
    });
    s
}

fn typed_while_awaiting_123456(typed: &str) -> smsflow::machine::Transition {
    step(
        awaiting_123456(),
        &Event::Inbound(typed.into()),
        &flows(),
        t0(),
        &mut StdRng::seed_from_u64(1),
    )
}

/// A code sent before a reload shortened `code_length` is taken as it was sent, by text and
/// by the OTP API, even when the new length divides it (`12341234` is not two `1234`s).
#[test]
fn a_code_of_the_length_before_a_reload_is_taken_as_sent() {
    let mut f = flows();
    f.verify.code_length = 4;
    for event in [
        Event::Inbound("12341234".into()),
        Event::OtpSubmitted("12341234".into()),
    ] {
        let t = step(
            awaiting("12341234"),
            &event,
            &f,
            t0(),
            &mut StdRng::seed_from_u64(1),
        );
        assert_eq!(t.subscriber.state, State::Verified, "{event:?}");
    }
    // In words too; and a wrong one in words is one wrong guess.
    let t = step(
        awaiting("12341234"),
        &Event::Inbound("my code is 12341234".into()),
        &f,
        t0(),
        &mut StdRng::seed_from_u64(1),
    );
    assert_eq!(t.subscriber.state, State::Verified);
    let t = step(
        awaiting("12341234"),
        &Event::Inbound("my code is 12341235".into()),
        &f,
        t0(),
        &mut StdRng::seed_from_u64(1),
    );
    assert_eq!(t.subscriber.state, State::AwaitingCode);
    assert_eq!(t.subscriber.codes[0].wrong, 1);
}

#[test]
fn a_code_typed_with_spaces_dashes_punctuation_or_words_around_it_verifies_and_a_time_is_not_a_guess(
) {
    for typed in ["123456.", "123-456", "123 456", "(123456)!", " 123456 "] {
        let t = typed_while_awaiting_123456(typed);
        assert_eq!(t.subscriber.state, State::Verified, "{typed:?}");
    }
    // A time or a decimal is not a guess: it costs no attempt, and is told what is awaited
    // (not that a code was wrong).
    for typed in ["3:30", "10.5", "1/2", "hi"] {
        let t = typed_while_awaiting_123456(typed);
        assert_eq!(t.subscriber.codes[0].wrong, 0, "{typed:?}");
        // Nor is it counted as a wrong code (the metric alerts on guessing).
        assert_eq!(t.outcome, Outcome::Done, "{typed:?}");
        assert_eq!(
            messages(&t.effects),
            ["Please reply with the code we texted you, or JOIN for a new one."],
            "{typed:?}"
        );
    }
    // The code pasted twice is the code; two different codes cost no attempt.
    for typed in [
        "123456 123456",
        "123456, 123456",
        "My code is 123456 123456",
    ] {
        let t = typed_while_awaiting_123456(typed);
        assert_eq!(t.subscriber.state, State::Verified, "{typed:?}");
    }
    let t = typed_while_awaiting_123456("123456, 654321");
    assert_eq!(t.subscriber.codes[0].wrong, 0);
    let t = typed_while_awaiting_123456("654321 123456");
    assert_eq!(t.subscriber.codes[0].wrong, 0);
    // A code within words is the code: the one run of six digits in the text.
    for typed in [
        "My code is 123456",
        "123456 thanks",
        "Code: 123-456.",
        "it says 123 456 at 3:30",
    ] {
        let t = typed_while_awaiting_123456(typed);
        assert_eq!(t.subscriber.state, State::Verified, "{typed:?}");
    }
    // A wrong one within words is a wrong guess; two six-digit runs, or none, no code.
    let t = typed_while_awaiting_123456("my code is 654321");
    assert_eq!(t.subscriber.codes[0].wrong, 1);
    assert_eq!(
        messages(&t.effects),
        ["That code didn't match. Reply with the latest code, or JOIN for a new one."]
    );
    for typed in [
        "123456 or 654321?",
        "call me on 415 555 0100",
        "hi, what is this?",
    ] {
        let t = typed_while_awaiting_123456(typed);
        assert_eq!(t.subscriber.state, State::AwaitingCode, "{typed:?}");
        assert_eq!(t.subscriber.codes[0].wrong, 0, "{typed:?}");
    }
}

/// Digits from an Arabic, Persian, Devanagari or full-width keyboard are the digits they
/// stand for: in a code texted back or given to the OTP API, in a number answer, in a choice.
#[test]
fn a_code_a_number_or_a_choice_typed_in_another_scripts_digits_is_read_as_those_digits() {
    for typed in ["١٢٣٤٥٦", "۱۲۳ ۴۵۶", "१२३४५६", "１２３４５６"] {
        let t = typed_while_awaiting_123456(typed);
        assert_eq!(t.subscriber.state, State::Verified, "{typed:?}");
    }
    // Another code in those digits is a wrong guess, as "654321" is.
    let t = typed_while_awaiting_123456("٦٥٤٣٢١");
    assert_eq!(t.subscriber.codes[0].wrong, 1);

    let f = flows();
    assert_eq!(
        f.verify.api_code(" ١٢٣٤٥٦ ", &[]).as_deref(),
        Some("123456")
    );
    assert_eq!(
        f.verify.api_code("١٢٣٤٥", &[]),
        None,
        "five digits are not a code"
    );
    let range = smsflow::flows::Expect::Range(1, 5);
    assert_eq!(range.accept("٤").as_deref(), Some("4"));
    assert_eq!(range.accept("٩"), None, "9 is out of range in any script");
    let choices = choice_of(&[("1", "yes"), ("2", "no")]);
    assert_eq!(choices.accept("٢").as_deref(), Some("no"));
}

/// An app asked for a code for a number already verified and mid-form (the first question
/// takes any text), and the code is texted back: it is not saved as the answer, the number is
/// told to enter it in the app and asked the question again, and the code stays the app's to
/// validate.
#[test]
fn a_code_texted_back_by_a_verified_number_is_not_taken_as_an_answer_and_stays_the_apps() {
    let mut s = subscriber(State::Verified);
    s.form = Some(smsflow::machine::FormCursor {
        index: 0,
        editing: false,
        key: Some("first_name".into()),
    });
    s.codes.push(IssuedCode {
        code: "123456".into(),
        issued_at: t0(),
        expires_at: t0() + TimeDelta::minutes(10),
        wrong: 0,
        by_app: false,
    });
    let f = flows();
    let t = step(
        s.clone(),
        &Event::Inbound("123456".into()),
        &f,
        t0(),
        &mut StdRng::seed_from_u64(1),
    );
    assert!(t.subscriber.fields.is_empty(), "{:?}", t.subscriber.fields);
    assert_eq!(t.subscriber.form, s.form, "the question stays open");
    assert!(
        !format!("{:?}", t.effects).contains("123456"),
        "the code is nowhere in the effects (history included): {:?}",
        t.effects
    );
    let told = [
        "Please enter that code in the app that asked for it.",
        "What's your first name?",
    ];
    assert_eq!(messages(&t.effects), told);
    let validated = step(
        t.subscriber,
        &Event::OtpSubmitted("123456".into()),
        &f,
        t0(),
        &mut StdRng::seed_from_u64(1),
    );
    assert_eq!(
        validated.outcome,
        Outcome::Verified,
        "the app can still validate it"
    );
    // Texted back once the app has validated it (its text said to reply with it): still no
    // answer.
    let after = step(
        validated.subscriber,
        &Event::Inbound("123456".into()),
        &f,
        t0() + TimeDelta::seconds(30),
        &mut StdRng::seed_from_u64(1),
    );
    assert!(
        after.subscriber.fields.is_empty(),
        "{:?}",
        after.subscriber.fields
    );
    assert_eq!(messages(&after.effects), ["What's your first name?"]);
    assert!(!format!("{:?}", after.effects).contains("123456"));
    // The same digits kept from an earlier validation, expiring sooner: kept until the later
    // expiry.
    let mut again = validated_before(&s);
    again.used_codes[0].expires_at = t0() + TimeDelta::minutes(1);
    let validated = step(
        again,
        &Event::OtpSubmitted("123456".into()),
        &f,
        t0(),
        &mut StdRng::seed_from_u64(1),
    );
    let later = step(
        validated.subscriber,
        &Event::Inbound("123456".into()),
        &f,
        t0() + TimeDelta::minutes(5),
        &mut StdRng::seed_from_u64(1),
    );
    assert!(
        later.subscriber.fields.is_empty(),
        "{:?}",
        later.subscriber.fields
    );
    // Any other text that reads as a code gets the same while the app's code is valid, or
    // the answer would tell a guess right; once it expired, it is an answer.
    let wrong = step(
        s.clone(),
        &Event::Inbound("654321".into()),
        &f,
        t0(),
        &mut StdRng::seed_from_u64(1),
    );
    assert!(
        wrong.subscriber.fields.is_empty(),
        "{:?}",
        wrong.subscriber.fields
    );
    assert_eq!(messages(&wrong.effects), told);
    let later = step(
        s.clone(),
        &Event::Inbound("654321".into()),
        &f,
        t0() + TimeDelta::minutes(11),
        &mut StdRng::seed_from_u64(1),
    );
    assert_eq!(later.subscriber.fields["first_name"], "654321");
    // Other text is an answer as before.
    let t = step(
        s,
        &Event::Inbound("Ann".into()),
        &f,
        t0(),
        &mut StdRng::seed_from_u64(1),
    );
    assert_eq!(t.subscriber.fields["first_name"], "Ann");
}

/// `s` as it is once an app validated its held code before (that code kept among the used).
fn validated_before(s: &smsflow::machine::Subscriber) -> smsflow::machine::Subscriber {
    let mut s = s.clone();
    s.used_codes = s.codes.clone();
    s
}

/// A code the OTP API asks for is sent with `verify.api_send` when the flows have one; a
/// code asked for by text, with `verify.send`.
#[test]
fn an_apps_code_goes_with_its_own_text_when_the_flows_have_one() {
    let load = |toml: &str| smsflow::flows::load_sources(vec![("f.toml".into(), toml.into())]);
    let text_of = |f: &Flows, event: &Event| {
        let t = step(
            subscriber(State::Unverified),
            event,
            f,
            t0(),
            &mut StdRng::seed_from_u64(1),
        );
        let code = &t.subscriber.codes[0].code;
        (t.effects.iter())
            .find_map(|e| match e {
                Effect::SendCode { text, .. } => Some(text.replace(code.as_str(), "<code>")),
                _ => None,
            })
            .expect("a code is sent")
    };
    let f =
        load("[bot]\nname = \"Bot\"\n[verify]\napi_send = \"Your app code: {code}\"\n").unwrap();
    assert_eq!(text_of(&f, &Event::OtpRequested), "Your app code: <code>");
    let by_text = "Bot: your code is <code>. Reply with it to confirm.";
    assert_eq!(text_of(&f, &Event::Inbound("JOIN".into())), by_text);
    // Without one, the app's code goes with `send`.
    let plain = load("[bot]\nname = \"Bot\"\n").unwrap();
    assert_eq!(text_of(&plain, &Event::OtpRequested), by_text);
    // One without its code is refused.
    let problems = load("[verify]\napi_send = \"Your app code\"\n")
        .unwrap_err()
        .to_string();
    assert!(
        problems.contains("verify.api_send must contain {code}"),
        "{problems}"
    );
}

/// The code a number verified with, texted again (its owner thought the first had not
/// arrived), is not the answer to the question that followed: the question is asked again.
/// It verifies nothing more (the OTP API refuses it), and once expired it is ordinary text.
#[test]
fn the_code_a_number_verified_with_texted_again_is_not_taken_as_an_answer() {
    let f = flows();
    let first = |s, text: &str, at| {
        step(
            s,
            &Event::Inbound(text.into()),
            &f,
            at,
            &mut StdRng::seed_from_u64(1),
        )
    };
    let verified = first(awaiting_123456(), "123456", t0()).subscriber;
    assert_eq!(verified.state, State::Verified);
    let again = first(verified.clone(), "123 456", t0() + TimeDelta::seconds(30));
    assert!(
        again.subscriber.fields.is_empty(),
        "{:?}",
        again.subscriber.fields
    );
    assert_eq!(messages(&again.effects), ["What's your first name?"]);
    assert!(
        !format!("{:?}", again.effects).contains("123456"),
        "the code is nowhere in the effects: {:?}",
        again.effects
    );
    let replayed = step(
        verified.clone(),
        &Event::OtpSubmitted("123456".into()),
        &f,
        t0() + TimeDelta::seconds(30),
        &mut StdRng::seed_from_u64(1),
    );
    assert_eq!(
        replayed.outcome,
        Outcome::WrongCode,
        "an app cannot replay it"
    );
    // Another six digits is an answer; so is the code once it has expired, which is dropped.
    let other = first(verified.clone(), "654321", t0() + TimeDelta::seconds(30));
    assert_eq!(other.subscriber.fields["first_name"], "654321");
    let late = first(verified.clone(), "123456", t0() + TimeDelta::minutes(11));
    assert_eq!(late.subscriber.fields["first_name"], "123456");
    assert!(late.subscriber.used_codes.is_empty());
    // An opt-out drops it; a code an app validated is kept too (texted back, it is no
    // answer either).
    let stopped = first(verified, "STOP", t0() + TimeDelta::seconds(30));
    assert!(stopped.subscriber.used_codes.is_empty());
    let by_app = step(
        awaiting_123456(),
        &Event::OtpSubmitted("123456".into()),
        &f,
        t0(),
        &mut StdRng::seed_from_u64(1),
    );
    assert_eq!(by_app.outcome, Outcome::Verified);
    assert_eq!(by_app.subscriber.used_codes.len(), 1);

    // With no form, verifying leads straight to a sequence's question: the code texted
    // again gets that question again, not silence, and is not its answer.
    let f = smsflow::flows::load_sources(vec![(
        "f.toml".into(),
        "[bot]\nname = \"Bot\"\n[[sequence]]\nname = \"s\"\nsteps = [{ after = \"0s\", ask = \"Rate us 1-5\", save = \"rating\", expect = { range = [1, 5] } }]\n[form]\nextra_fields = [\"rating\"]\n".into(),
    )])
    .unwrap();
    let verified = step(
        awaiting_123456(),
        &Event::Inbound("123456".into()),
        &f,
        t0(),
        &mut StdRng::seed_from_u64(1),
    );
    assert!(
        matches!(
            verified.subscriber.state,
            State::InSequence { waiting: true, .. }
        ),
        "{:?}",
        verified.subscriber.state
    );
    let again = step(
        verified.subscriber,
        &Event::Inbound("123456".into()),
        &f,
        t0() + TimeDelta::seconds(30),
        &mut StdRng::seed_from_u64(1),
    );
    assert_eq!(messages(&again.effects), ["Rate us 1-5"]);
    assert!(again.subscriber.fields.is_empty());
    assert!(matches!(
        again.subscriber.state,
        State::InSequence { waiting: true, .. }
    ));
}

#[test]
fn a_choice_copied_as_the_question_shows_it_is_that_choice_and_a_vague_one_is_asked_again() {
    let f = flows();
    let channel = f
        .form
        .fields
        .iter()
        .find(|q| q.key == "channel")
        .expect("the shipped form asks for the channel");
    for (typed, saved) in [
        ("B) social media", Some("social_media")),
        ("a. friend", Some("friend")),
        ("C: other", Some("other")),
        ("B", Some("social_media")),
        ("B) please", Some("social_media")),
        // A key, and after it another choice named: which is meant cannot be known.
        ("A) social media", None),
        ("B: no wait, friend", None),
        ("C. friend or other", None),
        // The words the question shows are the choice too.
        ("social media", Some("social_media")),
        ("B or C", None),
        ("social", None),
    ] {
        assert_eq!(channel.expect.accept(typed).as_deref(), saved, "{typed:?}");
    }
}

/// The shipped question shows "A) under 30" for the label `under_30`: the option typed as
/// shown, spaces and all, is that choice.
#[test]
fn an_option_typed_as_shown_is_its_choice_whatever_its_spaces_and_underscores() {
    let f = flows();
    let age = f
        .form
        .fields
        .iter()
        .find(|q| q.key == "age_group")
        .expect("the shipped form asks for the age group");
    for (typed, saved) in [
        ("under 30", Some("under_30")),
        ("Over 50", Some("over_50")),
        ("A) under 30", Some("under_30")),
        ("C) under 30", None),
        // The question may show an option in other words than its label.
        ("B) 30 to 50", Some("30_50")),
        ("30-50", Some("30_50")),
        ("30 to 50", None),
    ] {
        assert_eq!(age.expect.accept(typed).as_deref(), saved, "{typed:?}");
    }
}

/// A label typed as written is that choice, even when it reads like another once its
/// punctuation is dropped; an answer with nothing to read is no choice at all.
#[test]
fn a_label_typed_as_written_is_that_choice_and_an_answer_of_only_symbols_is_none() {
    let expect = choice_of(&[("Y", "👍"), ("N", "👎"), ("A", "sub-18"), ("B", "18+")]);
    for (typed, saved) in [
        ("👎", Some("👎")),
        ("👍", Some("👍")),
        ("y", Some("👍")),
        ("18+", Some("18+")),
        ("SUB-18", Some("sub-18")),
        ("Sub-18!", Some("sub-18")),
        ("???", None),
        ("🙂", None),
    ] {
        assert_eq!(expect.accept(typed).as_deref(), saved, "{typed:?}");
    }
}

/// A reload mid-form: the answer goes to the field that was asked, wherever it moved; a field
/// added above it is still asked before the number is enrolled; a reply to a field the reload
/// removed is dropped and what is left is asked. (A record from before fields were kept by key
/// goes by place.)
#[test]
fn after_a_reload_mid_form_answers_go_to_the_field_asked_and_every_field_is_asked() {
    let form = |keys: &[&str]| -> Flows {
        let dir = tempfile::tempdir().unwrap();
        let mut toml = "[bot]\nname = \"Form\"\n".to_string();
        for k in keys {
            toml += &format!("\n[[form.field]]\nkey = \"{k}\"\nask = \"{k}?\"\n");
        }
        toml += "\n[[sequence]]\nname = \"s\"\nsteps = [{ after = \"1d\", say = \"hi\" }]\n";
        std::fs::write(dir.path().join("f.toml"), toml).unwrap();
        smsflow::flows::load_dir(dir.path()).unwrap()
    };
    let reply = |s: Subscriber, f: &Flows, text: &str| {
        let t = step(
            s,
            &Event::Inbound(text.into()),
            f,
            t0(),
            &mut StdRng::seed_from_u64(1),
        );
        let said = messages(&t.effects);
        (t.subscriber, said)
    };
    let asked = |index, key: Option<&str>| {
        let mut s = subscriber(State::Verified);
        s.fields.insert("a".into(), "A".into());
        s.form = Some(smsflow::machine::FormCursor {
            index,
            editing: false,
            key: key.map(str::to_string),
        });
        s
    };
    // Asked b (the second field); then c is added first.
    let f = form(&["c", "a", "b"]);
    let (s, said) = reply(asked(1, Some("b")), &f, "B");
    assert_eq!((s.fields["a"].as_str(), s.fields["b"].as_str()), ("A", "B"));
    assert_eq!(said, ["c?"]);
    let (s, _) = reply(s, &f, "C");
    assert_eq!(s.state.name(), "in_sequence");
    // Asked c (the third field); then the form became a and d.
    let (s, said) = reply(asked(2, Some("c")), &form(&["a", "d"]), "C");
    assert!(!s.fields.contains_key("c") && !s.fields.contains_key("d"));
    assert_eq!(
        (said.as_slice(), s.state.name()),
        (["d?".to_string()].as_slice(), "verified")
    );
    // An older record's place is its index.
    let (s, said) = reply(asked(1, None), &form(&["a", "b", "c"]), "B");
    assert_eq!(
        (s.fields["b"].as_str(), said.as_slice()),
        ("B", ["c?".to_string()].as_slice())
    );
}

/// The form's last answer always gets a reply: the first step when it comes at once, else
/// `form.done` (no sequence follows, or its first step comes later).
#[test]
fn the_forms_last_answer_is_never_met_with_silence() {
    let last_field = || {
        let mut s = subscriber(State::Verified);
        s.fields.insert("first_name".into(), "Ann".into());
        s.fields.insert("age_group".into(), "under_30".into());
        s.form = Some(smsflow::machine::FormCursor {
            index: 2,
            editing: false,
            key: Some("channel".into()),
        });
        s
    };
    let answer = |f: &Flows| {
        let t = step(
            last_field(),
            &Event::Inbound("A".into()),
            f,
            t0(),
            &mut StdRng::seed_from_u64(1),
        );
        assert_eq!(t.subscriber.fields["channel"], "friend");
        (t.subscriber.state.name(), messages(&t.effects))
    };
    // The shipped flows: every sequence's first step comes at once, and is the reply.
    let (state, said) = answer(&flows());
    assert_eq!(state, "in_sequence");
    assert_eq!(said.len(), 1);
    assert!(!said[0].contains("all set"), "{said:?}");

    // First steps a day later: the answer is thanked now.
    let mut later = flows();
    for s in &mut later.sequences {
        s.steps[0].after = TimeDelta::days(1);
    }
    assert_eq!(
        answer(&later),
        ("in_sequence", vec!["Thanks, you're all set.".to_string()])
    );

    // No sequences at all.
    let mut none = flows();
    none.sequences.clear();
    assert_eq!(
        answer(&none),
        ("verified", vec!["Thanks, you're all set.".to_string()])
    );
}

/// A sequence question answered in time gets its `thanks`, or the step due at once, or,
/// with neither, `replies.answered`: never silence.
#[test]
fn an_answer_in_time_is_never_met_with_silence() {
    let asking = State::InSequence {
        name: "quiz".into(),
        step: 1,
        waiting: true,
    };
    let answer = |f: &Flows| {
        let t = step(
            subscriber(asking.clone()),
            &Event::Inbound("B".into()),
            f,
            t0(),
            &mut StdRng::seed_from_u64(1),
        );
        assert_eq!(t.subscriber.fields["favorite"], "bike");
        messages(&t.effects)
    };
    // The quiz question has no thanks, and its next step comes 12 hours later.
    let mut f = flows();
    assert_eq!(answer(&f), ["Thanks, got it."]);
    f.replies.answered = smsflow::flows::Template::literal("Noted.");
    assert_eq!(answer(&f), ["Noted."]);
    // The next step due at once is the reply.
    let quiz = f.sequences.iter_mut().find(|s| s.name == "quiz").unwrap();
    quiz.steps[2].after = TimeDelta::zero();
    assert_eq!(answer(&f), ["Winners are announced next week. Good luck!"]);
}

/// A number awaiting only an app's code, whose text says to enter it in the app: what it
/// texts is no guess. The code itself, and any text that reads as a code, is pointed back to
/// the app, and the code stays usable there; a wrong code costs no attempt. Without `api_send`, the code's text says to reply with it,
/// and a reply verifies.
#[test]
fn texts_while_only_an_apps_code_is_awaited_are_no_guesses() {
    let f = flows();
    let rng = &mut StdRng::seed_from_u64(3);
    // A number an app asks a code for, first of all.
    let app_asks = |f: &Flows, rng: &mut StdRng| {
        let new = subscriber(State::Unverified);
        step(new, &Event::OtpRequested, f, t0(), rng).subscriber
    };
    let asked = app_asks(&f, rng);
    assert_eq!(asked.state, State::AwaitingCode);
    let code = asked.codes[0].code.clone();
    let text = |f: &Flows, said: &str| {
        step(
            asked.clone(),
            &Event::Inbound(said.into()),
            f,
            t0(),
            &mut StdRng::seed_from_u64(0),
        )
    };
    let t = text(&f, &format!("my code is {code}"));
    assert_eq!(
        messages(&t.effects),
        ["Please enter that code in the app that asked for it."]
    );
    assert_eq!(t.subscriber, asked_at_now(&asked, &t.subscriber));
    // A wrong code is answered as the code is (the answer tells no guess right); other
    // text, as a number that never joined.
    let wrong = if code == "000000" { "111111" } else { "000000" };
    for (said, answer) in [
        ("hi", "Acme Contest: reply JOIN to enter the contest."),
        (
            wrong,
            "Please enter that code in the app that asked for it.",
        ),
    ] {
        let t = text(&f, said);
        assert_eq!(messages(&t.effects), [answer], "{said:?}");
        assert_eq!(t.subscriber.codes[0].wrong, 0, "{said:?}");
    }
    // The app checks it as ever.
    let t = step(
        asked.clone(),
        &Event::OtpSubmitted(code.clone()),
        &f,
        t0(),
        rng,
    );
    assert_eq!(t.outcome, Outcome::Verified);
    // What the code's text said when it went out counts, not a reload since: without
    // `api_send` now, the code sent as "enter it in the app" is still the app's.
    let mut told_to_reply = flows();
    told_to_reply.verify.api_send = None;
    let t = text(&told_to_reply, &code);
    assert_eq!(t.subscriber.state, State::AwaitingCode);
    // Sent by `send`, which says to reply with it, a code texted back verifies.
    let sent_by_send = app_asks(&told_to_reply, rng);
    let replied = sent_by_send.codes[0].code.clone();
    let t = step(sent_by_send, &Event::Inbound(replied), &f, t0(), rng);
    assert_eq!(t.subscriber.state, State::Verified);
}

/// `asked` as it is after a text at the same time: only `last_inbound_at` moved.
fn asked_at_now(asked: &Subscriber, after: &Subscriber) -> Subscriber {
    let mut s = asked.clone();
    s.last_inbound_at = after.last_inbound_at;
    s
}

/// EDIT with no form to edit is a keyword all the same: never saved as an answer.
#[test]
fn edit_with_no_form_is_not_taken_as_an_answer() {
    let mut f = flows();
    f.form.fields.clear();
    // A question that takes any text.
    let quiz = f.sequences.iter_mut().find(|s| s.name == "quiz").unwrap();
    match &mut quiz.steps[1].action {
        smsflow::flows::StepAction::Ask(q) => q.expect = smsflow::flows::Expect::Any,
        smsflow::flows::StepAction::Say(_) => panic!("quiz asks at step 1"),
    }
    let asking = State::InSequence {
        name: "quiz".into(),
        step: 1,
        waiting: true,
    };
    let question = f.question("quiz", 1).unwrap().text.render(|_| None);
    let t = step(
        subscriber(asking.clone()),
        &Event::Inbound("edit".into()),
        &f,
        t0(),
        &mut StdRng::seed_from_u64(1),
    );
    assert_eq!(t.subscriber.state, asking, "still waiting for the answer");
    assert!(t.subscriber.fields.is_empty(), "{:?}", t.subscriber.fields);
    let said = messages(&t.effects);
    assert_eq!(said.len(), 2, "{said:?}");
    assert!(said[0].contains("didn't get that"), "{said:?}");
    assert_eq!(said[1], question);
}

/// KEEP while editing keeps an answer; for a field with none (added since the number last
/// answered, or on the first pass through the form) it is not taken as the answer "KEEP":
/// the question is asked again.
#[test]
fn keep_for_a_field_with_no_answer_yet_asks_it_again() {
    let f = flows();
    // The first name takes any answer: "KEEP" would do as one.
    assert_eq!(f.form.fields[0].key, "first_name");
    // While editing, and on the first pass through the form alike.
    for editing in [true, false] {
        let mut s = subscriber(State::Verified);
        s.form = Some(smsflow::machine::FormCursor {
            index: 0,
            editing,
            key: Some("first_name".into()),
        });
        let t = step(
            s,
            &Event::Inbound("keep".into()),
            &f,
            t0(),
            &mut StdRng::seed_from_u64(1),
        );
        assert!(
            t.subscriber.fields.is_empty(),
            "{editing}: {:?}",
            t.subscriber.fields
        );
        assert_eq!(t.subscriber.form.map(|c| c.index), Some(0));
        assert_eq!(messages(&t.effects).len(), 1, "{:?}", t.effects);
    }
}

/// An answer as long as a text itself, filled into a follow-up ("Thanks {field.first_name}!"),
/// does not make a message Twilio would refuse: the answer is shortened where it stands, and
/// the rest of the text is sent whole.
#[test]
fn a_text_made_too_long_by_an_answer_shortens_the_answer_and_keeps_the_rest() {
    let f = flows();
    let last = f.form.fields.len() - 1;
    let mut s = subscriber(State::Verified);
    s.fields.insert("first_name".into(), "é🙂".repeat(600));
    s.fields.insert("age_group".into(), "30_50".into());
    s.form = Some(smsflow::machine::FormCursor {
        index: last,
        editing: false,
        key: Some(f.form.fields[last].key.clone()),
    });
    let t = step(
        s,
        &Event::Inbound("A".into()),
        &f,
        t0(),
        &mut StdRng::seed_from_u64(1),
    );
    let sent = messages(&t.effects);
    let thanks = sent
        .iter()
        .find(|m| m.starts_with("Thanks é🙂"))
        .unwrap_or_else(|| panic!("the sequence's first step: {sent:?}"));
    assert_eq!(
        thanks,
        // (40 UTF-16 units of it, as Twilio counts: an emoji is two.)
        &format!(
            "Thanks {}é…! A quick quiz is coming tomorrow.",
            "é🙂".repeat(13)
        )
    );
}

/// A retry is the retry text and the question again: together too long because of an answer,
/// the answer is shortened, and the question's end (what to reply) is still sent.
#[test]
fn a_retry_made_too_long_by_an_answer_keeps_what_to_reply() {
    let f = smsflow::flows::load_sources(vec![(
        "f.toml".into(),
        "[bot]\nname = \"Bot\"\n\n[[form.field]]\nkey = \"a\"\nask = \"Name?\"\n\n[[form.field]]\nkey = \"b\"\nask = \"Thanks {field.a}! Reply A or B.\"\nexpect = { choices = { A = \"x\", B = \"y\" } }\nretry = \"Please reply A or B.\"\n".into(),
    )])
    .unwrap();
    let mut s = subscriber(State::Verified);
    // The question alone fits (1,597 units); with the retry text before it, it would not.
    s.fields.insert("a".into(), "N".repeat(1575));
    s.form = Some(smsflow::machine::FormCursor {
        index: 1,
        editing: false,
        key: Some("b".into()),
    });
    let t = step(
        s,
        &Event::Inbound("C".into()),
        &f,
        t0(),
        &mut StdRng::seed_from_u64(1),
    );
    assert_eq!(
        messages(&t.effects),
        [format!(
            "Please reply A or B.\nThanks {}…! Reply A or B.",
            "N".repeat(40)
        )]
    );
}

/// A code text whose field holds an answer as long as a text still carries the code.
#[test]
fn a_code_text_made_too_long_by_an_answer_still_carries_the_code() {
    let f = smsflow::flows::load_sources(vec![(
        "f.toml".into(),
        "[bot]\nname = \"Bot\"\n[verify]\nsend = \"Hi {field.first_name}, your code is {code}.\"\n\n[[form.field]]\nkey = \"first_name\"\nask = \"Name?\"\n".into(),
    )])
    .unwrap();
    let mut s = subscriber(State::OptedOut);
    s.fields.insert("first_name".into(), "N".repeat(1600));
    let t = step(
        s,
        &Event::Inbound("JOIN".into()),
        &f,
        t0(),
        &mut StdRng::seed_from_u64(1),
    );
    let code = t.subscriber.codes.last().expect("a code").code.clone();
    let sent = messages(&t.effects);
    assert_eq!(
        sent,
        [format!("Hi {}…, your code is {code}.", "N".repeat(40))]
    );
}

/// Nothing that could be a code shows in the `Debug` form of events and effects, should
/// anything ever log them.
#[test]
fn the_debug_form_of_events_and_effects_never_shows_a_code() {
    for e in [
        Event::Inbound("123456".into()),
        Event::OtpSubmitted("123456".into()),
        Event::CodeUndeliverable("123456".into()),
    ] {
        let shown = format!("{e:?}");
        assert!(
            !shown.contains("123456") && shown.contains("6 characters"),
            "{shown}"
        );
    }
    let t = step(
        subscriber(State::Unverified),
        &Event::Inbound("JOIN".into()),
        &flows(),
        t0(),
        &mut StdRng::seed_from_u64(1),
    );
    let code = &t.subscriber.codes[0].code;
    let shown = format!("{:?}", t.effects);
    assert!(
        shown.contains("SendCode") && !shown.contains(code.as_str()),
        "{shown}"
    );
}

/// A number that verifies again (it was verified before, and rejoined) with every form answer
/// kept is asked nothing, so it gets `verify.welcome_back` (when the flow has one) instead of
/// a `verified` text promising questions. A number with questions ahead, or verifying for the
/// first time, gets `verified`.
#[test]
fn a_number_verifying_again_with_every_answer_kept_is_welcomed_back_not_promised_questions() {
    let f = flows();
    let verify = |before: bool, fields: &[(&str, &str)], f: &Flows| {
        let mut s = awaiting_123456();
        s.verified_at = before.then(|| t0() - TimeDelta::days(3));
        for (k, v) in fields {
            s.fields.insert(k.to_string(), v.to_string());
        }
        let t = step(
            s,
            &Event::Inbound("123456".into()),
            f,
            t0(),
            &mut StdRng::seed_from_u64(1),
        );
        assert_eq!(t.subscriber.verified_at, Some(t0()));
        messages(&t.effects).into_iter().next().unwrap_or_default()
    };
    let all = [
        ("first_name", "Ann"),
        ("age_group", "30_50"),
        ("channel", "friend"),
    ];
    let promised = "You're in! A few quick questions first.";
    assert_eq!(
        verify(true, &all, &f),
        "Welcome back! Your answers are kept."
    );
    assert_eq!(verify(true, &all[..2], &f), promised, "a question is left");
    // Answers known without an earlier verification (an import, a flow whose form asks
    // nothing): not "welcome back".
    assert_eq!(verify(false, &all, &f), promised);
    // Without a welcome_back text, the verified text is sent.
    let mut without = flows();
    without.verify.welcome_back = None;
    assert_eq!(verify(true, &all, &without), promised);
}

/// A number that sent PROFILE and left the edit unanswered, then got a sequence question:
/// its reply answers the question (the latest thing it was asked), not the old edit prompt.
#[test]
fn a_sequence_question_sent_during_an_unfinished_edit_gets_the_answer() {
    let f = flows();
    let mut sub = subscriber(State::InSequence {
        name: "gentle".into(),
        step: 2,
        waiting: false,
    });
    sub.fields.insert("first_name".into(), "Ann".into());
    sub.form = Some(smsflow::machine::FormCursor {
        index: 0,
        editing: true,
        key: Some("first_name".into()),
    });
    let timer = smsflow::machine::Timer {
        at: t0(),
        kind: smsflow::machine::TimerKind::Step,
        epoch: 1,
    };
    sub.timer = Some(timer);
    let rng = &mut StdRng::seed_from_u64(0);
    let asked = step(sub, &Event::TimerDue(timer), &f, t0(), rng);
    assert_eq!(messages(&asked.effects), ["How useful were the tips, 1-5?"]);
    let answered = step(asked.subscriber, &Event::Inbound("5".into()), &f, t0(), rng);
    let s = &answered.subscriber;
    assert_eq!(s.fields.get("rating").map(String::as_str), Some("5"));
    assert_eq!(s.fields.get("first_name").map(String::as_str), Some("Ann"));
    assert_eq!(s.form, None, "the edit pass is over");
    assert_eq!(
        messages(&answered.effects),
        [
            "Thanks! You gave the tips a 5.",
            "Thanks for taking part! Good luck in the contest."
        ]
    );
}

/// A number that rejoins keeps the sequence it was drawn before (the dataset's assignment
/// stands) and starts it again; one whose sequence was since removed is drawn anew.
#[test]
fn a_number_that_rejoins_keeps_its_sequence_draw_unless_that_sequence_is_gone() {
    let f = flows();
    let rejoin = |assigned: &str, seed: u64| {
        let mut s = awaiting_123456();
        s.sequence = Some(assigned.to_string());
        for (k, v) in [
            ("first_name", "Ann"),
            ("age_group", "30_50"),
            ("channel", "friend"),
        ] {
            s.fields.insert(k.into(), v.into());
        }
        step(
            s,
            &Event::Inbound("123456".into()),
            &f,
            t0(),
            &mut StdRng::seed_from_u64(seed),
        )
    };
    for seed in 0..20 {
        let t = rejoin("quiz", seed);
        assert_eq!(
            t.subscriber.sequence.as_deref(),
            Some("quiz"),
            "seed {seed}"
        );
        assert!(
            matches!(&t.subscriber.state, State::InSequence { name, step: 1, .. } if name == "quiz"),
            "seed {seed}: {:?}",
            t.subscriber.state
        );
    }
    let drawn: std::collections::BTreeSet<String> = (0..20)
        .filter_map(|seed| rejoin("retired", seed).subscriber.sequence)
        .collect();
    assert!(!drawn.contains("retired"));
    assert!(drawn.len() > 1, "drawn at random: {drawn:?}");
}

/// A number an app verified (`after_otp_api = "stay"`: nothing is sent to it) that texts
/// JOIN later asks for the conversation: it gets what a number that joined by text gets,
/// and its history says it opted in by text. Once in the conversation, JOIN is "already
/// joined".
#[test]
fn a_number_an_app_verified_that_texts_join_later_gets_the_conversation() {
    let f = flows();
    let mut rng = StdRng::seed_from_u64(1);
    let at = |secs| t0() + TimeDelta::seconds(secs);
    let by_app = step(
        awaiting_123456(),
        &Event::OtpSubmitted("123456".into()),
        &f,
        t0(),
        &mut rng,
    );
    assert_eq!(by_app.subscriber.state, State::Verified);
    assert!(messages(&by_app.effects).is_empty());
    let joined = step(
        by_app.subscriber,
        &Event::Inbound("JOIN".into()),
        &f,
        at(60),
        &mut rng,
    );
    assert_eq!(
        messages(&joined.effects),
        [
            "You're in! A few quick questions first.",
            "What's your first name?"
        ]
    );
    assert!(
        format!("{:?}", joined.effects).contains(r#"OptedIn { via: "sms" }"#),
        "{:?}",
        joined.effects
    );
    // The code the app validated, texted now, is no answer: the question again.
    let echoed = step(
        joined.subscriber.clone(),
        &Event::Inbound("123456".into()),
        &f,
        at(70),
        &mut rng,
    );
    assert!(
        echoed.subscriber.fields.is_empty(),
        "{:?}",
        echoed.subscriber.fields
    );
    assert_eq!(messages(&echoed.effects), ["What's your first name?"]);
    let again = step(
        joined.subscriber,
        &Event::Inbound("join".into()),
        &f,
        at(90),
        &mut rng,
    );
    // (And the question open then, asked again: JOIN is no answer.)
    assert_eq!(
        messages(&again.effects),
        [
            "You're already entered. Reply PROFILE to update your answers, STOP to opt out.",
            "What's your first name?"
        ]
    );
}

/// An answer with words around it: a choice whose label it starts with (after an article),
/// a number it starts with when punctuation, courtesy or this question's own scale follows,
/// a key followed only by courtesy. Not a label further in (as often negated or asked
/// about), not a question, not a key among other words (a one-letter key is as often an
/// article or a pronoun), not a second number.
#[test]
fn an_answer_with_words_around_it_is_read_when_it_can_only_mean_one_thing() {
    let choices = choice_of(&[("A", "camera"), ("B", "bike"), ("C", "laptop")]);
    for (said, meant) in [
        ("The bike!", Some("bike")),
        ("bike please", Some("bike")),
        ("a laptop", Some("laptop")),
        ("a bike and a laptop", None),
        ("bike, no wait, laptop", None),
        ("bike? or the laptop", None),
        ("A please", Some("camera")),
        ("b, thanks!", Some("bike")),
        ("C thank you", Some("laptop")),
        ("A please?", None),
        ("A please, no B", None),
        ("a thank", None),
        ("Can I get a phone instead?", None),
        ("no idea", None),
    ] {
        assert_eq!(choices.accept(said).as_deref(), meant, "{said:?}");
    }
    let social = choice_of(&[
        ("A", "friend"),
        ("B", "social_media"),
        ("C", "other"),
        ("D", "none"),
    ]);
    for (said, meant) in [
        ("social media, I think", Some("social_media")),
        ("a friend told me", Some("friend")),
        ("Saw a billboard", None),
        ("I'd rather not say", None),
        ("I don't have social media", None),
        ("what other options?", None),
        ("no other", None),
        ("not a friend", None),
        ("can my friend join too?", None),
    ] {
        assert_eq!(social.accept(said).as_deref(), meant, "{said:?}");
    }
    let age = choice_of(&[("A", "under_30"), ("B", "30_50"), ("C", "over_50")]);
    assert_eq!(age.accept("I'm 45, not over 50"), None);
    assert_eq!(age.accept("over 50, sorry, 30-50"), None);
    let news = choice_of(&[("A", "the_news"), ("B", "radio")]);
    assert_eq!(news.accept("the news, mostly").as_deref(), Some("the_news"));
    assert_eq!(news.accept("the radio I think").as_deref(), Some("radio"));
    assert_eq!(age.accept("under 30? I wish"), None);

    let rating = smsflow::flows::Expect::Range(1, 5);
    for (said, meant) in [
        ("4 out of 5", Some("4")),
        ("5 - great tips!", Some("5")),
        ("4/5", Some("4")),
        ("4, thanks", Some("4")),
        ("4 please", Some("4")),
        ("3 thank you!", Some("3")),
        ("4 please 5", None),
        ("4 you", None),
        ("4.", Some("4")),
        ("4.5", None),
        ("4,5", None),
        ("I'd say 4", None),
        ("not a 5", None),
        ("1 sec, let me check", None),
        ("2 of them were good", None),
        ("3-4", None),
        ("3 - 4", None),
        ("4, 5", None),
        ("3, 4 or 5", None),
        ("7:30", None),
        ("3 out of 10", None),
        ("3/10", None),
        ("5/5/2026", None),
        ("1/2 of them", None),
        ("1, no wait, 4", None),
        ("I'm 34", None),
    ] {
        assert_eq!(rating.accept(said).as_deref(), meant, "{said:?}");
    }
    // A label that holds another's words, copied as shown, is that choice.
    let contact = choice_of(&[("A", "email"), ("B", "text"), ("C", "email_and_text")]);
    for (said, meant) in [
        ("C) email and text", Some("email_and_text")),
        ("A) email", Some("email")),
        ("A) email and text", None),
        ("C) email, no, text", None),
        // A label that starts another: the longer one, written whole, is the choice.
        ("email and text please", Some("email_and_text")),
        ("email please", Some("email")),
        ("email, no, text", None),
    ] {
        assert_eq!(contact.accept(said).as_deref(), meant, "{said:?}");
    }
    // With no choice of its own for "text", "email & text" was taken as `email`: it names the
    // longer label's further word, so it is no telling which, and asked again.
    let contact = choice_of(&[("A", "email"), ("B", "email_and_text"), ("C", "phone")]);
    for (said, meant) in [
        ("email & text", None),
        ("email+text", None),
        ("email, text", None),
        ("email and text", Some("email_and_text")),
        ("email and text please", Some("email_and_text")),
        ("email please", Some("email")),
        ("email, and soon", Some("email")),
        ("the email", Some("email")),
        ("email and also text", None),
        ("email then text", None),
    ] {
        assert_eq!(contact.accept(said).as_deref(), meant, "{said:?}");
    }
    // The little words of a longer label (at, the) say nothing: a time or a place after the
    // shorter one is no other choice.
    let pickup = choice_of(&[("A", "pickup"), ("B", "pickup_at_the_store")]);
    for (said, meant) in [
        ("pickup at 5pm", Some("pickup")),
        ("pickup in the evening", Some("pickup")),
        ("pickup, I'm at the office till 5", Some("pickup")),
        ("pickup at the store", Some("pickup_at_the_store")),
        ("pickup at store", None),
    ] {
        assert_eq!(pickup.accept(said).as_deref(), meant, "{said:?}");
    }
    let signed = smsflow::flows::Expect::Range(-5, 5);
    for (said, meant) in [
        ("-3", Some("-3")),
        // The minus sign, an en dash, a full-width hyphen-minus.
        ("\u{2212}3", Some("-3")),
        ("\u{2013}3 please", Some("-3")),
        ("\u{FF0D}3", Some("-3")),
        ("-3 please", Some("-3")),
        ("-3, thanks", Some("-3")),
        ("-3 - cold", Some("-3")),
        ("-3 - -4", None),
        ("-6 please", None),
        ("- 3", None),
    ] {
        assert_eq!(signed.accept(said).as_deref(), meant, "{said:?}");
    }
}

/// A number on a form question a reload removed (everything else answered) that texts HELP
/// or asks to stop in words gets that reply alone: no help or hint moves the form on (it
/// would draw a sequence and send its first step in the same reply).
#[test]
fn help_or_a_stop_hint_to_a_number_whose_question_a_reload_removed_moves_nothing_on() {
    let f = flows();
    let mut s = subscriber(State::Verified);
    for field in &f.form.fields {
        s.fields.insert(field.key.clone(), "x".into());
    }
    s.form = Some(smsflow::machine::FormCursor {
        index: 3,
        editing: false,
        key: Some("removed_since".into()),
    });
    for text in ["HELP", "please stop texting me"] {
        let t = step(
            s.clone(),
            &Event::Inbound(text.into()),
            &f,
            t0(),
            &mut StdRng::seed_from_u64(1),
        );
        assert_eq!(messages(&t.effects).len(), 1, "{text}: {:?}", t.effects);
        assert_eq!(t.subscriber.state, State::Verified, "{text}");
        assert_eq!(t.subscriber.sequence, None, "{text}");
    }
}

/// A number that asked twice holds two codes; it verifies with one, then texts the other
/// (or the same again): neither is the answer to the question that follows, which is asked
/// again. Neither verifies anything more.
#[test]
fn the_other_code_a_number_was_sent_texted_after_it_verified_is_not_taken_as_an_answer() {
    let f = flows();
    let mut s = awaiting_123456();
    s.codes.push(IssuedCode {
        code: "654321".into(),
        issued_at: t0() + TimeDelta::seconds(20),
        expires_at: t0() + TimeDelta::minutes(10) + TimeDelta::seconds(20),
        wrong: 0,
        by_app: false,
    });
    let text = |s, what: &str, secs| {
        step(
            s,
            &Event::Inbound(what.into()),
            &f,
            t0() + TimeDelta::seconds(secs),
            &mut StdRng::seed_from_u64(1),
        )
    };
    let verified = text(s, "123456", 30).subscriber;
    assert_eq!(verified.state, State::Verified);
    assert_eq!(verified.used_codes.len(), 2);
    for (what, secs) in [("654321", 40), ("123456", 50), ("my code is 654321", 60)] {
        let t = text(verified.clone(), what, secs);
        assert!(
            t.subscriber.fields.is_empty(),
            "{what}: {:?}",
            t.subscriber.fields
        );
        assert_eq!(messages(&t.effects), ["What's your first name?"], "{what}");
    }
    // Stored and read back, as the daemon does between texts.
    let bytes = codec::encode_record(&verified, &[]);
    let (read, _) = codec::decode_record(&bytes).unwrap();
    assert_eq!(read.used_codes, verified.used_codes);
    // An app that asks for a code for the number, and validates it, leaves them be.
    let at = |secs| t0() + TimeDelta::seconds(secs);
    let mut rng = StdRng::seed_from_u64(2);
    let asked = step(verified, &Event::OtpRequested, &f, at(70), &mut rng).subscriber;
    let app_code = asked.codes.last().unwrap().code.clone();
    let validated = step(asked, &Event::OtpSubmitted(app_code), &f, at(80), &mut rng);
    assert_eq!(validated.outcome, Outcome::Verified);
    let t = text(validated.subscriber, "654321", 90);
    assert!(t.subscriber.fields.is_empty(), "{:?}", t.subscriber.fields);
    assert_eq!(messages(&t.effects), ["What's your first name?"]);
}

/// A number whose question at step `k` of sequence `name` ran out at `t0`.
fn question_ran_out(f: &Flows, name: &str, k: usize) -> Subscriber {
    question_ran_out_at(f, name, k, t0())
}

/// A number whose question at step `k` of sequence `name` ran out at `at`.
fn question_ran_out_at(f: &Flows, name: &str, k: usize, at: DateTime<Utc>) -> Subscriber {
    let mut sub = subscriber(State::InSequence {
        name: name.into(),
        step: k,
        waiting: true,
    });
    let timer = smsflow::machine::Timer {
        at,
        kind: smsflow::machine::TimerKind::AskTimeout,
        epoch: 1,
    };
    sub.timer = Some(timer);
    let rng = &mut StdRng::seed_from_u64(0);
    step(sub, &Event::TimerDue(timer), f, at, rng).subscriber
}

/// A number whose quiz question (timeout 1d) ran out at `t0`, with the sequence moved on.
fn quiz_question_ran_out() -> (Flows, Subscriber) {
    let f = flows();
    let sub = question_ran_out(&f, "quiz", 1);
    (f, sub)
}

/// People answer late: an answer after its question's timeout is saved and acknowledged,
/// for the question's timeout again, once, and only while no other question was
/// asked since and no opt-out came between.
#[test]
fn an_answer_that_comes_after_its_questions_timeout_is_saved_for_that_timeout_again() {
    let rng = &mut StdRng::seed_from_u64(0);
    let hours = |h: i64| t0() + TimeDelta::hours(h);
    let text = |sub: Subscriber, f: &Flows, said: &str, at: DateTime<Utc>| {
        step(
            sub,
            &Event::Inbound(said.into()),
            f,
            at,
            &mut StdRng::seed_from_u64(0),
        )
    };
    let saved = "Thanks, your answer is saved.";
    let unknown =
        "Acme Contest: sorry, I didn't get that. Reply HELP for help, or STOP to opt out.";

    // Within the day: saved, acknowledged, recorded, and the sequence keeps its timer.
    let (f, late) = quiz_question_ran_out();
    let timer = late.timer;
    let t = text(late.clone(), &f, "B", hours(23));
    assert_eq!(messages(&t.effects), [saved]);
    assert_eq!(
        t.subscriber.fields.get("favorite").map(String::as_str),
        Some("bike")
    );
    assert_eq!(t.subscriber.timer, timer, "the sequence goes on as it was");
    assert!(t.effects.iter().any(|e| matches!(e,
        Effect::Record(smsflow::machine::Record::Answered { sequence, step: 1 }) if sequence == "quiz")));
    // Once: a second answer is no answer.
    let again = text(t.subscriber, &f, "C", hours(23));
    assert_eq!(messages(&again.effects), [unknown]);
    assert_eq!(
        again.subscriber.fields.get("favorite").map(String::as_str),
        Some("bike")
    );

    // What the question does not accept is no answer, and leaves the question open to one.
    let t = text(late.clone(), &f, "what?", hours(1));
    assert_eq!(messages(&t.effects), [unknown]);
    let t = text(t.subscriber, &f, "camera", hours(2));
    assert_eq!(messages(&t.effects), [saved]);

    // After the day: too late.
    let t = text(late.clone(), &f, "B", hours(24));
    assert_eq!(messages(&t.effects), [unknown]);
    assert_eq!(t.subscriber.fields.get("favorite"), None);
    assert_eq!(t.subscriber.late, None, "dropped at expiry");

    // Opted out: the question is gone with the opt-out.
    let out = text(late.clone(), &f, "STOP", hours(1));
    assert_eq!(out.subscriber.late, None);

    // An EDIT pass asks other questions (with the same keys, A to C): its replies answer
    // them, and a reply after it is no late answer.
    let mut edit = late.clone();
    edit.state = State::Verified;
    edit.fields.insert("first_name".into(), "Cy".into());
    let t = text(edit, &f, "PROFILE", hours(1));
    assert_eq!(t.subscriber.late, None);
    let t = text(t.subscriber, &f, "KEEP", hours(1));
    let t = text(t.subscriber, &f, "C", hours(1));
    let t = text(t.subscriber, &f, "C", hours(1));
    assert_eq!(t.subscriber.form, None, "the pass is over");
    let t = text(t.subscriber, &f, "C", hours(1));
    assert_eq!(messages(&t.effects), [unknown]);
    assert_eq!(t.subscriber.fields.get("favorite"), None);

    // Another question asked since: a reply answers that one.
    let mut gentle = late.clone();
    gentle.state = State::InSequence {
        name: "gentle".into(),
        step: 2,
        waiting: false,
    };
    let next = smsflow::machine::Timer {
        at: hours(1),
        kind: smsflow::machine::TimerKind::Step,
        epoch: 9,
    };
    gentle.timer = Some(next);
    let asked = step(gentle, &Event::TimerDue(next), &f, hours(1), rng);
    assert_eq!(messages(&asked.effects), ["How useful were the tips, 1-5?"]);
    assert_eq!(asked.subscriber.late, None);
    let t = text(asked.subscriber, &f, "4", hours(2));
    let t = text(t.subscriber, &f, "B", hours(2));
    assert_eq!(messages(&t.effects), [unknown]);
    assert_eq!(t.subscriber.fields.get("favorite"), None);

    // A question with its own `thanks` says it to a late answer too.
    let mut rating = late.clone();
    rating.late = Some(smsflow::machine::LateQuestion {
        sequence: "gentle".into(),
        step: 2,
        field: "rating".into(),
        until: hours(24),
    });
    let t = text(rating, &f, "4", hours(1));
    assert_eq!(messages(&t.effects), ["Thanks! You gave the tips a 4."]);
    assert_eq!(
        t.subscriber.fields.get("rating").map(String::as_str),
        Some("4")
    );

    // Kept for one field: a question at that step that saves into another (a reload moved
    // it there) takes nothing.
    let mut moved = late.clone();
    if let Some(l) = moved.late.as_mut() {
        l.field = "age_group".into();
    }
    let t = text(moved, &f, "B", hours(1));
    assert_eq!(messages(&t.effects), [unknown]);
    assert_eq!(t.subscriber.fields.get("favorite"), None);

    // A record round-trips with it.
    let bytes = codec::encode_subscriber(&late);
    assert_eq!(codec::decode_subscriber(&bytes).expect("decodes"), late);
    assert!(late.late.is_some());
}

/// When quiet hours hold the step after a question that ran out past the end of its late
/// window, the question is still the last thing asked: its answer is taken until the step
/// is due, and for the window's length after (the outbox may have held the question itself
/// for quiet hours, to reach the number only with that step).
#[test]
fn a_late_answer_is_taken_while_quiet_hours_hold_the_next_step() {
    let mut f = flows();
    let quiz = f.sequences.iter_mut().find(|s| s.name == "quiz").unwrap();
    match &mut quiz.steps[1].action {
        smsflow::flows::StepAction::Ask(q) => q.timeout = Some(TimeDelta::hours(1)),
        smsflow::flows::StepAction::Say(_) => panic!("quiz asks at step 1"),
    }
    quiz.steps[2].after = TimeDelta::minutes(30);
    // The question runs out at 21:30 in New York; the next step is due at 22:00, in quiet
    // hours, and held until 08:00 (13:00 UTC).
    let ran_out: DateTime<Utc> = "2026-01-06T02:30:00Z".parse().unwrap();
    let late = question_ran_out_at(&f, "quiz", 1, ran_out);
    let eight: DateTime<Utc> = "2026-01-06T13:00:00Z".parse().unwrap();
    assert_eq!(late.timer.map(|t| t.at), Some(eight));
    let answer = |at: DateTime<Utc>| {
        let t = step(
            late.clone(),
            &Event::Inbound("B".into()),
            &f,
            at,
            &mut StdRng::seed_from_u64(0),
        );
        (
            t.subscriber.fields.get("favorite").cloned(),
            messages(&t.effects),
        )
    };
    // 23:00 in New York: past the hour the window had, before the step.
    assert_eq!(
        answer(ran_out + TimeDelta::minutes(90)),
        (
            Some("bike".to_string()),
            vec!["Thanks, your answer is saved.".to_string()]
        )
    );
    // 08:30, the step (a message, not a question) sent meanwhile: still taken.
    let (saved, _) = answer(eight + TimeDelta::minutes(30));
    assert_eq!(saved.as_deref(), Some("bike"));
    // Not once the window's hour after 08:00 is over.
    let (saved, _) = answer(eight + TimeDelta::minutes(61));
    assert_eq!(saved, None);
}

/// A daily step keeps its wall time in the bot's timezone across a DST change (23 hours
/// here), rather than drifting an hour into quiet hours.
#[test]
fn a_step_a_day_later_comes_at_the_same_wall_time_across_a_dst_change() {
    let f = flows();
    // 20:30 in New York, the evening before clocks spring forward.
    let now: DateTime<Utc> = "2026-03-08T01:30:00Z".parse().unwrap();
    let mut sub = subscriber(State::InSequence {
        name: "quiz".into(),
        step: 0,
        waiting: false,
    });
    let timer = smsflow::machine::Timer {
        at: now,
        kind: smsflow::machine::TimerKind::Step,
        epoch: 1,
    };
    sub.timer = Some(timer);
    let t = step(
        sub,
        &Event::TimerDue(timer),
        &f,
        now,
        &mut StdRng::seed_from_u64(0),
    );
    let next: DateTime<Utc> = "2026-03-09T00:30:00Z".parse().unwrap();
    assert_eq!(t.subscriber.timer.map(|t| t.at), Some(next));
}

/// A step due just as the late window ends, quiet hours aside, leaves the window as long as
/// the question's timeout, though timers are kept to the millisecond and the clock is not.
#[test]
fn a_step_due_as_the_late_window_ends_does_not_stretch_it() {
    let mut f = flows();
    let quiz = f.sequences.iter_mut().find(|s| s.name == "quiz").unwrap();
    quiz.steps[2].after = TimeDelta::days(1);
    // 10:00 in New York, and a fraction of a millisecond.
    let ran_out = t0() + TimeDelta::nanoseconds(123_456);
    let late = question_ran_out_at(&f, "quiz", 1, ran_out);
    assert_eq!(
        late.late.map(|l| l.until),
        Some(ran_out + TimeDelta::days(1))
    );
}

/// Only a question that saves its answer and is not free text takes a late one: free text
/// would take any text at all, and an unsaved answer has nowhere to go.
#[test]
fn a_free_text_or_unsaved_question_takes_no_late_answer() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("flows.toml"),
        r#"[form]
extra_fields = ["note", "pick"]

[[sequence]]
name = "free"
steps = [{ ask = "Any note?", save = "note", timeout = "1h" }, { after = "1d", say = "Bye" }]

[[sequence]]
name = "unsaved"
steps = [
  { ask = "A or B?", expect = { choices = { A = "a", B = "b" } }, timeout = "1h" },
  { after = "1d", say = "Bye" },
]

[[sequence]]
name = "saved"
steps = [
  { ask = "A or B?", save = "pick", expect = { choices = { A = "a", B = "b" } }, timeout = "1h" },
  { after = "1d", say = "Bye" },
]
"#,
    )
    .unwrap();
    let f = smsflow::flows::load_dir(dir.path()).expect("flows load");
    for (name, takes) in [("free", false), ("unsaved", false), ("saved", true)] {
        let sub = question_ran_out(&f, name, 0);
        assert_eq!(sub.late.is_some(), takes, "{name}");
    }
}

/// A stop asked for in words is any text with the word "stop" or "unsubscribe": however it
/// goes on ("Stop. Wrong number", "stop the spam"), it is no answer. (A name with the word,
/// "Stop & Shop", is taken as one too: sending nothing more matters more than the answer.)
#[test]
fn a_text_with_the_word_stop_or_unsubscribe_asks_to_stop() {
    for (said, asks) in [
        ("please stop", true),
        ("Stop texting me please", true),
        ("Stop. Wrong number", true),
        ("STOP!!! who is this", true),
        ("stop the spam", true),
        ("stop your messages", true),
        ("stop asking me questions", true),
        ("how do I unsubscribe?", true),
        ("Stop & Shop", true),
        ("stopwatch", false),
        ("nonstop fun", false),
        ("Ann", false),
    ] {
        assert_eq!(smsflow::machine::asks_to_stop(said), asks, "{said:?}");
    }
}

/// Only the latest `valid_codes` codes count; the one kept before them (to come back if the
/// newest cannot be sent) is held by no one: the OTP API does not send it.
#[test]
fn a_number_holds_only_its_latest_valid_codes_not_the_one_kept_before_them() {
    let f = flows();
    assert_eq!(f.verify.valid_codes, 2);
    let mut rng = StdRng::seed_from_u64(7);
    let mut sub = subscriber(State::Unverified);
    for i in 0..3 {
        let at = t0() + TimeDelta::seconds(i);
        sub = step(sub, &Event::OtpRequested, &f, at, &mut rng).subscriber;
    }
    let codes: Vec<String> = sub.codes.iter().map(|c| c.code.clone()).collect();
    assert_eq!(codes.len(), 3, "the two that count and the one before them");
    assert!(!sub.holds_code(&codes[0], 2), "displaced");
    assert!(sub.holds_code(&codes[1], 2));
    assert!(sub.holds_code(&codes[2], 2));
    assert!(
        sub.holds_code(&codes[0], 3),
        "with three counted, it counts"
    );
    assert!(!sub.holds_code("000000x", 2));
}

/// After a reload, a number in a sequence has lost its place when its sequence is gone, its
/// step number is past the end, or the step it waits on for an answer is no question now;
/// each says which.
#[test]
fn a_place_a_reload_took_away_says_why_it_is_gone() {
    let mut f = flows();
    let at = |name: &str, step: usize, waiting: bool| State::InSequence {
        name: name.to_string(),
        step,
        waiting,
    };
    // The shipped quiz: a message, then a question (step 1), then a message.
    assert_eq!(smsflow::machine::lost_place(&at("quiz", 1, true), &f), None);
    assert_eq!(smsflow::machine::lost_place(&State::Verified, &f), None);
    assert_eq!(
        smsflow::machine::lost_place(&at("gone", 0, false), &f),
        Some("sequence no longer exists")
    );
    assert_eq!(
        smsflow::machine::lost_place(&at("quiz", 9, false), &f),
        Some("step no longer exists")
    );
    // The question's step removed: the message after it now has its number.
    let quiz = f.sequences.iter_mut().find(|s| s.name == "quiz").unwrap();
    quiz.steps.remove(1);
    assert_eq!(
        smsflow::machine::lost_place(&at("quiz", 1, true), &f),
        Some("the step at its place is no longer a question")
    );
    assert_eq!(
        smsflow::machine::lost_place(&at("quiz", 1, false), &f),
        None
    );
}

/// `verify.max_codes_per_hour` counts every number's codes together, by minute: with the
/// hour's codes spent, none is issued to anyone until the minute that frees room is an hour
/// past its end.
#[test]
fn the_daemon_wide_hour_refuses_codes_until_its_oldest_code_is_an_hour_old() {
    use smsflow::machine::{codes_refused_until, Limits};
    use std::collections::VecDeque;
    let ago = |m: i64| t0() - TimeDelta::minutes(m);
    let minutes = |counts: &[(i64, u32)]| -> VecDeque<(DateTime<Utc>, u32)> {
        counts.iter().map(|(m, n)| (ago(*m), *n)).collect()
    };
    let counted = TimeDelta::minutes(61);
    for (counts, most, refused_until) in [
        (&[][..], Some(1), None),
        (&[(50, 1), (10, 1)][..], None, None),
        (&[(50, 1), (10, 1)][..], Some(3), None),
        (&[(50, 1), (10, 1)][..], Some(2), Some(ago(50) + counted)),
        (&[(50, 1), (10, 1)][..], Some(1), Some(ago(10) + counted)),
        (&[(50, 3)][..], Some(2), Some(ago(50) + counted)),
        // A minute counts until the hour after its end: 61 minutes on, no more.
        (&[(60, 1), (10, 1)][..], Some(2), Some(ago(60) + counted)),
        (&[(61, 1), (10, 1)][..], Some(2), None),
        (
            &[(62, 5), (50, 1), (10, 1)][..],
            Some(2),
            Some(ago(50) + counted),
        ),
        // The clock went back two hours: minutes still to come count as this one, for an
        // hour from now, not until the clock is back there.
        (&[(-120, 3)][..], Some(3), Some(t0() + counted)),
        (&[(10, 1), (-120, 2)][..], Some(2), Some(t0() + counted)),
    ] {
        assert_eq!(
            codes_refused_until(&minutes(counts), most, t0()),
            refused_until,
            "{counts:?} at most {most:?}"
        );
    }
    // Counting folds those minutes still to come into this one, in order.
    let f = flows();
    let nothing = step(
        subscriber(State::Verified),
        &Event::Inbound("hi".into()),
        &f,
        t0(),
        &mut StdRng::seed_from_u64(0),
    );
    let mut kept = minutes(&[(10, 1), (-120, 2), (-180, 1)]);
    assert!(smsflow::machine::count_codes(&mut kept, &nothing, t0()));
    assert_eq!(kept, minutes(&[(10, 1), (0, 3)]));
    // Refused: a texter is told as when its own limit is spent, and nothing is issued; an
    // app's request gets the time to try again.
    let until = t0() + TimeDelta::minutes(20);
    let limits = Limits {
        codes_refused_until: Some(until),
    };
    let mut rng = StdRng::seed_from_u64(9);
    let sub = subscriber(State::Unverified);
    let join = Event::Inbound("JOIN".into());
    let t = smsflow::machine::step_within(sub.clone(), &join, &f, t0(), &mut rng, limits);
    assert_eq!(t.outcome, refused_for_everyone(until));
    assert_eq!(t.subscriber.state, State::Unverified);
    assert!(t.subscriber.codes.is_empty());
    assert_eq!(messages(&t.effects), [f.verify.busy.render(|_| None)]);
    let t = smsflow::machine::step_within(
        sub.clone(),
        &Event::OtpRequested,
        &f,
        t0(),
        &mut rng,
        limits,
    );
    assert_eq!(t.outcome, refused_for_everyone(until));
    assert!(messages(&t.effects).is_empty(), "{:?}", t.effects);
    // Once past it, codes go again.
    let t = smsflow::machine::step_within(sub, &join, &f, until, &mut rng, limits);
    assert_eq!(t.outcome, Outcome::CodeSent);
}

/// The outcome of a code refused while everyone's codes for the hour are spent, until `until`.
fn refused_for_everyone(until: DateTime<Utc>) -> Outcome {
    Outcome::RateLimited {
        retry_at: until,
        everyone: true,
    }
}

/// START is the number's own word that it is back (Twilio lifts its block on it): refused a
/// code while everyone's are spent, it is told to try later and is no longer opted out, so
/// its next text is answered (how to join), not ignored.
#[test]
fn start_while_the_hours_codes_are_spent_lifts_the_opt_out_and_says_to_try_later() {
    use smsflow::machine::{Limits, Record};
    let f = flows();
    let until = t0() + TimeDelta::minutes(20);
    let limits = Limits {
        codes_refused_until: Some(until),
    };
    let mut rng = StdRng::seed_from_u64(9);
    let start = Event::Inbound("START".into());
    let t = smsflow::machine::step_within(
        subscriber(State::OptedOut),
        &start,
        &f,
        t0(),
        &mut rng,
        limits,
    );
    assert_eq!(t.outcome, refused_for_everyone(until));
    assert_eq!(t.subscriber.state, State::Unverified);
    assert!(t.subscriber.codes.is_empty());
    assert_eq!(messages(&t.effects), [f.verify.busy.render(|_| None)]);
    assert!(t.effects.iter().any(|e| matches!(e,
        Effect::Record(Record::OptedIn { via }) if via == "sms")));
    let hello = Event::Inbound("hello".into());
    let t = smsflow::machine::step_within(t.subscriber, &hello, &f, t0(), &mut rng, limits);
    let told = messages(&t.effects);
    assert!(
        told.len() == 1 && told[0].ends_with("reply JOIN to enter the contest."),
        "{told:?}"
    );
    // Past the hour, JOIN brings the code.
    let join = Event::Inbound("JOIN".into());
    let t = smsflow::machine::step_within(t.subscriber, &join, &f, until, &mut rng, limits);
    assert_eq!(t.outcome, Outcome::CodeSent);
    assert_eq!(t.subscriber.state, State::AwaitingCode);
}

/// A choice question's expectation from (key, label) pairs.
fn choice_of(pairs: &[(&str, &str)]) -> smsflow::flows::Expect {
    let pairs = pairs.iter().map(|(k, l)| (k.to_string(), l.to_string()));
    smsflow::flows::Expect::Choices(pairs.collect())
}
