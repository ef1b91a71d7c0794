//! The HTTP surface (axum): Twilio webhooks, health. Handlers only move bytes: they parse,
//! check, call the engine, and render its answer.

pub mod admin;
pub mod otp;
pub mod signature;
pub mod voice;

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, OriginalUri, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;

use crate::config::Secret;
use crate::engine::{Engine, Input};
use crate::machine::{Event, OptOutType};
use crate::outbox::UNSUBSCRIBED;
use crate::phone::{Phone, Region};

/// Largest request body accepted (Twilio's own webhooks are a few KiB).
pub const MAX_BODY: usize = 64 * 1024;
/// How long after its head a request body may take to arrive whole, by default: a client that
/// sends its head and then its body slowly, or none, holds its connection no longer. (Twilio
/// itself gives up on a webhook after 15 s.)
pub const BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

pub struct AppState {
    pub engine: Arc<Engine>,
    pub public_url: Option<String>,
    /// When set, every `/twilio/*` request must carry a valid signature.
    pub auth_token: Option<Secret>,
    pub region: Region,
    /// Delivers OTP codes at once (the API must know whether the send worked).
    pub provider: Arc<crate::provider::Provider>,
    /// Bearer token for the OTP API.
    pub api_token: Option<Secret>,
    /// Bearer token for the admin API.
    pub admin_token: Option<Secret>,
    /// Listening on loopback only with no public URL: the OTP and admin APIs may run without
    /// a token for requests that did not come through a proxy.
    pub loopback: bool,
    pub reloader: Arc<crate::reload::Reloader>,
    pub health: Arc<Health>,
}

/// Whether the workers are running, for `/readyz`.
#[derive(Default)]
pub struct Health {
    pub scheduler: std::sync::atomic::AtomicBool,
    pub outbox: std::sync::atomic::AtomicBool,
}

/// Checks `Authorization: Bearer` against `token` in constant time. Without a token the API
/// runs only on loopback: an open API on a public address is an invitation to abuse.
pub fn bearer(
    token: Option<&Secret>,
    loopback: bool,
    headers: &HeaderMap,
    env: &str,
    what: &str,
) -> Result<(), String> {
    let Some(token) = token else {
        return if loopback && from_here(headers) {
            Ok(())
        } else {
            Err(format!(
                "the {what} needs a token here: set {env}. Without one it takes requests only \
                 while smsflow is reachable from this machine alone (a loopback listen address \
                 and no public_url), and only straight from it: not through a proxy or tunnel, \
                 addressed to localhost or a loopback address, and not sent by another site's \
                 page"
            ))
        };
    };
    let header = headers.get(header::AUTHORIZATION);
    if header.is_some_and(|v| v.to_str().is_err()) {
        return Err("the Authorization header is not printable ASCII".to_string());
    }
    let Some(value) = header.and_then(|v| v.to_str().ok()) else {
        return Err("missing Authorization: Bearer token".to_string());
    };
    let value = value.trim();
    let (scheme, given) = value.split_once([' ', '\t']).unwrap_or((value, ""));
    // The scheme is case-insensitive (RFC 7235). What the header holds is said back only
    // when it is a scheme HTTP knows: anything else may be the token, without its scheme.
    if !scheme.eq_ignore_ascii_case("bearer") {
        const KNOWN: [&str; 9] = [
            "Basic",
            "Digest",
            "Negotiate",
            "NTLM",
            "OAuth",
            "Token",
            "HOBA",
            "Mutual",
            "AWS4-HMAC-SHA256",
        ];
        let named = KNOWN.iter().find(|k| k.eq_ignore_ascii_case(scheme));
        return Err(match named {
            Some(k) => format!(
                "the Authorization header uses the {k} scheme, not Bearer: give \
                 `Authorization: Bearer <token>`"
            ),
            None => "the Authorization header does not start with `Bearer ` (what it holds is \
                     not shown: it may be the token itself): give `Authorization: Bearer <token>`"
                .to_string(),
        });
    }
    if given.trim().is_empty() {
        return Err(
            "the Authorization header's Bearer token is empty (is the variable \
                    that should hold it set?)"
                .to_string(),
        );
    }
    if signature::same_token(given.trim(), token.expose()) {
        Ok(())
    } else {
        // Guessing shows in the log (at most once a minute for each token, so it cannot
        // flood it, nor guesses at one hide those at the other).
        let slot = if env == "SMSFLOW_API_TOKEN" {
            WRONG_API_TOKEN
        } else {
            WRONG_ADMIN_TOKEN
        };
        if once_a_minute(slot) {
            tracing::warn!(
                "refused a request to the {what} with a wrong bearer token (this is logged at \
                 most once a minute)"
            );
        }
        Err("wrong bearer token".to_string())
    }
}

/// The routes of [`router`] whose path is fixed.
const FIXED_ROUTES: [&str; 12] = [
    "/twilio/sms",
    "/twilio/status",
    "/twilio/voice",
    "/twilio/voice/gather",
    "/authenticate/get_otp",
    "/authenticate/validate_otp",
    "/admin/subscribers",
    "/admin/reload",
    "/admin/export.csv",
    "/healthz",
    "/readyz",
    "/metrics",
];

/// The routes. (The time a request body may take is kept by `app::serve`, which wraps it.)
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/twilio/sms", post(sms))
        .route("/twilio/status", post(status))
        .route("/twilio/voice", post(voice::call))
        .route("/twilio/voice/gather", post(voice::gather))
        .route("/authenticate/get_otp", post(otp::get_otp))
        .route("/authenticate/validate_otp", post(otp::validate_otp))
        .route("/admin/subscribers", get(admin::list))
        .route(
            "/admin/subscribers/{phone}",
            get(admin::show).delete(admin::erase),
        )
        .route("/admin/subscribers/{phone}/opt-out", post(admin::opt_out))
        .route("/admin/reload", post(admin::reload))
        .route("/admin/export.csv", get(admin::export))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(axum::middleware::map_response(log_failures))
        .layer(axum::middleware::from_fn(explain_refusals))
        // Outermost: it counts the answers as they leave (a body declared too large is
        // refused by `explain_refusals` before the routes).
        .layer(axum::middleware::from_fn(count_and_time))
        .with_state(state)
}

/// Errors of the Twilio routes: a status and a plain-text reason.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("{0}")]
    BadRequest(String),
    /// A wrong signature, and the URL it was checked against (named in the log, not to the
    /// caller: it may be a tunnel's address the caller did not use).
    #[error("invalid X-Twilio-Signature for {0} (check the auth token and SMSFLOW_PUBLIC_URL)")]
    Forbidden(String),
    #[error("missing X-Twilio-Signature header")]
    Unsigned,
    /// No auth token to check signatures with, and the request is not from this machine.
    #[error(
        "unsigned webhook refused: set TWILIO_AUTH_TOKEN. Without it, webhooks are taken only \
         while smsflow is reachable from this machine alone (a loopback listen address and no \
         public_url), and only straight from it: not through a proxy or tunnel, addressed to \
         localhost or a loopback address, and not sent by another site's page"
    )]
    NotLocal,
    /// The body could not be read (too large: 413).
    #[error("{0}")]
    Body(axum::extract::rejection::BytesRejection),
    #[error(transparent)]
    Unexpected(#[from] anyhow::Error),
}

/// The cause chain of an unexpected error, carried to [`log_failures`].
#[derive(Clone)]
struct Failure(Arc<String>);

impl IntoResponse for WebhookError {
    fn into_response(self) -> Response {
        match self {
            WebhookError::BadRequest(m) => {
                (StatusCode::BAD_REQUEST, format!("{m}\n")).into_response()
            }
            WebhookError::Forbidden(_) | WebhookError::Unsigned | WebhookError::NotLocal => {
                let kind = match self {
                    WebhookError::Unsigned => Refusal::NoSignature,
                    WebhookError::NotLocal => Refusal::NoToken,
                    _ => Refusal::WrongSignature,
                };
                let m = self.to_string();
                warn_refused(kind, &m);
                let answer = match self {
                    WebhookError::Forbidden(_) => "invalid X-Twilio-Signature (check the auth \
                        token and SMSFLOW_PUBLIC_URL; smsflow's log names the URL it was checked \
                        against)"
                        .to_string(),
                    _ => m,
                };
                (StatusCode::FORBIDDEN, format!("{answer}\n")).into_response()
            }
            WebhookError::Body(rejection) => rejection.into_response(),
            WebhookError::Unexpected(e) => {
                let mut r = (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal error; see the smsflow log\n",
                )
                    .into_response();
                r.extensions_mut()
                    .insert(Failure(Arc::new(format!("{e:#}"))));
                r
            }
        }
    }
}

/// A refused signature is what a wrong public URL, a proxy that drops `X-Forwarded-*` or a
/// rotated auth token looks like: every webhook is refused, and the reason would otherwise
/// show only in Twilio's debugger. Logged at most once a minute for a missing signature and
/// once for a wrong one (whose line names the URL checked), so forgeries cannot flood the
/// log, and a stray unsigned request does not hide what a misconfiguration looks like.
fn warn_refused(kind: Refusal, why: &str) {
    if once_a_minute(kind as usize) {
        tracing::warn!("refused a Twilio webhook: {why} (this is logged at most once a minute)");
    }
}

/// Whether the once-a-minute line of kind `slot` (a [`Refusal`], [`WRONG_API_TOKEN`] or
/// [`WRONG_ADMIN_TOKEN`]) is due now, which it then takes.
fn once_a_minute(slot: usize) -> bool {
    use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
    static LAST: [AtomicU64; 5] = [const { AtomicU64::new(0) }; 5];
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let Some(slot) = LAST.get(slot) else {
        return false;
    };
    let last = slot.load(Relaxed);
    now >= last.saturating_add(60) && slot.compare_exchange(last, now, Relaxed, Relaxed).is_ok()
}

/// The once-a-minute lines for a wrong bearer token of the OTP API, and of the admin API
/// (and `/metrics`, which take the same token) (see [`once_a_minute`]).
const WRONG_API_TOKEN: usize = 3;
const WRONG_ADMIN_TOKEN: usize = 4;

/// Why a webhook was refused for its signature (or for having none to check): each kind has
/// its own once-a-minute log line.
#[derive(Clone, Copy)]
enum Refusal {
    WrongSignature = 0,
    NoSignature = 1,
    NoToken = 2,
}

/// Logs every unexpected error once, with its whole cause chain.
async fn log_failures(response: Response) -> Response {
    if let Some(Failure(chain)) = response.extensions().get::<Failure>() {
        tracing::error!("request failed: {chain}");
    }
    response
}

/// axum answers an oversize body and a wrong method with terse or empty bodies: say what
/// is wrong, on every route, in the shape of its API (the OTP API's failure object, the admin
/// API's `{"error"}`, plain text for Twilio).
async fn explain_refusals(req: Request, next: axum::middleware::Next) -> Response {
    let path = req.uri().path();
    let (otp, admin) = (
        path.starts_with("/authenticate/"),
        path.starts_with("/admin"),
    );
    // A body declared over the limit is refused at once, not read (or waited for) first.
    let declared = req
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.trim().parse::<u64>().ok());
    // (Not with `Transfer-Encoding`, which hyper frames the body by instead.)
    let framed_otherwise = req
        .headers()
        .contains_key(axum::http::header::TRANSFER_ENCODING);
    let response = if !framed_otherwise && declared.is_some_and(|n| n > MAX_BODY as u64) {
        StatusCode::PAYLOAD_TOO_LARGE.into_response()
    } else {
        next.run(req).await
    };
    let status = response.status();
    let says = match status {
        StatusCode::PAYLOAD_TOO_LARGE => {
            format!("request body is over the {} KiB limit\n", MAX_BODY / 1024)
        }
        // A body that could not be read (too slow, or cut off): axum answers in plain text;
        // the OTP and admin APIs answer in their own JSON shape, as for every refusal.
        StatusCode::BAD_REQUEST
            if (otp || admin)
                && response
                    .headers()
                    .get(axum::http::header::CONTENT_TYPE)
                    .is_some_and(|t| t.as_bytes().starts_with(b"text/plain")) =>
        {
            let body = axum::body::to_bytes(response.into_body(), 4096)
                .await
                .unwrap_or_default();
            String::from_utf8_lossy(&body).into_owned()
        }
        // (axum adds the Allow header after this layer runs.)
        StatusCode::METHOD_NOT_ALLOWED => {
            "method not allowed on this route; its Allow header lists the ones it takes\n"
                .to_string()
        }
        _ => return response,
    };
    let says = says.trim_end().to_string();
    if otp {
        otp::OtpError::Refused(status, says).into_response()
    } else if admin {
        admin::AdminError::Refused(status, says).into_response()
    } else {
        (status, format!("{says}\n")).into_response()
    }
}

/// Whether a request to a loopback listener may be taken as this machine's own: it came
/// straight, not through a proxy or tunnel (ngrok, cloudflared and reverse proxies add their
/// headers: it may be from anywhere); it names a loopback host (a web page whose domain was
/// pointed at 127.0.0.1, "DNS rebinding", names its own); and it is not another site's page
/// posting to it (browsers send `Origin` with every cross-site POST).
fn from_here(headers: &HeaderMap) -> bool {
    // `Via` is what every HTTP proxy should add (RFC 9110); the rest, what proxies, load
    // balancers and CDNs add to name the client or where it came in.
    let proxied = [
        "x-forwarded-for",
        "x-forwarded-host",
        "x-forwarded-proto",
        "x-forwarded-port",
        "x-forwarded-server",
        "x-original-forwarded-for",
        "forwarded",
        "via",
        "x-real-ip",
        "x-client-ip",
        "x-cluster-client-ip",
        "true-client-ip",
        "cf-connecting-ip",
        "fastly-client-ip",
    ]
    .iter()
    .any(|h| headers.contains_key(*h));
    let named = |name| headers.get(name).map(|v| v.to_str().ok());
    let host = match named(header::HOST) {
        None => true,
        Some(host) => host
            .and_then(|h| h.parse::<axum::http::uri::Authority>().ok())
            .is_some_and(|a| loopback_name(a.host())),
    };
    let origin = match named(header::ORIGIN) {
        None => true,
        Some(origin) => origin
            .and_then(|o| o.parse::<axum::http::Uri>().ok())
            .is_some_and(|u| u.host().is_some_and(loopback_name)),
    };
    !proxied && host && origin
}

/// `localhost` (and its subdomains) or a loopback address (`127.0.0.1`, `[::1]`).
fn loopback_name(host: &str) -> bool {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    let ip = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost"
        || host.ends_with(".localhost")
        || ip
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Counts the answers of the webhook, OTP and admin routes by status, and records the
/// latency of every Twilio webhook. A 401 (the OTP API, the admin API and `/metrics`, which
/// take a bearer token) says which scheme it wants, as HTTP asks (`WWW-Authenticate`).
async fn count_and_time(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let path = req.uri().path();
    let (route, webhook) = match path {
        "/twilio/sms" => (Some("sms"), true),
        "/twilio/status" => (Some("status"), true),
        "/twilio/voice" | "/twilio/voice/gather" => (Some("voice"), true),
        "/authenticate/get_otp" => (Some("get_otp"), false),
        "/authenticate/validate_otp" => (Some("validate_otp"), false),
        _ if path == "/admin" || path.starts_with("/admin/") => (Some("admin"), false),
        "/metrics" => (Some("metrics"), false),
        _ => (None, false),
    };
    let started = std::time::Instant::now();
    let mut response = next.run(req).await;
    if response.status() == StatusCode::UNAUTHORIZED {
        (response.headers_mut())
            .entry(header::WWW_AUTHENTICATE)
            .or_insert(HeaderValue::from_static("Bearer"));
    }
    if let Some(route) = route {
        // Webhooks answered (2xx): refusals (a forged signature, a wrong method), quick as
        // they are, would make the quantiles look healthy under a flood of them.
        if webhook && response.status().is_success() {
            crate::metrics::webhook_seconds(route, started.elapsed().as_secs_f64());
        }
        crate::metrics::http_response(route, response.status());
    }
    response
}

/// Whether a request may see the operator's figures (`/metrics`, the details of `/readyz`):
/// the admin API's rule. Subscriber counts, message volumes and flow-file problems are not for
/// whoever finds the tunnel's address.
fn operator(state: &AppState, headers: &HeaderMap, what: &str) -> Result<(), String> {
    bearer(
        state.admin_token.as_ref(),
        state.loopback,
        headers,
        "SMSFLOW_ADMIN_TOKEN",
        what,
    )
}

/// Alive, unless the store failed: the daemon is then stopping (see [`Store::failure`]), and a
/// liveness probe that looks meanwhile must not call it well.
///
/// [`Store::failure`]: crate::store::Store::failure
async fn healthz(State(state): State<Arc<AppState>>) -> Response {
    match state.engine.store.failure() {
        None => "ok\n".into_response(),
        Some(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "failing: the store cannot write to its disk; smsflow is stopping\n",
        )
            .into_response(),
    }
}

/// Ready when the store answers, flows are loaded and the workers run. Anyone gets the status
/// and `ready` (for a load balancer's or orchestrator's probe); the rest is for the operator.
async fn readyz(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    use std::sync::atomic::Ordering::Relaxed;
    let store = tokio::time::timeout(std::time::Duration::from_secs(2), state.engine.durable())
        .await
        .is_ok_and(|r| r.is_ok());
    let scheduler = state.health.scheduler.load(Relaxed);
    let outbox = state.health.outbox.load(Relaxed);
    let ready = store && scheduler && outbox;
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    if operator(&state, &headers, "readiness detail").is_err() {
        return (status, axum::Json(serde_json::json!({ "ready": ready }))).into_response();
    }
    let body = serde_json::json!({
        "ready": ready,
        "store": store,
        "flows": state.engine.flows().summary(),
        "scheduler": scheduler,
        "outbox": outbox,
        "last_reload": state.reloader.last_reload(),
    });
    (status, axum::Json(body)).into_response()
}

async fn metrics(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if let Err(why) = operator(&state, &headers, "metrics endpoint") {
        return (StatusCode::UNAUTHORIZED, format!("{why}\n")).into_response();
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        crate::metrics::render(&state.engine, state.reloader.counts()),
    )
        .into_response()
}

/// An unknown route, answered in the shape of the API its path is under.
async fn not_found(method: Method, uri: Uri) -> Response {
    let mut says = format!("no route for {method} {}", crate::clip(uri.path()));
    // A URL pasted with a slash at its end (into Twilio's console, say) names the route meant.
    let meant = uri.path().trim_end_matches('/');
    if meant.len() < uri.path().len() && FIXED_ROUTES.contains(&meant) {
        says.push_str(&format!(
            "; the route is {meant}, without the slash at the end"
        ));
    }
    if uri.path().starts_with("/authenticate/") {
        otp::OtpError::Refused(StatusCode::NOT_FOUND, says).into_response()
    } else if uri.path().starts_with("/admin") {
        admin::AdminError::Refused(StatusCode::NOT_FOUND, says).into_response()
    } else {
        (StatusCode::NOT_FOUND, format!("{says}\n")).into_response()
    }
}

/// Checks the request's Content-Type is `expected` (its parameters, such as `charset`, aside);
/// the error names what came.
fn content_type_is(headers: &HeaderMap, expected: &str) -> Result<(), String> {
    let given = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let essence = given.split(';').next().unwrap_or_default().trim();
    if essence.eq_ignore_ascii_case(expected) {
        Ok(())
    } else {
        Err(format!(
            "expected Content-Type: {expected}, got {:?}",
            crate::clip(given)
        ))
    }
}

/// The form fields the `/twilio/*` routes read: each must come at most once.
const READ: [&str; 10] = [
    "From",
    "To",
    "Body",
    "OptOutType",
    "MessageSid",
    "SmsSid",
    "MessageStatus",
    "ErrorCode",
    "Digits",
    "StirVerstat",
];

/// A parsed, signature-checked Twilio form: the extractor every `/twilio/*` route takes.
pub struct TwilioForm {
    params: Vec<(String, String)>,
    region: Region,
}

impl FromRequest<Arc<AppState>> for TwilioForm {
    type Rejection = WebhookError;

    async fn from_request(req: Request, state: &Arc<AppState>) -> Result<Self, Self::Rejection> {
        // The headers move out (no copy); the rest of the request, with the body limit in its
        // extensions, goes to the body extractor.
        let (mut parts, body) = req.into_parts();
        let headers = std::mem::take(&mut parts.headers);
        let uri = parts
            .extensions
            .get::<OriginalUri>()
            .map_or_else(|| parts.uri.clone(), |o| o.0.clone());
        let body = Bytes::from_request(Request::from_parts(parts, body), state)
            .await
            .map_err(WebhookError::Body)?;
        TwilioForm::parse(state, &headers, &uri, &body)
    }
}

impl TwilioForm {
    fn parse(
        state: &AppState,
        headers: &HeaderMap,
        uri: &Uri,
        body: &[u8],
    ) -> Result<TwilioForm, WebhookError> {
        content_type_is(headers, "application/x-www-form-urlencoded")
            .map_err(|e| WebhookError::BadRequest(format!("expected a form body: {e}")))?;
        let Ok(text) = std::str::from_utf8(body) else {
            return Err(WebhookError::BadRequest(
                "the form body is not UTF-8".into(),
            ));
        };
        // Decoded, a name or value must be UTF-8 too (the form decoder would put U+FFFD in
        // place of what is not); named without its value, which may be a number or a text.
        // (Only an escape can make what is not: most webhooks have none to look at.)
        let utf8 = |s: &str| {
            percent_encoding::percent_decode_str(s)
                .decode_utf8()
                .is_ok()
        };
        for pair in text.split('&').filter(|pair| pair.contains('%')) {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            if !utf8(name) {
                return Err(WebhookError::BadRequest(
                    "a form field's name is not UTF-8 once decoded".into(),
                ));
            }
            if !utf8(value) {
                let name = name.replace('+', " ");
                let name = percent_encoding::percent_decode_str(&name).decode_utf8_lossy();
                return Err(WebhookError::BadRequest(format!(
                    "form field {} is not UTF-8 once decoded",
                    crate::clip(&name)
                )));
            }
        }
        let params: Vec<(String, String)> = form_urlencoded::parse(body).into_owned().collect();
        // Twilio gives each field once: which of two would count is anyone's guess.
        for name in READ {
            if params.iter().filter(|(k, _)| k == name).nth(1).is_some() {
                return Err(WebhookError::BadRequest(format!(
                    "form field {name} is given twice"
                )));
            }
        }
        if let Some(token) = &state.auth_token {
            let url = public_url(state, headers, uri);
            let given = headers
                .get("x-twilio-signature")
                .ok_or(WebhookError::Unsigned)?
                .to_str()
                // (Not base64, so not a signature.)
                .map_err(|_| WebhookError::Forbidden(url.clone()))?;
            if !signature::verify(token.expose(), &url, &params, given) {
                return Err(WebhookError::Forbidden(url));
            }
        } else if !state.loopback || !from_here(headers) {
            // Unsigned webhooks can say anything (any From, a 21610 for any number, a voice
            // menu key that reads out a fresh code): only from this machine, as the OTP and
            // admin APIs without their tokens.
            return Err(WebhookError::NotLocal);
        }
        Ok(TwilioForm {
            params,
            region: state.region,
        })
    }

    /// The phone number in field `name` (From, To), or a 400 naming the field.
    fn phone(&self, name: &str) -> Result<Phone, WebhookError> {
        Phone::parse_in(self.require(name)?, self.region)
            .map_err(|e| WebhookError::BadRequest(format!("{name}: {e}")))
    }

    fn get(&self, name: &str) -> Option<&str> {
        debug_assert!(READ.contains(&name), "{name} is read: add it to READ");
        self.params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn require(&self, name: &str) -> Result<&str, WebhookError> {
        self.get(name)
            .ok_or_else(|| WebhookError::BadRequest(format!("missing form field {name}")))
    }
}

/// The number of ours a text or call came to (Twilio's `To`), when it is one of the phone
/// numbers messages go from (see [`crate::provider::Provider::sender_for`]). Not required:
/// a request without one is answered all the same, and what is sent later goes from the
/// listed number it last wrote to, else from the first.
fn our_number(state: &AppState, form: &TwilioForm) -> Option<Phone> {
    form.get("To").and_then(|to| state.provider.sender_for(to))
}

/// The URL Twilio signed: `public_url`, or what the proxy says, plus the path and query.
fn public_url(state: &AppState, headers: &HeaderMap, uri: &Uri) -> String {
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    if let Some(base) = &state.public_url {
        return format!("{base}{path}");
    }
    // The first of a list: where the request first came in (a proxy behind the tunnel may
    // append its own). A host as it came (Twilio signs the URL as the console has it).
    let first = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(',').next())
            .map(|v| v.trim().to_string())
    };
    let proto = first("x-forwarded-proto")
        .map(|p| p.to_ascii_lowercase())
        .filter(|p| p == "http" || p == "https")
        .unwrap_or_else(|| "http".into());
    // A host and maybe a port, nothing more: "a.example/foo" would let a request signed for
    // another deployment's path prefix pass here.
    let bare = |h: &String| {
        !h.contains(['/', '@', '?', '#'])
            && h.parse::<axum::http::uri::Authority>()
                .is_ok_and(|a| a.as_str() == h)
    };
    let host = (first("x-forwarded-host").filter(bare))
        .or_else(|| first("host").filter(bare))
        .unwrap_or_else(|| "localhost".into());
    format!("{proto}://{host}{path}")
}

/// A short label for metrics and logs.
fn outcome_label(o: crate::machine::Outcome) -> &'static str {
    use crate::machine::Outcome::*;
    match o {
        Done => "handled",
        CodeSent => "code_sent",
        Verified => "verified",
        WrongCode => "wrong_code",
        Expired => "expired_code",
        Locked { .. } => "locked",
        RateLimited { .. } => "rate_limited",
        OptedOut => "opted_out",
        Ignored => "ignored",
    }
}

fn xml(body: String) -> Response {
    ([(header::CONTENT_TYPE, "text/xml; charset=utf-8")], body).into_response()
}

/// An inbound SMS: answered with TwiML only after its state change is on disk.
async fn sms(
    State(state): State<Arc<AppState>>,
    form: TwilioForm,
) -> Result<Response, WebhookError> {
    let phone = form.phone("From")?;
    let text = form.require("Body")?;
    let sid = form
        .get("MessageSid")
        .or_else(|| form.get("SmsSid"))
        .ok_or_else(|| WebhookError::BadRequest("missing form field MessageSid".into()))?;
    if sid.trim().is_empty() {
        return Err(WebhookError::BadRequest(
            "form field MessageSid is empty".into(),
        ));
    }
    let applied = state
        .engine
        .apply(Input {
            phone: &phone,
            event: match form.get("OptOutType").and_then(OptOutType::parse) {
                Some(kind) => Event::InboundKeyword(text.to_string(), kind),
                None => Event::Inbound(text.to_string()),
            },
            inbound_sid: Some(sid),
            fired: None,
            inline_codes: false,
            to: our_number(&state, &form).as_ref(),
        })
        .await?;
    let outcome = if applied.duplicate {
        "duplicate"
    } else {
        outcome_label(applied.outcome)
    };
    crate::metrics::inbound(outcome);
    tracing::info!(phone = %phone.masked(), outcome, "inbound sms");
    Ok(xml(applied
        .twiml
        .unwrap_or_else(|| crate::twiml::messages(&[]))))
}

/// A delivery report for a message we sent.
async fn status(
    State(state): State<Arc<AppState>>,
    form: TwilioForm,
) -> Result<Response, WebhookError> {
    let sid = form.require("MessageSid")?;
    if sid.trim().is_empty() {
        return Err(WebhookError::BadRequest("MessageSid is empty".into()));
    }
    let new_status = form.require("MessageStatus")?;
    // A word of Twilio's (`delivered`, `undelivered`, …; one it adds later is kept as it is):
    // anything else is no report, and would reach the record and the log as it came.
    let word = |c: char| c.is_ascii_lowercase() || c == '_';
    if new_status.is_empty() || new_status.len() > 40 || !new_status.chars().all(word) {
        return Err(WebhookError::BadRequest(format!(
            "MessageStatus {:?} is not a delivery status (such as sent, delivered, undelivered)",
            crate::clip(new_status)
        )));
    }
    let code = match form
        .get("ErrorCode")
        .map(str::trim)
        .filter(|c| !c.is_empty())
    {
        None => None,
        // Digits alone, as Twilio writes its codes (`+21610` or `021610` is none).
        Some(c)
            if !c.bytes().all(|b| b.is_ascii_digit()) || (c.len() > 1 && c.starts_with('0')) =>
        {
            return Err(WebhookError::BadRequest(format!(
                "ErrorCode {:?} is not a number as Twilio writes its codes (digits alone: no \
                 sign, no leading zero)",
                crate::clip(c)
            )))
        }
        Some(c) => Some(c.parse::<u32>().map_err(|_| {
            WebhookError::BadRequest(format!(
                "ErrorCode {:?} is out of range for a Twilio error code",
                crate::clip(c)
            ))
        })?),
    };
    let report = crate::store::Report {
        status: new_status.to_string(),
        error_code: code,
        at: state.engine.clock().now(),
    };
    if code == Some(UNSUBSCRIBED) {
        // The number of the message's record, unless the record has a 21610 already: a
        // repeat (Twilio may send one twice; a captured one could be replayed, or with
        // another failed status) opts nothing out, as the number may have texted START since;
        // nor does a first one that comes after the number opted out and back in since the
        // message was queued (START lifted the block it met). For a message smsflow has no record
        // of, the number it went to: a `To` given must be a phone number, and one is needed.
        // (One smsflow does not know, erased since the send or never met, is not brought
        // back: the event creates no record.) The opt-out first: should it fail, the report
        // is not kept, and a retry of it opts the number out.
        let to = (form.get("To"))
            .is_some_and(|t| !t.trim().is_empty())
            .then(|| form.phone("To"))
            .transpose()?;
        let store = &state.engine.store;
        let number = match store.delivery_by_sid(sid) {
            Ok(Some((id, d))) => (d.error_code != Some(UNSUBSCRIBED)
                && !store.opted_back_in_since(&d.phone, id)?)
            .then_some(d.phone),
            _ => Some(to.map_or_else(|| form.phone("To"), Ok)?),
        };
        if let Some(phone) = number {
            (state.engine)
                .event(&phone, Event::ProviderUnsubscribed)
                .await?;
        }
    }
    state.engine.store.report(sid, &report)?;
    state.engine.durable().await?;
    crate::metrics::delivery_report(new_status);
    tracing::info!(status = new_status, code, "delivery report");
    Ok(StatusCode::NO_CONTENT.into_response())
}
