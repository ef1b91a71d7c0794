//! Configuration: defaults, then an optional `smsflow.toml`, then environment, then flags.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::Deserialize;

use crate::phone::Region;

/// A secret value: never printed, never logged.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

/// Only a string is a secret; anything else is refused without being shown (serde's own
/// message would quote the value).
impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Secret, D::Error> {
        String::deserialize(d).map(Secret).map_err(|_| {
            serde::de::Error::custom(
                "must be a quoted string (the value is not shown: it is a secret)",
            )
        })
    }
}

impl Secret {
    pub fn new(s: impl Into<String>) -> Secret {
        Secret(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// Who the Twilio provider sends as.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Sender {
    /// One or more numbers (`TWILIO_FROM`, comma-separated): a number is texted from the one
    /// it last wrote to or called, and otherwise from the first.
    From(Vec<String>),
    MessagingService(String),
}

#[derive(Clone, Debug)]
pub struct TwilioConfig {
    pub account_sid: String,
    pub auth_token: Secret,
    pub sender: Sender,
    /// The first phone number of `from`, for voice calls (a messaging service sends texts
    /// but cannot place a call), kept even when texts go through a messaging service.
    pub caller_id: Option<String>,
    pub api_base: String,
}

const DEFAULT_DATA: &str = "data";
const DEFAULT_FLOWS: &str = "flows";

/// The resolved configuration the daemon runs with.
#[derive(Clone, Debug)]
pub struct Config {
    pub listen: SocketAddr,
    /// The public base URL Twilio calls (a tunnel or proxy), without trailing slash.
    pub public_url: Option<String>,
    pub data_dir: PathBuf,
    pub flows_dir: PathBuf,
    pub region: Region,
    /// Messages per second per sender (1 suits a US long code).
    pub send_rate: f64,
    /// Full credentials: the Twilio provider. `None`: the console provider.
    pub twilio: Option<TwilioConfig>,
    /// Checks `X-Twilio-Signature` on every Twilio route when set.
    pub auth_token: Option<Secret>,
    /// Bearer token for the OTP API.
    pub api_token: Option<Secret>,
    /// Bearer token for the admin API.
    pub admin_token: Option<Secret>,
    /// History entries and delivery records older than this are deleted (daily). `None`:
    /// everything is kept.
    pub retention: Option<std::time::Duration>,
    /// sled's page cache, in bytes.
    pub cache_bytes: u64,
}
impl Config {
    /// Reachable from this machine only: a loopback listen address and no public URL. Then
    /// unsigned webhooks and token-less APIs take local requests; otherwise they are refused.
    pub fn local_only(&self) -> bool {
        self.listen.ip().is_loopback() && self.public_url.is_none()
    }
}

/// One `TWILIO_FROM` entry as Twilio takes it: a phone number, written with `+` and its
/// country code (kept in E.164), a short code (3 to 6 digits), or an alphanumeric sender ID
/// (up to 11 letters, digits and spaces, one a letter). Anything else is refused, named.
fn sender_entry(entry: &str) -> anyhow::Result<String> {
    let shown = crate::clip(entry);
    let refused = |why: &str| anyhow::anyhow!("sender {shown:?} {why}");
    if entry.starts_with('+') {
        // Only what a phone number is written with: no `whatsapp:` or other channel (this
        // sends SMS), which the phone number reader would skip.
        if !entry
            .chars()
            .all(|c| c.is_ascii_digit() || "+ -.()".contains(c))
        {
            return Err(refused(
                "is no phone number: it has other characters than ASCII digits and separators",
            ));
        }
        return crate::phone::Phone::parse(entry)
            .map(|p| p.as_str().to_string())
            .map_err(|e| anyhow::anyhow!("sender {e}"));
    }
    if entry.chars().all(|c| c.is_ascii_digit()) {
        return match entry.len() {
            3..=6 => Ok(entry.to_string()),
            _ => Err(refused(
                "is no short code (3 to 6 digits); write a phone number with + and its country code",
            )),
        };
    }
    let alphanumeric = entry.chars().all(|c| c.is_ascii_alphanumeric() || c == ' ')
        && entry.chars().any(|c| c.is_ascii_alphabetic());
    match (alphanumeric, entry.len()) {
        (true, 1..=11) => Ok(entry.to_string()),
        (true, _) => Err(refused(
            "is too long for a sender ID (at most 11 characters)",
        )),
        (false, _) => Err(refused(
            "is neither a phone number (+ and its country code), a short code nor an \
             alphanumeric sender ID",
        )),
    }
}

/// Values as read from one layer; `None` means "not set here".
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Layer {
    pub listen: Option<String>,
    pub public_url: Option<String>,
    pub data: Option<PathBuf>,
    pub flows: Option<PathBuf>,
    pub region: Option<String>,
    /// A number, or (as every value may be) text holding one; blank is unset.
    #[serde(default, deserialize_with = "number_or_text")]
    pub send_rate: Option<f64>,
    pub api_token: Option<Secret>,
    pub admin_token: Option<Secret>,
    /// A duration such as `180d` (humantime).
    pub retention: Option<String>,
    /// A size such as `128MiB` (a bare number is MiB), or a number.
    #[serde(default, deserialize_with = "text_or_number")]
    pub cache: Option<String>,
    #[serde(default)]
    pub twilio: TwilioLayer,
    /// Values given that could not even be read (a variable's send rate that is no number),
    /// by key: told as the others are, unless a higher layer overrides them.
    #[serde(skip)]
    pub unread: Vec<(&'static str, String)>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TwilioLayer {
    pub account_sid: Option<String>,
    pub auth_token: Option<Secret>,
    /// One sender, several comma-separated, or (in the file) an array of them.
    #[serde(default, deserialize_with = "one_or_many")]
    pub from: Option<String>,
    pub messaging_service_sid: Option<String>,
    pub api_base: Option<String>,
}

/// A number, or a string holding one (`send_rate = "2"`, spaces around it ignored, as a
/// variable's); a blank string is unset.
fn number_or_text<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Number(f64),
        Text(String),
    }
    let read = Option::<Raw>::deserialize(d).map_err(|_| {
        serde::de::Error::custom("expected a number (messages per second, such as 1 or 0.5)")
    })?;
    match read {
        None => Ok(None),
        Some(Raw::Number(n)) => Ok(Some(n)),
        Some(Raw::Text(t)) if t.trim().is_empty() => Ok(None),
        Some(Raw::Text(t)) => t.trim().parse().map(Some).map_err(|_| {
            serde::de::Error::custom(format!(
                "{t:?} is not a number (messages per second, such as 1 or 0.5)"
            ))
        }),
    }
}

/// A string, or a number as its text (`cache = 256`).
fn text_or_number<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Integer(u64),
        Number(f64),
        Text(String),
    }
    let read = Option::<Raw>::deserialize(d)
        .map_err(|_| serde::de::Error::custom("expected a size, such as \"256MiB\""))?;
    Ok(read.map(|r| match r {
        Raw::Integer(n) => n.to_string(),
        Raw::Number(n) => n.to_string(),
        Raw::Text(t) => t,
    }))
}

/// A string, or an array of strings joined with commas (`from = ["+1…", "+1…"]`).
fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    let read = Option::<OneOrMany>::deserialize(d).map_err(|_| {
        serde::de::Error::custom("expected a string, or an array of strings (senders)")
    })?;
    Ok(read.map(|v| match v {
        OneOrMany::One(s) => s,
        OneOrMany::Many(list) => list.join(", "),
    }))
}

/// An environment value, a blank one counting as unset.
fn non_blank(v: Option<String>) -> Option<String> {
    v.filter(|v| !v.trim().is_empty())
}

impl Layer {
    /// Reads a config file; a missing optional file is an empty layer.
    pub fn from_file(path: &Path, required: bool) -> anyhow::Result<Layer> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => {
                return Ok(Layer::default())
            }
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        toml::from_str::<Layer>(&text)
            .map(Layer::tidy)
            .map_err(|e| {
                let (line, col) = e.span().map_or((1, 1), |s| crate::line_col(&text, s.start));
                anyhow::anyhow!("{}:{line}:{col}: {}", path.display(), e.message().trim())
            })
    }

    /// Whether this layer sets `key` (a blank value sets nothing: see [`Layer::over`]).
    fn sets(&self, key: &str) -> bool {
        let set = |v: &Option<String>| v.as_deref().is_some_and(|v| !v.trim().is_empty());
        // (A value given that could not even be read is set too: told, it hides the lower
        // layers' value as a good one would.)
        if self.unread.iter().any(|(k, _)| *k == key) {
            return true;
        }
        match key {
            "listen" => set(&self.listen),
            "public_url" => set(&self.public_url),
            "region" => set(&self.region),
            "send_rate" => self.send_rate.is_some(),
            "retention" => set(&self.retention),
            "cache" => set(&self.cache),
            "twilio.from" => self.twilio.from.is_some(),
            "twilio.api_base" => self.twilio.api_base.is_some(),
            "api_token" => token_set(&self.api_token),
            "admin_token" => token_set(&self.admin_token),
            _ => false,
        }
    }

    /// Each value this layer sets that cannot be used, by its key in the file.
    fn value_problems(&self) -> Vec<(&'static str, anyhow::Error)> {
        let given = |v: &Option<String>| v.clone().filter(|v| !v.trim().is_empty());
        let checks: [(&'static str, Option<anyhow::Result<()>>); 10] = [
            (
                "listen",
                given(&self.listen).map(|l| parse_listen(&l).map(drop)),
            ),
            (
                "public_url",
                given(&self.public_url).map(|u| public_base_url(&u).map(drop)),
            ),
            (
                "region",
                given(&self.region).map(|r| Ok(Region::parse(r.trim()).map(drop)?)),
            ),
            (
                "send_rate",
                self.send_rate.map(|r| check_send_rate(r).map(drop)),
            ),
            (
                "retention",
                self.retention
                    .as_deref()
                    .map(|r| parse_retention(r).map(drop)),
            ),
            (
                "cache",
                given(&self.cache).map(|c| parse_cache(&c).map(drop)),
            ),
            (
                "twilio.api_base",
                (self.twilio.api_base.as_deref()).map(|b| base_url(b, "api_base").map(drop)),
            ),
            (
                "twilio.from",
                self.twilio
                    .from
                    .as_deref()
                    .map(|f| parse_senders(f).map(drop)),
            ),
            ("api_token", self.api_token.as_ref().map(check_token)),
            ("admin_token", self.admin_token.as_ref().map(check_token)),
        ];
        let unread =
            (self.unread.iter()).map(|(key, problem)| (*key, anyhow::anyhow!("{problem}")));
        unread
            .chain((checks.into_iter()).filter_map(|(key, checked)| Some((key, checked?.err()?))))
            .collect()
    }

    /// The environment layer: `SMSFLOW_*` and `TWILIO_*` (blank is unset).
    pub fn from_env(get: impl Fn(&str) -> Option<String>) -> anyhow::Result<Layer> {
        let dirs = Layer::dirs_from_env(&get);
        let get = |k: &str| non_blank(get(k));
        let mut unread = Vec::new();
        let send_rate = get("SMSFLOW_SEND_RATE").and_then(|v| {
            let read = v.trim().parse::<f64>().ok();
            if read.is_none() {
                unread.push((
                    "send_rate",
                    format!(
                        "SMSFLOW_SEND_RATE {v:?} is not a number (messages per second, such as 1 or 0.5)"
                    ),
                ));
            }
            read
        });
        Ok(Layer::tidy(Layer {
            listen: get("SMSFLOW_LISTEN"),
            public_url: get("SMSFLOW_PUBLIC_URL"),
            data: dirs.data,
            flows: dirs.flows,
            region: get("SMSFLOW_REGION"),
            send_rate,
            api_token: get("SMSFLOW_API_TOKEN").map(Secret),
            admin_token: get("SMSFLOW_ADMIN_TOKEN").map(Secret),
            retention: get("SMSFLOW_RETENTION"),
            cache: get("SMSFLOW_CACHE"),
            twilio: TwilioLayer {
                account_sid: get("TWILIO_ACCOUNT_SID"),
                auth_token: get("TWILIO_AUTH_TOKEN").map(Secret),
                from: get("TWILIO_FROM"),
                messaging_service_sid: get("TWILIO_MESSAGING_SERVICE_SID"),
                api_base: get("TWILIO_API_BASE"),
            },
            unread,
        }))
    }

    /// Only the directories from the environment (`SMSFLOW_DATA`, `SMSFLOW_FLOWS`; blank is
    /// unset): for commands that use nothing else, so no other setting can stop them.
    pub fn dirs_from_env(get: impl Fn(&str) -> Option<String>) -> Layer {
        let get = |k: &str| non_blank(get(k)).map(PathBuf::from);
        Layer {
            data: get("SMSFLOW_DATA"),
            flows: get("SMSFLOW_FLOWS"),
            ..Layer::default()
        }
    }

    /// The data and flow directories, defaults applied.
    pub fn dirs(&self) -> (PathBuf, PathBuf) {
        // (An empty path is unset, as a blank value is.)
        let given = |p: &Option<PathBuf>| p.clone().filter(|p| !p.as_os_str().is_empty());
        (
            given(&self.data).unwrap_or_else(|| PathBuf::from(DEFAULT_DATA)),
            given(&self.flows).unwrap_or_else(|| PathBuf::from(DEFAULT_FLOWS)),
        )
    }

    /// Secrets and Twilio's names as they are meant: without the whitespace an env file or an
    /// editor leaves around them (a stray `\r` would go into the REST URL, the Basic auth or
    /// `From`; a request's token is read trimmed too), and a blank one is unset, so
    /// `api_token = ""` leaves the API local-only instead of locking it.
    fn tidy(mut self) -> Layer {
        let trim = |s: Option<String>| non_blank(s).map(|s| s.trim().to_string());
        let tidy = |s: Option<Secret>| trim(s.map(|s| s.0)).map(Secret);
        self.api_token = tidy(self.api_token);
        self.admin_token = tidy(self.admin_token);
        let t = &mut self.twilio;
        t.auth_token = tidy(t.auth_token.take());
        t.account_sid = trim(t.account_sid.take());
        t.from = trim(t.from.take());
        t.messaging_service_sid = trim(t.messaging_service_sid.take());
        t.api_base = trim(t.api_base.take());
        self
    }

    /// `self` with every unset value taken from `lower` (a blank one is unset: `--listen=`
    /// leaves `SMSFLOW_LISTEN` in force).
    pub fn over(self, lower: Layer) -> Layer {
        // What the lower layer could not read counts only where this one does not override
        // it, after what this one could not.
        let below: Vec<(&'static str, String)> = (lower.unread.into_iter())
            .filter(|(key, _)| !self.sets(key))
            .collect();
        let mut unread = self.unread;
        unread.extend(below);
        Layer {
            listen: non_blank(self.listen).or(lower.listen),
            public_url: non_blank(self.public_url).or(lower.public_url),
            data: self
                .data
                .filter(|d| !d.as_os_str().is_empty())
                .or(lower.data),
            flows: self
                .flows
                .filter(|f| !f.as_os_str().is_empty())
                .or(lower.flows),
            region: non_blank(self.region).or(lower.region),
            send_rate: self.send_rate.or(lower.send_rate),
            api_token: self.api_token.or(lower.api_token),
            admin_token: self.admin_token.or(lower.admin_token),
            retention: non_blank(self.retention).or(lower.retention),
            cache: non_blank(self.cache).or(lower.cache),
            twilio: TwilioLayer {
                account_sid: self.twilio.account_sid.or(lower.twilio.account_sid),
                auth_token: self.twilio.auth_token.or(lower.twilio.auth_token),
                from: self.twilio.from.or(lower.twilio.from),
                messaging_service_sid: self
                    .twilio
                    .messaging_service_sid
                    .or(lower.twilio.messaging_service_sid),
                api_base: self.twilio.api_base.or(lower.twilio.api_base),
            },
            unread,
        }
    }

    /// Applies defaults and checks values.
    pub fn resolve(self) -> anyhow::Result<Config> {
        if let Some((_, problem)) = self.unread.first() {
            anyhow::bail!("{problem}");
        }
        let (data_dir, flows_dir) = self.dirs();
        // Blank is unset, as for a variable, wherever it is written (the file, a flag).
        let given = |v: Option<String>| v.filter(|v| !v.trim().is_empty());
        let listen = parse_listen(given(self.listen).as_deref().unwrap_or("127.0.0.1:8080"))?;
        let public_url = given(self.public_url)
            .map(|u| public_base_url(&u))
            .transpose()?;
        let region = Region::parse(given(self.region).as_deref().map_or("US", str::trim))?;
        let send_rate = check_send_rate(self.send_rate.unwrap_or(1.0))?;
        let retention = self
            .retention
            .as_deref()
            .map(parse_retention)
            .transpose()?
            .flatten();
        let cache_bytes = parse_cache(given(self.cache).as_deref().unwrap_or(DEFAULT_CACHE))?;
        let t = self.twilio;
        // Checked whenever it is given, used or not (the console provider never reads it): a
        // typo shows at once, not only once credentials are added.
        let api_base = base_url(
            t.api_base.as_deref().unwrap_or("https://api.twilio.com"),
            API_BASE,
        )?;
        // The first phone number among the senders places calls.
        let numbers = (t.from.as_deref().map(parse_senders).transpose())
            .context("TWILIO_FROM (twilio.from)")?
            .unwrap_or_default();
        let caller_id = (numbers.iter()).find(|n| n.starts_with('+')).cloned();
        let sender = match (numbers.is_empty(), t.messaging_service_sid) {
            (_, Some(ms)) => Some(Sender::MessagingService(ms)),
            (false, None) => Some(Sender::From(numbers)),
            (true, None) => None,
        };
        let twilio = match (t.account_sid, t.auth_token.clone(), sender) {
            (Some(account_sid), Some(auth_token), Some(sender)) => Some(TwilioConfig {
                account_sid,
                auth_token,
                sender,
                caller_id,
                api_base,
            }),
            (None, _, None) => None,
            (sid, token, sender) => anyhow::bail!(
                "incomplete Twilio credentials: set TWILIO_ACCOUNT_SID, TWILIO_AUTH_TOKEN and TWILIO_FROM \
                 (or TWILIO_MESSAGING_SERVICE_SID), or in smsflow.toml's [twilio] table account_sid, \
                 auth_token and from (or messaging_service_sid); missing: {}",
                [
                    sid.is_none().then_some("TWILIO_ACCOUNT_SID"),
                    token.is_none().then_some("TWILIO_AUTH_TOKEN"),
                    sender.is_none().then_some("TWILIO_FROM"),
                ]
                .into_iter()
                .flatten()
                .collect::<Vec<_>>()
                .join(", ")
            ),
        };
        Ok(Config {
            listen,
            public_url,
            data_dir,
            flows_dir,
            region,
            send_rate,
            twilio,
            auth_token: t.auth_token,
            api_token: self.api_token,
            admin_token: self.admin_token,
            retention,
            cache_bytes,
        })
    }
}

/// The lowest `send_rate`: one message every 1,000 seconds.
const MIN_SEND_RATE: f64 = 0.001;

/// How `api_base` is named in its problems.
const API_BASE: &str = "TWILIO_API_BASE (api_base)";

/// Every value `serve` would use that cannot be used, each named by where it came from: its
/// place in the config file at `path` (`smsflow.toml:3:13: …`), its variable, its flag. (A
/// value a higher layer overrides is not used, and not looked at.)
pub fn check_layers(file: &Layer, path: &Path, env: &Layer, flags: &Layer) -> anyhow::Result<()> {
    let named = |source: String, e: anyhow::Error| {
        let e = format!("{e:#}");
        // (Some problems name the variable already.)
        if e.starts_with(&source) {
            e
        } else {
            format!("{source}: {e}")
        }
    };
    let mut told: Vec<String> = (flags.value_problems().into_iter())
        .map(|(key, e)| named(format!("--{}", key.replace('_', "-")), e))
        .collect();
    told.extend(
        (env.value_problems().into_iter())
            .filter(|(key, _)| !flags.sets(key))
            .map(|(key, e)| {
                let variable = match key.strip_prefix("twilio.") {
                    Some(twilio) => format!("TWILIO_{}", twilio.to_uppercase()),
                    None => format!("SMSFLOW_{}", key.to_uppercase()),
                };
                named(variable, e)
            }),
    );
    let in_file: Vec<(&str, anyhow::Error)> = (file.value_problems().into_iter())
        .filter(|(key, _)| !env.sets(key) && !flags.sets(key))
        .collect();
    if !in_file.is_empty() {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let spans: FileSpans = toml::from_str(&text).unwrap_or_default();
        let mut located: Vec<((usize, usize), anyhow::Error)> = (in_file.into_iter())
            .map(|(key, e)| {
                (
                    spans
                        .of(key)
                        .map_or((1, 1), |at| crate::line_col(&text, at)),
                    e,
                )
            })
            .collect();
        located.sort_by_key(|(at, _)| *at);
        told.extend(
            (located.into_iter())
                .map(|((line, col), e)| format!("{}:{line}:{col}: {e:#}", path.display())),
        );
    }
    if told.is_empty() {
        Ok(())
    } else {
        anyhow::bail!("{}", told.join("\n"))
    }
}

/// Where the values [`Layer::value_problems`] checks are written in a config file.
#[derive(Default, Deserialize)]
struct FileSpans {
    listen: Option<toml::Spanned<toml::Value>>,
    public_url: Option<toml::Spanned<toml::Value>>,
    region: Option<toml::Spanned<toml::Value>>,
    send_rate: Option<toml::Spanned<toml::Value>>,
    retention: Option<toml::Spanned<toml::Value>>,
    cache: Option<toml::Spanned<toml::Value>>,
    api_token: Option<toml::Spanned<toml::Value>>,
    admin_token: Option<toml::Spanned<toml::Value>>,
    #[serde(default)]
    twilio: TwilioSpans,
}

#[derive(Default, Deserialize)]
struct TwilioSpans {
    from: Option<toml::Spanned<toml::Value>>,
    api_base: Option<toml::Spanned<toml::Value>>,
}

impl FileSpans {
    /// Where the value of `key` starts.
    fn of(&self, key: &str) -> Option<usize> {
        let value = match key {
            "listen" => &self.listen,
            "public_url" => &self.public_url,
            "region" => &self.region,
            "send_rate" => &self.send_rate,
            "retention" => &self.retention,
            "cache" => &self.cache,
            "twilio.from" => &self.twilio.from,
            "twilio.api_base" => &self.twilio.api_base,
            "api_token" => &self.api_token,
            "admin_token" => &self.admin_token,
            _ => return None,
        };
        value.as_ref().map(|v| v.span().start)
    }
}

/// Whether a token is given (blank is unset).
fn token_set(token: &Option<Secret>) -> bool {
    token
        .as_ref()
        .is_some_and(|t| !t.expose().trim().is_empty())
}

/// A bearer token must be what an `Authorization` header carries as written: printable ASCII,
/// no spaces inside (told without the value: it is a secret).
fn check_token(token: &Secret) -> anyhow::Result<()> {
    let t = token.expose().trim();
    if t.bytes().all(|b| b.is_ascii_graphic()) {
        Ok(())
    } else {
        anyhow::bail!(
            "a token must be printable ASCII with no spaces (letters, digits, punctuation): an \
             Authorization header cannot carry this one as written (the value is not shown: it \
             is a secret)"
        )
    }
}

/// The listen address: IP:PORT.
fn parse_listen(given: &str) -> anyhow::Result<SocketAddr> {
    let listen = given.trim();
    listen.parse().with_context(|| {
        format!(
            "listen address {listen:?} is not IP:PORT (an IP address, not a name: 127.0.0.1:8080)"
        )
    })
}

fn check_send_rate(rate: f64) -> anyhow::Result<f64> {
    anyhow::ensure!(
        rate.is_finite() && rate >= MIN_SEND_RATE,
        "send_rate must be a number of messages per second, at least {MIN_SEND_RATE} \
         (one every {} s)",
        1.0 / MIN_SEND_RATE
    );
    Ok(rate)
}

/// How long history is kept: `None` for ever (blank, or said outright: a flag or variable
/// turns off a retention the file sets).
fn parse_retention(given: &str) -> anyhow::Result<Option<std::time::Duration>> {
    let r = given.trim();
    if r.is_empty() || r.eq_ignore_ascii_case("forever") {
        return Ok(None);
    }
    let d = crate::parse_duration(r).map_err(|e| {
        anyhow::anyhow!("retention {r:?} is not a duration such as 180d, nor forever ({e})")
    })?;
    anyhow::ensure!(
        d >= std::time::Duration::from_secs(3600),
        "retention {r:?} is shorter than an hour; history is deleted after it"
    );
    Ok(Some(d))
}

/// sled's page cache unless configured.
const DEFAULT_CACHE: &str = "512MiB";

/// The size of sled's page cache: binary units (`256M` and `256MB` are `256MiB`), a bare
/// number in MiB; from 16 MiB (less leaves sled reading pages back all the time) to 1 TiB.
fn parse_cache(given: &str) -> anyhow::Result<u64> {
    let c = given.trim();
    let bytes = parse_size::Config::new()
        .with_binary()
        .with_default_factor(1 << 20)
        .parse_size(c)
        .map_err(|e| anyhow::anyhow!("cache {c:?} is not a size such as 256MiB or 1GiB ({e})"))?;
    anyhow::ensure!(
        (16 << 20..=1 << 40).contains(&bytes),
        "cache {c:?} is out of range: give 16MiB to 1TiB (sled's page cache; 512MiB unless set)"
    );
    Ok(bytes)
}

/// One or more senders, comma-separated; the first is the default. Phone numbers are kept in
/// E.164 (as Twilio writes `To`, which picks a number's sender).
fn parse_senders(from: &str) -> anyhow::Result<Vec<String>> {
    let numbers = (from.split(','))
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .map(sender_entry)
        .collect::<anyhow::Result<Vec<String>>>()?;
    let twice =
        (numbers.iter().enumerate()).find_map(|(i, n)| numbers[..i].contains(n).then_some(n));
    if let Some(twice) = twice {
        anyhow::bail!("sender {twice} is listed twice");
    }
    Ok(numbers)
}

/// The public URL: a base URL, not a webhook's own URL pasted whole (smsflow adds the paths:
/// `…/twilio/sms` would answer at `…/twilio/sms/twilio/sms`).
fn public_base_url(given: &str) -> anyhow::Result<String> {
    let base = base_url(given, "public_url")?;
    // Its path, not the whole text: `https://twilio/sms` is a host `twilio` and a path.
    let path = url::Url::parse(&base).map_or(String::new(), |u| u.path().to_ascii_lowercase());
    let webhook = [
        "/twilio/sms",
        "/twilio/status",
        "/twilio/voice",
        "/twilio/voice/gather",
    ]
    .into_iter()
    .find(|p| path.ends_with(p) && base.to_ascii_lowercase().ends_with(p));
    match webhook {
        Some(path) => anyhow::bail!(
            "public_url {base:?} ends with {path}, a webhook's path: give the address in front \
             of it ({:?}); smsflow adds the paths itself",
            &base[..base.len() - path.len()]
        ),
        None => Ok(base),
    }
}

/// A base URL as given for `what` (`public_url`, `api_base`): `https://` (or `http://`) and a
/// host, no query or fragment. It is kept as written, less a trailing `/`: Twilio signs the
/// URL exactly as it was typed into its console, so it is not rewritten.
fn base_url(given: &str, what: &str) -> anyhow::Result<String> {
    let given = given.trim();
    // Not repeated when it may carry a password (`user:password@host`), nor its query or
    // fragment, which may hold a key.
    let base = given.split(['?', '#']).next().unwrap_or_default();
    let shown = if given.contains('@') {
        "(not repeated: it may hold a password)".to_string()
    } else if base.len() < given.len() {
        format!("{base:?} (its ?query or #fragment not shown)")
    } else {
        format!("{given:?}")
    };
    // A host alone (`abc.ngrok.app`) is the likely slip: say what it lacks.
    anyhow::ensure!(
        given.contains("://"),
        "{what} {shown} must start with https:// (or http://) and a host name"
    );
    let parsed = url::Url::parse(given).with_context(|| format!("{what} {shown} is not a URL"))?;
    // Before anything echoes the URL: a password in it must not reach the log or a banner.
    anyhow::ensure!(
        parsed.username().is_empty() && parsed.password().is_none(),
        "{what} must not carry a user name or password (user:password@); give the plain URL"
    );
    let lower = given.to_ascii_lowercase();
    anyhow::ensure!(
        (lower.starts_with("https://") || lower.starts_with("http://"))
            && parsed.host_str().is_some_and(|h| !h.is_empty()),
        "{what} {shown} must start with https:// (or http://) and a host name"
    );
    anyhow::ensure!(
        parsed.query().is_none() && parsed.fragment().is_none(),
        "{what} {shown} must be a plain base URL: no ?query or #fragment"
    );
    Ok(given.trim_end_matches('/').to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_beat_env_which_beats_the_file_which_beats_defaults() {
        let file: Layer = toml::from_str(
            "listen = \"127.0.0.1:1\"\ndata = \"file-data\"\nflows = \"file-flows\"",
        )
        .unwrap();
        let env = Layer::from_env(|k| match k {
            "SMSFLOW_DATA" => Some("env-data".into()),
            "SMSFLOW_LISTEN" => Some("127.0.0.1:2".into()),
            _ => None,
        })
        .unwrap();
        let flags = Layer {
            listen: Some("127.0.0.1:3".into()),
            ..Layer::default()
        };
        let c = flags.over(env.over(file)).resolve().unwrap();
        assert_eq!(c.listen.port(), 3);
        assert_eq!(c.data_dir, PathBuf::from("env-data"));
        assert_eq!(c.flows_dir, PathBuf::from("file-flows"));
        assert!(
            c.twilio.is_none(),
            "no credentials means the console provider"
        );
    }

    #[test]
    fn blank_tokens_are_unset_and_tokens_lose_surrounding_whitespace_wherever_they_come_from() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("smsflow.toml");
        std::fs::write(
            &path,
            "api_token = \"\"\nadmin_token = \" s3cret \"\n[twilio]\nauth_token = \"  \"\n",
        )
        .unwrap();
        let file = Layer::from_file(&path, true).unwrap();
        assert!(file.api_token.is_none() && file.twilio.auth_token.is_none());
        assert_eq!(
            file.admin_token.as_ref().map(Secret::expose),
            Some("s3cret")
        );
        let env =
            Layer::from_env(|k| (k == "SMSFLOW_API_TOKEN").then(|| "t0k\n".to_string())).unwrap();
        assert_eq!(env.api_token.as_ref().map(Secret::expose), Some("t0k"));
    }

    #[test]
    fn twilio_names_lose_the_whitespace_an_env_file_leaves_around_them() {
        let env = Layer::from_env(|k| match k {
            "TWILIO_ACCOUNT_SID" => Some(" AC1\r".into()),
            "TWILIO_AUTH_TOKEN" => Some("t\r".into()),
            "TWILIO_FROM" => Some("+15005550006\r\n".into()),
            "TWILIO_MESSAGING_SERVICE_SID" => Some("\tMG1 ".into()),
            "TWILIO_API_BASE" => Some("http://127.0.0.1:9 ".into()),
            _ => None,
        })
        .unwrap();
        let twilio = env.resolve().unwrap().twilio.unwrap();
        assert_eq!(twilio.account_sid, "AC1");
        assert!(matches!(&twilio.sender, Sender::MessagingService(m) if m == "MG1"));
        assert_eq!(twilio.caller_id.as_deref(), Some("+15005550006"));
        assert_eq!(twilio.api_base, "http://127.0.0.1:9");
    }

    #[test]
    fn with_a_messaging_service_for_texts_the_from_number_still_places_calls() {
        let env = Layer::from_env(|k| match k {
            "TWILIO_ACCOUNT_SID" => Some("AC1".into()),
            "TWILIO_AUTH_TOKEN" => Some("t".into()),
            "TWILIO_FROM" => Some("+15005550006".into()),
            "TWILIO_MESSAGING_SERVICE_SID" => Some("MG1".into()),
            _ => None,
        })
        .unwrap();
        let twilio = env.resolve().unwrap().twilio.unwrap();
        assert!(matches!(&twilio.sender, Sender::MessagingService(m) if m == "MG1"));
        assert_eq!(twilio.caller_id.as_deref(), Some("+15005550006"));
    }

    /// The configuration with Twilio credentials and this `TWILIO_FROM`.
    fn with_from(from: &'static str) -> anyhow::Result<Config> {
        Layer::from_env(move |k| match k {
            "TWILIO_ACCOUNT_SID" => Some("AC1".into()),
            "TWILIO_AUTH_TOKEN" => Some("t".into()),
            "TWILIO_FROM" => Some(from.into()),
            _ => None,
        })?
        .resolve()
    }

    #[test]
    fn twilio_from_may_list_several_numbers_and_the_first_places_calls() {
        let twilio = with_from(" +15005550006, +15005550007 ,")
            .unwrap()
            .twilio
            .unwrap();
        assert_eq!(
            twilio.sender,
            Sender::From(vec!["+15005550006".into(), "+15005550007".into()])
        );
        assert_eq!(twilio.caller_id.as_deref(), Some("+15005550006"));
        // Entries are read as Twilio takes them: numbers (with `+`) in E.164, short codes and
        // alphanumeric sender IDs as written; the first number places calls; anything else is
        // refused, named.
        let twilio = with_from("ACME, +1 (500) 555-0006, +44 20 7946 0018, 66777")
            .unwrap()
            .twilio
            .unwrap();
        assert_eq!(
            twilio.sender,
            Sender::From(vec![
                "ACME".into(),
                "+15005550006".into(),
                "+442079460018".into(),
                "66777".into()
            ])
        );
        assert_eq!(twilio.caller_id.as_deref(), Some("+15005550006"));
        for (from, why) in [
            (
                "+15005550006, whatsapp:+14155550100",
                "\"whatsapp:+14155550100\" is neither",
            ),
            (
                "+15005550006, +1 500 555 0006",
                "+15005550006 is listed twice",
            ),
            (
                "4155550100",
                "write a phone number with + and its country code",
            ),
            ("ACMECONTESTS", "at most 11 characters"),
            (
                "+1 500 555 0006 ext 1",
                "other characters than ASCII digits",
            ),
            ("12345678", "is no short code (3 to 6 digits)"),
            ("+1", "\"+1\" is not a phone number"),
        ] {
            let err = format!("{:#}", with_from(from).unwrap_err());
            assert!(err.contains(why), "{from}: {err}");
            assert!(err.starts_with("TWILIO_FROM (twilio.from): "), "{err}");
        }
        // In the file, an array of them is the same list.
        let file: Layer =
            toml::from_str("[twilio]\nfrom = [\"+15005550006\", \"+15005550007\"]").unwrap();
        assert_eq!(
            file.twilio.from.as_deref(),
            Some("+15005550006, +15005550007")
        );
        let err = toml::from_str::<Layer>("[twilio]\nfrom = 5").unwrap_err();
        assert!(err.to_string().contains("an array of strings"), "{err}");
        // An empty array, or blank entries, are no senders.
        let file: Layer = toml::from_str(
            "[twilio]\naccount_sid = \"AC1\"\nauth_token = \"t\"\nfrom = [\" \", \"\"]",
        )
        .unwrap();
        assert!(file
            .resolve()
            .unwrap_err()
            .to_string()
            .contains("missing: TWILIO_FROM"));
        // Commas alone are no sender.
        let err = with_from(" , ").unwrap_err().to_string();
        assert!(err.contains("missing: TWILIO_FROM"), "{err}");
    }

    #[test]
    fn partial_twilio_credentials_are_an_error_naming_what_is_missing() {
        let env =
            Layer::from_env(|k| (k == "TWILIO_ACCOUNT_SID").then(|| "AC1".to_string())).unwrap();
        let err = env.resolve().unwrap_err().to_string();
        assert!(
            err.contains("TWILIO_AUTH_TOKEN") && err.contains("TWILIO_FROM"),
            "{err}"
        );
    }

    #[test]
    fn secrets_never_print() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?}"), "Secret(***)");
    }

    #[test]
    fn a_send_rate_in_the_environment_that_is_not_a_number_is_an_error_naming_it() {
        let env = Layer::from_env(|k| (k == "SMSFLOW_SEND_RATE").then(|| "0,5".to_string()));
        let none = Layer::default();
        let err = check_layers(&none, Path::new("smsflow.toml"), &env.unwrap(), &none)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("SMSFLOW_SEND_RATE") && err.contains("0,5"),
            "{err}"
        );
        let ok = Layer::from_env(|k| (k == "SMSFLOW_SEND_RATE").then(|| " 0.5 ".to_string()));
        assert_eq!(ok.unwrap().resolve().unwrap().send_rate, 0.5);
    }

    #[test]
    fn urls_are_kept_as_written_and_a_query_a_fragment_credentials_or_a_mistyped_scheme_are_refused(
    ) {
        let public = |u: &str| {
            Layer {
                public_url: Some(u.into()),
                ..Layer::default()
            }
            .resolve()
            .map(|c| c.public_url.unwrap())
        };
        assert_eq!(
            public("https://ABC.ngrok.app").unwrap(),
            "https://ABC.ngrok.app"
        );
        assert_eq!(
            public(" https://abc.ngrok.app/sms/ ").unwrap(),
            "https://abc.ngrok.app/sms"
        );
        for bad in [
            "https:abc.ngrok.app",
            "https://abc.ngrok.app/?x=1",
            "https://abc.ngrok.app/#",
            "ngrok.app",
        ] {
            let err = public(bad).unwrap_err().to_string();
            assert!(err.contains("public_url"), "{bad}: {err}");
        }
        // A query may hold a key: not said back, whatever else is wrong.
        for given in [
            "https://abc.ngrok.app/?key=s3cret#s3cret",
            "ftp://host/?key=s3cret",
            "abc.ngrok.app/?key=s3cret",
            "https://exa mple.com/?key=s3cret",
        ] {
            let err = public(given).unwrap_err().to_string();
            assert!(err.contains("?query or #fragment"), "{err}");
            assert!(!err.contains("s3cret"), "{err}");
        }
        // A host alone says what it lacks; a webhook's URL pasted whole says what to give.
        assert_eq!(public("https://twilio/sms").unwrap(), "https://twilio/sms");
        let err = public("abc.ngrok.app").unwrap_err().to_string();
        assert!(err.contains("must start with https://"), "{err}");
        let err = public("https://abc.ngrok.app/bot/twilio/sms/")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("ends with /twilio/sms") && err.contains("\"https://abc.ngrok.app/bot\""),
            "{err}"
        );
        // Blank is unset, in the file or a flag as in a variable.
        let blank = Layer {
            public_url: Some(" ".into()),
            listen: Some("".into()),
            region: Some("".into()),
            ..Layer::default()
        }
        .resolve()
        .unwrap();
        assert_eq!(blank.public_url, None);
        assert_eq!(blank.listen.to_string(), "127.0.0.1:8080");
        let flag = Layer {
            listen: Some("".into()),
            ..Layer::default()
        };
        let env = Layer {
            listen: Some(" 127.0.0.1:18202".into()),
            ..Layer::default()
        };
        let listen = flag.over(env).resolve().unwrap().listen;
        assert_eq!(
            listen.to_string(),
            "127.0.0.1:18202",
            "a blank flag leaves the variable"
        );
        let keep = |r: &str| Layer {
            retention: Some(r.into()),
            data: Some("".into()),
            ..Layer::default()
        };
        let kept = keep("").over(keep("2h")).resolve().unwrap();
        assert_eq!(kept.retention, Some(std::time::Duration::from_secs(7200)));
        assert_eq!(
            kept.data_dir,
            std::path::PathBuf::from("data"),
            "an empty path is unset"
        );
        // Credentials are refused without being repeated.
        for bad in [
            "https://:s3cret@abc.ngrok.app",
            "https://me:s3cret@abc.ngrok.app",
            // Not even a URL (a bad port): still not repeated.
            "https://me:s3cret@abc.ngrok.app:99999",
        ] {
            let err = format!("{:#}", public(bad).unwrap_err());
            assert!(err.contains("password"), "{bad}: {err}");
            assert!(!err.contains("s3cret"), "{bad}: {err}");
        }
        let base = |u: &str| {
            Layer {
                twilio: TwilioLayer {
                    account_sid: Some("AC1".into()),
                    auth_token: Some(Secret::new("t")),
                    from: Some("+15550001111".into()),
                    api_base: Some(u.into()),
                    ..TwilioLayer::default()
                },
                ..Layer::default()
            }
            .resolve()
            .map(|c| c.twilio.unwrap().api_base)
        };
        assert_eq!(base("http://127.0.0.1:9/").unwrap(), "http://127.0.0.1:9");
        let err = base("not a url").unwrap_err().to_string();
        assert!(err.contains("TWILIO_API_BASE"), "{err}");
        // Without credentials it is never used, and a mistake in it is refused all the same.
        let console = |u: &str| Layer {
            twilio: TwilioLayer {
                api_base: Some(u.into()),
                ..TwilioLayer::default()
            },
            ..Layer::default()
        };
        let err = console("api.twilio.com").resolve().unwrap_err().to_string();
        assert!(err.contains("TWILIO_API_BASE"), "{err}");
        let ok = console("https://api.twilio.com").resolve().unwrap();
        assert!(ok.twilio.is_none());
    }

    #[test]
    fn a_secret_that_is_not_a_string_is_refused_without_being_shown() {
        for text in [
            "api_token = 98765432101234",
            "[twilio]\nauth_token = 0xdeadbeef",
            "admin_token = true",
        ] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("smsflow.toml");
            std::fs::write(&path, text).unwrap();
            let err = Layer::from_file(&path, true).expect_err(text).to_string();
            assert!(err.contains("must be a quoted string"), "{err}");
            for shown in ["98765432101234", "3735928559", "deadbeef", "true"] {
                assert!(!err.contains(shown), "{err}");
            }
        }
        let ok: Layer = toml::from_str("api_token = \"s3cret\"").unwrap();
        assert_eq!(ok.api_token.unwrap().expose(), "s3cret");
    }

    #[test]
    fn a_send_rate_in_the_file_is_a_number_or_text_holding_one_and_blank_is_unset() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("smsflow.toml");
        let read = |text: &str| {
            std::fs::write(&path, text).unwrap();
            Layer::from_file(&path, true).map(|l| l.send_rate)
        };
        assert_eq!(read("send_rate = 2\n").unwrap(), Some(2.0));
        assert_eq!(read("send_rate = 0.5\n").unwrap(), Some(0.5));
        assert_eq!(read("send_rate = \" 2 \"\n").unwrap(), Some(2.0));
        assert_eq!(read("send_rate = \"\"\n").unwrap(), None);
        for bad in ["send_rate = \"fast\"\n", "send_rate = true\n"] {
            let err = read(bad).unwrap_err().to_string();
            assert!(err.contains("smsflow.toml:1:13:"), "{err}");
            assert!(err.contains("messages per second"), "{err}");
            assert!(!err.contains("f64"), "{err}");
        }
    }

    #[test]
    fn every_bad_value_in_the_file_is_told_at_its_place_unless_overridden() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("smsflow.toml");
        let text = "listen = \"localhost:80\"\nsend_rate = 0\nretention = \"10m\"\n\
                    [twilio]\nfrom = [\"+15005550006\", \"+15005550006\"]\n";
        std::fs::write(&path, text).unwrap();
        let file = Layer::from_file(&path, true).expect("read for its directories alone");
        let none = Layer::default();
        let err = check_layers(&file, &path, &none, &none)
            .unwrap_err()
            .to_string();
        for told in [
            "smsflow.toml:1:10: listen address \"localhost:80\" is not IP:PORT",
            "smsflow.toml:2:13: send_rate must be",
            "smsflow.toml:3:13: retention \"10m\" is shorter than an hour",
            "smsflow.toml:5:8: sender +15005550006 is listed twice",
        ] {
            assert!(err.contains(told), "{told}\n{err}");
        }
        // Overridden by a variable (a good value) and a flag (a bad one): not the file's.
        let env = Layer {
            send_rate: Some(2.0),
            ..Layer::default()
        };
        let flags = Layer {
            retention: Some("5m".into()),
            ..Layer::default()
        };
        let err = check_layers(&file, &path, &env, &flags)
            .unwrap_err()
            .to_string();
        assert!(err.contains("--retention: retention \"5m\""), "{err}");
        assert!(!err.contains("send_rate") && !err.contains("10m"), "{err}");

        // A variable's send rate that is no number is told as the others are, unless a flag
        // overrides it; merged unchecked, it still stops the start.
        let env = Layer::from_env(|k| (k == "SMSFLOW_SEND_RATE").then(|| "fast".into())).unwrap();
        let err = check_layers(&none, &path, &env, &none)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("SMSFLOW_SEND_RATE \"fast\" is not a number"),
            "{err}"
        );
        // Unreadable, it still overrides the file's value, which is not looked at.
        let err = check_layers(&file, &path, &env, &none)
            .unwrap_err()
            .to_string();
        assert!(err.contains("\"fast\" is not a number"), "{err}");
        assert!(!err.contains("smsflow.toml:2:13"), "{err}");
        let flags = Layer {
            send_rate: Some(2.0),
            ..Layer::default()
        };
        check_layers(&none, &path, &env, &flags).expect("overridden by the flag");
        assert_eq!(flags.over(env.clone()).resolve().unwrap().send_rate, 2.0);
        let err = env.resolve().unwrap_err().to_string();
        assert!(
            err.contains("SMSFLOW_SEND_RATE \"fast\" is not a number"),
            "{err}"
        );
    }

    #[test]
    fn a_send_rate_too_small_to_wait_for_is_refused() {
        let with = |r: f64| {
            Layer {
                send_rate: Some(r),
                ..Layer::default()
            }
            .resolve()
        };
        assert!(with(0.001).is_ok());
        for bad in [1e-20, 0.0, -1.0, f64::NAN] {
            let err = with(bad).unwrap_err().to_string();
            assert!(err.contains("send_rate"), "{err}");
        }
    }

    #[test]
    fn the_cache_is_a_size_in_binary_units_from_16_mib_written_as_text_or_a_number() {
        let mib = |n: u64| n << 20;
        for (given, bytes) in [
            ("256MiB", mib(256)),
            ("256M", mib(256)),
            ("256 MB", mib(256)),
            ("256", mib(256)),
            ("1GiB", mib(1024)),
            ("16MiB", mib(16)),
        ] {
            assert_eq!(parse_cache(given).unwrap(), bytes, "{given}");
        }
        for bad in ["8MiB", "lots", "-1", "2TiB"] {
            let err = parse_cache(bad).unwrap_err().to_string();
            assert!(err.contains(&format!("cache {bad:?}")), "{err}");
        }
        assert_eq!(Layer::default().resolve().unwrap().cache_bytes, mib(512));
        // In the file, a number or text; a variable over the file; a flag over both.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("smsflow.toml");
        std::fs::write(&path, "cache = 128\n").unwrap();
        let file = Layer::from_file(&path, true).unwrap();
        assert_eq!(file.clone().resolve().unwrap().cache_bytes, mib(128));
        let env = Layer::from_env(|k| (k == "SMSFLOW_CACHE").then(|| "64MiB".into())).unwrap();
        assert_eq!(
            env.clone()
                .over(file.clone())
                .resolve()
                .unwrap()
                .cache_bytes,
            mib(64)
        );
        let flag = Layer {
            cache: Some("32M".into()),
            ..Layer::default()
        };
        let all = flag.over(env.over(file));
        assert_eq!(all.resolve().unwrap().cache_bytes, mib(32));
        // A bad one in the file is located.
        std::fs::write(&path, "cache = \"tiny\"\n").unwrap();
        let file = Layer::from_file(&path, true).unwrap();
        let err = check_layers(&file, &path, &Layer::default(), &Layer::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("smsflow.toml:1:9: cache \"tiny\""), "{err}");
    }

    #[test]
    fn retention_is_a_duration_of_an_hour_or_more() {
        let with = |r: &str| {
            Layer {
                retention: Some(r.into()),
                ..Layer::default()
            }
            .resolve()
        };
        assert_eq!(
            with("180d").unwrap().retention,
            Some(std::time::Duration::from_secs(180 * 86_400))
        );
        assert_eq!(Layer::default().resolve().unwrap().retention, None);
        assert_eq!(with("forever").unwrap().retention, None);
        // Over a file's retention.
        let file = Layer {
            retention: Some("30d".into()),
            ..Layer::default()
        };
        let flag = Layer {
            retention: Some("Forever".into()),
            ..Layer::default()
        };
        assert_eq!(flag.over(file).resolve().unwrap().retention, None);
        let err = with("half a year").unwrap_err().to_string();
        assert!(
            err.contains("retention") && err.contains("half a year"),
            "{err}"
        );
        assert!(with("10m")
            .unwrap_err()
            .to_string()
            .contains("shorter than an hour"));
    }
}
