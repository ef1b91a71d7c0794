//! The command line: `serve`, `check`, `test`, `simulate`.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::flows::{self, Flows};
use crate::machine::{Event, Outcome};
use crate::phone::Phone;
use crate::sim::{default_start, Sandbox, Sent};
use crate::transcript;

#[derive(Parser, Debug)]
#[command(
    name = "smsflow",
    version,
    about = "Runs SMS conversations for Twilio numbers, declared in TOML flows"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
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

/// Exit code for "the input (flows, transcripts) has problems".
pub const EXIT_PROBLEMS: u8 = 1;
/// Exit code for "could not even start" (bad arguments, unreadable files).
pub const EXIT_USAGE: u8 = 2;

pub fn check(dir: &Path) -> ExitCode {
    match flows::load_dir(dir) {
        Ok(f) => {
            println!("ok: {} ({})", dir.display(), f.summary());
            ExitCode::SUCCESS
        }
        Err(problems) => {
            eprintln!("{problems}");
            eprintln!("{} problem(s) in {}", problems.0.len(), dir.display());
            ExitCode::from(EXIT_PROBLEMS)
        }
    }
}

pub fn test(dir: &Path) -> ExitCode {
    let flows = match flows::load_dir(dir) {
        Ok(f) => f,
        Err(problems) => {
            eprintln!("{problems}");
            return ExitCode::from(EXIT_PROBLEMS);
        }
    };
    let tests = dir.join("tests");
    let report = match transcript::run_dir(&flows, &tests) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    for p in &report.passed {
        println!("ok   {}", p.display());
    }
    for f in &report.failures {
        println!("FAIL {f}");
    }
    println!(
        "{} passed, {} failed",
        report.passed.len(),
        report.failures.len()
    );
    if report.failures.is_empty() && !report.passed.is_empty() {
        ExitCode::SUCCESS
    } else {
        if report.passed.is_empty() && report.failures.is_empty() {
            eprintln!("no transcripts in {}", tests.display());
        }
        ExitCode::from(EXIT_PROBLEMS)
    }
}

pub fn simulate(dir: &Path, phone: &str, seed: u64) -> ExitCode {
    let flows = match flows::load_dir(dir) {
        Ok(f) => f,
        Err(problems) => {
            eprintln!("{problems}");
            return ExitCode::from(EXIT_PROBLEMS);
        }
    };
    let phone = match Phone::parse(phone) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("--phone: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let stdin = std::io::stdin();
    let mut out = std::io::stdout();
    let mut repl = Repl {
        sandbox: Sandbox::new(flows, default_start(), seed),
        phone,
    };
    let _ = writeln!(
        out,
        "smsflow simulator: {} — texting as {} at {}. Type a message, or /help.",
        repl.sandbox.flows.bot.name, repl.phone, repl.sandbox.now
    );
    for line in stdin.lock().lines() {
        let Ok(line) = line else { break };
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
}

impl Repl {
    pub fn command(&mut self, line: &str) -> Option<String> {
        if line.is_empty() {
            return Some(String::new());
        }
        let Some(cmd) = line.strip_prefix('/') else {
            let sent = self.sandbox.text(&self.phone, line);
            return Some(show(&sent));
        };
        let (name, arg) = cmd.split_once(' ').unwrap_or((cmd, ""));
        let arg = arg.trim();
        Some(match name {
            "quit" | "exit" => return None,
            "help" => HELP.to_string(),
            "wait" => match transcript::parse_delay(arg) {
                Ok(d) => {
                    let sent = self.sandbox.advance(d);
                    format!("[clock is now {}]\n{}", self.sandbox.now, show(&sent))
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
            "otp" => {
                let (outcome, sent) = self.sandbox.event(&self.phone, Event::OtpRequested);
                format!("[otp api: {}]\n{}", outcome_name(outcome), show(&sent))
            }
            "validate" => {
                let (outcome, sent) = self
                    .sandbox
                    .event(&self.phone, Event::OtpSubmitted(arg.to_string()));
                format!("[otp api: {}]\n{}", outcome_name(outcome), show(&sent))
            }
            _ => format!("unknown command /{name}\n{HELP}"),
        })
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
            out.push_str(&format!(", next timer {:?} at {}", t.kind, t.at));
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
  /otp            request a code through the OTP API
  /validate CODE  submit a code through the OTP API
  /quit
";

fn show(sent: &[Sent]) -> String {
    sent.iter()
        .map(|s| format!("< {}\n", s.text.replace('\n', "\n  ")))
        .collect()
}

fn outcome_name(o: Outcome) -> String {
    match o {
        Outcome::RateLimited { retry_at } => format!("rate limited until {retry_at}"),
        other => format!("{other:?}").to_lowercase(),
    }
}

/// Loads flows or prints every problem; used by commands that need a valid set.
pub fn load_or_report(dir: &Path) -> Option<Flows> {
    flows::load_dir(dir).map_err(|p| eprintln!("{p}")).ok()
}
