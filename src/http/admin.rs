//! The admin API under `/admin`: JSON, bearer token. See subscribers, opt one out, erase one,
//! reload flows, download the dataset.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request, State};
use axum::http::{header, request::Parts, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};

use super::AppState;
use crate::machine::{Event, State as MachineState, Subscriber};
use crate::phone::Phone;
use crate::store::{HistoryEntry, Listed};

/// Errors are JSON: `{"error": "…"}` with a fitting status.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    NotFound(String),
    /// A request refused before it reached the API (413, 405), with that status.
    #[error("{1}")]
    Refused(StatusCode, String),
    #[error(transparent)]
    Unexpected(#[from] anyhow::Error),
}

impl IntoResponse for AdminError {
    fn into_response(self) -> Response {
        let status = match &self {
            AdminError::BadRequest(_) => StatusCode::BAD_REQUEST,
            AdminError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            AdminError::NotFound(_) => StatusCode::NOT_FOUND,
            AdminError::Refused(status, _) => *status,
            AdminError::Unexpected(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let message = match &self {
            AdminError::Unexpected(_) => "internal error; see the smsflow log".to_string(),
            other => other.to_string(),
        };
        let mut r = (status, Json(serde_json::json!({ "error": message }))).into_response();
        if let AdminError::Unexpected(e) = self {
            r.extensions_mut()
                .insert(super::Failure(Arc::new(format!("{e:#}"))));
        }
        r
    }
}

/// The request's body, read whole and dropped before the route acts (these routes take none):
/// a request cut off before its end, or over the size limit (413), changes nothing.
pub struct WholeBody;

impl<S: Send + Sync> FromRequest<S> for WholeBody {
    type Rejection = AdminError;

    async fn from_request(req: Request, state: &S) -> Result<Self, AdminError> {
        match axum::body::Bytes::from_request(req, state).await {
            Ok(_) => Ok(WholeBody),
            Err(e) => Err(AdminError::Refused(e.status(), e.body_text())),
        }
    }
}

/// A subscriber as operators see it.
#[derive(Serialize)]
pub struct View {
    phone: String,
    state: &'static str,
    opted_in: bool,
    sequence: Option<String>,
    /// 1-based step within the sequence, while in one: the question asked while it waits
    /// for the answer, otherwise the next step to be sent.
    step: Option<usize>,
    /// Waiting to answer a sequence's question.
    waiting_for_answer: bool,
    fields: std::collections::BTreeMap<String, String>,
    created_at: String,
    verified_at: Option<String>,
    last_inbound_at: Option<String>,
    next_timer: Option<TimerView>,
}

/// One entry of the subscriber list.
#[derive(Serialize)]
#[serde(untagged)]
enum Row {
    Readable(View),
    /// A record that cannot be read (damaged, or from a newer smsflow): its number and why.
    Unreadable {
        phone: String,
        unreadable: String,
    },
}

#[derive(Serialize)]
struct TimerView {
    at: String,
    kind: &'static str,
}

impl View {
    fn of(s: &Subscriber) -> View {
        let (sequence, step) = s.sequence_step();
        View {
            phone: s.phone.to_string(),
            state: s.state.name(),
            opted_in: s.opted_in(),
            sequence: sequence.map(str::to_string),
            step: step.map(|n| n.saturating_add(1)),
            waiting_for_answer: matches!(s.state, MachineState::InSequence { waiting: true, .. }),
            fields: s.fields.clone(),
            created_at: s.created_at.to_rfc3339(),
            verified_at: s.verified_at.map(|t| t.to_rfc3339()),
            last_inbound_at: s.last_inbound_at.map(|t| t.to_rfc3339()),
            next_timer: s.timer.map(|t| TimerView {
                at: t.at.to_rfc3339(),
                kind: t.kind.name(),
            }),
        }
    }
}

#[derive(Serialize)]
struct Detail {
    #[serde(flatten)]
    view: View,
    /// The sequence question whose late answer is still taken (its timeout ran out).
    late_answer: Option<LateView>,
    /// The number of ours it last texted or called (Twilio's `To`), while texts to it go
    /// from there: still listed in `TWILIO_FROM`, no messaging service, not the console.
    our_number: Option<String>,
    history: Vec<serde_json::Value>,
    messages: Vec<serde_json::Value>,
}

#[derive(Serialize)]
struct LateView {
    sequence: String,
    /// 1-based, as `step`.
    step: usize,
    field: String,
    until: String,
}

/// How many of a number's latest messages its page shows.
const MESSAGES_SHOWN: usize = 20;

/// `{"id": …, "status": "queued" | "sent" | "delivered" | "failed" | …, …}`: what became of
/// one message (never its text, which may be a code). Times as everywhere on the page.
fn message_json(id: u64, sent: &crate::store::Sent) -> serde_json::Value {
    use crate::store::Sent;
    // Twilio's words as kept: hidden again, for records kept raw before they were hidden
    // when written (a queued code's digits, too, with its text at hand).
    let hidden = |e: &Option<String>, text: Option<&str>| {
        e.as_deref().map(|e| crate::outbox::redact(e, text))
    };
    match sent {
        Sent::Queued(m) => serde_json::json!({
            "id": id,
            "status": "queued",
            "attempts": m.attempts,
            "next_try": m.next_try.to_rfc3339(),
            "last_error": hidden(&m.last_error, m.secret.then_some(m.body.as_str())),
            "queued_at": m.created_at.to_rfc3339(),
        }),
        Sent::Ended(d) => serde_json::json!({
            "id": id,
            "status": d.status,
            "attempts": d.attempts,
            "error_code": d.error_code,
            "error": hidden(&d.error, None),
            "provider_sid": d.provider_sid,
            "updated_at": d.updated_at.to_rfc3339(),
        }),
        Sent::Unreadable(e) => serde_json::json!({ "id": id, "unreadable": e.to_string() }),
    }
}

/// `{"at": …, "event": "code_sent", …fields}` from a stored entry (`step` 1-based).
fn event_json(h: &HistoryEntry) -> serde_json::Value {
    let mut out = serde_json::Map::new();
    out.insert("at".into(), h.at.to_rfc3339().into());
    match serde_json::to_value(&h.record) {
        Ok(serde_json::Value::String(name)) => {
            out.insert("event".into(), name.into());
        }
        Ok(serde_json::Value::Object(tagged)) => {
            for (name, fields) in tagged {
                out.insert("event".into(), name.into());
                if let serde_json::Value::Object(fields) = fields {
                    out.extend(fields);
                }
                // Steps are stored 0-based and shown 1-based, as in the subscriber's view.
                if let Some(step) = out.get_mut("step") {
                    if let Some(n) = step.as_u64() {
                        *step = n.saturating_add(1).into();
                    }
                }
            }
        }
        _ => {}
    }
    serde_json::Value::Object(out)
}

/// An authorized operator: every admin handler takes one, so none can forget the check.
pub struct Operator;

impl FromRequestParts<Arc<AppState>> for Operator {
    type Rejection = AdminError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        super::bearer(
            state.admin_token.as_ref(),
            state.loopback,
            &parts.headers,
            "SMSFLOW_ADMIN_TOKEN",
            "admin API",
        )
        .map(|()| Operator)
        .map_err(AdminError::Unauthorized)
    }
}

/// The phone in the path; a path that does not decode (`%FF`) is a JSON 400 too.
fn phone(state: &AppState, raw: Result<Path<String>, PathRejection>) -> Result<Phone, AdminError> {
    let Path(raw) =
        raw.map_err(|e| AdminError::BadRequest(format!("phone in path: {}", e.body_text())))?;
    let phone = phone_named(state, &raw, "phone in path")?;
    // An older smsflow kept E.164 text as written, trunk 0 and all (`+4402…`, through
    // the OTP or admin API), where this one reads `+442…`: a record kept under the exact
    // text of the path is the one named (even when the number as read today has one too).
    let exact = raw.trim();
    if phone.as_str() != exact {
        if let Ok(old) = Phone::from_stored(exact.to_string()) {
            let kept = !matches!(state.engine.store.subscriber(&old), Ok(None));
            if old.as_str() == exact && kept {
                return Ok(old);
            }
        }
    }
    Ok(phone)
}

/// Parses a phone number; `what` names where it came from in the error.
fn phone_named(state: &AppState, raw: &str, what: &str) -> Result<Phone, AdminError> {
    Phone::parse_in(raw, state.region).map_err(|e| AdminError::BadRequest(format!("{what}: {e}")))
}

/// A query string that does not parse is a JSON 400 like every other admin error.
fn query<T>(q: Result<Query<T>, QueryRejection>) -> Result<T, AdminError> {
    q.map(|Query(q)| q)
        .map_err(|e| AdminError::BadRequest(format!("query string: {}", e.body_text())))
}

/// The query of a route that takes none: any parameter is refused, so that a guess such as
/// `DELETE …?dry_run=1` is not quietly done for real.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoQuery {}

/// Unknown parameters are refused: `?stat=verified` must not quietly list everyone.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    state: Option<String>,
    /// Text, so a bad value gets this API's own message (not a parser's).
    limit: Option<String>,
    after: Option<String>,
}

/// `GET /admin/subscribers?state=&limit=&after=`: paged by phone.
pub async fn list(
    State(app): State<Arc<AppState>>,
    _operator: Operator,
    q: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Response, AdminError> {
    let q = query(q)?;
    if let Some(s) = &q.state {
        if !MachineState::NAMES.contains(&s.as_str()) {
            return Err(AdminError::BadRequest(format!(
                "unknown state {:?} (one of {})",
                crate::clip(s),
                MachineState::NAMES.join(", ")
            )));
        }
    }
    let limit = match q.limit.as_deref().map(|l| l.trim().parse::<usize>()) {
        None => 100,
        Some(Ok(n)) if (1..=1000).contains(&n) => n,
        Some(_) => {
            return Err(AdminError::BadRequest(
                "limit must be a whole number from 1 to 1000".into(),
            ))
        }
    };
    let after = match &q.after {
        // A `next` as given: the text the store keeps, an older smsflow's `+4402…` too (read
        // today as `+442…`, it would skip every record between the two).
        Some(a) if crate::phone::is_e164(a.trim()) => Some(a.trim().to_string()),
        Some(a) => Some(phone_named(&app, a, "after")?.to_string()),
        None => None,
    };
    // A filtered page may walk many records (a million, for a state few have): off the
    // async workers, which serve the webhooks.
    let (store_app, state) = (app.clone(), q.state.clone());
    let (page, more) = tokio::task::spawn_blocking(move || -> anyhow::Result<(Vec<Row>, bool)> {
        let mut page = Vec::new();
        let mut more = false;
        for listed in store_app.engine.store.subscribers_after(after.as_deref()) {
            let row = match listed? {
                Listed::Readable(s) => {
                    if state.as_deref().is_some_and(|want| want != s.state.name()) {
                        continue;
                    }
                    Row::Readable(View::of(&s))
                }
                // Its state is unknown, so a filtered list leaves it out; the full list shows
                // it, so that the operator can find and erase it.
                Listed::Unreadable { .. } if state.is_some() => continue,
                Listed::Unreadable { key, error } => Row::Unreadable {
                    phone: key,
                    unreadable: error.to_string(),
                },
            };
            if page.len() == limit {
                more = true;
                break;
            }
            page.push(row);
        }
        Ok((page, more))
    })
    .await
    .map_err(|e| anyhow::anyhow!("listing subscribers stopped: {e}"))??;
    let next = if more {
        page.last().map(|r| match r {
            Row::Readable(v) => v.phone.clone(),
            Row::Unreadable { phone, .. } => phone.clone(),
        })
    } else {
        None
    };
    Ok(Json(serde_json::json!({ "subscribers": page, "next": next })).into_response())
}

/// `GET /admin/subscribers/{phone}`: the record and its last 50 events.
pub async fn show(
    State(app): State<Arc<AppState>>,
    _operator: Operator,
    raw: Result<Path<String>, PathRejection>,
    q: Result<Query<NoQuery>, QueryRejection>,
) -> Result<Response, AdminError> {
    query(q)?;
    let phone = phone(&app, raw)?;
    detail(&app, &phone)
}

fn detail(app: &AppState, phone: &Phone) -> Result<Response, AdminError> {
    let s = match app.engine.store.subscriber(phone) {
        Ok(Some(s)) => s,
        Ok(None) => return Err(AdminError::NotFound(format!("no subscriber {phone}"))),
        // Shown as the list shows it, so that it can be found and erased.
        Err(e) if crate::store::codec::is_unreadable(&e) => {
            return Ok(Json(Row::Unreadable {
                phone: phone.to_string(),
                unreadable: format!("{e:#}"),
            })
            .into_response())
        }
        Err(e) => return Err(e.into()),
    };
    // A damaged entry is shown as one, and hides neither the record nor the other entries.
    let history = app
        .engine
        .store
        .history(phone, 50)?
        .iter()
        .map(|h| match h {
            Ok(h) => event_json(h),
            Err(e) => serde_json::json!({ "unreadable": e.to_string() }),
        })
        .collect();
    let messages = app
        .engine
        .store
        .messages_of(phone, MESSAGES_SHOWN)?
        .iter()
        .map(|(id, sent)| message_json(*id, sent))
        .collect();
    let (now, flows) = (app.engine.clock().now(), app.engine.flows());
    let late = crate::machine::late_question(&s, &flows, now).map(|(l, _)| l);
    let late_answer = late.map(|l| LateView {
        sequence: l.sequence.clone(),
        step: l.step.saturating_add(1),
        field: l.field.clone(),
        until: l.until.to_rfc3339(),
    });
    Ok(Json(Detail {
        view: View::of(&s),
        late_answer,
        our_number: (s.via.as_ref())
            .filter(|n| app.provider.sends_from(n))
            .map(Phone::to_string),
        history,
        messages,
    })
    .into_response())
}

/// `POST /admin/subscribers/{phone}/opt-out`: no message is sent, now or later.
pub async fn opt_out(
    State(app): State<Arc<AppState>>,
    _operator: Operator,
    raw: Result<Path<String>, PathRejection>,
    q: Result<Query<NoQuery>, QueryRejection>,
    _body: WholeBody,
) -> Result<Response, AdminError> {
    query(q)?;
    let phone = phone(&app, raw)?;
    match app.engine.store.subscriber(&phone) {
        Ok(Some(_)) => {}
        Ok(None) => return Err(AdminError::NotFound(format!("no subscriber {phone}"))),
        Err(e) if crate::store::codec::is_unreadable(&e) => {
            return Err(AdminError::Refused(
                StatusCode::CONFLICT,
                format!(
                    "the record of {phone} cannot be read ({e:#}), so it cannot be opted out; \
                     it can be erased (DELETE /admin/subscribers/{phone})"
                ),
            ))
        }
        Err(e) => return Err(e.into()),
    }
    let applied = app.engine.event(&phone, Event::AdminOptOut).await?;
    if applied.outcome == crate::machine::Outcome::Ignored {
        tracing::info!(phone = %phone.masked(), "admin: opt-out of a number already opted out (nothing changed)");
    } else {
        tracing::info!(phone = %phone.masked(), "admin: opted out");
    }
    detail(&app, &phone)
}

/// `DELETE /admin/subscribers/{phone}`: erase the number and its history.
pub async fn erase(
    State(app): State<Arc<AppState>>,
    _operator: Operator,
    raw: Result<Path<String>, PathRejection>,
    q: Result<Query<NoQuery>, QueryRejection>,
    _body: WholeBody,
) -> Result<Response, AdminError> {
    query(q)?;
    let phone = phone(&app, raw)?;
    if app.engine.erase(&phone).await? {
        tracing::info!(phone = %phone.masked(), "admin: erased");
        Ok(StatusCode::NO_CONTENT.into_response())
    } else {
        Err(AdminError::NotFound(format!("no subscriber {phone}")))
    }
}

/// `POST /admin/reload`: load the flow directory again and say how it went.
pub async fn reload(
    State(app): State<Arc<AppState>>,
    _operator: Operator,
    q: Result<Query<NoQuery>, QueryRejection>,
    _body: WholeBody,
) -> Result<Response, AdminError> {
    query(q)?;
    Ok(match app.reloader.reload_blocking("admin API").await {
        Ok(summary) => {
            Json(serde_json::json!({ "reloaded": true, "flows": summary })).into_response()
        }
        Err(p) => (
            StatusCode::UNPROCESSABLE_ENTITY,
            Json(serde_json::json!({
                "reloaded": false,
                "error": "the flows have problems; the previous flows stay live",
                "problems": p.0.iter().map(|x| x.to_string()).collect::<Vec<_>>(),
            })),
        )
            .into_response(),
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportQuery {
    one_hot: Option<String>,
}

/// `GET /admin/export.csv[?one_hot=1]`: the dataset, streamed as it is read.
pub async fn export(
    State(app): State<Arc<AppState>>,
    _operator: Operator,
    q: Result<Query<ExportQuery>, QueryRejection>,
) -> Result<Response, AdminError> {
    let q = query(q)?;
    let one_hot = match q.one_hot.map(|v| v.trim().to_ascii_lowercase()).as_deref() {
        None | Some("0" | "false" | "no") => false,
        Some("1" | "true" | "yes" | "") => true,
        Some(other) => {
            return Err(AdminError::BadRequest(format!(
                "one_hot must be 1 or 0 (true/false, yes/no), not {:?}",
                crate::clip(other)
            )))
        }
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<Vec<u8>>>(8);
    let engine = app.engine.clone();
    tokio::task::spawn_blocking(move || {
        let flows = engine.flows();
        let mut sink = ChunkWriter {
            tx: tx.clone(),
            buf: Vec::with_capacity(CHUNK),
        };
        match crate::export::write_csv(&engine.store, &flows, one_hot, &mut sink) {
            Ok(done) if done.unreadable > 0 => tracing::warn!(
                "export: left out {} record(s) that cannot be read; GET /admin/subscribers lists them",
                done.unreadable
            ),
            Ok(_) => {}
            // A download cut short by its client is no failure of the daemon's.
            Err(_) if tx.is_closed() => tracing::info!("export: the client went away; stopped"),
            Err(e) => {
                tracing::error!("export failed: {e:#}");
                let _ = tx.blocking_send(Err(std::io::Error::other(e.to_string())));
            }
        }
        // Let go of the engine before the response can end, so a shutdown right after a
        // download finds the store free.
        drop((sink, flows, engine));
        drop(tx);
    });
    let stream =
        futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|c| (c, rx)) });
    Ok((
        [
            (header::CONTENT_TYPE, "text/csv; charset=utf-8"),
            (
                header::CONTENT_DISPOSITION,
                "attachment; filename=\"smsflow-export.csv\"",
            ),
        ],
        Body::from_stream(stream),
    )
        .into_response())
}

const CHUNK: usize = 64 * 1024;

/// Hands the CSV to the response in chunks; a closed connection stops the export.
struct ChunkWriter {
    tx: tokio::sync::mpsc::Sender<std::io::Result<Vec<u8>>>,
    buf: Vec<u8>,
}

impl std::io::Write for ChunkWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= CHUNK {
            self.flush()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK));
        self.tx
            .blocking_send(Ok(chunk))
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "client went away"))
    }
}
