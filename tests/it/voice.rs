//! The voice menu through the socket: TwiML structure, routing, re-prompts, codes read aloud.

use crate::helpers::*;

const CALLER: &str = "+15550005555";

async fn voice(app: &TestApp, path: &str, digits: Option<&str>) -> Node {
    let mut params = vec![("From", CALLER), ("CallSid", "CA123")];
    if let Some(d) = digits {
        params.push(("Digits", d));
    }
    let r = app.post_form(path, &params).await;
    assert_eq!(r.status().as_u16(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/xml"));
    let mut twiml = parse_xml(&r.text().await.unwrap());
    // Twilio resolves the menu's relative URLs against the URL it called: so do the tests.
    for node in &mut twiml.children {
        match node.name.as_str() {
            "Gather" => {
                let action = node.attrs.get_mut("action").unwrap();
                *action = next_url(path, action);
            }
            "Redirect" => node.text = next_url(path, &node.text),
            _ => {}
        }
    }
    twiml
}

/// `relative` as Twilio would request it after calling `called` (both paths with queries).
fn next_url(called: &str, relative: &str) -> String {
    assert!(
        !relative.starts_with('/'),
        "relative, to keep a proxy's path prefix: {relative}"
    );
    let base = reqwest::Url::parse("https://example.com")
        .unwrap()
        .join(called)
        .unwrap();
    let next = base.join(relative).unwrap();
    format!("{}?{}", next.path(), next.query().unwrap_or_default())
}

/// The menu a response asks, via its Gather action.
fn gather_action(twiml: &Node) -> String {
    let gather = twiml.child("Gather").expect("a Gather");
    assert_eq!(gather.attrs["numDigits"], "1");
    // `#` is a key of the menu, not Twilio's default end-of-input key.
    assert_eq!(gather.attrs["finishOnKey"], "");
    assert_eq!(gather.attrs["method"], "POST");
    let redirect = twiml
        .child("Redirect")
        .expect("silence falls through to a re-prompt");
    assert_eq!(redirect.text, gather.attrs["action"]);
    gather.attrs["action"].clone()
}

#[tokio::test]
async fn a_call_gets_the_start_menu_inside_a_one_key_gather() {
    let app = TestApp::spawn(FLOWS).await;
    let twiml = voice(&app, "/twilio/voice", None).await;
    assert_eq!(twiml.name, "Response");
    assert_eq!(twiml.names(), ["Gather", "Redirect"]);
    assert_eq!(
        gather_action(&twiml),
        "/twilio/voice/gather?attempt=0&menu=main"
    );
    let say = &twiml.child("Gather").unwrap().children[0];
    assert_eq!(say.name, "Say");
    assert!(say.text.starts_with("Press 1 for your code"));
}

#[tokio::test]
async fn digits_route_between_menus() {
    let app = TestApp::spawn(FLOWS).await;
    let info = voice(&app, "/twilio/voice/gather?attempt=0&menu=main", Some("4")).await;
    assert_eq!(
        gather_action(&info),
        "/twilio/voice/gather?attempt=0&menu=info"
    );
    assert_eq!(
        info.child("Gather").unwrap().children[0].text,
        "Info. Press 9 to go back."
    );
    let back = voice(&app, "/twilio/voice/gather?attempt=0&menu=info", Some("9")).await;
    assert_eq!(
        gather_action(&back),
        "/twilio/voice/gather?attempt=0&menu=main"
    );
}

#[tokio::test]
async fn an_unknown_key_or_silence_reprompts_then_says_goodbye_and_hangs_up() {
    let app = TestApp::spawn(FLOWS).await;
    let first = voice(&app, "/twilio/voice/gather?attempt=0&menu=main", Some("7")).await;
    assert_eq!(
        gather_action(&first),
        "/twilio/voice/gather?attempt=1&menu=main"
    );
    let says: Vec<&str> = first
        .child("Gather")
        .unwrap()
        .children
        .iter()
        .map(|s| s.text.as_str())
        .collect();
    assert_eq!(says[0], "Sorry?");
    assert!(says[1].starts_with("Press 1"));
    let second = voice(&app, "/twilio/voice/gather?attempt=1&menu=main", None).await;
    assert_eq!(
        gather_action(&second),
        "/twilio/voice/gather?attempt=2&menu=main"
    );
    let last = voice(&app, "/twilio/voice/gather?attempt=2&menu=main", None).await;
    assert_eq!(last.names(), ["Say", "Hangup"], "after 2 retries: goodbye");
    assert_eq!(last.children[0].text, "Bye.");
}

#[tokio::test]
async fn a_code_read_aloud_verifies_by_sms() {
    let app = TestApp::spawn(FLOWS).await;
    let twiml = voice(&app, "/twilio/voice/gather?attempt=0&menu=main", Some("1")).await;
    assert_eq!(twiml.names(), ["Say", "Pause", "Say", "Say", "Hangup"]);
    let spoken = &twiml.children[0].text;
    assert_eq!(spoken, &twiml.children[2].text, "read twice");
    assert!(spoken.starts_with("Your code is "), "{spoken}");
    let code = code_in(spoken);
    assert_eq!(code.len(), 6);
    assert_eq!(app.twilio.attempts(), 0, "the code was spoken, not texted");
    let (_, reply) = app.sms(CALLER, &code).await;
    assert!(reply.contains("Verified!"), "{reply}");
    assert_eq!(app.state_of(CALLER).as_deref(), Some("verified"));
    // The history says the number came in through the voice menu.
    let detail: serde_json::Value =
        serde_json::from_str(&app.admin_text("/admin/subscribers/%2B15550005555").await).unwrap();
    let first = &detail["history"][0];
    assert_eq!(
        (first["event"].as_str(), first["via"].as_str()),
        (Some("opted_in"), Some("voice")),
        "{detail}"
    );
}

/// With `read_code_callers = "attested"`, a code is read aloud only on a call whose caller
/// ID its carrier fully attested (Twilio's `StirVerstat`); any other caller, who may have
/// spoofed the number, is texted the code instead, so only the number's owner gets it.
#[tokio::test]
async fn read_code_for_attested_callers_only_texts_the_code_to_any_other_caller() {
    let flows = FLOWS.replace("[ivr]\n", "[ivr]\nread_code_callers = \"attested\"\n");
    let app = TestApp::spawn(&flows).await;
    let press_1 = |from: &'static str, verstat: Option<&'static str>| {
        let mut params = vec![("From", from), ("CallSid", "CA9"), ("Digits", "1")];
        params.extend(verstat.map(|v| ("StirVerstat", v)));
        let app = &app;
        async move {
            let r = app
                .post_form("/twilio/voice/gather?attempt=0&menu=main", &params)
                .await;
            assert_eq!(r.status().as_u16(), 200);
            parse_xml(&r.text().await.unwrap())
        }
    };
    // Not attested (no STIR/SHAKEN, or only partly): texted, not spoken.
    for (n, (from, verstat)) in [
        ("+15550007001", None),
        ("+15550007002", Some("TN-Validation-Passed-B")),
    ]
    .into_iter()
    .enumerate()
    {
        let twiml = press_1(from, verstat).await;
        assert_eq!(twiml.names(), ["Say", "Say", "Hangup"], "{verstat:?}");
        assert!(
            twiml.children[0].text.contains("text message"),
            "{verstat:?}"
        );
        assert_eq!(code_in(&twiml.children[0].text), "", "no code spoken");
        let texted = app.twilio.last_to(from, n + 1).await;
        let code = code_in(&texted);
        assert_eq!(code.len(), 6, "{texted}");
        let (_, reply) = app.sms(from, &code).await;
        assert!(reply.contains("Verified!"), "{reply}");
    }
    // Fully attested: read aloud, nothing texted.
    let twiml = press_1("+15550007003", Some("TN-Validation-Passed-A")).await;
    assert_eq!(twiml.names(), ["Say", "Pause", "Say", "Say", "Hangup"]);
    assert_eq!(code_in(&twiml.children[0].text).len(), 6);
    // Attested when the call came in: the menu's URL carries it to the key press, in case
    // Twilio sends `StirVerstat` with the incoming call's webhook only.
    let caller = "+15550007004";
    let r = app
        .post_form(
            "/twilio/voice",
            &[
                ("From", caller),
                ("CallSid", "CA10"),
                ("StirVerstat", "TN-Validation-Passed-A"),
            ],
        )
        .await;
    let action = gather_action(&parse_xml(&r.text().await.unwrap()));
    assert_eq!(action, "voice/gather?attempt=0&attested=1&menu=main");
    let r = app
        .post_form(
            &format!("/twilio/{action}"),
            &[("From", caller), ("CallSid", "CA10"), ("Digits", "1")],
        )
        .await;
    let twiml = parse_xml(&r.text().await.unwrap());
    assert_eq!(twiml.names(), ["Say", "Pause", "Say", "Say", "Hangup"]);
    assert_eq!(
        app.twilio.attempts(),
        2,
        "only the two texted codes were sent"
    );
}

/// Once the hour's codes are spent, a caller never met who presses 2 (join) or 1 (a code)
/// is told to try later, and nothing is kept of the number: a flood of spoofed caller IDs
/// would leave a record each.
#[tokio::test]
async fn a_never_met_caller_refused_by_the_hourly_cap_leaves_no_record() {
    let flows = FLOWS.replace("[verify]\n", "[verify]\nmax_codes_per_hour = 1\n");
    let app = TestApp::spawn(&flows).await;
    assert_eq!(app.sms("+15550007001", "JOIN").await.0, 200);
    app.twilio.wait_delivered(1).await;
    for press in ["2", "1"] {
        voice(
            &app,
            "/twilio/voice/gather?attempt=0&menu=main",
            Some(press),
        )
        .await;
        assert_eq!(app.state_of(CALLER), None, "{press}");
    }
    app.outbox_settles().await;
    assert_eq!(app.twilio.attempts(), 1);
}

#[tokio::test]
async fn opt_in_by_voice_texts_a_code_and_opt_out_unsubscribes_for_good_in_words_for_a_call() {
    let app = TestApp::spawn(FLOWS).await;
    let twiml = voice(&app, "/twilio/voice/gather?attempt=0&menu=main", Some("2")).await;
    assert_eq!(twiml.names(), ["Say", "Say", "Hangup"]);
    assert!(twiml.children[0].text.contains("text message"));
    let texted = app.twilio.wait_delivered(1).await;
    assert!(texted[0].body.starts_with("Code: "));
    // Verified by texting it back, the caller who presses 2 again is told so in words for
    // a call (not the SMS text's "Reply HELP").
    let (_, twiml) = app.sms(CALLER, &code_in(&texted[0].body)).await;
    assert!(twiml.contains("Verified!"), "{twiml}");
    let twiml = voice(&app, "/twilio/voice/gather?attempt=0&menu=main", Some("2")).await;
    assert_eq!(twiml.children[0].text, "You're already signed up.");
    let twiml = voice(&app, "/twilio/voice/gather?attempt=0&menu=main", Some("3")).await;
    // Spoken, so not the SMS text's "Reply START": a caller is told to text.
    let spoken = "You're unsubscribed and will get no more messages. Text START to rejoin.";
    assert_eq!(twiml.children[0].text, spoken);
    assert_eq!(app.state_of(CALLER).as_deref(), Some("opted_out"));
    // Calling again opted out, for a code or to join: the same words, and no code (caller
    // ID can be spoofed: a call does not undo an opt-out).
    for press in ["1", "2"] {
        let twiml = voice(
            &app,
            "/twilio/voice/gather?attempt=0&menu=main",
            Some(press),
        )
        .await;
        assert_eq!(twiml.names(), ["Say", "Say", "Hangup"]);
        assert_eq!(twiml.children[0].text, spoken);
    }
    app.outbox_settles().await;
    assert_eq!(app.twilio.attempts(), 1, "only the code before the opt-out");
    assert_eq!(app.state_of(CALLER).as_deref(), Some("opted_out"));
}

#[tokio::test]
async fn every_twilio_route_refuses_a_forged_signature_and_changes_nothing() {
    let app = TestApp::spawn(FLOWS).await;
    app.sms(CALLER, "JOIN").await;
    app.twilio.wait_delivered(1).await;
    let before = app.state_of(CALLER);
    assert_eq!(before.as_deref(), Some("awaiting_code"));
    let forged = |path: &'static str, form: Vec<(&'static str, &'static str)>| {
        app.http
            .post(format!("{}{path}", app.base))
            .header("X-Twilio-Signature", "bm90IGEgcmVhbCBzaWduYXR1cmU=")
            .form(&form)
            .send()
    };
    for (path, form) in [
        ("/twilio/voice", vec![("From", CALLER), ("CallSid", "CA1")]),
        // 3 unsubscribes, 2 would text a code.
        (
            "/twilio/voice/gather?attempt=0&menu=main",
            vec![("From", CALLER), ("CallSid", "CA1"), ("Digits", "3")],
        ),
        (
            "/twilio/voice/gather?attempt=0&menu=main",
            vec![("From", CALLER), ("CallSid", "CA1"), ("Digits", "2")],
        ),
        // A delivery report that would opt the number out.
        (
            "/twilio/status",
            vec![
                ("MessageSid", "SMforged"),
                ("MessageStatus", "undelivered"),
                ("ErrorCode", "21610"),
                ("To", CALLER),
            ],
        ),
    ] {
        let r = forged(path, form).await.unwrap();
        assert_eq!(r.status().as_u16(), 403, "{path}");
        assert!(
            r.text().await.unwrap().contains("X-Twilio-Signature"),
            "{path}"
        );
    }
    assert_eq!(app.state_of(CALLER), before, "nothing changed");
    let phone = smsflow::phone::Phone::parse(CALLER).unwrap();
    let history = app.engine.store.history(&phone, 100).unwrap();
    assert_eq!(
        history.len(),
        2,
        "only the JOIN's opt-in and code: {history:?}"
    );
    eventually("the outbox to empty", async || {
        app.engine.store.outbox_len() == 0
    })
    .await;
    assert_eq!(app.twilio.attempts(), 1, "nothing sent");
    assert!(app.twilio.calls().is_empty(), "nobody called");
}

#[tokio::test]
async fn a_caller_who_hides_their_number_is_told_why_and_the_call_ends_without_state() {
    let app = TestApp::spawn(FLOWS).await;
    // Twilio's stand-ins: a word, or a keypad spelling that parses as a phone number.
    for from in ["anonymous", "Restricted", "+266696687", "+7378742833"] {
        for path in ["/twilio/voice", "/twilio/voice/gather?attempt=0&menu=main"] {
            let r = app
                .post_form(path, &[("From", from), ("CallSid", "CA9"), ("Digits", "1")])
                .await;
            assert_eq!(r.status().as_u16(), 200, "{from} {path}");
            let twiml = parse_xml(&r.text().await.unwrap());
            assert_eq!(twiml.names(), ["Say", "Hangup"], "{from} {path}");
            assert!(
                twiml.children[0].text.contains("caller ID"),
                "{from} {path}"
            );
        }
    }
    assert!(app.twilio.all_requests().is_empty());
    assert_eq!(app.engine.state_counts().iter().sum::<i64>(), 0);

    // A webhook with no From at all is still malformed.
    let r = app.post_form("/twilio/voice", &[("CallSid", "CA9")]).await;
    assert_eq!(r.status().as_u16(), 400);
}
