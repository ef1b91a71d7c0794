//! The OTP JSON API through the socket: every exit code of the contract.

use std::time::Duration;

use serde_json::json;

use crate::helpers::*;

const PHONE: &str = "+15550004444";

/// A failure body has exactly the contract's fields, with the HTTP status repeated.
fn assert_failure(
    got: &(u16, Option<String>, serde_json::Value, String),
    status: u16,
    exit: u64,
    says: &str,
) {
    let (code, _, body, raw) = got;
    assert_eq!(*code, status, "{raw}");
    let obj = body
        .as_object()
        .unwrap_or_else(|| panic!("not a JSON object: {raw}"));
    let mut keys: Vec<&str> = obj.keys().map(String::as_str).collect();
    keys.sort();
    assert_eq!(
        keys,
        ["error", "exit_code", "message", "status_code"],
        "{raw}"
    );
    assert_eq!(body["message"], "failed");
    assert_eq!(body["exit_code"], exit, "{raw}");
    assert_eq!(body["status_code"], status as u64);
    let error = body["error"].as_str().unwrap();
    assert!(
        error.contains(says),
        "error {error:?} should mention {says:?}"
    );
}

fn assert_success(got: &(u16, Option<String>, serde_json::Value, String)) {
    assert_eq!(got.0, 200, "{}", got.3);
    assert_eq!(got.3, r#"{"message":"success","exit_code":0}"#);
}

/// Submits `otp` for the test phone through validate_otp.
async fn validate(
    app: &TestApp,
    otp: impl serde::Serialize,
) -> (u16, Option<String>, serde_json::Value, String) {
    app.otp("validate_otp", json!({ "phone": PHONE, "otp": otp }), None)
        .await
}

/// Requests a code and returns it as the fake Twilio API received it.
async fn code(app: &TestApp, n_total: usize) -> String {
    assert_success(&app.otp("get_otp", json!({ "phone": PHONE }), None).await);
    code_in(&app.twilio.last_to(PHONE, n_total).await)
}

#[tokio::test]
async fn the_right_code_validates_and_the_phone_becomes_verified() {
    let app = TestApp::spawn(FLOWS).await;
    let c = code(&app, 1).await;
    assert_eq!(app.state_of(PHONE).as_deref(), Some("awaiting_code"));
    // Sent with its life left, for Twilio to drop rather than deliver expired.
    let validity = app.twilio.delivered()[0].validity.clone();
    let validity: u64 = validity.as_deref().unwrap().parse().unwrap();
    assert!((590..=600).contains(&validity), "{validity}");
    assert_success(&validate(&app, &c).await);
    assert_eq!(app.state_of(PHONE).as_deref(), Some("verified"));
    // Once: the same code again (a double click) is refused, and says why.
    assert_failure(&validate(&app, &c).await, 403, 1, "already used");
    // The default flow setting: stay verified, no texts follow.
    app.outbox_settles().await;
    assert_eq!(app.twilio.delivered().len(), 1);
}

#[tokio::test]
async fn a_wrong_or_superseded_code_is_exit_1() {
    let app = TestApp::spawn(FLOWS).await;
    let first = code(&app, 1).await;
    let second = code(&app, 2).await;
    let third = code(&app, 3).await;
    let wrong = if third == "000000" {
        "111111"
    } else {
        "000000"
    };
    let got = validate(&app, &wrong).await;
    assert_failure(&got, 403, 1, "invalid OTP");
    if first != second && first != third {
        let got = validate(&app, &first).await;
        assert_failure(&got, 403, 1, "superseded");
    }
    assert_success(&validate(&app, &second).await);
}

#[tokio::test]
async fn an_expired_code_is_exit_1() {
    let flows = FLOWS.replace("[verify]", "[verify]\nttl = \"60s\"");
    let app = TestApp::spawn_on_manual_clock(&flows).await;
    let c = code(&app, 1).await;
    app.advance(Duration::from_secs(61));
    let got = validate(&app, &c).await;
    assert_failure(&got, 403, 1, "expired");
}

#[tokio::test]
async fn too_many_wrong_guesses_is_exit_3_with_retry_after() {
    let app = TestApp::spawn(FLOWS).await;
    let c = code(&app, 1).await;
    let wrong = if c == "000000" { "111111" } else { "000000" };
    for _ in 0..4 {
        let got = validate(&app, &wrong).await;
        assert_failure(&got, 403, 1, "invalid");
    }
    let got = validate(&app, &wrong).await;
    assert_failure(&got, 429, 3, "too many wrong guesses");
    // Guessing again cannot help; a new code may be asked for at once (one of five sent).
    assert_eq!(got.1.as_deref(), Some("1"), "Retry-After");
    let got = validate(&app, &c).await;
    assert_failure(&got, 429, 3, "too many wrong guesses");
    // Trying the locked code again and again fills no history: each wrong guess is an
    // entry, the refusals of a locked code are one.
    for _ in 0..20 {
        assert_failure(
            &validate(&app, &wrong).await,
            429,
            3,
            "too many wrong guesses",
        );
    }
    let phone = smsflow::phone::Phone::parse(PHONE).unwrap();
    let reasons: Vec<String> = (app.engine.store.history(&phone, 50).unwrap().iter())
        .filter_map(|h| match &h.as_ref().unwrap().record {
            smsflow::machine::Record::CodeRejected { reason } => Some(reason.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(reasons, ["wrong", "wrong", "wrong", "wrong", "locked"]);
    assert_success(&app.otp("get_otp", json!({ "phone": PHONE }), None).await);
}

#[tokio::test]
async fn too_many_codes_requested_is_exit_3_with_retry_after() {
    let app = TestApp::spawn(FLOWS).await;
    for _ in 0..5 {
        assert_success(&app.otp("get_otp", json!({ "phone": PHONE }), None).await);
    }
    let got = app.otp("get_otp", json!({ "phone": PHONE }), None).await;
    assert_failure(&got, 429, 3, "too many codes");
    // The first of the hour's five leaves the window an hour after it was sent: now, nearly.
    let retry: u64 = got.1.expect("Retry-After").parse().unwrap();
    assert!((3500..=3600).contains(&retry), "{retry}");

    // Refused requests text nobody: the API caller has its answer, and a text per refusal
    // would let anyone make smsflow message any number without limit.
    for _ in 0..3 {
        let again = app.otp("get_otp", json!({ "phone": PHONE }), None).await;
        assert_failure(&again, 429, 3, "too many codes");
    }
    assert_eq!(app.engine.store.outbox_len(), 0, "nothing queued");
    app.outbox_settles().await;
    assert_eq!(app.twilio.all_requests().len(), 5);
    // Four refusals in a row are one entry in the number's history, not four: an app asking
    // again and again does not fill it.
    let phone = smsflow::phone::Phone::parse(PHONE).unwrap();
    let kinds: Vec<&str> = (app.engine.store.history(&phone, 50).unwrap().iter())
        .map(|h| h.as_ref().unwrap().record.name())
        .collect();
    let refusals = kinds.iter().filter(|k| **k == "code_rate_limited").count();
    assert_eq!(refusals, 1, "{kinds:?}");
    assert_eq!(kinds.last(), Some(&"code_rate_limited"), "{kinds:?}");
}

#[tokio::test]
async fn malformed_requests_are_exit_2() {
    let app = TestApp::spawn(FLOWS).await;
    let raw = |body: &'static str, content_type: &'static str| {
        let req = app
            .http
            .post(format!("{}/authenticate/get_otp", app.base))
            .bearer_auth(API_TOKEN)
            .header("content-type", content_type)
            .body(body);
        async move {
            let r = req.send().await.unwrap();
            let status = r.status().as_u16();
            let text = r.text().await.unwrap();
            (status, None, serde_json::from_str(&text).unwrap(), text)
        }
    };
    assert_failure(
        &raw("{not json", "application/json").await,
        400,
        2,
        "invalid JSON",
    );
    for not_an_object in ["[]", r#"["+15550004444","sms"]"#, "null", r#""x""#] {
        assert_failure(
            &raw(not_an_object, "application/json").await,
            400,
            2,
            "must be a JSON object",
        );
    }
    // A channel that is no string, null too (as a null phone or code), is no channel.
    for body in [
        r#"{"phone":"+15550004444","channel":5}"#,
        r#"{"phone":"+15550004444","channel":null}"#,
    ] {
        assert_failure(
            &raw(body, "application/json").await,
            400,
            2,
            "channel must be a JSON string",
        );
    }
    assert_failure(
        &raw(
            r#"{"phone":"+15550004444","phone":"+15550005555"}"#,
            "application/json",
        )
        .await,
        400,
        2,
        "a field is given twice: duplicate field `phone`",
    );
    // A body that is not UTF-8, even in a field smsflow does not read.
    let not_utf8 = app
        .http
        .post(format!("{}/authenticate/get_otp", app.base))
        .bearer_auth(API_TOKEN)
        .header("content-type", "application/json")
        .body(b"{\"phone\":\"+15550004444\",\"x\":\"\xc0\xaf\"}".to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(not_utf8.status().as_u16(), 400);
    let said = not_utf8.text().await.unwrap();
    assert!(
        said.contains("not UTF-8") && said.contains("\"exit_code\":2"),
        "{said}"
    );
    assert_failure(
        &raw("[1,", "application/json").await,
        400,
        2,
        "invalid JSON",
    );
    assert_failure(
        &raw(r#"{"phone":"+15550004444"}"#, "text/plain").await,
        400,
        2,
        "Content-Type",
    );
    assert_failure(
        &app.otp("get_otp", json!({}), None).await,
        400,
        2,
        "missing field phone",
    );
    assert_failure(
        &app.otp("get_otp", json!({ "phone": "hello" }), None).await,
        400,
        2,
        "phone",
    );
    assert_failure(
        &app.otp("get_otp", json!({ "phone": 15550004444u64 }), None)
            .await,
        400,
        2,
        "phone",
    );
    assert_failure(
        &app.otp("get_otp", json!({ "phone": PHONE, "channel": "fax" }), None)
            .await,
        400,
        2,
        "channel",
    );
    assert_failure(&validate(&app, "12ab56").await, 400, 2, "6 digits");
    assert_failure(&validate(&app, "123").await, 400, 2, "6 digits");
    assert_failure(&validate(&app, &123456).await, 400, 2, "string");
    assert_failure(
        &app.otp("validate_otp", json!({ "phone": PHONE }), None)
            .await,
        400,
        2,
        "missing field otp",
    );
    // Given as null: there, of the wrong type (not missing).
    assert_failure(
        &validate(&app, serde_json::Value::Null).await,
        400,
        2,
        "otp must be a JSON string",
    );
    assert_failure(
        &app.otp("get_otp", json!({ "phone": null }), None).await,
        400,
        2,
        "phone must be a JSON string",
    );
    assert_eq!(app.state_of(PHONE), None, "nothing changed");
    assert_eq!(app.twilio.attempts(), 0);
    // A byte-order mark before the JSON (some Windows tools write one) is no mistake.
    assert_success(&raw("\u{feff}{\"phone\":\"+15550004444\"}", "application/json").await);
}

/// A request with no Authorization header at all.
async fn anonymous(
    app: &TestApp,
    route: &str,
    body: serde_json::Value,
    headers: &[(&str, &str)],
) -> (u16, Option<String>, serde_json::Value, String) {
    let mut req = app
        .http
        .post(format!("{}/authenticate/{route}", app.base))
        .json(&body);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    (
        status,
        None,
        serde_json::from_str(&text).unwrap_or_default(),
        text,
    )
}

#[tokio::test]
async fn a_missing_or_wrong_token_is_exit_4() {
    let app = TestApp::spawn_with(FLOWS, |c| {
        c.api_token = Some(smsflow::config::Secret::new("s3cret"))
    })
    .await;
    let got = anonymous(&app, "get_otp", json!({ "phone": PHONE }), &[]).await;
    assert_failure(&got, 401, 4, "missing Authorization");
    // The token under another scheme: the scheme is named, the token not said back.
    let got = anonymous(
        &app,
        "get_otp",
        json!({ "phone": PHONE }),
        &[("authorization", "Basic s3cret")],
    )
    .await;
    assert_failure(&got, 401, 4, "uses the Basic scheme, not Bearer");
    assert!(!got.3.contains("s3cret"), "{}", got.3);
    // The token alone, without a scheme: not said back, since it may be the token.
    let got = anonymous(
        &app,
        "get_otp",
        json!({ "phone": PHONE }),
        &[("authorization", "s3cret")],
    )
    .await;
    assert_failure(&got, 401, 4, "does not start with `Bearer `");
    assert!(!got.3.contains("s3cret"), "{}", got.3);
    // `Authorization: Bearer $TOKEN` with the variable unset.
    for empty in ["Bearer", "Bearer  "] {
        let got = anonymous(
            &app,
            "get_otp",
            json!({ "phone": PHONE }),
            &[("authorization", empty)],
        )
        .await;
        assert_failure(&got, 401, 4, "Bearer token is empty");
    }
    // Which scheme it wants, as HTTP asks of a 401.
    let r = (app.http.post(format!("{}/authenticate/get_otp", app.base)))
        .json(&json!({ "phone": PHONE }))
        .send()
        .await
        .unwrap();
    let challenge = r.headers().get("www-authenticate");
    assert_eq!(challenge.and_then(|v| v.to_str().ok()), Some("Bearer"));
    let got = app
        .otp("get_otp", json!({ "phone": PHONE }), Some("guess"))
        .await;
    assert_failure(&got, 401, 4, "wrong bearer token");
    assert_eq!(app.twilio.attempts(), 0);
    assert_success(
        &app.otp("get_otp", json!({ "phone": PHONE }), Some("s3cret"))
            .await,
    );
    // The scheme is case-insensitive.
    let lower = [("authorization", "bearer s3cret")];
    assert_success(&anonymous(&app, "get_otp", json!({ "phone": PHONE }), &lower).await);
}

#[tokio::test]
async fn without_a_token_the_api_is_off_beyond_loopback() {
    let app = TestApp::spawn_with(FLOWS, |c| {
        c.listen = "0.0.0.0:0".parse().unwrap();
        c.api_token = None;
    })
    .await;
    let got = anonymous(&app, "get_otp", json!({ "phone": PHONE }), &[]).await;
    assert_failure(&got, 401, 4, "SMSFLOW_API_TOKEN");
    assert_eq!(app.twilio.attempts(), 0);
}

#[tokio::test]
async fn without_a_token_the_api_refuses_requests_through_a_tunnel_or_a_public_url() {
    // Loopback with no public URL: local requests work, tunnelled ones do not.
    let local = TestApp::spawn_with(FLOWS, |c| {
        c.public_url = None;
        c.auth_token = None;
        c.api_token = None;
    })
    .await;
    assert_success(&anonymous(&local, "get_otp", json!({ "phone": PHONE }), &[]).await);
    // (`Via` alone is what a proxy that adds nothing else, such as Squid, sends.)
    for via_tunnel in [
        [("X-Forwarded-For", "203.0.113.9")],
        [("Via", "1.1 proxy")],
        [("True-Client-IP", "203.0.113.9")],
    ] {
        let tunnelled = anonymous(&local, "get_otp", json!({ "phone": PHONE }), &via_tunnel).await;
        assert_failure(&tunnelled, 401, 4, "SMSFLOW_API_TOKEN");
    }
    // A web page is not this machine: one whose domain was pointed at 127.0.0.1 names its
    // own host, and another site's page posting here sends its origin.
    for page in [
        [("Host", "rebind.attacker.example")],
        [("Origin", "https://evil.example")],
        [("Origin", "null")],
    ] {
        let got = anonymous(&local, "get_otp", json!({ "phone": PHONE }), &page).await;
        assert_failure(&got, 401, 4, "not sent by another site's page");
    }
    // A page of this machine's own (a local front end) is.
    let own = [("Origin", "http://localhost:3000")];
    assert_success(&anonymous(&local, "get_otp", json!({ "phone": PHONE }), &own).await);
    // A public URL means smsflow is exposed: no token, no API.
    let public = TestApp::spawn_with(FLOWS, |c| c.api_token = None).await;
    let got = anonymous(&public, "get_otp", json!({ "phone": PHONE }), &[]).await;
    assert_failure(&got, 401, 4, "SMSFLOW_API_TOKEN");
}

#[tokio::test]
async fn a_provider_failure_is_exit_5_and_the_unsent_code_is_not_usable() {
    let app = TestApp::spawn(FLOWS).await;
    app.twilio.fail_next(&[500]);
    let got = app.otp("get_otp", json!({ "phone": PHONE }), None).await;
    assert_failure(&got, 500, 5, "twilio");
    let reason = got.2["error"].as_str().unwrap().to_string();
    assert!(
        reason.contains("500"),
        "names the provider's answer: {reason}"
    );
    // The fake saw the code it refused to send; it must not validate.
    let refused = app.twilio.all_requests();
    assert_eq!(refused.len(), 1);
    let c = code_in(&refused[0].body);
    let got = validate(&app, &c).await;
    assert_failure(&got, 403, 1, "invalid");
    // A number never reached is not left waiting for a code, nor counted as opted in.
    assert_eq!(app.state_of(PHONE).as_deref(), Some("unverified"));
    // Once a code has gone out, a later failed one leaves the number waiting for that one.
    assert_success(&app.otp("get_otp", json!({ "phone": PHONE }), None).await);
    app.twilio.fail_next(&[500]);
    let got = app.otp("get_otp", json!({ "phone": PHONE }), None).await;
    assert_failure(&got, 500, 5, "twilio");
    assert_eq!(app.state_of(PHONE).as_deref(), Some("awaiting_code"));
}

/// The client gives up while the provider is still answering (and then refuses): the code
/// is withdrawn all the same.
#[tokio::test]
async fn a_code_whose_send_fails_after_the_client_left_is_not_usable() {
    let app = TestApp::spawn(FLOWS).await;
    app.twilio.hold();
    app.twilio.fail_next(&[500]);
    let mut req = app
        .http
        .post(format!("{}/authenticate/get_otp", app.base))
        .json(&json!({ "phone": PHONE }));
    if let Some(t) = &app.api_token {
        req = req.bearer_auth(t);
    }
    let client = tokio::spawn(req.send());
    // The send has reached Twilio; then the client leaves.
    eventually("the code's send to reach Twilio", async || {
        app.twilio.held() == 1
    })
    .await;
    client.abort();
    assert!(
        client.await.is_err_and(|e| e.is_cancelled()),
        "the client left first"
    );
    app.twilio.release();
    // The refusal comes, then the withdrawal (an event of its own).
    let phone = smsflow::phone::Phone::parse(PHONE).unwrap();
    let issued = || {
        app.engine
            .store
            .subscriber(&phone)
            .unwrap()
            .map_or(0, |s| s.codes.len())
    };
    eventually("the unsent code to be withdrawn", async || {
        app.twilio.attempts() == 1 && issued() == 0
    })
    .await;
    let c = code_in(&app.twilio.all_requests()[0].body);
    assert_failure(&validate(&app, &c).await, 403, 1, "invalid");
}

#[tokio::test]
async fn an_opted_out_phone_is_exit_1_saying_so() {
    let app = TestApp::spawn(FLOWS).await;
    app.sms(PHONE, "STOP").await;
    let got = app.otp("get_otp", json!({ "phone": PHONE }), None).await;
    assert_failure(&got, 403, 1, "opted out");
    app.outbox_settles().await;
    assert_eq!(
        app.twilio.attempts(),
        0,
        "nothing sent to an opted-out phone"
    );
}

#[tokio::test]
async fn the_voice_channel_places_a_call_that_reads_the_code() {
    let app = TestApp::spawn(FLOWS).await;
    let got = app
        .otp(
            "get_otp",
            json!({ "phone": PHONE, "channel": "voice" }),
            None,
        )
        .await;
    assert_success(&got);
    let calls = app.twilio.calls();
    assert_eq!(calls.len(), 1);
    let twiml = parse_xml(&calls[0]);
    assert_eq!(twiml.name, "Response");
    assert_eq!(twiml.names(), ["Say", "Pause", "Say"]);
    let spoken = &twiml.children[0].text;
    let digits = code_in(spoken);
    assert_eq!(digits.len(), 6, "{spoken}");
    assert!(
        spoken.contains(", "),
        "digits are read one by one: {spoken}"
    );
    assert_success(&validate(&app, &digits).await);
}

#[tokio::test]
async fn a_failed_calls_error_does_not_give_away_the_code_it_spelled_out() {
    let app = TestApp::spawn(FLOWS).await;
    app.twilio.fail_next(&[500]);
    let voice = json!({ "phone": PHONE, "channel": "voice" });
    let got = app.otp("get_otp", voice, None).await;
    assert_failure(&got, 500, 5, "twilio");
    let calls = app.twilio.calls();
    let spoken = &parse_xml(&calls[0]).children[0].text;
    let spelled = spoken
        .trim_start_matches(|c: char| !c.is_ascii_digit())
        .trim_end_matches(|c: char| !c.is_ascii_digit());
    assert_eq!(spelled.len(), 16, "six digits spelled out: {spoken}");
    let reason = got.2["error"].as_str().unwrap();
    assert!(reason.contains("scripted failure"), "{reason}");
    let encoded = spelled.replace(", ", "%2C+");
    assert!(
        !reason.contains(spelled) && !reason.contains(&encoded) && reason.contains("[digits]"),
        "{reason}"
    );
}

/// An app's code whose text says to enter it in the app (`api_send`): texting it back does
/// not use it up, so the app's check still passes, and other texts are no guesses. Nor can
/// texting tell a guess right: every text that reads as a code gets the answer the code
/// gets, as often as it is sent.
#[tokio::test]
async fn an_apps_code_texted_back_stays_the_apps_to_validate() {
    let flows = FLOWS.replace(
        "[verify]",
        "[verify]\napi_send = \"{code}: enter it in the app\"",
    );
    let app = TestApp::spawn(&flows).await;
    let c = code(&app, 1).await;
    let (_, twiml) = app.sms(PHONE, "what is this?").await;
    assert!(twiml.contains("reply JOIN to subscribe"), "{twiml}");
    let (_, right) = app.sms(PHONE, &c).await;
    assert!(right.contains("enter that code in the app"), "{right}");
    for n in 0..8u32 {
        let wrong = format!("{:06}", (c.parse::<u32>().unwrap() + 1 + n) % 1_000_000);
        let (_, twiml) = app.sms(PHONE, &wrong).await;
        assert_eq!(
            twiml, right,
            "the wrong code {n} is answered as the right one"
        );
    }
    assert_eq!(app.state_of(PHONE).as_deref(), Some("awaiting_code"));
    assert_success(&validate(&app, &c).await);
    assert_eq!(app.state_of(PHONE).as_deref(), Some("verified"));
}

/// Twilio took the request and the connection dropped before an answer: the code may have
/// gone out, so it is kept and validates; the app is told it may still arrive.
#[tokio::test]
async fn a_code_whose_send_got_no_answer_is_kept_as_it_may_have_arrived() {
    use tokio::io::AsyncReadExt;
    // Reads the request (its code included), then hangs up without a word.
    let hangs_up = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", hangs_up.local_addr().unwrap());
    let (heard_tx, mut heard) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = hangs_up.accept().await {
            let mut request = Vec::new();
            let mut buf = [0u8; 4096];
            while !String::from_utf8_lossy(&request).contains("Body=") {
                match socket.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => request.extend_from_slice(&buf[..n]),
                }
            }
            // The rest of the form, then the hang-up.
            tokio::time::sleep(Duration::from_millis(100)).await;
            if let Ok(n) = socket.try_read(&mut buf) {
                request.extend_from_slice(&buf[..n]);
            }
            let _ = heard_tx.send(String::from_utf8_lossy(&request).into_owned());
        }
    });
    let app = TestApp::spawn_with(FLOWS, |c| {
        if let Some(t) = c.twilio.as_mut() {
            t.api_base = base;
        }
    })
    .await;
    let got = app.otp("get_otp", json!({ "phone": PHONE }), None).await;
    assert_failure(&got, 500, 5, "may still arrive");
    let request = heard.recv().await.unwrap();
    // `Code%3A+123456`, as the form encodes the text.
    let body = request.rsplit("Body=").next().unwrap();
    let body = body
        .split('&')
        .next()
        .unwrap()
        .replace("%3A", ":")
        .replace('+', " ");
    let c = code_in(&body);
    assert_eq!(app.state_of(PHONE).as_deref(), Some("awaiting_code"));
    assert_success(&validate(&app, &c).await);
}

/// Codes withdrawn unsent do not spend `max_codes_per_hour`: after a provider outage,
/// codes go out again at once.
#[tokio::test]
async fn codes_the_provider_refused_do_not_count_against_the_hours_cap() {
    let flows = FLOWS.replace("[verify]", "[verify]\nmax_codes_per_hour = 2");
    let app = TestApp::spawn(&flows).await;
    app.twilio.fail_next(&[500, 500, 500]);
    for phone in ["+14155550201", "+14155550202", "+14155550203"] {
        let got = app.otp("get_otp", json!({ "phone": phone }), None).await;
        assert_failure(&got, 500, 5, "twilio");
    }
    for phone in ["+14155550204", "+14155550205"] {
        assert_success(&app.otp("get_otp", json!({ "phone": phone }), None).await);
    }
    // The two sent spent it.
    let got = app
        .otp("get_otp", json!({ "phone": "+14155550206" }), None)
        .await;
    assert_failure(&got, 429, 3, "this hour");
}

/// A number Twilio says no text can reach (21211 no such number, 21612 not reachable by
/// SMS, 21614 a landline) is the app's input: 400 exit 2, not an outage's 500.
#[tokio::test]
async fn a_phone_twilio_cannot_text_is_a_bad_request() {
    let app = TestApp::spawn(FLOWS).await;
    for code in [21211, 21612, 21614] {
        app.twilio.refuse_next(code);
        let got = app.otp("get_otp", json!({ "phone": PHONE }), None).await;
        assert_failure(&got, 400, 2, "cannot text this phone");
    }
    // Any other refusal is still the provider's.
    app.twilio.refuse_next(21408);
    let got = app.otp("get_otp", json!({ "phone": PHONE }), None).await;
    assert_failure(&got, 500, 5, "did not send the code");
}

/// Twilio busy (429) with a Retry-After: the app is told to try again then (503 exit 5),
/// not sent a bare 500; the code went nowhere and is withdrawn.
#[tokio::test]
async fn a_busy_provider_passes_its_retry_after_on_to_the_app() {
    let app = TestApp::spawn(FLOWS).await;
    app.twilio.busy_next(30);
    let got = app.otp("get_otp", json!({ "phone": PHONE }), None).await;
    assert_failure(&got, 503, 5, "did not send the code");
    assert_eq!(got.1.as_deref(), Some("30"), "Retry-After");
    assert_eq!(app.state_of(PHONE).as_deref(), Some("unverified"));
}

#[tokio::test]
async fn with_after_otp_api_form_the_phone_continues_into_the_form_by_sms() {
    let flows = FLOWS.replace("[verify]", "[verify]\nafter_otp_api = \"form\"");
    let app = TestApp::spawn(&flows).await;
    let c = code(&app, 1).await;
    assert_success(&validate(&app, &c).await);
    let sent = app.twilio.wait_delivered(3).await;
    assert_eq!(sent[1].body, "Verified!");
    assert_eq!(sent[2].body, "Name?");
    let (_, twiml) = app.sms(PHONE, "Zed").await;
    assert!(twiml.contains("Welcome Zed"), "{twiml}");
}

#[tokio::test]
async fn validating_for_a_number_never_seen_stores_nothing() {
    let app = TestApp::spawn(FLOWS).await;
    let got = validate(&app, "123456").await;
    assert_failure(&got, 403, 1, "invalid");
    assert_eq!(app.state_of(PHONE), None);
}

#[tokio::test]
async fn a_code_twilio_refuses_with_21610_opts_the_number_out() {
    let app = TestApp::spawn(FLOWS).await;
    // The number texted STOP to the carrier: Twilio refuses to message it.
    app.twilio.unsubscribe(PHONE);
    let got = app.otp("get_otp", json!({ "phone": PHONE }), None).await;
    assert_failure(&got, 403, 1, "opted out");
    assert_eq!(app.state_of(PHONE).as_deref(), Some("opted_out"));
    // The unsent code does not count against the number's send limit.
    let phone = smsflow::phone::Phone::parse(PHONE).unwrap();
    let record = app.engine.store.subscriber(&phone).unwrap().unwrap();
    assert!(record.code_sends.is_empty(), "{:?}", record.code_sends);
    // And asking again is refused: the number is opted out now. (That an unsent code is
    // withdrawn is shown by a_provider_failure_is_exit_5_and_the_unsent_code_is_not_usable.)
    let again = app.otp("get_otp", json!({ "phone": PHONE }), None).await;
    assert_failure(&again, 403, 1, "opted out");
}

#[tokio::test]
async fn spaces_around_a_code_and_the_channel_in_capitals_are_accepted() {
    let app = TestApp::spawn(FLOWS).await;
    let sms = json!({ "phone": PHONE, "channel": "SMS" });
    assert_success(&app.otp("get_otp", sms, None).await);
    let code = code_in(&app.twilio.last_to(PHONE, 1).await);
    assert_success(&validate(&app, format!(" {code} ")).await);
}

#[tokio::test]
async fn an_oversize_body_wrong_method_or_unknown_route_is_answered_in_the_apis_json_shape() {
    let app = TestApp::spawn(FLOWS).await;
    let huge = json!({ "phone": PHONE, "pad": "x".repeat(70 * 1024) });
    let got = anonymous(&app, "get_otp", huge, &[]).await;
    assert_failure(&got, 413, 2, "64 KiB");

    let r = app.get("/authenticate/get_otp").await;
    assert_eq!(r.status().as_u16(), 405);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["exit_code"], 2);
    let got = anonymous(&app, "send_otp", json!({ "phone": PHONE }), &[]).await;
    assert_failure(&got, 404, 2, "no route");

    let r = app
        .admin(reqwest::Method::PUT, "/admin/reload")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 405);
    let body: serde_json::Value = r.json().await.unwrap();
    assert!(
        body["error"].as_str().unwrap().contains("not allowed"),
        "{body}"
    );
}

/// Codes asked for at once: one displaced (only the `valid_codes` latest count) before its
/// send is not sent, and its caller hears so; every code a caller was told is sent is one
/// that still counts. (Whether a round displaces one depends on how the three calls meet
/// the writer; the rule itself is `a_number_holds_only_its_latest_valid_codes_...`.)
#[tokio::test]
async fn a_code_displaced_before_its_send_is_not_sent_and_its_caller_is_told() {
    let app = TestApp::spawn(FLOWS).await;
    for round in 0..20 {
        let phone = format!("+1555000{}", 5000 + round);
        let ask = || app.otp("get_otp", json!({ "phone": phone }), None);
        let (a, b, c) = tokio::join!(ask(), ask(), ask());
        let answers = [a, b, c];
        for refused in answers.iter().filter(|g| g.0 != 200) {
            assert_failure(refused, 403, 1, "a newer code was issued");
        }
        // A caller hears back once its code's send is done: every success was sent, and
        // nothing else was.
        let texts: Vec<String> = (app.twilio.delivered().into_iter())
            .filter(|r| r.to == phone)
            .map(|r| r.body)
            .collect();
        let sent = answers.iter().filter(|g| g.0 == 200).count();
        assert_eq!(texts.len(), sent, "round {round}: {texts:?}");
        // With one displaced, the two sent are the two that count: the older validates.
        if sent == 2 {
            let otp = code_in(&texts[0]);
            let got = (app.otp("validate_otp", json!({ "phone": phone, "otp": otp }), None)).await;
            assert_success(&got);
        }
    }
}

/// A code sent before a reload changed `code_length` is still taken by the API until it
/// expires, as a text takes it; a string of neither length is still refused as malformed.
#[tokio::test]
async fn a_code_sent_before_a_reload_changed_code_length_is_still_taken() {
    let app = TestApp::spawn(FLOWS).await;
    let sent = code(&app, 1).await;
    assert_eq!(sent.len(), 6);
    let longer = FLOWS.replace("[verify]\n", "[verify]\ncode_length = 8\n");
    app.save_flows_and_reload(&longer).await;
    assert_failure(&validate(&app, "1234567").await, 400, 2, "8 digits");
    assert_success(&validate(&app, &sent).await);
}

/// `verify.max_codes_per_hour` holds for every number together, texts and the API alike:
/// once the hour's codes are spent, a texter is told to try again in a while (not that it
/// asked too often) and an app gets 429 with the time to wait; nothing more is sent.
#[tokio::test]
async fn once_the_hours_codes_are_spent_no_number_gets_one_until_their_minute_is_an_hour_old() {
    let flows = FLOWS.replace("[verify]\n", "[verify]\nmax_codes_per_hour = 2\n");
    let app = TestApp::spawn(&flows).await;
    for who in ["+15550007001", "+15550007002"] {
        assert_eq!(app.sms(who, "JOIN").await.0, 200);
    }
    app.twilio.wait_delivered(2).await;
    let (status, twiml) = app.sms("+15550007003", "JOIN").await;
    assert_eq!(status, 200);
    assert!(twiml.contains("too many codes right now"), "{twiml}");
    assert_eq!(app.state_of("+15550007003").as_deref(), Some("unverified"));
    let (status, retry, body, _) = app
        .otp(
            "get_otp",
            serde_json::json!({"phone": "+15550007004"}),
            None,
        )
        .await;
    assert_eq!((status, &body["exit_code"]), (429, &serde_json::json!(3)));
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("to all numbers this hour"),
        "{body}"
    );
    // Counted by the minute: until an hour after the end of the codes' minute.
    let retry: u64 = retry.expect("Retry-After").parse().unwrap();
    assert!((3600..=3660).contains(&retry), "{retry}");
    // The app's refused number was never met: nothing is kept of it (a public sign-up page
    // flooded once the hour's codes are spent would leave a record per request; it is
    // counted all the same, see the daemon's tests).
    assert_eq!(app.state_of("+15550007004"), None);
    app.outbox_settles().await;
    assert_eq!(app.twilio.attempts(), 2, "nothing more was sent");
    // The hour's count is kept in the store: a restart does not open the gate.
    let app = app.restart(Duration::ZERO).await;
    let (_, twiml) = app.sms("+15550007005", "JOIN").await;
    assert!(twiml.contains("too many codes right now"), "{twiml}");
    // Nor does a reload that lowers the limit and raises it back: the hour's codes still
    // count; only a limit above them lets one more go.
    for (most, busy) in [(1, true), (2, true), (3, false)] {
        let reloaded = flows.replace(
            "max_codes_per_hour = 2\n",
            &format!("max_codes_per_hour = {most}\n"),
        );
        app.save_flows_and_reload(&reloaded).await;
        let (_, twiml) = app.sms(&format!("+155500071{most:02}"), "JOIN").await;
        assert_eq!(
            twiml.contains("too many codes right now"),
            busy,
            "{most}: {twiml}"
        );
    }
    app.twilio.wait_delivered(3).await;
    app.outbox_settles().await;
    assert_eq!(
        app.twilio.attempts(),
        3,
        "only the one the raised limit let go"
    );
}
