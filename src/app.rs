//! `Application`: binds the socket, opens the store, loads flows, and runs the server with
//! its workers (scheduler, outbox) until told to stop.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::Config;
use crate::engine::Engine;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};

use crate::http::{self, AppState, Health};
use crate::outbox::Outbox;
use crate::provider::{Console, Provider, Twilio};
use crate::reload::Reloader;
use crate::store::Store;
use crate::{flows, scheduler};

/// Knobs that are not configuration: tests use them to run fast and quietly.
#[derive(Clone, Debug)]
pub struct Options {
    /// First retry delay of the outbox; doubles per attempt.
    pub retry_base: Duration,
    /// The console provider prints nothing.
    pub quiet_console: bool,
    /// How long a stop waits for open HTTP requests before it goes on without them.
    pub shutdown_grace: Duration,
    /// A connection that has not sent a whole request head this long after it opened, or
    /// after its last answer, is closed (a client that connects and sends nothing, or a byte
    /// a minute, holds no socket for ever). hyper counts an idle kept-alive connection's wait
    /// too, so the default outlasts the idle limits of the proxies in front (Cloudflare's
    /// 900 s, Google's load balancer's 610 s, ngrok's and cloudflared's 90 s): they close
    /// first, and never send a request into a connection smsflow is closing.
    pub header_read_timeout: Duration,
    /// A request body that has not all arrived this long after its head is refused (400)
    /// ([`crate::http::BODY_TIMEOUT`] by default).
    pub body_timeout: Duration,
    /// At most this many connections are open at once; a further one waits in the kernel's
    /// queue until one closes. Unset: 4,096, or fewer where open files are limited.
    pub max_connections: Option<usize>,
    /// A connection whose answer has waited this long for its client to read any of it is
    /// closed: a client that sends requests and never reads the answers would otherwise hold
    /// its connection (and its place among `max_connections`) for ever.
    pub write_stall_timeout: Duration,
    /// The wall clock events happen at and timers come due by (tests: a manual one).
    pub clock: crate::clock::Clock,
    /// How often the flow watcher checks where the flow directory's path leads (a link
    /// further up it switched to another release: no file event says so).
    pub flow_path_check: Duration,
    /// How many queued messages one look of the outbox reads at most
    /// ([`crate::outbox::READ_BUDGET`] by default).
    pub outbox_read_budget: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            retry_base: Duration::from_secs(1),
            quiet_console: false,
            shutdown_grace: Duration::from_secs(10),
            header_read_timeout: Duration::from_secs(960),
            body_timeout: crate::http::BODY_TIMEOUT,
            max_connections: None,
            write_stall_timeout: Duration::from_secs(30),
            clock: crate::clock::Clock::system(),
            flow_path_check: Duration::from_secs(30),
            outbox_read_budget: crate::outbox::READ_BUDGET,
        }
    }
}

pub struct Application {
    listener: TcpListener,
    port: u16,
    engine: Arc<Engine>,
    provider: Arc<Provider>,
    config: Config,
    options: Options,
}

/// The file in the data dir naming the local URL of the daemon that holds it.
pub const DAEMON_URL_FILE: &str = "daemon-url";
/// The file in the data dir saying how that daemon's admin API takes this machine's
/// requests (an [`ApiAccess`], one word), beside [`DAEMON_URL_FILE`].
pub const DAEMON_ADMIN_FILE: &str = "daemon-admin";

/// How an API with an optional bearer token (the OTP API, the admin API) takes this
/// machine's requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ApiAccess {
    /// With its bearer token.
    Token,
    /// Without a token: the daemon is reachable from this machine alone.
    Open,
    /// Not at all: reachable from outside with no token.
    Off,
}

impl ApiAccess {
    /// With `token` set, or not, on a daemon reachable from this machine alone, or not.
    pub fn of<T>(token: Option<T>, local_only: bool) -> ApiAccess {
        match (token, local_only) {
            (Some(_), _) => ApiAccess::Token,
            (None, true) => ApiAccess::Open,
            (None, false) => ApiAccess::Off,
        }
    }
}

impl std::fmt::Display for ApiAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ApiAccess::Token => "token",
            ApiAccess::Open => "open",
            ApiAccess::Off => "off",
        })
    }
}

impl std::str::FromStr for ApiAccess {
    type Err = ();
    fn from_str(s: &str) -> Result<ApiAccess, ()> {
        match s.trim() {
            "token" => Ok(ApiAccess::Token),
            "open" => Ok(ApiAccess::Open),
            "off" => Ok(ApiAccess::Off),
            _ => Err(()),
        }
    }
}

/// Where a daemon listening on `addr` answers on this machine (a wildcard address is
/// reached through loopback).
pub fn local_url(mut addr: std::net::SocketAddr) -> String {
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    format!("http://{addr}")
}

impl Application {
    /// Loads flows (every problem listed on failure), opens the store, binds the socket.
    pub async fn build(config: Config, options: Options) -> anyhow::Result<Application> {
        // The problems stay a typed error, so `serve` can exit with the flows' exit code.
        let flows = flows::load_dir(&config.flows_dir).map_err(|p| {
            let context = format!(
                "the flows in {} have {} problem(s)",
                config.flows_dir.display(),
                p.0.len()
            );
            anyhow::Error::new(p).context(context)
        })?;
        for w in flows.warnings() {
            tracing::warn!("flows: {w}");
        }
        // The first E.164 parse loads metadata (~100 ms): do it now, not on a webhook.
        let _ = crate::phone::Phone::parse("+14155550100");
        // A short bearer token can be guessed (a wrong one is logged, once a minute at most).
        for (name, token) in [
            ("SMSFLOW_API_TOKEN (api_token)", &config.api_token),
            ("SMSFLOW_ADMIN_TOKEN (admin_token)", &config.admin_token),
        ] {
            let length = token
                .as_ref()
                .map_or(usize::MAX, |t| t.expose().chars().count());
            if length < MIN_TOKEN {
                tracing::warn!(
                    "{name} is {length} characters long: a bearer token of fewer than \
                     {MIN_TOKEN} can be guessed; use a long random one (openssl rand -hex 32)"
                );
            }
        }
        let provider = match &config.twilio {
            Some(t) => Provider::Twilio(Twilio::new(t.clone(), config.public_url.as_deref())?),
            None => Provider::Console(Console::new(options.quiet_console)),
        };
        // The socket first: a start that cannot listen leaves no new data dir behind.
        let listener = TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("listening on {}", config.listen))?;
        let store = Store::open_with_cache(&config.data_dir, config.cache_bytes)?;
        let port = listener.local_addr()?.port();
        // Where this daemon answers on this machine, for `export`'s hint when it finds the data
        // dir held (a flag or env the export does not share may have set the address).
        let here = local_url(std::net::SocketAddr::new(config.listen.ip(), port));
        // And how its admin API takes this machine's requests (its token is not written).
        let admin = ApiAccess::of(config.admin_token.as_ref(), config.local_only());
        for (file, note) in [
            (DAEMON_URL_FILE, here),
            (DAEMON_ADMIN_FILE, admin.to_string()),
        ] {
            if let Err(e) = std::fs::write(config.data_dir.join(file), format!("{note}\n")) {
                tracing::warn!("cannot note the daemon's address in the data dir ({file}): {e}");
            }
        }
        Ok(Application {
            listener,
            port,
            engine: Arc::new(Engine::with_clock(store, flows, options.clock.clone())),
            provider: Arc::new(provider),
            config,
            options,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn engine(&self) -> Arc<Engine> {
        self.engine.clone()
    }

    /// The start in one line, for the log: version, address, provider, webhook signatures.
    pub fn started_line(&self) -> String {
        let c = &self.config;
        let signatures = match (&c.auth_token, c.local_only()) {
            (Some(_), _) => "checked",
            (None, true) => "not checked (local requests only)",
            (None, false) => "none: /twilio routes refuse every request",
        };
        format!(
            "smsflow {} started on {}; provider {}; webhook signatures {signatures}; flows: {}",
            env!("CARGO_PKG_VERSION"),
            std::net::SocketAddr::new(c.listen.ip(), self.port),
            self.provider.name(),
            self.engine.flows().summary()
        )
    }

    /// What an operator needs to see at start-up, including the URLs to paste into Twilio.
    pub fn banner(&self) -> String {
        let c = &self.config;
        let flows = self.engine.flows();
        // (`SocketAddr` writes an IPv6 address in brackets, as a URL needs it.)
        let local = format!(
            "http://{}",
            std::net::SocketAddr::new(c.listen.ip(), self.port)
        );
        let mut b = format!(
            "smsflow {} listening on {local}\n",
            env!("CARGO_PKG_VERSION")
        );
        b += &match self.provider.name() {
            "console" => format!(
                "  provider:    console ({}: messages are printed here)\n",
                if c.auth_token.is_some() {
                    "no account SID and sender with the auth token"
                } else {
                    "no Twilio credentials"
                }
            ),
            name => {
                let calls = |caller: &Option<String>| match caller {
                    Some(n) => format!(" (calls from {n})"),
                    None => " (no phone number in TWILIO_FROM: no voice calls)".to_string(),
                };
                let from = match c.twilio.as_ref().map(|t| (&t.sender, &t.caller_id)) {
                    Some((crate::config::Sender::From(numbers), caller)) => {
                        format!(", from {}{}", numbers.join(", "), calls(caller))
                    }
                    Some((crate::config::Sender::MessagingService(m), caller)) => {
                        format!(", through messaging service {m}{}", calls(caller))
                    }
                    None => String::new(),
                };
                format!("  provider:    {name}, {} msg/s{from}\n", c.send_rate)
            }
        };
        b += &format!(
            "  flows:       {} — {}\n",
            c.flows_dir.display(),
            flows.summary()
        );
        b += &format!(
            "  data:        {} — {} subscriber(s)\n",
            c.data_dir.display(),
            self.engine.state_counts().iter().sum::<i64>()
        );
        b += &format!(
            "  retention:   {}\n",
            c.retention.map_or(
                "everything is kept (set SMSFLOW_RETENTION to delete old history)".to_string(),
                |d| {
                    format!(
                        "history and delivery records older than {}, and numbers that never \
                         verified nor answered silent as long (and for the flows' send window), are deleted daily",
                        retention_age(d)
                    )
                }
            )
        );
        let local_only = c.local_only();
        b += &format!(
            "  signatures:  {}\n",
            match (&c.auth_token, local_only) {
                (Some(_), _) => "checked on every /twilio route",
                (None, true) => "NOT checked: /twilio routes take local requests only (set TWILIO_AUTH_TOKEN before exposing them)",
                (None, false) => "NONE: /twilio routes refuse every request until TWILIO_AUTH_TOKEN is set (smsflow is reachable from outside)",
            }
        );
        for (name, token, env) in [
            (
                "OTP API",
                &c.api_token,
                "SMSFLOW_API_TOKEN (or api_token in smsflow.toml)",
            ),
            (
                "admin API",
                &c.admin_token,
                "SMSFLOW_ADMIN_TOKEN (or admin_token in smsflow.toml)",
            ),
        ] {
            b += &format!(
                "  {:<12} {}\n",
                format!("{name}:"),
                match ApiAccess::of(token.as_ref(), local_only) {
                    ApiAccess::Token => "on, bearer token required".to_string(),
                    ApiAccess::Open => format!(
                        "on without a token for local requests only (set {env} before exposing it)"
                    ),
                    ApiAccess::Off =>
                        format!("OFF until {env} is set (smsflow is reachable from outside)"),
                }
            );
        }
        match &c.public_url {
            Some(base) => {
                b += if several_numbers(c) {
                    "  Twilio console, Phone Numbers > each of the numbers above:\n"
                } else {
                    "  Twilio console, Phone Numbers > your number:\n"
                };
                b += &format!("    A message comes in (HTTP POST): {base}/twilio/sms\n");
                b += &format!("    A call comes in (HTTP POST):    {base}/twilio/voice\n");
                if self.provider.name() != "console" {
                    b += &format!(
                        "  Delivery reports come to {base}/twilio/status by themselves (each message\n  names it as its StatusCallback): nothing to paste for them.\n"
                    );
                }
                if c.auth_token.is_none() {
                    b += "  (Each is refused until TWILIO_AUTH_TOKEN is set: see signatures above.)\n";
                }
            }
            None => {
                b += "  No public URL: Twilio cannot reach this machine yet. Start a tunnel:\n";
                b += &format!(
                    "    ngrok http {}    or    cloudflared tunnel --url {}\n",
                    self.port,
                    local_url(std::net::SocketAddr::new(c.listen.ip(), self.port))
                );
                b +=
                    &format!(
                    "  then restart with SMSFLOW_PUBLIC_URL=https://<tunnel host>{} and paste\n",
                    if c.auth_token.is_none() { " (and TWILIO_AUTH_TOKEN)" } else { "" }
                );
                b += if several_numbers(c) {
                    "  https://<tunnel host>/twilio/sms into each number's \"A message comes in\" webhook\n"
                } else {
                    "  https://<tunnel host>/twilio/sms into your number's \"A message comes in\" webhook\n"
                };
                b += "  (and https://<tunnel host>/twilio/voice into \"A call comes in\", for the voice menu).\n";
                b += "  (Behind a proxy that sends X-Forwarded-Proto and -Host, signed webhooks work\n   without it too, checked against the URL each request names, so one Twilio signed\n   for another of your deployments passes here; only a public URL pins it, and gets\n   delivery reports.)\n";
            }
        }
        b
    }

    /// Serves until `shutdown` resolves, then stops accepting, finishes in-flight requests,
    /// stops the workers and flushes the store.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        self.run_until_stopped_or_hurried(shutdown, std::future::pending())
            .await
    }

    /// Like [`Application::run_until_stopped`]; once `shutdown` has resolved, open HTTP
    /// requests get [`Options::shutdown_grace`], or until `hurry` resolves (it is first
    /// polled then: a second Ctrl-C), before the stop goes on without them. A client that
    /// opened a connection and sends nothing would otherwise hold the stop for ever.
    pub async fn run_until_stopped_or_hurried(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
        hurry: impl Future<Output = ()>,
    ) -> anyhow::Result<()> {
        let (stop_tx, stop_rx) = watch::channel(false);
        let reloader = Arc::new(Reloader::new(
            self.engine.clone(),
            self.config.flows_dir.clone(),
            stop_rx.clone(),
        ));
        // Flows edited while the daemon was stopped may have removed places numbers hold
        // (the first start of this version cannot know, so it looks once).
        // The places are recorded now only when nothing was removed; otherwise the sweep
        // records them when it is done, so a stop or crash before that makes the next start
        // sweep again.
        let flows = self.engine.flows();
        // And fields: an edit made while stopped is warned of as a reload's is.
        match self.engine.store.flows_fields() {
            Ok(Some(before)) => {
                for w in crate::reload::field_warnings(&before, &flows) {
                    tracing::warn!(trigger = "start", "{w}");
                }
            }
            Ok(None) => {}
            Err(e) => tracing::error!("reading the flows' fields: {e:#}"),
        }
        crate::reload::remember_fields(&self.engine, &flows);
        let sweep = match self.engine.store.flows_places() {
            Ok(before) if before.as_ref().is_none_or(|b| flows.removed_places_of(b)) => {
                crate::reload::end_lost_places(&self.engine, stop_rx.clone())
            }
            Ok(_) => {
                crate::reload::remember_places(&self.engine, &flows, false);
                None
            }
            Err(e) => {
                tracing::error!("reading the flows' places: {e:#}");
                None
            }
        };
        let health = Arc::new(Health::default());
        let state = Arc::new(AppState {
            engine: self.engine.clone(),
            public_url: self.config.public_url.clone(),
            auth_token: self.config.auth_token.clone(),
            region: self.config.region,
            provider: self.provider.clone(),
            api_token: self.config.api_token.clone(),
            admin_token: self.config.admin_token.clone(),
            loopback: self.config.local_only(),
            reloader: reloader.clone(),
            health: health.clone(),
        });
        let scheduler = tokio::spawn(flagged(
            health.clone(),
            |h| &h.scheduler,
            scheduler::run(self.engine.clone(), stop_rx.clone()),
        ));
        let outbox = Outbox::new(
            self.engine.clone(),
            self.provider.clone(),
            self.config.send_rate,
            self.options.retry_base,
            self.options.outbox_read_budget,
            stop_rx.clone(),
        );
        let outbox = tokio::spawn(flagged(health.clone(), |h| &h.outbox, outbox.run()));
        let watcher = tokio::spawn(
            reloader
                .clone()
                .watch(stop_rx.clone(), self.options.flow_path_check),
        );
        let upkeep = tokio::spawn(crate::metrics::upkeep(stop_rx.clone()));
        let pruner = self
            .config
            .retention
            .map(|keep| tokio::spawn(prune_daily(self.engine.clone(), keep, stop_rx.clone())));
        let hup = tokio::spawn(reloader.clone().on_sighup(stop_rx));
        // A store whose disk failed fails every change from then on (sled keeps the error):
        // stop, so that a supervisor starts smsflow again and the new open recovers.
        let store = self.engine.store.clone();
        let shutdown = async move {
            tokio::select! {
                () = shutdown => {}
                why = store.failed() => tracing::error!(
                    "the store failed ({why}); stopping: every change would fail from now on"
                ),
            }
        };
        serve(
            self.listener,
            http::router(state),
            shutdown,
            &self.options,
            hurry,
        )
        .await;
        let _ = stop_tx.send(true);
        let _ = scheduler.await;
        let _ = outbox.await;
        let _ = watcher.await;
        let _ = upkeep.await;
        let _ = hup.await;
        if let Some(sweep) = sweep {
            let _ = sweep.await;
        }
        if let Some(pruner) = pruner {
            let _ = pruner.await;
        }
        // No longer answering there: a script reading the note must not find a stale address.
        for file in [DAEMON_URL_FILE, DAEMON_ADMIN_FILE] {
            let _ = std::fs::remove_file(self.config.data_dir.join(file));
        }
        let flushed = self.engine.store.flush();
        if let Some(why) = self.engine.store.failure() {
            anyhow::bail!(
                "the store in {} failed: {why}. smsflow stopped, as it cannot change anything \
                 after that; what it answered 2xx is on disk. Make room on the disk (or mend \
                 it, or report the bug named) and start smsflow again",
                self.config.data_dir.display()
            );
        }
        flushed
    }
}

/// The longest request head taken (Twilio's are a few KiB).
pub const MAX_HEAD: usize = 16 * 1024;

/// The shortest bearer token that is not warned of as guessable.
const MIN_TOKEN: usize = 16;

/// Serves HTTP/1.1 until `shutdown`; then stops accepting and lets the requests under way
/// finish, for up to [`Options::shutdown_grace`] or until `hurry` resolves (it is first polled
/// then). By hand rather than `axum::serve`, which gives hyper no timer: without one, hyper
/// has no header read timeout.
async fn serve(
    listener: TcpListener,
    router: axum::Router,
    shutdown: impl Future<Output = ()>,
    options: &Options,
    hurry: impl Future<Output = ()>,
) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    let mut builder = hyper::server::conn::http1::Builder::new();
    // A request head is read into a buffer of at most 16 KiB (a head longer than that is
    // refused, 431): hyper's default, ~400 KiB, let 4,096 clients that never finish their
    // heads hold 1.6 GB for the header read timeout. (A body streams through it.)
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(options.header_read_timeout)
        .max_buf_size(MAX_HEAD);
    // Tells every connection the stop has begun.
    let (stopping_tx, stopping) = watch::channel(false);
    // Held here so that what is still open after the grace period can be cut off.
    let mut connections = tokio::task::JoinSet::new();
    let mut shutdown = std::pin::pin!(shutdown);
    // A slot per open connection: idle clients holding connections open run the process out
    // of file descriptors before the header read timeout closes them, and then the store and
    // the sends to Twilio have none either.
    let limit = options.max_connections.unwrap_or_else(connection_limit);
    let slots = Arc::new(tokio::sync::Semaphore::new(limit));
    let conns = Arc::new(crate::conns::Conns::default());
    let mut warned: Option<std::time::Instant> = None;
    'accepting: loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    stream
                }
                Err(e) => {
                    // A connection that went away while queued is no trouble of ours; running
                    // out of file descriptors is, and retrying at once would spin.
                    if !matches!(
                        e.kind(),
                        std::io::ErrorKind::ConnectionRefused
                            | std::io::ErrorKind::ConnectionAborted
                            | std::io::ErrorKind::ConnectionReset
                    ) {
                        tracing::error!("accepting a connection: {e}; trying again in 1 s");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let slot = match slots.clone().try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => {
                if warned.is_none_or(|at| at.elapsed() >= Duration::from_secs(60)) {
                    warned = Some(std::time::Instant::now());
                    tracing::warn!(
                        "{limit} connections are open, the most smsflow serves at once; the \
                         one idle longest is closed for each new one, which waits while every \
                         one has a request under way (logged at most once a minute)"
                    );
                }
                // Asked again each second: one picked just as it began a request closes
                // only after answering it, and every one may be busy for a while.
                loop {
                    conns.close_longest_idle();
                    tokio::select! {
                        slot = slots.clone().acquire_owned() => match slot {
                            Ok(slot) => break slot,
                            // (The semaphore is never closed.)
                            Err(_) => break 'accepting,
                        },
                        () = tokio::time::sleep(Duration::from_secs(1)) => {}
                        () = &mut shutdown => break 'accepting,
                    }
                }
            }
        };
        let opened = conns.add();
        let busy_on = opened.tracker();
        let router = router.clone();
        let body_timeout = options.body_timeout;
        let service = hyper::service::service_fn(move |request: hyper::Request<_>| {
            use http_body_util::BodyExt;
            use tower::ServiceExt;
            // Until the answer's body is sent: an export streams for a while after its handler.
            let busy = busy_on.busy();
            let request = request.map(|body| busy_on.arriving(body, body_timeout));
            let call = router.clone().oneshot(request);
            async move {
                let response = call.await?;
                Ok::<_, std::convert::Infallible>(response.map(|body| {
                    axum::body::Body::new(body.map_frame(move |frame| {
                        let _under_way = &busy;
                        frame
                    }))
                }))
            }
        });
        let (stream, stalled) = crate::conns::Watched::new(stream);
        let connection = builder.serve_connection(TokioIo::new(stream), service);
        let mut stopping = stopping.clone();
        let stall_limit = options.write_stall_timeout;
        connections.spawn(async move {
            let _slot = slot;
            let mut connection = std::pin::pin!(connection);
            let mut closing = false;
            // Looked at a few times per limit: a stall is found at most half a limit late.
            let mut look = tokio::time::interval((stall_limit / 2).max(Duration::from_millis(10)));
            look.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    // The connection first: a request that has arrived reaches its handler
                    // (and marks the connection busy) before a request to close is heard.
                    biased;
                    done = connection.as_mut() => {
                        // A client's broken connection is its own affair.
                        if let Err(e) = done {
                            tracing::debug!("HTTP connection: {e}");
                        }
                        return;
                    }
                    _ = look.tick() => {
                        if stalled.for_at_least(stall_limit) {
                            // Its answers go nowhere: neither hyper's close nor a stop's
                            // grace would end it.
                            tracing::debug!("closed a connection whose client stopped reading");
                            return;
                        }
                    }
                    _ = stopping.wait_for(|s| *s), if !closing => {
                        // Closes it at once if idle, else after the answer under way.
                        closing = true;
                        connection.as_mut().graceful_shutdown();
                    }
                    () = opened.asked_to_close(), if !closing => {
                        if !opened.has_served() || opened.only_arriving() {
                            // Never began a request, or its request's body is still on its
                            // way: nothing of it has been acted on, and a head or a body sent
                            // a byte at a time would keep hyper's own close waiting.
                            tracing::debug!("closed an idle connection to make room");
                            return;
                        }
                        // Closed by hyper: at once if idle between requests, else once the
                        // answer under way (or the end of one still being written) is sent.
                        closing = true;
                        connection.as_mut().graceful_shutdown();
                    }
                }
            }
        });
        // Forget the ones that ended.
        while connections.try_join_next().is_some() {}
    }
    drop(listener);
    let _ = stopping_tx.send(true);
    let grace = options.shutdown_grace;
    let cut = tokio::select! {
        () = async { while connections.join_next().await.is_some() {} } => None,
        cut = async {
            tokio::select! {
                () = tokio::time::sleep(grace) => {
                    format!("after {}", humantime::format_duration(grace))
                }
                () = hurry => "on a second signal".to_string(),
            }
        } => Some(cut),
    };
    if let Some(cut) = cut {
        tracing::warn!(
            "stopped waiting for open HTTP requests {cut}; those still open get no answer \
             (a webhook among them changed nothing, or its change is on disk)"
        );
        connections.abort_all();
    }
}

/// How many connections `serve` keeps open at once by default: 4,096, or fewer when the
/// process may not open that many files. The soft limit on open files is first raised towards
/// 8,192 where the hard limit allows (many systems start services at 1,024); 128 files are
/// kept for the store, the flows watcher, the sends to Twilio and the log.
fn connection_limit() -> usize {
    const MOST: u64 = 4096;
    const KEPT: u64 = 128;
    let files = rlimit::increase_nofile_limit(2 * MOST).unwrap_or(1024);
    usize::try_from(files.saturating_sub(KEPT).clamp(16, MOST)).unwrap_or(16)
}

/// Whether texts go from more than one phone number (each needs smsflow's webhooks).
fn several_numbers(c: &Config) -> bool {
    matches!(
        c.twilio.as_ref().map(|t| &t.sender),
        Some(crate::config::Sender::From(n)) if n.iter().filter(|n| n.starts_with('+')).count() > 1
    )
}

/// A retention as the banner says it: in days when it is whole days, else as humantime
/// writes it, with a space before each unit (humantime writes "1year 6h").
fn retention_age(d: Duration) -> String {
    match d.as_secs() {
        s if s % 86_400 == 0 => format!("{} days", s / 86_400),
        _ => {
            let mut out = String::new();
            let mut last_digit = false;
            for c in humantime::format_duration(d).to_string().chars() {
                if last_digit && c.is_alphabetic() {
                    out.push(' ');
                }
                last_digit = c.is_ascii_digit();
                out.push(c);
            }
            out
        }
    }
}

/// With a retention set: deletes history entries and delivery records older than it, and
/// forgets numbers that never got anywhere and have been silent as long (and for the flows'
/// `send_window`, whose count of codes sent goes with the record), at the start and then once
/// a day, on blocking threads and through the writer, stopping early on shutdown.
async fn prune_daily(engine: Arc<Engine>, keep: Duration, mut stop: watch::Receiver<bool>) {
    loop {
        let now = engine.clock().now();
        let before = chrono::TimeDelta::from_std(keep)
            .ok()
            .and_then(|d| now.checked_sub_signed(d));
        if let Some(before) = before {
            let store = engine.store.clone();
            let stopping = stop.clone();
            let pruned =
                tokio::task::spawn_blocking(move || store.prune(before, || *stopping.borrow()))
                    .await;
            match pruned {
                Ok(Ok((0, 0))) => {}
                Ok(Ok((history, deliveries))) => tracing::info!(
                    history,
                    deliveries,
                    "deleted history entries and delivery records older than the retention"
                ),
                Ok(Err(e)) => tracing::error!("applying the retention: {e:#}"),
                Err(e) => tracing::error!("applying the retention: {e}"),
            }
            let window = engine.flows().verify.send_window;
            let silent_since = now
                .checked_sub_signed(window)
                .map_or(before, |w| w.min(before));
            match forget_silent(&engine, silent_since, &stop).await {
                Ok(0) => {}
                Ok(numbers) => tracing::info!(
                    numbers,
                    "forgot numbers that never verified nor answered, silent for the retention"
                ),
                Err(e) => tracing::error!("applying the retention to silent numbers: {e:#}"),
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(86_400)) => {}
            _ = stop.changed() => return,
        }
    }
}

/// Forgets every number [`crate::machine::Subscriber::forgettable`] since `before`, a chunk
/// at a time (listed on a blocking thread, erased by the writer: small chunks, so that the
/// webhooks between them wait little); how many.
async fn forget_silent(
    engine: &Arc<Engine>,
    before: chrono::DateTime<chrono::Utc>,
    stop: &watch::Receiver<bool>,
) -> anyhow::Result<u64> {
    let mut forgotten = 0;
    let mut after = None;
    while !*stop.borrow() {
        let store = engine.store.clone();
        let (phones, next) =
            tokio::task::spawn_blocking(move || store.forgettable_after(after, before, 64, 4096))
                .await??;
        if !phones.is_empty() {
            forgotten += engine.forget(phones, before).await?;
        }
        match next {
            Some(key) => after = Some(key),
            None => break,
        }
    }
    Ok(forgotten)
}

/// Runs a worker with its health flag up while it runs. The flag goes down however the
/// worker ends, a panic included, so `/readyz` never reports a dead worker as running.
async fn flagged(
    health: Arc<Health>,
    flag: fn(&Health) -> &AtomicBool,
    task: impl Future<Output = ()>,
) {
    struct Lowered<'a>(&'a AtomicBool);
    impl Drop for Lowered<'_> {
        fn drop(&mut self) {
            self.0.store(false, Relaxed);
        }
    }
    let up = flag(&health);
    up.store(true, Relaxed);
    let _lowered = Lowered(up);
    task.await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_worker_that_panics_is_no_longer_reported_running() {
        let health = Arc::new(Health::default());
        let worker = tokio::spawn(flagged(health.clone(), |h| &h.outbox, async {
            tokio::task::yield_now().await;
            panic!("a bug in a worker");
        }));
        assert!(worker.await.is_err(), "the worker panicked");
        assert!(!health.outbox.load(Relaxed));
    }

    #[test]
    fn the_banner_says_a_retention_in_days_or_units_spaced_apart() {
        let said = |text: &str| retention_age(crate::parse_duration(text).unwrap());
        for (given, told) in [
            ("180d", "180 days"),
            ("1w", "7 days"),
            ("1y", "1 year"),
            ("1M", "1 month"),
            ("36h", "1 day 12 h"),
            ("2d 1m", "2 days 1 m"),
            ("1h", "1 h"),
        ] {
            assert_eq!(said(given), told, "{given}");
        }
    }
}
