//! The HTTP surface (axum): Twilio webhooks, health. Handlers only move bytes: they parse,
//! check, call the engine, and render its answer.

pub mod otp;
pub mod signature;
pub mod twiml;
pub mod voice;

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, OriginalUri, State};
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;

use crate::config::Secret;
use crate::engine::{Engine, Input};
use crate::machine::Event;
use crate::outbox::UNSUBSCRIBED;
use crate::phone::{Phone, Region};

/// Largest request body accepted (Twilio's own webhooks are a few KiB).
pub const MAX_BODY: usize = 64 * 1024;

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
    /// Listening on loopback only: the OTP API may run without a token.
    pub loopback: bool,
}

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/twilio/sms", post(sms))
        .route("/twilio/status", post(status))
        .route("/twilio/voice", post(voice::call))
        .route("/twilio/voice/gather", post(voice::gather))
        .route("/authenticate/get_otp", post(otp::get_otp))
        .route("/authenticate/validate_otp", post(otp::validate_otp))
        .route("/healthz", get(|| async { "ok\n" }))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(axum::middleware::map_response(log_failures))
        .with_state(state)
}

/// Errors of the Twilio routes: a status and a plain-text reason.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Forbidden(String),
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
            WebhookError::Forbidden(m) => (StatusCode::FORBIDDEN, format!("{m}\n")).into_response(),
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

/// Logs every unexpected error once, with its whole cause chain.
async fn log_failures(response: Response) -> Response {
    if let Some(Failure(chain)) = response.extensions().get::<Failure>() {
        tracing::error!("request failed: {chain}");
    }
    response
}

async fn not_found(method: Method, uri: Uri) -> (StatusCode, String) {
    (
        StatusCode::NOT_FOUND,
        format!("no route for {method} {}\n", uri.path()),
    )
}

/// A parsed, signature-checked Twilio form.
struct TwilioForm(Vec<(String, String)>);

impl TwilioForm {
    fn parse(
        state: &AppState,
        headers: &HeaderMap,
        uri: &Uri,
        body: &[u8],
    ) -> Result<TwilioForm, WebhookError> {
        let content_type = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if !content_type
            .to_ascii_lowercase()
            .starts_with("application/x-www-form-urlencoded")
        {
            return Err(WebhookError::BadRequest(format!(
                "expected a form body (Content-Type: application/x-www-form-urlencoded), got {:?}",
                content_type
            )));
        }
        if std::str::from_utf8(body).is_err() {
            return Err(WebhookError::BadRequest(
                "the form body is not UTF-8".into(),
            ));
        }
        let params: Vec<(String, String)> = form_urlencoded::parse(body).into_owned().collect();
        if let Some(token) = &state.auth_token {
            let url = public_url(state, headers, uri);
            let given = headers
                .get("x-twilio-signature")
                .and_then(|v| v.to_str().ok())
                .ok_or_else(|| {
                    WebhookError::Forbidden("missing X-Twilio-Signature header".into())
                })?;
            if !signature::verify(token.expose(), &url, &params, given) {
                return Err(WebhookError::Forbidden(format!(
                    "invalid X-Twilio-Signature for {url} (check the auth token and SMSFLOW_PUBLIC_URL)"
                )));
            }
        }
        Ok(TwilioForm(params))
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn require(&self, name: &str) -> Result<&str, WebhookError> {
        self.get(name)
            .ok_or_else(|| WebhookError::BadRequest(format!("missing form field {name}")))
    }
}

/// The URL Twilio signed: `public_url`, or what the proxy says, plus the path and query.
fn public_url(state: &AppState, headers: &HeaderMap, uri: &Uri) -> String {
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    if let Some(base) = &state.public_url {
        return format!("{base}{path}");
    }
    let first = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(',').next())
            .map(|v| v.trim().to_string())
    };
    let proto = first("x-forwarded-proto").unwrap_or_else(|| "http".into());
    let host = first("x-forwarded-host")
        .or_else(|| first("host"))
        .unwrap_or_else(|| "localhost".into());
    format!("{proto}://{host}{path}")
}

fn xml(body: String) -> Response {
    ([(header::CONTENT_TYPE, "text/xml; charset=utf-8")], body).into_response()
}

/// An inbound SMS: answered with TwiML only after its state change is on disk.
async fn sms(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    OriginalUri(uri): OriginalUri,
    body: Bytes,
) -> Result<Response, WebhookError> {
    let form = TwilioForm::parse(&state, &headers, &uri, &body)?;
    let from = form.require("From")?;
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
    let phone = Phone::parse_in(from, state.region)
        .map_err(|e| WebhookError::BadRequest(format!("From: {e}")))?;
    let applied = state
        .engine
        .apply(Input {
            phone: &phone,
            event: Event::Inbound(text.to_string()),
            inbound_sid: Some(sid),
            fired: None,
            inline_codes: false,
        })
        .await?;
    if applied.duplicate {
        tracing::info!(phone = %phone.masked(), "inbound: duplicate MessageSid, answered as before");
    } else {
        tracing::info!(phone = %phone.masked(), outcome = ?applied.outcome, "inbound sms");
    }
    Ok(xml(applied.twiml.unwrap_or_else(|| twiml::messages(&[]))))
}

/// A delivery report for a message we sent.
async fn status(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    OriginalUri(uri): OriginalUri,
    body: Bytes,
) -> Result<Response, WebhookError> {
    let form = TwilioForm::parse(&state, &headers, &uri, &body)?;
    let sid = form.require("MessageSid")?;
    let new_status = form.require("MessageStatus")?;
    let code =
        match form
            .get("ErrorCode")
            .map(str::trim)
            .filter(|c| !c.is_empty())
        {
            None => None,
            Some(c) => Some(c.parse::<u32>().map_err(|_| {
                WebhookError::BadRequest(format!("ErrorCode {c:?} is not a number"))
            })?),
        };
    let store = &state.engine.store;
    let mut phone = None;
    if let Some((id, mut d)) = store.delivery_by_sid(sid)? {
        d.status = new_status.to_string();
        d.error_code = code.or(d.error_code);
        d.updated_at = chrono::Utc::now();
        store.update_delivery(id, &d)?;
        phone = Some(d.phone);
    }
    if code == Some(UNSUBSCRIBED) {
        let phone = match phone {
            Some(p) => p,
            None => Phone::parse_in(form.require("To")?, state.region)
                .map_err(|e| WebhookError::BadRequest(format!("To: {e}")))?,
        };
        state
            .engine
            .apply(Input {
                phone: &phone,
                event: Event::ProviderUnsubscribed,
                inbound_sid: None,
                fired: None,
                inline_codes: false,
            })
            .await?;
    } else {
        state.engine.durable().await?;
    }
    tracing::info!(status = new_status, ?code, "delivery report");
    Ok(StatusCode::NO_CONTENT.into_response())
}
