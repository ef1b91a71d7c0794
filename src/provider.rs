//! Message providers: Twilio's REST API, and a console printer for running without an account.

use std::time::Duration;

use serde::Deserialize;

use crate::config::{Sender, TwilioConfig};
use crate::phone::Phone;

/// Where messages go.
pub enum Provider {
    Twilio(Twilio),
    Console(Console),
}

/// A provider accepted the message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Accepted {
    /// The provider's id for it; `None` when the provider accepted it but its answer could
    /// not be read (delivery reports for it then find no record).
    pub sid: Option<String>,
}

/// Why a send failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// Worth retrying: 429, 5xx, network trouble. Or no fault of the message
    /// (`not_the_message`): the account or the sender was refused, or the sender's queue at
    /// Twilio is full (21611); it waits, however long, for the fix or the queue to drain.
    #[error("temporary failure: {message}")]
    Temporary {
        message: String,
        retry_after: Option<Duration>,
        not_the_message: bool,
        /// The request may have reached Twilio and been carried out: the connection was
        /// made, but no answer came (a timeout, a connection dropped).
        maybe_sent: bool,
    },
    /// Retrying will not help (a 4xx with Twilio's error code).
    #[error("refused: {message}{}", code.map(|c| format!(" (Twilio error {c})")).unwrap_or_default())]
    Permanent { code: Option<u32>, message: String },
}

impl SendError {
    /// The same error with its words put through `f` (to hide what they may quote).
    pub fn map_message(self, f: impl FnOnce(&str) -> String) -> SendError {
        match self {
            SendError::Temporary {
                message,
                retry_after,
                not_the_message,
                maybe_sent,
            } => SendError::Temporary {
                message: f(&message),
                retry_after,
                not_the_message,
                maybe_sent,
            },
            SendError::Permanent { code, message } => SendError::Permanent {
                code,
                message: f(&message),
            },
        }
    }
}

/// When each kind of refusal that every queued message would meet alike was last logged:
/// each is logged the first time, then once a minute at most (see [`once_a_minute`]).
type LastLogged = std::sync::Mutex<Option<std::time::Instant>>;
/// A refused account.
static ACCOUNT_REFUSED: LastLogged = LastLogged::new(None);
/// A sender of ours Twilio refused.
static SENDER_REFUSED: LastLogged = LastLogged::new(None);
/// A full sender queue at Twilio (21611).
static QUEUE_FULL_LOGGED: LastLogged = LastLogged::new(None);
/// A text or call to a number not in `TWILIO_FROM`.
static UNKNOWN_TO: LastLogged = LastLogged::new(None);

/// True the first time, then at most once a minute, for one `last` time.
fn once_a_minute(last: &LastLogged) -> bool {
    let mut last = last.lock().unwrap_or_else(|e| e.into_inner());
    let now = std::time::Instant::now();
    if last.is_some_and(|at| now.duration_since(at) < Duration::from_secs(60)) {
        return false;
    }
    *last = Some(now);
    true
}

impl Provider {
    pub fn name(&self) -> &'static str {
        match self {
            Provider::Twilio(_) => "twilio",
            Provider::Console(_) => "console",
        }
    }

    /// Sends one SMS, from `via` when that is one of the configured numbers (the number of
    /// ours the recipient wrote to), otherwise from the first. (The console prints it whole,
    /// codes included: it stands in for the phone. Logs never carry a body.)
    ///
    /// `valid_for`: how long the text is any use (a code's life left); Twilio drops it
    /// unsent should it wait longer in its queue (`ValidityPeriod`), rather than deliver a
    /// code already expired.
    pub async fn send(
        &self,
        to: &Phone,
        body: &str,
        via: Option<&Phone>,
        valid_for: Option<std::time::Duration>,
    ) -> Result<Accepted, SendError> {
        match self {
            Provider::Twilio(t) => t.send(to, body, via, valid_for).await,
            Provider::Console(c) => Ok(c.print("sms", to, body)),
        }
    }

    /// The number of ours a text or call came to (`To`), when messages go from a list of
    /// numbers and it is one of them: what is sent to its sender later goes from it.
    pub fn sender_for(&self, to: &str) -> Option<Phone> {
        match self {
            Provider::Twilio(t) => t.sender_for(to),
            Provider::Console(_) => None,
        }
    }

    /// Whether texts go from `number` when it is a recipient's (see [`Provider::sender_for`]):
    /// it is one of the listed numbers, with no messaging service.
    pub fn sends_from(&self, number: &Phone) -> bool {
        match self {
            Provider::Twilio(t) => t.listed(number.as_str()).is_some(),
            Provider::Console(_) => false,
        }
    }

    /// Who a text to a recipient who last wrote to `via` goes from: the `From` number (or
    /// messaging service) that a send rate counts against. The console is one sender.
    pub fn sender(&self, via: Option<&Phone>) -> String {
        match self {
            Provider::Twilio(t) => t.sender_param(via).1,
            Provider::Console(_) => String::new(),
        }
    }

    /// Places a voice call that speaks `twiml`.
    pub async fn call(&self, to: &Phone, twiml: &str) -> Result<Accepted, SendError> {
        match self {
            Provider::Twilio(t) => t.call(to, twiml).await,
            Provider::Console(c) => Ok(c.print("call", to, twiml)),
        }
    }
}

/// Prints messages instead of sending them: the default with no Twilio credentials.
pub struct Console {
    /// This process's start (ms since the epoch), so that message ids stay unique across
    /// restarts: a delivery report names its message by id.
    started: u64,
    counter: std::sync::atomic::AtomicU64,
    quiet: bool,
}

impl Console {
    pub fn new(quiet: bool) -> Console {
        let started = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        Console::started_at(quiet, started)
    }

    fn started_at(quiet: bool, started: u64) -> Console {
        Console {
            started,
            counter: Default::default(),
            quiet,
        }
    }

    /// `what` is `sms` or `call` (whose body is the TwiML the call would play).
    fn print(&self, what: &str, to: &Phone, body: &str) -> Accepted {
        let n = self
            .counter
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if !self.quiet {
            // The console stands in for a phone: it shows the text, including codes, so a
            // developer can complete a verification by hand. It is not a log.
            // Not `println!`: a closed stdout must not take the outbox down with a panic.
            crate::cli::say(
                &mut std::io::stdout().lock(),
                &format!("[console {what} to {}] {}\n", to.masked(), body),
            );
        }
        Accepted {
            sid: Some(format!("CONSOLE{:013}x{n:06}", self.started)),
        }
    }
}

/// Twilio's REST API (`Messages.json`, `Calls.json`), with Basic auth.
pub struct Twilio {
    http: reqwest::Client,
    config: TwilioConfig,
    status_callback: Option<String>,
}

#[derive(Deserialize)]
struct TwilioOk {
    sid: String,
}

#[derive(Deserialize)]
struct TwilioError {
    code: Option<u32>,
    message: Option<String>,
}

impl Twilio {
    /// `public_url`, when known, makes Twilio post delivery reports to `/twilio/status`.
    pub fn new(config: TwilioConfig, public_url: Option<&str>) -> anyhow::Result<Twilio> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(15))
            .connect_timeout(Duration::from_secs(5))
            .build()?;
        Ok(Twilio {
            http,
            config,
            status_callback: public_url.map(|u| format!("{u}/twilio/status")),
        })
    }

    fn url(&self, resource: &str) -> String {
        format!(
            "{}/2010-04-01/Accounts/{}/{resource}.json",
            self.config.api_base, self.config.account_sid
        )
    }

    /// `From`: `via` when it is one of ours (still: the configuration may have changed
    /// since it was kept), else the first number; or the messaging service (which keeps each
    /// recipient on one number of its own pool).
    fn sender_param(&self, via: Option<&Phone>) -> (&'static str, String) {
        match &self.config.sender {
            Sender::From(numbers) => {
                let ours = via.and_then(|v| self.listed(v.as_str()));
                (
                    "From",
                    ours.or(numbers.first()).cloned().unwrap_or_default(),
                )
            }
            Sender::MessagingService(m) => ("MessagingServiceSid", m.clone()),
        }
    }

    /// The entry of `TWILIO_FROM` that is `number` (as kept: E.164, or a short code or
    /// sender ID as written), when texts go from a list of numbers.
    fn listed(&self, number: &str) -> Option<&String> {
        match &self.config.sender {
            Sender::From(numbers) => numbers.iter().find(|n| *n == number),
            Sender::MessagingService(_) => None,
        }
    }

    /// The number of ours `to` (Twilio's `To` of an inbound text or call) is, when texts go
    /// from a list of numbers and it is a phone number of the list: `None` for one not in
    /// it, a short code, or with a messaging service.
    fn sender_for(&self, to: &str) -> Option<Phone> {
        let Sender::From(numbers) = &self.config.sender else {
            return None;
        };
        let to = to.trim();
        if self.listed(to).is_none() {
            if numbers.len() > 1 && once_a_minute(&UNKNOWN_TO) {
                // `To` should be ours, but a misrouted call or a local request may carry
                // anyone's: masked, as every number in the log.
                // (`whatsapp:+1…` is no phone number, but holds one.)
                let shown = Phone::parse(to).map_or_else(
                    |_| format!("{:?}", crate::outbox::redact(&crate::clip(to), None)),
                    |p| p.masked(),
                );
                tracing::warn!(
                    "a text or call came to {shown}, which is not in TWILIO_FROM: what is sent \
                     to its sender goes from the listed number it last wrote to, else from the \
                     first ({})",
                    numbers.first().map_or("", String::as_str)
                );
            }
            return None;
        }
        // Only a phone number is kept (a short code is answered, and later messages go as
        // for a number not listed).
        to.starts_with('+')
            .then(|| Phone::from_stored(to.to_string()).ok())
            .flatten()
    }

    async fn send(
        &self,
        to: &Phone,
        body: &str,
        via: Option<&Phone>,
        valid_for: Option<std::time::Duration>,
    ) -> Result<Accepted, SendError> {
        let mut form = vec![
            ("To", to.as_str().to_string()),
            self.sender_param(via),
            ("Body", body.to_string()),
        ];
        if let Some(cb) = &self.status_callback {
            form.push(("StatusCallback", cb.clone()));
        }
        if let Some(valid) = valid_for {
            form.push(("ValidityPeriod", validity_period(valid).to_string()));
        }
        self.post("Messages", &form).await
    }

    async fn call(&self, to: &Phone, twiml: &str) -> Result<Accepted, SendError> {
        let Some(from) = self.config.caller_id.clone() else {
            return Err(SendError::Permanent {
                code: None,
                message: "voice calls need a phone number in TWILIO_FROM (a messaging service, a short code or a sender ID cannot place calls)"
                    .into(),
            });
        };
        let form = vec![
            ("To", to.as_str().to_string()),
            ("From", from),
            ("Twiml", twiml.to_string()),
        ];
        self.post("Calls", &form).await
    }

    async fn post(&self, resource: &str, form: &[(&str, String)]) -> Result<Accepted, SendError> {
        let response = self
            .http
            .post(self.url(resource))
            .basic_auth(
                &self.config.account_sid,
                Some(self.config.auth_token.expose()),
            )
            .form(form)
            .send()
            .await
            .map_err(|e| SendError::Temporary {
                message: if e.is_connect() {
                    format!("cannot reach Twilio: {}", without_url(&e))
                } else {
                    format!("no answer from Twilio: {}", without_url(&e))
                },
                retry_after: None,
                not_the_message: false,
                maybe_sent: !e.is_connect(),
            })?;
        let status = response.status();
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| retry_after(v, std::time::SystemTime::now()));
        let text = capped_text(response).await;
        if status.is_success() {
            // Accepted is accepted: resending would text the number twice.
            return Ok(match serde_json::from_str::<TwilioOk>(&text) {
                Ok(ok) => Accepted { sid: Some(ok.sid) },
                Err(e) => {
                    tracing::warn!("Twilio answered {status} with an unreadable body ({e}); counting it as sent, without a message id");
                    Accepted { sid: None }
                }
            });
        }
        let err: Option<TwilioError> = serde_json::from_str(&text).ok();
        let code = err.as_ref().and_then(|e| e.code);
        let message = err
            .and_then(|e| e.message)
            .map(|m| self.scrubbed(m, form))
            .unwrap_or_else(|| format!("HTTP {status}"));
        if code == Some(QUEUE_FULL) {
            // It drains by itself: every message for that sender waits, however long it takes
            // (as for a refused account), rather than spending its tries and failing.
            if once_a_minute(&QUEUE_FULL_LOGGED) {
                tracing::warn!(
                    "Twilio's queue for a sender of ours is full (error 21611: more than 10 \
                     hours of messages at its rate); queued messages wait and are retried. \
                     Twilio counts each segment of a long text (160 characters, or 70 with \
                     characters outside GSM-7): lower SMSFLOW_SEND_RATE if this comes back"
                );
            }
            return Err(SendError::Temporary {
                message: format!("Twilio answered {status}: {message}"),
                retry_after,
                not_the_message: true,
                maybe_sent: false,
            });
        }
        if let Some(c) = code.filter(|c| SENDER_CODES.contains(c)) {
            // Our sender as configured, not the message: every message from it would be
            // refused alike. They wait, as for a refused account, for the fix and a restart.
            if once_a_minute(&SENDER_REFUSED) {
                tracing::error!(
                    "Twilio refused a sender of ours (error {c}: not a number of this account \
                     that may send, not a valid sender, or a Messaging Service it has not): check TWILIO_FROM and \
                     TWILIO_MESSAGING_SERVICE_SID; queued messages wait and are retried until \
                     it is fixed and smsflow restarted"
                );
            }
            return Err(SendError::Temporary {
                message: format!("Twilio refused the sender ({status}): {message}"),
                retry_after,
                not_the_message: true,
                maybe_sent: false,
            });
        }
        if status.as_u16() == 429 || status.is_server_error() {
            Err(SendError::Temporary {
                message: format!("Twilio answered {status}: {message}"),
                retry_after,
                not_the_message: false,
                maybe_sent: false,
            })
        } else if status.as_u16() == 401 || code.is_some_and(|c| ACCOUNT_CODES.contains(&c)) {
            // No fault of the message: it waits, with the others, for the account to be
            // fixed (and the daemon restarted with the new credentials). The log gives the
            // status and code only: Twilio's text may quote the number.
            // Once a minute at most: every queued message is refused alike.
            if once_a_minute(&ACCOUNT_REFUSED) {
                tracing::error!(
                    "Twilio refused the account ({status}, error {}): check TWILIO_ACCOUNT_SID, \
                     TWILIO_AUTH_TOKEN and the account's status; queued messages wait and are \
                     retried, OTP API requests fail (exit_code 5) until it is fixed",
                    code.map_or("unknown".to_string(), |c| c.to_string())
                );
            }
            Err(SendError::Temporary {
                message: format!("Twilio refused the account ({status}): {message}"),
                retry_after,
                not_the_message: true,
                maybe_sent: false,
            })
        } else {
            Err(SendError::Permanent {
                code,
                message: format!("Twilio answered {status}: {message}"),
            })
        }
    }

    /// Twilio's words as smsflow passes them on (the log, the admin API, the OTP API's
    /// answer), with what they may quote of the request hidden: the text or call as sent,
    /// the numbers as written in it, and the credentials in any form. (Digits quoted
    /// otherwise are hidden by [`crate::outbox::redact`].)
    fn scrubbed(&self, mut text: String, form: &[(&str, String)]) -> String {
        use base64::Engine as _;
        let token = self.config.auth_token.expose();
        let basic = base64::engine::general_purpose::STANDARD
            .encode(format!("{}:{token}", self.config.account_sid));
        for secret in [basic.as_str(), token] {
            if !secret.is_empty() {
                text = text.replace(secret, "[hidden]");
            }
        }
        for (name, value) in form {
            let stand_in = match *name {
                "Body" | "Twiml" => "[the message]".to_string(),
                "To" => "[number]".to_string(),
                // Our own sender, which an error may be about (with several, which one):
                // masked, as numbers are in the log.
                "From" => Phone::parse(value).map_or_else(|_| value.clone(), |p| p.masked()),
                _ => continue,
            };
            // Too short a text would hide ordinary words of Twilio's.
            if value.chars().count() < 4 {
                continue;
            }
            // As sent, and as a form encodes it (`+` or `%20` for a space).
            let encoded: String = form_urlencoded::byte_serialize(value.as_bytes()).collect();
            for quoted in [value.clone(), encoded.replace('+', "%20"), encoded] {
                text = text.replace(&quoted, &stand_in);
            }
        }
        text
    }
}

/// Twilio's `ValidityPeriod` for a text of use for `valid`: whole seconds, rounded up, within
/// the 1 to 36,000 Twilio takes (its default is the longest).
pub fn validity_period(valid: std::time::Duration) -> u64 {
    let secs = valid.as_secs() + u64::from(valid.subsec_nanos() > 0);
    secs.clamp(1, 36_000)
}

/// How long a code expiring at `expires_at` is still of use at `now` (none once expired).
pub fn life_left(
    expires_at: chrono::DateTime<chrono::Utc>,
    now: chrono::DateTime<chrono::Utc>,
) -> Option<std::time::Duration> {
    (expires_at - now).to_std().ok()
}

/// Twilio's codes for an account that cannot send at all (wrong or revoked credentials, a
/// suspended or closed account): a fault of the account, not of a message, so the outbox
/// keeps retrying (for hours, backing off) instead of failing every queued message.
const ACCOUNT_CODES: [u32; 3] = [20003, 20403, 10001];

/// Twilio's codes for a sender of ours it will not send from: 21212, not a valid sender
/// (an invalid number, a sender ID on a do-not-originate list); 21601, not a number of the
/// account that can send; 21661, a number of ours not able to text; 21701 and 21705, a
/// Messaging Service that does not exist (or is another account's) or is not valid; 21210,
/// a caller ID the account has not verified (calls). (Not 21606, which may be the
/// destination's: a short code texting another country.)
const SENDER_CODES: [u32; 6] = [21212, 21601, 21661, 21701, 21705, 21210];

/// Twilio's code for a sender whose queue is full (more than 10 hours of messages at its
/// rate): temporary, though answered 400.
const QUEUE_FULL: u32 = 21611;

/// reqwest errors print the URL, which holds the account SID; keep only the kind.
fn without_url(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "connection failed"
    } else {
        "request failed"
    };
    kind.to_string()
}

/// The most of a Twilio answer that is read: its JSON is a few hundred bytes, and an answer
/// from something else at that address must not be held whole, however large it is.
const MAX_ANSWER: usize = 64 << 10;

/// An answer's body as text, read up to [`MAX_ANSWER`] (the rest is left unread, and what
/// was read does not parse: it counts as an unreadable answer). A body that breaks off gives
/// what came of it, which does not parse either.
async fn capped_text(mut response: reqwest::Response) -> String {
    let mut body = Vec::new();
    while let Ok(Some(chunk)) = response.chunk().await {
        body.extend_from_slice(&chunk);
        if body.len() > MAX_ANSWER {
            body.truncate(MAX_ANSWER);
            break;
        }
    }
    String::from_utf8_lossy(&body).into_owned()
}

/// A `Retry-After` value: seconds, or an HTTP date (RFC 9110 allows both; a date already
/// past means at once). More seconds than a `u64` holds are read as the most it holds (the
/// caller caps the wait). Anything else is no answer, and the backoff applies.
fn retry_after(value: &str, now: std::time::SystemTime) -> Option<Duration> {
    let value = value.trim();
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        return Some(Duration::from_secs(value.parse().unwrap_or(u64::MAX)));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::{retry_after, validity_period, Console};
    use std::time::{Duration, SystemTime};

    #[test]
    fn a_validity_period_is_whole_seconds_rounded_up_within_twilios_range() {
        let ms = Duration::from_millis;
        assert_eq!(validity_period(ms(599_001)), 600);
        assert_eq!(validity_period(ms(600_000)), 600);
        assert_eq!(validity_period(ms(0)), 1);
        assert_eq!(validity_period(ms(200)), 1);
        assert_eq!(validity_period(ms(86_400_000)), 36_000);
    }

    /// A Twilio provider sending as `sender` (no request is made).
    fn twilio(sender: crate::config::Sender) -> super::Twilio {
        let config = crate::config::TwilioConfig {
            account_sid: "AC1".into(),
            auth_token: crate::config::Secret::new("t"),
            sender,
            caller_id: None,
            api_base: "http://127.0.0.1:9".into(),
        };
        super::Twilio::new(config, None).unwrap()
    }

    #[test]
    fn a_number_is_texted_from_the_one_of_ours_it_wrote_to_and_a_service_chooses_its_own() {
        use crate::config::Sender;
        use crate::phone::Phone;
        let (a, b) = ("+15005550006", "+15005550007");
        let t = twilio(Sender::From(vec![a.into(), b.into(), "ACME".into()]));
        assert_eq!(t.sender_for(b), Phone::from_stored(b.into()).ok());
        assert_eq!(
            t.sender_for(" +15005550007 "),
            Phone::from_stored(b.into()).ok()
        );
        assert_eq!(t.sender_for("+15559990000"), None, "not one of ours");
        assert_eq!(t.sender_for("ACME"), None, "not a number to text from");
        let via = Phone::from_stored(b.into()).ok();
        assert_eq!(t.sender_param(via.as_ref()), ("From", b.to_string()));
        assert_eq!(t.sender_param(None), ("From", a.to_string()));
        let gone = Phone::from_stored("+15559990000".into()).ok();
        assert_eq!(t.sender_param(gone.as_ref()), ("From", a.to_string()));

        let listed = super::Provider::Twilio(t);
        assert!(listed.sends_from(&Phone::from_stored(b.into()).unwrap()));
        assert!(!listed.sends_from(&Phone::from_stored("+15559990000".into()).unwrap()));

        let service = twilio(Sender::MessagingService("MG1".into()));
        assert_eq!(service.sender_for(a), None);
        assert_eq!(
            service.sender_param(via.as_ref()),
            ("MessagingServiceSid", "MG1".to_string())
        );
        let service = super::Provider::Twilio(service);
        assert!(!service.sends_from(&Phone::from_stored(a.into()).unwrap()));
    }

    #[test]
    fn console_message_ids_differ_within_a_run_and_from_an_earlier_run() {
        let to = crate::phone::Phone::from_stored("+15550001111".into()).unwrap();
        let sid = |c: &Console| c.print("sms", &to, "hi").sid.unwrap();
        let (before, after) = (
            Console::started_at(true, 1_795_000_000_000),
            Console::started_at(true, 1_795_000_000_001),
        );
        let ids = [sid(&before), sid(&before), sid(&after), sid(&after)];
        for (i, a) in ids.iter().enumerate() {
            assert!(a.starts_with("CONSOLE"), "{a}");
            assert!(ids[i + 1..].iter().all(|b| a != b), "{a} twice in {ids:?}");
        }
    }

    #[test]
    fn retry_after_is_read_as_seconds_or_as_an_http_date() {
        let now = httpdate::parse_http_date("Sun, 22 Nov 2026 10:00:00 GMT").unwrap();
        let cases: [(&str, Option<Duration>); 9] = [
            ("120", Some(Duration::from_secs(120))),
            (" 7 ", Some(Duration::from_secs(7))),
            // Longer than anyone waits: the longest (capped by the caller).
            ("99999999999999999999", Some(Duration::from_secs(u64::MAX))),
            ("+5", None),
            (
                "Sun, 22 Nov 2026 10:01:30 GMT",
                Some(Duration::from_secs(90)),
            ),
            // The obsolete forms HTTP still allows.
            (
                "Sunday, 22-Nov-26 10:00:05 GMT",
                Some(Duration::from_secs(5)),
            ),
            ("Sun Nov 22 10:00:10 2026", Some(Duration::from_secs(10))),
            ("Sun, 22 Nov 2026 09:00:00 GMT", Some(Duration::ZERO)),
            ("soon", None),
        ];
        for (value, expected) in cases {
            assert_eq!(retry_after(value, now), expected, "{value:?}");
        }
        assert_eq!(retry_after("-1", SystemTime::UNIX_EPOCH), None);
    }
}
