//! The OTP JSON API: `POST /authenticate/get_otp` and `POST /authenticate/validate_otp`,
//! with the original service's contract.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use serde::{Deserialize, Serialize};

use super::AppState;
use crate::engine::{Applied, Input};
use crate::machine::{Event, Outcome};
use crate::phone::Phone;
use crate::provider::SendError;

/// Success is exactly this body.
const SUCCESS: &str = r#"{"message":"success","exit_code":0}"#;

/// Failures, each with its documented exit code and HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum OtpError {
    /// 1 / 403: invalid, expired or superseded OTP; or the phone opted out.
    #[error("{0}")]
    Rejected(String),
    /// 2 / 400: bad JSON, wrong Content-Type, missing or invalid phone, OTP of the wrong shape.
    #[error("{0}")]
    BadRequest(String),
    /// 2 / the given status: a request refused before it reached the API (413, 405).
    #[error("{1}")]
    Refused(StatusCode, String),
    /// 3 / 429: too many codes requested, or too many wrong guesses.
    #[error("{message}")]
    TooMany { message: String, retry_after: u64 },
    /// 4 / 401: missing or wrong bearer token.
    #[error("{0}")]
    Unauthorized(String),
    /// 5 / 500: the message provider could not be reached or refused the send.
    #[error("{0}")]
    Provider(String),
    /// 5 / 503: the provider is busy (Twilio's 429) and said when to try again.
    #[error("{message}")]
    ProviderBusy { message: String, retry_after: u64 },
    /// 6 / 500: smsflow itself failed (the log has the details).
    #[error(transparent)]
    Unexpected(#[from] anyhow::Error),
}

#[derive(Serialize)]
struct FailureBody<'a> {
    error: &'a str,
    exit_code: u8,
    message: &'static str,
    status_code: u16,
}

impl OtpError {
    /// The answer in brief, as `smsflow simulate` prints it: status, exit code and error.
    pub fn summary(&self) -> String {
        let (exit_code, status) = self.codes();
        format!("{}, exit {exit_code}: {self}", status.as_u16())
    }

    fn codes(&self) -> (u8, StatusCode) {
        match self {
            OtpError::Rejected(_) => (1, StatusCode::FORBIDDEN),
            OtpError::BadRequest(_) => (2, StatusCode::BAD_REQUEST),
            OtpError::Refused(status, _) => (2, *status),
            OtpError::TooMany { .. } => (3, StatusCode::TOO_MANY_REQUESTS),
            OtpError::Unauthorized(_) => (4, StatusCode::UNAUTHORIZED),
            OtpError::Provider(_) => (5, StatusCode::INTERNAL_SERVER_ERROR),
            OtpError::ProviderBusy { .. } => (5, StatusCode::SERVICE_UNAVAILABLE),
            OtpError::Unexpected(_) => (6, StatusCode::INTERNAL_SERVER_ERROR),
        }
    }
}

impl IntoResponse for OtpError {
    fn into_response(self) -> Response {
        let (exit_code, status) = self.codes();
        let error = match &self {
            OtpError::Unexpected(_) => "internal error; see the smsflow log".to_string(),
            other => other.to_string(),
        };
        let body = serde_json::to_string(&FailureBody {
            error: &error,
            exit_code,
            message: "failed",
            status_code: status.as_u16(),
        })
        .unwrap_or_default();
        let mut r = (status, [(header::CONTENT_TYPE, "application/json")], body).into_response();
        if let OtpError::TooMany { retry_after, .. } | OtpError::ProviderBusy { retry_after, .. } =
            &self
        {
            if let Ok(v) = HeaderValue::from_str(&retry_after.to_string()) {
                r.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        if let OtpError::Unexpected(e) = self {
            r.extensions_mut()
                .insert(super::Failure(Arc::new(format!("{e:#}"))));
        }
        r
    }
}

fn success() -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        SUCCESS,
    )
        .into_response()
}

#[derive(Deserialize)]
struct GetOtp {
    #[serde(default, deserialize_with = "given")]
    phone: Option<serde_json::Value>,
    #[serde(default, deserialize_with = "given")]
    channel: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct ValidateOtp {
    #[serde(default, deserialize_with = "given")]
    phone: Option<serde_json::Value>,
    #[serde(default, deserialize_with = "given")]
    otp: Option<serde_json::Value>,
}

/// A field that is there, `null` included (`None` is only a missing one): a null phone, code
/// or channel is one of the wrong type, not a missing one.
fn given<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<serde_json::Value>, D::Error> {
    serde_json::Value::deserialize(d).map(Some)
}

pub async fn get_otp(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, OtpError> {
    authorize(&state, &headers)?;
    let req: GetOtp = json(&headers, &body)?;
    let phone = phone(&state, req.phone)?;
    let channel = match req.channel {
        None => None,
        Some(serde_json::Value::String(c)) => Some(c.trim().to_ascii_lowercase()),
        Some(_) => {
            return Err(OtpError::BadRequest(
                "channel must be a JSON string, \"sms\" or \"voice\"".into(),
            ))
        }
    };
    let voice = match channel.as_deref() {
        None | Some("sms") => false,
        Some("voice") => true,
        Some(other) => {
            return Err(OtpError::BadRequest(format!(
                "channel {:?} is not \"sms\" or \"voice\"",
                crate::clip(other)
            )))
        }
    };
    let applied = apply(&state, &phone, Event::OtpRequested).await?;
    requested(applied.outcome, state.engine.clock().now())?;
    let Some((text, code)) = applied.codes.into_iter().next() else {
        return Err(OtpError::Unexpected(anyhow::anyhow!("no code was issued")));
    };
    // The send, and the withdrawal of a code it could not deliver, run to the end even if
    // the client goes away meanwhile (axum drops a handler whose connection closed).
    tokio::spawn(deliver(state, phone, voice, text, code))
        .await
        .map_err(|e| OtpError::Unexpected(anyhow::anyhow!("sending the code stopped: {e}")))?
}

/// Sends an issued code by text or call; a code that could not be sent is withdrawn.
async fn deliver(
    state: Arc<AppState>,
    phone: Phone,
    voice: bool,
    text: String,
    code: String,
) -> Result<Response, OtpError> {
    // The number of ours it last texted or called, which its text comes from.
    let mut via = None;
    let mut valid_for = None;
    // Asked again at send time, as the outbox asks: the code must still be one the record
    // holds. A STOP, an operator or the voice menu may have opted the number out since (which
    // dropped its codes), newer codes asked for at once may have displaced it, or an operator
    // erased the number. Not sent then, and (but for an erased number, which must stay gone)
    // its send is given back.
    let valid_codes = state.engine.flows().verify.valid_codes;
    let why_not = match state.engine.store.subscriber(&phone) {
        Ok(Some(s)) => match unsendable(&s, &code, valid_codes) {
            None => {
                via = s.via;
                // Its life left: Twilio drops it rather than deliver it expired.
                let now = state.engine.clock().now();
                valid_for = (s.codes.iter().rev())
                    .find(|c| c.code == code)
                    .and_then(|c| crate::provider::life_left(c.expires_at, now));
                None
            }
            refusal => refusal,
        },
        Ok(None) => {
            return Err(OtpError::Rejected(
                "this phone's record was erased before its code was sent; no code was sent".into(),
            ))
        }
        Err(e) => return Err(OtpError::Unexpected(e)),
    };
    if let Some(refusal) = why_not {
        apply(&state, &phone, Event::CodeUndeliverable(code)).await?;
        return Err(refusal);
    }
    let sent = if voice {
        let flows = state.engine.flows();
        let spoken = flows.verify.voice.render(|n| match n {
            "bot.name" => Some(flows.bot.name.clone()),
            "code" => Some(crate::ivr::spell(&code)),
            _ => None,
        });
        state
            .provider
            .call(&phone, &crate::twiml::read_twice(&spoken))
            .await
    } else {
        state
            .provider
            .send(&phone, &text, via.as_ref(), valid_for)
            .await
    };
    match sent {
        Ok(accepted) => {
            tracing::info!(phone = %phone.masked(), sid = accepted.sid.as_deref().unwrap_or("none"), voice, "otp sent");
            crate::metrics::outbound("sent");
            Ok(success())
        }
        Err(e) => {
            // Twilio says the number unsubscribed (it texted STOP to the carrier): the same
            // opt-out as when the outbox or a delivery report hears it, applied even if the
            // withdrawal fails.
            let unsubscribed = matches!(
                e,
                SendError::Permanent {
                    code: Some(crate::outbox::UNSUBSCRIBED),
                    ..
                }
            );
            let error = hide_code(&e.to_string(), &code, &text);
            if matches!(
                e,
                SendError::Temporary {
                    maybe_sent: true,
                    ..
                }
            ) {
                // Twilio may have taken the request (no answer came): the code may arrive,
                // and must then work, so it is kept (and counts as sent).
                tracing::warn!(phone = %phone.masked(), "otp may not have been sent (the code stays valid): {error}");
                crate::metrics::outbound("failed");
                return Err(OtpError::Provider(format!(
                    "the message provider ({}) did not answer: {error}; the code may still \
                     arrive, and is valid if it does",
                    state.provider.name()
                )));
            }
            // The code never reached anyone: withdraw it so it cannot be used (and its send
            // does not count against the limit). First: the opt-out clears the codes.
            let withdrawn = apply(&state, &phone, Event::CodeUndeliverable(code)).await;
            if unsubscribed {
                apply(&state, &phone, Event::ProviderUnsubscribed).await?;
            }
            withdrawn?;
            tracing::warn!(phone = %phone.masked(), "otp not sent: {error}");
            crate::metrics::outbound("failed");
            if unsubscribed {
                return Err(opted_out());
            }
            // Twilio says the number cannot be texted at all (no such number, or a landline):
            // the app's input, not an outage.
            if matches!(e, SendError::Permanent { code: Some(c), .. } if NOT_TEXTABLE.contains(&c))
            {
                return Err(OtpError::BadRequest(format!(
                    "the message provider ({}) cannot text this phone: {error}",
                    state.provider.name()
                )));
            }
            let message = format!(
                "the message provider ({}) did not send the code: {error}",
                state.provider.name()
            );
            // Twilio is busy and said when to try again: so is the app told.
            Err(match e {
                SendError::Temporary {
                    retry_after: Some(wait),
                    not_the_message: false,
                    ..
                } => OtpError::ProviderBusy {
                    message,
                    retry_after: wait.as_secs().max(1),
                },
                _ => OtpError::Provider(message),
            })
        }
    }
}

/// Twilio's codes for a `To` that no text can reach: 21211, not a valid phone number;
/// 21612, not reachable by SMS; 21614, not a mobile number (a landline).
const NOT_TEXTABLE: [u32; 3] = [21211, 21612, 21614];

/// A provider's error said as the outbox says it (numbers and the code hidden, should the
/// provider quote them), with the code hidden as a call spells it out too, also as the
/// call's form-encoded request would quote it.
fn hide_code(error: &str, code: &str, text: &str) -> String {
    let spelled = crate::ivr::spell(code);
    let mut error = error.to_string();
    for form in [
        spelled.replace(", ", "%2C+"),
        spelled.replace(", ", "%2C%20"),
        spelled,
    ] {
        error = error.replace(&form, "[digits]");
    }
    crate::outbox::redact(&error, Some(text))
}

pub async fn validate_otp(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, OtpError> {
    authorize(&state, &headers)?;
    let req: ValidateOtp = json(&headers, &body)?;
    let phone = phone(&state, req.phone)?;
    let flows = state.engine.flows();
    let length = flows.verify.code_length;
    // Codes sent before a reload changed `code_length` keep theirs (an expired one is the
    // machine's to answer as expired). Read outside the writer: the lengths only decide
    // whether the text is a code at all.
    let held: Vec<usize> = match state.engine.store.subscriber(&phone) {
        Ok(Some(sub)) => sub.codes.iter().map(|c| c.code.len()).collect(),
        _ => Vec::new(),
    };
    let otp = match &req.otp {
        Some(serde_json::Value::String(s)) => match flows.verify.api_code(s, &held) {
            Some(code) => code,
            None => return Err(OtpError::BadRequest(format!("otp must be {length} digits"))),
        },
        Some(_) => {
            return Err(OtpError::BadRequest(format!(
                "otp must be a JSON string of {length} digits (a number loses leading zeros)"
            )))
        }
        None => return Err(OtpError::BadRequest("missing field otp".into())),
    };
    let applied = apply(&state, &phone, Event::OtpSubmitted(otp.clone())).await?;
    let now = state.engine.clock().now();
    let record = state.engine.store.subscriber(&phone);
    let used = matches!(&record, Ok(Some(s)) if used_before(s, &otp, now));
    submitted(applied.outcome, used, now).map(|()| success())
}

/// What get_otp answers for the state machine's `outcome` (before the code is sent):
/// `Ok` when a code was issued.
pub fn requested(outcome: Outcome, now: chrono::DateTime<Utc>) -> Result<(), OtpError> {
    match outcome {
        Outcome::CodeSent => Ok(()),
        Outcome::OptedOut => Err(opted_out()),
        Outcome::RateLimited { retry_at, everyone } => Err(OtpError::TooMany {
            message: if everyone {
                "too many codes sent to all numbers this hour (verify.max_codes_per_hour); \
                 try again later"
            } else {
                "too many codes requested for this phone; try again later"
            }
            .into(),
            retry_after: seconds_until(retry_at, now),
        }),
        other => Err(OtpError::Unexpected(anyhow::anyhow!(
            "get_otp ended as {other:?}"
        ))),
    }
}

/// What validate_otp answers for the state machine's `outcome`; `used`: the code given is
/// one the number verified with (see [`used_before`]).
pub fn submitted(outcome: Outcome, used: bool, now: chrono::DateTime<Utc>) -> Result<(), OtpError> {
    match outcome {
        Outcome::Verified => Ok(()),
        // A code the number verified with, or one it held then, again (a double click, a
        // retried request): said so, as the app may take it for a wrong one. One use all
        // the same.
        Outcome::WrongCode if used => Err(OtpError::Rejected(
            "this OTP was already used: it, or a code sent with it, verified the number, and \
             each code validates once (request a new one)"
                .into(),
        )),
        Outcome::WrongCode => Err(OtpError::Rejected(
            "invalid OTP (wrong, or superseded by a newer code)".into(),
        )),
        Outcome::Expired => Err(OtpError::Rejected("expired OTP; request a new one".into())),
        Outcome::OptedOut => Err(opted_out()),
        // Guessing again cannot help; the wait is until a new code may be requested.
        Outcome::Locked { new_code_at } => Err(OtpError::TooMany {
            message: "too many wrong guesses on this code; request a new one".into(),
            retry_after: seconds_until(new_code_at, now),
        }),
        other => Err(OtpError::Unexpected(anyhow::anyhow!(
            "validate_otp ended as {other:?}"
        ))),
    }
}

/// Whether `otp` is a code the number `s` held when it verified, not yet expired (see
/// `Subscriber::used_codes`).
pub fn used_before(s: &crate::machine::Subscriber, otp: &str, now: chrono::DateTime<Utc>) -> bool {
    s.used_codes.iter().any(|c| {
        c.expires_at > now
            && bool::from(subtle::ConstantTimeEq::ct_eq(
                c.code.as_bytes(),
                otp.as_bytes(),
            ))
    })
}

/// Why an issued code may not be sent to the number whose record is `s` now: it opted out
/// since (which dropped its codes), or newer codes displaced it (only the latest
/// `valid_codes` count; the one before them is kept but is no code). `None`: send it.
fn unsendable(s: &crate::machine::Subscriber, code: &str, valid_codes: u8) -> Option<OtpError> {
    if s.holds_code(code, valid_codes) {
        None
    } else if s.state == crate::machine::State::OptedOut {
        Some(opted_out())
    } else {
        Some(OtpError::Rejected(
            "a newer code was issued for this phone meanwhile; this one was not sent".into(),
        ))
    }
}

fn opted_out() -> OtpError {
    OtpError::Rejected("this phone opted out (it must text START to opt back in)".into())
}

/// Whole seconds until `t`, rounded up (a client that waits exactly this long is not early),
/// at least 1.
fn seconds_until(t: chrono::DateTime<Utc>, now: chrono::DateTime<Utc>) -> u64 {
    let ms = (t - now).num_milliseconds();
    (ms.saturating_add(999) / 1000).max(1) as u64
}

async fn apply(state: &AppState, phone: &Phone, event: Event) -> Result<Applied, OtpError> {
    Ok(state
        .engine
        .apply(Input {
            phone,
            event,
            inbound_sid: None,
            fired: None,
            inline_codes: true,
            to: None,
        })
        .await?)
}

/// An open OTP endpoint is an SMS-pumping target: off the loopback, a token is required.
fn authorize(state: &AppState, headers: &HeaderMap) -> Result<(), OtpError> {
    super::bearer(
        state.api_token.as_ref(),
        state.loopback,
        headers,
        "SMSFLOW_API_TOKEN",
        "OTP API",
    )
    .map_err(OtpError::Unauthorized)
}

fn json<T: serde::de::DeserializeOwned>(headers: &HeaderMap, body: &[u8]) -> Result<T, OtpError> {
    super::content_type_is(headers, "application/json").map_err(OtpError::BadRequest)?;
    // A byte-order mark some tools write first is no part of the JSON (RFC 8259 lets a
    // reader ignore it).
    let body = body.strip_prefix("\u{feff}".as_bytes()).unwrap_or(body);
    // JSON is UTF-8 throughout (serde_json checks only the strings it keeps).
    if let Err(e) = std::str::from_utf8(body) {
        return Err(OtpError::BadRequest(format!(
            "the body is not UTF-8 (byte {} is not)",
            e.valid_up_to()
        )));
    }
    // serde would also take an array (field by field, in order), and would name its own
    // types refusing a scalar: anything but an object is refused in the API's words.
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(OtpError::BadRequest(
            match serde_json::from_slice::<serde::de::IgnoredAny>(body) {
                Ok(_) => {
                    "the body must be a JSON object, such as {\"phone\": \"+14155550100\"}".into()
                }
                Err(e) => format!("invalid JSON: {e}"),
            },
        ));
    }
    serde_json::from_slice(body).map_err(|e| {
        OtpError::BadRequest(match e.classify() {
            // A field given twice is no type mistake: say what it is (serde_json has no
            // category for it; its message is matched, and a change there falls to the next).
            serde_json::error::Category::Data if e.to_string().starts_with("duplicate field") => {
                format!("a field is given twice: {e}")
            }
            // Well-formed JSON, but a field of the wrong type.
            serde_json::error::Category::Data => format!("a field has the wrong type: {e}"),
            _ => format!("invalid JSON: {e}"),
        })
    })
}

fn phone(state: &AppState, value: Option<serde_json::Value>) -> Result<Phone, OtpError> {
    match value {
        Some(serde_json::Value::String(s)) => Phone::parse_in(&s, state.region)
            .map_err(|e| OtpError::BadRequest(format!("phone: {e}"))),
        Some(_) => Err(OtpError::BadRequest(
            "phone must be a JSON string such as \"+14155550100\"".into(),
        )),
        None => Err(OtpError::BadRequest("missing field phone".into())),
    }
}

#[cfg(test)]
mod tests {
    use crate::machine::{IssuedCode, State, Subscriber};
    use chrono::{TimeDelta, Utc};

    /// A code displaced by newer ones before its send is not sent, though the record still
    /// keeps it (for a newest code that fails to come back from).
    #[test]
    fn a_code_displaced_before_its_send_is_not_sent() {
        let now = Utc::now();
        let phone = crate::phone::Phone::parse("+15550001111").unwrap();
        let mut s = Subscriber::new(phone, now);
        s.state = State::AwaitingCode;
        for code in ["111111", "222222", "333333"] {
            s.codes.push(IssuedCode {
                code: code.into(),
                issued_at: now,
                expires_at: now + TimeDelta::minutes(10),
                wrong: 0,
                by_app: false,
            });
        }
        let refusal = super::unsendable(&s, "111111", 2).map(|e| e.to_string());
        assert!(refusal.is_some_and(|e| e.contains("a newer code was issued")));
        assert!(super::unsendable(&s, "222222", 2).is_none());
        assert!(super::unsendable(&s, "333333", 2).is_none());
        s.state = State::OptedOut;
        s.codes.clear();
        let refusal = super::unsendable(&s, "333333", 2).map(|e| e.to_string());
        assert!(refusal.is_some_and(|e| e.contains("opted out")));
    }
}
