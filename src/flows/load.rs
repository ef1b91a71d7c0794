//! Reading `flows/*.toml` into a [`Flows`] set, reporting every problem as `file:line:col: message`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

use chrono::{NaiveTime, TimeDelta};
use serde::Deserialize;
use toml::Spanned;

use super::*;
use crate::machine::normalize;

/// `ivr.hidden_caller` when a flow set does not say it.
const HIDDEN_CALLER: &str =
    "Sorry, this line needs your caller ID. Please call again without hiding your number.";

/// `ivr.opted_out` when a flow set does not say it.
const IVR_OPTED_OUT: &str =
    "You're unsubscribed and will get no more messages. Text START to rejoin.";

/// `ivr.already_joined` when a flow set does not say it.
const IVR_ALREADY_JOINED: &str = "You're already signed up.";

/// One located problem in a flow set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub file: PathBuf,
    /// 1-based; 0 for a problem of the whole file or directory, not of one place in it.
    pub line: usize,
    pub col: usize,
    pub message: String,
}

/// `file:line:col: message`, or `file: message` for a problem of no one place (line 0: a
/// whole directory).
impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            return write!(f, "{}: {}", self.file.display(), self.message);
        }
        write!(
            f,
            "{}:{}:{}: {}",
            self.file.display(),
            self.line,
            self.col,
            self.message
        )
    }
}

/// Every problem found in one run, in file order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problems(pub Vec<Problem>);

impl fmt::Display for Problems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Problems {}

/// Loads every `*.toml` directly inside `dir` (sorted by name) as one set.
pub fn load_dir(dir: &Path) -> Result<Flows, Problems> {
    load_sources(read_dir(dir)?)
}

/// The `*.toml` files of a flow directory (symlinks followed), in name order, with their text.
pub fn read_dir(dir: &Path) -> Result<Vec<(PathBuf, String)>, Problems> {
    let whole_dir = |message: String| {
        Problems(vec![Problem {
            file: dir.to_path_buf(),
            line: 0,
            col: 0,
            message,
        }])
    };
    if dir.is_file() {
        return Err(whole_dir(
            "this is a file; give the directory that holds the flow files".into(),
        ));
    }
    let entries = std::fs::read_dir(dir)
        .map_err(|e| whole_dir(format!("cannot read flow directory: {e}")))?;
    // A hidden file is no flow file: Emacs keeps its lock as a dangling `.#name.toml` link,
    // macOS leaves `._name.toml` beside a file copied from its disks.
    let hidden = |p: &Path| {
        p.file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with('.'))
    };
    // A link to a flow file that is not there (yet), or a name that is no file (a FIFO, a
    // directory), is read like any file, and fails as one that cannot be read: skipping it
    // would load the set without it.
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "toml") && !hidden(p))
        .collect();
    paths.sort();
    if paths.is_empty() {
        return Err(whole_dir("no *.toml flow files here".into()));
    }
    let mut sources = Vec::new();
    // Every file that cannot be read is told at once (the rest are looked at once they can
    // all be read: without one, the others' cross-references would mislead).
    let mut unreadable = Vec::new();
    for path in paths {
        match crate::read_text_file(&path) {
            Ok(text) => sources.push((path, text)),
            Err((line, col, message)) => unreadable.push(Problem {
                file: path,
                line,
                col,
                message,
            }),
        }
    }
    if !unreadable.is_empty() {
        return Err(Problems(unreadable));
    }
    Ok(sources)
}

/// Loads a set from (file name, TOML text) pairs; names are only used in messages.
pub fn load_sources(sources: Vec<(PathBuf, String)>) -> Result<Flows, Problems> {
    let mut cx = Cx {
        sources,
        problems: Vec::new(),
        warnings: Vec::new(),
        clearable: Vec::new(),
        code_digits: 6,
        bot_name: String::new(),
        bot_name_at: None,
    };
    let mut files = Vec::new();
    let mut unread = Vec::new();
    for i in 0..cx.sources.len() {
        // An empty file is a mistake or a file caught mid-write (an editor truncates, then
        // writes): taken as a flow set, it would end every number's sequence. So is one of
        // comments alone (its header comment written, the rest not yet).
        let blank = |l: &str| l.trim().is_empty() || l.trim_start().starts_with('#');
        if cx.sources[i].1.lines().all(blank) {
            let what = if cx.sources[i].1.trim().is_empty() {
                "empty flow file"
            } else {
                "empty flow file (comments only)"
            };
            cx.err(
                i,
                0..0,
                format!(
                    "{what} (if it is being written, this passes once it is saved; to leave a \
                     file out, rename it so that its name does not end in .toml)"
                ),
            );
            continue;
        }
        // serde stops at the first unknown key; blank each one out (same length, so every
        // span still points into the original text) and read again, so one typo does not
        // hide the rest of the file's problems.
        let mut text = cx.sources[i].1.clone();
        for round in 0..=MAX_UNKNOWN_KEYS {
            if round == MAX_UNKNOWN_KEYS {
                let msg = format!(
                    "stopped after {MAX_UNKNOWN_KEYS} unknown keys; fix them and check again"
                );
                cx.err(i, 0..0, msg);
                unread.push(i);
                break;
            }
            match toml::from_str::<RawFile>(&text) {
                Ok(raw) => {
                    files.push((i, raw));
                    break;
                }
                Err(e) => {
                    let span = e.span().unwrap_or(0..0);
                    let mut msg = plain_words(&e.message().trim().replace('\n', " "));
                    if msg == "duplicate key" {
                        // The parser's words name neither the key nor what to do.
                        let key = text.get(span.clone()).unwrap_or_default();
                        // The line it is on: a table header (`[ivr.menu.main]`) or `key = …`.
                        let line_start = text
                            .get(..span.start)
                            .and_then(|before| before.rfind('\n'))
                            .map_or(0, |n| n + 1);
                        let line = text
                            .get(line_start..)
                            .and_then(|rest| rest.lines().next())
                            .unwrap_or_default()
                            .trim();
                        msg = if line.starts_with('[') {
                            let header = line.split('#').next().unwrap_or(line).trim_end();
                            format!(
                                "table {header} is already defined in this file; merge the two \
                                 (a list of tables, such as [[sequence]], is written with two \
                                 brackets every time)"
                            )
                        } else {
                            format!("key {key:?} is written twice in its table; keep one")
                        };
                    }
                    // `[form.extra_fields]` is a list of names, not of tables: the advice to
                    // write two brackets would not help. (`steps` and `field` are lists of
                    // tables, whose header is named with its two brackets.)
                    if msg.contains("a table given where a list of them is expected") {
                        let at = text.get(span.start..).unwrap_or_default();
                        let header = at.lines().next().unwrap_or_default().trim();
                        let name = (header.strip_prefix('['))
                            .filter(|h| !h.starts_with('['))
                            .and_then(|h| h.split(']').next())
                            .map(str::trim);
                        if let Some((table, key)) = name.and_then(|n| n.rsplit_once('.')) {
                            msg = if matches!(name, Some("form.field" | "sequence.steps")) {
                                format!(
                                    "[{table}.{key}] is one table, but {key} is a list of them: \
                                     write [[{table}.{key}]] (two brackets) before each"
                                )
                            } else {
                                format!(
                                    "[{table}.{key}] is a table, but {key} is a list of values: \
                                     under [{table}], write {key} = [\"…\", \"…\"]"
                                )
                            };
                        }
                    }
                    let unknown = msg.starts_with("unknown field");
                    cx.err(i, span.clone(), msg);
                    match unknown.then(|| without_key(&text, &span)).flatten() {
                        Some(rest) => text = rest,
                        None => {
                            unread.push(i);
                            break;
                        }
                    }
                }
            }
        }
    }
    let flows = cx.build(files);
    let held = cx.clearable.iter().filter(|c| **c).count();
    // In reading order: file by file (their names are sorted), line by line.
    let mut both: Vec<(Problem, bool)> = std::mem::take(&mut cx.problems)
        .into_iter()
        .zip(
            std::mem::take(&mut cx.clearable)
                .into_iter()
                .chain(std::iter::repeat(false)),
        )
        .collect();
    both.sort_by(|(a, _), (b, _)| (&a.file, a.line, a.col).cmp(&(&b.file, b.line, b.col)));
    (cx.problems, cx.clearable) = both.into_iter().unzip();
    if !unread.is_empty() && held > 0 {
        // A file that did not parse may declare what others name: those problems wait
        // until it parses, and one line says how many wait.
        let mut clearable = std::mem::take(&mut cx.clearable).into_iter();
        cx.problems
            .retain(|_| !clearable.next().unwrap_or_default());
        let names: Vec<String> = unread
            .iter()
            .map(|&i| cx.sources[i].0.display().to_string())
            .collect();
        let message = format!(
            "{} more problem(s) that a file that did not parse may clear (a field it declares, \
             a sequence's weight) are not shown; check again once {} parses",
            held,
            names.join(", ")
        );
        cx.err(unread[0], 0..0, message);
    }
    if cx.problems.is_empty() {
        cx.warnings
            .sort_by(|a, b| (&a.file, a.line, a.col).cmp(&(&b.file, b.line, b.col)));
        Ok(Flows {
            sources: cx.sources,
            warnings: cx.warnings,
            ..flows
        })
    } else {
        Err(Problems(cx.problems))
    }
}

/// serde's words for TOML's shapes, with what to write instead: its "sequence" is a list,
/// which reads oddly beside a flow's own `[[sequence]]`.
fn plain_words(msg: &str) -> String {
    if msg.contains("expected a sequence") {
        let kind = if msg.contains("invalid type: map") {
            "a table given where a list of them is expected: write [[…]] (two brackets), as in [[form.field]] or [[sequence]]"
        } else {
            "a list is expected here, such as [\"STOP2\"] or [\"A\", \"B\"]"
        };
        return format!("{msg} ({kind})");
    }
    // The names of the loader's own structs mean nothing in a flow file.
    let msg = match msg.find("expected struct Raw") {
        Some(at) if msg.contains("expected struct RawQuiet") => format!(
            "{}expected a table such as {{ from = \"21:00\", to = \"08:00\" }}",
            &msg[..at]
        ),
        Some(at) => format!("{}expected a table", &msg[..at]),
        None => msg.to_string(),
    };
    let msg = msg.replace("expected i64", "expected a whole number");
    if msg.starts_with("invalid type: string ")
        && (msg.contains("a whole number") || msg.contains("expected u"))
    {
        return format!("{msg} (a number is written without quotes, as in weight = 2)");
    }
    // A whole number past what any setting takes (TOML reads one past i64 as a u64 or a
    // 128-bit one).
    let huge = (msg.starts_with("invalid type: integer")
        && (msg.contains(" as i128") || msg.contains(" as u128")))
        || msg.starts_with("invalid value: integer");
    if huge && msg.contains("a whole number") {
        let number = msg.split('`').nth(1).unwrap_or("it");
        return format!("{number} is out of range: no setting takes a number this far from 0");
    }
    if msg.starts_with("invalid type: floating point") && msg.contains("a whole number") {
        return format!("{msg} (without a decimal point, as in code_length = 6)");
    }
    if msg.starts_with("invalid type: ") && msg.ends_with("expected a string") {
        return format!(
            "{msg} (written in quotes, as in ttl = \"10m\", timezone = \"Europe/Paris\" or \
             say = \"Hi\")"
        );
    }
    if msg.starts_with("missing escaped value") || msg.starts_with("invalid escape") {
        return format!(
            "{msg} (in double quotes a backslash starts an escape; write a pattern such as \
             '\\d{{5}}' in single quotes, which take it as it is)"
        );
    }
    if msg.starts_with("missing field") {
        return format!("{msg}, which this table needs (the rest of this file is not checked until it is there)");
    }
    msg
}

/// The zone a US time zone's abbreviation (`PST`, `est`) stands for, in any case.
fn us_zone_of(name: &str) -> Option<&'static str> {
    Some(match name.to_ascii_uppercase().as_str() {
        "EST" | "EDT" => "America/New_York",
        "CST" | "CDT" => "America/Chicago",
        "MST" | "MDT" => "America/Denver (America/Phoenix for Arizona)",
        "PST" | "PDT" => "America/Los_Angeles",
        "AKST" | "AKDT" => "America/Anchorage",
        "HST" => "Pacific/Honolulu",
        _ => return None,
    })
}

/// What is wrong with a pattern, on one line (the regex crate draws a caret under it on
/// lines of their own: a problem is one line).
fn regex_problem(e: &regex::Error) -> String {
    let text = e.to_string();
    text.lines()
        .rev()
        .find_map(|l| l.trim().strip_prefix("error: "))
        .map_or_else(|| text.replace('\n', " "), str::to_string)
}

/// Unknown keys reported per file before giving up on reading the rest of it.
const MAX_UNKNOWN_KEYS: usize = 50;

/// `text` with the key at `key` and its value (and a comma that separated it) replaced by
/// spaces, newlines kept; `None` when the key is not found or the result is not TOML.
fn without_key(text: &str, key: &Range<usize>) -> Option<String> {
    fn find(table: &toml::de::DeTable, key: &Range<usize>) -> Option<Range<usize>> {
        table.iter().find_map(|(k, v)| {
            if k.span() == *key {
                return Some(k.span().start..v.span().end);
            }
            find_in(v.get_ref(), key)
        })
    }
    fn find_in(value: &toml::de::DeValue, key: &Range<usize>) -> Option<Range<usize>> {
        match value {
            toml::de::DeValue::Table(t) => find(t, key),
            toml::de::DeValue::Array(a) => a.iter().find_map(|v| find_in(v.get_ref(), key)),
            _ => None,
        }
    }
    let line_start = text.get(..key.start)?.rfind('\n').map_or(0, |n| n + 1);
    // Byte for byte, so the length (and every later span) stays the same; `None` unless the
    // rest still parses.
    let blank = |cut: Range<usize>| {
        let blanked: String = text[cut.clone()]
            .bytes()
            .map(|b| if b == b'\n' { '\n' } else { ' ' })
            .collect();
        let mut out = String::with_capacity(text.len());
        out.push_str(&text[..cut.start]);
        out.push_str(&blanked);
        out.push_str(&text[cut.end..]);
        let parses = toml::de::DeTable::parse(&out).is_ok();
        parses.then_some(out)
    };
    if text[line_start..].trim_start().starts_with('[') {
        // A table's name in its header (`[bott]`, `[bot.extra]`, `[[sequnce]]`): the whole
        // table goes, up to the next header: the first line starting with `[` after which
        // the rest parses (one inside a multi-line string or array is no header).
        let body = text[key.end..]
            .find('\n')
            .map_or(text.len(), |n| key.end + n + 1);
        let mut ends = Vec::new();
        let mut at = body;
        for line in text[body..].split_inclusive('\n') {
            if line.trim_start().starts_with('[') {
                ends.push(at);
            }
            at += line.len();
        }
        ends.push(text.len());
        return ends.into_iter().find_map(|end| blank(line_start..end));
    }
    let doc = toml::de::DeTable::parse(text).ok()?;
    let mut cut = find(doc.get_ref(), key)?;
    // The comma after it (inline tables, arrays), else the one before it.
    let after = text[cut.end..].len() - text[cut.end..].trim_start().len();
    if text[cut.end + after..].starts_with(',') {
        cut.end += after + 1;
    } else {
        let before = text[..cut.start].trim_end();
        if before.ends_with(',') {
            cut.start = before.len() - 1;
        }
    }
    blank(cut)
}

type S<T> = Spanned<T>;
type Text = Option<S<String>>;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawFile {
    bot: Option<S<RawBot>>,
    keywords: Option<S<RawKeywords>>,
    verify: Option<S<RawVerify>>,
    form: Option<S<RawForm>>,
    #[serde(default)]
    sequence: Vec<S<RawSequence>>,
    replies: Option<S<RawReplies>>,
    ivr: Option<S<RawIvr>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBot {
    name: Text,
    timezone: Text,
    quiet_hours: Option<S<RawQuiet>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawQuiet {
    from: S<String>,
    to: S<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKeywords {
    opt_in: Option<Vec<S<String>>>,
    opt_out: Option<Vec<S<String>>>,
    help: Option<Vec<S<String>>>,
    edit: Option<Vec<S<String>>>,
    keep: Option<Vec<S<String>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVerify {
    code_length: Option<S<i64>>,
    ttl: Text,
    valid_codes: Option<S<i64>>,
    max_attempts: Option<S<i64>>,
    max_sends: Option<S<i64>>,
    send_window: Text,
    max_codes_per_hour: Option<S<i64>>,
    after_otp_api: Text,
    send: Text,
    api_send: Text,
    api_code_texted: Text,
    wrong: Text,
    not_a_code: Text,
    expired: Text,
    locked: Text,
    rate_limited: Text,
    busy: Text,
    verified: Text,
    welcome_back: Text,
    voice: Text,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawForm {
    #[serde(default)]
    field: Vec<S<RawField>>,
    #[serde(default)]
    extra_fields: Vec<S<String>>,
    current: Text,
    saved: Text,
    done: Text,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawField {
    key: S<String>,
    ask: S<String>,
    expect: Option<S<toml::Value>>,
    retry: Text,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSequence {
    name: S<String>,
    weight: Option<S<i64>>,
    #[serde(default)]
    steps: Vec<S<RawStep>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStep {
    after: Text,
    say: Text,
    ask: Text,
    save: Text,
    expect: Option<S<toml::Value>>,
    timeout: Text,
    retry: Text,
    thanks: Text,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawReplies {
    help: Text,
    opted_out: Text,
    unknown: Text,
    not_joined: Text,
    already_joined: Text,
    stop_hint: Text,
    late_answer: Text,
    answered: Text,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIvr {
    start: Text,
    retries: Option<S<i64>>,
    reprompt: Text,
    goodbye: Text,
    read_code: Text,
    texted: Text,
    opted_out: Text,
    already_joined: Text,
    hidden_caller: Text,
    read_code_callers: Text,
    #[serde(default)]
    menu: BTreeMap<String, S<RawMenu>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMenu {
    say: S<String>,
    #[serde(default)]
    press: BTreeMap<String, S<String>>,
}

/// Carrier conventions; operator lists add to these, never remove them.
const OPT_OUT: &[&str] = &[
    "STOP",
    "STOPALL",
    "UNSUBSCRIBE",
    "CANCEL",
    "END",
    "QUIT",
    "OPTOUT",
    "REVOKE",
];
const OPT_IN: &[&str] = &["START", "UNSTOP", "JOIN"];
const HELP: &[&str] = &["HELP", "INFO"];
const EDIT: &[&str] = &["EDIT"];
const KEEP: &[&str] = &["KEEP", "KEEP IT"];

/// The longest duration a flow may use (it keeps time arithmetic far from overflow).
const MAX_DAYS: i64 = 366;

/// Twilio's limit for the inline TwiML of a call it is asked to place.
const MAX_CALL_TWIML: usize = 4000;

/// How answers are compared with choices and keywords (see `machine::normalize`).
const READ_AS: &str =
    "answers are read without case, spaces and punctuation, and with any script's digits as 0-9";

/// Twilio's limit for one message body, counted as the machine counts it when sending.
const MAX_TEXT: usize = crate::machine::MAX_BODY;

struct Cx {
    sources: Vec<(PathBuf, String)>,
    problems: Vec<Problem>,
    /// What passes but is seldom meant (see [`Flows::warnings`]).
    warnings: Vec<Problem>,
    /// For each of `problems`, whether a declaration in another file would clear it (an
    /// undeclared field, zero total weight): while a file does not parse, such a problem may
    /// be its absence speaking.
    clearable: Vec<bool>,
    /// How many digits a `{code}` fills (`verify.code_length`), and the bot's name, for the
    /// length check (both are read before the texts that may hold them).
    code_digits: usize,
    bot_name: String,
    /// Where `bot.name` was given: a default text holding it is too long because of it.
    bot_name_at: Option<(usize, Range<usize>)>,
}

impl Cx {
    /// `message`, located at the start of `span` in file `file`.
    fn located(&self, file: usize, span: Range<usize>, message: String) -> Problem {
        let (path, text) = &self.sources[file];
        let (line, col) = crate::line_col(text, span.start);
        Problem {
            file: path.clone(),
            line,
            col,
            message,
        }
    }

    fn err(&mut self, file: usize, span: Range<usize>, message: impl Into<String>) {
        let problem = self.located(file, span, message.into());
        self.problems.push(problem);
        self.clearable.push(false);
    }

    /// A warning: what passes `check` but is seldom meant, located as a problem is.
    fn warn(&mut self, file: usize, span: Range<usize>, message: impl Into<String>) {
        let warning = self.located(file, span, format!("warning: {}", message.into()));
        self.warnings.push(warning);
    }

    /// Where, in the text at `span`, placeholder `name` is first written (`{name}`, or with
    /// spaces inside its braces); the whole text when it cannot be found as written (an
    /// escape inside it).
    fn placeholder_at(&self, f: usize, span: Range<usize>, name: &str) -> Range<usize> {
        let raw = self.sources[f].1.get(span.clone()).unwrap_or_default();
        // (Not `{{`, a brace written as itself.)
        let escaped = |at: usize| raw[..at].ends_with('{') || raw[at + 1..].starts_with('{');
        let found = (raw.match_indices('{'))
            .filter(|(at, _)| !escaped(*at))
            .find(|(at, _)| {
                let inside = raw[at + 1..].trim_start().strip_prefix(name);
                inside.is_some_and(|rest| rest.trim_start().starts_with('}'))
            })
            .map(|(at, _)| span.start + at);
        found.map_or(span, |at| at..at + 1)
    }

    /// [`Cx::err`] for a problem that a declaration in another file would clear.
    fn err_unless_declared_elsewhere(
        &mut self,
        file: usize,
        span: Range<usize>,
        message: impl Into<String>,
    ) {
        self.err(file, span, message);
        if let Some(last) = self.clearable.last_mut() {
            *last = true;
        }
    }

    fn place(&self, file: usize, span: &Range<usize>) -> String {
        let (path, text) = &self.sources[file];
        let (line, col) = crate::line_col(text, span.start);
        format!("{}:{line}:{col}", path.display())
    }

    /// A section that may appear in only one file of the set.
    fn single<T>(&mut self, name: &str, found: Vec<(usize, S<T>)>) -> Option<(usize, T)> {
        let mut found = found.into_iter();
        let (file, first) = found.next()?;
        let first_at = self.place(file, &first.span());
        for (other, dup) in found {
            self.err(
                other,
                dup.span(),
                format!("{name} is already defined at {first_at}"),
            );
        }
        Some((file, first.into_inner()))
    }

    fn build(&mut self, files: Vec<(usize, RawFile)>) -> Flows {
        let mut bots = Vec::new();
        let mut keywords = Vec::new();
        let mut verifies = Vec::new();
        let mut forms = Vec::new();
        let mut sequences = Vec::new();
        let mut replies = Vec::new();
        let mut ivrs = Vec::new();
        for (i, f) in files {
            bots.extend(f.bot.map(|x| (i, x)));
            keywords.extend(f.keywords.map(|x| (i, x)));
            verifies.extend(f.verify.map(|x| (i, x)));
            forms.extend(f.form.map(|x| (i, x)));
            sequences.extend(f.sequence.into_iter().map(|x| (i, x)));
            replies.extend(f.replies.map(|x| (i, x)));
            ivrs.extend(f.ivr.map(|x| (i, x)));
        }
        let bot = self.single("[bot]", bots);
        let keywords = self.single("[keywords]", keywords);
        let verify = self.single("[verify]", verifies);
        let replies = self.single("[replies]", replies);
        // Where [ivr] is, to point at it when it has no menus.
        let ivr_span = ivrs.first().map_or(0..0, |(_, x)| x.span());
        let ivr = self.single("[ivr]", ivrs);

        let bot = self.bot(bot);
        self.bot_name = bot.name.clone();
        let keywords = self.keywords(keywords);
        let form = self.form(forms, &keywords);
        let fields: Vec<String> = form.all_keys().map(str::to_string).collect();
        // The form's own fields: answered before any sequence begins.
        let asked: Vec<String> = form.fields.iter().map(|x| x.key.clone()).collect();
        let verify = self.verify(verify, &fields, &asked);
        let sequences = self.sequences(sequences, &fields, &asked, &keywords);
        let replies = self.replies(replies, &fields, &asked);
        let ivr = self.ivr(ivr, &fields, ivr_span);
        Flows {
            bot,
            keywords,
            verify,
            form,
            sequences,
            replies,
            ivr,
            sources: Vec::new(),
            warnings: Vec::new(),
        }
    }

    fn bot(&mut self, raw: Option<(usize, RawBot)>) -> Bot {
        let mut bot = Bot {
            name: "smsflow".into(),
            timezone: chrono_tz::UTC,
            quiet_hours: None,
        };
        let Some((f, raw)) = raw else { return bot };
        if let Some(name) = raw.name {
            if name.get_ref().trim().is_empty() {
                self.err(f, name.span(), "empty text: bot.name");
            }
            self.bot_name_at = Some((f, name.span()));
            bot.name = name.into_inner().trim().to_string();
        }
        if let Some(tz) = raw.timezone {
            let name = tz.get_ref().trim();
            match name.parse::<Tz>() {
                // Fixed offsets all year that read as US regions' names: quiet hours would
                // be an hour off through the summer.
                Ok(Tz::EST | Tz::MST) => self.err(
                    f,
                    tz.span(),
                    format!(
                        "timezone {name:?} is a fixed offset all year, with no daylight saving: \
                         for the region's local time write {} (or Etc/GMT+{} if a fixed offset \
                         is meant)",
                        us_zone_of(name).unwrap_or_default(),
                        if name == "EST" { 5 } else { 7 }
                    ),
                ),
                Ok(t) => bot.timezone = t,
                Err(_) => {
                    let case_aside = (chrono_tz::TZ_VARIANTS.iter())
                        .find(|t| t.name().eq_ignore_ascii_case(name));
                    let hint = match (us_zone_of(name), case_aside) {
                        (Some(zone), _) => format!(
                            "a zone's abbreviation: for the region's local time write {zone}"
                        ),
                        (None, Some(t)) => {
                            format!("did you mean {}? names are case-sensitive", t.name())
                        }
                        (None, None) => "use an IANA name such as America/New_York".to_string(),
                    };
                    self.err(
                        f,
                        tz.span(),
                        format!("unknown timezone {:?} ({hint})", tz.get_ref()),
                    )
                }
            }
        }
        if let Some(q) = raw.quiet_hours {
            let q = q.into_inner();
            let from = self.clock_time(f, &q.from);
            let to = self.clock_time(f, &q.to);
            if let (Some(from), Some(to)) = (from, to) {
                if from == to {
                    self.err(
                        f,
                        q.from.span(),
                        "malformed quiet_hours: `from` and `to` are the same time",
                    );
                } else {
                    bot.quiet_hours = Some(QuietHours { from, to });
                }
            }
        }
        bot
    }

    fn clock_time(&mut self, f: usize, raw: &S<String>) -> Option<NaiveTime> {
        let parsed = NaiveTime::parse_from_str(raw.get_ref().trim(), "%H:%M");
        if parsed.is_err() {
            self.err(
                f,
                raw.span(),
                format!(
                    "malformed quiet_hours time {:?} (expected HH:MM, e.g. 21:00)",
                    raw.get_ref()
                ),
            );
        }
        parsed.ok()
    }

    fn keywords(&mut self, raw: Option<(usize, RawKeywords)>) -> Keywords {
        let (f, raw) = match raw {
            Some((f, r)) => (f, Some(r)),
            None => (0, None),
        };
        // Each keyword's list, and where the flow wrote it (a built-in one has no place).
        let mut seen: HashMap<String, (&'static str, Option<std::ops::Range<usize>>)> =
            HashMap::new();
        let mut list = |cx: &mut Cx,
                        name: &'static str,
                        defaults: &[&str],
                        extra: Option<Vec<S<String>>>| {
            let mut out: Vec<String> = Vec::new();
            let extra = extra.unwrap_or_default();
            let items = defaults
                .iter()
                .map(|d| (None, d.to_string()))
                .chain(extra.into_iter().map(|s| (Some(s.span()), s.into_inner())));
            for (written, word) in items {
                let norm = normalize(&word);
                let span = written.clone().unwrap_or(0..0);
                if norm.is_empty() {
                    let why = if word.trim().is_empty() {
                        format!("empty keyword in keywords.{name}")
                    } else {
                        format!(
                                "keyword {word:?} in keywords.{name} has no letters or digits; \
                                 replies are matched without spaces and punctuation, so it could never match"
                            )
                    };
                    cx.err(f, span, why);
                    continue;
                }
                match seen.get(&norm) {
                    Some((other, there)) if *other != name => {
                        // A built-in word clashing with one the flow added: point at that,
                        // and say which is built in (it is not in the file).
                        let built_in =
                            |at: &Option<_>| if at.is_none() { " (built in)" } else { "" };
                        let (a, b) = (built_in(there), built_in(&written));
                        let lists = format!("keywords.{other}{a} and keywords.{name}{b}");
                        let why = format!("keyword {norm:?} is both in {lists}");
                        let span = written.or_else(|| there.clone()).unwrap_or(0..0);
                        cx.err(f, span, why);
                    }
                    Some(_) => {}
                    None => {
                        seen.insert(norm.clone(), (name, written));
                        out.push(norm);
                    }
                }
            }
            out
        };
        let (oo, hp, oi, ed, kp) = match raw {
            Some(r) => (r.opt_out, r.help, r.opt_in, r.edit, r.keep),
            None => (None, None, None, None, None),
        };
        let opt_out = list(self, "opt_out", OPT_OUT, oo);
        let help = list(self, "help", HELP, hp);
        let opt_in = list(self, "opt_in", OPT_IN, oi);
        let edit = list(self, "edit", EDIT, ed);
        let keep = list(self, "keep", KEEP, kp);
        Keywords {
            opt_in,
            opt_out,
            help,
            edit,
            keep,
        }
    }

    /// One of a few words: absent is the first option; any other word is a problem naming
    /// the options (and reads as the first).
    fn choice<T: Copy>(&mut self, f: usize, raw: Text, what: &str, options: &[(&str, T)]) -> T {
        let first = options[0].1;
        let Some(s) = raw else { return first };
        let word = s.get_ref().trim();
        if let Some((_, v)) = options.iter().find(|(name, _)| *name == word) {
            return *v;
        }
        let names: Vec<String> = options.iter().map(|(n, _)| format!("{n:?}")).collect();
        self.err(
            f,
            s.span(),
            format!("{what} is {word:?}, expected {}", names.join(" or ")),
        );
        first
    }

    /// A message text: present texts are checked, absent ones take `default`.
    fn text(
        &mut self,
        f: usize,
        raw: Text,
        what: &str,
        default: &str,
        allowed: Allowed<'_>,
    ) -> Template {
        match raw {
            None => {
                let t = fixed(default);
                let sent = self.sent_units(&t, allowed);
                if sent > MAX_TEXT {
                    self.blame_bot_name(
                        what,
                        format!("{sent} characters, over the {MAX_TEXT} of a text"),
                    );
                }
                t
            }
            Some(s) => self.checked_text(f, &s, what, allowed),
        }
    }

    /// A default text (`what`, not set) made too long by the bot's name alone, which is
    /// what the problem points at.
    fn blame_bot_name(&mut self, what: &str, too_long: String) {
        if let Some((f, span)) = self.bot_name_at.clone() {
            self.err(
                f,
                span,
                format!(
                    "bot.name is {} characters, which makes the default {what} {too_long}: \
                     shorten bot.name, or set {what}",
                    self.bot_name.chars().count()
                ),
            );
        }
    }

    /// How long `t` can be as sent, in UTF-16 units: a code fills `{code}` with its digits
    /// (read out one by one where spoken), `{bot.name}` is the bot's name, and an answer or
    /// the sequence's name counts as the most of it a text keeps when it would be too long
    /// (the machine shortens each to that before it cuts the text's end, a code included).
    fn sent_units(&self, t: &Template, allowed: Allowed<'_>) -> usize {
        self.as_sent(t, allowed).encode_utf16().count()
    }

    /// `t` filled in as [`Cx::sent_units`] measures it.
    fn as_sent(&self, t: &Template, allowed: Allowed<'_>) -> String {
        let code = || "0".repeat(self.code_digits);
        t.render(|slot| {
            Some(match slot {
                "code" if allowed.code && allowed.spoken => crate::ivr::spell(&code()),
                "code" if allowed.code => code(),
                "bot.name" => self.bot_name.clone(),
                _ => "x".repeat(crate::machine::SHORTENED + 1),
            })
        })
    }

    /// What [`Cx::sent_units`] counted `t`'s placeholders as, for a message.
    fn measured_as(&self, t: &Template, allowed: Allowed<'_>) -> String {
        let mut why = String::new();
        if allowed.code && t.slots().any(|n| n == "code") {
            why += &format!("; a {{code}} is its {} digits", self.code_digits);
            if allowed.spoken {
                why += ", read out one by one";
            }
        }
        if t.slots().any(|n| n == "bot.name") {
            why += "; {bot.name} is the bot's name";
        }
        if t.slots().any(|n| n != "code" && n != "bot.name") {
            why += &format!(
                "; an answer or a sequence's name counts {} characters, the most of it a text \
                 too long keeps",
                crate::machine::SHORTENED + 1
            );
        }
        why
    }

    /// A question goes out with its retry, as one message, when an answer is refused (and,
    /// for a form field while editing, with `form.current` too): that must fit as well.
    fn check_joined(
        &mut self,
        f: usize,
        span: Range<usize>,
        what: &str,
        parts: &[(&Template, Allowed<'_>)],
    ) {
        let each: Vec<usize> = parts.iter().map(|(t, a)| self.sent_units(t, *a)).collect();
        // One too long alone is told once, as that text.
        if each.iter().any(|&n| n > MAX_TEXT) {
            return;
        }
        let units = each.iter().sum::<usize>() + parts.len().saturating_sub(1);
        if units > MAX_TEXT {
            let with = if parts.len() > 2 {
                " (and form.current)"
            } else {
                ""
            };
            self.err(
                f,
                span,
                format!(
                    "{what}: its retry and question{with} go out as one message when an answer \
                     is refused, {units} characters as Twilio counts them (placeholders at their \
                     longest), over its {MAX_TEXT}"
                ),
            );
        }
    }

    /// Whether `t` fits in one text, its placeholders at their longest.
    fn check_length(
        &mut self,
        f: usize,
        span: Range<usize>,
        what: &str,
        t: &Template,
        allowed: Allowed<'_>,
    ) {
        if self.sent_units(t, allowed) > MAX_TEXT {
            let why = self.measured_as(t, allowed);
            self.err(f, span, too_long(what, &why));
        }
    }

    fn checked_text(
        &mut self,
        f: usize,
        s: &S<String>,
        what: &str,
        allowed: Allowed<'_>,
    ) -> Template {
        let src = s.get_ref();
        if src.trim().is_empty() {
            self.err(f, s.span(), format!("empty text: {what}"));
        }
        let parsed = Template::parse(src);
        match &parsed {
            Ok(t) => self.check_length(f, s.span(), what, t, allowed),
            // A text whose braces do not parse is measured as written.
            Err(_) if src.encode_utf16().count() > MAX_TEXT => {
                self.err(f, s.span(), too_long(what, ""));
            }
            Err(_) => {}
        }
        match parsed {
            Ok(t) => {
                for (name, msg, undeclared) in t.unknown(allowed) {
                    let msg = format!("{what}: {msg}");
                    let at = self.placeholder_at(f, s.span(), name);
                    if undeclared {
                        self.err_unless_declared_elsewhere(f, at, msg);
                    } else {
                        self.err(f, at, msg);
                    }
                }
                for key in t.maybe_unfilled(allowed) {
                    let at = self.placeholder_at(f, s.span(), &format!("field.{key}"));
                    self.warn(
                        f,
                        at,
                        format!(
                            "{what}: {{field.{key}}} may have no answer yet when this is sent, \
                             and then shows as nothing"
                        ),
                    );
                }
                // The texts that may name the code are the ones that carry it: without it
                // they would send (or read) no code, and no one could ever verify.
                if allowed.code && !t.slots().any(|n| n == "code") {
                    self.err(
                        f,
                        s.span(),
                        format!("{what} must contain {{code}}: without it no one can ever verify"),
                    );
                }
                t
            }
            Err(e) => {
                self.err(f, s.span(), format!("{what}: {e}"));
                fixed("")
            }
        }
    }

    /// A duration from "0s" up to a year; `positive` ones must be at least a second.
    fn duration(&mut self, f: usize, raw: &S<String>, what: &str) -> Option<TimeDelta> {
        self.bounded_duration(f, raw, what, false)
    }

    fn positive_duration(&mut self, f: usize, raw: &S<String>, what: &str) -> Option<TimeDelta> {
        self.bounded_duration(f, raw, what, true)
    }

    fn bounded_duration(
        &mut self,
        f: usize,
        raw: &S<String>,
        what: &str,
        positive: bool,
    ) -> Option<TimeDelta> {
        let parsed = crate::parse_flow_duration(raw.get_ref())
            .and_then(|d| TimeDelta::from_std(d).map_err(|e| e.to_string()))
            .and_then(|d| {
                if d > TimeDelta::days(MAX_DAYS) {
                    Err(format!("longer than {MAX_DAYS} days"))
                } else if positive && d < TimeDelta::seconds(1) {
                    // Less is over before anyone could read the text and answer it.
                    Err("must be at least 1s".to_string())
                } else {
                    Ok(d)
                }
            });
        match parsed {
            Ok(d) => Some(d),
            Err(e) => {
                self.err(
                    f,
                    raw.span(),
                    format!(
                        "bad duration {:?} for {what}: {e} (write e.g. 30s, 10m, 2h, 1d)",
                        raw.get_ref()
                    ),
                );
                None
            }
        }
    }

    fn number(
        &mut self,
        f: usize,
        raw: Option<S<i64>>,
        what: &str,
        range: Range<i64>,
        default: i64,
    ) -> i64 {
        let Some(raw) = raw else { return default };
        let v = *raw.get_ref();
        if !range.contains(&v) {
            self.err(
                f,
                raw.span(),
                format!(
                    "{what} is {v}, must be from {} to {}",
                    range.start,
                    range.end - 1
                ),
            );
            return default;
        }
        v
    }

    /// `asked`: the form's fields, all answered when `welcome_back` is sent.
    fn verify(
        &mut self,
        raw: Option<(usize, RawVerify)>,
        fields: &[String],
        asked: &[String],
    ) -> Verify {
        let (f, r) = match raw {
            Some((f, r)) => (f, r),
            None => (0, RawVerify::empty()),
        };
        let plain = Allowed {
            code: false,
            current: false,
            fields,
            spoken: false,
            // Sent before any answer (a code, its refusals, the welcome).
            filled: Some(&[]),
        };
        let with_code = Allowed {
            code: true,
            ..plain
        };
        let ttl = r
            .ttl
            .as_ref()
            .and_then(|d| self.positive_duration(f, d, "verify.ttl"))
            .unwrap_or(TimeDelta::minutes(10));
        let send_window = r
            .send_window
            .as_ref()
            .and_then(|d| self.positive_duration(f, d, "verify.send_window"))
            .unwrap_or(TimeDelta::hours(1));
        let after_otp_api = self.choice(
            f,
            r.after_otp_api,
            "verify.after_otp_api",
            &[("stay", AfterOtpApi::Stay), ("form", AfterOtpApi::Form)],
        );
        let code_length = self.number(f, r.code_length, "verify.code_length", 4..11, 6) as u8;
        self.code_digits = usize::from(code_length);
        Verify {
            code_length,
            ttl,
            valid_codes: self.number(f, r.valid_codes, "verify.valid_codes", 1..11, 2) as u8,
            max_attempts: self.number(f, r.max_attempts, "verify.max_attempts", 1..101, 5) as u8,
            max_sends: self.number(f, r.max_sends, "verify.max_sends", 1..1001, 5) as u32,
            send_window,
            max_codes_per_hour: r.max_codes_per_hour.is_some().then(|| {
                let most = "verify.max_codes_per_hour";
                self.number(f, r.max_codes_per_hour, most, 1..1_000_001, 1_000_000) as u32
            }),
            after_otp_api,
            send: self.text(
                f,
                r.send,
                "verify.send",
                "{bot.name}: your code is {code}. Reply with it to confirm.",
                with_code,
            ),
            api_send: r
                .api_send
                .map(|s| self.checked_text(f, &s, "verify.api_send", with_code)),
            api_code_texted: self.text(
                f,
                r.api_code_texted,
                "verify.api_code_texted",
                "Please enter that code in the app that asked for it.",
                plain,
            ),
            wrong: self.text(
                f,
                r.wrong,
                "verify.wrong",
                "That code didn't match. Reply with the latest code, or JOIN for a new one.",
                plain,
            ),
            not_a_code: self.text(
                f,
                r.not_a_code,
                "verify.not_a_code",
                "Please reply with the code we texted you, or JOIN for a new one.",
                plain,
            ),
            expired: self.text(
                f,
                r.expired,
                "verify.expired",
                "That code has expired. Reply JOIN for a new one.",
                plain,
            ),
            locked: self.text(
                f,
                r.locked,
                "verify.locked",
                "Too many wrong tries. Reply JOIN for a new code.",
                plain,
            ),
            rate_limited: self.text(
                f,
                r.rate_limited,
                "verify.rate_limited",
                "Too many codes requested. Please try again later.",
                plain,
            ),
            busy: self.text(
                f,
                r.busy,
                "verify.busy",
                "We're sending too many codes right now. Please try again in a little while.",
                plain,
            ),
            verified: self.text(f, r.verified, "verify.verified", "You're verified!", plain),
            welcome_back: r.welcome_back.map(|s| {
                // Sent to a number that has answered the whole form.
                let back = Allowed {
                    filled: Some(asked),
                    ..plain
                };
                self.checked_text(f, &s, "verify.welcome_back", back)
            }),
            voice: self.voice_code(f, r.voice, with_code),
        }
    }

    /// `verify.voice`: also within Twilio's 4,000 characters for a call's inline TwiML, as
    /// the OTP API places the call (read out twice, escaped).
    fn voice_code(&mut self, f: usize, raw: Text, with_code: Allowed<'_>) -> Template {
        let span = raw.as_ref().map(|s| s.span());
        let spoken = Allowed {
            spoken: true,
            ..with_code
        };
        let voice = self.text(
            f,
            raw,
            "verify.voice",
            "Your {bot.name} code is {code}.",
            spoken,
        );
        let call = crate::twiml::read_twice(&self.as_sent(&voice, spoken))
            .chars()
            .count();
        if call > MAX_CALL_TWIML {
            let over = format!(
                "{call} characters of TwiML (read out twice, with & < > ' \" written as 4 to 6 \
                 characters each), over Twilio's {MAX_CALL_TWIML} for a call's instructions"
            );
            match span {
                Some(span) => self.err(f, span, format!("verify.voice makes a call of {over}")),
                None => self.blame_bot_name("verify.voice", format!("a call of {over}")),
            }
        }
        voice
    }

    fn form(&mut self, raw: Vec<(usize, S<RawForm>)>, keywords: &Keywords) -> Form {
        let mut raw_fields = Vec::new();
        let mut extras = Vec::new();
        let mut currents = Vec::new();
        let mut saveds = Vec::new();
        let mut dones = Vec::new();
        for (f, form) in raw {
            let span = form.span();
            let form = form.into_inner();
            raw_fields.extend(form.field.into_iter().map(|x| (f, x)));
            extras.extend(form.extra_fields.into_iter().map(|x| (f, x)));
            currents.extend(form.current.map(|c| (f, S::new(span.clone(), c))));
            saveds.extend(form.saved.map(|c| (f, S::new(span.clone(), c))));
            dones.extend(form.done.map(|c| (f, S::new(span.clone(), c))));
        }
        let current = self.single("form.current", currents);
        let saved = self.single("form.saved", saveds);
        let done = self.single("form.done", dones);

        let mut keys: Vec<String> = Vec::new();
        let mut seen: BTreeMap<String, String> = BTreeMap::new();
        let mut declare = |cx: &mut Cx, f: usize, key: &S<String>| {
            let k = key.get_ref().trim().to_string();
            if !valid_key(&k) {
                cx.err(
                    f,
                    key.span(),
                    format!(
                        "field key {k:?} must start with a letter a-z, then a-z, 0-9 or _ \
                         (e.g. first_name)"
                    ),
                );
            } else if crate::export::COLUMNS.contains(&k.as_str()) {
                // Two columns of one name in the dataset: a spreadsheet or a script would
                // take one for the other.
                cx.err(
                    f,
                    key.span(),
                    format!(
                        "field key {k:?} is already a column of the dataset export ({}); name it otherwise (e.g. home_{k})",
                        crate::export::COLUMNS.join(", ")
                    ),
                );
            }
            if let Some(first) = seen.get(&k) {
                cx.err(
                    f,
                    key.span(),
                    format!("duplicate field name {k:?} (first declared at {first})"),
                );
                false
            } else {
                seen.insert(k.clone(), cx.place(f, &key.span()));
                keys.push(k);
                true
            }
        };
        let mut declared_fields = Vec::new();
        for (f, field) in raw_fields {
            let field = field.into_inner();
            if declare(self, f, &field.key) {
                declared_fields.push((f, field));
            }
        }
        let mut extra_fields = Vec::new();
        for (f, key) in extras {
            if declare(self, f, &key) {
                extra_fields.push(key.into_inner().trim().to_string());
            }
        }
        let plain = Allowed {
            code: false,
            current: false,
            fields: &keys,
            spoken: false,
            filled: None,
        };
        let mut fields = Vec::new();
        let mut asked_at = Vec::new();
        // The form's fields in the order asked: each question knows the answers before it.
        let in_order: Vec<String> = (declared_fields.iter())
            .map(|(_, raw)| raw.key.get_ref().trim().to_string())
            .collect();
        for (i, (f, raw)) in declared_fields.into_iter().enumerate() {
            let key = raw.key.get_ref().trim().to_string();
            asked_at.push((f, raw.ask.span()));
            let before = Allowed {
                filled: Some(&in_order[..i]),
                ..plain
            };
            let ask = self.checked_text(f, &raw.ask, &format!("form field {key:?} ask"), before);
            let expect = self.expect(f, raw.expect, keywords, Asker::Form);
            let retry = self.text(
                f,
                raw.retry,
                &format!("form field {key:?} retry"),
                "Sorry, I didn't understand that.",
                before,
            );
            fields.push(Field {
                key,
                ask,
                expect,
                retry,
            });
        }
        // Sent once the first pass is through (editing, or at its end).
        let answered = Allowed {
            filled: Some(&in_order),
            ..plain
        };
        let with_current = Allowed {
            current: true,
            ..answered
        };
        let current = match current {
            Some((f, s)) => self.checked_text(f, &s, "form.current", with_current),
            None => fixed("(now: {current}; reply KEEP to keep it)"),
        };
        // Refused while editing, an answer gets retry, question and the saved answer at once.
        for (field, (f, span)) in fields.iter().zip(asked_at) {
            let parts = [
                (&field.retry, plain),
                (&field.ask, plain),
                (&current, with_current),
            ];
            self.check_joined(f, span, &format!("form field {:?}", field.key), &parts);
        }
        let saved = match saved {
            Some((f, s)) => self.checked_text(f, &s, "form.saved", answered),
            None => fixed("Your profile is updated."),
        };
        let done = match done {
            Some((f, s)) => self.checked_text(f, &s, "form.done", answered),
            None => fixed("Thanks, you're all set."),
        };
        Form {
            fields,
            extra_fields,
            current,
            saved,
            done,
        }
    }

    fn expect(
        &mut self,
        f: usize,
        raw: Option<S<toml::Value>>,
        keywords: &Keywords,
        asker: Asker,
    ) -> Expect {
        let Some(raw) = raw else { return Expect::Any };
        let span = raw.span();
        let bad = |cx: &mut Cx, msg: &str| {
            cx.err(
                f,
                span.clone(),
                format!("{msg} (expect is \"any\", {{ choices = {{ A = \"label\", … }} }}, {{ range = [1, 5] }} or {{ pattern = '\\d{{5}}' }})"),
            );
            Expect::Any
        };
        match raw.into_inner() {
            toml::Value::String(s) if s.trim() == "any" => Expect::Any,
            toml::Value::Table(t) if t.len() == 1 => {
                let Some((kind, value)) = t.into_iter().next() else {
                    return bad(self, "empty expect");
                };
                match (kind.as_str(), value) {
                    ("choices", toml::Value::Table(choices)) => {
                        self.choices(f, &span, choices, keywords, asker)
                    }
                    ("range", toml::Value::Array(a)) => match a.as_slice() {
                        [toml::Value::Integer(lo), toml::Value::Integer(hi)] if lo <= hi => {
                            // Keywords are matched first: a number in the range that is one
                            // (`help = ["1"]`) could never be the answer.
                            let taken = [
                                ("opt_out", &keywords.opt_out),
                                ("help", &keywords.help),
                                ("opt_in", &keywords.opt_in),
                                ("edit", &keywords.edit),
                                ("keep", &keywords.keep),
                            ]
                            .into_iter()
                            .filter(|(list, _)| *list != "keep" || asker == Asker::Form)
                            .flat_map(|(list, words)| words.iter().map(move |w| (list, w)))
                            .find(|(_, w)| {
                                // (An answer's minus sign goes with its punctuation: `-1` is
                                // read as the keyword 1 too.)
                                w.parse::<i64>().is_ok_and(|n| {
                                    (*lo..=*hi).contains(&n) || (*lo..=*hi).contains(&-n)
                                })
                            });
                            if let Some((list, word)) = taken {
                                self.err(
                                    f,
                                    span.clone(),
                                    format!(
                                        "range [{lo}, {hi}] holds {word}, which is a keyword \
                                         (keywords.{list}), so no one could answer with it"
                                    ),
                                );
                            }
                            Expect::Range(*lo, *hi)
                        }
                        _ => bad(self, "range must be two whole numbers, low first"),
                    },
                    // An answer is never empty: an empty pattern could never be met.
                    ("pattern", toml::Value::String(p)) if p.is_empty() => {
                        bad(self, "empty pattern: no answer could ever match it")
                    }
                    ("pattern", toml::Value::String(p)) => {
                        // The author's pattern first, for an error in their own words.
                        match regex::Regex::new(&p)
                            .and_then(|_| regex::Regex::new(&format!("^(?:{p})$")))
                        {
                            Ok(re) => Expect::Pattern(re),
                            Err(e) => {
                                bad(self, &format!("bad pattern {p:?}: {}", regex_problem(&e)))
                            }
                        }
                    }
                    (other, _) => bad(self, &format!("unknown or malformed expect `{other}`")),
                }
            }
            _ => bad(self, "malformed expect"),
        }
    }

    fn choices(
        &mut self,
        f: usize,
        span: &Range<usize>,
        choices: toml::Table,
        keywords: &Keywords,
        asker: Asker,
    ) -> Expect {
        // KEEP is a keyword only while a form answer is edited; a sequence question may use it.
        let keyword = |word: &str| {
            keywords
                .list_of(word)
                .filter(|list| *list != "keep" || asker == Asker::Form)
        };
        if choices.is_empty() {
            self.err(f, span.clone(), "choices is empty");
        }
        let mut out = Vec::new();
        let mut seen: BTreeMap<String, String> = BTreeMap::new();
        for (key, label) in choices {
            let norm = normalize(&key);
            let label = match label {
                toml::Value::String(s) if !s.trim().is_empty() => s.trim().to_string(),
                toml::Value::String(_) => {
                    self.err(
                        f,
                        span.clone(),
                        format!("choice {key:?} needs a non-empty text label"),
                    );
                    continue;
                }
                other => {
                    self.err(
                        f,
                        span.clone(),
                        format!(
                            "choice {key:?} has {other} as its label: a label is text, in \
                             quotes ({key} = \"{}\")",
                            other.to_string().trim_matches('"')
                        ),
                    );
                    continue;
                }
            };
            if norm.is_empty() {
                self.err(
                    f,
                    span.clone(),
                    format!("choice key {key:?} has no letters or digits"),
                );
            }
            if let Some(list) = keyword(&norm) {
                self.err(
                    f,
                    span.clone(),
                    format!(
                        "choice key {key:?} collides with the keyword {norm} (keywords.{list}, built in or added)"
                    ),
                );
            }
            // A label is accepted as an answer too, but keywords are matched first: a label
            // that is one could never be given (and "info" would get the HELP text).
            let label_norm = normalize(&label);
            if let Some(list) = keyword(&label_norm) {
                self.err(
                    f,
                    span.clone(),
                    format!(
                        "choice {key:?} has the label {label:?}, which is the keyword \
                         {label_norm} in keywords.{list}, so no one could answer with it"
                    ),
                );
            } else if crate::machine::asks_to_stop(&key) && crate::machine::asks_to_stop(&label) {
                // A reply with the word is taken as asking to stop, and gets the hint: with
                // it in both the key and the label, no reply could give this choice.
                self.err(
                    f,
                    span.clone(),
                    format!(
                        "choice {key:?} = {label:?} has the word stop or unsubscribe in both \
                         its key and its label: a reply with that word is read as asking to \
                         stop, so no one could answer with it (give it a key such as A)"
                    ),
                );
            }
            // "X to cancel" beside `X = "cancel it"`: who replies with the first words alone
            // is taken at the keyword (opted out, for CANCEL), not given the choice. Words as
            // keywords read them: `cancel_appointment` starts with CANCEL, `opt out of
            // reminders` with OPTOUT.
            let label_words: Vec<&str> = (label.split(|c: char| !c.is_alphanumeric()))
                .filter(|w| !w.is_empty())
                .collect();
            let starts_with = (1..label_words.len())
                .map(|n| normalize(&label_words[..n].concat()))
                .find_map(|w| keyword(&w).map(|list| (w, list)));
            if let Some((word, list)) = starts_with {
                self.warn(
                    f,
                    span.clone(),
                    format!(
                        "choice {key:?} has the label {label:?}, which starts with the keyword \
                         {word} (keywords.{list}): a reply of that word alone is taken as the \
                         keyword{}, not as this choice; word the label (and the question) \
                         without it",
                        if list == "opt_out" {
                            " and opts the number out"
                        } else {
                            ""
                        }
                    ),
                );
            }
            if let Some(first) = seen.get(&norm) {
                self.err(
                    f,
                    span.clone(),
                    format!("choice key {key:?} reads the same as key {first:?} ({READ_AS})"),
                );
            } else {
                seen.insert(norm, key.clone());
            }
            out.push((key, label));
        }
        // Labels are answers too, read with case, spaces and punctuation ignored: a label that reads
        // as another choice's key or label would be taken for that choice ("2+" is key "2").
        for (i, (key, label)) in out.iter().enumerate() {
            let read = normalize(label);
            if read.is_empty() {
                continue;
            }
            for (other_key, _) in out[..i].iter().chain(&out[i + 1..]) {
                if read == normalize(other_key) {
                    self.err(
                        f,
                        span.clone(),
                        format!(
                            "choice {key:?} has the label {label:?}, which reads as {other_key:?}, \
                             the key of another choice ({READ_AS}), so that answer could be \
                             stored as the wrong choice"
                        ),
                    );
                }
            }
            for (other_key, other_label) in &out[..i] {
                if read == normalize(other_label) {
                    self.err(
                        f,
                        span.clone(),
                        format!(
                            "choices {other_key:?} and {key:?} have labels that read the same \
                             ({other_label:?} and {label:?}; {READ_AS}), so an answer could be \
                             stored as the wrong one"
                        ),
                    );
                }
            }
        }
        Expect::Choices(out)
    }

    /// `asked`: the form's fields, answered before a sequence begins.
    fn sequences(
        &mut self,
        raw: Vec<(usize, S<RawSequence>)>,
        fields: &[String],
        asked: &[String],
        keywords: &Keywords,
    ) -> Vec<Sequence> {
        let plain = Allowed {
            code: false,
            current: false,
            fields,
            spoken: false,
            filled: None,
        };
        let mut out = Vec::new();
        let mut names: BTreeMap<String, (usize, Range<usize>)> = BTreeMap::new();
        let mut first = None;
        for (f, seq) in raw {
            let seq_span = seq.span();
            first.get_or_insert((f, seq_span.clone()));
            let seq = seq.into_inner();
            let name = seq.name.get_ref().trim().to_string();
            if name.is_empty() {
                self.err(f, seq.name.span(), "empty sequence name");
            }
            // (Placed only when told: finding a line and column reads the file up to it.)
            if let Some((file, span)) = names.get(&name) {
                let at = self.place(*file, span);
                self.err(
                    f,
                    seq.name.span(),
                    format!("duplicate sequence name {name:?} (first declared at {at})"),
                );
            } else {
                names.insert(name.clone(), (f, seq.name.span()));
            }
            let weight = self.number(f, seq.weight, "sequence weight", 0..1_000_001, 1) as u32;
            if seq.steps.is_empty() {
                self.err(f, seq_span, format!("sequence {name:?} has no steps"));
            }
            let mut steps = Vec::new();
            // What is answered by each step: the form, and each earlier question that waits
            // for its answer (one with a timeout may go on without it).
            let mut answered = asked.to_vec();
            for (i, step) in seq.steps.into_iter().enumerate() {
                let span = step.span();
                let step = step.into_inner();
                let what = format!("sequence {name:?} step {}", i + 1);
                let plain = Allowed {
                    filled: Some(&answered),
                    ..plain
                };
                let after = match &step.after {
                    Some(d) => self
                        .duration(f, d, &format!("{what} after"))
                        .unwrap_or_default(),
                    None => TimeDelta::zero(),
                };
                let action = match (step.say, step.ask) {
                    (Some(say), None) => {
                        for (extra, name) in [
                            (step.save.is_some(), "save"),
                            (step.expect.is_some(), "expect"),
                            (step.timeout.is_some(), "timeout"),
                            (step.retry.is_some(), "retry"),
                            (step.thanks.is_some(), "thanks"),
                        ] {
                            if extra {
                                self.err(
                                    f,
                                    span.clone(),
                                    format!("{what}: `{name}` only belongs on an `ask` step"),
                                );
                            }
                        }
                        StepAction::Say(self.checked_text(f, &say, &format!("{what} say"), plain))
                    }
                    (None, Some(ask)) => {
                        let text = self.checked_text(f, &ask, &format!("{what} ask"), plain);
                        let save = step.save.map(|s| {
                            let key = s.get_ref().trim().to_string();
                            if !fields.contains(&key) {
                                self.err_unless_declared_elsewhere(
                                    f,
                                    s.span(),
                                    format!("{what}: save into undeclared field {key:?} (declare it in [[form.field]] or form.extra_fields)"),
                                );
                            }
                            key
                        });
                        let expect = self.expect(f, step.expect, keywords, Asker::Sequence);
                        let timeout = step
                            .timeout
                            .as_ref()
                            .and_then(|d| self.positive_duration(f, d, &format!("{what} timeout")));
                        let retry = self.text(
                            f,
                            step.retry,
                            &format!("{what} retry"),
                            "Sorry, I didn't understand that.",
                            plain,
                        );
                        let parts = [(&retry, plain), (&text, plain)];
                        self.check_joined(f, ask.span(), &what, &parts);
                        // Sent for an answer, which is saved by then.
                        let with_own: Vec<String> =
                            answered.iter().cloned().chain(save.clone()).collect();
                        let thanked = Allowed {
                            filled: Some(&with_own),
                            ..plain
                        };
                        let thanks = step
                            .thanks
                            .map(|t| self.checked_text(f, &t, &format!("{what} thanks"), thanked));
                        if let (Some(key), None) = (&save, timeout) {
                            answered.push(key.clone());
                        }
                        StepAction::Ask(Question {
                            text,
                            save,
                            expect,
                            retry,
                            timeout,
                            thanks,
                        })
                    }
                    (Some(_), Some(_)) => {
                        self.err(
                            f,
                            span,
                            format!("{what} has both `say` and `ask`; a step does one"),
                        );
                        continue;
                    }
                    (None, None) => {
                        self.err(f, span, format!("{what} needs `say` or `ask`"));
                        continue;
                    }
                };
                steps.push(Step { after, action });
            }
            out.push(Sequence {
                name,
                weight,
                steps,
            });
        }
        let total: u64 = out.iter().map(|s| u64::from(s.weight)).sum();
        if let (Some((f, span)), 0) = (first, total) {
            self.err_unless_declared_elsewhere(
                f,
                span,
                "zero total weight: every sequence has weight 0, so none can ever be chosen",
            );
        }
        out
    }

    /// `asked`: the form's fields, answered by the time a sequence's question is.
    fn replies(
        &mut self,
        raw: Option<(usize, RawReplies)>,
        fields: &[String],
        asked: &[String],
    ) -> Replies {
        let (f, r) = match raw {
            Some((f, r)) => (f, r),
            None => (
                0,
                RawReplies {
                    help: None,
                    opted_out: None,
                    unknown: None,
                    not_joined: None,
                    already_joined: None,
                    stop_hint: None,
                    late_answer: None,
                    answered: None,
                },
            ),
        };
        let plain = Allowed {
            code: false,
            current: false,
            fields,
            spoken: false,
            // Most replies may go to a number that has answered nothing.
            filled: Some(&[]),
        };
        // Those to a sequence's question come after the form.
        let in_sequence = Allowed {
            filled: Some(asked),
            ..plain
        };
        Replies {
            help: self.text(
                f,
                r.help,
                "replies.help",
                "{bot.name}: reply JOIN to subscribe, STOP to opt out.",
                plain,
            ),
            opted_out: self.text(
                f,
                r.opted_out,
                "replies.opted_out",
                "You're unsubscribed and will get no more messages. Reply START to rejoin.",
                plain,
            ),
            unknown: self.text(
                f,
                r.unknown,
                "replies.unknown",
                "Sorry, I didn't get that. Reply HELP for help.",
                plain,
            ),
            not_joined: self.text(
                f,
                r.not_joined,
                "replies.not_joined",
                "{bot.name}: reply JOIN to subscribe.",
                plain,
            ),
            already_joined: self.text(
                f,
                r.already_joined,
                "replies.already_joined",
                "You're already subscribed. Reply STOP to opt out.",
                plain,
            ),
            stop_hint: self.text(
                f,
                r.stop_hint,
                "replies.stop_hint",
                "To stop all messages from {bot.name}, reply STOP.",
                plain,
            ),
            late_answer: self.text(
                f,
                r.late_answer,
                "replies.late_answer",
                "Thanks, your answer is saved.",
                in_sequence,
            ),
            answered: self.text(
                f,
                r.answered,
                "replies.answered",
                "Thanks, got it.",
                in_sequence,
            ),
        }
    }

    fn ivr(&mut self, raw: Option<(usize, RawIvr)>, fields: &[String], at: Range<usize>) -> Ivr {
        let plain = Allowed {
            code: false,
            current: false,
            fields,
            spoken: true,
            filled: None,
        };
        let Some((f, r)) = raw else {
            return Ivr {
                start: "main".into(),
                retries: 2,
                reprompt: fixed("Sorry, I didn't get that."),
                goodbye: fixed("Goodbye."),
                read_code: fixed("Your {bot.name} code is {code}."),
                texted: fixed("We've sent you a text message with a code."),
                opted_out: fixed(IVR_OPTED_OUT),
                already_joined: fixed(IVR_ALREADY_JOINED),
                hidden_caller: fixed(HIDDEN_CALLER),
                read_code_callers: ReadCodeCallers::Any,
                menus: BTreeMap::new(),
            };
        };
        let retries = self.number(f, r.retries, "ivr.retries", 0..11, 2) as u8;
        let reprompt = self.text(
            f,
            r.reprompt,
            "ivr.reprompt",
            "Sorry, I didn't get that.",
            plain,
        );
        // With no menu, what a call hears is `goodbye`: a line that only announces says it.
        let announces = r.goodbye.is_some();
        let goodbye = self.text(f, r.goodbye, "ivr.goodbye", "Goodbye.", plain);
        let read_code = self.text(
            f,
            r.read_code,
            "ivr.read_code",
            "Your {bot.name} code is {code}.",
            Allowed {
                code: true,
                ..plain
            },
        );
        let texted = self.text(
            f,
            r.texted,
            "ivr.texted",
            "We've sent you a text message with a code.",
            plain,
        );
        let opted_out = self.text(f, r.opted_out, "ivr.opted_out", IVR_OPTED_OUT, plain);
        let already_joined = self.text(
            f,
            r.already_joined,
            "ivr.already_joined",
            IVR_ALREADY_JOINED,
            plain,
        );
        let hidden_caller = self.text(
            f,
            r.hidden_caller,
            "ivr.hidden_caller",
            HIDDEN_CALLER,
            plain,
        );
        // Left to its default, "any": said where a menu reads codes (below).
        let mut callers_unsaid = r.read_code_callers.is_none();
        let read_code_callers = self.choice(
            f,
            r.read_code_callers,
            "ivr.read_code_callers",
            &[
                ("any", ReadCodeCallers::Any),
                ("attested", ReadCodeCallers::Attested),
            ],
        );
        let start_span = r.start.as_ref().map(|s| s.span());
        let start = r
            .start
            .map(|s| s.into_inner().trim().to_string())
            .unwrap_or_else(|| "main".into());
        let mut menus = BTreeMap::new();
        let mut edges: Vec<(String, String, Range<usize>)> = Vec::new();
        for (name, menu) in &r.menu {
            let say = self.checked_text(
                f,
                &menu.get_ref().say,
                &format!("ivr.menu.{name}.say"),
                plain,
            );
            let mut press = BTreeMap::new();
            for (digit, target) in &menu.get_ref().press {
                if !(digit.len() == 1
                    && digit
                        .chars()
                        .all(|c| c.is_ascii_digit() || c == '*' || c == '#'))
                {
                    self.err(
                        f,
                        target.span(),
                        format!(
                            "ivr.menu.{name}: press key {digit:?} must be one key: 0-9, * or #"
                        ),
                    );
                }
                match IvrAction::parse(target.get_ref()) {
                    Ok(IvrAction::Menu(to)) => {
                        edges.push((name.clone(), to.clone(), target.span()));
                        press.insert(digit.clone(), IvrAction::Menu(to));
                    }
                    // Spoken as a template, like every other voice text.
                    Ok(IvrAction::Say(text)) => {
                        let what = format!("ivr.menu.{name}: `say:`");
                        for p in text.unknown_placeholders(plain) {
                            self.err(f, target.span(), format!("{what} {p}"));
                        }
                        self.check_length(f, target.span(), &format!("{what} text"), &text, plain);
                        press.insert(digit.clone(), IvrAction::Say(text));
                    }
                    Ok(action) => {
                        if action == IvrAction::ReadCode && callers_unsaid {
                            callers_unsaid = false;
                            self.warn(
                                f,
                                target.span(),
                                "read_code reads a code to any caller, as \
                                 ivr.read_code_callers is not set (\"any\"): caller ID can be \
                                 spoofed, and whoever hears a number's code can verify it. \
                                 In the US, set read_code_callers = \"attested\"; set \"any\" \
                                 to keep it so",
                            );
                        }
                        press.insert(digit.clone(), action);
                    }
                    Err(e) => self.err(
                        f,
                        target.span(),
                        format!("ivr.menu.{name}: press target: {e}"),
                    ),
                }
            }
            if press.is_empty() {
                self.err(
                    f,
                    menu.span(),
                    format!("ivr.menu.{name} has no `press` choices"),
                );
            }
            menus.insert(name.clone(), Menu { say, press });
        }
        for (from, to, span) in &edges {
            if !menus.contains_key(to) {
                self.err(
                    f,
                    span.clone(),
                    format!("ivr.menu.{from}: press target menu:{to} does not exist"),
                );
            }
        }
        if menus.is_empty() {
            match start_span.clone() {
                Some(span) => self.err(
                    f,
                    span,
                    format!("ivr.start names menu {start:?}, but there is no [ivr.menu.*] at all"),
                ),
                // Every call would hear "Goodbye." and nothing else.
                None if !announces => self.err(
                    f,
                    at,
                    "[ivr] has no menus, so every call hears only \"Goodbye.\": add \
                     [ivr.menu.main], the menu a call starts in, or set ivr.goodbye to what \
                     callers should hear",
                ),
                None => {}
            }
        }
        if !menus.is_empty() {
            if !menus.contains_key(&start) {
                let (span, says) = match start_span {
                    Some(span) => (
                        span,
                        format!("ivr.start names menu {start:?}, which does not exist"),
                    ),
                    // No start given: point at the first menu and say what is missing.
                    None => (
                        r.menu
                            .values()
                            .map(|m| m.span())
                            .min_by_key(|s| s.start)
                            .unwrap_or(0..0),
                        "ivr has no menu \"main\" to start with: name one main, or set ivr.start"
                            .to_string(),
                    ),
                };
                self.err(f, span, says);
            } else {
                let mut reached = BTreeSet::from([start.clone()]);
                let mut todo = vec![start.clone()];
                while let Some(m) = todo.pop() {
                    for (from, to, _) in &edges {
                        if *from == m && menus.contains_key(to) && reached.insert(to.clone()) {
                            todo.push(to.clone());
                        }
                    }
                }
                for (name, menu) in &r.menu {
                    if !reached.contains(name) {
                        self.err(
                            f,
                            menu.span(),
                            format!(
                                "ivr.menu.{name} can never be reached from ivr.start ({start:?})"
                            ),
                        );
                    }
                }
            }
        }
        Ivr {
            start,
            retries,
            reprompt,
            goodbye,
            read_code,
            texted,
            opted_out,
            already_joined,
            hidden_caller,
            read_code_callers,
            menus,
        }
    }
}

impl RawVerify {
    fn empty() -> RawVerify {
        RawVerify {
            code_length: None,
            ttl: None,
            valid_codes: None,
            max_attempts: None,
            max_sends: None,
            send_window: None,
            max_codes_per_hour: None,
            after_otp_api: None,
            send: None,
            api_send: None,
            api_code_texted: None,
            wrong: None,
            not_a_code: None,
            expired: None,
            locked: None,
            rate_limited: None,
            busy: None,
            verified: None,
            welcome_back: None,
            voice: None,
        }
    }
}

impl Keywords {
    /// Which list a normalized word belongs to, if any.
    pub fn list_of(&self, word: &str) -> Option<&'static str> {
        let has = |l: &[String]| l.iter().any(|k| k == word);
        if has(&self.opt_out) {
            Some("opt_out")
        } else if has(&self.help) {
            Some("help")
        } else if has(&self.opt_in) {
            Some("opt_in")
        } else if has(&self.edit) {
            Some("edit")
        } else if has(&self.keep) {
            Some("keep")
        } else {
            None
        }
    }
}

/// Who asks a question: the form (where KEEP keeps an answer while editing) or a sequence.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Asker {
    Form,
    Sequence,
}

/// The problem of a text over [`MAX_TEXT`] (`why`: how its placeholders were measured).
fn too_long(what: &str, why: &str) -> String {
    format!(
        "{what} is longer than {MAX_TEXT} characters (as Twilio counts them: an emoji or other \
         character beyond the basic plane is two{why})"
    )
}

fn valid_key(k: &str) -> bool {
    !k.is_empty()
        && k.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && k.chars().next().is_some_and(|c| c.is_ascii_lowercase())
}

/// A built-in text; the tests load an empty set, which parses every one of them.
fn fixed(text: &str) -> Template {
    Template::parse(text).unwrap_or_else(|_| Template::literal(text))
}
