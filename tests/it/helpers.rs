//! Test harness: the daemon on port 0 with a temp data dir, and a fake Twilio REST API on
//! loopback that records what it receives and can be told to fail.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::post;
use axum::{Form, Router};
use smsflow::app::{Application, Options};
use smsflow::config::{Config, Secret, Sender, TwilioConfig};
use smsflow::phone::Region;
use tempfile::TempDir;
use tokio::sync::oneshot;

pub const ACCOUNT_SID: &str = "AC00000000000000000000000000000001";
pub const AUTH_TOKEN: &str = "test-auth-token";
pub const FROM: &str = "+15005550006";
pub const PUBLIC_URL: &str = "https://smsflow.test";
pub const API_TOKEN: &str = "test-api-token";
pub const ADMIN_TOKEN: &str = "test-admin-token";

/// A message the fake Twilio API accepted (or refused), as it arrived.
#[derive(Clone, Debug)]
pub struct Received {
    pub to: String,
    pub from: String,
    pub body: String,
    pub status_callback: Option<String>,
    /// `ValidityPeriod`, if sent.
    pub validity: Option<String>,
    pub authorized: bool,
    /// The HTTP status the fake answered.
    pub answered: u16,
    /// Every form parameter name sent.
    pub params: Vec<String>,
    /// When it arrived.
    pub at: std::time::Instant,
}

#[derive(Default)]
struct FakeState {
    received: Vec<Received>,
    /// Inline TwiML of every call placed.
    calls: Vec<String>,
    /// Failures to answer with, in order (none left: 201): HTTP status, Twilio error code,
    /// and the seconds of a `Retry-After` header, if any.
    script: VecDeque<(u16, u32, Option<u64>)>,
    /// Numbers Twilio treats as unsubscribed (answered 400 / 21610).
    unsubscribed: Vec<String>,
    next_sid: u64,
    /// While set, message requests wait for a permit before they are answered.
    gate: Option<Arc<tokio::sync::Semaphore>>,
    /// Message requests that reached the gate.
    held: usize,
    /// Bytes of padding in every accepted message's answer (an oversized answer).
    padding: usize,
    /// Scripted failures quote the request (see [`FakeTwilio::chatty`]).
    chatty: bool,
}

#[derive(Clone)]
pub struct FakeTwilio {
    pub url: String,
    state: Arc<Mutex<FakeState>>,
}

impl FakeTwilio {
    pub async fn start() -> FakeTwilio {
        let state = Arc::new(Mutex::new(FakeState::default()));
        let app = Router::new()
            .route(
                "/2010-04-01/Accounts/{sid}/Messages.json",
                post(fake_messages),
            )
            .route("/2010-04-01/Accounts/{sid}/Calls.json", post(fake_calls))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        FakeTwilio { url, state }
    }

    pub fn calls(&self) -> Vec<String> {
        self.state.lock().unwrap().calls.clone()
    }

    /// Every message request, whatever the fake answered.
    pub fn all_requests(&self) -> Vec<Received> {
        self.state.lock().unwrap().received.clone()
    }

    /// Messages answered with success, in arrival order.
    pub fn delivered(&self) -> Vec<Received> {
        let s = self.state.lock().unwrap();
        s.received
            .iter()
            .filter(|r| r.answered < 300)
            .cloned()
            .collect()
    }

    pub fn attempts(&self) -> usize {
        self.state.lock().unwrap().received.len()
    }

    /// Pads every accepted message's answer with `bytes` more of JSON.
    pub fn pad_answers(&self, bytes: usize) {
        self.state.lock().unwrap().padding = bytes;
    }

    pub fn fail_next(&self, statuses: &[u16]) {
        let failures = statuses.iter().map(|s| (*s, 20500, None));
        self.state.lock().unwrap().script.extend(failures);
    }

    /// Scripted message failures from now on quote the request, as a chatty proxy in front of
    /// Twilio might: the text, the `To` written with separators, and the Authorization header.
    pub fn chatty(&self) {
        self.state.lock().unwrap().chatty = true;
    }

    /// The next request is answered 400 with Twilio's error `code`.
    pub fn refuse_next(&self, code: u32) {
        self.state
            .lock()
            .unwrap()
            .script
            .push_back((400, code, None));
    }

    /// The next request is answered 429 (Twilio's 20429) with `Retry-After: secs`.
    pub fn busy_next(&self, secs: u64) {
        let busy = (429, 20429, Some(secs));
        self.state.lock().unwrap().script.push_back(busy);
    }

    /// Message requests from now on wait, unanswered, until [`FakeTwilio::release`].
    pub fn hold(&self) {
        self.state.lock().unwrap().gate = Some(Arc::new(tokio::sync::Semaphore::new(0)));
    }

    /// How many message requests reached the hold.
    pub fn held(&self) -> usize {
        self.state.lock().unwrap().held
    }

    /// Answers the held requests, and stops holding.
    pub fn release(&self) {
        if let Some(gate) = self.state.lock().unwrap().gate.take() {
            gate.add_permits(tokio::sync::Semaphore::MAX_PERMITS >> 1);
        }
    }

    pub fn unsubscribe(&self, phone: &str) {
        self.state
            .lock()
            .unwrap()
            .unsubscribed
            .push(phone.to_string());
    }

    /// Waits (up to 15 s) until at least `n` messages were delivered, and returns them all.
    pub async fn wait_delivered(&self, n: usize) -> Vec<Received> {
        for _ in 0..300 {
            let d = self.delivered();
            if d.len() >= n {
                return d;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "expected {n} delivered messages, got {:#?}",
            self.delivered()
        );
    }

    /// The latest delivered message to `to`, once at least `n_total` were delivered and one
    /// of them went to `to` (waits up to 15 s).
    pub async fn last_to(&self, to: &str, n_total: usize) -> String {
        for _ in 0..300 {
            let d = self.delivered();
            if d.len() >= n_total {
                if let Some(r) = d.iter().rev().find(|r| r.to == to) {
                    return r.body.clone();
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("no message to {to} among {:#?}", self.delivered());
    }
}

async fn fake_messages(
    State(state): State<Arc<Mutex<FakeState>>>,
    Path(sid): Path<String>,
    headers: HeaderMap,
    Form(form): Form<Vec<(String, String)>>,
) -> impl IntoResponse {
    use base64::Engine as _;
    let get = |k: &str| form.iter().find(|(a, _)| a == k).map(|(_, v)| v.clone());
    let expected_auth = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{ACCOUNT_SID}:{AUTH_TOKEN}"))
    );
    let authorized = sid == ACCOUNT_SID
        && headers.get("authorization").and_then(|v| v.to_str().ok())
            == Some(expected_auth.as_str());
    let gate = {
        let mut s = state.lock().unwrap();
        s.held += usize::from(s.gate.is_some());
        s.gate.clone()
    };
    if let Some(gate) = gate {
        let _permit = gate.acquire().await;
    }
    let mut s = state.lock().unwrap();
    let to = get("To").unwrap_or_default();
    let mut retry_after = None;
    let (status, body) = if !authorized {
        (
            401,
            serde_json::json!({"code": 20003, "message": "Authenticate", "status": 401}),
        )
    } else if s.unsubscribed.contains(&to) {
        (
            400,
            serde_json::json!({"code": 21610, "message": "Attempt to send to unsubscribed recipient", "status": 400}),
        )
    } else if let Some((status, code, after)) = s.script.pop_front() {
        retry_after = after;
        let message = if s.chatty {
            let spaced = match to.get(2..) {
                Some(n) if n.len() == 10 => format!("({}) {}-{}", &n[..3], &n[3..6], &n[6..]),
                _ => to.clone(),
            };
            let auth = headers.get("authorization").and_then(|v| v.to_str().ok());
            let body = get("Body").unwrap_or_default();
            let encoded: String = form_urlencoded::byte_serialize(body.as_bytes()).collect();
            format!(
                "scripted failure for {body:?} (Body={encoded}) to {spaced} from {} with {}",
                get("From").unwrap_or_default(),
                auth.unwrap_or_default()
            )
        } else {
            "scripted failure".into()
        };
        (
            status,
            serde_json::json!({"code": code, "message": message, "status": status}),
        )
    } else {
        s.next_sid += 1;
        (
            201,
            serde_json::json!({
                "sid": format!("SM{:032}", s.next_sid),
                "status": "queued",
                "padding": "x".repeat(s.padding),
            }),
        )
    };
    s.received.push(Received {
        to,
        from: get("From").unwrap_or_default(),
        body: get("Body").unwrap_or_default(),
        status_callback: get("StatusCallback"),
        validity: get("ValidityPeriod"),
        authorized,
        answered: status,
        params: form.iter().map(|(k, _)| k.clone()).collect(),
        at: std::time::Instant::now(),
    });
    let mut answer = (StatusCode::from_u16(status).unwrap(), axum::Json(body)).into_response();
    if let Some(secs) = retry_after {
        let value = axum::http::HeaderValue::from(secs);
        answer.headers_mut().insert("retry-after", value);
    }
    answer
}

async fn fake_calls(
    State(state): State<Arc<Mutex<FakeState>>>,
    Form(form): Form<Vec<(String, String)>>,
) -> impl IntoResponse {
    let twiml = form
        .iter()
        .find(|(k, _)| k == "Twiml")
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    let mut s = state.lock().unwrap();
    s.calls.push(twiml.clone());
    // A scripted failure quotes what it was asked to say, as an error might: as said, and as
    // the form encoded it.
    let encoded = twiml.replace(", ", "%2C+");
    let (status, body) = match s.script.pop_front() {
        Some((status, code, _)) => (
            status,
            serde_json::json!({"code": code, "message": format!("scripted failure for {twiml} (Twiml={encoded})"), "status": status}),
        ),
        None => (
            201,
            serde_json::json!({"sid": "CA0001", "status": "queued"}),
        ),
    };
    (StatusCode::from_u16(status).unwrap(), axum::Json(body))
}

/// Flows for black-box tests: second-scale delays, one sequence.
pub const FLOWS: &str = r#"
[bot]
name = "Test Bot"

[verify]
send = "Code: {code}"
verified = "Verified!"

[[form.field]]
key = "first_name"
ask = "Name?"

[[sequence]]
name = "fast"
steps = [
  { after = "0s", say = "Welcome {field.first_name}" },
  { after = "1s", say = "Step one" },
  { after = "1s", say = "Step two" },
  { after = "1s", say = "Step three" },
]

[ivr]
retries = 2
reprompt = "Sorry?"
goodbye = "Bye."
read_code = "Your code is {code}."

[ivr.menu.main]
say = "Press 1 for your code, 2 to join, 3 to stop, 4 for info."
press = { "1" = "read_code", "2" = "opt_in", "3" = "opt_out", "4" = "menu:info" }

[ivr.menu.info]
say = "Info. Press 9 to go back."
press = { "9" = "menu:main" }
"#;

pub struct TestApp {
    pub base: String,
    pub twilio: FakeTwilio,
    pub data: Arc<TempDir>,
    pub flows: Arc<TempDir>,
    pub http: reqwest::Client,
    /// The tokens the daemon was started with (sent by the helpers unless told otherwise).
    pub api_token: Option<String>,
    pub admin_token: Option<String>,
    pub engine: Arc<smsflow::engine::Engine>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    options: Options,
}

impl TestApp {
    pub async fn spawn(flows: &str) -> TestApp {
        Self::spawn_with(flows, |_| {}).await
    }

    /// Like [`TestApp::spawn`], with the configuration adjusted first.
    pub async fn spawn_with(flows: &str, tweak: impl FnOnce(&mut Config)) -> TestApp {
        Self::spawn_adjusted(flows, tweak, |_| {}).await
    }

    /// Like [`TestApp::spawn`], on a manual clock that only [`TestApp::advance`] moves:
    /// timers, expiries and retries come due when the test says. It starts at this second's
    /// start (timers are kept to the millisecond, rounded up: a start between two would put
    /// "1 s later" a fraction past a one-second advance).
    pub async fn spawn_on_manual_clock(flows: &str) -> TestApp {
        Self::spawn_with_options(flows, |o| o.clock = manual_clock()).await
    }

    /// Moves the daemon's manual clock forward (see [`TestApp::spawn_on_manual_clock`]).
    pub fn advance(&self, by: Duration) {
        self.engine.clock().advance(by).unwrap();
    }

    /// Like [`TestApp::spawn`], with the daemon's options adjusted first.
    pub async fn spawn_with_options(flows: &str, adjust: impl FnOnce(&mut Options)) -> TestApp {
        Self::spawn_adjusted(flows, |_| {}, adjust).await
    }

    pub async fn spawn_adjusted(
        flows: &str,
        tweak: impl FnOnce(&mut Config),
        adjust: impl FnOnce(&mut Options),
    ) -> TestApp {
        let data = Arc::new(tempfile::tempdir().unwrap());
        Self::spawn_in(data, flows, tweak, adjust).await
    }

    /// A daemon on `data`, a data dir the test filled beforehand.
    pub async fn spawn_on(
        data: Arc<TempDir>,
        flows: &str,
        tweak: impl FnOnce(&mut Config),
    ) -> TestApp {
        Self::spawn_in(data, flows, tweak, |_| {}).await
    }

    async fn spawn_in(
        data: Arc<TempDir>,
        flows: &str,
        tweak: impl FnOnce(&mut Config),
        adjust: impl FnOnce(&mut Options),
    ) -> TestApp {
        let flows_dir = tempfile::tempdir().unwrap();
        std::fs::write(flows_dir.path().join("flows.toml"), flows).unwrap();
        let mut options = Options {
            retry_base: Duration::from_millis(10),
            quiet_console: true,
            ..Options::default()
        };
        adjust(&mut options);
        Self::start(
            FakeTwilio::start().await,
            data,
            Arc::new(flows_dir),
            options,
            tweak,
        )
        .await
    }

    /// Starts a daemon on what a stopped one left (see [`TestApp::stop`]).
    pub async fn start(
        twilio: FakeTwilio,
        data: Arc<TempDir>,
        flows: Arc<TempDir>,
        options: Options,
        tweak: impl FnOnce(&mut Config),
    ) -> TestApp {
        let mut config = Config {
            listen: "127.0.0.1:0".parse().unwrap(),
            public_url: Some(PUBLIC_URL.into()),
            data_dir: data.path().to_path_buf(),
            flows_dir: PathBuf::from(flows.path()),
            region: Region::default(),
            send_rate: 200.0,
            twilio: Some(TwilioConfig {
                account_sid: ACCOUNT_SID.into(),
                auth_token: Secret::new(AUTH_TOKEN),
                sender: Sender::From(vec![FROM.into()]),
                caller_id: Some(FROM.into()),
                api_base: twilio.url.clone(),
            }),
            auth_token: Some(Secret::new(AUTH_TOKEN)),
            api_token: Some(Secret::new(API_TOKEN)),
            admin_token: Some(Secret::new(ADMIN_TOKEN)),
            retention: None,
            cache_bytes: 64 << 20,
        };
        tweak(&mut config);
        let api_token = config.api_token.as_ref().map(|t| t.expose().to_string());
        let admin_token = config.admin_token.as_ref().map(|t| t.expose().to_string());
        // A data dir a store of this process just let go of may still be locked a moment
        // (see [`reopen`]).
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let app = loop {
            match Application::build(config.clone(), options.clone()).await {
                Ok(app) => break app,
                Err(e)
                    if e.downcast_ref::<smsflow::store::DataDirInUse>().is_some()
                        && std::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("app builds: {e:#}"),
            }
        };
        let port = app.port();
        let engine = app.engine();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(app.run_until_stopped(async {
            let _ = rx.await;
        }));
        TestApp {
            api_token,
            admin_token,
            base: format!("http://127.0.0.1:{port}"),
            twilio,
            data,
            flows,
            http: reqwest::Client::new(),
            engine,
            stop: Some(tx),
            task: Some(task),
            options,
        }
    }

    /// Stops the daemon gracefully and waits until it is gone.
    pub async fn stop(mut self) -> (FakeTwilio, Arc<TempDir>, Arc<TempDir>, Options) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.await
                .expect("server task")
                .expect("server stopped cleanly");
        }
        let TestApp {
            twilio,
            data,
            flows,
            options,
            engine,
            ..
        } = self;
        drop(engine);
        (twilio, data, flows, options)
    }

    /// Stops and starts again on the same data dir and fake Twilio.
    pub async fn restart(self, pause: Duration) -> TestApp {
        let (twilio, data, flows, options) = self.stop().await;
        tokio::time::sleep(pause).await;
        Self::start(twilio, data, flows, options, |_| {}).await
    }

    /// Saves `flows` as the flow file and reloads through the admin API, which must take it.
    pub async fn save_flows_and_reload(&self, flows: &str) {
        std::fs::write(self.flows.path().join("flows.toml"), flows).unwrap();
        let r = self
            .admin(reqwest::Method::POST, "/admin/reload")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200, "the reload is taken");
    }

    /// Waits for the outbox to empty (every queued message sent or ended), a moment more for
    /// anything a due timer queues, and for it to empty again: what was sent by then is all
    /// that was going to be, however slow the machine (a fixed wait passes when it is slow).
    pub async fn outbox_settles(&self) {
        eventually("the outbox to empty", async || {
            self.engine.store.outbox_len() == 0
        })
        .await;
        quiet_for(Duration::from_millis(200)).await;
        eventually("the outbox to empty again", async || {
            self.engine.store.outbox_len() == 0
        })
        .await;
    }

    /// Why each message the outbox ended unsent (`suppressed`) was not sent.
    pub fn suppressed_reasons(&self) -> Vec<String> {
        (self.engine.store.deliveries())
            .map(|d| d.unwrap().1)
            .filter(|d| d.status == "suppressed")
            .map(|d| d.error.unwrap_or_default())
            .collect()
    }

    /// POSTs a signed Twilio form to `path`.
    pub async fn post_form(&self, path: &str, params: &[(&str, &str)]) -> reqwest::Response {
        post_signed(&self.http, &self.base, path, params).await
    }

    /// An inbound SMS to `to` (one of ours, or not) with a fresh MessageSid; returns the status.
    pub async fn sms_to(&self, from: &str, to: &str, body: &str) -> u16 {
        let sid = format!("SM{}", uuid_like());
        let params = [
            ("From", from),
            ("To", to),
            ("Body", body),
            ("MessageSid", &sid),
        ];
        self.post_form("/twilio/sms", &params)
            .await
            .status()
            .as_u16()
    }

    /// An inbound SMS with a fresh MessageSid; returns (status, body).
    pub async fn sms(&self, from: &str, body: &str) -> (u16, String) {
        let sid = format!("SM{}", uuid_like());
        self.sms_with_sid(from, body, &sid).await
    }

    pub async fn sms_with_sid(&self, from: &str, body: &str, sid: &str) -> (u16, String) {
        let r = self
            .post_form(
                "/twilio/sms",
                &[
                    ("From", from),
                    ("To", FROM),
                    ("Body", body),
                    ("MessageSid", sid),
                ],
            )
            .await;
        (r.status().as_u16(), r.text().await.unwrap())
    }

    /// POSTs JSON to the OTP API; returns (status, Retry-After, parsed body, raw body).
    pub async fn otp(
        &self,
        route: &str,
        body: serde_json::Value,
        token: Option<&str>,
    ) -> (u16, Option<String>, serde_json::Value, String) {
        let mut req = self
            .http
            .post(format!("{}/authenticate/{route}", self.base))
            .json(&body);
        if let Some(t) = token.or(self.api_token.as_deref()) {
            req = req.bearer_auth(t);
        }
        let r = req.send().await.unwrap();
        let status = r.status().as_u16();
        let retry = r
            .headers()
            .get("retry-after")
            .map(|v| v.to_str().unwrap().to_string());
        let text = r.text().await.unwrap();
        let json = serde_json::from_str(&text).unwrap_or(serde_json::Value::Null);
        (status, retry, json, text)
    }

    /// A plain `GET` of `path`, with no token.
    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.http
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .unwrap()
    }

    /// A request to the admin API with the daemon's admin token.
    pub fn admin(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let req = self.http.request(method, format!("{}{path}", self.base));
        match &self.admin_token {
            Some(t) => req.bearer_auth(t),
            None => req,
        }
    }

    /// An admin request's status.
    pub async fn admin_status(&self, method: reqwest::Method, path: &str) -> reqwest::StatusCode {
        self.admin(method, path).send().await.unwrap().status()
    }

    /// An admin GET's body: JSON, or the text for the CSV export.
    pub async fn admin_text(&self, path: &str) -> String {
        let r = self.admin(reqwest::Method::GET, path).send().await.unwrap();
        r.text().await.unwrap()
    }

    pub fn state_of(&self, phone: &str) -> Option<String> {
        let phone = smsflow::phone::Phone::parse(phone).unwrap();
        self.engine
            .store
            .subscriber(&phone)
            .unwrap()
            .map(|s| s.state.name().to_string())
    }
}

/// Opens a data dir that a store in this process just closed. sled lets go of its file lock
/// only when its deferred cleanup runs, which can lag a moment behind the drop.
pub fn reopen<T, E: std::fmt::Display>(mut open: impl FnMut() -> Result<T, E>) -> T {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        match open() {
            Ok(opened) => return opened,
            Err(e) if std::time::Instant::now() < deadline => {
                eprintln!("reopen: {e}; retrying");
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("reopening: {e}"),
        }
    }
}

pub fn uuid_like() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "{:032x}",
        N.fetch_add(1, Ordering::Relaxed) + std::process::id() as u64 * 1_000_000
    )
}

/// The digits of a code in a text such as "Code: 123456".
pub fn code_in(text: &str) -> String {
    text.chars().filter(|c| c.is_ascii_digit()).collect()
}

/// A parsed XML element, for checking TwiML structure.
#[derive(Debug, Clone, Default)]
pub struct Node {
    pub name: String,
    pub attrs: std::collections::BTreeMap<String, String>,
    pub text: String,
    pub children: Vec<Node>,
}

impl Node {
    pub fn child(&self, name: &str) -> Option<&Node> {
        self.children.iter().find(|c| c.name == name)
    }
    pub fn names(&self) -> Vec<&str> {
        self.children.iter().map(|c| c.name.as_str()).collect()
    }
}

/// Parses XML into a tree; fails the test on malformed XML.
pub fn parse_xml(xml: &str) -> Node {
    use quick_xml::events::Event;
    let mut reader = quick_xml::Reader::from_str(xml);
    let mut stack: Vec<Node> = vec![Node::default()];
    let open = |e: &quick_xml::events::BytesStart| Node {
        name: String::from_utf8(e.name().as_ref().to_vec()).unwrap(),
        attrs: e
            .attributes()
            .map(|a| {
                let a = a.unwrap();
                (
                    String::from_utf8(a.key.as_ref().to_vec()).unwrap(),
                    a.normalized_value(quick_xml::XmlVersion::default())
                        .unwrap()
                        .into_owned(),
                )
            })
            .collect(),
        ..Node::default()
    };
    loop {
        match reader.read_event().expect("well-formed XML") {
            Event::Start(e) => stack.push(open(&e)),
            Event::Empty(e) => stack.last_mut().unwrap().children.push(open(&e)),
            Event::Text(t) => stack
                .last_mut()
                .unwrap()
                .text
                .push_str(&t.decode().unwrap()),
            Event::GeneralRef(r) => {
                let resolved = match r.decode().unwrap().as_ref() {
                    "amp" => "&",
                    "lt" => "<",
                    "gt" => ">",
                    "quot" => "\"",
                    "apos" => "'",
                    other => panic!("unknown entity {other}"),
                };
                stack.last_mut().unwrap().text.push_str(resolved);
            }
            Event::End(_) => {
                let done = stack.pop().unwrap();
                stack.last_mut().unwrap().children.push(done);
            }
            Event::Eof => break,
            _ => {}
        }
    }
    let mut root = stack.pop().unwrap();
    assert!(stack.is_empty(), "unclosed elements");
    root.children.pop().expect("a root element")
}

/// POSTs a Twilio form to the daemon at `base`, signed as Twilio signs it for `PUBLIC_URL`.
pub async fn post_signed(
    http: &reqwest::Client,
    base: &str,
    path: &str,
    params: &[(&str, &str)],
) -> reqwest::Response {
    let owned: Vec<(String, String)> = params
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let sig = smsflow::http::signature::sign(AUTH_TOKEN, &format!("{PUBLIC_URL}{path}"), &owned);
    http.post(format!("{base}{path}"))
        .header("X-Twilio-Signature", sig)
        .form(&owned)
        .send()
        .await
        .unwrap()
}

/// A manual clock for [`TestApp::spawn_on_manual_clock`] or [`Options::clock`].
pub fn manual_clock() -> smsflow::clock::Clock {
    use chrono::Timelike;
    smsflow::clock::Clock::manual(chrono::Utc::now().with_nanosecond(0).unwrap())
}

/// Waits (up to 10 s) until `check` holds.
pub async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) {
    for _ in 0..200 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

/// Sleeps a while to show that nothing more happens.
pub async fn quiet_for(d: Duration) {
    tokio::time::sleep(d).await;
}
