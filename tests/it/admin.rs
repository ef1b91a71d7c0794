//! The operator surface through the socket: admin API, export, hot reload, metrics.

use std::time::Duration;

use crate::helpers::*;

const A: &str = "+15550000001";
const B: &str = "+15550000002";
const C: &str = "+15550000003";

const CHOICES: &str = r#"
[bot]
name = "Survey"
[verify]
send = "Code: {code}"
verified = "Verified!"
[replies]
help = "Help v1"
[[form.field]]
key = "first_name"
ask = "Name?"
[[form.field]]
key = "color"
ask = "Color? R, G or B"
expect = { choices = { R = "red", G = "green", B = "blue" } }
[[sequence]]
name = "later"
steps = [{ after = "1h", say = "Hello again" }]
"#;

/// GET with `token`, or the daemon's admin token when `None`.
async fn get(app: &TestApp, path: &str, token: Option<&str>) -> (u16, serde_json::Value) {
    let mut req = app.http.get(format!("{}{path}", app.base));
    if let Some(t) = token.or(app.admin_token.as_deref()) {
        req = req.bearer_auth(t);
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(serde_json::Value::Null))
}

async fn send(app: &TestApp, method: reqwest::Method, path: &str) -> (u16, serde_json::Value) {
    let r = app.admin(method, path).send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(serde_json::Value::Null))
}

/// `POST /admin/reload`, with the admin token.
async fn reload(app: &TestApp) -> reqwest::Response {
    app.admin(reqwest::Method::POST, "/admin/reload")
        .send()
        .await
        .unwrap()
}

async fn text(app: &TestApp, path: &str) -> String {
    app.admin(reqwest::Method::GET, path)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

fn phones(list: &serde_json::Value) -> Vec<String> {
    list["subscribers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["phone"].as_str().unwrap().to_string())
        .collect()
}

/// A verified number that answered the form: name and color.
async fn enrol(app: &TestApp, phone: &str, name: &str, color: &str, delivered_before: usize) {
    app.sms(phone, "JOIN").await;
    let code = code_in(&app.twilio.last_to(phone, delivered_before + 1).await);
    app.sms(phone, &code).await;
    app.sms(phone, name).await;
    let (_, twiml) = app.sms(phone, color).await;
    // The first step comes later: the last answer is thanked by `form.done`.
    assert!(
        twiml.contains("Thanks, you&apos;re all set."),
        "form done: {twiml}"
    );
}

#[tokio::test]
async fn subscribers_can_be_listed_filtered_and_paged() {
    let app = TestApp::spawn(FLOWS).await;
    app.sms(A, "hello").await;
    app.sms(B, "JOIN").await;
    app.sms(C, "STOP").await;

    let (status, all) = get(&app, "/admin/subscribers", None).await;
    assert_eq!(status, 200);
    assert_eq!(phones(&all), [A, B, C]);
    assert_eq!(all["next"], serde_json::Value::Null);

    let (_, out) = get(&app, "/admin/subscribers?state=opted_out", None).await;
    assert_eq!(phones(&out), [C]);
    let (_, waiting) = get(&app, "/admin/subscribers?state=awaiting_code", None).await;
    assert_eq!(phones(&waiting), [B]);

    let (_, page1) = get(&app, "/admin/subscribers?limit=2", None).await;
    assert_eq!(phones(&page1), [A, B]);
    let next = page1["next"].as_str().unwrap().to_string();
    let (_, page2) = get(
        &app,
        &format!(
            "/admin/subscribers?limit=2&after={}",
            next.replace('+', "%2B")
        ),
        None,
    )
    .await;
    assert_eq!(phones(&page2), [C]);
    assert_eq!(page2["next"], serde_json::Value::Null);

    let (status, err) = get(&app, "/admin/subscribers?state=sleeping", None).await;
    assert_eq!(status, 400);
    assert!(err["error"].as_str().unwrap().contains("unknown state"));

    // Every bad query is a JSON error naming what is wrong.
    for bad in ["-1", "abc", "0", "1001"] {
        let (status, err) = get(&app, &format!("/admin/subscribers?limit={bad}"), None).await;
        assert_eq!(status, 400);
        assert_eq!(
            err["error"], "limit must be a whole number from 1 to 1000",
            "{bad}"
        );
    }
    // A misspelt parameter is refused, not ignored (it would list everyone).
    let (status, err) = get(&app, "/admin/subscribers?stat=verified", None).await;
    assert_eq!(status, 400);
    assert!(err["error"].as_str().unwrap().contains("stat"), "{err}");
    let (status, err) = get(&app, "/admin/subscribers?after=abc", None).await;
    assert_eq!(status, 400);
    assert!(
        err["error"].as_str().unwrap().starts_with("after:"),
        "{err}"
    );
}

/// A route that takes no parameters refuses any: a guess such as `?dry_run=1` on an erase
/// or an opt-out must not be done for real.
#[tokio::test]
async fn routes_without_parameters_refuse_any_and_change_nothing() {
    use reqwest::Method;
    let app = TestApp::spawn(FLOWS).await;
    app.sms(A, "JOIN").await;
    let number = A.replace('+', "%2B");
    for (method, path) in [
        (
            Method::DELETE,
            format!("/admin/subscribers/{number}?dry_run=1"),
        ),
        (
            Method::POST,
            format!("/admin/subscribers/{number}/opt-out?dry_run=1"),
        ),
        (Method::GET, format!("/admin/subscribers/{number}?fields=1")),
        (Method::POST, "/admin/reload?force=1".to_string()),
    ] {
        let (status, err) = send(&app, method.clone(), &path).await;
        assert_eq!(status, 400, "{method} {path}");
        let said = err["error"].as_str().unwrap_or_default();
        assert!(
            said.starts_with("query string:") && said.contains("unknown field"),
            "{said}"
        );
    }
    assert_eq!(
        app.state_of(A).as_deref(),
        Some("awaiting_code"),
        "neither erased nor opted out"
    );
}

#[tokio::test]
async fn one_subscriber_shows_its_state_timer_history_and_what_became_of_its_messages() {
    let app = TestApp::spawn(FLOWS).await;
    app.sms(A, "JOIN").await;
    let (status, s) = get(&app, "/admin/subscribers/%2B15550000001", None).await;
    assert_eq!(status, 200);
    assert_eq!(s["state"], "awaiting_code");
    let events: Vec<&str> = s["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["event"].as_str().unwrap())
        .collect();
    assert_eq!(events, ["opted_in", "code_sent"]);
    assert!(
        !s.to_string().contains("\"code\":"),
        "codes are never shown"
    );
    // What became of its messages: the code was sent (its text is not shown).
    app.twilio.wait_delivered(1).await;
    let (_, s) = get(&app, "/admin/subscribers/%2B15550000001", None).await;
    let messages = s["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 1, "{s}");
    assert_eq!(messages[0]["status"], "sent");
    assert!(messages[0]["provider_sid"]
        .as_str()
        .unwrap()
        .starts_with("SM"));
    let code = code_in(&app.twilio.last_to(A, 1).await);
    assert!(!s.to_string().contains(&code), "{s}");
    // Its times are written as every time on the page is.
    let written = |t: &serde_json::Value| {
        let t = t.as_str().unwrap_or_default();
        t.ends_with("+00:00") && chrono::DateTime::parse_from_rfc3339(t).is_ok()
    };
    assert!(written(&messages[0]["updated_at"]), "{s}");
    assert!(
        written(&s["created_at"]) && written(&s["history"][0]["at"]),
        "{s}"
    );
    // A send Twilio refuses for good shows as failed, with Twilio's code and words.
    let s = join_refused_by_twilio(&app).await;
    let failed = &s["messages"][0];
    assert_eq!(
        (&failed["status"], &failed["error_code"], &failed["error"]),
        (
            &serde_json::json!("failed"),
            &serde_json::json!(20500),
            &serde_json::json!("Twilio answered 400 Bad Request: scripted failure")
        ),
        "{s}"
    );
    // One still on its way is queued, its try under way counted (on disk before it is made).
    app.twilio.hold();
    app.sms("+15550000003", "JOIN").await;
    eventually("the send to be under way", async || app.twilio.held() == 1).await;
    let (_, s) = get(&app, "/admin/subscribers/%2B15550000003", None).await;
    assert_eq!(
        (&s["messages"][0]["status"], &s["messages"][0]["attempts"]),
        (&serde_json::json!("queued"), &serde_json::json!(1)),
        "{s}"
    );
    app.twilio.release();

    let (status, err) = get(&app, "/admin/subscribers/not-a-phone", None).await;
    assert_eq!(status, 400);
    assert!(err["error"].as_str().unwrap().contains("phone"));
    // A path that does not even decode, and a route that does not exist: JSON all the same.
    let (status, err) = get(&app, "/admin/subscribers/%FF", None).await;
    assert_eq!(status, 400);
    assert!(
        err["error"].as_str().unwrap().contains("phone in path"),
        "{err}"
    );
    let (status, err) = get(&app, "/admin/no-such-thing", None).await;
    assert_eq!(status, 404);
    assert!(err["error"].as_str().unwrap().contains("no route"), "{err}");
    let (status, _) = get(&app, "/admin/subscribers/%2B15550009999", None).await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn an_admin_opt_out_stops_every_further_message() {
    let app = TestApp::spawn_on_manual_clock(FLOWS).await;
    app.sms(A, "JOIN").await;
    let code = code_in(&app.twilio.last_to(A, 1).await);
    app.sms(A, &code).await;
    app.sms(A, "Ann").await;
    assert_eq!(app.state_of(A).as_deref(), Some("in_sequence"));
    let (status, s) = send(
        &app,
        reqwest::Method::POST,
        "/admin/subscribers/%2B15550000001/opt-out",
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(s["state"], "opted_out");
    assert_eq!(s["next_timer"], serde_json::Value::Null);
    // Nothing is left that could send: no timer, and the outbox empties once the code's
    // send is recorded (the clock moved past every step's time, and the wait after it, are
    // only a backstop).
    assert_eq!(app.engine.store.timer_count(), 0);
    eventually("the outbox to empty", async || {
        app.engine.store.outbox_len() == 0
    })
    .await;
    app.advance(Duration::from_secs(60));
    quiet_for(Duration::from_millis(500)).await;
    assert_eq!(
        app.twilio.delivered().len(),
        1,
        "only the code was ever sent"
    );
}

/// An admin action waits for its request's whole body (these routes take none): a request cut
/// off before its end, or one whose body runs past the limit, changes nothing.
#[tokio::test]
async fn an_admin_action_whose_body_is_cut_off_or_too_large_changes_nothing() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = TestApp::spawn(FLOWS).await;
    app.sms(A, "JOIN").await;
    let before = app.state_of(A);
    assert_eq!(before.as_deref(), Some("awaiting_code"));
    let connect = || tokio::net::TcpStream::connect(app.base.trim_start_matches("http://"));
    let head = |method: &str, path: &str, framing: &str| {
        format!(
            "{method} {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\n\
             {framing}\r\n\r\n"
        )
    };
    // Three bytes of a hundred, then nothing.
    let mut cut = connect().await.unwrap();
    let erase = head(
        "DELETE",
        "/admin/subscribers/%2B15550000001",
        "Content-Length: 100",
    );
    cut.write_all(format!("{erase}abc").as_bytes())
        .await
        .unwrap();
    quiet_for(Duration::from_millis(500)).await;
    assert_eq!(app.state_of(A), before, "erased before the body came");
    drop(cut);
    // A chunked body past 64 KiB.
    let mut big = connect().await.unwrap();
    let opt_out = head(
        "POST",
        "/admin/subscribers/%2B15550000001/opt-out",
        "Transfer-Encoding: chunked",
    );
    let chunk = "x".repeat(70_000);
    let request = format!("{opt_out}{:x}\r\n{chunk}\r\n0\r\n\r\n", chunk.len());
    big.write_all(request.as_bytes()).await.unwrap();
    let mut answer = vec![0; 4096];
    let n = big.read(&mut answer).await.unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]).to_string();
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert_eq!(
        app.state_of(A),
        before,
        "opted out with a body over the limit"
    );
    app.stop().await;
}

/// An older smsflow kept `+44 0…` as written (the OTP or admin API took it so); this one reads
/// it as `+44…`. Such a record is still reached by the number it is listed under, even when
/// the number as read today has a record of its own.
#[tokio::test]
async fn a_record_kept_under_a_trunk_zero_by_an_older_smsflow_is_reached_by_its_listed_number() {
    let app = TestApp::spawn(CHOICES).await;
    let now = chrono::Utc::now();
    let record = |text: &str| smsflow::store::Commit {
        subscriber: Some(smsflow::machine::Subscriber::new(
            smsflow::phone::Phone::from_stored(text.into()).unwrap(),
            now,
        )),
        ..smsflow::store::Commit::default()
    };
    let (old, today) = ("+4402079460018", "+442079460018");
    app.engine.store.commit_many(&[record(old)], now).unwrap();
    let (status, shown) = get(&app, "/admin/subscribers/%2B4402079460018", None).await;
    assert_eq!(status, 200, "{shown}");
    assert_eq!(shown["phone"], old);
    // The number as read today has no record of its own yet.
    let (status, _) = get(&app, "/admin/subscribers/%2B442079460018", None).await;
    assert_eq!(status, 404);
    app.engine.store.commit_many(&[record(today)], now).unwrap();
    let (_, all) = get(&app, "/admin/subscribers", None).await;
    assert_eq!(phones(&all), [old, today]);
    // Paged one at a time, the cursor is the old text as listed, and today's comes next.
    let (_, first) = get(&app, "/admin/subscribers?limit=1", None).await;
    assert_eq!(
        (phones(&first), &first["next"]),
        (vec![old.to_string()], &serde_json::json!(old))
    );
    let (_, second) = get(
        &app,
        "/admin/subscribers?limit=1&after=%2B4402079460018",
        None,
    )
    .await;
    assert_eq!(phones(&second), [today], "{second}");
    let (_, shown) = get(&app, "/admin/subscribers/%2B4402079460018", None).await;
    assert_eq!(shown["phone"], old);
    let (status, _) = send(
        &app,
        reqwest::Method::DELETE,
        "/admin/subscribers/%2B4402079460018",
    )
    .await;
    assert_eq!(status, 204);
    let (_, all) = get(&app, "/admin/subscribers", None).await;
    assert_eq!(phones(&all), [today], "the old record went, not today's");
}

#[tokio::test]
async fn erasing_a_number_removes_it_from_the_list_and_the_export() {
    let app = TestApp::spawn(CHOICES).await;
    enrol(&app, A, "Ann", "r", 0).await;
    enrol(&app, B, "Bob", "blue", 1).await;
    let (status, _) = send(
        &app,
        reqwest::Method::DELETE,
        "/admin/subscribers/%2B15550000001",
    )
    .await;
    assert_eq!(status, 204);
    let (_, all) = get(&app, "/admin/subscribers", None).await;
    assert_eq!(phones(&all), [B]);
    let (status, _) = get(&app, "/admin/subscribers/%2B15550000001", None).await;
    assert_eq!(status, 404);
    // Erasing it again finds nothing: 404, and no commit is made or counted.
    let commits = app.engine.writer_work().commits;
    let (status, _) = send(
        &app,
        reqwest::Method::DELETE,
        "/admin/subscribers/%2B15550000001",
    )
    .await;
    assert_eq!(status, 404);
    assert_eq!(app.engine.writer_work().commits, commits);
    let csv = text(&app, "/admin/export.csv").await;
    assert!(!csv.contains(A) && !csv.contains("Ann"), "{csv}");
    assert!(csv.contains(B));
    let metrics = text(&app, "/metrics").await;
    assert!(
        metrics.contains("smsflow_subscribers{state=\"in_sequence\"} 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn the_export_has_a_row_per_phone_with_category_columns() {
    let app = TestApp::spawn(CHOICES).await;
    enrol(&app, A, "Ann", "r", 0).await;
    enrol(&app, B, "Bob", "blue", 1).await;
    app.sms(C, "STOP").await;

    let csv = text(&app, "/admin/export.csv").await;
    let mut reader = csv::Reader::from_reader(csv.as_bytes());
    let header: Vec<String> = reader
        .headers()
        .unwrap()
        .iter()
        .map(str::to_string)
        .collect();
    assert_eq!(
        header,
        [
            "phone",
            "state",
            "opted_in",
            "verified_at",
            "sequence",
            "step",
            "created_at",
            "last_inbound_at",
            "first_name",
            "color"
        ]
    );
    let rows: Vec<Vec<String>> = reader
        .records()
        .map(|r| r.unwrap().iter().map(str::to_string).collect())
        .collect();
    assert_eq!(rows.len(), 3);
    assert_eq!(&rows[0][..3], [A, "in_sequence", "true"]);
    assert_eq!(&rows[0][4..6], ["later", "1"]);
    assert_eq!(&rows[0][8..], ["Ann", "red"]);
    assert_eq!(&rows[1][8..], ["Bob", "blue"]);
    assert_eq!(&rows[2][..3], [C, "opted_out", "false"]);
    assert!(
        !rows[0][3].is_empty() && rows[2][3].is_empty(),
        "verified_at"
    );

    let one_hot = text(&app, "/admin/export.csv?one_hot=1").await;
    let first = one_hot.lines().next().unwrap();
    assert!(
        first.ends_with("color=red,color=green,color=blue"),
        "{first}"
    );
    assert!(one_hot.lines().nth(1).unwrap().ends_with("Ann,red,1,0,0"));
    assert!(one_hot.lines().nth(2).unwrap().ends_with("Bob,blue,0,0,1"));
    // No answer, no category: every indicator is 0.
    assert!(one_hot.lines().nth(3).unwrap().ends_with(",0,0,0"));
    assert_eq!(text(&app, "/admin/export.csv?one_hot=0").await, csv);
    // A value that is neither is refused, not read as "off".
    let r = app
        .admin(reqwest::Method::GET, "/admin/export.csv?one_hot=banana")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    assert!(r.text().await.unwrap().contains("one_hot must be"));

    // The command line refuses politely while the daemon holds the data dir...
    let data = app.data.path().to_path_buf();
    let flows = app.flows.path().to_path_buf();
    let held = std::process::Command::new(env!("CARGO_BIN_EXE_smsflow"))
        .arg("export")
        .arg("--data")
        .arg(&data)
        .arg("--flows")
        .arg(&flows)
        // The export's environment need not say where the daemon listens (it was started
        // with a flag, on port 0 here): it says so in the data dir.
        .env_remove("SMSFLOW_LISTEN")
        .output()
        .unwrap();
    assert!(!held.status.success());
    let said = String::from_utf8_lossy(&held.stderr);
    assert!(said.contains("in use"), "{said}");
    assert!(
        said.contains(&format!("'{}/admin/export.csv'", app.base)),
        "names this daemon's endpoint: {said}"
    );

    // ...and exports the same dataset, with --one-hot, once it is stopped (finding the
    // directories where the operator's smsflow.toml says, as `serve` does).
    let _kept = app.stop().await;
    let here = tempfile::tempdir().unwrap();
    std::fs::write(
        here.path().join("smsflow.toml"),
        format!("data = {:?}\nflows = {:?}\n", data, flows),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_smsflow"))
        .current_dir(here.path())
        .env_remove("SMSFLOW_DATA")
        .env_remove("SMSFLOW_FLOWS")
        // Settings the export does not use do not stop it, even unfinished ones.
        .env("TWILIO_ACCOUNT_SID", "AC-without-a-token")
        .arg("export")
        .arg("--one-hot")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8(out.stdout).unwrap(), one_hot);
    assert!(String::from_utf8_lossy(&out.stderr).contains("exported 3 subscriber(s); peak memory"));
    // The file given with --config, as `serve --config` reads it, from anywhere; one that is
    // not there is named.
    let elsewhere = tempfile::tempdir().unwrap();
    let export_with = |config: &std::path::Path| {
        std::process::Command::new(env!("CARGO_BIN_EXE_smsflow"))
            .current_dir(elsewhere.path())
            .env_remove("SMSFLOW_DATA")
            .env_remove("SMSFLOW_FLOWS")
            .args(["export", "--one-hot", "--config"])
            .arg(config)
            .output()
            .unwrap()
    };
    let out = export_with(&here.path().join("smsflow.toml"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8(out.stdout).unwrap(), one_hot);
    let out = export_with(&here.path().join("nope.toml"));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("nope.toml"));

    // No data dir there, or a file: a usage mistake (exit 2) that says which, even where
    // there are no flows either (the data is what is missing).
    let file = here.path().join("smsflow.toml");
    let empty = tempfile::tempdir().unwrap();
    // A directory that holds no store (a typo such as `--data flows`) is not made one.
    let not_data = tempfile::tempdir().unwrap();
    std::fs::write(not_data.path().join("notes.txt"), "hi").unwrap();
    for (dir, says) in [
        (Some(here.path().join("nothing")), "no data dir at"),
        (Some(file), "is not a directory"),
        (None, "no data dir at"),
        (Some(not_data.path().to_path_buf()), "holds no smsflow data"),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_smsflow"))
            .current_dir(empty.path())
            .env_remove("SMSFLOW_DATA")
            .env_remove("SMSFLOW_FLOWS")
            .arg("export")
            .args(
                dir.iter()
                    .flat_map(|d| [std::ffi::OsStr::new("--data"), d.as_os_str()]),
            )
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(says), "{stderr}");
    }
    let left: Vec<_> = std::fs::read_dir(not_data.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, ["notes.txt"], "nothing written there");

    // A store, but no flows where it runs: the flows to give, and how, are said.
    let data = tempfile::tempdir().unwrap();
    drop(smsflow::store::Store::open(data.path()).expect("a new store"));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_smsflow"))
        .current_dir(empty.path())
        .env_remove("SMSFLOW_DATA")
        .env_remove("SMSFLOW_FLOWS")
        .args(["export", "--data"])
        .arg(data.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let hint = "the form's columns and answer labels come from the flows the daemon runs; give \
                their directory (--flows DIR, SMSFLOW_FLOWS or `flows` in smsflow.toml)";
    assert!(stderr.contains(hint), "{stderr}");
}

/// An export that cannot be written (a full disk: `/dev/full`) names where it was going and
/// exits 3; a device given as `--out` is never removed (a regular file would be, so that no
/// partial file looks like a whole export).
#[test]
fn an_export_that_cannot_be_written_says_where_and_leaves_a_device_alone() {
    use std::os::unix::fs::FileTypeExt;
    let data = tempfile::tempdir().unwrap();
    drop(smsflow::store::Store::open(data.path()).expect("a new store"));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_smsflow"))
        .args(["export", "--flows", "flows", "--data"])
        .arg(data.path())
        .args(["--out", "/dev/full"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("exporting to /dev/full: ") && !stderr.contains("partial"),
        "{stderr}"
    );
    let full = std::fs::metadata("/dev/full").unwrap();
    assert!(full.file_type().is_char_device(), "/dev/full is left alone");
    // Standard output that cannot be written is named too.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_smsflow"))
        .args(["export", "--flows", "flows", "--data"])
        .arg(data.path())
        .stdout(std::fs::File::create("/dev/full").unwrap())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("exporting to standard output: "),
        "{stderr}"
    );
}

/// The file `export --out` makes is its owner's alone, as the data dir is; so becomes one
/// that was there for others to read.
#[test]
fn an_export_file_only_its_owner_may_read() {
    use std::os::unix::fs::PermissionsExt;
    let data = tempfile::tempdir().unwrap();
    drop(smsflow::store::Store::open(data.path()).expect("a new store"));
    let made = data.path().join("export.csv");
    let there = data.path().join("there.csv");
    std::fs::write(&there, "old").unwrap();
    std::fs::set_permissions(&there, std::fs::Permissions::from_mode(0o644)).unwrap();
    for file in [made, there] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_smsflow"))
            .args(["export", "--flows", "flows", "--data"])
            .arg(data.path())
            .arg("--out")
            .arg(&file)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(0), "{out:?}");
        let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{file:?}: {mode:o}");
    }
}

#[tokio::test]
async fn admin_routes_need_the_token_when_one_is_set() {
    let app = TestApp::spawn_with(FLOWS, |c| {
        c.admin_token = Some(smsflow::config::Secret::new("adm1n"))
    })
    .await;
    let r = app.get("/admin/subscribers").await;
    assert_eq!(r.status().as_u16(), 401);
    let err: serde_json::Value = r.json().await.unwrap();
    assert!(err["error"].as_str().unwrap().contains("Bearer"));
    let (status, _) = get(&app, "/admin/subscribers", Some("nope")).await;
    assert_eq!(status, 401);
    let (status, _) = get(&app, "/admin/subscribers", Some("adm1n")).await;
    assert_eq!(status, 200);
}

/// Subscriber counts, message volumes and flow-file problems are the operator's: beyond
/// loopback they need the admin token. `/readyz` still tells anyone whether the daemon is
/// ready (a probe needs no token), and nothing more.
#[tokio::test]
async fn metrics_and_readiness_details_need_the_admin_token_beyond_loopback() {
    let app = TestApp::spawn_with(FLOWS, |c| {
        c.admin_token = Some(smsflow::config::Secret::new("adm1n"))
    })
    .await;
    let r = app.get("/metrics").await;
    assert_eq!(r.status().as_u16(), 401);
    let why = r.text().await.unwrap();
    assert!(why.contains("Bearer"), "{why}");
    let r = app.get("/readyz").await;
    assert_eq!(r.status().as_u16(), 200);
    let ready: serde_json::Value = r.json().await.unwrap();
    assert_eq!(ready, serde_json::json!({ "ready": true }));
    let (status, ready) = get(&app, "/readyz", Some("adm1n")).await;
    assert_eq!(status, 200);
    assert!(
        ready["flows"].is_string() && ready["store"] == true,
        "{ready}"
    );

    let open = TestApp::spawn_with(FLOWS, |c| {
        c.listen = "0.0.0.0:0".parse().unwrap();
        c.admin_token = None;
    })
    .await;
    let r = open.get("/metrics").await;
    assert_eq!(r.status().as_u16(), 401);
    assert!(r.text().await.unwrap().contains("SMSFLOW_ADMIN_TOKEN"));

    // On loopback with no token and no public URL: local requests see everything, and one
    // through a tunnel (ngrok and cloudflared add X-Forwarded-For) does not.
    let local = TestApp::spawn_with(FLOWS, |c| {
        c.public_url = None;
        c.admin_token = None;
    })
    .await;
    assert_eq!(local.get("/metrics").await.status().as_u16(), 200);
    let (status, ready) = get(&local, "/readyz", None).await;
    assert!(status == 200 && ready["flows"].is_string(), "{ready}");
    let tunnelled = |path: &str| {
        local
            .http
            .get(format!("{}{path}", local.base))
            .header("X-Forwarded-For", "203.0.113.9")
            .send()
    };
    assert_eq!(tunnelled("/metrics").await.unwrap().status().as_u16(), 401);
    // Nor does a web page whose domain was pointed at 127.0.0.1 (it names its own host), or
    // another site's page (it sends its origin): an opt-out posted by one changes nothing.
    let rebound = (local.http.get(format!("{}/admin/export.csv", local.base)))
        .header("Host", "rebind.attacker.example")
        .send();
    assert_eq!(rebound.await.unwrap().status().as_u16(), 401);
    let forged = (local.http)
        .post(format!(
            "{}/admin/subscribers/%2B15550001111/opt-out",
            local.base
        ))
        .header("Origin", "https://evil.example")
        .header("Content-Type", "text/plain")
        .send();
    assert_eq!(forged.await.unwrap().status().as_u16(), 401);
    assert_eq!(local.get("/admin/subscribers").await.status().as_u16(), 200);
    let ready: serde_json::Value = tunnelled("/readyz").await.unwrap().json().await.unwrap();
    assert_eq!(ready, serde_json::json!({ "ready": true }));
}

#[tokio::test]
async fn admin_routes_are_off_beyond_loopback_without_a_token() {
    let app = TestApp::spawn_with(FLOWS, |c| {
        c.listen = "0.0.0.0:0".parse().unwrap();
        c.admin_token = None;
    })
    .await;
    let r = app.get("/admin/subscribers").await;
    assert_eq!(r.status().as_u16(), 401);
    let err: serde_json::Value = r.json().await.unwrap();
    assert!(err["error"]
        .as_str()
        .unwrap()
        .contains("SMSFLOW_ADMIN_TOKEN"));
}

/// This daemon's last flow reload, as `/readyz` reports it.
async fn last_reload(app: &TestApp) -> serde_json::Value {
    let ready: serde_json::Value = serde_json::from_str(&text(app, "/readyz").await).unwrap();
    ready["last_reload"].clone()
}

fn reloads(metrics: &str, result: &str) -> u64 {
    metrics
        .lines()
        .find(|l| {
            l.starts_with(&format!(
                "smsflow_flow_reloads_total{{result=\"{result}\"}} "
            ))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no {result} reload count:\n{metrics}"))
}

#[tokio::test]
async fn a_broken_flow_file_leaves_the_old_flows_and_a_valid_edit_goes_live() {
    let app = TestApp::spawn(CHOICES).await;
    let file = app.flows.path().join("flows.toml");
    let metrics = text(&app, "/metrics").await;
    assert_eq!(
        (reloads(&metrics, "ok"), reloads(&metrics, "failed")),
        (0, 0)
    );

    std::fs::write(&file, CHOICES.replace("[replies]", "[replies\nbroken")).unwrap();
    eventually("a failed reload", async || {
        let last = last_reload(&app).await;
        last["ok"] == false && last["problems"].as_u64() > Some(0)
    })
    .await;
    // Its time is written as the admin API writes times.
    let at = last_reload(&app).await["at"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        at.ends_with("+00:00") && chrono::DateTime::parse_from_rfc3339(&at).is_ok(),
        "{at}"
    );
    // The counts are this daemon's own (not shared with the other daemons of this test run).
    // (A watcher may catch the file half-written, and count that look's failure too.)
    let metrics = text(&app, "/metrics").await;
    assert!(reloads(&metrics, "failed") >= 1, "{metrics}");
    assert_eq!(reloads(&metrics, "ok"), 0, "{metrics}");
    assert_eq!(app.engine.flow_swaps(), 0);
    let (_, twiml) = app.sms(A, "HELP").await;
    assert!(twiml.contains("Help v1"), "old flows still answer: {twiml}");

    // The edit undone: the files are the live flows' again, which is fine, and no reload.
    std::fs::write(&file, CHOICES).unwrap();
    eventually("the files to be the live flows' again", async || {
        last_reload(&app).await["ok"] == true
    })
    .await;
    assert_eq!(app.engine.flow_swaps(), 0);

    std::fs::write(&file, CHOICES.replace("Help v1", "Help v2")).unwrap();
    eventually("the new help text", async || {
        app.sms(A, "HELP").await.1.contains("Help v2")
    })
    .await;
    let metrics = text(&app, "/metrics").await;
    assert_eq!(
        reloads(&metrics, "ok"),
        app.engine.flow_swaps(),
        "{metrics}"
    );
    assert!(reloads(&metrics, "ok") >= 1);

    // The admin endpoint reports the result either way.
    let r = reload(&app).await;
    assert_eq!(r.status().as_u16(), 200);
    std::fs::write(
        app.flows.path().join("zz.toml"),
        "[bot]\nname = \"Again\"\n",
    )
    .unwrap();
    let r = reload(&app).await;
    assert_eq!(r.status().as_u16(), 422);
    let body: serde_json::Value = r.json().await.unwrap();
    assert!(
        body["problems"][0]
            .as_str()
            .unwrap()
            .contains("zz.toml:1:1: [bot] is already defined"),
        "{body}"
    );
}

#[cfg(unix)]
#[tokio::test]
async fn a_kubernetes_style_symlink_swap_goes_live_and_a_change_to_nothing_reloads_nothing() {
    use std::os::unix::fs::symlink;
    let app = TestApp::spawn(CHOICES).await;
    let dir = app.flows.path();
    // Events that change no flow file: the same text saved again, an editor's swap file,
    // and a move to a ConfigMap volume's layout (the file becomes a link through `..data`,
    // a link to a versioned dir), the file replaced by its link in one rename.
    std::fs::write(dir.join("flows.toml"), CHOICES).unwrap();
    std::fs::write(dir.join(".flows.toml.swp"), "editor state").unwrap();
    std::fs::create_dir(dir.join("..v1")).unwrap();
    std::fs::write(dir.join("..v1/flows.toml"), CHOICES).unwrap();
    symlink("..v1", dir.join("..data")).unwrap();
    symlink("..data/flows.toml", dir.join("flows.link")).unwrap();
    std::fs::rename(dir.join("flows.link"), dir.join("flows.toml")).unwrap();
    // Let the watcher hear them apart from the update below (had it reloaded, the count
    // below would say so; run together, the update's one reload would hide nothing more).
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(app.engine.flow_swaps(), 0, "no flow file changed");

    // The update: a new versioned dir, a new link, renamed over `..data`. No `.toml` path in
    // the watched directory changes.
    std::fs::create_dir(dir.join("..v2")).unwrap();
    std::fs::write(
        dir.join("..v2/flows.toml"),
        CHOICES.replace("Help v1", "Help v2"),
    )
    .unwrap();
    symlink("..v2", dir.join("..data_tmp")).unwrap();
    std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
    std::fs::remove_dir_all(dir.join("..v1")).unwrap();
    eventually("the new help text", async || {
        app.sms(A, "HELP").await.1.contains("Help v2")
    })
    .await;
    assert_eq!(app.engine.flow_swaps(), 1);
}

#[cfg(unix)]
#[tokio::test]
async fn flow_files_that_could_not_be_read_are_looked_at_again_until_they_can() {
    use std::os::unix::fs::symlink;
    let app = TestApp::spawn(CHOICES).await;
    let dir = app.flows.path();
    // The flow file becomes a link to a file elsewhere that is not there yet (a deploy that
    // links before it copies): reading fails, and the old flows stay.
    let elsewhere = tempfile::tempdir().unwrap();
    let target = elsewhere.path().join("flows.toml");
    symlink(&target, dir.join("flows.link")).unwrap();
    std::fs::rename(dir.join("flows.link"), dir.join("flows.toml")).unwrap();
    eventually("the failed read to be reported", async || {
        last_reload(&app).await["ok"] == false
    })
    .await;
    assert!(app.sms(A, "HELP").await.1.contains("Help v1"));
    // The file arrives where the link points. Nothing in the flow directory changes, so no
    // event announces it: only looking again finds it.
    std::fs::write(&target, CHOICES.replace("Help v1", "Help v2")).unwrap();
    eventually("the new help text", async || {
        app.sms(A, "HELP").await.1.contains("Help v2")
    })
    .await;
    let last = last_reload(&app).await;
    assert_eq!(last["ok"], true, "{last}");
    assert_eq!(last["trigger"], "retry after a read error", "{last}");
    assert_eq!(app.engine.flow_swaps(), 1);
}

#[cfg(unix)]
#[tokio::test]
async fn a_flow_file_link_beside_others_whose_target_arrives_later_goes_live() {
    use std::os::unix::fs::symlink;
    let app = TestApp::spawn(CHOICES).await;
    // A second flow file, linked before its target is there: the set cannot be read whole,
    // so nothing changes (it is not loaded without that file).
    let elsewhere = tempfile::tempdir().unwrap();
    let target = elsewhere.path().join("more.toml");
    symlink(&target, app.flows.path().join("more.toml")).unwrap();
    eventually("the failed read to be reported", async || {
        last_reload(&app).await["ok"] == false
    })
    .await;
    assert_eq!(app.engine.flow_swaps(), 0);
    std::fs::write(
        &target,
        "[[sequence]]\nname = \"more\"\nsteps = [{ after = \"1h\", say = \"More\" }]\n",
    )
    .unwrap();
    eventually("the second file to go live", async || {
        app.engine.flow_swaps() == 1
    })
    .await;
    let summary = app.engine.flows().summary();
    assert!(summary.contains("2 sequence(s)"), "{summary}");
    // No event comes for the target, in another directory: the retry after the read error
    // finds it (unless a late event of the link's own creation was still queued behind the
    // failed read, as on a loaded machine, and its look came after the write).
    let trigger = last_reload(&app).await["trigger"].clone();
    assert!(
        trigger == "retry after a read error" || trigger == "file change",
        "{trigger}"
    );
}

/// An edit saved in flow directory `dir` (its help text to "Help v3") goes live: the watch
/// is on that directory.
async fn an_edit_goes_live(app: &TestApp, dir: &std::path::Path) {
    std::fs::write(
        dir.join("flows.toml"),
        CHOICES.replace("Help v1", "Help v3"),
    )
    .unwrap();
    eventually("an edit in the flow directory", async || {
        app.sms(A, "HELP").await.1.contains("Help v3")
    })
    .await;
}

#[tokio::test]
async fn a_flow_directory_replaced_by_a_new_one_is_watched_in_its_place() {
    let app = TestApp::spawn(CHOICES).await;
    let dir = app.flows.path().to_path_buf();
    let old = dir.with_extension("old");
    // A deploy that moves a new directory into place.
    let new = dir.with_extension("new");
    std::fs::create_dir(&new).unwrap();
    std::fs::write(
        new.join("flows.toml"),
        CHOICES.replace("Help v1", "Help v2"),
    )
    .unwrap();
    std::fs::rename(&dir, &old).unwrap();
    std::fs::rename(&new, &dir).unwrap();
    eventually("the new directory's help text", async || {
        app.sms(A, "HELP").await.1.contains("Help v2")
    })
    .await;
    // And edits in it are seen, like in the first.
    an_edit_goes_live(&app, &dir).await;
    assert_eq!(app.engine.flow_swaps(), 2);
    std::fs::remove_dir_all(&old).unwrap();
}

/// A deploy that deletes the flow directory and copies a new one in its place: the new one
/// goes live, and so do later edits in it (the watch follows the name, not the old one).
#[tokio::test]
async fn a_flow_directory_deleted_and_copied_anew_is_watched_in_its_place() {
    let app = TestApp::spawn(CHOICES).await;
    let dir = app.flows.path().to_path_buf();
    // After the watcher's first look (a deletion during it would be read as its change).
    tokio::time::sleep(Duration::from_millis(800)).await;
    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(
        dir.join("flows.toml"),
        CHOICES.replace("Help v1", "Help v2"),
    )
    .unwrap();
    eventually("the new directory's help text", async || {
        app.sms(A, "HELP").await.1.contains("Help v2")
    })
    .await;
    an_edit_goes_live(&app, &dir).await;
}

/// `SMSFLOW_FLOWS` is a link to a release's directory, and a deploy points it at the next
/// one: that one goes live, and so do later edits in it.
#[cfg(unix)]
#[tokio::test]
async fn a_flow_directory_link_pointed_at_a_new_release_is_followed() {
    use std::os::unix::fs::symlink;
    let root = tempfile::tempdir().unwrap();
    let release = |n: u32| {
        let dir = root.path().join(format!("v{n}"));
        std::fs::create_dir(&dir).unwrap();
        let text = CHOICES.replace("Help v1", &format!("Help v{n}"));
        std::fs::write(dir.join("flows.toml"), text).unwrap();
        dir
    };
    symlink(release(1), root.path().join("flows")).unwrap();
    let link = root.path().join("flows");
    let app = TestApp::spawn_with(CHOICES, |c| c.flows_dir = link.clone()).await;
    assert!(app.sms(A, "HELP").await.1.contains("Help v1"));
    // Pointed elsewhere in one rename, as `ln -sfn` and deploy tools do.
    symlink(release(2), root.path().join("flows.next")).unwrap();
    std::fs::rename(root.path().join("flows.next"), &link).unwrap();
    eventually("the new release's help text", async || {
        app.sms(A, "HELP").await.1.contains("Help v2")
    })
    .await;
    an_edit_goes_live(&app, &link).await;
}

/// The link that switches releases is further up the path (`current/flows`, `current`
/// pointing at a release): no event in the flow directory or beside it says so, and the
/// watcher's check of where the path leads finds it.
#[cfg(unix)]
#[tokio::test]
async fn a_release_switched_by_a_link_further_up_the_path_is_followed() {
    use std::os::unix::fs::symlink;
    let root = tempfile::tempdir().unwrap();
    let release = |n: u32| {
        let dir = root.path().join(format!("v{n}"));
        std::fs::create_dir_all(dir.join("flows")).unwrap();
        let text = CHOICES.replace("Help v1", &format!("Help v{n}"));
        std::fs::write(dir.join("flows/flows.toml"), text).unwrap();
        dir
    };
    symlink(release(1), root.path().join("current")).unwrap();
    let flows = root.path().join("current/flows");
    let app = TestApp::spawn_adjusted(
        CHOICES,
        |c| c.flows_dir = flows.clone(),
        |o| o.flow_path_check = Duration::from_millis(200),
    )
    .await;
    assert!(app.sms(A, "HELP").await.1.contains("Help v1"));
    // After the watcher's first look (a switch during it would be read as its change).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    symlink(release(2), root.path().join("current.next")).unwrap();
    std::fs::rename(
        root.path().join("current.next"),
        root.path().join("current"),
    )
    .unwrap();
    eventually("the new release's help text", async || {
        app.sms(A, "HELP").await.1.contains("Help v2")
    })
    .await;
    assert_eq!(
        last_reload(&app).await["trigger"],
        "the flow directory's path leads elsewhere"
    );
    an_edit_goes_live(&app, &flows).await;
}

/// A flow file that is a link to one elsewhere: an edit there makes no event in the flow
/// directory, and the periodic look finds it.
#[cfg(unix)]
#[tokio::test]
async fn an_edit_to_the_target_of_a_linked_flow_file_goes_live() {
    let elsewhere = tempfile::tempdir().unwrap();
    let target = elsewhere.path().join("flows.toml");
    std::fs::write(&target, CHOICES).unwrap();
    let app =
        TestApp::spawn_with_options(CHOICES, |o| o.flow_path_check = Duration::from_millis(200))
            .await;
    let file = app.flows.path().join("flows.toml");
    std::fs::remove_file(&file).unwrap();
    std::os::unix::fs::symlink(&target, &file).unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    std::fs::write(&target, CHOICES.replace("Help v1", "Help v2")).unwrap();
    eventually("the linked file's new help text", async || {
        app.sms(A, "HELP").await.1.contains("Help v2")
    })
    .await;
    assert_eq!(
        last_reload(&app).await["trigger"],
        "a periodic look (a linked file may have changed)"
    );
}

/// A flow file caught half-written may parse, the sequences after the cut missing: files
/// that would end sequences go live only once they stay as they are for a while, so a number
/// in one keeps its place when the rest is written; left as they are, they go live.
#[tokio::test]
async fn a_half_written_flow_file_ends_no_sequence_and_a_settled_one_does() {
    let app = TestApp::spawn(CHOICES).await;
    enrol(&app, A, "Ann", "g", 0).await;
    assert_eq!(app.state_of(A).as_deref(), Some("in_sequence"));
    let file = app.flows.path().join("flows.toml");
    let cut = CHOICES.find("[[sequence]]").unwrap();
    let half = CHOICES[..cut].replace("Help v1", "Help v2");
    std::fs::write(&file, &half).unwrap();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    std::fs::write(&file, CHOICES.replace("Help v1", "Help v3")).unwrap();
    eventually("the whole file live", async || {
        app.sms(A, "HELP").await.1.contains("Help v3")
    })
    .await;
    quiet_for(Duration::from_secs(4)).await;
    assert_eq!(app.state_of(A).as_deref(), Some("in_sequence"));
    assert_eq!(app.engine.flow_swaps(), 1, "the half file never went live");
    // Left as they are, files that end a sequence go live.
    std::fs::write(&file, &half).unwrap();
    eventually("the sequence to end", async || {
        app.state_of(A).as_deref() == Some("verified")
    })
    .await;
    assert_eq!(last_reload(&app).await["trigger"], "file change (settled)");
}

#[tokio::test]
async fn a_removed_sequence_ends_cleanly_for_numbers_in_it() {
    let app = TestApp::spawn(CHOICES).await;
    enrol(&app, A, "Ann", "g", 0).await;
    assert_eq!(app.state_of(A).as_deref(), Some("in_sequence"));
    let renamed = CHOICES.replace("name = \"later\"", "name = \"other\"");
    app.save_flows_and_reload(&renamed).await;
    // The number's sequence is gone: it ends at once (its next step was an hour away), and
    // the number stays verified.
    eventually("the sequence to end", async || {
        app.state_of(A).as_deref() == Some("verified")
    })
    .await;
    let last = ended_sequence_of_a(&app).await;
    assert_eq!(last["name"], "later");
    app.outbox_settles().await;
    assert_eq!(
        app.twilio.delivered().len(),
        1,
        "only the code; no step of a removed sequence"
    );
}

#[tokio::test]
async fn metrics_parse_as_prometheus_text_and_readyz_says_ready_with_no_reload_yet() {
    let app = TestApp::spawn(FLOWS).await;
    app.sms(A, "JOIN").await;
    app.twilio.wait_delivered(1).await;
    let r = app
        .admin(reqwest::Method::GET, "/metrics")
        .send()
        .await
        .unwrap();
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    let body = r.text().await.unwrap();
    // A real parser of the text format (it refuses a malformed line, a sample before its
    // family's TYPE, a family split in two).
    let parsed = openmetrics_parser::prometheus::parse_prometheus(&body)
        .unwrap_or_else(|e| panic!("not Prometheus text: {e:?}\n{body}"));
    for family in [
        "smsflow_flow_reloads_total",
        "smsflow_subscribers",
        "smsflow_pending_timers",
        "smsflow_outbox_depth",
        "smsflow_early_reports",
        "smsflow_store_commits_total",
        "smsflow_webhook_duration_seconds",
    ] {
        assert!(
            parsed.families.contains_key(family),
            "no family {family}:\n{body}"
        );
    }
    for name in [
        "smsflow_inbound_messages_total",
        "smsflow_outbound_messages_total",
        "smsflow_subscribers{state=\"awaiting_code\"} 1",
        "smsflow_pending_timers",
        "smsflow_outbox_depth",
        "smsflow_webhook_duration_seconds_bucket",
        // Up to Twilio's timeout.
        "smsflow_webhook_duration_seconds_bucket{route=\"sms\",le=\"15\"}",
    ] {
        assert!(body.contains(name), "missing {name}:\n{body}");
    }
    // The writer's counters are this daemon's own: the JOIN and the delivery's bookkeeping
    // went through it, so it has made commits carrying at least that event, and spent time.
    let value = |name: &str| -> f64 {
        let line = body
            .lines()
            .find(|l| l.split_whitespace().next() == Some(name))
            .unwrap_or_else(|| panic!("missing {name}:\n{body}"));
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    };
    let commits = value("smsflow_store_commits_total");
    assert!(commits >= 1.0, "{body}");
    assert!(
        value("smsflow_store_committed_events_total") >= 1.0,
        "{body}"
    );
    assert!(value("smsflow_store_commit_seconds_total") > 0.0, "{body}");
    assert!(value("smsflow_store_flush_seconds_total") > 0.0, "{body}");
    // This daemon's own writer, not a process-wide count (another event may land between
    // the readings; none lands before the first).
    let scraped = value("smsflow_store_commits_total") as u64;
    assert!(scraped <= app.engine.writer_work().commits, "{body}");
    let (status, ready) = get(&app, "/readyz", None).await;
    assert_eq!(status, 200, "{ready}");
    assert_eq!(ready["ready"], true);
    assert!(ready["last_reload"].is_null(), "no reload yet: {ready}");
}

#[tokio::test]
async fn history_shows_the_first_step_as_step_1() {
    let app = TestApp::spawn(&CHOICES.replace("after = \"1h\"", "after = \"0s\"")).await;
    app.sms(A, "JOIN").await;
    let code = code_in(&app.twilio.last_to(A, 1).await);
    app.sms(A, &code).await;
    app.sms(A, "Ann").await;
    let (_, twiml) = app.sms(A, "g").await;
    assert!(twiml.contains("Hello again"), "{twiml}");
    let (_, s) = get(&app, "/admin/subscribers/%2B15550000001", None).await;
    let sent: Vec<&serde_json::Value> = s["history"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["event"] == "step_sent")
        .collect();
    assert_eq!(sent.len(), 1, "{s}");
    assert_eq!(sent[0]["sequence"], "later");
    assert_eq!(sent[0]["step"], 1, "the first step is step 1");
}

#[tokio::test]
async fn a_sequence_removed_while_the_daemon_was_stopped_ends_at_the_next_start() {
    let app = TestApp::spawn(CHOICES).await;
    enrol(&app, A, "Ann", "g", 0).await;
    let flows = app.flows.path().join("flows.toml");
    let (twilio, data, flows_dir, options) = app.stop().await;
    let renamed = CHOICES.replace("name = \"later\"", "name = \"other\"");
    std::fs::write(&flows, renamed).unwrap();
    let app = TestApp::start(twilio, data, flows_dir, options, |_| {}).await;
    eventually("the sequence to end", async || {
        app.state_of(A).as_deref() == Some("verified")
    })
    .await;
    ended_sequence_of_a(&app).await;
    // The sweep done, the record holds the live places only: the next start does not sweep.
    eventually("the places to be recorded", async || {
        app.engine.store.flows_places().unwrap() == Some(app.engine.flows().places())
    })
    .await;
}

/// The record of the flows' places, which a start compares with the flows it loads, only
/// narrows when a sweep for the live flows is done; until then it keeps the old places, so a
/// sweep cut short by a stop or a crash is done again at the next start.
#[tokio::test]
async fn the_places_on_record_narrow_only_when_a_sweep_for_the_live_flows_is_done() {
    use smsflow::reload::remember_places;
    let load = |text: &str| {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("flows.toml"), text).unwrap();
        smsflow::flows::load_dir(dir.path()).unwrap()
    };
    let (before, after) = (
        load(CHOICES),
        load(&CHOICES.replace("name = \"later\"", "name = \"other\"")),
    );
    let (old, new) = (before.places(), after.places());
    assert_ne!(old, new);
    let data = tempfile::tempdir().unwrap();
    let store = smsflow::store::Store::open(data.path()).unwrap();
    let engine = smsflow::engine::Engine::new(store, before);
    // Nothing on record (a first start: its sweep may be running) stays so until a sweep ends.
    remember_places(&engine, &engine.flows(), false);
    assert_eq!(engine.store.flows_places().unwrap(), None);
    remember_places(&engine, &engine.flows(), true);
    assert_eq!(engine.store.flows_places().unwrap(), Some(old.clone()));

    engine.set_flows(after);
    remember_places(&engine, &engine.flows(), false);
    let kept = engine.store.flows_places().unwrap().unwrap();
    assert!(old.iter().chain(&new).all(|p| kept.contains(p)), "{kept:?}");
    assert!(
        engine.flows().removed_places_of(&kept),
        "a start now would sweep"
    );

    remember_places(&engine, &engine.flows(), true);
    assert_eq!(engine.store.flows_places().unwrap(), Some(new));
}

/// Steps of a sequence queued behind an outage's retries when a reload removes the sequence
/// (its last step still to come) are not sent once Twilio is back: the number is `verified`
/// and sent nothing more.
#[tokio::test]
async fn steps_queued_when_a_reload_removes_their_sequence_are_not_sent() {
    let flows = CHOICES.replace(
        "steps = [{ after = \"1h\", say = \"Hello again\" }]",
        "steps = [{ after = \"1h\", say = \"Hello again\" }, { after = \"1s\", say = \"And again\" }, { after = \"1d\", say = \"Tomorrow\" }]",
    );
    let app = TestApp::spawn_with_options(&flows, |o| {
        o.retry_base = Duration::from_secs(600);
        o.clock = manual_clock();
    })
    .await;
    enrol(&app, A, "Ann", "g", 0).await;
    let before = app.twilio.delivered().len();
    app.twilio.fail_next(&[503]);
    app.advance(Duration::from_secs(3600));
    eventually("the first step to wait for its retry", async || {
        app.twilio.attempts() > before
    })
    .await;
    app.advance(Duration::from_secs(2));
    eventually("both steps queued", async || {
        app.engine.store.outbox_len() == 2
    })
    .await;
    std::fs::write(
        app.flows.path().join("flows.toml"),
        flows.replace("name = \"later\"", "name = \"other\""),
    )
    .unwrap();
    let r = reload(&app).await;
    assert_eq!(r.status().as_u16(), 200);
    eventually("the sequence to end", async || {
        app.state_of(A).as_deref() == Some("verified")
    })
    .await;
    app.advance(Duration::from_secs(3600));
    eventually("the outbox to be done", async || {
        app.engine.store.outbox_len() == 0
    })
    .await;
    let sent: Vec<String> = (app.twilio.delivered().iter().skip(before))
        .map(|r| r.body.clone())
        .collect();
    assert!(sent.is_empty(), "sent after the sequence ended: {sent:?}");
    let why = app.suppressed_reasons();
    assert_eq!(why.len(), 2, "{why:?}");
    assert!(why.iter().all(|w| w.contains("sequence ended")), "{why:?}");
}

/// A's last history entry, which must be its sequence ending because it is gone.
async fn ended_sequence_of_a(app: &TestApp) -> serde_json::Value {
    let (_, s) = get(app, "/admin/subscribers/%2B15550000001", None).await;
    let last = s["history"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["event"], "sequence_ended", "{s}");
    assert_eq!(last["reason"], "sequence no longer exists");
    last
}

/// What a provider's error quotes of the request (the text with its code, the number however
/// written, the credentials) is hidden in the record the admin API shows, as in the log.
/// `B` texts JOIN, Twilio refuses its code for good (400), and the admin API's page of `B`
/// once the outbox is done with it.
async fn join_refused_by_twilio(app: &TestApp) -> serde_json::Value {
    app.twilio.fail_next(&[400]);
    app.sms(B, "JOIN").await;
    eventually("the refused code to end", async || {
        app.engine.store.outbox_len() == 0
    })
    .await;
    get(app, "/admin/subscribers/%2B15550000002", None).await.1
}

#[tokio::test]
async fn a_providers_error_that_quotes_the_request_is_shown_without_it() {
    use base64::Engine as _;
    let app = TestApp::spawn(FLOWS).await;
    app.twilio.chatty();
    let s = join_refused_by_twilio(&app).await;
    let error = s["messages"][0]["error"].as_str().unwrap().to_string();
    assert!(
        error.starts_with("Twilio answered 400 Bad Request: scripted failure for"),
        "{error}"
    );
    let from = smsflow::phone::Phone::parse(FROM).unwrap().masked();
    let stand_ins = [
        "\"[the message]\" (Body=[the message])".to_string(),
        format!("to [number] from {from} with Basic [hidden]"),
    ];
    for stand_in in stand_ins {
        assert!(error.contains(&stand_in), "{stand_in} not in {error}");
    }
    let sent = &app.twilio.all_requests()[0].body;
    let basic =
        base64::engine::general_purpose::STANDARD.encode(format!("{ACCOUNT_SID}:{AUTH_TOKEN}"));
    for quoted in [sent.as_str(), &code_in(sent), "555", &basic] {
        assert!(!error.contains(quoted), "{quoted} in {error}");
    }
}

/// A record kept before Twilio's words were hidden as they are written (an older smsflow's)
/// shows them hidden all the same.
#[tokio::test]
async fn a_providers_error_kept_raw_by_an_older_smsflow_is_shown_hidden() {
    use smsflow::machine::Subscriber;
    use smsflow::phone::Phone;
    use smsflow::store::{Commit, Delivery, Store};
    let data = std::sync::Arc::new(tempfile::tempdir().unwrap());
    {
        let store = Store::open(data.path()).unwrap();
        let now = chrono::Utc::now();
        let phone = Phone::parse(A).unwrap();
        let commit = Commit {
            subscriber: Some(Subscriber::new(phone.clone(), now)),
            outgoing: vec![("Hello".into(), false)],
            ..Commit::default()
        };
        store.commit_many(&[commit], now).unwrap();
        let id = store.outbox().next().unwrap().unwrap().0;
        let failed = Delivery {
            phone,
            status: "failed".into(),
            provider_sid: None,
            error_code: Some(21211),
            error: Some("The 'To' number +15550000001 is not valid".into()),
            attempts: 1,
            updated_at: now,
        };
        store.outbox_finish(id, &failed).unwrap();
        store.flush().unwrap();
    }
    let app = TestApp::spawn_on(data, FLOWS, |_| {}).await;
    let (_, s) = get(&app, "/admin/subscribers/%2B15550000001", None).await;
    assert_eq!(
        s["messages"][0]["error"], "The 'To' number [number] is not valid",
        "{s}"
    );
}

/// A daemon with `retention = 30d` on `data` (which a test filled beforehand), and `FLOWS`.
async fn with_a_retention_of_30_days(data: std::sync::Arc<tempfile::TempDir>) -> TestApp {
    TestApp::spawn_on(data, FLOWS, |c| {
        c.retention = Some(Duration::from_secs(30 * 86_400))
    })
    .await
}

/// With `retention = 30d`, a start deletes history older than that; the subscriber stays.
#[tokio::test]
async fn a_daemon_with_a_retention_deletes_old_history_at_start() {
    use smsflow::machine::{Record, Subscriber};
    use smsflow::phone::Phone;
    use smsflow::store::{Commit, HistoryEntry, Store};

    let data = std::sync::Arc::new(tempfile::tempdir().unwrap());
    {
        let store = Store::open(data.path()).unwrap();
        let now = chrono::Utc::now();
        let long_ago = now - chrono::Duration::days(90);
        let entry = |at, via: &str| HistoryEntry {
            at,
            record: Record::OptedIn { via: via.into() },
        };
        // It texted today (or a retention would forget it: see the next test).
        let mut sub = Subscriber::new(Phone::parse(A).unwrap(), long_ago);
        sub.last_inbound_at = Some(now);
        let commit = Commit {
            subscriber: Some(sub),
            history: vec![entry(long_ago, "long ago"), entry(now, "today")],
            ..Commit::default()
        };
        store.commit_many(&[commit], now).unwrap();
        store.flush().unwrap();
    }
    let app = with_a_retention_of_30_days(data).await;
    let mut vias = Vec::new();
    for _ in 0..100 {
        let (status, s) = get(&app, "/admin/subscribers/%2B15550000001", None).await;
        assert_eq!(status, 200);
        vias = s["history"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| h.to_string())
            .collect();
        if vias.len() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(vias.len(), 1, "{vias:?}");
    assert!(vias[0].contains("today"), "{vias:?}");
    app.stop().await;
}

/// With a retention, a start also forgets numbers that never got anywhere and have been silent
/// as long (a text once, a code never entered): they leave the list, the counts and the export.
/// A number that opted out, verified, answered, or texted lately stays.
#[tokio::test]
async fn a_retention_forgets_numbers_that_never_got_anywhere_and_keeps_the_rest() {
    use smsflow::machine::{State, Subscriber};
    use smsflow::phone::Phone;
    use smsflow::store::{Commit, Store};

    let data = std::sync::Arc::new(tempfile::tempdir().unwrap());
    let now = chrono::Utc::now();
    let long_ago = now - chrono::Duration::days(90);
    let number = |n: u32| Phone::parse(&format!("+1555000{n:04}")).unwrap();
    let made = |n: u32, change: &dyn Fn(&mut Subscriber)| {
        let mut s = Subscriber::new(number(n), long_ago);
        change(&mut s);
        Commit {
            subscriber: Some(s),
            ..Commit::default()
        }
    };
    {
        let store = Store::open(data.path()).unwrap();
        let commits = [
            made(1, &|_| {}),
            made(2, &|s| {
                s.state = State::AwaitingCode;
                s.code_sends.push(long_ago);
            }),
            made(3, &|s| s.state = State::OptedOut),
            made(4, &|s| s.last_inbound_at = Some(now)),
            made(5, &|s| {
                s.state = State::Verified;
                s.verified_at = Some(long_ago);
            }),
            made(6, &|s| {
                s.fields.insert("first_name".into(), "Ann".into());
            }),
        ];
        store.commit_many(&commits, now).unwrap();
        store.flush().unwrap();
    }
    let app = with_a_retention_of_30_days(data).await;
    let listed = || async {
        let (status, list) = get(&app, "/admin/subscribers", None).await;
        assert_eq!(status, 200);
        let phones: Vec<String> = list["subscribers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["phone"].as_str().unwrap().to_string())
            .collect();
        phones
    };
    let mut phones = listed().await;
    for _ in 0..100 {
        if phones.len() == 4 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        phones = listed().await;
    }
    let kept = [3, 4, 5, 6].map(|n| number(n).as_str().to_string());
    assert_eq!(phones, kept, "{phones:?}");
    for gone in [1, 2] {
        let path = format!("/admin/subscribers/%2B1555000{gone:04}");
        assert_eq!(get(&app, &path, None).await.0, 404);
    }
    let metrics = text(&app, "/metrics").await;
    for (state, n) in [("unverified", 2), ("awaiting_code", 0), ("opted_out", 1)] {
        let line = format!("smsflow_subscribers{{state=\"{state}\"}} {n}");
        assert!(metrics.contains(&line), "{line} not in {metrics}");
    }
    app.stop().await;
}

/// `smsflow export` on a data dir a daemon holds points at that daemon's admin API as the
/// daemon takes this machine's requests: with its token, without one, or not at all (off,
/// when it is reachable from outside with no token: then it says to stop the daemon).
#[tokio::test]
async fn export_on_a_held_data_dir_says_how_that_daemon_serves_the_dataset() {
    let token = TestApp::spawn(FLOWS).await;
    let open = TestApp::spawn_with(FLOWS, |c| {
        c.admin_token = None;
        c.public_url = None;
    })
    .await;
    let off = TestApp::spawn_with(FLOWS, |c| c.admin_token = None).await;
    let held = |app: &TestApp, token_here: Option<&str>| {
        let mut export = std::process::Command::new(env!("CARGO_BIN_EXE_smsflow"));
        export
            .arg("export")
            .arg("--data")
            .arg(app.data.path())
            .arg("--flows")
            .arg(app.flows.path())
            .env_remove("SMSFLOW_ADMIN_TOKEN");
        if let Some(t) = token_here {
            export.env("SMSFLOW_ADMIN_TOKEN", t);
        }
        let held = export.output().unwrap();
        assert_eq!(held.status.code(), Some(3));
        String::from_utf8_lossy(&held.stderr).into_owned()
    };
    for (app, says, not) in [
        (&token, "with its admin token", "leave out -H"),
        (&open, "no admin token and answers this machine", "Bearer"),
        (&off, "admin API is off", "answers this machine"),
    ] {
        let said = held(app, None);
        assert!(said.contains(says) && !said.contains(not), "{said}");
        assert!(
            said.contains(&format!("'{}/admin/export.csv'", app.base)),
            "{said}"
        );
    }
    // The curl line names the shell's variable only when this shell has it (the token may
    // be in the daemon's smsflow.toml alone): pasted, it works, or shows what to fill in.
    let said = held(&token, None);
    assert!(
        said.contains("Bearer <its admin token>") && !said.contains("$SMSFLOW_ADMIN_TOKEN"),
        "{said}"
    );
    let said = held(&token, Some("set-in-this-shell"));
    assert!(said.contains("Bearer $SMSFLOW_ADMIN_TOKEN"), "{said}");
    assert!(!said.contains("set-in-this-shell"), "never printed: {said}");
    // The way given works: with the token, and without one where none is needed.
    let ok = |r: reqwest::Response| r.status().as_u16();
    let by_token = token
        .admin(reqwest::Method::GET, "/admin/export.csv")
        .send()
        .await
        .unwrap();
    assert_eq!(ok(by_token), 200);
    let url = format!("{}/admin/export.csv", open.base);
    assert_eq!(ok(open.http.get(&url).send().await.unwrap()), 200);
    let url = format!("{}/admin/export.csv", off.base);
    assert_eq!(ok(off.http.get(&url).send().await.unwrap()), 401);
    for app in [token, open, off] {
        app.stop().await;
    }
}

/// An operator sees the question whose late answer is still taken, and until when; not one
/// whose time is up, nor one a reload changed.
#[tokio::test]
async fn a_numbers_page_shows_the_question_whose_late_answer_is_still_taken() {
    let flows = r#"
[bot]
name = "Survey"
[form]
extra_fields = ["pick"]
[[sequence]]
name = "quiz"
steps = [{ ask = "A or B?", save = "pick", expect = { choices = { A = "a", B = "b" } }, timeout = "1h" }]
"#;
    let app = TestApp::spawn(flows).await;
    let now = chrono::Utc::now();
    let until = now + chrono::Duration::hours(1);
    let shown_for = |field: &str, until| {
        let mut sub =
            smsflow::machine::Subscriber::new(smsflow::phone::Phone::parse(A).unwrap(), now);
        sub.state = smsflow::machine::State::Verified;
        sub.late = Some(smsflow::machine::LateQuestion {
            sequence: "quiz".into(),
            step: 0,
            field: field.into(),
            until,
        });
        let commit = smsflow::store::Commit {
            subscriber: Some(sub),
            ..smsflow::store::Commit::default()
        };
        app.engine.store.commit_many(&[commit], now).unwrap();
        async {
            let (status, shown) = get(&app, "/admin/subscribers/%2B15550000001", None).await;
            assert_eq!(status, 200, "{shown}");
            shown["late_answer"].clone()
        }
    };
    assert_eq!(
        shown_for("pick", until).await,
        serde_json::json!({"sequence": "quiz", "step": 1, "field": "pick", "until": until.to_rfc3339()})
    );
    let over = now - chrono::Duration::seconds(1);
    assert_eq!(shown_for("pick", over).await, serde_json::Value::Null);
    // Kept for a field the question at that step no longer saves into.
    assert_eq!(shown_for("color", until).await, serde_json::Value::Null);
}
