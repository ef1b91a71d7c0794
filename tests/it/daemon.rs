//! The daemon through its socket: webhooks, signatures, dedup, timers, restarts, outages.

use std::sync::Arc;
use std::time::Duration;

use crate::helpers::*;

const ANN: &str = "+15550001111";
const BOB: &str = "+15550002222";

/// JOIN, read the code from the fake API, reply it, answer the form: enrolled.
async fn enrol(app: &TestApp, phone: &str, delivered_before: usize) {
    let (status, twiml) = app.sms(phone, "JOIN").await;
    assert_eq!(status, 200);
    assert!(twiml.ends_with("<Response/>"), "{twiml}");
    let code = code_in(&app.twilio.last_to(phone, delivered_before + 1).await);
    assert_eq!(code.len(), 6);
    let (_, twiml) = app.sms(phone, &code).await;
    assert!(
        twiml.contains("<Message>Verified!</Message><Message>Name?</Message>"),
        "{twiml}"
    );
    let (_, twiml) = app.sms(phone, "Ann").await;
    assert!(twiml.contains("<Message>Welcome Ann</Message>"), "{twiml}");
}

#[tokio::test]
async fn join_verify_form_and_sequence_steps_arrive_through_the_twilio_api() {
    let app = TestApp::spawn(FLOWS).await;
    enrol(&app, ANN, 0).await;
    assert_eq!(app.state_of(ANN).as_deref(), Some("in_sequence"));

    let all = app.twilio.wait_delivered(4).await;
    let bodies: Vec<&str> = all.iter().map(|r| r.body.as_str()).collect();
    assert!(bodies[0].starts_with("Code: "));
    assert_eq!(&bodies[1..], ["Step one", "Step two", "Step three"]);
    for r in &all {
        assert!(r.authorized, "Basic auth with the account SID and token");
        assert_eq!(r.to, ANN);
        assert_eq!(r.from, FROM);
        assert_eq!(
            r.status_callback.as_deref(),
            Some("https://smsflow.test/twilio/status")
        );
    }
    quiet_for(Duration::from_millis(1500)).await;
    assert_eq!(app.twilio.delivered().len(), 4, "no step is sent twice");
    assert_eq!(
        app.state_of(ANN).as_deref(),
        Some("verified"),
        "a finished sequence leaves the number verified"
    );
}

/// Twilio sends at most 10 messages of a reply (warning 14109) and drops the rest: a turn
/// with more to say answers with 10, and the rest go through the REST API, in order.
#[tokio::test]
async fn a_reply_of_more_than_ten_messages_sends_the_rest_through_the_api() {
    let steps: Vec<String> = (1..=12)
        .map(|n| format!("  {{ after = \"0s\", say = \"Step {n}\" }},"))
        .collect();
    let flows = FLOWS.replace(
        "  { after = \"0s\", say = \"Welcome {field.first_name}\" },\n  { after = \"1s\", say = \"Step one\" },\n  { after = \"1s\", say = \"Step two\" },\n  { after = \"1s\", say = \"Step three\" },",
        &steps.join("\n"),
    );
    assert!(flows.contains("Step 12"));
    let app = TestApp::spawn(&flows).await;
    app.sms(ANN, "JOIN").await;
    let code = code_in(&app.twilio.last_to(ANN, 1).await);
    app.sms(ANN, &code).await;
    let (_, twiml) = app.sms(ANN, "Ann").await;
    let said: Vec<&str> = twiml
        .split("<Message>")
        .skip(1)
        .map(|m| m.split("</Message>").next().unwrap())
        .collect();
    let expected: Vec<String> = (1..=10).map(|n| format!("Step {n}")).collect();
    assert_eq!(said, expected, "{twiml}");
    let sent = app.twilio.wait_delivered(3).await;
    let bodies: Vec<&str> = sent.iter().map(|r| r.body.as_str()).collect();
    assert!(bodies[0].starts_with("Code: "), "{bodies:?}");
    assert_eq!(&bodies[1..], ["Step 11", "Step 12"]);
}

/// A keyword Twilio's Advanced Opt-Out knows and the flows do not (its `OptOutType`):
/// Twilio has blocked the number on `PARAR`, so it is opted out, not saved as an answer; a
/// `START` keyword of Twilio's brings it back; a `YES` marked `START` mid-form is an answer.
#[tokio::test]
async fn twilio_opt_out_keywords_the_flows_do_not_know_are_taken_as_twilio_took_them() {
    let app = TestApp::spawn(FLOWS).await;
    let texts = |body: &'static str, kind: &'static str| {
        let sid = format!("SM{}", uuid_like());
        let app = &app;
        async move {
            let params = [
                ("From", ANN),
                ("To", FROM),
                ("Body", body),
                ("MessageSid", sid.as_str()),
                ("OptOutType", kind),
            ];
            let r = app.post_form("/twilio/sms", &params).await;
            assert_eq!(r.status(), 200);
            r.text().await.unwrap()
        }
    };
    app.sms(ANN, "JOIN").await;
    let code = code_in(&app.twilio.last_to(ANN, 1).await);
    let (_, twiml) = app.sms(ANN, &code).await;
    assert!(twiml.contains("Name?"), "{twiml}");
    // Twilio takes YES for START; here it answers the question.
    texts("Yes", "START").await;
    let phone = smsflow::phone::Phone::parse(ANN).unwrap();
    let (sub, _) = app.engine.store.record(&phone).unwrap().unwrap();
    assert_eq!(sub.fields["first_name"], "Yes");
    assert_eq!(app.state_of(ANN).as_deref(), Some("in_sequence"));
    let twiml = texts("PARAR", "STOP").await;
    assert!(twiml.contains("unsubscribed"), "{twiml}");
    assert_eq!(app.state_of(ANN).as_deref(), Some("opted_out"));
    texts("ALTA", "START").await;
    assert_eq!(app.state_of(ANN).as_deref(), Some("awaiting_code"));
    let twiml = texts("AYUDA", "HELP").await;
    let (_, help) = app.sms(ANN, "HELP").await;
    assert!(help.contains("<Message>"), "{help}");
    assert_eq!(twiml, help, "AYUDA marked HELP is answered as HELP");
    assert_eq!(app.state_of(ANN).as_deref(), Some("awaiting_code"));
}

#[tokio::test]
async fn stop_mid_sequence_means_nothing_more_arrives() {
    let app = TestApp::spawn_on_manual_clock(FLOWS).await;
    enrol(&app, ANN, 0).await;
    app.advance(Duration::from_secs(1));
    app.twilio.wait_delivered(2).await; // the code and "Step one"
    let (status, twiml) = app.sms(ANN, "Stop.").await;
    assert_eq!(status, 200);
    assert!(twiml.contains("unsubscribed"), "{twiml}");
    assert_eq!(app.state_of(ANN).as_deref(), Some("opted_out"));
    // Nothing is left that could send (the clock moved past every step's time, and the
    // wait after it, is a backstop).
    assert_eq!(app.engine.store.timer_count(), 0);
    app.advance(Duration::from_secs(60));
    quiet_for(Duration::from_millis(500)).await;
    let bodies: Vec<String> = app.twilio.delivered().into_iter().map(|r| r.body).collect();
    assert_eq!(bodies.len(), 2, "nothing after STOP: {bodies:?}");
    let (_, twiml) = app.sms(ANN, "STOP").await;
    assert!(
        twiml.ends_with("<Response/>"),
        "STOP is confirmed once: {twiml}"
    );
}

#[tokio::test]
async fn a_repeated_message_sid_is_processed_once_and_answered_identically() {
    let app = TestApp::spawn(FLOWS).await;
    let phone = smsflow::phone::Phone::parse(ANN).unwrap();
    let history = || -> Vec<smsflow::machine::Record> {
        let entries = app.engine.store.history(&phone, 100).unwrap();
        entries.into_iter().map(|e| e.unwrap().record).collect()
    };
    let (s1, first) = app.sms_with_sid(ANN, "JOIN", "SMdup0001").await;
    let (s2, second) = app.sms_with_sid(ANN, "JOIN", "SMdup0001").await;
    assert_eq!((s1, s2), (200, 200));
    assert_eq!(first, second);
    let sub = app.engine.store.subscriber(&phone).unwrap().unwrap();
    assert_eq!(sub.code_sends.len(), 1, "one JOIN, one code");

    // Answers that depend on the state: a second run would answer differently.
    let code = code_in(&app.twilio.last_to(ANN, 1).await);
    let (_, first) = app.sms_with_sid(ANN, &code, "SMdup0002").await;
    let (_, second) = app.sms_with_sid(ANN, &code, "SMdup0002").await;
    assert!(
        first.contains("Verified!</Message><Message>Name?"),
        "{first}"
    );
    assert_eq!(first, second);
    let (_, first) = app.sms_with_sid(ANN, "Ann", "SMdup0003").await;
    let (_, second) = app.sms_with_sid(ANN, "Ann", "SMdup0003").await;
    assert!(first.contains("Welcome Ann"), "{first}");
    assert_eq!(first, second);

    let records = history();
    let count = |f: fn(&smsflow::machine::Record) -> bool| records.iter().filter(|r| f(r)).count();
    assert_eq!(
        count(|r| matches!(r, smsflow::machine::Record::CodeSent)),
        1,
        "{records:?}"
    );
    assert_eq!(
        count(|r| matches!(r, smsflow::machine::Record::Verified { .. })),
        1,
        "{records:?}"
    );
    assert_eq!(
        count(|r| matches!(r, smsflow::machine::Record::FieldSaved { .. })),
        1,
        "{records:?}"
    );
    eventually("the outbox to empty", async || {
        app.engine.store.outbox_len() == 0
    })
    .await;
    assert_eq!(
        app.twilio
            .delivered()
            .iter()
            .filter(|r| r.body.contains(&code))
            .count(),
        1
    );
}

/// A retry is known by the number's last 4 answers: one after up to three more messages from
/// that number still gets its first answer and changes nothing; one after four more is a new
/// message. (`SmsSid`, the older name, stands in for a missing `MessageSid`.)
#[tokio::test]
async fn a_retry_is_known_behind_three_later_messages_but_not_behind_four() {
    let app = TestApp::spawn(FLOWS).await;
    let phone = smsflow::phone::Phone::parse(ANN).unwrap();
    let codes_sent = || {
        let sub = app.engine.store.subscriber(&phone).unwrap().unwrap();
        sub.code_sends.len()
    };
    let join = [
        ("From", ANN),
        ("To", FROM),
        ("Body", "JOIN"),
        ("SmsSid", "SMolder0001"),
    ];
    let first = app.post_form("/twilio/sms", &join).await;
    assert_eq!(first.status(), 200);
    let first = first.text().await.unwrap();
    assert_eq!(codes_sent(), 1);
    for sid in ["SMlater0002", "SMlater0003", "SMlater0004"] {
        assert_eq!(app.sms_with_sid(ANN, "HELP", sid).await.0, 200);
    }
    let again = app.post_form("/twilio/sms", &join).await;
    assert_eq!(again.text().await.unwrap(), first);
    assert_eq!(codes_sent(), 1, "a retry behind three later messages");
    assert_eq!(app.sms_with_sid(ANN, "HELP", "SMlater0005").await.0, 200);
    assert_eq!(app.post_form("/twilio/sms", &join).await.status(), 200);
    assert_eq!(codes_sent(), 2, "behind four, a new JOIN: a new code");
}

#[tokio::test]
async fn a_forged_or_missing_signature_is_refused_and_changes_nothing() {
    let app = TestApp::spawn(FLOWS).await;
    let form = [("From", ANN), ("Body", "JOIN"), ("MessageSid", "SMforged")];
    let forged = app
        .http
        .post(format!("{}/twilio/sms", app.base))
        .header("X-Twilio-Signature", "bm90IGEgcmVhbCBzaWduYXR1cmU=")
        .form(&form)
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status().as_u16(), 403);
    assert!(forged
        .text()
        .await
        .unwrap()
        .contains("invalid X-Twilio-Signature"));
    let missing = app
        .http
        .post(format!("{}/twilio/sms", app.base))
        .form(&form)
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status().as_u16(), 403);
    assert!(missing
        .text()
        .await
        .unwrap()
        .contains("missing X-Twilio-Signature"));
    // Signed for another URL:
    let owned: Vec<(String, String)> = form
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let other = smsflow::http::signature::sign(AUTH_TOKEN, "https://evil.test/twilio/sms", &owned);
    let wrong_url = app
        .http
        .post(format!("{}/twilio/sms", app.base))
        .header("X-Twilio-Signature", other)
        .form(&form)
        .send()
        .await
        .unwrap();
    assert_eq!(wrong_url.status().as_u16(), 403);

    assert_eq!(app.state_of(ANN), None, "no subscriber was created");
    app.outbox_settles().await;
    assert_eq!(app.twilio.attempts(), 0);
    // The same message, properly signed, now works (the forged one did not consume its id).
    let (status, _) = app.sms_with_sid(ANN, "JOIN", "SMforged").await;
    assert_eq!(status, 200);
    assert_eq!(app.state_of(ANN).as_deref(), Some("awaiting_code"));
}

#[tokio::test]
async fn without_an_auth_token_webhooks_are_taken_only_from_this_machine() {
    // Loopback, no public URL: a local request (curl, a test) is taken unsigned.
    let local = TestApp::spawn_with(FLOWS, |c| {
        c.auth_token = None;
        c.public_url = None;
    })
    .await;
    let form = [("From", ANN), ("Body", "JOIN"), ("MessageSid", "SMlocal")];
    let post = |app: &TestApp, path: &str, form: &[(&str, &str)], via: Option<&str>| {
        let mut req = app.http.post(format!("{}{path}", app.base)).form(form);
        if let Some(ip) = via {
            req = req.header("X-Forwarded-For", ip);
        }
        req.send()
    };
    // Through a tunnel, unsigned webhooks could say anything: refused, nothing changes.
    let tunnelled = post(&local, "/twilio/sms", &form, Some("203.0.113.9"))
        .await
        .unwrap();
    assert_eq!(tunnelled.status().as_u16(), 403);
    assert!(tunnelled
        .text()
        .await
        .unwrap()
        .contains("set TWILIO_AUTH_TOKEN"));
    assert_eq!(local.state_of(ANN), None);
    // Nor from a web page: another site's form posting here, or one whose domain was
    // pointed at 127.0.0.1.
    for (name, value) in [
        ("Origin", "https://evil.example"),
        ("Host", "rebind.example"),
    ] {
        let r = (local.http.post(format!("{}/twilio/sms", local.base)))
            .form(&form)
            .header(name, value)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 403, "{name}");
    }
    assert_eq!(local.state_of(ANN), None);
    let r = post(&local, "/twilio/sms", &form, None).await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(local.state_of(ANN).as_deref(), Some("awaiting_code"));
    // A forged "unsubscribed" report for a number it knows, through the tunnel: refused.
    let report = [
        ("MessageSid", "SMx"),
        ("MessageStatus", "failed"),
        ("ErrorCode", "21610"),
        ("To", ANN),
    ];
    let r = post(&local, "/twilio/status", &report, Some("203.0.113.9"))
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 403);
    assert_eq!(local.state_of(ANN).as_deref(), Some("awaiting_code"));

    // With a public URL smsflow is reachable from outside: no token, no unsigned webhooks,
    // not even without proxy headers.
    let public = TestApp::spawn_with(FLOWS, |c| c.auth_token = None).await;
    for (path, form) in [
        ("/twilio/sms", &form[..]),
        ("/twilio/voice", &[("From", ANN), ("CallSid", "CA1")][..]),
    ] {
        let r = post(&public, path, form, None).await.unwrap();
        assert_eq!(r.status().as_u16(), 403, "{path}");
        // It says what would let it in, not that the request came from elsewhere.
        let said = r.text().await.unwrap();
        assert!(
            said.starts_with("unsigned webhook refused: set TWILIO_AUTH_TOKEN")
                && said.contains("reachable from this machine alone"),
            "{said}"
        );
    }
    assert_eq!(public.state_of(ANN), None);
}

#[tokio::test]
async fn bad_input_gets_a_clear_status_and_changes_nothing() {
    let app = TestApp::spawn(FLOWS).await;
    let url = format!("{}/twilio/sms", app.base);

    let json = app
        .http
        .post(&url)
        .header("content-type", "application/json")
        .body(r#"{"From":"+15550001111"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(json.status().as_u16(), 400);
    assert!(json.text().await.unwrap().contains("expected a form body"));

    for (missing, params) in [
        ("From", vec![("Body", "JOIN"), ("MessageSid", "SM1")]),
        ("Body", vec![("From", ANN), ("MessageSid", "SM2")]),
        ("MessageSid", vec![("From", ANN), ("Body", "JOIN")]),
    ] {
        let r = app.post_form("/twilio/sms", &params).await;
        assert_eq!(r.status().as_u16(), 400, "missing {missing}");
        let body = r.text().await.unwrap();
        assert!(
            body.contains(&format!("missing form field {missing}")),
            "{body}"
        );
    }

    let r = app
        .post_form(
            "/twilio/sms",
            &[
                ("From", "not-a-phone"),
                ("Body", "JOIN"),
                ("MessageSid", "SM3"),
            ],
        )
        .await;
    assert_eq!(r.status().as_u16(), 400);
    assert!(r.text().await.unwrap().contains("From:"));
    // A long one is named, not echoed whole.
    let long = "1".repeat(30_000);
    let r = app
        .post_form(
            "/twilio/sms",
            &[("From", &long), ("Body", "JOIN"), ("MessageSid", "SM5")],
        )
        .await;
    assert_eq!(r.status().as_u16(), 400);
    let said = r.text().await.unwrap();
    assert!(said.contains("From:") && said.len() < 300, "{said}");
    let r = app.get(&format!("/{}", "a".repeat(5_000))).await;
    assert_eq!(r.status().as_u16(), 404);
    let said = r.text().await.unwrap();
    assert!(said.contains("no route") && said.len() < 300, "{said}");

    let huge = "x".repeat(70 * 1024);
    let r = app
        .post_form(
            "/twilio/sms",
            &[
                ("From", ANN),
                ("Body", huge.as_str()),
                ("MessageSid", "SM4"),
            ],
        )
        .await;
    assert_eq!(r.status().as_u16(), 413);
    assert!(r.text().await.unwrap().contains("over the 64 KiB limit"));

    // A wrong method says so, and which one to use.
    let r = app.get("/twilio/sms").await;
    assert_eq!(r.status().as_u16(), 405);
    assert_eq!(r.headers()["allow"], "POST");
    assert!(r.text().await.unwrap().contains("method not allowed"));

    let r = app.get("/no/such/route").await;
    assert_eq!(r.status().as_u16(), 404);
    // A webhook URL pasted with a slash at its end: the one meant is named.
    let r = app.post_form("/twilio/sms/", &[("From", ANN)]).await;
    assert_eq!(r.status().as_u16(), 404);
    let said = r.text().await.unwrap();
    assert!(said.contains("the route is /twilio/sms, without"), "{said}");
    let r = app.get("/healthz").await;
    assert_eq!(r.status().as_u16(), 200);

    assert_eq!(app.state_of(ANN), None, "bad input created no subscriber");
    app.outbox_settles().await;
    assert_eq!(app.twilio.attempts(), 0, "bad input sent nothing");
}

/// A form that decodes to what is not UTF-8, gives a field it reads twice, or comes under a
/// look-alike Content-Type is refused, named; so is a delivery report without a MessageSid
/// or whose status is no status word (it would reach the record and the log as it came).
/// None of them changes anything.
#[tokio::test]
async fn forms_that_decode_badly_or_give_a_field_twice_are_refused_and_change_nothing() {
    const FORM: &str = "application/x-www-form-urlencoded";
    let app = TestApp::spawn(FLOWS).await;
    for (body, content_type, says) in [
        (
            "From=%2B14155550100&Body=%FF%FE&MessageSid=SM1",
            FORM,
            "form field Body is not UTF-8 once decoded",
        ),
        (
            "From=%2B14155550100%FF&Body=JOIN&MessageSid=SM2",
            FORM,
            "form field From is not UTF-8 once decoded",
        ),
        (
            "From=%2B14155550100&From=%2B14155550101&Body=JOIN&MessageSid=SM3",
            FORM,
            "form field From is given twice",
        ),
        (
            "From=%2B14155550100&Body=JOIN&MessageSid=SM4",
            "application/x-www-form-urlencodedXYZ",
            "expected a form body",
        ),
    ] {
        let r = app
            .http
            .post(format!("{}/twilio/sms", app.base))
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 400, "{body}");
        let said = r.text().await.unwrap();
        assert!(said.contains(says), "{body}: {said}");
    }
    // Letters are not a keypad's digits.
    let vanity = [
        ("From", "+1555CALLNOW"),
        ("Body", "JOIN"),
        ("MessageSid", "SM5"),
    ];
    let r = app.post_form("/twilio/sms", &vanity).await;
    assert_eq!(r.status().as_u16(), 400);
    assert!(r.text().await.unwrap().contains("letters are not digits"));
    // Parameters after the type are fine.
    let only_from = [("From".to_string(), "+14155550100".to_string())];
    let sig =
        smsflow::http::signature::sign(AUTH_TOKEN, &format!("{PUBLIC_URL}/twilio/sms"), &only_from);
    let r = app
        .http
        .post(format!("{}/twilio/sms", app.base))
        .header(
            "content-type",
            "application/x-www-form-urlencoded; charset=utf-8",
        )
        .header("X-Twilio-Signature", sig)
        .body("From=%2B14155550100")
        .send()
        .await
        .unwrap();
    assert!(r.text().await.unwrap().contains("missing form field Body"));
    for (params, says) in [
        (
            vec![("MessageSid", ""), ("MessageStatus", "delivered")],
            "MessageSid is empty",
        ),
        (
            vec![("MessageSid", "SMx"), ("MessageStatus", "")],
            "is not a delivery status",
        ),
        (
            vec![
                ("MessageSid", "SMx"),
                (
                    "MessageStatus",
                    "delivered\n2026-11-23T19:10:00Z ERROR forged",
                ),
            ],
            "is not a delivery status",
        ),
        (
            vec![
                ("MessageSid", "SMx"),
                ("MessageStatus", "undelivered"),
                ("ErrorCode", "21610"),
                ("To", ANN),
                ("To", BOB),
            ],
            "form field To is given twice",
        ),
        // Twilio writes its codes in digits alone: a sign or a word is no code (`+21610`
        // must not opt anyone out), and one too large for any code is said so.
        (
            vec![
                ("MessageSid", "SMx"),
                ("MessageStatus", "undelivered"),
                ("ErrorCode", "+21610"),
                ("To", ANN),
            ],
            "ErrorCode \"+21610\" is not a number",
        ),
        (
            vec![
                ("MessageSid", "SMx"),
                ("MessageStatus", "undelivered"),
                ("ErrorCode", "021610"),
                ("To", ANN),
            ],
            "ErrorCode \"021610\" is not a number",
        ),
        (
            vec![
                ("MessageSid", "SMx"),
                ("MessageStatus", "failed"),
                ("ErrorCode", "4294967296"),
            ],
            "ErrorCode \"4294967296\" is out of range",
        ),
    ] {
        let r = app.post_form("/twilio/status", &params).await;
        assert_eq!(r.status().as_u16(), 400, "{params:?}");
        let said = r.text().await.unwrap();
        assert!(said.contains(says), "{params:?}: {said}");
    }
    assert_eq!(app.state_of("+14155550100"), None);
    assert_eq!(app.state_of(ANN), None);
    assert_eq!(app.engine.store.early_report_count(), 0);
    assert_eq!(app.engine.store.state_counts(), [0; 5], "no record made");
}

/// A request head (request line and headers) is read into at most 16 KiB: a longer one is
/// refused, 431, so clients that never finish theirs cannot hold much memory; a 64 KiB body
/// still streams through.
#[tokio::test]
async fn a_request_head_over_sixteen_kib_is_refused_and_a_whole_64_kib_body_still_goes_through() {
    let app = TestApp::spawn(FLOWS).await;
    let big = "x".repeat(smsflow::app::MAX_HEAD);
    let r = app
        .http
        .get(format!("{}/healthz", app.base))
        .header("x-padding", &big)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 431);
    let r = app
        .http
        .get(format!("{}/healthz", app.base))
        .header("x-padding", &big[..12 * 1024])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    // A text whose form is exactly 64 KiB is read whole (and answered).
    let fixed = "From=%2B14155550100&MessageSid=SMbig&Body=";
    let text = "a".repeat(64 * 1024 - fixed.len());
    let params = [
        ("From", "+14155550100"),
        ("MessageSid", "SMbig"),
        ("Body", &text),
    ];
    let sig = smsflow::http::signature::sign(
        AUTH_TOKEN,
        &format!("{PUBLIC_URL}/twilio/sms"),
        &params.map(|(k, v)| (k.to_string(), v.to_string())),
    );
    let r = app
        .http
        .post(format!("{}/twilio/sms", app.base))
        .header("content-type", "application/x-www-form-urlencoded")
        .header("X-Twilio-Signature", sig)
        .body(format!("{fixed}{text}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
}

#[tokio::test]
async fn after_a_restart_mid_sequence_the_remaining_steps_arrive_exactly_once() {
    // On a manual clock, kept across the restart: each step comes due when the test says.
    let app = TestApp::spawn_on_manual_clock(FLOWS).await;
    enrol(&app, ANN, 0).await;
    assert!(app.twilio.wait_delivered(1).await[0]
        .body
        .starts_with("Code: "));
    app.advance(Duration::from_secs(1));
    let got = app.twilio.wait_delivered(2).await;
    assert_eq!(got[1].body, "Step one");
    let (twilio, data, flows, options) = app.stop().await;
    assert_eq!(twilio.delivered().len(), 2, "stopped mid-sequence");
    // Down for longer than the next delay: "Step two" is overdue at start-up.
    options.clock.advance(Duration::from_secs(90)).unwrap();
    let app = TestApp::start(twilio, data, flows, options, |_| {}).await;
    let all = app.twilio.wait_delivered(3).await;
    assert_eq!(all[2].body, "Step two");
    // "Step three" is due a second after "Step two" fired, and the clock has not moved.
    eventually("Step two's send to be recorded", async || {
        app.engine.store.outbox_len() == 0
    })
    .await;
    assert_eq!(app.engine.store.timer_count(), 1, "Step three waits");
    assert_eq!(app.twilio.delivered().len(), 3);
    app.advance(Duration::from_secs(1));
    let all = app.twilio.wait_delivered(4).await;
    let bodies: Vec<&str> = all.iter().map(|r| r.body.as_str()).collect();
    assert_eq!(&bodies[1..], ["Step one", "Step two", "Step three"]);
    eventually("Step three's send to be recorded", async || {
        app.engine.store.outbox_len() == 0
    })
    .await;
    // Nothing is left that could send.
    assert_eq!(app.engine.store.timer_count(), 0);
    assert_eq!(app.twilio.delivered().len(), 4, "each step exactly once");
    assert_eq!(app.state_of(ANN).as_deref(), Some("verified"));
}

/// `smsflow serve` on Twilio (the fake) with the test flows, as an operator runs it.
async fn serve_on_twilio(
    twilio: &FakeTwilio,
    data: &std::path::Path,
    flows: &std::path::Path,
) -> (tokio::process::Child, String) {
    let (child, base, _) = spawn_serve(
        tokio::process::Command::new(env!("CARGO_BIN_EXE_smsflow"))
            .args(["serve", "--listen", "127.0.0.1:0", "--send-rate", "50"])
            .arg("--data")
            .arg(data)
            .arg("--flows")
            .arg(flows)
            .env("TWILIO_ACCOUNT_SID", ACCOUNT_SID)
            .env("TWILIO_AUTH_TOKEN", AUTH_TOKEN)
            .env("TWILIO_FROM", FROM)
            .env("TWILIO_API_BASE", &twilio.url)
            .env("SMSFLOW_PUBLIC_URL", PUBLIC_URL)
            .env("SMSFLOW_API_TOKEN", API_TOKEN)
            .env("SMSFLOW_ADMIN_TOKEN", ADMIN_TOKEN)
            .env_remove("TWILIO_MESSAGING_SERVICE_SID")
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true),
    )
    .await;
    (child, base)
}

/// A send cut off by a crash (Twilio may have taken it) counts as a try that may have sent
/// the message, on disk before it is made: a daemon that crashes again and again while Twilio
/// is slow to answer sends a message at most twice, not once per start.
#[tokio::test]
async fn a_daemon_that_crashes_mid_send_again_and_again_sends_a_message_at_most_twice() {
    let twilio = FakeTwilio::start().await;
    twilio.hold();
    let (data, flows) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    std::fs::write(flows.path().join("flows.toml"), FLOWS).unwrap();
    let (mut child, mut base) = serve_on_twilio(&twilio, data.path(), flows.path()).await;
    signed_sms(&base, ANN, "JOIN").await;
    for tries in 1..=2 {
        eventually("the code's send to reach Twilio", async || {
            twilio.held() == tries
        })
        .await;
        child.start_kill().unwrap();
        child.wait().await.unwrap();
        (child, base) = serve_on_twilio(&twilio, data.path(), flows.path()).await;
    }
    // The message ends (failed, saying why) without a third try.
    outbox_empties(&base, "the message to end").await;
    quiet_for(Duration::from_millis(500)).await;
    assert_eq!(twilio.held(), 2, "no third try");
    let record = reqwest::Client::new()
        .get(format!("{base}/admin/subscribers/%2B15550001111"))
        .bearer_auth(ADMIN_TOKEN);
    let record: serde_json::Value = record.send().await.unwrap().json().await.unwrap();
    let message = &record["messages"][0];
    assert_eq!(message["status"], "failed", "{record}");
    let error = message["error"].as_str().unwrap();
    assert!(error.starts_with("2 tries were cut off"), "{error}");
    assert!(!error.contains("  "), "{error}");
    twilio.release();
    drop(child);
}

/// Waits until the daemon at `base` has nothing queued to send (`/metrics`' outbox depth).
async fn outbox_empties(base: &str, what: &str) {
    let metrics = format!("{base}/metrics");
    eventually(what, async || {
        let scrape = reqwest::Client::new()
            .get(&metrics)
            .bearer_auth(ADMIN_TOKEN);
        let text = scrape.send().await.unwrap().text().await.unwrap();
        text.lines().any(|l| l == "smsflow_outbox_depth 0")
    })
    .await;
}

/// An app's `get_otp` for `phone`, with the API token.
async fn app_asks_a_code(base: &str, phone: &str) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{base}/authenticate/get_otp"))
        .bearer_auth(API_TOKEN)
        .json(&serde_json::json!({ "phone": phone }))
        .send()
        .await
        .unwrap()
}

/// A code the hourly cap refuses an app for a number never met leaves no record, but is
/// counted: the metric is where a flood of them shows. (A daemon of its own: exact counts.)
#[tokio::test]
async fn a_code_refused_a_never_met_number_by_the_hourly_cap_is_counted_though_not_kept() {
    let twilio = FakeTwilio::start().await;
    let (data, flows) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let capped = FLOWS.replace("[verify]\n", "[verify]\nmax_codes_per_hour = 1\n");
    std::fs::write(flows.path().join("flows.toml"), capped).unwrap();
    let (_child, base) = serve_on_twilio(&twilio, data.path(), flows.path()).await;
    let http = reqwest::Client::new();
    signed_sms(&base, ANN, "JOIN").await;
    let otp = app_asks_a_code(&base, BOB).await;
    assert_eq!(otp.status().as_u16(), 429);
    let admin = async |path: &str| {
        let r = http.get(format!("{base}{path}")).bearer_auth(ADMIN_TOKEN);
        r.send().await.unwrap()
    };
    let bob = format!("/admin/subscribers/{}", BOB.replace('+', "%2B"));
    assert_eq!(admin(&bob).await.status().as_u16(), 404);
    let metrics = admin("/metrics").await.text().await.unwrap();
    let refused = r#"smsflow_history_entries_total{kind="code_rate_limited"} 1"#;
    assert!(metrics.lines().any(|l| l == refused), "{metrics}");
}

/// The events an operator watches for have their counters, with help, from the start: every
/// code issued (by text or the OTP API), verifications, delivery reports by status, and the
/// routes' answers by status, a refused signature among them. (A daemon of its own, for a
/// recorder of its own: exact counts.)
#[tokio::test]
async fn codes_issued_reports_and_refused_signatures_are_counted_in_the_metrics() {
    let twilio = FakeTwilio::start().await;
    let (data, flows) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    std::fs::write(flows.path().join("flows.toml"), FLOWS).unwrap();
    let (_child, base) = serve_on_twilio(&twilio, data.path(), flows.path()).await;
    let http = reqwest::Client::new();
    let scrape = async || {
        let r = http.get(format!("{base}/metrics")).bearer_auth(ADMIN_TOKEN);
        r.send().await.unwrap().text().await.unwrap()
    };
    let value = |body: &str, series: &str| -> Option<f64> {
        (body.lines()).find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
    };
    let code_sent = r#"smsflow_history_entries_total{kind="code_sent"}"#;
    let before = scrape().await;
    for present in [
        "# HELP smsflow_history_entries_total",
        "# HELP smsflow_inbound_messages_total",
        "# HELP smsflow_outbound_messages_total",
    ] {
        assert!(before.contains(present), "no {present}:\n{before}");
    }
    for kind in ["code_sent", "verified", "opted_out", "code_rate_limited"] {
        let series = format!("smsflow_history_entries_total{{kind=\"{kind}\"}}");
        assert_eq!(value(&before, &series), Some(0.0), "{before}");
    }
    let locked = r#"smsflow_inbound_messages_total{outcome="locked"}"#;
    assert_eq!(value(&before, locked), Some(0.0), "{before}");

    signed_sms(&base, ANN, "JOIN").await;
    let code = code_in(&twilio.last_to(ANN, 1).await);
    signed_sms(&base, ANN, &code).await;
    let otp = app_asks_a_code(&base, BOB).await;
    assert_eq!(otp.status(), 200);
    for status in ["delivered", "teleported"] {
        let report = [("MessageSid", "SMreported"), ("MessageStatus", status)];
        let r = post_signed(&http, &base, "/twilio/status", &report).await;
        assert_eq!(r.status(), 204);
    }
    let forged = http
        .post(format!("{base}/twilio/sms"))
        .header("X-Twilio-Signature", "bm90IGEgcmVhbCBzaWduYXR1cmU=")
        .form(&[("From", BOB), ("Body", "JOIN"), ("MessageSid", "SMforged")])
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status(), 403);
    // Refused before the routes (declared over the limit): counted all the same. (A client
    // of its own: the daemon closes that connection, unread, and the scrape's must be whole.)
    let oversize = reqwest::Client::new()
        .post(format!("{base}/twilio/sms"))
        .header("Content-Type", "application/x-www-form-urlencoded")
        .body(vec![b'a'; 70_000])
        .send()
        .await
        .unwrap();
    assert_eq!(oversize.status(), 413);

    let after = scrape().await;
    openmetrics_parser::prometheus::parse_prometheus(&after)
        .unwrap_or_else(|e| panic!("not Prometheus text: {e:?}\n{after}"));
    assert!(
        after.contains("# HELP smsflow_webhook_duration_seconds"),
        "{after}"
    );
    for (series, n) in [
        // The JOIN's and the OTP API's.
        (code_sent, 2.0),
        (r#"smsflow_history_entries_total{kind="verified"}"#, 1.0),
        (
            r#"smsflow_inbound_messages_total{outcome="code_sent"}"#,
            1.0,
        ),
        (r#"smsflow_inbound_messages_total{outcome="verified"}"#, 1.0),
        (r#"smsflow_delivery_reports_total{status="delivered"}"#, 1.0),
        // A status no one knows is counted, but not by its name.
        (r#"smsflow_delivery_reports_total{status="other"}"#, 1.0),
        (
            r#"smsflow_http_responses_total{route="sms",status="200"}"#,
            2.0,
        ),
        (
            r#"smsflow_http_responses_total{route="sms",status="403"}"#,
            1.0,
        ),
        (
            r#"smsflow_http_responses_total{route="sms",status="413"}"#,
            1.0,
        ),
        (
            r#"smsflow_http_responses_total{route="status",status="204"}"#,
            2.0,
        ),
        (
            r#"smsflow_http_responses_total{route="get_otp",status="200"}"#,
            1.0,
        ),
    ] {
        assert_eq!(value(&after, series), Some(n), "{series}:\n{after}");
    }
    assert!(!after.contains("teleported"), "{after}");
}

/// Starts `serve` as `cmd` says; returns the child, its base URL (from the banner's first
/// line) and the rest of its stdout, line by line.
async fn spawn_serve(
    cmd: &mut tokio::process::Command,
) -> (
    tokio::process::Child,
    String,
    tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
) {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let mut child = cmd.stdout(std::process::Stdio::piped()).spawn().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next_line().await.unwrap().unwrap();
    assert!(
        first.starts_with("smsflow ") && first.contains("listening on http://127.0.0.1:"),
        "{first}"
    );
    let base = first.rsplit(' ').next().unwrap().to_string();
    (child, base, lines)
}

/// A signed inbound SMS to a daemon at `base`; returns its TwiML.
async fn signed_sms(base: &str, from: &str, body: &str) -> String {
    let sid = format!("SM{}", uuid_like());
    let form = [
        ("From", from),
        ("To", FROM),
        ("Body", body),
        ("MessageSid", &sid),
    ];
    let r = post_signed(&reqwest::Client::new(), base, "/twilio/sms", &form).await;
    assert_eq!(r.status().as_u16(), 200);
    r.text().await.unwrap()
}

#[tokio::test]
async fn after_a_crash_mid_sequence_the_remaining_steps_arrive_exactly_once() {
    let twilio = FakeTwilio::start().await;
    let (data, flows) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    // Steps two and three 2 s apart: room to kill it between one and two on a loaded machine.
    let wide = FLOWS
        .replace(
            r#"{ after = "1s", say = "Step two" }"#,
            r#"{ after = "2s", say = "Step two" }"#,
        )
        .replace(
            r#"{ after = "1s", say = "Step three" }"#,
            r#"{ after = "2s", say = "Step three" }"#,
        );
    assert_eq!(wide.matches(r#"after = "2s""#).count(), 2);
    std::fs::write(flows.path().join("flows.toml"), wide).unwrap();
    let (mut child, base) = serve_on_twilio(&twilio, data.path(), flows.path()).await;
    signed_sms(&base, ANN, "JOIN").await;
    let code = code_in(&twilio.last_to(ANN, 1).await);
    assert!(signed_sms(&base, ANN, &code).await.contains("Verified!"));
    assert!(signed_sms(&base, ANN, "Ann").await.contains("Welcome Ann"));
    let got = twilio.wait_delivered(2).await;
    assert_eq!(got[1].body, "Step one");
    // Killed outright (no flush, no goodbye) after Step one went out and before Step two is
    // due, two seconds after it; and after Step one's send is on record (a crash before that
    // sends it again: delivery is at least once). Its outbox entry is gone once recorded, and
    // a webhook's answer waits for a flush of everything before it.
    outbox_empties(&base, "Step one's send to be recorded").await;
    signed_sms(&base, BOB, "HELP").await;
    child.start_kill().unwrap();
    child.wait().await.unwrap();
    assert_eq!(twilio.delivered().len(), 2, "stopped mid-sequence");

    let (_child, _base) = serve_on_twilio(&twilio, data.path(), flows.path()).await;
    let all = twilio.wait_delivered(4).await;
    let bodies: Vec<&str> = all.iter().map(|r| r.body.as_str()).collect();
    assert_eq!(&bodies[1..], ["Step one", "Step two", "Step three"]);
    quiet_for(Duration::from_millis(1500)).await;
    assert_eq!(twilio.delivered().len(), 4, "each step exactly once");
}

const BURST: &str = r#"
[bot]
name = "Burst"
[verify]
send = "Code: {code}"
[[sequence]]
name = "burst"
steps = [
  { after = "1s", say = "one" },
  { after = "0s", say = "two" },
  { after = "0s", say = "three" },
]
"#;

#[tokio::test]
async fn after_an_outage_every_queued_message_is_delivered_once_in_order_per_number() {
    let app = TestApp::spawn(BURST).await;
    let phones = [ANN, BOB, "+15550003333"];
    for p in phones {
        app.sms(p, "JOIN").await;
    }
    app.twilio.wait_delivered(3).await;
    // The sequences start a second after each number verifies: Twilio fails for a while
    // from before the first of them.
    app.twilio
        .fail_next(&[503, 503, 503, 503, 429, 429, 429, 429]);
    for p in phones {
        let code = code_in(&app.twilio.last_to(p, 3).await);
        let (_, twiml) = app.sms(p, &code).await;
        assert!(twiml.contains("verified"), "{twiml}");
    }
    let all = app.twilio.wait_delivered(3 + 9).await;
    quiet_for(Duration::from_millis(500)).await;
    let all_now = app.twilio.delivered();
    assert_eq!(all_now.len(), all.len(), "nothing delivered twice");
    assert!(
        app.twilio.attempts() >= 12 + 8,
        "the failures were really answered"
    );
    for p in phones {
        let bodies: Vec<&str> = all_now
            .iter()
            .filter(|r| r.to == p && !r.body.starts_with("Code"))
            .map(|r| r.body.as_str())
            .collect();
        assert_eq!(bodies, ["one", "two", "three"], "in order for {p}");
    }
}

/// A 429 with a Retry-After is Twilio saying the account sends too much at once, not that
/// one message is wrong: no send starts, for anyone, until the time it gave has passed.
#[tokio::test]
async fn a_retry_after_from_twilio_holds_every_send_not_only_the_refused_one() {
    let app = TestApp::spawn(FLOWS).await;
    app.twilio.busy_next(2);
    app.sms(ANN, "JOIN").await;
    // The 429 is answered, and recorded: the hold is set by then.
    eventually("the 429 to be recorded", async || {
        (app.engine.store.outbox()).any(|m| m.is_ok_and(|(_, m)| m.last_error.is_some()))
    })
    .await;
    let busy_at = std::time::Instant::now();
    app.sms(BOB, "JOIN").await;
    let first = app.twilio.wait_delivered(1).await;
    assert!(
        busy_at.elapsed() >= Duration::from_millis(1500),
        "{:?} after the 429: {first:#?}",
        busy_at.elapsed()
    );
    let both = app.twilio.wait_delivered(2).await;
    let mut to: Vec<&str> = both.iter().map(|r| r.to.as_str()).collect();
    to.sort();
    assert_eq!(to, [ANN, BOB]);
}

/// Twilio's 21611 (the sender's queue there holds more than 10 hours of messages) drains
/// by itself, and a refused sender of ours (21212, 21601, 21661, 21701, 21705) is its
/// configuration's fault: the message is tried again, not failed (nor its code withdrawn).
#[tokio::test]
async fn a_message_twilio_refuses_for_its_sender_not_itself_is_tried_again() {
    for refusal in [21611, 21212, 21601, 21661, 21701, 21705] {
        let app = TestApp::spawn(FLOWS).await;
        app.twilio.refuse_next(refusal);
        app.sms(ANN, "JOIN").await;
        let sent = app.twilio.wait_delivered(1).await;
        assert_eq!(
            app.twilio.attempts(),
            2,
            "{refusal}: refused once, then taken"
        );
        let (_, twiml) = app.sms(ANN, &code_in(&sent[0].body)).await;
        assert!(twiml.contains("Verified!"), "{refusal}: {twiml}");
    }
}

#[tokio::test]
async fn messages_queued_before_a_stop_are_not_sent_after_the_number_opts_back_in() {
    let app = TestApp::spawn(FLOWS).await;
    app.twilio.hold();
    app.sms(ANN, "JOIN").await;
    // The first code is in flight (held at Twilio): nothing can call it back any more.
    eventually("the first code to reach Twilio", async || {
        app.twilio.held() == 1
    })
    .await;
    app.sms(ANN, "JOIN").await;
    app.sms(ANN, "STOP").await;
    let (_, twiml) = app.sms(ANN, "START").await;
    assert_eq!(
        app.state_of(ANN).as_deref(),
        Some("awaiting_code"),
        "{twiml}"
    );
    app.twilio.release();
    eventually("the outbox to empty", async || {
        app.engine.store.outbox_len() == 0
    })
    .await;
    // The code queued before STOP was not sent; the one queued after START was.
    let delivered = app.twilio.delivered();
    assert_eq!(delivered.len(), 2, "{delivered:#?}");
    let (_, twiml) = app.sms(ANN, &code_in(&delivered[1].body)).await;
    assert!(twiml.contains("Verified!"), "{twiml}");
}

#[tokio::test]
async fn twilio_reporting_21610_opts_the_number_out() {
    let app = TestApp::spawn(FLOWS).await;
    enrol(&app, ANN, 0).await;
    // Twilio refuses the next send: the number has unsubscribed at the carrier.
    app.twilio.unsubscribe(ANN);
    for _ in 0..100 {
        if app.state_of(ANN).as_deref() == Some("opted_out") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(app.state_of(ANN).as_deref(), Some("opted_out"));

    // A delivery report with 21610 does the same for another number.
    enrol(&app, BOB, 1).await;
    let r = app
        .post_form(
            "/twilio/status",
            &[
                ("MessageSid", "SMunknown"),
                ("MessageStatus", "undelivered"),
                ("ErrorCode", "21610"),
                ("To", BOB),
            ],
        )
        .await;
    assert_eq!(r.status().as_u16(), 204);
    assert_eq!(app.state_of(BOB).as_deref(), Some("opted_out"));

    // One for a number smsflow does not know (erased since, or never met) brings nothing
    // back: an erased number stays erased.
    let erased = "+15550003333";
    enrol(&app, erased, 2).await;
    let path = format!("/admin/subscribers/{}", erased.replace('+', "%2B"));
    let gone = app.admin_status(reqwest::Method::DELETE, &path).await;
    assert!(gone.is_success(), "{gone}");
    let r = app
        .post_form(
            "/twilio/status",
            &[
                ("MessageSid", "SMlate"),
                ("MessageStatus", "undelivered"),
                ("ErrorCode", "21610"),
                ("To", erased),
            ],
        )
        .await;
    assert_eq!(r.status().as_u16(), 204);
    assert_eq!(app.state_of(erased), None);
    assert_eq!(
        app.admin_status(reqwest::Method::GET, &path).await.as_u16(),
        404
    );
}

/// Twilio may send a report twice, and a captured one can be replayed: the same 21610 report
/// again, after the number texted START, leaves it opted in (it opted it out again for good).
#[tokio::test]
async fn a_repeated_21610_report_does_not_opt_out_a_number_that_opted_back_in() {
    let app = TestApp::spawn(FLOWS).await;
    app.sms(ANN, "JOIN").await;
    // The fake numbers its messages: the code's is the first.
    let sid = format!("SM{:032}", 1);
    eventually("the code's delivery record", async || {
        matches!(app.engine.store.delivery_by_sid(&sid), Ok(Some(_)))
    })
    .await;
    let report = async |status: &str| report_21610(&app, &sid, status).await;
    assert_eq!(report("undelivered").await, 204);
    assert_eq!(app.state_of(ANN).as_deref(), Some("opted_out"));
    app.sms(ANN, "START").await;
    assert_eq!(app.state_of(ANN).as_deref(), Some("awaiting_code"));
    // Again, or with the other failed status.
    for status in ["undelivered", "failed"] {
        assert_eq!(report(status).await, 204);
        assert_eq!(
            app.state_of(ANN).as_deref(),
            Some("awaiting_code"),
            "{status}"
        );
    }
}

/// Twilio's delivery report of message `sid` with `status` and error 21610 (unsubscribed):
/// the answer's status.
async fn report_21610(app: &TestApp, sid: &str, status: &str) -> u16 {
    let form = [
        ("MessageSid", sid),
        ("MessageStatus", status),
        ("ErrorCode", "21610"),
    ];
    app.post_form("/twilio/status", &form)
        .await
        .status()
        .as_u16()
}

/// A first 21610 report of a message sent before the number texted STOP and then START
/// comes from the block START lifted: it leaves the number opted in. One of a message sent
/// after the START opts it out.
#[tokio::test]
async fn a_late_21610_report_of_a_message_from_before_stop_and_start_leaves_the_number_in() {
    let app = TestApp::spawn(FLOWS).await;
    app.sms(ANN, "JOIN").await;
    // The fake numbers its messages: the code's is the first.
    let sid = |n: u32| format!("SM{n:032}");
    app.twilio.wait_delivered(1).await;
    app.sms(ANN, "STOP").await;
    app.sms(ANN, "START").await;
    app.twilio.wait_delivered(2).await;
    eventually("the new code's delivery record", async || {
        matches!(app.engine.store.delivery_by_sid(&sid(2)), Ok(Some(_)))
    })
    .await;
    let report = async |sid: &str| report_21610(&app, sid, "undelivered").await;
    assert_eq!(report(&sid(1)).await, 204);
    assert_eq!(app.state_of(ANN).as_deref(), Some("awaiting_code"));
    assert_eq!(report(&sid(2)).await, 204);
    assert_eq!(app.state_of(ANN).as_deref(), Some("opted_out"));
}

/// The request we send matches Twilio's own OpenAPI description of `Messages.json`
/// (tests/fixtures/twilio_messages_api.json, a copy of ../shared/twilio/messages_api.json).
#[tokio::test]
async fn what_we_send_to_twilio_matches_its_openapi_spec() {
    let spec: serde_json::Value =
        serde_json::from_str(include_str!("../fixtures/twilio_messages_api.json")).unwrap();
    let post = &spec["paths"]["/2010-04-01/Accounts/{AccountSid}/Messages.json"]["post"];
    let schema = &post["requestBody"]["content"]["application/x-www-form-urlencoded"]["schema"];
    let known: Vec<&str> = schema["properties"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    let required: Vec<&str> = schema["required"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    let created = &post["responses"]["201"]["content"]["application/json"]["schema"];
    let created_ref = created["$ref"]
        .as_str()
        .unwrap()
        .rsplit('/')
        .next()
        .unwrap();
    let response_props = &spec["components"]["schemas"][created_ref]["properties"];
    assert!(
        response_props.get("sid").is_some(),
        "we read `sid` from the 201 answer"
    );

    let app = TestApp::spawn(FLOWS).await;
    app.sms(ANN, "JOIN").await;
    let sent = app.twilio.wait_delivered(1).await;
    let params = &sent[0].params;
    for p in params {
        assert!(
            known.contains(&p.as_str()),
            "{p} is not a Messages.json parameter"
        );
    }
    for r in required {
        assert!(params.iter().any(|p| p == r), "required {r} missing");
    }
    assert!(
        params
            .iter()
            .any(|p| p == "From" || p == "MessagingServiceSid"),
        "a sender"
    );
    assert!(params.iter().any(|p| p == "Body"));
    let e164 = regex::Regex::new(r"^\+[1-9]\d{7,14}$").unwrap();
    assert!(e164.is_match(&sent[0].to) && e164.is_match(&sent[0].from));
    // A code goes with its life left (10 minutes), which Twilio takes as whole seconds from
    // 1 to 36,000: it drops the code rather than deliver it expired.
    assert_eq!(schema["properties"]["ValidityPeriod"]["type"], "integer");
    let validity: u64 = sent[0].validity.as_deref().unwrap().parse().unwrap();
    assert!((590..=600).contains(&validity), "{validity}");
    // A step of a sequence has no such end.
    let (_, twiml) = app.sms(ANN, &code_in(&sent[0].body)).await;
    assert!(twiml.contains("Verified!"), "{twiml}");
    app.sms(ANN, "Ann").await;
    let sent = app.twilio.wait_delivered(2).await;
    assert_eq!(sent[1].body, "Step one");
    assert_eq!(sent[1].validity, None);
}

/// A connection to `base` that sends half a request head, then nothing.
async fn half_a_request(base: &str) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let mut stalled = tokio::net::TcpStream::connect(base.trim_start_matches("http://"))
        .await
        .unwrap();
    stalled
        .write_all(b"POST /twilio/sms HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    stalled
}

/// Ann's code asked for through the OTP API, in the background: its answer's status.
fn code_request(app: &TestApp) -> tokio::task::JoinHandle<u16> {
    let (http, url, token) = (
        app.http.clone(),
        format!("{}/authenticate/get_otp", app.base),
        app.api_token.clone().unwrap(),
    );
    tokio::spawn(async move {
        let r = http
            .post(url)
            .bearer_auth(token)
            .json(&serde_json::json!({ "phone": ANN }))
            .send()
            .await
            .unwrap();
        r.status().as_u16()
    })
}

/// A stop lets a request under way finish, but a client that opened a connection and never
/// finished its request does not hold the stop past the grace period.
#[tokio::test]
async fn a_stop_answers_requests_under_way_and_does_not_wait_for_ever_on_a_stalled_client() {
    let app =
        TestApp::spawn_with_options(FLOWS, |o| o.shutdown_grace = Duration::from_secs(2)).await;
    let stalled = half_a_request(&app.base).await;
    // A code request waits on Twilio's answer while the stop begins.
    app.twilio.hold();
    let under_way = code_request(&app);
    for _ in 0..200 {
        if app.twilio.held() > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(app.twilio.held(), 1, "the code's send is under way");
    let (twilio, addr) = (
        app.twilio.clone(),
        app.base.trim_start_matches("http://").to_string(),
    );
    let stopping = tokio::spawn(app.stop());
    // The stop has begun once the daemon takes no new connection.
    eventually("the listener to close", async || {
        tokio::net::TcpStream::connect(&addr).await.is_err()
    })
    .await;
    twilio.release();
    assert_eq!(under_way.await.unwrap(), 200, "answered during the stop");
    tokio::time::timeout(Duration::from_secs(10), stopping)
        .await
        .expect("the stop ends after the grace period")
        .unwrap();
    drop(stalled);
}

/// A client that connects and never finishes its request head is cut off after the header
/// read timeout, and the daemon serves others meanwhile.
#[tokio::test]
async fn a_connection_that_never_finishes_its_request_head_is_closed() {
    use tokio::io::AsyncReadExt;
    let app = TestApp::spawn_with_options(FLOWS, |o| {
        o.header_read_timeout = Duration::from_millis(300)
    })
    .await;
    let mut stalled = half_a_request(&app.base).await;
    assert_eq!(app.get("/healthz").await.status().as_u16(), 200);
    let mut rest = Vec::new();
    // Closed (a reset counts), whether with a last word (hyper may answer 408) or none.
    let _ = tokio::time::timeout(Duration::from_secs(10), stalled.read_to_end(&mut rest))
        .await
        .expect("the daemon closes the connection");
    assert!(
        rest.is_empty() || String::from_utf8_lossy(&rest).starts_with("HTTP/1.1 408"),
        "{}",
        String::from_utf8_lossy(&rest)
    );
    app.stop().await;
}

/// A connection that has sent a whole `GET /healthz`, asking to close after its answer.
async fn healthz_raw(base: &str) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let mut stream = tokio::net::TcpStream::connect(base.trim_start_matches("http://"))
        .await
        .unwrap();
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    stream
}

/// Reads until the daemon closes `stream`, for at most `within`: the bytes, or `None` if it
/// was still open then.
async fn read_until_closed(stream: &mut tokio::net::TcpStream, within: Duration) -> Option<String> {
    use tokio::io::AsyncReadExt;
    let mut answer = Vec::new();
    match tokio::time::timeout(within, stream.read_to_end(&mut answer)).await {
        // Closed, with or without a word (a reset counts).
        Ok(_) => Some(String::from_utf8_lossy(&answer).into_owned()),
        Err(_) => None,
    }
}

/// Clients holding connections open cannot take every file descriptor, nor keep a webhook
/// waiting: past the limit, the connection idle longest is closed to make room.
#[tokio::test]
async fn past_the_connection_limit_the_connection_idle_longest_is_closed_to_make_room() {
    let app = TestApp::spawn_with_options(FLOWS, |o| o.max_connections = Some(2)).await;
    let mut first = half_a_request(&app.base).await;
    // Accepted in order: the first has been idle longer.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut second = half_a_request(&app.base).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut third = healthz_raw(&app.base).await;
    let answer = read_until_closed(&mut third, Duration::from_secs(10))
        .await
        .expect("served at once");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        read_until_closed(&mut first, Duration::from_secs(1))
            .await
            .is_some(),
        "the one idle longest is closed"
    );
    assert_eq!(
        read_until_closed(&mut second, Duration::from_millis(300)).await,
        None,
        "the other is left open"
    );
    // (Else the stop would wait its grace period for it.)
    drop(second);
    app.stop().await;
}

/// A request whose body is still arriving has not been acted on: past the connection limit,
/// its connection may be closed to make room (a client sending bodies a byte at a time
/// cannot keep a webhook waiting either).
#[tokio::test]
async fn past_the_connection_limit_a_request_whose_body_is_still_arriving_is_closed() {
    use tokio::io::AsyncWriteExt;
    let app = TestApp::spawn_with_options(FLOWS, |o| {
        o.max_connections = Some(1);
        o.body_timeout = Duration::from_secs(60);
    })
    .await;
    let slow = tokio::net::TcpStream::connect(app.base.trim_start_matches("http://"))
        .await
        .unwrap();
    let (mut slow_read, mut slow_write) = slow.into_split();
    slow_write
        .write_all(b"POST /twilio/sms HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 100\r\n\r\nFrom=")
        .await
        .unwrap();
    let trickle = tokio::spawn(async move {
        for _ in 0..100 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if slow_write.write_all(b"1").await.is_err() {
                return;
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut waiting = healthz_raw(&app.base).await;
    let answer = read_until_closed(&mut waiting, Duration::from_secs(5))
        .await
        .expect("served, the slow body's connection closed to make room");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    {
        use tokio::io::AsyncReadExt;
        let mut rest = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(2), slow_read.read_to_end(&mut rest));
        assert!(closed.await.is_ok(), "the slow body's connection is closed");
    }
    trickle.abort();
    app.stop().await;
}

/// A client that sends requests and never reads the answers cannot hold its connection (and
/// its place at the connection limit) for ever: once an answer has waited for it that long,
/// the connection is closed, and a waiting client is served.
#[tokio::test]
async fn a_connection_whose_client_never_reads_its_answers_is_closed() {
    use tokio::io::AsyncWriteExt;
    let app = TestApp::spawn_with_options(FLOWS, |o| {
        o.max_connections = Some(1);
        o.write_stall_timeout = Duration::from_secs(1);
    })
    .await;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let addr = app.base.trim_start_matches("http://").parse().unwrap();
    let stuck = socket.connect(addr).await.unwrap();
    let (_never_read, mut write) = stuck.into_split();
    // Requests enough to fill both sockets' buffers with answers: the daemon's writes wait.
    let flood = tokio::spawn(async move {
        let request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n".repeat(1000);
        for _ in 0..400 {
            if write.write_all(&request).await.is_err() {
                return;
            }
        }
    });
    // (Filling them takes a while; a connection asked to close before it is stuck closes
    // at once, and the test proves nothing then, but passes.)
    tokio::time::sleep(Duration::from_millis(3000)).await;
    let mut waiting = healthz_raw(&app.base).await;
    let answer = read_until_closed(&mut waiting, Duration::from_secs(10))
        .await
        .expect("served once the stuck connection is closed");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    flood.abort();
    app.stop().await;
}

/// A connection with a request under way is never the one closed: with every connection
/// busy a new one waits, and is served once an answer is sent.
#[tokio::test]
async fn past_the_connection_limit_a_connection_with_a_request_under_way_is_not_closed() {
    let app = TestApp::spawn_with_options(FLOWS, |o| o.max_connections = Some(1)).await;
    // A code request waits on Twilio's answer.
    app.twilio.hold();
    let under_way = code_request(&app);
    eventually("the code's send to be under way", async || {
        app.twilio.held() == 1
    })
    .await;
    let mut waiting = healthz_raw(&app.base).await;
    assert_eq!(
        read_until_closed(&mut waiting, Duration::from_millis(1500)).await,
        None,
        "served past the limit while the only connection was busy"
    );
    app.twilio.release();
    assert_eq!(
        under_way.await.unwrap(),
        200,
        "the request under way is answered"
    );
    let answer = read_until_closed(&mut waiting, Duration::from_secs(10))
        .await
        .expect("served once the other connection was idle");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    app.stop().await;
}

/// `smsflow serve` started as a user starts it: the child, its base URL (from its first line),
/// and the rest of its stdout and its stderr, line by line.
async fn serve_child(
    data: &std::path::Path,
) -> (
    tokio::process::Child,
    String,
    tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
    tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStderr>>,
) {
    serve_child_with(data, std::path::Path::new("flows"), |_| {}).await
}

/// Like [`serve_child`], with the command adjusted last (more flags, other variables).
async fn serve_child_with(
    data: &std::path::Path,
    flows: &std::path::Path,
    adjust: impl FnOnce(&mut tokio::process::Command),
) -> (
    tokio::process::Child,
    String,
    tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
    tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStderr>>,
) {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_smsflow"));
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--flows"])
        .arg(flows)
        .arg("--data")
        .arg(data)
        .env_remove("TWILIO_ACCOUNT_SID")
        .env_remove("TWILIO_AUTH_TOKEN")
        .env_remove("SMSFLOW_ADMIN_TOKEN")
        .env_remove("SMSFLOW_PUBLIC_URL")
        // Blank is unset, like every variable: the default `info` logs (the stop's tests
        // read them).
        .env("SMSFLOW_LOG", "")
        .env_remove("RUST_LOG")
        .stderr(std::process::Stdio::piped());
    adjust(&mut cmd);
    let (mut child, base, lines) = spawn_serve(&mut cmd).await;
    let stderr = BufReader::new(child.stderr.take().unwrap()).lines();
    (child, base, lines, stderr)
}

/// Sends SIGTERM through the shell's own `kill` (every POSIX sh has one; a `kill` program
/// may not be installed).
fn sigterm(child: &tokio::process::Child) {
    send_signal(child, "TERM");
}

/// Sends the signal named (`TERM`, `HUP`) as [`sigterm`] does.
fn send_signal(child: &tokio::process::Child, name: &str) {
    let pid = child.id().unwrap();
    let killed = std::process::Command::new("sh")
        .args(["-c", &format!("kill -{name} {pid}")])
        .status()
        .unwrap();
    assert!(killed.success());
}

/// Waits (at most `within`) for the child to exit 0 and to say it stopped cleanly; returns
/// the rest of its stderr.
async fn exits_cleanly(
    mut child: tokio::process::Child,
    mut stderr: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStderr>>,
    within: Duration,
) -> Vec<String> {
    let status = tokio::time::timeout(within, child.wait())
        .await
        .expect("exits in time")
        .unwrap();
    assert_eq!(status.code(), Some(0));
    let mut rest = Vec::new();
    while let Some(line) = stderr.next_line().await.unwrap() {
        rest.push(line);
    }
    assert!(
        rest.iter().any(|l| l.contains("stopped cleanly")),
        "{rest:?}"
    );
    rest
}

/// A flow file deleted while the daemon runs takes its tables with it: that passes `check`
/// (each has defaults), so the reload goes live, and the log warns which file is gone.
#[tokio::test]
async fn a_flow_file_deleted_while_serving_goes_live_with_a_warning_that_names_it() {
    let (data, flows) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    std::fs::write(flows.path().join("flows.toml"), FLOWS).unwrap();
    let replies = flows.path().join("replies.toml");
    std::fs::write(&replies, "[replies]\nhelp = \"Our own help.\"\n").unwrap();
    let (child, base, _lines, mut stderr) =
        serve_child_with(data.path(), flows.path(), |_| {}).await;
    // (Signed, though this daemon has no token to check it with: the helper's form.)
    let help = async || signed_sms(&base, ANN, "HELP").await;
    assert!(help().await.contains("Our own help."));
    std::fs::remove_file(&replies).unwrap();
    let warned = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(line) = stderr.next_line().await.unwrap() {
            if line.contains("WARN") && line.contains("the flows now live have no") {
                return line;
            }
        }
        panic!("stderr ended without the warning");
    })
    .await
    .expect("the warning in time");
    assert!(warned.contains("replies.toml"), "{warned}");
    assert!(!help().await.contains("Our own help."));
    sigterm(&child);
    exits_cleanly(child, stderr, Duration::from_secs(10)).await;
}

/// A reload that renames a form field goes live (its answers stay in the records), but the
/// log says the old field's answers left the export; and what `check` warns of is logged.
#[tokio::test]
async fn a_reload_that_drops_a_field_or_uses_one_too_early_goes_live_with_warnings() {
    let (data, flows) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    std::fs::write(flows.path().join("flows.toml"), FLOWS).unwrap();
    let (child, base, _lines, mut stderr) =
        serve_child_with(data.path(), flows.path(), |_| {}).await;
    let renamed = FLOWS.replace("first_name", "name")
        + "\n[replies]\nhelp = \"Hi {field.name}, reply STOP to stop.\"\n";
    // (Renamed, the field is also one the form asks anew.)
    std::fs::write(flows.path().join("flows.toml"), renamed).unwrap();
    let mut warned = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), async {
        while warned.len() < 3 {
            let line = stderr.next_line().await.unwrap().expect("stderr goes on");
            if line.contains("WARN")
                && (line.contains("no longer declare the field(s) first_name")
                    || line.contains("the form now asks name as well")
                    || line.contains("replies.help: {field.name} may have no answer yet"))
            {
                warned.push(line);
            }
        }
    })
    .await
    .expect("the warnings in time");
    assert!(
        warned.iter().any(|l| l.contains("not in the export")),
        "{warned:?}"
    );
    assert!(signed_sms(&base, ANN, "HELP")
        .await
        .contains("Hi , reply STOP"));
    sigterm(&child);
    exits_cleanly(child, stderr, Duration::from_secs(10)).await;
}

/// The same edit made while the daemon is stopped is warned of at the next start.
#[tokio::test]
async fn a_start_after_an_edit_that_drops_a_field_warns_as_a_reload_does() {
    let (data, flows) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    std::fs::write(flows.path().join("flows.toml"), FLOWS).unwrap();
    let (child, _base, _lines, stderr) = serve_child_with(data.path(), flows.path(), |_| {}).await;
    sigterm(&child);
    let first = exits_cleanly(child, stderr, Duration::from_secs(10)).await;
    assert!(
        !first.iter().any(|l| l.contains("no longer declare")),
        "{first:?}"
    );
    std::fs::write(
        flows.path().join("flows.toml"),
        FLOWS.replace("first_name", "name"),
    )
    .unwrap();
    let (child, _base, _lines, stderr) = serve_child_with(data.path(), flows.path(), |_| {}).await;
    sigterm(&child);
    let lines = exits_cleanly(child, stderr, Duration::from_secs(10)).await;
    let warned = |what: &str| {
        lines
            .iter()
            .any(|l| l.contains("WARN") && l.contains("start") && l.contains(what))
    };
    assert!(
        warned("no longer declare the field(s) first_name") && warned("the form now asks name"),
        "{lines:?}"
    );
}

/// A disk that fails under a running daemon (here the file size limit, which fails sled's
/// writes as a full disk does): sled fails every change after its first failed write, even
/// once space is back, so the daemon stops with exit 3 naming the cause instead of answering
/// 500 for ever; a start on the same data dir has every number it answered 200.
#[tokio::test]
async fn a_daemon_whose_disk_fails_exits_3_and_a_restart_has_all_it_answered() {
    let (data, flows) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    std::fs::write(flows.path().join("flows.toml"), FLOWS).unwrap();
    let (child, base, _lines, mut stderr) = serve_child_with(data.path(), flows.path(), |cmd| {
        // A write past the limit then fails (EFBIG) instead of killing the process.
        // SAFETY: `signal` is async-signal-safe, as `pre_exec` requires.
        unsafe {
            cmd.pre_exec(|| {
                libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
                Ok(())
            });
        }
    })
    .await;
    signed_sms(&base, ANN, "JOIN").await;
    let size = std::fs::metadata(data.path().join("db")).unwrap().len();
    let pid = child.id().unwrap() as i32;
    rlimit::prlimit(
        pid,
        rlimit::Resource::FSIZE,
        Some((size, rlimit::INFINITY)),
        None,
    )
    .unwrap();
    let http = reqwest::Client::new();
    let mut answered = vec![ANN.to_string()];
    let mut refused = None;
    for i in 0..200 {
        let phone = format!("+1555000{:04}", 3000 + i);
        let form = [
            ("From", phone.as_str()),
            ("To", FROM),
            ("Body", "JOIN"),
            ("MessageSid", &format!("SM{}", uuid_like())),
        ];
        // (No token: unsigned.) sled's own background flush may meet the limit first, and
        // the daemon is then closing: a refused connection is a refusal too.
        let sent = http
            .post(format!("{base}/twilio/sms"))
            .form(&form)
            .send()
            .await;
        match sent.map(|r| r.status().as_u16()) {
            Ok(200) => answered.push(phone),
            other => {
                refused = Some(other.map_err(|e| e.to_string()));
                break;
            }
        }
    }
    assert!(
        matches!(refused, Some(Ok(500) | Err(_))),
        "a change fails once the disk does: {refused:?}"
    );
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait_with_output())
        .await
        .expect("stops in time")
        .unwrap()
        .status;
    assert_eq!(status.code(), Some(3));
    let mut said = Vec::new();
    while let Some(line) = stderr.next_line().await.unwrap() {
        said.push(line);
    }
    // (Not always the last line: sled's own flusher thread may log its failure after it.)
    assert!(
        said.iter().any(|l| l.contains("the store in")
            && l.contains("File too large")
            && l.contains("start smsflow again")),
        "{said:?}"
    );
    let (child, base, _lines, stderr) = serve_child_with(data.path(), flows.path(), |_| {}).await;
    for phone in &answered {
        let r = http
            .get(format!("{base}/admin/subscribers/{phone}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{phone} is kept");
        let record: serde_json::Value = r.json().await.unwrap();
        assert_eq!(record["state"], "awaiting_code", "{phone}");
    }
    sigterm(&child);
    exits_cleanly(child, stderr, Duration::from_secs(10)).await;
}

/// A log filter that is no level (`warning`) names a target no line comes from: it would
/// hide every line, warnings included, so it is ignored, and said to be; one that also names
/// what logs is kept, and the unknown target said.
#[tokio::test]
async fn a_misspelt_log_level_is_ignored_with_a_warning_instead_of_hiding_every_line() {
    use std::os::unix::fs::PermissionsExt;
    for (filter, said) in [
        ("warning", "ignoring SMSFLOW_LOG=\"warning\""),
        ("warn,smsfow=debug", "no log line comes from `smsfow`"),
        ("smsflow=warn", ""),
        // A target matches lines whose target starts with it, as text.
        ("sms=debug", ""),
    ] {
        let data = tempfile::tempdir().unwrap();
        // Read by others: warned about at start.
        std::fs::set_permissions(data.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let (child, _base, _lines, stderr) =
            serve_child_with(data.path(), std::path::Path::new("flows"), |cmd| {
                cmd.env("SMSFLOW_LOG", filter);
            })
            .await;
        sigterm(&child);
        let log = exits_cleanly(child, stderr, Duration::from_secs(10)).await;
        let warned = |what: &str| log.iter().any(|l| l.contains(what));
        if said.is_empty() {
            assert!(!warned("no log line comes from"), "{filter}: {log:?}");
        } else {
            assert!(warned(said), "{filter}: {log:?}");
        }
        assert!(warned("may be read by other users"), "{filter}: {log:?}");
    }
}

/// A port already taken: `serve` exits 3 naming the address, and leaves no data dir behind.
#[test]
fn serve_on_a_port_in_use_exits_3_and_creates_no_data_dir() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let scratch = tempfile::tempdir().unwrap();
    let data = scratch.path().join("fresh");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_smsflow"))
        .args(["serve", "--listen", &addr, "--flows", "flows"])
        .arg("--data")
        .arg(&data)
        .env_remove("TWILIO_ACCOUNT_SID")
        .env_remove("TWILIO_AUTH_TOKEN")
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{said}");
    assert!(said.contains(&addr), "{said}");
    assert!(!data.exists(), "no data dir left behind");
}

/// `smsflow serve` as a user runs it: banner, then SIGTERM stops it cleanly with exit 0 (and
/// its note of where it answers goes with it).
#[tokio::test]
async fn serve_prints_its_banner_and_stops_cleanly_on_sigterm() {
    let data = tempfile::tempdir().unwrap();
    let (child, base, mut lines, stderr) = serve_child(data.path()).await;
    let mut banner = Vec::new();
    while let Ok(Some(l)) = tokio::time::timeout(Duration::from_millis(500), lines.next_line())
        .await
        .unwrap_or(Ok(None))
    {
        banner.push(l);
        if banner.len() > 12 {
            break;
        }
    }
    let banner = banner.join("\n");
    assert!(banner.contains("provider:    console"), "{banner}");
    assert!(banner.contains("ngrok http"), "{banner}");
    let r = reqwest::get(format!("{base}/healthz")).await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    // Where it answers is noted in the data dir while it runs, and no longer once stopped.
    let noted = std::fs::read_to_string(data.path().join("daemon-url")).unwrap();
    assert_eq!(noted.trim(), base);
    // Beside it, how its admin API takes this machine's requests: with no token, open.
    let admin = std::fs::read_to_string(data.path().join("daemon-admin")).unwrap();
    assert_eq!(admin.trim(), "open");
    sigterm(&child);
    exits_cleanly(child, stderr, Duration::from_secs(10)).await;
    assert!(!data.path().join("daemon-url").exists());
    assert!(!data.path().join("daemon-admin").exists());
}

/// A signal sent as soon as the port takes connections, before the daemon has finished
/// starting (a deploy script's stop, or a reload), finds its handler: SIGTERM stops it
/// cleanly with exit 0, and SIGHUP does not kill it.
#[tokio::test]
async fn a_signal_sent_as_soon_as_the_port_answers_is_handled_not_fatal() {
    for signal in ["TERM", "HUP"] {
        let data = tempfile::tempdir().unwrap();
        let port = (std::net::TcpListener::bind("127.0.0.1:0").unwrap())
            .local_addr()
            .unwrap()
            .port();
        let addr = format!("127.0.0.1:{port}");
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_smsflow"))
            .args(["serve", "--listen", &addr, "--flows", "flows"])
            .arg("--data")
            .arg(data.path())
            .env_remove("TWILIO_ACCOUNT_SID")
            .env_remove("TWILIO_AUTH_TOKEN")
            .env_remove("SMSFLOW_ADMIN_TOKEN")
            .env("SMSFLOW_LOG", "")
            .env_remove("RUST_LOG")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let started = std::time::Instant::now();
        while tokio::net::TcpStream::connect(&addr).await.is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "never listened"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        send_signal(&child, signal);
        if signal == "HUP" {
            let r = reqwest::get(format!("http://{addr}/healthz")).await;
            assert_eq!(
                r.map(|r| r.status().as_u16()).ok(),
                Some(200),
                "killed by SIGHUP"
            );
            sigterm(&child);
        }
        let stderr = tokio::io::BufReader::new(child.stderr.take().unwrap());
        let stderr = tokio::io::AsyncBufReadExt::lines(stderr);
        exits_cleanly(child, stderr, Duration::from_secs(10)).await;
    }
}

/// Logs piped to a reader that went away (`serve 2>&1 | tee log`, then the tee is gone), or
/// a full disk: webhooks are still answered, the console still "sends" (the outbox does not
/// die on a print it cannot make), and SIGTERM still stops it with exit 0.
#[tokio::test]
async fn serve_goes_on_and_stops_cleanly_when_its_stdout_and_stderr_are_closed() {
    let data = tempfile::tempdir().unwrap();
    let (mut child, base, lines, stderr) = serve_child(data.path()).await;
    drop((lines, stderr));
    let http = reqwest::Client::new();
    for (n, body) in ["JOIN", "HELP"].iter().enumerate() {
        let r = http
            .post(format!("{base}/twilio/sms"))
            .form(&[
                ("From", ANN),
                ("Body", body),
                ("MessageSid", &format!("SMclosed{n}")),
            ])
            .send()
            .await
            .expect("an answer, not a dropped connection");
        assert_eq!(r.status().as_u16(), 200, "{body}");
    }
    eventually("the code to leave the outbox", async || {
        let metrics = reqwest::get(format!("{base}/metrics")).await.unwrap();
        let text = metrics.text().await.unwrap();
        text.lines()
            .any(|l| l.starts_with("smsflow_outbound_messages_total{status=\"sent\"} 1"))
    })
    .await;
    let ready = reqwest::get(format!("{base}/readyz")).await.unwrap();
    assert_eq!(ready.status().as_u16(), 200, "the outbox is still running");
    sigterm(&child);
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("exits in time")
        .unwrap();
    assert_eq!(status.code(), Some(0));
}

/// With `--log-format json`, everything on stderr is a JSON log line: the warning for a
/// filter it cannot read, a webhook's log, the stop. A start that fails says why the same way.
#[tokio::test]
async fn serve_with_json_logs_writes_only_json_lines_to_stderr() {
    let data = tempfile::tempdir().unwrap();
    let flows = std::path::Path::new("flows");
    let (child, base, _lines, stderr) = serve_child_with(data.path(), flows, |cmd| {
        cmd.args(["--log-format", "json"])
            .env("SMSFLOW_LOG", "[[not a filter");
    })
    .await;
    let r = reqwest::Client::new()
        .post(format!("{base}/twilio/sms"))
        .form(&[("From", ANN), ("Body", "HELP"), ("MessageSid", "SMjson1")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    sigterm(&child);
    let lines = exits_cleanly(child, stderr, Duration::from_secs(10)).await;
    let messages: Vec<String> = lines
        .iter()
        .map(|l| {
            let v: serde_json::Value =
                serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
            v["fields"]["message"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect();
    assert!(
        messages.iter().any(|m| m.contains("ignoring SMSFLOW_LOG")),
        "{lines:?}"
    );
    assert!(messages.iter().any(|m| m == "stopped cleanly"), "{lines:?}");
    // The start is in the log too, not only in the banner on stdout.
    assert!(
        messages.iter().any(|m| m.starts_with("smsflow ")
            && m.contains(" started on 127.0.0.1:")
            && m.contains("provider console; webhook signatures not checked")),
        "{lines:?}"
    );

    // A failed start says why, whatever the filter: even one that shows nothing else.
    for filter in ["", "off", "notify=error"] {
        let failed = std::process::Command::new(env!("CARGO_BIN_EXE_smsflow"))
            .args(["serve", "--listen", "127.0.0.1:0", "--log-format", "json"])
            .arg("--data")
            .arg(data.path())
            .args(["--flows", "/nonexistent/flows"])
            .env("SMSFLOW_LOG", filter)
            .env_remove("RUST_LOG")
            .output()
            .unwrap();
        assert_eq!(failed.status.code(), Some(1));
        let said = String::from_utf8_lossy(&failed.stderr);
        for line in said.lines() {
            let v: serde_json::Value =
                serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
            assert_eq!(v["level"], "ERROR", "{line}");
        }
        assert!(
            said.contains("cannot read flow directory"),
            "{filter:?}: {said}"
        );
    }
}

/// A client holds a half-sent request open; a second SIGTERM (or Ctrl-C) ends the wait for
/// it at once instead of after the grace period, and the stop is still clean.
#[tokio::test]
async fn a_second_sigterm_stops_serve_at_once_even_with_a_stalled_client() {
    let data = tempfile::tempdir().unwrap();
    let (child, base, _lines, mut stderr) = serve_child(data.path()).await;
    let stalled = half_a_request(&base).await;
    // The daemon has the connection before it is asked to stop.
    let r = reqwest::get(format!("{base}/healthz")).await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    sigterm(&child);
    // The second signal once the first has been heard (two at once may arrive as one).
    let mut said = Vec::new();
    while let Some(line) = stderr.next_line().await.unwrap() {
        let heard = line.contains("shutting down");
        said.push(line);
        if heard {
            break;
        }
    }
    assert!(
        said.last().is_some_and(|l| l.contains("shutting down")),
        "{said:?}"
    );
    sigterm(&child);
    // The grace period is 10 s: this ends well before it.
    let rest = exits_cleanly(child, stderr, Duration::from_secs(5)).await;
    assert!(rest.iter().any(|l| l.contains("second signal")), "{rest:?}");
    drop(stalled);
}

/// A benchmark small enough for a test: 4 connections, 40 requests, one round.
fn small_bench() -> smsflow::bench::BenchArgs {
    smsflow::bench::BenchArgs {
        connections: 4,
        requests: 40,
        flows: "flows".into(),
        body: "HELP".into(),
        rounds: 1,
        export_subscribers: None,
        outbox: None,
        twilio_ms: 150,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_benchmark_runs_both_routes_without_errors_and_reports_the_ratio() {
    let report = smsflow::bench::run(small_bench())
        .await
        .expect("bench runs");
    assert!(report.contains("median ratio durable/trivial:"), "{report}");
    // Each target is marked met or missed.
    let verdicts = report.matches(": met)").count() + report.matches(": MISSED)").count();
    assert_eq!(verdicts, 2, "{report}");
    assert_eq!(
        report.matches("(40 requests, 0 errors)").count(),
        2,
        "{report}"
    );
    // (A run this short may fall inside one clock tick, which shows as "?".)
    assert_eq!(report.matches(" host idle ").count(), 2, "{report}");
    // The 40 webhooks went through the writer: its line counts them in some commits.
    let writer = report
        .lines()
        .find(|l| l.trim_start().starts_with("writer:"))
        .unwrap_or_else(|| panic!("no writer line: {report}"));
    assert!(
        writer.contains(" events per commit; per commit "),
        "{writer}"
    );
    assert!(!writer.contains("no commits"), "{writer}");
}

/// `bench --outbox`: every code reaches the fake Twilio, and the figure is told beside what
/// one send at a time could do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_outbox_benchmark_sends_every_code_and_reports_the_ratio() {
    let report = smsflow::bench::run(smsflow::bench::BenchArgs {
        outbox: Some(20),
        twilio_ms: 50,
        ..small_bench()
    })
    .await
    .expect("bench runs");
    assert!(
        report.contains("their 20 codes reached a fake Twilio answering in 50 ms")
            && report.contains("one send at a time could do at most 20.0/s")
            && report.contains("(ratio "),
        "{report}"
    );
}

/// A Twilio that accepts every message with a body that is not JSON.
async fn twilio_answering_garbage() -> String {
    let app = axum::Router::new()
        .fallback(|| async { (axum::http::StatusCode::CREATED, "<html>proxy page</html>") });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await });
    base
}

#[tokio::test]
async fn a_send_twilio_accepts_with_an_unreadable_answer_is_accepted_without_an_id() {
    use smsflow::config::{Secret, Sender, TwilioConfig};
    use smsflow::provider::{Provider, Twilio};
    let twilio = Twilio::new(
        TwilioConfig {
            account_sid: "AC123".into(),
            auth_token: Secret::new("token"),
            sender: Sender::From(vec!["+15005550006".into()]),
            caller_id: Some("+15005550006".into()),
            api_base: twilio_answering_garbage().await,
        },
        None,
    )
    .expect("client");
    let to = smsflow::phone::Phone::parse("+14155550101").expect("phone");
    let accepted = Provider::Twilio(twilio)
        .send(&to, "hello", None, None)
        .await
        .expect("accepted");
    assert_eq!(accepted.sid, None);
}

/// A data dir holding one verified number whose step timer is a minute overdue (and, if
/// given, a queued message to it), and a flow dir with the test flows.
fn dirs_with_a_due_timer(
    phone: &str,
    queued: Option<&str>,
) -> (Arc<tempfile::TempDir>, tempfile::TempDir) {
    use smsflow::machine::{State, Subscriber, Timer, TimerKind};
    use smsflow::store::{Commit, Store};

    let data = Arc::new(tempfile::tempdir().unwrap());
    let flows = tempfile::tempdir().unwrap();
    std::fs::write(flows.path().join("flows.toml"), FLOWS).unwrap();
    let store = Store::open(data.path()).unwrap();
    let now = chrono::Utc::now();
    let due = Timer {
        at: now - chrono::Duration::minutes(1),
        kind: TimerKind::Step,
        epoch: 1,
    };
    let mut sub = Subscriber::new(smsflow::phone::Phone::parse(phone).unwrap(), now);
    sub.state = State::Verified;
    sub.timer = Some(due);
    let commit = Commit {
        subscriber: Some(sub),
        schedule: vec![due],
        outgoing: queued.map(|q| (q.to_string(), false)).into_iter().collect(),
        ..Commit::default()
    };
    store.commit_many(&[commit], now).unwrap();
    store.flush().unwrap();
    (data, flows)
}

/// A message committed but not yet flushed is not sent until it is on disk; the outbox asks
/// for that flush itself instead of waiting for a wake-up that a failed flush never sends.
/// (Committed here straight into the store: no writer flush follows, and no wake-up.)
#[tokio::test]
async fn a_queued_message_not_yet_on_disk_is_flushed_by_the_outbox_and_then_sent() {
    use smsflow::machine::{State, Subscriber};
    use smsflow::store::Commit;
    let app = TestApp::spawn(FLOWS).await;
    let now = chrono::Utc::now();
    let mut sub = Subscriber::new(smsflow::phone::Phone::parse(ANN).unwrap(), now);
    sub.state = State::Verified;
    let commit = Commit {
        subscriber: Some(sub),
        outgoing: vec![("Not on disk yet".to_string(), false)],
        ..Commit::default()
    };
    app.engine.store.commit_many(&[commit], now).unwrap();
    let (id, _) = app.engine.store.outbox().last().unwrap().unwrap();
    assert!(!app.engine.store.outbox_durable(id));
    app.engine.outbox_changed.notify_one();
    let sent = app.twilio.wait_delivered(1).await;
    assert_eq!(sent[0].body, "Not on disk yet");
    assert!(app.engine.store.outbox_durable(id));
    app.stop().await;
}

/// Queued entries that cannot be read, more of them than one look of the outbox reads, hold
/// up nothing queued behind them (a look counts the entries it moves past, not those).
#[tokio::test]
async fn more_unreadable_queued_entries_than_a_look_reads_hold_up_nothing_behind_them() {
    let data = Arc::new(tempfile::tempdir().unwrap());
    let flows = tempfile::tempdir().unwrap();
    std::fs::write(flows.path().join("flows.toml"), FLOWS).unwrap();
    {
        let db = reopen(|| sled::open(data.path()));
        // Sorting before every real id, so each look meets them first.
        let outbox = db.open_tree("outbox").unwrap();
        for length in 1..=3 {
            outbox.insert(vec![0u8; length], &b"garbage"[..]).unwrap();
        }
        db.flush().unwrap();
    }
    let options = smsflow::app::Options {
        quiet_console: true,
        outbox_read_budget: 2,
        ..smsflow::app::Options::default()
    };
    let twilio = FakeTwilio::start().await;
    let app = TestApp::start(twilio, data, Arc::new(flows), options, |_| {}).await;
    assert_eq!(app.sms(ANN, "JOIN").await.0, 200);
    let sent = app.twilio.wait_delivered(1).await;
    assert_eq!(sent[0].to, ANN);
    app.stop().await;
}

/// A data dir with one number's record and one queued message that cannot be read (disk
/// damage, or a newer smsflow): everyone else is still served, the damaged number's timer
/// does not fire again and again, and an operator can still erase the number.
#[tokio::test]
async fn a_damaged_record_holds_up_no_one_else_and_can_still_be_erased() {
    let damaged = "+14155550111";
    let (data, flows) = dirs_with_a_due_timer(damaged, Some("for the damaged number"));
    {
        let db = reopen(|| sled::open(data.path()));
        db.open_tree("subscribers")
            .and_then(|t| t.insert(damaged, &[4u8, 0xff, 0xff, 0xff][..]))
            .unwrap();
        // Sorts before every real id, so the outbox meets it first.
        db.open_tree("outbox")
            .and_then(|t| t.insert([0u8], &b"garbage"[..]))
            .unwrap();
        // A damaged history entry of a number that texts later (id 0: its oldest).
        let mut key = b"+14155550122\0".to_vec();
        key.extend_from_slice(&[0u8; 8]);
        db.open_tree("history")
            .and_then(|t| t.insert(key, &b"garbage"[..]))
            .unwrap();
        db.flush().unwrap();
    }
    let options = smsflow::app::Options {
        retry_base: Duration::from_millis(10),
        quiet_console: true,
        ..smsflow::app::Options::default()
    };
    let twilio = FakeTwilio::start().await;
    let app = TestApp::start(twilio, data, Arc::new(flows), options, |_| {}).await;

    // Another number is served as usual.
    let (status, _) = app.sms("+14155550122", "JOIN").await;
    assert_eq!(status, 200);
    let delivered = app.twilio.wait_delivered(1).await;
    assert_eq!(delivered[0].to, "+14155550122");

    // The damaged number's due timer was taken out instead of firing every second.
    for _ in 0..100 {
        if app.engine.store.timer_count() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(app.engine.store.timer_count(), 0);
    // Its queued message was not sent (whether it opted out cannot be known): it is
    // recorded as failed, and the outbox empties but for the entry that cannot be read. (The
    // fake counts a message when it arrives, a moment before the outbox records the answer.)
    let failed_and_empty = || {
        let failed = app
            .engine
            .store
            .deliveries()
            .filter_map(Result::ok)
            .any(|(_, d)| d.phone.as_str() == damaged && d.status == "failed");
        failed && app.engine.store.outbox().filter(Result::is_ok).count() == 0
    };
    for _ in 0..100 {
        if failed_and_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        failed_and_empty(),
        "a failed delivery record for the damaged number, and an empty outbox"
    );
    assert!(app.twilio.delivered().iter().all(|r| r.to != damaged));

    // The operator finds it by number in the list (and only there: its state is unknown),
    // and the dataset still has everyone else.
    let list = |path: &'static str| async {
        let r = app.admin(reqwest::Method::GET, path).send().await.unwrap();
        assert_eq!(r.status(), 200);
        r.json::<serde_json::Value>().await.unwrap()["subscribers"]
            .as_array()
            .unwrap()
            .clone()
    };
    let all = list("/admin/subscribers").await;
    let phones: Vec<&str> = all.iter().map(|s| s["phone"].as_str().unwrap()).collect();
    assert_eq!(phones, [damaged, "+14155550122"]);
    assert!(
        !all[0]["unreadable"].as_str().unwrap().is_empty(),
        "{}",
        all[0]
    );
    assert!(all[0].get("state").is_none(), "{}", all[0]);
    assert_eq!(all[1]["state"], "awaiting_code");
    let filtered = list("/admin/subscribers?state=verified").await;
    assert!(filtered.is_empty(), "{filtered:?}");
    let csv = app.admin_text("/admin/export.csv").await;
    let rows: Vec<&str> = csv.lines().skip(1).collect();
    assert_eq!(rows.len(), 1, "{csv}");
    assert!(rows[0].starts_with("+14155550122,"), "{csv}");

    // The other number's damaged history entry is shown as one, beside the rest, and an
    // opt-out through the admin API answers with the record.
    let other = "/admin/subscribers/%2B14155550122";
    let r = app.admin(reqwest::Method::GET, other).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let detail: serde_json::Value = r.json().await.unwrap();
    let history = detail["history"].as_array().unwrap();
    assert!(history[0]["unreadable"].is_string(), "{detail}");
    assert_eq!(history[1]["event"], "opted_in", "{detail}");
    let r = app
        .admin(reqwest::Method::POST, &format!("{other}/opt-out"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let detail: serde_json::Value = r.json().await.unwrap();
    assert_eq!(detail["state"], "opted_out", "{detail}");

    // The damaged record's own page says what the list says.
    let path = format!("/admin/subscribers/{damaged}");
    let r = app.admin(reqwest::Method::GET, &path).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let detail: serde_json::Value = r.json().await.unwrap();
    assert_eq!(detail["phone"], damaged, "{detail}");
    assert!(detail["unreadable"].is_string(), "{detail}");
    // It cannot be opted out (there is no state to change), and the answer says what can be
    // done instead.
    let r = app
        .admin(reqwest::Method::POST, &format!("{path}/opt-out"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 409);
    let refused: serde_json::Value = r.json().await.unwrap();
    assert!(
        refused["error"]
            .as_str()
            .unwrap()
            .contains("cannot be read"),
        "{refused}"
    );
    let status = |method| async {
        let r = app.admin(method, &path).send().await.unwrap();
        r.status()
    };
    let erased = status(reqwest::Method::DELETE).await;
    assert!(erased.is_success(), "{erased}");
    assert_eq!(status(reqwest::Method::GET).await, 404);
    let phones: Vec<String> = list("/admin/subscribers")
        .await
        .iter()
        .map(|s| s["phone"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(phones, ["+14155550122"]);
    app.stop().await;
}

#[tokio::test]
async fn a_due_timer_whose_number_has_no_record_is_consumed_instead_of_firing_for_ever() {
    let gone = "+14155550141";
    let (data, flows) = dirs_with_a_due_timer(gone, None);
    {
        // The record goes, its timer stays (as a storage fault could leave it).
        let db = reopen(|| sled::open(data.path()));
        db.open_tree("subscribers")
            .and_then(|t| t.remove(gone))
            .unwrap();
        db.flush().unwrap();
    }
    let twilio = FakeTwilio::start().await;
    let app = TestApp::start(
        twilio,
        data,
        Arc::new(flows),
        smsflow::app::Options::default(),
        |_| {},
    )
    .await;
    for _ in 0..100 {
        if app.engine.store.timer_count() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(app.engine.store.timer_count(), 0);
    // Consuming it did not bring the number back.
    assert_eq!(app.state_of(gone), None);
    app.stop().await;
}

/// Twilio refuses the account itself (a revoked auth token): the code waits in the outbox,
/// retried, instead of ending as failed, and goes out once the daemon is restarted with the
/// right token.
#[tokio::test]
async fn a_message_refused_for_the_accounts_credentials_waits_and_goes_out_after_the_fix() {
    let app = TestApp::spawn_with(FLOWS, |c| {
        if let Some(t) = c.twilio.as_mut() {
            t.auth_token = smsflow::config::Secret::new("a-revoked-token");
        }
    })
    .await;
    assert_eq!(app.sms(ANN, "JOIN").await.0, 200);
    for _ in 0..200 {
        if app.twilio.attempts() >= 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let tried = app.twilio.all_requests();
    assert!(tried.len() >= 3, "retried: {tried:#?}");
    assert!(tried.iter().all(|r| r.answered == 401 && !r.authorized));
    assert_eq!(app.engine.store.outbox_len(), 1, "the code still waits");
    // Restarted with the right token (the helpers' default).
    let app = app.restart(Duration::ZERO).await;
    let delivered = app.twilio.wait_delivered(1).await;
    assert_eq!(delivered.len(), 1);
    assert_eq!(delivered[0].to, ANN);
    assert!(
        delivered[0].body.starts_with("Code: "),
        "{}",
        delivered[0].body
    );
    app.stop().await;
}

/// However long the account stays refused, a message waits: the 30 tries after which a 5xx
/// gives up do not count for it. (On the manual clock: hours of backoff in moments.)
#[tokio::test]
async fn a_message_refused_for_the_account_outlasts_the_tries_a_5xx_would_give_up_after() {
    // A code that lives a day, so that expiry does not end its wait first.
    let flows = FLOWS.replace(
        "verified = \"Verified!\"",
        "verified = \"Verified!\"\nttl = \"1d\"",
    );
    let app = TestApp::spawn_adjusted(
        &flows,
        |c| {
            if let Some(t) = c.twilio.as_mut() {
                t.auth_token = smsflow::config::Secret::new("a-revoked-token");
            }
        },
        |o| o.clock = manual_clock(),
    )
    .await;
    assert_eq!(app.sms(ANN, "JOIN").await.0, 200);
    // Each retry is at most 10 minutes after the one before.
    for _ in 0..200 {
        let tried = app.twilio.attempts();
        if tried > 35 {
            break;
        }
        app.advance(Duration::from_secs(601));
        for _ in 0..100 {
            if app.twilio.attempts() > tried {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    assert!(app.twilio.attempts() > 35, "{}", app.twilio.attempts());
    assert_eq!(app.engine.store.outbox_len(), 1, "the code still waits");
    assert_eq!(
        app.engine.store.deliveries().count(),
        0,
        "nothing ended as failed"
    );
    // Its tries stopped counting half way: a failure after the fix still has its share.
    let (_, waiting) = app.engine.store.outbox().next().unwrap().unwrap();
    assert_eq!(waiting.attempts, 15);
    app.stop().await;
}

/// Twilio refuses a message as unsubscribed (21610) after its number was erased: the number
/// stays erased instead of coming back as an opted-out record.
#[tokio::test]
async fn a_number_erased_while_its_message_is_in_flight_stays_erased_when_twilio_refuses_it() {
    let app = TestApp::spawn(FLOWS).await;
    let (erased, other) = ("+14155550151", "+14155550152");
    app.twilio.unsubscribe(erased);
    app.twilio.hold();
    assert_eq!(app.sms(erased, "JOIN").await.0, 200);
    for _ in 0..200 {
        if app.twilio.held() > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(app.twilio.held(), 1, "the code's send is in flight");
    let erasing = app
        .admin_status(reqwest::Method::DELETE, "/admin/subscribers/%2B14155550151")
        .await;
    assert_eq!(erasing, 204);
    app.twilio.release();
    assert_eq!(app.sms(other, "JOIN").await.0, 200);
    let delivered = app.twilio.wait_delivered(1).await;
    assert_eq!(delivered[0].to, other);
    // A stop waits for the sends in flight: the refusal has been dealt with once it is done.
    let engine = app.engine.clone();
    app.stop().await;
    let phone = smsflow::phone::Phone::parse(erased).unwrap();
    assert!(engine.store.subscriber(&phone).unwrap().is_none());
}

/// A slow Twilio does not hold up the queue: sends to different numbers are in flight at
/// once, while a number's own messages still go one after another.
#[tokio::test]
async fn sends_to_different_numbers_overlap_but_a_numbers_own_wait_for_each_other() {
    let app = TestApp::spawn(FLOWS).await;
    let (ann, bob, cat) = ("+14155550161", "+14155550162", "+14155550163");
    app.twilio.hold();
    for who in [ann, bob, cat] {
        assert_eq!(app.sms(who, "JOIN").await.0, 200);
    }
    // Ann asks again: her second code is queued behind her first, which is in flight.
    assert_eq!(app.sms(ann, "JOIN").await.0, 200);
    eventually("three sends in flight", async || app.twilio.held() == 3).await;
    quiet_for(Duration::from_millis(300)).await;
    assert_eq!(
        app.twilio.held(),
        3,
        "Ann's second code waits for her first"
    );
    app.twilio.release();
    let delivered = app.twilio.wait_delivered(4).await;
    let to_ann: Vec<_> = delivered.iter().filter(|r| r.to == ann).collect();
    assert_eq!(to_ann.len(), 2, "{delivered:#?}");
    assert!(to_ann[0].at < to_ann[1].at);
    app.stop().await;
}

/// At most `IN_FLIGHT` sends wait for Twilio at once; the next goes when one is answered.
#[tokio::test]
async fn no_more_than_sixteen_sends_are_in_flight_at_once() {
    let app = TestApp::spawn(FLOWS).await;
    app.twilio.hold();
    let numbers: Vec<String> = (0..=smsflow::outbox::IN_FLIGHT)
        .map(|n| format!("+1415555{:04}", 1700 + n))
        .collect();
    for who in &numbers {
        assert_eq!(app.sms(who, "JOIN").await.0, 200);
    }
    let cap = smsflow::outbox::IN_FLIGHT;
    eventually("the sends in flight", async || app.twilio.held() == cap).await;
    quiet_for(Duration::from_millis(300)).await;
    assert_eq!(app.twilio.held(), cap);
    app.twilio.release();
    app.twilio.wait_delivered(numbers.len()).await;
    app.stop().await;
}

/// At one message per 20 s, a second code waits for its slot; stopping does not wait with it.
#[tokio::test]
async fn a_shutdown_does_not_wait_for_the_next_send_slot() {
    let app = TestApp::spawn_with(FLOWS, |c| c.send_rate = 0.05).await;
    assert_eq!(app.sms("+14155550131", "JOIN").await.0, 200);
    app.twilio.wait_delivered(1).await;
    assert_eq!(app.sms("+14155550132", "JOIN").await.0, 200);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = std::time::Instant::now();
    let (twilio, ..) = app.stop().await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "stopping took {:?}",
        started.elapsed()
    );
    assert_eq!(twilio.delivered().len(), 1, "the waiting code was not sent");
}

/// A message waiting for its send slot is not sent once its number is erased, even when the
/// number texts again meanwhile (its new record has no opt-out that would stop it).
#[tokio::test]
async fn a_message_waiting_for_its_slot_is_not_sent_after_its_number_is_erased_and_texts_again() {
    // One message every 2 s: Bob's code takes the slot, Ann's waits for the next.
    let app = TestApp::spawn_with(FLOWS, |c| c.send_rate = 0.5).await;
    assert_eq!(app.sms(BOB, "JOIN").await.0, 200);
    app.twilio.wait_delivered(1).await;
    assert_eq!(app.sms(ANN, "JOIN").await.0, 200);
    let path = format!("/admin/subscribers/{}", ANN.replace('+', "%2B"));
    let erased = app.admin_status(reqwest::Method::DELETE, &path).await;
    assert_eq!(erased.as_u16(), 204);
    assert_eq!(app.sms(ANN, "hello").await.0, 200);
    assert_eq!(
        app.admin_status(reqwest::Method::GET, &path).await.as_u16(),
        200,
        "Ann has a record again"
    );
    quiet_for(Duration::from_millis(2500)).await;
    let delivered = app.twilio.delivered();
    assert_eq!(
        delivered.iter().map(|r| r.to.as_str()).collect::<Vec<_>>(),
        [BOB],
        "the erased number's code was sent"
    );
    app.stop().await;
}

/// A message suppressed while it waited for its send slot (its number opted out meanwhile)
/// does not use the slot up: the next number's message goes in it.
#[tokio::test]
async fn a_message_suppressed_while_it_waited_leaves_its_send_slot_to_the_next() {
    // One message every 2 s.
    let app = TestApp::spawn_with(FLOWS, |c| c.send_rate = 0.5).await;
    const CAT: &str = "+15550003333";
    assert_eq!(app.sms(BOB, "JOIN").await.0, 200);
    app.twilio.wait_delivered(1).await;
    // Ann's code waits for the next slot (the outbox has it in hand within a moment); Cat's
    // is behind it.
    assert_eq!(app.sms(ANN, "JOIN").await.0, 200);
    assert_eq!(app.sms(CAT, "JOIN").await.0, 200);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let path = format!("/admin/subscribers/{}/opt-out", ANN.replace('+', "%2B"));
    assert_eq!(
        app.admin_status(reqwest::Method::POST, &path)
            .await
            .as_u16(),
        200
    );
    app.twilio.wait_delivered(2).await;
    let sent = app.twilio.delivered();
    assert_eq!(
        sent.iter().map(|r| r.to.as_str()).collect::<Vec<_>>(),
        [BOB, CAT]
    );
    let gap = sent[1].at - sent[0].at;
    assert!(
        gap < Duration::from_millis(3500),
        "Cat waited {gap:?}: two slots, as if Ann's had been used"
    );
    app.stop().await;
}

/// A Twilio that takes the request and drops the connection without an answer may have sent
/// the message: it is tried once more, not thirty times, and its record says it may have
/// gone. (A 503 before, which surely sent nothing, does not count against that.)
#[tokio::test]
async fn a_send_that_may_have_reached_twilio_is_not_tried_again_and_again() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let requests = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = requests.clone();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let counted = counted.clone();
            tokio::spawn(async move {
                // The whole request read (its form body ends it), then no answer at all.
                let mut got = Vec::new();
                let mut buf = [0u8; 4096];
                while let Ok(n) = conn.read(&mut buf).await {
                    if n == 0 {
                        return;
                    }
                    got.extend_from_slice(&buf[..n]);
                    if String::from_utf8_lossy(&got).contains("Body=") {
                        let n = counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        if n == 0 {
                            let busy =
                                "HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n";
                            let _ = conn.write_all(busy.as_bytes()).await;
                        }
                        return;
                    }
                }
            });
        }
    });
    let app = TestApp::spawn_with(FLOWS, |c| {
        c.twilio.as_mut().unwrap().api_base = url;
    })
    .await;
    app.sms(ANN, "JOIN").await;
    eventually("the outbox to give up", async || {
        app.engine.store.outbox_len() == 0
    })
    .await;
    assert_eq!(requests.load(std::sync::atomic::Ordering::SeqCst), 3);
    let ended: Vec<_> = (app.engine.store.deliveries())
        .map(|d| d.unwrap().1)
        .map(|d| (d.status, d.attempts, d.error.unwrap_or_default()))
        .collect();
    assert_eq!(ended.len(), 1, "{ended:?}");
    assert_eq!(
        (ended[0].0.as_str(), ended[0].1),
        ("failed", 3),
        "{ended:?}"
    );
    assert!(
        ended[0].2.contains("no answer from Twilio")
            && ended[0]
                .2
                .contains("2 tries that reached it, each of which may have sent it"),
        "{ended:?}"
    );
    app.stop().await;
}

/// A daemon on a manual clock whose first send failed: Ann's code waits 20 s for its retry.
async fn ann_code_waiting_for_its_retry() -> TestApp {
    let app = TestApp::spawn_with_options(FLOWS, |o| {
        o.retry_base = Duration::from_secs(20);
        o.clock = manual_clock();
    })
    .await;
    app.twilio.fail_next(&[503]);
    app.sms(ANN, "JOIN").await;
    eventually("the code to wait for its retry", async || {
        let now = app.engine.clock().now();
        app.engine
            .store
            .outbox()
            .any(|m| m.is_ok_and(|(_, m)| m.attempts == 1 && m.next_try > now))
    })
    .await;
    app
}

/// A code whose sends keep failing until it has expired is not sent then: it would only be
/// refused when typed back. Its record says why.
#[tokio::test]
async fn a_code_that_expired_while_its_send_was_retried_is_not_sent_but_withdrawn() {
    let app = ann_code_waiting_for_its_retry().await;
    // It carries its code's own expiry: the shipped flows' codes live 10 minutes.
    let (_, queued) = app.engine.store.outbox().next().unwrap().unwrap();
    let code = app
        .engine
        .store
        .subscriber(&smsflow::phone::Phone::parse(ANN).unwrap());
    let issued = code.unwrap().unwrap().codes.last().unwrap().expires_at;
    assert_eq!(queued.code_expires_at, Some(issued));
    assert_eq!(issued - queued.created_at, chrono::TimeDelta::minutes(10));
    app.advance(Duration::from_secs(11 * 60));
    eventually("the outbox to be done with it", async || {
        app.engine.store.outbox_len() == 0
    })
    .await;
    assert!(
        app.twilio.delivered().is_empty(),
        "an expired code was sent"
    );
    let ended: Vec<_> = app
        .engine
        .store
        .deliveries()
        .map(|d| d.unwrap().1)
        .map(|d| (d.status, d.error))
        .collect();
    assert_eq!(
        ended,
        [(
            "suppressed".to_string(),
            Some("the code expired before it could be sent".to_string())
        )]
    );
    // Withdrawn: its send no longer counts, and Ann, who waited for it alone, is back where
    // she was.
    let ann = app
        .engine
        .store
        .subscriber(&smsflow::phone::Phone::parse(ANN).unwrap())
        .unwrap()
        .unwrap();
    assert_eq!(
        (ann.state.name(), ann.codes.len(), ann.code_sends.len()),
        ("unverified", 0, 0)
    );
    app.stop().await;
}

/// Codes asked for while the first waits for its retry: once newer ones displace it (only
/// the `valid_codes` latest count), it is not sent when its retry comes, as it would only be
/// refused when typed back; the ones that count are.
#[tokio::test]
async fn a_queued_code_displaced_by_newer_ones_is_not_sent() {
    let app = ann_code_waiting_for_its_retry().await;
    app.sms(ANN, "JOIN").await;
    app.sms(ANN, "JOIN").await;
    let ann = smsflow::phone::Phone::parse(ANN).unwrap();
    let codes: Vec<String> = (app.engine.store.subscriber(&ann).unwrap().unwrap().codes)
        .iter()
        .map(|c| c.code.clone())
        .collect();
    assert_eq!(
        codes.len(),
        3,
        "the two that count and the one they displaced"
    );
    app.advance(Duration::from_secs(60));
    app.twilio.wait_delivered(2).await;
    eventually("the outbox to be done", async || {
        app.engine.store.outbox_len() == 0
    })
    .await;
    let bodies: Vec<String> = app
        .twilio
        .delivered()
        .iter()
        .map(|r| r.body.clone())
        .collect();
    assert_eq!(bodies.len(), 2, "{bodies:?}");
    assert!(bodies[0].contains(&codes[1]) && bodies[1].contains(&codes[2]));
    let suppressed = app.suppressed_reasons();
    assert_eq!(suppressed.len(), 1, "{suppressed:?}");
    assert!(suppressed[0].contains("newer codes"), "{suppressed:?}");
    app.stop().await;
}

/// While one number's message waits for a long retry, others are sent at once; and once that
/// number is erased and joins again, its new code does not wait for the erased one's retry.
/// (On a manual clock that never moves: the retry never comes due.)
#[tokio::test]
async fn a_message_waiting_for_its_retry_holds_up_only_its_own_number_and_not_after_an_erase() {
    let app = TestApp::spawn_with_options(FLOWS, |o| {
        o.retry_base = Duration::from_secs(20);
        o.clock = manual_clock();
    })
    .await;
    // (Nothing is sent before the first JOIN below.)
    app.twilio.fail_next(&[503]);
    let sent_to = |to: &'static str| {
        let twilio = app.twilio.clone();
        async move || twilio.delivered().iter().any(|r| r.to == to)
    };
    app.sms(ANN, "JOIN").await;
    // Ann's code meets the 503 and waits for its retry; Bob's goes out at once.
    app.sms(BOB, "JOIN").await;
    eventually("Bob's code", sent_to(BOB)).await;
    eventually("Ann's code to wait for its retry", async || {
        let now = app.engine.clock().now();
        app.engine.store.outbox().any(|m| {
            m.is_ok_and(|(_, m)| m.phone.as_str() == ANN && m.attempts == 1 && m.next_try > now)
        })
    })
    .await;
    assert!(!sent_to(ANN)().await);

    let path = format!("/admin/subscribers/{}", ANN.replace('+', "%2B"));
    let erased = app
        .admin(reqwest::Method::DELETE, &path)
        .send()
        .await
        .unwrap();
    assert!(erased.status().is_success(), "{}", erased.status());
    app.sms(ANN, "JOIN").await;
    // Not held up by her erased message's retry, which never comes due.
    eventually("Ann's new code", sent_to(ANN)).await;
    app.stop().await;
}

/// A daemon whose flows (the test flows, plus `ivr` lines) are in quiet hours from an hour
/// before `now` to two hours after, in UTC, started on a data dir where each (number, state,
/// text, is a code) was queued by a fired timer.
async fn quiet_now_with_queued(
    now: chrono::DateTime<chrono::Utc>,
    ivr: &str,
    queued: &[(&str, smsflow::machine::State, &str, bool)],
) -> TestApp {
    let hm = |t: chrono::DateTime<chrono::Utc>| t.format("%H:%M").to_string();
    let (from, to) = (
        hm(now - chrono::Duration::hours(1)),
        hm(now + chrono::Duration::hours(2)),
    );
    let text = FLOWS
        .replace(
            "name = \"Test Bot\"\n",
            &format!(
                "name = \"Test Bot\"\ntimezone = \"UTC\"\nquiet_hours = {{ from = \"{from}\", to = \"{to}\" }}\n"
            ),
        )
        .replace("[ivr]\n", &format!("[ivr]\n{ivr}"));
    start_with_queued(&text, now, queued, |_| {}).await
}

/// A daemon on `flows`, started on a data dir where each (number, state, text, is a code)
/// was queued by a fired timer at `now`.
async fn start_with_queued(
    flows: &str,
    now: chrono::DateTime<chrono::Utc>,
    queued: &[(&str, smsflow::machine::State, &str, bool)],
    tweak: impl FnOnce(&mut smsflow::config::Config),
) -> TestApp {
    use smsflow::machine::Subscriber;
    use smsflow::store::{Commit, Store};

    let data = Arc::new(tempfile::tempdir().unwrap());
    {
        let store = Store::open(data.path()).unwrap();
        let commits: Vec<Commit> = queued
            .iter()
            .map(|(phone, state, text, secret)| {
                let mut sub = Subscriber::new(smsflow::phone::Phone::parse(phone).unwrap(), now);
                sub.state = state.clone();
                Commit {
                    subscriber: Some(sub),
                    outgoing: vec![(text.to_string(), *secret)],
                    follow_up: true,
                    ..Commit::default()
                }
            })
            .collect();
        store.commit_many(&commits, now).unwrap();
        store.flush().unwrap();
    }
    TestApp::spawn_on(data, flows, tweak).await
}

/// A follow-up whose timer fired before quiet hours but which the outbox reaches only in them
/// (a backlog behind the rate limit, an outage's retries) waits until they end, with no
/// attempt counted; a code queued after it is sent at once.
#[tokio::test]
async fn a_follow_up_reached_in_quiet_hours_waits_for_them_to_end_and_a_code_does_not() {
    use smsflow::machine::State;
    use smsflow::store::Store;

    let now = chrono::Utc::now();
    let (step, code) = ("+14155550131", "+14155550132");
    let app = quiet_now_with_queued(
        now,
        "",
        &[
            (step, State::Verified, "Step two", false),
            (code, State::AwaitingCode, "Code: 123456", true),
        ],
    )
    .await;
    // The follow-up is first in the queue: by the time the code is sent, it was looked at.
    let delivered = app.twilio.wait_delivered(1).await;
    assert_eq!(delivered[0].to, code);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(app.twilio.attempts(), 1, "{:#?}", app.twilio.delivered());
    let (_, data, _, _) = app.stop().await;
    let store = reopen(|| Store::open(data.path()));
    let held: Vec<_> = store.outbox().map(|m| m.unwrap().1).collect();
    assert_eq!(held.len(), 1);
    assert_eq!(held[0].body, "Step two");
    assert_eq!(held[0].attempts, 0, "holding is not an attempt");
    let end = held[0].next_try;
    assert!(
        end > now + chrono::Duration::minutes(110) && end <= now + chrono::Duration::hours(2),
        "held until the end of quiet hours (two hours from the start), not {end}"
    );
}

/// A code for a number whose follow-up is held for quiet hours does not wait for the morning
/// (it would expire): the held follow-up goes, then the code, in the order they were queued;
/// whether the code was queued before the hold or while it lasted.
#[tokio::test]
async fn a_code_behind_a_held_follow_up_is_sent_at_once_and_the_follow_up_first() {
    use smsflow::machine::State;
    let now = chrono::Utc::now();
    let (early, late) = ("+14155550141", "+14155550142");
    let app = quiet_now_with_queued(
        now,
        "read_code_callers = \"attested\"\n",
        &[
            (early, State::Verified, "Step two", false),
            (early, State::AwaitingCode, "Code: 123456", true),
            (late, State::Verified, "Step two", false),
        ],
    )
    .await;
    let first = app.twilio.wait_delivered(2).await;
    assert_eq!(
        first
            .iter()
            .map(|m| (m.to.as_str(), m.body.as_str()))
            .collect::<Vec<_>>(),
        [(early, "Step two"), (early, "Code: 123456")]
    );
    // `late`'s follow-up is held; its owner calls and asks for a code, which (from a caller
    // ID no carrier vouched for) is texted.
    eventually("late's follow-up is held", async || {
        app.engine.store.outbox().any(|m| {
            m.is_ok_and(|(_, m)| m.phone.as_str() == late && m.next_try > chrono::Utc::now())
        })
    })
    .await;
    let r = app
        .post_form(
            "/twilio/voice/gather?attempt=0&menu=main",
            &[("From", late), ("CallSid", "CA7"), ("Digits", "1")],
        )
        .await;
    assert_eq!(r.status().as_u16(), 200);
    let all = app.twilio.wait_delivered(4).await;
    assert_eq!(
        (all[2].to.as_str(), all[2].body.as_str()),
        (late, "Step two")
    );
    assert_eq!(all[3].to, late);
    assert!(all[3].body.starts_with("Code: "), "{}", all[3].body);
}

/// A follow-up held for quiet hours is looked at again when a reload changes them: with none
/// now, it goes at once (it waited for the old ones' end before).
#[tokio::test]
async fn a_follow_up_held_for_quiet_hours_goes_once_a_reload_removes_them() {
    use smsflow::machine::State;
    let now = chrono::Utc::now();
    let held = "+14155550143";
    let app = quiet_now_with_queued(now, "", &[(held, State::Verified, "Step two", false)]).await;
    eventually("the follow-up to be held", async || {
        app.engine.store.outbox().any(|m| {
            m.is_ok_and(|(_, m)| m.phone.as_str() == held && m.next_try > chrono::Utc::now())
        })
    })
    .await;
    quiet_for(Duration::from_millis(300)).await;
    assert_eq!(app.twilio.attempts(), 0, "held till the morning");
    app.save_flows_and_reload(FLOWS).await;
    let sent = app.twilio.wait_delivered(1).await;
    assert_eq!(
        (sent[0].to.as_str(), sent[0].body.as_str()),
        (held, "Step two")
    );
}

/// A queued message that will not be sent (its number opted out) takes no slot of the
/// per-sender rate limit: the message after it goes one interval after the one before.
#[tokio::test]
async fn a_message_to_an_opted_out_number_takes_no_send_slot_from_the_others() {
    use smsflow::machine::State;
    let app = start_with_queued(
        FLOWS,
        chrono::Utc::now(),
        &[
            ("+14155550151", State::Verified, "first", false),
            ("+14155550152", State::OptedOut, "never sent", false),
            ("+14155550153", State::Verified, "second", false),
        ],
        // One send every 2 s.
        |c| c.send_rate = 0.5,
    )
    .await;
    let sent = app.twilio.wait_delivered(2).await;
    let gap = sent[1].at - sent[0].at;
    assert_eq!(
        sent.iter().map(|m| m.body.as_str()).collect::<Vec<_>>(),
        ["first", "second"]
    );
    // One interval (2 s), not two, and not none: the rate limit holds.
    assert!(
        gap > Duration::from_millis(1700) && gap < Duration::from_millis(3500),
        "{gap:?}"
    );
}

/// A code queued behind its number's message that waits for a retry does not cut that wait
/// short (the provider's `Retry-After`, the backoff): only a follow-up held for quiet hours
/// is let go early for a code.
#[tokio::test]
async fn a_code_does_not_cut_short_the_retry_wait_of_the_message_before_it() {
    let app = TestApp::spawn_with_options(FLOWS, |o| o.retry_base = Duration::from_secs(20)).await;
    app.twilio.fail_next(&[503]);
    app.sms(ANN, "JOIN").await;
    eventually("the first code to meet the 503", async || {
        app.twilio.attempts() == 1
    })
    .await;
    // A second code, queued behind the first, which waits 10-20 s for its retry.
    app.sms(ANN, "JOIN").await;
    quiet_for(Duration::from_millis(1000)).await;
    assert_eq!(app.twilio.attempts(), 1, "{:#?}", app.twilio.all_requests());
    app.stop().await;
}

/// `smsflow serve` on the fake Twilio, on `data` and the shipped flows, its log at the default
/// level on a piped stderr.
fn serve_logging(twilio: &FakeTwilio, data: &std::path::Path) -> tokio::process::Command {
    serve_logging_flows(twilio, data, "flows".as_ref())
}

/// [`serve_logging`] with the flows in `flows`.
fn serve_logging_flows(
    twilio: &FakeTwilio,
    data: &std::path::Path,
    flows: &std::path::Path,
) -> tokio::process::Command {
    let mut serve = tokio::process::Command::new(env!("CARGO_BIN_EXE_smsflow"));
    serve
        .args(["serve", "--listen", "127.0.0.1:0", "--flows"])
        .arg(flows)
        .arg("--data")
        .arg(data)
        .env("TWILIO_ACCOUNT_SID", ACCOUNT_SID)
        .env("TWILIO_AUTH_TOKEN", AUTH_TOKEN)
        .env("TWILIO_FROM", FROM)
        .env("TWILIO_API_BASE", &twilio.url)
        .env_remove("TWILIO_MESSAGING_SERVICE_SID")
        .env("SMSFLOW_LOG", "")
        .env_remove("RUST_LOG")
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    serve
}

/// A webhook whose signature does not match is refused and the log says so, with the URL it
/// was checked against (a wrong public URL or auth token refuses every webhook, and would
/// otherwise show only in Twilio's debugger); at most once a minute, so forgeries cannot
/// flood the log.
#[tokio::test]
async fn a_refused_signature_is_logged_once_with_the_url_it_was_checked_against() {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let twilio = FakeTwilio::start().await;
    let data = tempfile::tempdir().unwrap();
    let (mut child, base, _lines) = spawn_serve(
        // Not the URL Twilio (here: the test) signs for.
        serve_logging(&twilio, data.path()).env("SMSFLOW_PUBLIC_URL", "https://wrong.example"),
    )
    .await;
    let stderr = BufReader::new(child.stderr.take().unwrap()).lines();
    let http = reqwest::Client::new();
    // One without a signature first: its own line does not use up the one that names the URL.
    let unsigned = http
        .post(format!("{base}/twilio/sms"))
        .form(&[
            ("From", ANN),
            ("Body", "JOIN"),
            ("MessageSid", "SMunsigned"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(unsigned.status().as_u16(), 403);
    for n in 0..3 {
        let sid = format!("SMrefused{n}");
        let form = [
            ("From", ANN),
            ("Body", "JOIN"),
            ("MessageSid", sid.as_str()),
        ];
        let r = post_signed(&http, &base, "/twilio/sms", &form).await;
        assert_eq!(r.status().as_u16(), 403);
        // The caller is not told the URL (a tunnel's address it may not have used).
        let said = r.text().await.unwrap();
        assert!(
            said.contains("invalid X-Twilio-Signature") && !said.contains("wrong.example"),
            "{said}"
        );
    }
    sigterm(&child);
    let rest = exits_cleanly(child, stderr, Duration::from_secs(10)).await;
    let refused: Vec<&String> = rest
        .iter()
        .filter(|l| l.contains("refused a Twilio webhook"))
        .collect();
    assert_eq!(refused.len(), 2, "{rest:#?}");
    assert!(
        refused[0].contains("missing X-Twilio-Signature"),
        "{}",
        refused[0]
    );
    assert!(
        refused[1].contains("https://wrong.example/twilio/sms"),
        "{}",
        refused[1]
    );
}

/// Behind a proxy that says where the request came to (`X-Forwarded-Proto` and `-Host`), with
/// no public URL set, a webhook is checked against the URL the proxy names: Twilio's
/// signature for it is taken, and the same one for another host is refused.
#[tokio::test]
async fn without_a_public_url_the_signature_is_checked_against_the_forwarded_url() {
    let twilio = FakeTwilio::start().await;
    let data = tempfile::tempdir().unwrap();
    let (_child, base, _lines) = spawn_serve(&mut serve_logging(&twilio, data.path())).await;
    let form: Vec<(String, String)> = [("From", ANN), ("Body", "HELP"), ("MessageSid", "SMfwd1")]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let sig =
        smsflow::http::signature::sign(AUTH_TOKEN, "https://tunnel.example/twilio/sms", &form);
    let post = async |host: &str| {
        reqwest::Client::new()
            .post(format!("{base}/twilio/sms"))
            .header("X-Forwarded-Proto", "https")
            .header("X-Forwarded-Host", host)
            .header("X-Twilio-Signature", &sig)
            .form(&form)
            .send()
            .await
            .unwrap()
            .status()
    };
    assert_eq!(post("elsewhere.example").await, 403);
    assert_eq!(post("tunnel.example").await, 200);
    // Where it first came in: a proxy behind the tunnel may append its own.
    assert_eq!(post("tunnel.example, localhost:8080").await, 200);
    assert_eq!(post("elsewhere.example, tunnel.example").await, 403);
    // A host with a path is no host: a signature for another deployment's path prefix
    // (`https://tunnel.example/foo/twilio/sms`) is not checked against it.
    let prefixed =
        smsflow::http::signature::sign(AUTH_TOKEN, "https://tunnel.example/foo/twilio/sms", &form);
    let status = reqwest::Client::new()
        .post(format!("{base}/twilio/sms"))
        .header("X-Forwarded-Proto", "https")
        .header("X-Forwarded-Host", "tunnel.example/foo")
        .header("X-Twilio-Signature", &prefixed)
        .form(&form)
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status, 403);
}

/// SIGHUP reloads the flows (here unchanged: still a reload, and counted), and says so where
/// the admin API's readiness detail shows the last one.
#[tokio::test]
async fn sighup_reloads_the_flows() {
    let twilio = FakeTwilio::start().await;
    let data = tempfile::tempdir().unwrap();
    let (child, base, _lines) = spawn_serve(&mut serve_logging(&twilio, data.path())).await;
    let readyz = async || -> serde_json::Value {
        let r = reqwest::get(format!("{base}/readyz")).await.unwrap();
        r.json().await.unwrap()
    };
    assert!(readyz().await["last_reload"].is_null());
    send_signal(&child, "HUP");
    eventually("the SIGHUP reload", async || {
        let last = &readyz().await["last_reload"];
        last["trigger"] == "SIGHUP" && last["ok"] == true
    })
    .await;
    let metrics = reqwest::get(format!("{base}/metrics")).await.unwrap();
    let metrics = metrics.text().await.unwrap();
    assert!(
        metrics.contains("smsflow_flow_reloads_total{result=\"ok\"} 1"),
        "{metrics}"
    );
}

/// A short bearer token is warned of at the start, and wrong tokens show in the log, once a
/// minute at most (guessing is seen, and cannot flood the log).
#[tokio::test]
async fn a_short_token_is_warned_of_and_wrong_tokens_are_logged_once_a_minute() {
    let twilio = FakeTwilio::start().await;
    let data = tempfile::tempdir().unwrap();
    let (mut child, base, _lines) = spawn_serve(
        serve_logging(&twilio, data.path())
            .env("SMSFLOW_API_TOKEN", "short")
            .env("SMSFLOW_ADMIN_TOKEN", "a-long-enough-admin-token"),
    )
    .await;
    let stderr = tokio::io::BufReader::new(child.stderr.take().unwrap());
    let stderr = tokio::io::AsyncBufReadExt::lines(stderr);
    let http = reqwest::Client::new();
    for _ in 0..3 {
        let r = http
            .get(format!("{base}/admin/subscribers"))
            .bearer_auth("zq-attempt-77")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 401);
    }
    sigterm(&child);
    let rest = exits_cleanly(child, stderr, Duration::from_secs(10)).await;
    let said = |what: &str| rest.iter().filter(|l| l.contains(what)).count();
    assert_eq!(
        said("SMSFLOW_API_TOKEN (api_token) is 5 characters long"),
        1,
        "{rest:#?}"
    );
    assert_eq!(said("SMSFLOW_ADMIN_TOKEN (admin_token) is"), 0, "{rest:#?}");
    assert_eq!(said("with a wrong bearer token"), 1, "{rest:#?}");
    assert!(!rest.iter().any(|l| l.contains("zq-attempt")), "{rest:#?}");
}

/// Even at `trace`, where sled would print the keys and values it stores (as byte lists), no
/// log line holds a whole number, a live code or an answer.
#[tokio::test]
async fn the_trace_log_holds_no_whole_number_no_code_and_no_answer() {
    let twilio = FakeTwilio::start().await;
    let data = tempfile::tempdir().unwrap();
    let (mut child, base, _lines) = spawn_serve(
        serve_logging(&twilio, data.path())
            .env("SMSFLOW_LOG", "trace")
            .env("SMSFLOW_PUBLIC_URL", PUBLIC_URL),
    )
    .await;
    let stderr = tokio::io::BufReader::new(child.stderr.take().unwrap());
    let mut stderr = tokio::io::AsyncBufReadExt::lines(stderr);
    // Read as it comes: a trace log fills a pipe's buffer in no time, and then the daemon
    // would wait on it.
    let log = tokio::spawn(async move {
        let mut all = Vec::new();
        while let Ok(Some(line)) = stderr.next_line().await {
            all.push(line);
        }
        all
    });
    signed_sms(&base, ANN, "JOIN").await;
    let code = code_in(&twilio.last_to(ANN, 1).await);
    assert!(signed_sms(&base, ANN, &code)
        .await
        .contains("A few quick questions"));
    signed_sms(&base, ANN, "Zebediah").await;
    sigterm(&child);
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;
    assert_eq!(status.expect("exits in time").unwrap().code(), Some(0));
    let rest = log.await.unwrap();
    assert!(
        rest.iter().any(|l| l.contains("TRACE")),
        "not at trace: {rest:#?}"
    );
    // As text, and as the byte lists sled's trace lines print (`[43, 49, 53, ...]`).
    let bytes = |s: &str| {
        s.bytes()
            .map(|b| b.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    for secret in [ANN.trim_start_matches('+'), &code, "Zebediah"] {
        for form in [secret.to_string(), bytes(secret)] {
            let shown: Vec<_> = rest.iter().filter(|l| l.contains(&form)).collect();
            assert!(shown.is_empty(), "{form:?} in {shown:#?}");
        }
    }
}

/// A log at `trace` written next to the flow directory (whose parent the watcher watches)
/// does not log its own writes: notify's trace line for each change would make one more.
#[tokio::test]
async fn a_trace_log_written_beside_the_flows_does_not_feed_on_itself() {
    let twilio = FakeTwilio::start().await;
    let dir = tempfile::tempdir().unwrap();
    let flows = dir.path().join("flows");
    std::fs::create_dir(&flows).unwrap();
    std::fs::copy("flows/bot.toml", flows.join("bot.toml")).unwrap();
    let log_path = dir.path().join("serve.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut serve = serve_logging_flows(&twilio, &dir.path().join("data"), &flows);
    serve.env("SMSFLOW_LOG", "trace").stderr(log);
    let (child, _base, _lines) = spawn_serve(&mut serve).await;
    // Long enough for the watcher to be running and hear the log's writes.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    sigterm(&child);
    let mut child = child;
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;
    assert_eq!(status.expect("exits in time").unwrap().code(), Some(0));
    let written = std::fs::read_to_string(&log_path).unwrap();
    assert!(written.contains("TRACE"), "not at trace: {written}");
    let notify = written.lines().filter(|l| l.contains("notify")).count();
    // (It wrote ~30 MB a second, nearly all notify's lines about serve.log.)
    assert!(
        written.len() < 1_000_000 && notify < 10,
        "{} bytes, {notify} notify lines",
        written.len()
    );
}

/// A client that sends a request's head and then its body a byte at a time, or none of it,
/// is answered and let go once the body timeout (`BODY_TIMEOUT`, 10 s, by default; 1 s here)
/// has passed since the head, instead of holding its connection (and a file descriptor) for
/// as long as it likes.
#[tokio::test]
async fn a_request_whose_body_trickles_in_is_refused_at_the_body_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const LIMIT: Duration = Duration::from_secs(1);
    let app = TestApp::spawn_with_options(FLOWS, |o| o.body_timeout = LIMIT).await;
    let mut slow = tokio::net::TcpStream::connect(app.base.trim_start_matches("http://"))
        .await
        .unwrap();
    slow.write_all(
        b"POST /twilio/sms HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 100\r\n\r\n",
    )
    .await
    .unwrap();
    let started = std::time::Instant::now();
    // A byte every 200 ms: never idle for long, and 20 s to send it all.
    let (mut read, mut write) = slow.into_split();
    let trickle = tokio::spawn(async move {
        for _ in 0..100 {
            if write.write_all(b"x").await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    let mut answer = Vec::new();
    let done = tokio::time::timeout(
        LIMIT + Duration::from_secs(5),
        read.read_to_end(&mut answer),
    );
    assert!(
        done.await.is_ok(),
        "still held after {:?}",
        started.elapsed()
    );
    assert!(
        started.elapsed() >= LIMIT - Duration::from_millis(100),
        "refused early, after {:?}",
        started.elapsed()
    );
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("did not all arrive within 1 s"), "{answer}");
    trickle.abort();
    app.stop().await;
}

/// A body declared over the limit is refused at once, without waiting for it, in the shape of
/// the route's other refusals.
#[tokio::test]
async fn a_body_declared_over_the_limit_is_refused_at_once() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = TestApp::spawn(FLOWS).await;
    for (path, shape) in [
        ("/twilio/sms", "request body is over the 64 KiB limit"),
        ("/authenticate/get_otp", "\"exit_code\":2"),
    ] {
        let mut big = tokio::net::TcpStream::connect(app.base.trim_start_matches("http://"))
            .await
            .unwrap();
        big.write_all(
            format!("POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(2), big.read_to_end(&mut answer))
            .await
            .expect("refused at once")
            .unwrap();
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 413"), "{path}: {answer}");
        assert!(answer.contains(shape), "{path}: {answer}");
    }
    app.stop().await;
}

/// A client that sends a request's head and then none of its body is answered and let go
/// at the body timeout, and the OTP API answers that in its own JSON shape.
#[tokio::test]
async fn a_request_whose_body_never_comes_is_refused_after_the_body_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const IDLE: Duration = Duration::from_secs(1);
    let app = TestApp::spawn_with_options(FLOWS, |o| o.body_timeout = IDLE).await;
    let mut stalled = tokio::net::TcpStream::connect(app.base.trim_start_matches("http://"))
        .await
        .unwrap();
    stalled
        .write_all(
            b"POST /twilio/sms HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 100\r\n\r\n",
        )
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(
        IDLE + Duration::from_secs(5),
        stalled.read_to_end(&mut answer),
    )
    .await;
    assert!(read.is_ok(), "still held after {:?}", started.elapsed());
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 4"), "{answer}");
    assert!(started.elapsed() >= IDLE - Duration::from_millis(100));
    assert_eq!(app.state_of(ANN), None);
    let mut stalled = tokio::net::TcpStream::connect(app.base.trim_start_matches("http://"))
        .await
        .unwrap();
    stalled
        .write_all(
            b"POST /authenticate/get_otp HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 30\r\n\r\n{",
        )
        .await
        .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(
        IDLE + Duration::from_secs(5),
        stalled.read_to_end(&mut answer),
    )
    .await
    .expect("let go")
    .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.starts_with("HTTP/1.1 400") && answer.contains("\"exit_code\":2"),
        "{answer}"
    );
    app.stop().await;
}

/// An answer far larger than any Twilio sends is not read whole: the message counts as sent
/// (accepted is accepted), without a message id, as for an answer that cannot be read.
#[tokio::test]
async fn an_oversized_answer_from_the_messages_api_is_not_read_whole() {
    let app = TestApp::spawn(FLOWS).await;
    app.twilio.pad_answers(8 << 20);
    app.sms(ANN, "JOIN").await;
    app.twilio.wait_delivered(1).await;
    eventually("the send to be recorded", async || {
        app.engine.store.outbox_len() == 0
    })
    .await;
    let page = app
        .admin(
            reqwest::Method::GET,
            &format!("/admin/subscribers/{}", ANN.replace('+', "%2B")),
        )
        .send()
        .await
        .unwrap()
        .json::<serde_json::Value>()
        .await
        .unwrap();
    let sent = &page["messages"][0];
    assert_eq!(sent["status"], "sent", "{page}");
    assert_eq!(sent["provider_sid"], serde_json::Value::Null, "{page}");
    assert_eq!(app.twilio.delivered().len(), 1, "sent once, not again");
}

/// A code Twilio refuses for good (a 400) will never arrive: it is withdrawn as the OTP API
/// withdraws its own, so its send does not count and the number is not left waiting for it.
/// Refused as unsubscribed (21610), the number is opted out instead.
#[tokio::test]
async fn a_code_refused_for_good_is_withdrawn_and_the_number_is_not_left_waiting() {
    let app = TestApp::spawn(FLOWS).await;
    let record = |phone: &str| {
        app.engine
            .store
            .subscriber(&smsflow::phone::Phone::parse(phone).unwrap())
            .unwrap()
            .unwrap()
    };
    app.twilio.fail_next(&[400]);
    app.sms(ANN, "JOIN").await;
    eventually("the refused code to end", async || {
        app.engine.store.outbox_len() == 0
    })
    .await;
    let ann = record(ANN);
    assert_eq!(
        (ann.state.name(), ann.codes.len(), ann.code_sends.len()),
        ("unverified", 0, 0)
    );
    // JOIN again: a new code, sent.
    app.sms(ANN, "JOIN").await;
    app.twilio.wait_delivered(1).await;
    assert_eq!(record(ANN).state.name(), "awaiting_code");

    app.twilio.unsubscribe(BOB);
    app.sms(BOB, "JOIN").await;
    eventually("the refused code to end", async || {
        app.engine.store.outbox_len() == 0
    })
    .await;
    assert_eq!(record(BOB).state.name(), "opted_out");
}

/// A code whose send is refused after its number was erased (and texted JOIN again meanwhile)
/// was the erased number's: nothing is withdrawn from the new record.
#[tokio::test]
async fn a_refused_code_of_an_erased_number_withdraws_nothing_from_its_new_record() {
    let app = TestApp::spawn(FLOWS).await;
    app.twilio.hold();
    app.sms(ANN, "JOIN").await;
    eventually("the code's send to be under way", async || {
        app.twilio.held() == 1
    })
    .await;
    let path = format!("/admin/subscribers/{}", ANN.replace('+', "%2B"));
    let erased = app.admin_status(reqwest::Method::DELETE, &path).await;
    assert_eq!(erased.as_u16(), 204);
    // The new record asks for a code and verifies with it (read here from the store, as
    // the outbox is still busy with the old send).
    app.sms(ANN, "JOIN").await;
    let record = || {
        app.engine
            .store
            .subscriber(&smsflow::phone::Phone::parse(ANN).unwrap())
            .unwrap()
            .unwrap()
    };
    let code = record().codes[0].code.clone();
    app.sms(ANN, &code).await;
    assert_eq!(record().state.name(), "verified");
    // The send in flight is refused for good.
    app.twilio.fail_next(&[400]);
    app.twilio.release();
    eventually("the outbox to be done", async || {
        app.engine.store.outbox_len() == 0
    })
    .await;
    let ann = record();
    assert_eq!(
        (ann.state.name(), ann.code_sends.len()),
        ("verified", 1),
        "the new record keeps its send against the limit"
    );
}

/// Twilio may report on a message before its answer to the send is back (and recorded): the
/// report waits for the message's record and is applied to it, not lost. One that comes
/// while no send is in flight is not kept.
#[tokio::test]
async fn a_delivery_report_that_comes_before_the_sends_answer_is_applied_once_it_is_recorded() {
    let app = TestApp::spawn(FLOWS).await;
    let report = |sid: String, status: &'static str| {
        let app = &app;
        async move {
            let params = [
                ("MessageSid", sid.as_str()),
                ("MessageStatus", status),
                ("To", ANN),
            ];
            app.post_form("/twilio/status", &params)
                .await
                .status()
                .as_u16()
        }
    };
    assert_eq!(report("SMnothing_queued".into(), "delivered").await, 204);
    assert_eq!(app.engine.store.early_report_count(), 0);

    app.twilio.hold();
    let (status, _) = app.sms(ANN, "JOIN").await;
    assert_eq!(status, 200);
    eventually("the code's send to reach Twilio", async || {
        app.twilio.held() == 1
    })
    .await;
    // The fake numbers its messages: this is the sid its answer will carry. Delivered, then
    // (out of order) sent: the furthest stands.
    let sid = format!("SM{:032}", 1);
    assert_eq!(report(sid.clone(), "delivered").await, 204);
    assert_eq!(report(sid.clone(), "sent").await, 204);
    assert_eq!(app.engine.store.early_report_count(), 1);
    // An unsubscribed report that names no number is refused, and nothing of it is kept.
    let nameless = app
        .post_form(
            "/twilio/status",
            &[
                ("MessageSid", "SMother"),
                ("MessageStatus", "undelivered"),
                ("ErrorCode", "21610"),
            ],
        )
        .await;
    assert_eq!(nameless.status().as_u16(), 400);
    assert!(nameless.text().await.unwrap().contains("To"));
    assert_eq!(app.engine.store.early_report_count(), 1);
    app.twilio.release();
    eventually("the outbox to empty", async || {
        app.engine.store.outbox_len() == 0
    })
    .await;
    let (_, d) = (app.engine.store.delivery_by_sid(&sid))
        .expect("lookup")
        .expect("recorded");
    assert_eq!(d.status, "delivered");
    assert_eq!(app.engine.store.early_report_count(), 0, "taken");
    // For a message it has a record of, smsflow knows the number: no `To` is needed.
    let r = app
        .post_form(
            "/twilio/status",
            &[
                ("MessageSid", sid.as_str()),
                ("MessageStatus", "undelivered"),
                ("ErrorCode", "21610"),
            ],
        )
        .await;
    assert_eq!(r.status().as_u16(), 204);
    assert_eq!(app.state_of(ANN).as_deref(), Some("opted_out"));
}

/// A daemon texting from `FROM` and `second`, one message every 3 s per sender (wide
/// margins: a loaded machine may be slow).
async fn two_senders_a_turn_every_3s(second: &str) -> TestApp {
    TestApp::spawn_with(FLOWS, |c| {
        c.send_rate = 1.0 / 3.0;
        if let Some(t) = c.twilio.as_mut() {
            t.sender = smsflow::config::Sender::From(vec![FROM.into(), second.into()]);
        }
    })
    .await
}

/// The send rate holds per sender: with two of our numbers, a message from the second does
/// not wait for the first's turn, and the first's next message still waits for its own.
#[tokio::test]
async fn each_sender_has_its_own_send_rate() {
    const SECOND: &str = "+15005550007";
    const CAT: &str = "+15550003333";
    let app = two_senders_a_turn_every_3s(SECOND).await;
    let join = |from, to| app.sms_to(from, to, "JOIN");
    // Dan writes to a number that is not ours: texted from the first, in its turns.
    const DAN: &str = "+15550004444";
    assert_eq!(join(ANN, FROM).await, 200);
    assert_eq!(join(BOB, SECOND).await, 200);
    assert_eq!(join(CAT, FROM).await, 200);
    assert_eq!(join(DAN, "+15559990000").await, 200);
    let sent = app.twilio.wait_delivered(4).await;
    let at = |to: &str| {
        let r = sent.iter().find(|r| r.to == to).expect("sent");
        (r.at, r.from.clone())
    };
    let ((ann, ann_from), (bob, bob_from), (cat, cat_from)) = (at(ANN), at(BOB), at(CAT));
    assert_eq!(
        (ann_from.as_str(), bob_from.as_str(), cat_from.as_str()),
        (FROM, SECOND, FROM)
    );
    assert!(
        bob.duration_since(ann) < Duration::from_millis(1500),
        "the second number's message should not wait for the first's turn: {:?}",
        bob.duration_since(ann)
    );
    assert!(
        cat.duration_since(ann) >= Duration::from_millis(2500),
        "the first number's next message should wait for its turn: {:?}",
        cat.duration_since(ann)
    );
    let (dan, dan_from) = at(DAN);
    assert_eq!(dan_from, FROM);
    assert!(
        dan.duration_since(cat) >= Duration::from_millis(2500),
        "a message from the first number by default shares its turns: {:?}",
        dan.duration_since(cat)
    );
    app.stop().await;
}

/// A message waiting for its sender's turn does not hold up another sender's queued after it;
/// the first sender's later messages still go one turn apart, in queue order.
#[tokio::test]
async fn a_message_waiting_for_its_senders_turn_does_not_hold_up_another_senders() {
    const SECOND: &str = "+15005550007";
    const CAT: &str = "+15550003333";
    const DAN: &str = "+15550004444";
    let app = two_senders_a_turn_every_3s(SECOND).await;
    // Queued in this order: three for the first number, then one for the second.
    for (from, to) in [(ANN, FROM), (CAT, FROM), (DAN, FROM), (BOB, SECOND)] {
        assert_eq!(app.sms_to(from, to, "JOIN").await, 200);
    }
    let sent = app.twilio.wait_delivered(4).await;
    let order: Vec<&str> = sent.iter().map(|r| r.to.as_str()).collect();
    assert_eq!(
        order,
        [ANN, BOB, CAT, DAN],
        "the second number's message goes first"
    );
    let at = |to: &str| sent.iter().find(|r| r.to == to).expect("sent").at;
    let (ann, bob, cat, dan) = (at(ANN), at(BOB), at(CAT), at(DAN));
    assert!(
        bob.duration_since(ann) < Duration::from_millis(1500),
        "the second number's message waited for the first's turn: {:?}",
        bob.duration_since(ann)
    );
    for (earlier, later) in [(ann, cat), (cat, dan)] {
        assert!(
            later.duration_since(earlier) >= Duration::from_millis(2500),
            "the first number's messages go a turn apart: {:?}",
            later.duration_since(earlier)
        );
    }
    app.stop().await;
}

/// A message let go at its sender's turn that goes from another sender by then (its number
/// wrote to another of ours meanwhile) waits for that one; the first sender's next message
/// goes in the turn all the same.
#[tokio::test]
async fn a_message_that_changes_sender_while_it_waits_does_not_hold_up_its_first_senders_others() {
    const SECOND: &str = "+15005550007";
    const P1: &str = "+15550003333";
    const P2: &str = "+15550004444";
    const Y: &str = "+15550005555";
    let app = two_senders_a_turn_every_3s(SECOND).await;
    // Ann's code takes the first number's turn; P1's and P2's wait for its next.
    for from in [ANN, P1, P2] {
        assert_eq!(app.sms_to(from, FROM, "JOIN").await, 200);
    }
    app.twilio.wait_delivered(1).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // The second number's turn is taken 1.5 s later; then P1 writes to it.
    assert_eq!(app.sms_to(Y, SECOND, "JOIN").await, 200);
    app.twilio.wait_delivered(2).await;
    assert_eq!(app.sms_to(P1, SECOND, "hello").await, 200);
    let sent = app.twilio.wait_delivered(4).await;
    let at = |to: &str| {
        let r = sent.iter().find(|r| r.to == to).expect("sent");
        (r.at, r.from.clone())
    };
    let ((ann, _), (y, _)) = (at(ANN), at(Y));
    let ((p1, p1_from), (p2, p2_from)) = (at(P1), at(P2));
    assert_eq!((p1_from.as_str(), p2_from.as_str()), (SECOND, FROM));
    assert!(
        p2.duration_since(ann) < Duration::from_millis(5000),
        "P2's code should go in the first number's next turn: {:?}",
        p2.duration_since(ann)
    );
    assert!(
        p1.duration_since(y) >= Duration::from_millis(2500),
        "P1's code waits for the second number's turn: {:?}",
        p1.duration_since(y)
    );
    app.stop().await;
}

/// A queue longer than one look reads (four, here), all of it waiting for one sender's turns,
/// is read a slice at a time: every message goes, once, in queue order.
#[tokio::test]
async fn a_long_queue_behind_one_senders_turns_read_four_at_a_time_is_all_sent_once_in_order() {
    // Ten messages a second; a look reads four at most.
    let app =
        TestApp::spawn_adjusted(FLOWS, |c| c.send_rate = 10.0, |o| o.outbox_read_budget = 4).await;
    let n = 24;
    let numbers: Vec<String> = (0..n).map(|i| format!("+1555{i:07}")).collect();
    // The codes are queued faster than they may go: the queue waits for the sender's turns.
    for number in &numbers {
        assert_eq!(app.sms(number, "JOIN").await.0, 200);
    }
    let sent = app.twilio.wait_delivered(n).await;
    let to: Vec<&str> = sent.iter().map(|r| r.to.as_str()).collect();
    assert_eq!(to, numbers, "each number's code, once, in queue order");
    app.stop().await;
}

/// With several numbers in `TWILIO_FROM`, what is sent to a number (its code, the steps after
/// it) comes from the number of ours it texted; a number that texted none of them, and the
/// OTP API's texts, from the first.
#[tokio::test]
async fn with_several_senders_a_number_is_texted_from_the_one_it_wrote_to() {
    const SECOND: &str = "+15005550007";
    let several = |c: &mut smsflow::config::Config| {
        if let Some(t) = c.twilio.as_mut() {
            t.sender = smsflow::config::Sender::From(vec![FROM.into(), SECOND.into()]);
        }
    };
    // The steps come due when the test says (see `TestApp::advance`).
    let app = TestApp::spawn_adjusted(FLOWS, several, |o| o.clock = manual_clock()).await;
    assert_eq!(app.sms_to(ANN, SECOND, "JOIN").await, 200);
    assert_eq!(app.sms_to(BOB, FROM, "JOIN").await, 200);
    let stranger = "+15550003333";
    assert_eq!(app.sms_to(stranger, "+15559990000", "JOIN").await, 200);
    let (status, ..) = app
        .otp(
            "get_otp",
            serde_json::json!({"phone": "+15550004444"}),
            None,
        )
        .await;
    assert_eq!(status, 200);
    let sent = app.twilio.wait_delivered(4).await;
    let from_for = |to: &str| {
        (sent.iter())
            .filter(|r| r.to == to)
            .map(|r| r.from.clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(from_for(ANN), [SECOND]);
    assert_eq!(from_for(BOB), [FROM]);
    assert_eq!(from_for(stranger), [FROM], "not one of ours: the first");
    assert_eq!(from_for("+15550004444"), [FROM]);

    // So does a code a caller asks for in the voice menu (2: a code by text).
    let caller = "+15550005555";
    let params = [
        ("From", caller),
        ("To", SECOND),
        ("CallSid", "CA1"),
        ("Digits", "2"),
    ];
    let r = app
        .post_form("/twilio/voice/gather?attempt=0&menu=main", &params)
        .await;
    assert_eq!(r.status().as_u16(), 200);
    let sent = app.twilio.wait_delivered(5).await;
    assert_eq!(
        (sent.iter().find(|r| r.to == caller)).map(|r| r.from.as_str()),
        Some(SECOND)
    );

    // The code answered, the steps after it follow from the same number.
    let code = code_in(&app.twilio.last_to(ANN, 5).await);
    assert_eq!(app.sms_to(ANN, SECOND, &code).await, 200);
    assert_eq!(app.sms_to(ANN, SECOND, "Ann").await, 200);
    app.advance(Duration::from_secs(1));
    let sent = app.twilio.wait_delivered(6).await;
    let first_step = sent
        .iter()
        .find(|r| r.body == "Step one")
        .expect("Step one");
    assert_eq!(first_step.from, SECOND);
    let page = |app: &TestApp, phone: &'static str| {
        let path = format!("/admin/subscribers/{}", phone.replace('+', "%2B"));
        let request = app.admin(reqwest::Method::GET, &path);
        async move {
            let page: serde_json::Value = request.send().await.unwrap().json().await.unwrap();
            page
        }
    };
    // The operator sees which number it wrote to; none for a number not ours.
    assert_eq!(page(&app, ANN).await["our_number"], SECOND);
    assert_eq!(
        page(&app, stranger).await["our_number"],
        serde_json::Value::Null
    );

    // Written to at the other number, it is texted from that one from then on.
    assert_eq!(app.sms_to(ANN, FROM, "hello").await, 200);
    app.advance(Duration::from_secs(1));
    app.twilio.wait_delivered(7).await;
    app.advance(Duration::from_secs(1));
    let sent = app.twilio.wait_delivered(8).await;
    for step in ["Step two", "Step three"] {
        let sent_as = sent.iter().find(|r| r.body == step).expect(step);
        assert_eq!(sent_as.from, FROM, "{sent:#?}");
    }
    assert_eq!(page(&app, ANN).await["our_number"], FROM);
}

/// The banner names who messages come from: every sender, or the messaging service.
#[tokio::test]
async fn the_banner_names_every_sender() {
    use smsflow::config::{Config, Secret, Sender, TwilioConfig};
    let flows = tempfile::tempdir().unwrap();
    std::fs::write(flows.path().join("flows.toml"), FLOWS).unwrap();
    let banner = |sender: Sender, caller: Option<&str>| {
        // Its own data dir: a store just let go of may stay locked a moment.
        let data = tempfile::tempdir().unwrap();
        let config = Config {
            listen: "127.0.0.1:0".parse().unwrap(),
            public_url: Some("https://smsflow.test".into()),
            data_dir: data.path().to_path_buf(),
            flows_dir: flows.path().to_path_buf(),
            region: smsflow::phone::Region::default(),
            send_rate: 1.0,
            twilio: Some(TwilioConfig {
                account_sid: ACCOUNT_SID.into(),
                auth_token: Secret::new(AUTH_TOKEN),
                sender,
                caller_id: caller.map(str::to_string),
                api_base: "http://127.0.0.1:9".into(),
            }),
            auth_token: Some(Secret::new(AUTH_TOKEN)),
            api_token: None,
            admin_token: None,
            retention: None,
            cache_bytes: 64 << 20,
        };
        async move {
            let options = smsflow::app::Options {
                quiet_console: true,
                ..Default::default()
            };
            let app = smsflow::app::Application::build(config, options).await;
            let banner = app.expect("builds").banner();
            drop(data); // after the app that held it
            banner
        }
    };
    let several = banner(
        Sender::From(vec![FROM.into(), "+15005550007".into()]),
        Some(FROM),
    )
    .await;
    assert!(
        several.contains("provider:    twilio, 1 msg/s, from +15005550006, +15005550007"),
        "{several}"
    );
    assert!(several.contains("each of the numbers above"), "{several}");
    let service = banner(Sender::MessagingService("MG1".into()), Some(FROM)).await;
    assert!(
        service.contains("through messaging service MG1 (calls from +15005550006)"),
        "{service}"
    );
    // One phone number and a sender ID: "your number"; a sender ID alone places no calls.
    let mixed = banner(Sender::From(vec!["ACME".into(), FROM.into()]), Some(FROM)).await;
    assert!(mixed.contains("Phone Numbers > your number"), "{mixed}");
    let id_only = banner(Sender::From(vec!["ACME".into()]), None).await;
    assert!(
        id_only.contains("no phone number in TWILIO_FROM: no voice calls"),
        "{id_only}"
    );
}

/// An older smsflow's data dir, upgraded by `serve` and by `export`: each says so in its
/// output, once, since an older smsflow then refuses the dir.
#[tokio::test]
async fn serve_and_export_say_when_they_upgrade_an_older_data_dir() {
    let data = tempfile::tempdir().unwrap();
    drop(smsflow::store::Store::open(data.path()).expect("a new dir"));
    let make_older = || {
        let db = reopen(|| sled::open(data.path()));
        let meta = db.open_tree("meta").expect("meta");
        meta.insert("schema", &8u64.to_be_bytes()).expect("schema");
        db.flush().expect("flush");
    };
    let said = "upgraded from schema 8 to 11: an older smsflow now refuses it";

    make_older();
    let (child, _base, _lines, stderr) = serve_child(data.path()).await;
    sigterm(&child);
    let log = exits_cleanly(child, stderr, Duration::from_secs(10)).await;
    assert_eq!(
        log.iter().filter(|l| l.contains(said)).count(),
        1,
        "{log:?}"
    );

    // Opened again, the dir is this smsflow's own: nothing to say.
    let (child, _base, _lines, stderr) = serve_child(data.path()).await;
    sigterm(&child);
    let log = exits_cleanly(child, stderr, Duration::from_secs(10)).await;
    assert!(!log.iter().any(|l| l.contains("upgraded")), "{log:?}");

    make_older();
    let export = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_smsflow"))
            .args(["export", "--flows", "flows", "--data"])
            .arg(data.path())
            .output()
            .unwrap()
    };
    let out = export();
    assert!(out.status.success(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.matches(said).count(), 1, "{err}");
    let again = export();
    assert!(!String::from_utf8_lossy(&again.stderr).contains("upgraded"));
}
