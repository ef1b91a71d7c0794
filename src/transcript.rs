//! Conversation transcripts (`flows/tests/*.txt`) run against the engine with a virtual clock.
//!
//! ```text
//! # a comment
//! ! seed 3                      seed the RNG (forces which sequence is drawn)
//! ! at 2026-01-05T15:00:00Z     set the virtual clock
//! ! phone +15550001111          who is texting from now on
//! > JOIN                        the user texts
//! < Your code is {$code}.       the bot answers; {$name} captures, {*} matches anything
//! > {$code}                     captured values can be sent back
//! ~ 1d                          advance the clock, firing due timers
//! ? state in_sequence           assert the state, `? sequence NAME`, `? field KEY = VALUE`
//! ```
//! Every message the bot sends must be matched by a `<` line, in order, before the next
//! `>` or `~`: a transcript that expects nothing asserts that nothing was sent.

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};

use chrono::{DateTime, TimeDelta, Utc};

use crate::flows::Flows;
use crate::phone::Phone;
use crate::sim::{default_start, Sandbox, Sent};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub file: PathBuf,
    pub line: usize,
    pub message: String,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.line {
            // The file as a whole (nothing to run in it). (One that could not be read is told
            // at its line 1, as a flow file is, or at its first byte that is not UTF-8.)
            0 => write!(f, "{}: {}", self.file.display(), self.message),
            line => write!(f, "{}:{line}: {}", self.file.display(), self.message),
        }
    }
}

/// The result of running a directory of transcripts.
#[derive(Debug, Default)]
pub struct Report {
    pub passed: Vec<PathBuf>,
    pub failures: Vec<Failure>,
}

/// Runs every `*.txt` in `dir` (sorted by name).
pub fn run_dir(flows: &Flows, dir: &Path) -> Result<Report, String> {
    let entries = std::fs::read_dir(dir)
        .map_err(|e| format!("{}: cannot read transcripts: {e}", dir.display()))?;
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "txt"))
        // A hidden file is no transcript: an editor's lock (`.#name.txt`), macOS's `._name.txt`.
        .filter(|p| (p.file_name()).is_some_and(|n| !n.to_string_lossy().starts_with('.')))
        .collect();
    paths.sort();
    let mut report = Report::default();
    for path in paths {
        // One file that cannot be read (not UTF-8, say) fails itself, not the whole run.
        let text = match crate::read_text_file(&path) {
            Ok(t) => t,
            Err((line, _, message)) => {
                report.failures.push(fail(&path, line, message));
                continue;
            }
        };
        match run(flows, &path, &text) {
            Ok(()) => report.passed.push(path),
            Err(f) => report.failures.push(f),
        }
    }
    Ok(report)
}

/// Runs one transcript; the first mismatch is the failure.
pub fn run(flows: &Flows, file: &Path, text: &str) -> Result<(), Failure> {
    let mut t = Runner {
        sandbox: Sandbox::new(flows.clone(), default_start(), 0),
        phone: Phone::parse("+15550001111").map_err(|e| fail(file, 0, e.to_string()))?,
        pending: VecDeque::new(),
        vars: BTreeMap::new(),
        pending_from: 0,
        last_expected: 0,
    };
    let mut ran = false;
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let raw = raw.trim_end();
        // A file saved with a byte-order mark starts with one; it is not part of the line.
        let trimmed = raw.trim_start_matches('\u{feff}').trim_start();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        // The first character is the tag (a line may start with any character).
        let first = trimmed.chars().next().map_or(0, char::len_utf8);
        let (tag, rest) = trimmed.split_at(first);
        let rest = rest.strip_prefix(' ').unwrap_or(rest);
        if tag == ">" || tag == "~" || (tag == "!" && rest.starts_with("at ")) {
            // What the previous command sent must all have been expected.
            t.drained().map_err(|(at, m)| fail(file, at, m))?;
        }
        t.line(line, tag, rest).map_err(|m| fail(file, line, m))?;
        ran |= tag == ">";
    }
    if !ran {
        // It would pass, and so vouch for nothing.
        return Err(fail(
            file,
            0,
            "nothing to run: a transcript needs at least one `> text` the number sends (and \
             the `< text` the bot answers)"
                .to_string(),
        ));
    }
    t.drained().map_err(|(line, m)| fail(file, line, m))
}

fn fail(file: &Path, line: usize, message: String) -> Failure {
    Failure {
        file: file.to_path_buf(),
        line,
        message,
    }
}

struct Runner {
    sandbox: Sandbox,
    phone: Phone,
    pending: VecDeque<Sent>,
    /// Line of the command whose messages are pending, for "unexpected message" errors.
    pending_from: usize,
    /// The last `<` line that matched one of those messages (0: none yet).
    last_expected: usize,
    vars: BTreeMap<String, String>,
}

/// Where a plain expected line (no `{…}`) first differs from the actual text, naming both
/// characters by code point: a curly quote or a no-break space looks like its plain twin.
fn first_difference(expected: &str, actual: &str) -> String {
    if expected.contains('{') {
        return String::new();
    }
    let name = |c: Option<char>| match c {
        Some(c) => format!("{c:?} (U+{:04X})", u32::from(c)),
        None => "the end".to_string(),
    };
    let (mut e, mut a) = (expected.chars(), actual.chars());
    for n in 1.. {
        match (e.next(), a.next()) {
            (None, None) => break,
            (x, y) if x == y => {}
            (x, y) => {
                return format!(
                    "\n  first difference at character {n}: expected {}, actual {}",
                    name(x),
                    name(y)
                )
            }
        }
    }
    String::new()
}

impl Runner {
    fn line(&mut self, line: usize, tag: &str, rest: &str) -> Result<(), String> {
        match tag {
            ">" | "~" => {
                self.pending_from = line;
                self.last_expected = 0;
                let sent = if tag == ">" {
                    let text = self.substitute(rest)?;
                    self.sandbox.text(&self.phone, &text)
                } else {
                    self.sandbox.advance(parse_delay(rest)?)
                };
                self.pending = sent.into();
                Ok(())
            }
            "<" => {
                let Some(sent) = self.pending.pop_front() else {
                    return Err(format!("expected the bot to send {rest:?}, but it sent nothing more"));
                };
                let actual = shown(&sent.text);
                self.last_expected = line;
                if !self.matches(rest, &actual)? {
                    // In the texts themselves: a line break is one character.
                    let mut differs = first_difference(&unshown(rest), &sent.text);
                    if !rest.contains('{') && differs.is_empty() {
                        differs = "\n  (a backslash is written \\\\ in a transcript)".into();
                    }
                    return Err(format!(
                        "expected: {rest}{}\n  actual: {actual}{differs}",
                        self.bound_in(rest),
                    ));
                }
                // `<` is a message to the number the transcript is texting as (`! phone`).
                if sent.phone != self.phone {
                    return Err(format!(
                        "the message {actual:?} went to {}, not {} (switch with `! phone` to expect it)",
                        sent.phone, self.phone
                    ));
                }
                Ok(())
            }
            "!" => self.directive(line, rest),
            "?" => self.assertion(rest),
            other => Err(format!(
                "unknown line type {other:?} (use > text, < reply, ~ 1d, ! seed|at|phone, ? state|sequence|field, # comment)"
            )),
        }
    }

    /// Ok when every message sent so far was expected.
    fn drained(&mut self) -> Result<(), (usize, String)> {
        match self.pending.pop_front() {
            None => Ok(()),
            Some(s) => Err((
                self.pending_from,
                format!(
                    "unexpected message from the bot{}{}: {}",
                    if s.phone == self.phone {
                        String::new()
                    } else {
                        format!(" to {} (switch with `! phone` to expect it)", s.phone)
                    },
                    // Where the `<` line it wants goes: after the ones that matched.
                    match self.last_expected {
                        0 => String::new(),
                        n => format!(", after the replies expected up to line {n}"),
                    },
                    shown(&s.text)
                ),
            )),
        }
    }

    fn directive(&mut self, line: usize, rest: &str) -> Result<(), String> {
        let (name, value) = rest.split_once(' ').unwrap_or((rest, ""));
        let value = value.trim();
        match name {
            "seed" => {
                let seed = value
                    .parse()
                    .map_err(|_| format!("`! seed` needs a whole number, got {value:?}"))?;
                self.sandbox.reseed(seed);
            }
            "at" => {
                let at: DateTime<Utc> = value
                    .parse()
                    .map_err(|e| format!("`! at` needs a time like 2026-01-05T15:00:00Z: {e}"))?;
                if at < DateTime::UNIX_EPOCH || at > crate::sim::latest() {
                    return Err(format!(
                        "`! at` takes a time from 1970 up to 9999-12-31T23:59:59Z, not {}",
                        crate::clip(value)
                    ));
                }
                if at >= self.sandbox.now {
                    // As `~`: the timers due on the way fire, in order.
                    self.pending_from = line;
                    self.pending = self.sandbox.advance(at - self.sandbox.now).into();
                } else if self.sandbox.is_empty() {
                    self.sandbox.now = at;
                } else {
                    return Err(format!(
                        "`! at` cannot turn the clock back ({} is before {}) once a number has \
                         texted: set the start before the first `>` line",
                        at.to_rfc3339(),
                        self.sandbox.now.to_rfc3339()
                    ));
                }
            }
            "phone" => self.phone = Phone::parse(value).map_err(|e| e.to_string())?,
            other => return Err(format!("unknown directive `! {other}` (seed, at, phone)")),
        }
        Ok(())
    }

    fn assertion(&mut self, rest: &str) -> Result<(), String> {
        let sub = self.sandbox.subscriber(&self.phone);
        let (what, value) = rest.split_once(' ').unwrap_or((rest, ""));
        let value = value.trim();
        let actual = match what {
            "state" if !crate::machine::State::NAMES.contains(&value) => {
                return Err(format!(
                    "no state is called {value:?} (one of: {})",
                    crate::machine::State::NAMES.join(", ")
                ))
            }
            "state" => sub.map_or("unverified", |s| s.state.name()).to_string(),
            // A name the flows do not have is a typo, not a wrong draw.
            "sequence" if !value.is_empty() && self.sandbox.flows.sequence(value).is_none() => {
                let names: Vec<&str> = (self.sandbox.flows.sequences.iter())
                    .map(|s| s.name.as_str())
                    .collect();
                return Err(format!(
                    "no sequence is called {value:?} (the flows have: {})",
                    names.join(", ")
                ));
            }
            "sequence" => sub.and_then(|s| s.sequence.clone()).unwrap_or_default(),
            "field" => {
                let (key, expected) = value
                    .split_once('=')
                    .ok_or("`? field` is written `? field KEY = VALUE`")?;
                // Written as a message is (`\n`, `\\`).
                let (key, expected) = (key.trim(), unshown(expected.trim()));
                if !self.sandbox.flows.form.all_keys().any(|k| k == key) {
                    let keys: Vec<&str> = self.sandbox.flows.form.all_keys().collect();
                    return Err(format!(
                        "no field is called {key:?} (the flows have: {})",
                        keys.join(", ")
                    ));
                }
                let actual = sub
                    .and_then(|s| s.fields.get(key).cloned())
                    .unwrap_or_default();
                return if actual == expected {
                    Ok(())
                } else if actual.is_empty() {
                    Err(format!(
                        "expected field {key} = {expected:?}, actual: none saved"
                    ))
                } else {
                    Err(format!(
                        "expected field {key} = {expected:?}, actual {actual:?}"
                    ))
                };
            }
            other => {
                return Err(format!(
                    "unknown assertion `? {other}` (state, sequence, field)"
                ))
            }
        };
        if actual == value {
            Ok(())
        } else if actual.is_empty() {
            // (Only a sequence can be none: a number always has a state.)
            Err(format!("expected {what} {value:?}, actual: none"))
        } else {
            Err(format!("expected {what} {value:?}, actual {actual:?}"))
        }
    }

    /// The captures an expected line uses that were bound on earlier lines, with their
    /// values, for a failure message: ` (with {$code} = 123456)`.
    fn bound_in(&self, expected: &str) -> String {
        let mut bound: Vec<String> = Vec::new();
        let mut rest = expected;
        while let Some(start) = rest.find("{$") {
            let Some(end) = rest[start..].find('}').map(|e| e + start) else {
                break;
            };
            let name = &rest[start + 2..end];
            if let Some(v) = self.vars.get(name) {
                let said = format!("{{${name}}} = {v}");
                if !bound.contains(&said) {
                    bound.push(said);
                }
            }
            rest = &rest[end + 1..];
        }
        if bound.is_empty() {
            String::new()
        } else {
            format!(" (with {})", bound.join(", "))
        }
    }

    /// The text a `>` line sends: its `\n` and `\\` read as what they stand for, and its
    /// captures filled in.
    fn substitute(&self, text: &str) -> Result<String, String> {
        let mut out = String::new();
        let mut rest = text;
        while let Some(start) = rest.find("{$") {
            out.push_str(&unshown(&rest[..start]));
            let end = rest[start..].find('}').ok_or("unclosed {$name}")? + start;
            let name = &rest[start + 2..end];
            let value = self
                .vars
                .get(name)
                .ok_or(format!("{{${name}}} was never captured"))?;
            // Kept as the transcript writes it (`\n`): sent as the text it stands for.
            out.push_str(&unshown(value));
            rest = &rest[end + 1..];
        }
        out.push_str(&unshown(rest));
        Ok(out)
    }

    /// Matches `actual` against an expected line with `{$name}` captures and `{*}` wildcards.
    fn matches(&mut self, expected: &str, actual: &str) -> Result<bool, String> {
        let mut pattern = String::from("^");
        let mut names = Vec::new();
        let mut rest = expected;
        while let Some(start) = rest.find('{') {
            let end = match rest[start..].find('}') {
                Some(e) => e + start,
                // A capture or wildcard never closed is a typo, not text the bot sends.
                None if rest[start..].starts_with("{$") || rest[start..].starts_with("{*") => {
                    return Err(format!(
                        "{} is not closed: a capture is written {{$name}}, a wildcard {{*}}",
                        crate::clip(&rest[start..])
                    ))
                }
                None => break,
            };
            let inner = &rest[start + 1..end];
            let slot = if inner == "*" {
                Some(".*?".to_string())
            } else if let Some(name) = inner.strip_prefix('$') {
                // A name the regex crate takes for a group's (asked of it: its rule is its own).
                let named = !name.is_empty()
                    && !name.contains(['<', '>'])
                    && regex::Regex::new(&format!("(?P<{name}>x)")).is_ok();
                if !named {
                    return Err(format!(
                        "{{${name}}} cannot capture: a capture's name is letters, digits and _, \
                         not starting with a digit, as in {{$code}}"
                    ));
                }
                Some(match self.vars.get(name) {
                    Some(v) => regex::escape(v),
                    None => {
                        // Used again in the same line: its own group, which must then hold
                        // the same text (the regex crate has no back-references).
                        let again = names.iter().filter(|(_, n)| n == name).count();
                        let group = if again == 0 {
                            name.to_string()
                        } else {
                            format!("{name}__{again}")
                        };
                        let slot = format!("(?P<{group}>.+?)");
                        names.push((group, name.to_string()));
                        slot
                    }
                })
            } else {
                None
            };
            match slot {
                Some(s) => {
                    pattern.push_str(&regex::escape(&rest[..start]));
                    pattern.push_str(&s);
                }
                None => pattern.push_str(&regex::escape(&rest[..=end])),
            }
            rest = &rest[end + 1..];
        }
        pattern.push_str(&regex::escape(rest));
        pattern.push('$');
        let re = regex::Regex::new(&pattern)
            .map_err(|e| format!("bad capture in expected line: {e}"))?;
        let Some(caps) = re.captures(actual) else {
            return Ok(false);
        };
        let mut got: BTreeMap<String, &str> = BTreeMap::new();
        for (group, name) in names {
            if let Some(m) = caps.name(&group) {
                if *got.entry(name).or_insert(m.as_str()) != m.as_str() {
                    return Ok(false);
                }
            }
        }
        self.vars
            .extend(got.into_iter().map(|(k, v)| (k, v.to_string())));
        Ok(true)
    }
}

/// `~ 1d`, `~ 90m`, `~ 1h 30m`.
pub fn parse_delay(text: &str) -> Result<TimeDelta, String> {
    /// A century: far enough for any flow, and the virtual clock cannot overflow.
    const MAX: std::time::Duration = std::time::Duration::from_secs(100 * 366 * 86_400);
    let d = crate::parse_flow_duration(text)
        .map_err(|e| format!("bad duration {text:?}: {e} (write e.g. 30s, 10m, 1d)"))?;
    if d > MAX {
        return Err(format!(
            "duration {text:?} is over a century, the longest clock jump"
        ));
    }
    TimeDelta::from_std(d).map_err(|e| e.to_string())
}

/// A message as a transcript writes it: a line break as `\n`, so a backslash as `\\` (else a
/// text that says backslash-n, a flow's single-quoted TOML string, would pass for one with a
/// line break).
fn shown(text: &str) -> String {
    text.replace('\\', "\\\\").replace('\n', "\\n")
}

/// The text a transcript's `\n` and `\\` stand for (what [`shown`] wrote).
fn unshown(written: &str) -> String {
    let mut out = String::new();
    let mut chars = written.chars();
    while let Some(c) = chars.next() {
        match (c, chars.clone().next()) {
            ('\\', Some('n')) => {
                chars.next();
                out.push('\n');
            }
            ('\\', Some('\\')) => {
                chars.next();
                out.push('\\');
            }
            _ => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn what_shown_writes_unshown_reads_back() {
        for text in ["plain", "two\nlines", "C:\\new", "a\\\nb", "ends\\"] {
            assert_eq!(super::unshown(&super::shown(text)), text, "{text:?}");
        }
    }
}
