//! The command line: `serve`, `bench`, `export`, `check`, `test`, `simulate`.

use std::io::{BufRead, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

use crate::flows;
use crate::http::otp::OtpError;
use crate::machine::Event;
use crate::phone::Phone;
use crate::sim::{default_start, Sandbox, Sent};
use crate::transcript;
use tracing::Level;

/// `println!` and `eprintln!` that lose their text on a closed or full stream instead of
/// panicking (a `| head` that stopped reading, a full disk): the exit code still tells how
/// the command went.
macro_rules! outln {
    ($($arg:tt)*) => {
        say(&mut std::io::stdout().lock(), &format!("{}\n", format_args!($($arg)*)))
    };
}
macro_rules! errln {
    ($($arg:tt)*) => {
        say(&mut std::io::stderr().lock(), &format!("{}\n", format_args!($($arg)*)))
    };
}

/// `--version`: the release, and the data schema it writes (an older smsflow refuses a data
/// dir this one upgraded; see the README's Upgrading).
pub const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (data schema 11)");

#[derive(Parser, Debug)]
#[command(
    name = "smsflow",
    version = VERSION,
    about = "Runs SMS conversations for Twilio numbers, declared in TOML flows"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// What `serve --help` adds below the flags: the settings that have no flag.
const SERVE_ENV: &str = "\
Environment (the flags' variables are above; the README gives smsflow.toml's names):
  TWILIO_ACCOUNT_SID, TWILIO_AUTH_TOKEN  Twilio credentials (none: the console provider prints
                                         what would be sent); the token also turns on webhook
                                         signature checks
  TWILIO_FROM                            sender numbers, comma-separated
  TWILIO_MESSAGING_SERVICE_SID           or a messaging service
  TWILIO_API_BASE                        default https://api.twilio.com
  SMSFLOW_API_TOKEN                      bearer token of the OTP API
  SMSFLOW_ADMIN_TOKEN                    bearer token of the admin API and /metrics
                                         (both needed once smsflow is reachable from outside)
  SMSFLOW_LOG or RUST_LOG                log filter, default info,notify=warn

The banner goes to stdout, logs to stderr. SIGTERM or SIGINT stops it cleanly (exit 0), a
second one at once; SIGHUP reloads the flows. Exit 1: bad configuration or flows; 2: bad usage;
3: could not start or failed (port in use, data dir held, disk failure).";

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the daemon: Twilio webhooks, timers and the outbox.
    #[command(after_help = SERVE_ENV)]
    Serve(ServeArgs),
    /// Benchmark durable webhooks against a trivial route of the same server, or the export.
    Bench(crate::bench::BenchArgs),
    /// Write the dataset as CSV: one row per phone, every form field.
    Export {
        /// Config file, as `serve --config` takes (default: ./smsflow.toml when it exists).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Data directory [default: SMSFLOW_DATA, else `data` in smsflow.toml, else ./data].
        #[arg(long)]
        data: Option<PathBuf>,
        /// Flow directory, for the field columns [default: SMSFLOW_FLOWS, else `flows` in
        /// smsflow.toml, else ./flows].
        #[arg(long)]
        flows: Option<PathBuf>,
        /// Output file (default: standard output).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Add an indicator column (0/1) per category of every choice field.
        #[arg(long)]
        one_hot: bool,
    },
    /// Rewrite the store into a fresh, smaller one (the daemon stopped); the old one is kept
    /// beside it.
    Compact {
        /// Config file, as `serve --config` takes (default: ./smsflow.toml when it exists).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Data directory [default: SMSFLOW_DATA, else `data` in smsflow.toml, else ./data].
        #[arg(long)]
        data: Option<PathBuf>,
    },
    /// Check a flow directory and report every problem as file:line:col: message.
    Check {
        /// The flow directory.
        #[arg(default_value = "flows")]
        dir: PathBuf,
    },
    /// Run the conversation transcripts in DIR/tests/*.txt against the engine.
    Test {
        /// The flow directory.
        #[arg(default_value = "flows")]
        dir: PathBuf,
    },
    /// Talk to the engine in a terminal, with a virtual clock.
    Simulate {
        #[arg(long, default_value = "flows")]
        flows: PathBuf,
        /// The phone number you text from.
        #[arg(long, default_value = "+15550001111")]
        phone: String,
        /// Seed for codes and sequence draws.
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
}

/// Flags of `serve`; each beats the environment, which beats `smsflow.toml`.
#[derive(clap::Args, Debug, Default)]
pub struct ServeArgs {
    /// Config file (default: ./smsflow.toml when it exists).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Address to listen on [env SMSFLOW_LISTEN; default 127.0.0.1:8080].
    #[arg(long)]
    pub listen: Option<String>,
    /// Public base URL Twilio calls, e.g. your tunnel [env SMSFLOW_PUBLIC_URL].
    #[arg(long)]
    pub public_url: Option<String>,
    /// Data directory [env SMSFLOW_DATA; default ./data].
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Flow directory [env SMSFLOW_FLOWS; default ./flows].
    #[arg(long)]
    pub flows: Option<PathBuf>,
    /// Region for numbers written without +country [env SMSFLOW_REGION; default US].
    #[arg(long)]
    pub region: Option<String>,
    /// Messages per second per sender [env SMSFLOW_SEND_RATE; default 1].
    #[arg(long)]
    pub send_rate: Option<f64>,
    /// Delete history entries and delivery records older than this, such as 180d
    /// [env SMSFLOW_RETENTION; default: keep everything].
    #[arg(long)]
    pub retention: Option<String>,
    /// sled's page cache, such as 128MiB (the daemon's memory grows with the store up to it)
    /// [env SMSFLOW_CACHE; default 512MiB].
    #[arg(long)]
    pub cache: Option<String>,
    /// Log format.
    #[arg(long, value_enum, default_value = "pretty")]
    pub log_format: LogFormat,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogFormat {
    #[default]
    Pretty,
    Json,
}

/// Exit code for "the input (flows, transcripts) has problems".
pub const EXIT_PROBLEMS: u8 = 1;
/// Exit code for "could not even start" (bad arguments, unreadable files).
pub const EXIT_USAGE: u8 = 2;
/// Exit code for a daemon that could not start or failed while running (port in use,
/// data dir held by another process, disk errors).
pub const EXIT_RUNTIME: u8 = 3;

/// The flows in `dir`; failing that, every problem and their count are printed, and the
/// exit code for them returned.
fn flows_or_problems(dir: &Path) -> Result<flows::Flows, ExitCode> {
    flows::load_dir(dir).map_err(|problems| {
        errln!("{problems}");
        errln!("{} problem(s) in {}", problems.0.len(), dir.display());
        ExitCode::from(EXIT_PROBLEMS)
    })
}

pub fn check(dir: &Path) -> ExitCode {
    match flows_or_problems(dir) {
        Ok(f) => {
            for w in f.warnings() {
                errln!("{w}");
            }
            let warned = match f.warnings().len() {
                0 => String::new(),
                n => format!("; {n} warning(s)"),
            };
            outln!("ok: {} ({}){warned}", dir.display(), f.summary());
            ExitCode::SUCCESS
        }
        Err(code) => code,
    }
}

pub fn test(dir: &Path) -> ExitCode {
    let flows = match flows_or_problems(dir) {
        Ok(f) => f,
        Err(code) => return code,
    };
    let tests = dir.join("tests");
    let report = match transcript::run_dir(&flows, &tests) {
        Ok(r) => r,
        Err(e) => {
            errln!("{e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    for p in &report.passed {
        outln!("ok   {}", p.display());
    }
    for f in &report.failures {
        outln!("FAIL {f}");
    }
    outln!(
        "{} passed, {} failed",
        report.passed.len(),
        report.failures.len()
    );
    if report.failures.is_empty() && !report.passed.is_empty() {
        ExitCode::SUCCESS
    } else {
        if report.passed.is_empty() && report.failures.is_empty() {
            errln!("no transcripts in {}", tests.display());
        }
        ExitCode::from(EXIT_PROBLEMS)
    }
}

pub fn simulate(dir: &Path, phone: &str, seed: u64) -> ExitCode {
    let flows = match flows_or_problems(dir) {
        Ok(f) => f,
        Err(code) => return code,
    };
    let phone = match Phone::parse(phone) {
        Ok(p) => p,
        Err(e) => {
            errln!("--phone: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let stdin = std::io::stdin();
    let mut out = std::io::stdout();
    let mut repl = Repl {
        sandbox: Sandbox::new(flows, default_start(), seed),
        phone,
        call: None,
        unattested: false,
    };
    let _ = writeln!(
        out,
        "smsflow simulator: {} — texting as {} at {}. Type a message, or /help.",
        repl.sandbox.flows.bot.name, repl.phone, repl.sandbox.now
    );
    for line in stdin.lock().split(b'\n') {
        let Ok(line) = line else { break };
        // A line that is not text (a terminal in another encoding) is refused, not the end.
        let Ok(line) = String::from_utf8(line) else {
            let _ = writeln!(out, "[that line is not UTF-8 text; nothing was sent]");
            continue;
        };
        match repl.command(line.trim()) {
            Some(text) => {
                let _ = write!(out, "{text}");
                let _ = out.flush();
            }
            None => break,
        }
    }
    ExitCode::SUCCESS
}

/// The simulator's state; `command` answers one input line (`None` quits).
pub struct Repl {
    pub sandbox: Sandbox,
    pub phone: Phone,
    /// In a voice call: the menu being asked and its re-prompt count.
    pub call: Option<(String, u8)>,
    /// The call's caller ID was not attested by its carrier (`/call unattested`).
    pub unattested: bool,
}

impl Repl {
    pub fn command(&mut self, line: &str) -> Option<String> {
        if line.is_empty() {
            return Some(String::new());
        }
        let keys = line
            .chars()
            .all(|c| c.is_ascii_digit() || c == '*' || c == '#');
        if self.call.is_some() && keys {
            // The menu takes one key at a time; several typed at once are no text message
            // (a code guess by SMS would use up an attempt).
            return Some(if line.len() == 1 {
                self.press(Some(line))
            } else {
                "[in a call: press one key at a time (0-9, * or #), or /silence, /hangup]\n"
                    .to_string()
            });
        }
        let Some(cmd) = line.strip_prefix('/') else {
            let sent = self.sandbox.text(&self.phone, line);
            return Some(show(&sent, &self.phone));
        };
        let (name, arg) = cmd.split_once(' ').unwrap_or((cmd, ""));
        let arg = arg.trim();
        Some(match name {
            // (`/state x`, `/otp x`: a word more is a mistake, not ignored.)
            "state" | "otp" | "quit" | "exit" | "help" if !arg.is_empty() => {
                format!("/{name} takes nothing after it\n")
            }
            "quit" | "exit" => return None,
            "help" => HELP.to_string(),
            "wait" | "phone" if arg.is_empty() => {
                let example = if name == "wait" { "1d" } else { "+14155550100" };
                format!("/{name} takes what follows it, as in /{name} {example}\n")
            }
            "wait" => match transcript::parse_delay(arg) {
                Ok(d) => {
                    let sent = self.sandbox.advance(d);
                    format!(
                        "[clock is now {}]\n{}",
                        self.sandbox.now,
                        show(&sent, &self.phone)
                    )
                }
                Err(e) => format!("{e}\n"),
            },
            "state" => self.state(),
            "phone" => match Phone::parse(arg) {
                Ok(p) => {
                    self.phone = p;
                    format!("[now texting as {}]\n", self.phone)
                }
                Err(e) => format!("{e}\n"),
            },
            "call" if matches!(arg, "" | "unattested") => {
                self.unattested = arg == "unattested";
                let turn = crate::ivr::call_starts(&self.sandbox.flows);
                let heard = self.voice(turn);
                format!("[call from {}]\n{heard}", self.phone)
            }
            "silence" if self.call.is_some() => self.press(None),
            "hangup" if self.call.is_some() => {
                self.call = None;
                "[you hung up]\n".to_string()
            }
            // Answered as the daemon's OTP API answers: status, exit code and error.
            "otp" => {
                let (outcome, sent) = self.sandbox.event(&self.phone, Event::OtpRequested);
                let answer = crate::http::otp::requested(outcome, self.sandbox.now);
                format!(
                    "[otp api: {}]\n{}",
                    api_answer(answer),
                    show(&sent, &self.phone)
                )
            }
            "validate" => {
                let length = self.sandbox.flows.verify.code_length;
                // Refused as the daemon refuses it (400), before the state machine sees it.
                let Some(code) = self.sandbox.flows.verify.api_code(arg, &[]) else {
                    let refused = OtpError::BadRequest(format!("otp must be {length} digits"));
                    return Some(format!("[otp api: {}]\n", refused.summary()));
                };
                let now = self.sandbox.now;
                let used = (self.sandbox.subscriber(&self.phone))
                    .is_some_and(|s| crate::http::otp::used_before(s, &code, now));
                let (outcome, sent) = self.sandbox.event(&self.phone, Event::OtpSubmitted(code));
                let answer = crate::http::otp::submitted(outcome, used, now);
                format!(
                    "[otp api: {}]\n{}",
                    api_answer(answer),
                    show(&sent, &self.phone)
                )
            }
            "hangup" | "silence" => "[no call in progress: /call first]\n".to_string(),
            "call" => {
                "[/call, or /call unattested for a caller ID its carrier did not vouch for]\n"
                    .to_string()
            }
            _ => format!("unknown command /{name}\n{HELP}"),
        })
    }

    /// A key (or silence) in the current call.
    fn press(&mut self, key: Option<&str>) -> String {
        let Some((menu, attempt)) = self.call.clone() else {
            return "[not in a call: /call first]\n".to_string();
        };
        let turn = crate::ivr::key_pressed(&self.sandbox.flows, &menu, attempt, key);
        self.voice(turn)
    }

    /// Prints a voice turn, running its action against the sandbox.
    fn voice(&mut self, turn: crate::ivr::Turn) -> String {
        use crate::flows::IvrAction;
        use crate::ivr::{Speech, Turn};
        let (speech, texts, next) = match turn {
            Turn::Ask { say, menu, attempt } => (say, String::new(), Some((menu, attempt))),
            Turn::End(say) => (say, String::new(), None),
            Turn::Act(action) => {
                let event = crate::ivr::action_event(&action);
                let (outcome, sent) = self.sandbox.event(&self.phone, event);
                // read_code speaks the code to a caller it may trust; everything else
                // arrives by text.
                let spoken = action == IvrAction::ReadCode
                    && self.sandbox.flows.ivr.reads_code_to(!self.unattested);
                let code = sent.iter().find_map(|s| s.code.clone()).filter(|_| spoken);
                let texted: Vec<Sent> = if spoken {
                    sent.into_iter().filter(|s| s.code.is_none()).collect()
                } else {
                    sent
                };
                let speech = crate::ivr::after_action(
                    &self.sandbox.flows,
                    &action,
                    outcome,
                    code.as_deref(),
                    self.sandbox.subscriber(&self.phone),
                );
                (speech, show(&texted, &self.phone), None)
            }
        };
        self.call = next.clone();
        let mut out: String = speech
            .iter()
            .map(|s| match s {
                Speech::Say(t) => format!("[voice] {t}\n"),
                Speech::Pause(n) => format!("[pause {n}s]\n"),
            })
            .collect();
        out.push_str(&texts);
        out.push_str(match next {
            Some(_) => "[press a key, /silence or /hangup]\n",
            None => "[call ended]\n",
        });
        out
    }

    fn state(&self) -> String {
        let Some(s) = self.sandbox.subscriber(&self.phone) else {
            return format!("{}: unverified (never seen)\n", self.phone);
        };
        let (seq, step) = s.sequence_step();
        let mut out = format!("{}: {}", s.phone, s.state.name());
        if let Some(seq) = seq {
            out.push_str(&format!(", sequence {seq}"));
        }
        if let Some(step) = step {
            out.push_str(&format!(" step {}", step + 1));
        }
        if let Some(t) = s.timer {
            out.push_str(&format!(", next timer {} at {}", t.kind.name(), t.at));
        }
        let flows = &self.sandbox.flows;
        if let Some((l, _)) = crate::machine::late_question(s, flows, self.sandbox.now) {
            let (seq, step, field, until) = (&l.sequence, l.step + 1, &l.field, l.until);
            out.push_str(&format!(
                ", late answer to {seq} step {step} ({field}) taken until {until}"
            ));
        }
        out.push('\n');
        for (k, v) in &s.fields {
            out.push_str(&format!("  {k} = {v}\n"));
        }
        out
    }
}

const HELP: &str = "Type a text message to send it. Commands:
  /wait 1d        advance the virtual clock and show what fired
  /state          show the subscriber
  /phone +1...    text from another number
  /call           phone the voice menu; then type a key (1, 2, …), /silence or /hangup
                  (/call unattested: a caller ID its carrier did not vouch for)
  /otp            request a code through the OTP API
  /validate CODE  submit a code through the OTP API
  /quit
";

/// The bot's messages; one to a number other than `to` (a timer of another number, after
/// `/phone` switched) names its number.
fn show(sent: &[Sent], to: &Phone) -> String {
    sent.iter()
        .map(|s| {
            let text = s.text.replace('\n', "\n  ");
            if s.phone == *to {
                format!("< {text}\n")
            } else {
                format!("< [to {}] {text}\n", s.phone)
            }
        })
        .collect()
}

/// The OTP API's answer in brief (see [`OtpError::summary`]).
fn api_answer(answer: Result<(), OtpError>) -> String {
    answer.map_or_else(|e| e.summary(), |()| "200, exit 0: success".to_string())
}

/// Resolves the configuration layers for `serve`.
pub fn serve_config(args: &ServeArgs) -> anyhow::Result<crate::config::Config> {
    use crate::config::Layer;
    let (path, required) = match &args.config {
        Some(path) => (path.as_path(), true),
        None => (Path::new("smsflow.toml"), false),
    };
    let file = Layer::from_file(path, required)?;
    let env = Layer::from_env(|k| std::env::var(k).ok())?;
    let flags = Layer {
        listen: args.listen.clone(),
        public_url: args.public_url.clone(),
        data: args.data.clone(),
        flows: args.flows.clone(),
        region: args.region.clone(),
        send_rate: args.send_rate,
        retention: args.retention.clone(),
        cache: args.cache.clone(),
        ..Layer::default()
    };
    // A bad value is named by where it came from: the file's place, the variable, the flag.
    crate::config::check_layers(&file, path, &env, &flags)?;
    flags.over(env.over(file)).resolve()
}

/// Logs go to stderr, filtered by SMSFLOW_LOG or RUST_LOG (default `info,notify=warn`).
pub fn init_logging(format: LogFormat) {
    use tracing_subscriber::filter::{filter_fn, FilterExt, LevelFilter};
    use tracing_subscriber::{prelude::*, EnvFilter};
    let mut ignored = Vec::new();
    let mut read = |name: &str| {
        // Blank is unset, as for every other variable.
        let f = std::env::var(name).ok().filter(|f| !f.trim().is_empty())?;
        let filter = match EnvFilter::try_new(&f) {
            Ok(filter) => filter,
            Err(e) => {
                ignored.push(format!(
                    "ignoring {name}={f:?}, which is not a log filter: {e}"
                ));
                return None;
            }
        };
        let unknown = unknown_log_targets(&f);
        let directives = f.split(',').filter(|d| !d.trim().is_empty()).count();
        if unknown.is_empty() {
            return Some(filter);
        }
        let names = unknown.join("`, `");
        let hint = "a level is one of error, warn, info, debug, trace, off";
        // Every line but the daemon's own would be hidden: a misspelt level, most likely.
        if unknown.len() == directives {
            ignored.push(format!(
                "ignoring {name}={f:?}: no log line comes from `{names}` ({hint}), so it \
                 would hide every line"
            ));
            return None;
        }
        ignored.push(format!(
            "{name}={f:?}: no log line comes from `{names}` ({hint})"
        ));
        Some(filter)
    };
    let filter = read("SMSFLOW_LOG")
        .or_else(|| read("RUST_LOG"))
        // `notify` tells at info what it tidies up after a watched directory is deleted.
        .unwrap_or_else(|| EnvFilter::new("info,notify=warn"));
    // The daemon's own lines, whatever the filter (a target and a level always parse).
    let filter = match format!("{DAEMON}=info").parse() {
        Ok(directive) => filter.add_directive(directive),
        Err(_) => filter,
    };
    // sled logs at trace the keys and values it reads and writes: whole numbers, answers,
    // live codes. notify logs at trace every change in the directory that holds the flows,
    // so a log written there would log its own writes for ever (30 MB a second). Neither is
    // shown, whatever the filter (their debug lines hold none of that).
    let no_trace = filter_fn(|m| {
        *m.level() != Level::TRACE || !NO_TRACE.iter().any(|t| m.target().starts_with(t))
    })
    // (Without a hint the filters together would have none, and every disabled `log`
    // line of a dependency would be built before being dropped.)
    .with_max_level_hint(LevelFilter::TRACE);
    let filter = filter.and(no_trace);
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let layer = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        // A log line that cannot be written (stderr closed: a `| tee` whose reader went, or
        // a full disk) is lost, not reported on that same stderr: `eprintln!` would panic,
        // and take the request or the worker that logged with it.
        .log_internal_errors(false);
    let layer = match format {
        LogFormat::Pretty => layer.with_filter(filter).boxed(),
        LogFormat::Json => layer.json().with_filter(filter).boxed(),
    };
    let _ = tracing_subscriber::registry().with(layer).try_init();
    for ignored in ignored {
        tell(format, Level::WARN, &ignored);
    }
}

/// The crates whose trace lines are never shown (see [`init_logging`]).
const NO_TRACE: [&str; 2] = ["sled", "notify"];

/// The crates whose log lines reach smsflow's log (its own and its dependencies'), as
/// prefixes: `hyper` stands for `hyper_util` too, `metrics` for its exporter.
const LOG_CRATES: &[&str] = &[
    "smsflow",
    "sled",
    "hyper",
    "reqwest",
    "rustls",
    "h2",
    "notify",
    "iana_time_zone",
    "axum",
    "tower",
    "tokio",
    "mio",
    "tracing",
    "metrics",
];

/// The targets a log filter names that no log line comes from: a directive that is not a
/// level (`warning` is not one) names a target, and shows only that target's lines.
fn unknown_log_targets(filter: &str) -> Vec<&str> {
    use tracing_subscriber::filter::LevelFilter;
    // Span fields (`target[span{a=1,b=2}]=debug`) may hold commas: not looked into.
    if filter.contains('{') {
        return Vec::new();
    }
    filter
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty() && d.parse::<LevelFilter>().is_err())
        .map(|d| {
            let target = d.split('=').next().unwrap_or(d);
            target.split('[').next().unwrap_or(target).trim()
        })
        // A directive's target matches the lines whose target starts with it, as text
        // (`sms` matches `smsflow::http`, `axum_core` lines of that crate).
        .filter(|t| {
            !t.is_empty()
                && !LOG_CRATES
                    .iter()
                    .any(|c| c.starts_with(t) || t.starts_with(c))
        })
        .collect()
}

/// A line the daemon says of itself on stderr (its start failed, it stopped, a setting was
/// ignored): plain text, or under `--log-format json` a log event like every other line
/// there (and filtered like them), so a log shipper reads them all.
fn tell(format: LogFormat, level: Level, text: &str) {
    match (format, level) {
        (LogFormat::Pretty, _) => errln!("smsflow: {text}"),
        (LogFormat::Json, Level::ERROR) => tracing::error!(target: DAEMON, "{text}"),
        (LogFormat::Json, Level::WARN) => tracing::warn!(target: DAEMON, "{text}"),
        (LogFormat::Json, _) => tracing::info!(target: DAEMON, "{text}"),
    }
}

/// The log target of the daemon's own lines ([`tell`]): shown whatever the filter, as they
/// are under `--log-format pretty` (a failed start must never be silent).
const DAEMON: &str = "smsflow::daemon";

pub fn serve(args: &ServeArgs) -> ExitCode {
    let format = args.log_format;
    init_logging(format);
    let config = match serve_config(args) {
        Ok(c) => c,
        Err(e) => {
            tell(format, Level::ERROR, &format!("configuration: {e:#}"));
            return ExitCode::from(EXIT_PROBLEMS);
        }
    };
    let runtime = match runtime(|why| tell(format, Level::ERROR, why)) {
        Ok(r) => r,
        Err(code) => return code,
    };
    let data_dir = config.data_dir.clone();
    runtime.block_on(async {
        // From before the socket is bound (a script may signal as soon as the port answers,
        // or on seeing the banner): a stop must stop the daemon cleanly, not kill it; and from
        // here on a second signal that lands while the first is being handled is counted, not
        // lost.
        let signals = count_signals();
        // SIGHUP's own listener starts with the reloader; till then one is ignored rather
        // than fatal (the start reads the flows itself).
        #[cfg(unix)]
        let _ = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup());
        let app = match crate::app::Application::build(config, crate::app::Options::default()).await
        {
            Ok(a) => a,
            // Flows that fail `check` are the operator's input, like `check` itself: exit 1.
            Err(e) => match e.downcast_ref::<flows::Problems>() {
                Some(problems) => {
                    tell(format, Level::ERROR, &format!("{e}:\n{problems}"));
                    return ExitCode::from(EXIT_PROBLEMS);
                }
                None => {
                    tell(format, Level::ERROR, &format!("{e:#}"));
                    return ExitCode::from(EXIT_RUNTIME);
                }
            },
        };
        // Not `print!`: a closed stdout must not stop the daemon from serving.
        say(&mut std::io::stdout(), &app.banner());
        // And a line in the log, which an operator may keep where stdout (the console
        // provider's messages) is not: a start, or a restart after a crash, shows there.
        tracing::info!("{}", app.started_line());
        if let Some((old, new)) = app.engine().store.upgraded_from() {
            let data = data_dir.display();
            let said = format!("data dir {data} upgraded from schema {old} to {new}: an older smsflow now refuses it");
            tell(format, Level::WARN, &said);
        }
        let shutdown = {
            let signals = signals.clone();
            async move {
                signals_reach(signals, 1).await;
                tracing::info!("shutting down: finishing in-flight requests");
            }
        };
        match app
            .run_until_stopped_or_hurried(shutdown, signals_reach(signals, 2))
            .await
        {
            Ok(()) => {
                tell(format, Level::INFO, "stopped cleanly");
                ExitCode::SUCCESS
            }
            Err(e) => {
                tell(format, Level::ERROR, &format!("{e:#}"));
                ExitCode::from(EXIT_RUNTIME)
            }
        }
    })
}

/// Writes `text` where a closed or full stream loses it instead of panicking (as `print!` and
/// `eprintln!` do): the daemon goes on, and its exit code still tells how it ended.
pub fn say(to: &mut impl std::io::Write, text: &str) {
    let _ = to.write_all(text.as_bytes()).and_then(|()| to.flush());
}

/// Counts SIGINT (Ctrl-C) and SIGTERM from now on: the first asks for a stop, a second for
/// a quick one.
fn count_signals() -> tokio::sync::watch::Receiver<u32> {
    let (count, counted) = tokio::sync::watch::channel(0u32);
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        // One that cannot be listened for is never heard (the other still is).
        let (mut int, mut term) = (
            signal(SignalKind::interrupt()).ok(),
            signal(SignalKind::terminate()).ok(),
        );
        tokio::spawn(async move {
            loop {
                let heard = async |s: &mut Option<tokio::signal::unix::Signal>| match s {
                    Some(s) => s.recv().await,
                    None => std::future::pending().await,
                };
                tokio::select! {
                    Some(()) = heard(&mut int) => {}
                    Some(()) = heard(&mut term) => {}
                    else => return,
                }
                count.send_modify(|n| *n += 1);
            }
        });
    }
    #[cfg(not(unix))]
    tokio::spawn(async move {
        while tokio::signal::ctrl_c().await.is_ok() {
            count.send_modify(|n| *n += 1);
        }
    });
    counted
}

/// Resolves once `n` signals have been counted (never, if counting stopped).
async fn signals_reach(mut counted: tokio::sync::watch::Receiver<u32>, n: u32) {
    if counted.wait_for(|k| *k >= n).await.is_err() {
        std::future::pending::<()>().await;
    }
}

pub fn bench(args: crate::bench::BenchArgs) -> ExitCode {
    let runtime = match runtime(|why| errln!("smsflow: {why}")) {
        Ok(r) => r,
        Err(code) => return code,
    };
    match runtime.block_on(crate::bench::run(args)) {
        Ok(report) => {
            say(&mut std::io::stdout().lock(), &report);
            ExitCode::SUCCESS
        }
        Err(e) => {
            errln!("smsflow bench: {e:#}");
            ExitCode::from(EXIT_RUNTIME)
        }
    }
}

/// Where `export` finds the data and flow dirs: the flags, then the environment, then the
/// config file (`./smsflow.toml` unless given), then the defaults (settings the export does
/// not use, such as Twilio's, are not looked at: one of them unfinished must not stop it).
fn export_dirs(
    config: Option<&Path>,
    data: Option<PathBuf>,
    flows: Option<PathBuf>,
) -> anyhow::Result<(PathBuf, PathBuf)> {
    use crate::config::Layer;
    let file = match config {
        Some(path) => Layer::from_file(path, true)?,
        None => Layer::from_file(Path::new("smsflow.toml"), false)?,
    };
    let flags = Layer {
        data,
        flows,
        ..Layer::default()
    };
    // As `serve` reads them (a blank variable is no value), and layered the same way.
    let env = Layer::dirs_from_env(|k| std::env::var(k).ok());
    Ok(flags.over(env).over(file).dirs())
}

/// `smsflow compact`: see [`crate::store::compact::compact`].
pub fn compact(config: Option<&Path>, data: Option<PathBuf>) -> ExitCode {
    let data = match export_dirs(config, data, None) {
        Ok((data, _)) => data,
        Err(e) => {
            errln!("smsflow compact: {e:#}");
            return ExitCode::from(EXIT_PROBLEMS);
        }
    };
    // No store there: nothing to compact (and opening would make one).
    if !data.join("db").is_file() {
        errln!(
            "smsflow compact: {} holds no smsflow data (no store in it); give the data dir the \
             daemon uses (--data, SMSFLOW_DATA or `data` in smsflow.toml)",
            data.display()
        );
        return ExitCode::from(EXIT_USAGE);
    }
    match crate::store::compact::compact(&data) {
        Ok(done) => {
            let mib = |b: u64| b as f64 / f64::from(1 << 20);
            let shown = std::fs::canonicalize(&data).unwrap_or(data);
            let report = match &done.old {
                Some(old) => format!(
                    "compacted {}: {} keys, {:.1} MiB before, {:.1} MiB now. The old store is \
                     kept at {}: remove it once the daemon runs well on this one.\n",
                    shown.display(),
                    done.keys,
                    mib(done.before),
                    mib(done.after),
                    old.display()
                ),
                None => format!(
                    "not compacted {}: a copy of its {} keys came to {:.1} MiB, not less than \
                     its {:.1} MiB; the store is as it was, and the copy is gone.\n",
                    shown.display(),
                    done.keys,
                    mib(done.after),
                    mib(done.before)
                ),
            };
            say(&mut std::io::stdout(), &report);
            for note in &done.notes {
                errln!("smsflow compact: but {note}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            if e.downcast_ref::<crate::store::DataDirInUse>().is_some() {
                errln!("smsflow compact: {e}: stop the daemon first (SIGTERM), then compact");
            } else {
                errln!("smsflow compact: {e:#}");
            }
            ExitCode::from(EXIT_RUNTIME)
        }
    }
}

pub fn export(
    config: Option<&Path>,
    data: Option<PathBuf>,
    flows: Option<PathBuf>,
    out: Option<&Path>,
    one_hot: bool,
) -> ExitCode {
    let (data, flows_dir) = match export_dirs(config, data, flows) {
        Ok(dirs) => dirs,
        Err(e) => {
            errln!("smsflow export: {e:#}");
            return ExitCode::from(EXIT_PROBLEMS);
        }
    };
    let (data, flows_dir) = (data.as_path(), flows_dir.as_path());
    if !data.exists() {
        errln!(
            "smsflow export: no data dir at {} (set --data, SMSFLOW_DATA or `data` in smsflow.toml)",
            data.display()
        );
        return ExitCode::from(EXIT_USAGE);
    }
    if !data.is_dir() {
        errln!(
            "smsflow export: {} is not a directory; give the data dir the daemon uses \
             (--data, SMSFLOW_DATA or `data` in smsflow.toml)",
            data.display()
        );
        return ExitCode::from(EXIT_USAGE);
    }
    // sled's own file: a directory without it holds no store, and opening it would make one
    // there (a typo such as `--data flows` would get sled's files and an empty dataset).
    // (One that cannot be looked into is not said to be empty: opening it says why.)
    let no_store = match std::fs::metadata(data.join("db")) {
        Ok(db) => !db.is_file(),
        Err(e) => e.kind() == std::io::ErrorKind::NotFound,
    };
    if no_store {
        errln!(
            "smsflow export: {} holds no smsflow data (no store in it); give the data dir the \
             daemon uses (--data, SMSFLOW_DATA or `data` in smsflow.toml)",
            data.display()
        );
        return ExitCode::from(EXIT_USAGE);
    }
    // After the data dir: run where there is neither, the one to name is the data.
    let flows = match flows_or_problems(flows_dir) {
        Ok(f) => f,
        Err(code) => {
            // (Not for flows that are there but have problems: those are listed above.)
            let no_flows = std::fs::read_dir(flows_dir).map_or(true, |entries| {
                !entries
                    .flatten()
                    .any(|e| e.path().extension().is_some_and(|x| x == "toml"))
            });
            if no_flows {
                errln!(
                    "smsflow export: the form's columns and answer labels come from the flows \
                     the daemon runs; give their directory (--flows DIR, SMSFLOW_FLOWS or \
                     `flows` in smsflow.toml)"
                );
            }
            return code;
        }
    };
    // A small page cache: the export reads every record once, memory must stay flat.
    let store = match crate::store::Store::open_with_cache(data, 8 << 20) {
        Ok(s) => s,
        Err(e) => {
            if e.downcast_ref::<crate::store::DataDirInUse>().is_some() {
                errln!("smsflow export: {e}.\n{}", held_hint(data, one_hot));
            } else {
                errln!("smsflow export: {e:#}");
            }
            return ExitCode::from(EXIT_RUNTIME);
        }
    };
    if let Some((old, new)) = store.upgraded_from() {
        errln!(
            "smsflow export: data dir {} upgraded from schema {old} to {new}: an older smsflow now refuses it",
            data.display()
        );
    }
    let opened_kib = crate::export::peak_rss_kib();
    let written = match out {
        // A new file is its owner's alone, as the data dir is: it holds every number and
        // answer. So is one that was there, if others could read it (a regular file only: a
        // device or a pipe is left as it is).
        Some(path) => std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(path)
            .and_then(|f| {
                let meta = f.metadata()?;
                if meta.is_file() && meta.permissions().mode() & 0o077 != 0 {
                    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
                }
                Ok(f)
            })
            .with_context(|| format!("creating {}", path.display()))
            .and_then(|f| {
                crate::export::write_csv(&store, &flows, one_hot, std::io::BufWriter::new(f))
                    .map_err(|e| {
                        // Not left looking like a whole export (a file only: `--out
                        // /dev/stdout` or a pipe is not removed).
                        let file = std::fs::symlink_metadata(path).is_ok_and(|m| m.is_file());
                        let gone = file && std::fs::remove_file(path).is_ok();
                        let note = if gone {
                            " (the partial file is removed)"
                        } else {
                            ""
                        };
                        e.context(format!("exporting to {}{note}", path.display()))
                    })
            }),
        None => crate::export::write_csv(&store, &flows, one_hot, std::io::stdout().lock())
            .context("exporting to standard output"),
    };
    match written {
        Ok(done) => {
            let peak = crate::export::peak_rss_kib().map_or("unknown".to_string(), |k| {
                format!("{:.1} MiB", k as f64 / 1024.0)
            });
            let at_open = opened_kib.map_or("unknown".to_string(), |k| {
                format!("{:.1} MiB", k as f64 / 1024.0)
            });
            errln!(
                "exported {} subscriber(s); peak memory {peak} (after opening the store: {at_open})",
                done.rows
            );
            if done.unreadable > 0 {
                errln!(
                    "left out {} record(s) that cannot be read (damaged, or from a newer smsflow); \
                     GET /admin/subscribers lists them by number, and DELETE erases one",
                    done.unreadable
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            errln!("smsflow export: {e:#}");
            ExitCode::from(EXIT_RUNTIME)
        }
    }
}

/// What to do when a running daemon holds `data`: download the dataset from its admin API,
/// in the way that API takes this machine's requests, as the daemon noted it at its start.
fn held_hint(data: &Path, one_hot: bool) -> String {
    use crate::app::{ApiAccess, DAEMON_ADMIN_FILE, DAEMON_URL_FILE};
    let noted = |file: &str| std::fs::read_to_string(data.join(file)).unwrap_or_default();
    let url = noted(DAEMON_URL_FILE);
    let url = Some(url.trim())
        .filter(|u| u.starts_with("http://") && !u.contains(char::is_whitespace))
        .map_or_else(configured_url, str::to_string);
    let admin = noted(DAEMON_ADMIN_FILE).parse::<ApiAccess>().ok();
    let endpoint = format!(
        "'{url}/admin/export.csv{}'",
        if one_hot { "?one_hot=1" } else { "" }
    );
    // The line works pasted as it is when this shell has the token; otherwise it shows
    // where the token goes (it is never printed).
    let token = match std::env::var("SMSFLOW_ADMIN_TOKEN") {
        Ok(t) if !t.trim().is_empty() => "$SMSFLOW_ADMIN_TOKEN",
        _ => "<its admin token>",
    };
    match admin {
        Some(ApiAccess::Off) => format!(
            "The running daemon holds it, and its admin API is off: it is reachable beyond this \
             machine and has no SMSFLOW_ADMIN_TOKEN. Stop it and run this again, or restart it \
             with a token and download the dataset:\n  \
             curl -H \"Authorization: Bearer {token}\" {endpoint}"
        ),
        Some(ApiAccess::Open) => format!(
            "The running daemon holds it: download the dataset from it instead (it has no admin \
             token and answers this machine):\n  curl {endpoint}"
        ),
        Some(ApiAccess::Token) => format!(
            "The running daemon holds it: download the dataset from it instead, with its admin \
             token (SMSFLOW_ADMIN_TOKEN or admin_token in its smsflow.toml):\n  \
             curl -H \"Authorization: Bearer {token}\" {endpoint}"
        ),
        // Noted by an older smsflow, or not at all.
        None => format!(
            "The running daemon holds it: download the dataset from it instead:\n  \
             curl -H \"Authorization: Bearer {token}\" {endpoint}\n\
             (its admin token, set by SMSFLOW_ADMIN_TOKEN or admin_token in its smsflow.toml; \
             with none set, leave out -H: it answers this machine)"
        ),
    }
}

/// Where a daemon would answer locally as `smsflow.toml` and the environment say.
fn configured_url() -> String {
    use crate::config::Layer;
    let listen = Layer::from_file(Path::new("smsflow.toml"), false)
        .and_then(|file| Ok(Layer::from_env(|k| std::env::var(k).ok())?.over(file)))
        .and_then(Layer::resolve)
        .map(|c| c.listen);
    listen.map_or_else(
        |_| "http://<the daemon's listen address>".to_string(),
        crate::app::local_url,
    )
}

/// The async runtime; `say` tells why it could not start.
fn runtime(say: impl FnOnce(&str)) -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            say(&format!("cannot start the runtime: {e}"));
            ExitCode::from(EXIT_RUNTIME)
        })
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_version_names_the_data_schema_the_store_writes() {
        let schema = format!("(data schema {})", crate::store::SCHEMA);
        assert!(super::VERSION.ends_with(&schema), "{}", super::VERSION);
    }
}
