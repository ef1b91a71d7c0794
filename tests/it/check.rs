//! `smsflow check`: every problem in a broken flow set is reported with file, line and column.

use std::path::Path;
use std::process::Command;

fn smsflow() -> Command {
    Command::new(env!("CARGO_BIN_EXE_smsflow"))
}

const BROKEN: &str = r#"[bot]
name = "Broken"
timezone = "Mars/Olympus_Mons"
quiet_hours = { from = "25:00", to = "08:00" }

[verify]
code_length = 3
ttl = "ten minutes"
send = "Your code: {code}, {field.nickname}"
wrong = ""

[[form.field]]
key = "age_group"
ask = "Age group? A, B or STOP"
expect = { choices = { A = "young", B = "info", STOP = "never" } }

[[form.field]]
key = "age_group"
ask = "Again?"

[[sequence]]
name = "tips"
weight = 0
steps = [
  { after = "1d", say = "Hello {field.first_name}" },
  { after = "2d", ask = "Rate us 1-5", save = "rating", expect = { range = [1, 5] } },
]

[[sequence]]
name = "tips"
weight = 0
steps = [{ after = "1x", say = "Hi" }]

[ivr.menu.main]
say = "Press 1"
press = { "1" = "menu:nowhere" }

[ivr.menu.orphan]
say = ""
press = { "1" = "hangup" }
"#;

fn write(dir: &Path, name: &str, text: &str) {
    std::fs::write(dir.join(name), text).unwrap();
}

/// The problems `dir`'s flows have, as `check` prints them (the flows must have some).
fn problems_in(dir: &Path) -> String {
    smsflow::flows::load_dir(dir).unwrap_err().to_string()
}

/// Asserts that `problems` has, for each (place, says), a line at that place saying that.
fn assert_told(problems: &str, expected: &[(&str, &str)]) {
    for (place, says) in expected {
        assert!(
            (problems.lines()).any(|l| l.contains(place) && l.contains(says)),
            "no {says:?} at {place} in:\n{problems}"
        );
    }
}

#[test]
fn check_reports_every_mistake_with_file_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "a_syntax.toml", "[bot\nname = 1\n");
    write(
        dir.path(),
        "b_unknown.toml",
        "[replies]\nhelp = \"Help!\"\nhepl = \"typo\"\n",
    );
    write(dir.path(), "c_broken.toml", BROKEN);

    let out = smsflow().arg("check").arg(dir.path()).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "check must exit 1 on problems");
    let stderr = String::from_utf8(out.stderr).unwrap();

    let located: Vec<&str> = stderr
        .lines()
        .filter(|l| {
            let mut parts = l.splitn(4, ':');
            let (file, line, col) = (parts.next(), parts.next(), parts.next());
            file.is_some_and(|f| f.ends_with(".toml"))
                && line.is_some_and(|n| n.parse::<usize>().is_ok_and(|n| n > 0))
                && col.is_some_and(|n| n.parse::<usize>().is_ok_and(|n| n > 0))
        })
        .collect();
    assert!(
        located.len() >= 8,
        "expected at least 8 located errors, got {}:\n{stderr}",
        located.len()
    );

    // While a file does not parse, problems a name in it could clear are held back, and
    // the note says so.
    assert!(
        stderr
            .lines()
            .any(|l| l.contains("a_syntax.toml:1:5:") && l.contains("unclosed table")),
        "the syntax error itself: {stderr}"
    );
    // Held: the undeclared {field.nickname} and {field.first_name}, the save into the
    // undeclared "rating", the zero total weight. Not held: what no other file could clear
    // (the voice menus, since [ivr] is in one file only).
    assert!(
        stderr.lines().any(|l| l.contains("a_syntax.toml:1:")
            && l.contains("4 more problem(s)")
            && l.contains("check again once")),
        "{stderr}"
    );
    assert!(!stderr.contains("undeclared field"), "{stderr}");
    assert!(stderr.contains("c_broken.toml:3:"), "{stderr}");
    assert!(stderr.contains("menu:nowhere does not exist"), "{stderr}");

    std::fs::remove_file(dir.path().join("a_syntax.toml")).unwrap();
    let out = smsflow().arg("check").arg(dir.path()).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8(out.stderr).unwrap();
    let expect = [
        ("b_unknown.toml:3:1", "hepl"),
        ("c_broken.toml:3:", "unknown timezone"),
        ("c_broken.toml:4:", "malformed quiet_hours"),
        ("c_broken.toml:7:", "code_length"),
        ("c_broken.toml:8:", "bad duration"),
        ("c_broken.toml:9:", "unknown placeholder {field.nickname}"),
        ("c_broken.toml:10:", "empty text"),
        ("c_broken.toml:15:", "collides with the keyword STOP"),
        ("c_broken.toml:15:", "which is the keyword INFO"),
        ("c_broken.toml:18:", "duplicate field name"),
        (
            "c_broken.toml:25:",
            "unknown placeholder {field.first_name}",
        ),
        ("c_broken.toml:26:", "save into undeclared field \"rating\""),
        ("c_broken.toml:30:", "duplicate sequence name"),
        ("c_broken.toml:32:", "bad duration \"1x\""),
        ("zero total weight", ""),
        ("c_broken.toml:36:", "menu:nowhere does not exist"),
        ("c_broken.toml:38:", "ivr.menu.orphan can never be reached"),
        ("c_broken.toml:39:", "empty text: ivr.menu.orphan.say"),
    ];
    for (place, message) in expect {
        assert!(
            stderr
                .lines()
                .any(|l| l.contains(place) && l.contains(message)),
            "no error at {place} mentioning {message:?} in:\n{stderr}"
        );
    }
}

#[test]
fn the_shipped_flows_pass_check_with_a_one_line_summary() {
    let out = smsflow().args(["check", "flows"]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(stdout.lines().count(), 1);
    assert!(stdout.contains("3 sequence(s)"), "{stdout}");
}

#[test]
fn a_missing_flow_directory_is_reported_not_a_panic() {
    let out = smsflow()
        .args(["check", "/nonexistent/flows"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    // A problem of the whole directory has no line and column.
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("/nonexistent/flows: cannot read flow directory"));
    let empty = tempfile::tempdir().unwrap();
    let out = smsflow().arg("check").arg(empty.path()).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let said = format!("{}: no *.toml flow files here", empty.path().display());
    assert!(stderr.contains(&said), "{stderr}");
}

#[test]
fn a_section_defined_in_two_files_names_the_first_place() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "a.toml", "[bot]\nname = \"One\"\n");
    write(dir.path(), "b.toml", "\n[bot]\nname = \"Two\"\n");
    let problems = smsflow::flows::load_dir(dir.path()).unwrap_err();
    assert_eq!(problems.0.len(), 1, "{problems}");
    let p = &problems.0[0];
    assert!(p.file.ends_with("b.toml"));
    assert_eq!(p.line, 2);
    assert!(p.message.contains("a.toml:1:1"), "{}", p.message);
}

#[test]
fn form_done_is_checked_like_the_other_form_texts_and_set_in_one_file_only() {
    let dir = tempfile::tempdir().unwrap();
    let form = "[[form.field]]\nkey = \"name\"\nask = \"Name?\"\n";
    write(
        dir.path(),
        "a.toml",
        &format!("{form}[form]\ndone = \"Bye {{field.nick}}\"\n"),
    );
    let problems = problems_in(dir.path());
    assert!(
        problems.contains("a.toml:") && problems.contains("unknown placeholder {field.nick}"),
        "{problems}"
    );
    write(
        dir.path(),
        "a.toml",
        &format!("{form}[form]\ndone = \"Thanks {{field.name}}!\"\n"),
    );
    let f = smsflow::flows::load_dir(dir.path()).unwrap();
    assert_eq!(f.form.done.render(|_| Some("Ann".into())), "Thanks Ann!");
    write(dir.path(), "b.toml", "[form]\ndone = \"Two\"\n");
    let problems = problems_in(dir.path());
    assert!(
        problems.contains("b.toml:") && problems.contains("a.toml:"),
        "{problems}"
    );
}

#[test]
fn the_flow_sample_in_the_readme_passes_check() {
    let readme = std::fs::read_to_string("README.md").unwrap();
    let start = readme.find("```toml\n").expect("a toml sample") + "```toml\n".len();
    let end = start + readme[start..].find("```").unwrap();
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "sample.toml", &readme[start..end]);
    if let Err(p) = smsflow::flows::load_dir(dir.path()) {
        panic!("README sample fails check:\n{p}");
    }
}

#[test]
fn serve_with_broken_flows_lists_every_problem_and_exits_1_like_check() {
    let (flows, data) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    write(flows.path(), "c_broken.toml", BROKEN);
    let out = smsflow()
        .arg("serve")
        .env("SMSFLOW_FLOWS", flows.path())
        .env("SMSFLOW_DATA", data.path())
        .env("SMSFLOW_LISTEN", "127.0.0.1:0")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("problem(s)"), "{stderr}");
    assert!(stderr.contains("c_broken.toml:3:"), "{stderr}");
    assert!(
        stderr.contains("c_broken.toml:32:20: bad duration"),
        "{stderr}"
    );
}

/// A configuration value that cannot be used is named by where it came from: its place in
/// smsflow.toml, its variable, its flag; each one is told.
#[test]
fn serve_names_each_bad_setting_by_where_it_came_from() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "smsflow.toml",
        "listen = \"localhost:8080\"\nadmin_token = \"é-secret\"\n",
    );
    let serve = |args: &[&str]| {
        let out = smsflow()
            .current_dir(dir.path())
            .arg("serve")
            .args(args)
            .env("SMSFLOW_SEND_RATE", "0")
            .env("SMSFLOW_API_TOKEN", "two words")
            .env("SMSFLOW_FLOWS", std::fs::canonicalize("flows").unwrap())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1));
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let stderr = serve(&["--retention", "5m"]);
    assert!(
        stderr.contains("smsflow.toml:1:10: listen address \"localhost:8080\" is not IP:PORT"),
        "{stderr}"
    );
    // A token no Authorization header can carry as written, named but not shown.
    assert!(
        stderr.contains("smsflow.toml:2:15: a token must be printable ASCII"),
        "{stderr}"
    );
    assert!(
        stderr.contains("SMSFLOW_API_TOKEN: a token must be printable ASCII"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("secret\"") && !stderr.contains("two words"),
        "{stderr}"
    );
    // The file's listen address overridden by the flag is not looked at.
    let stderr = serve(&[
        "--retention",
        "5m",
        "--listen",
        "127.0.0.1:0",
        "--cache",
        "8MiB",
    ]);
    assert!(!stderr.contains("smsflow.toml:1:"), "{stderr}");
    assert!(
        stderr.contains("--cache: cache \"8MiB\" is out of range"),
        "{stderr}"
    );
    assert!(
        stderr.contains("SMSFLOW_SEND_RATE: send_rate must be"),
        "{stderr}"
    );
    assert!(
        stderr.contains("--retention: retention \"5m\" is shorter than an hour"),
        "{stderr}"
    );
}

#[test]
fn unknown_keys_do_not_hide_the_other_problems_of_their_file() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "typos.toml",
        "[bot]\nname = \"Typos\"\ncolour = \"red\"\n\n[verify]\nttl = \"0s\"\n\n\
         [[sequence]]\nname = \"s\"\nsteps = [\n  { sya = \"x\", after = \"1d\", say = \"Hi\" },\n]\n",
    );
    let problems = problems_in(dir.path());
    assert_told(
        &problems,
        &[
            ("typos.toml:3:1:", "unknown field `colour`"),
            ("typos.toml:11:5:", "unknown field `sya`"),
            (
                "typos.toml:6:7:",
                "bad duration \"0s\" for verify.ttl: must be at least 1s",
            ),
        ],
    );
}

/// humantime reads `1M` as a month: a flow author who meant a minute heard nothing until a
/// month later. Months and years are refused in flows, each saying what to write instead.
#[test]
fn a_step_after_one_capital_m_is_refused_as_a_month_not_taken() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "later.toml",
        "[[sequence]]\nname = \"s\"\nsteps = [\n  { after = \"1M\", say = \"a\" },\n  \
         { after = \"1y\", say = \"b\" },\n]\n",
    );
    let problems = problems_in(dir.path());
    assert_told(
        &problems,
        &[
            ("later.toml:4:13:", "bad duration \"1M\""),
            (
                "later.toml:4:13:",
                "`M` is a month here, not a minute: write `m`",
            ),
            (
                "later.toml:5:13:",
                "years vary in length: write days (`365d`)",
            ),
        ],
    );
}

/// `pattern = "\d{5}"` is a TOML escape error whose words (expected `b`, `e`, `f`…) do not
/// say that single quotes are the way to write a regex.
#[test]
fn a_pattern_in_double_quotes_with_a_backslash_is_told_to_use_single_quotes() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "zip.toml",
        "[[sequence]]\nname = \"s\"\n\
         steps = [{ ask = \"Zip?\", expect = { pattern = \"\\d{5}\" } }]\n",
    );
    let problems = problems_in(dir.path());
    assert!(
        problems
            .lines()
            .any(|l| l.contains("zip.toml:3:49: missing escaped value")
                && l.contains("write a pattern such as '\\d{5}' in single quotes")),
        "{problems}"
    );
    write(
        dir.path(),
        "zip.toml",
        "[[sequence]]\nname = \"s\"\n\
         steps = [{ ask = \"Zip?\", expect = { pattern = '\\d{5}' } }]\n",
    );
    let out = smsflow().arg("check").arg(dir.path()).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// A text that may go out before a field it names has an answer shows nothing in its place
/// ("Hi , P"): `check` passes it with a warning located at the placeholder. One sent only once the
/// field is answered (a later form question, a sequence after the form, a step after a
/// question that waits for its answer, a question's own thanks) is not warned of.
#[test]
fn check_warns_of_a_field_named_where_it_may_have_no_answer_yet() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "bot.toml",
        r#"[verify]
verified = "Hi {field.first}"
welcome_back = "Back, {field.first} {field.zip}"
[replies]
help = "Help for {field.first}"
answered = "Got it, {field.first}"
[form]
extra_fields = ["zip", "nps"]
done = "Done, {field.first}! Zip {field.zip}."
[[form.field]]
key = "first"
ask = "Name? (we have {field.last})"
[[form.field]]
key = "last"
ask = "Surname, {field.first}?"
[[sequence]]
name = "s"
steps = [
  { say = "Hello {field.first} {field.last}" },
  { ask = "Zip?", save = "zip", thanks = "Zip {field.zip} saved" },
  { ask = "NPS?", save = "nps", timeout = "1d", expect = { range = [0, 10] }, retry = "0-10, {field.zip}" },
  { say = "Thanks: {field.zip} {field.nps} {field.nps}" },
]
"#,
    );
    let out = smsflow().arg("check").arg(dir.path()).output().unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.ends_with("; 6 warning(s)\n"), "{stdout}");
    let warned: Vec<&str> = stderr.lines().collect();
    let expected = [
        ("bot.toml:2:16:", "verify.verified: {field.first}"),
        // Sent once the whole form is answered: only the extra field may be empty.
        ("bot.toml:3:37:", "verify.welcome_back: {field.zip}"),
        ("bot.toml:5:18:", "replies.help: {field.first}"),
        ("bot.toml:9:34:", "form.done: {field.zip}"),
        ("bot.toml:12:23:", "form field \"first\" ask: {field.last}"),
        ("bot.toml:22:32:", "sequence \"s\" step 4 say: {field.nps}"),
    ];
    assert_eq!(warned.len(), expected.len(), "{stderr}");
    for ((place, says), line) in expected.iter().zip(&warned) {
        assert!(
            line.starts_with(&format!(
                "{}{place} warning: ",
                dir.path().join("").display()
            )) && line.contains(says)
                && line.ends_with(
                    "may have no answer yet when this is sent, and then shows as nothing"
                ),
            "{line}"
        );
    }
}

/// "Reply X to cancel" beside `X = "cancel it"`: a patient who replies `cancel` is opted out.
/// A label that starts with a keyword passes with a warning; one that is a keyword fails.
#[test]
fn a_choice_label_that_starts_with_a_keyword_is_warned_of() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "bot.toml",
        "[[sequence]]\nname = \"s\"\nsteps = [{ ask = \"C to confirm, X to cancel\", \
         expect = { choices = { C = \"confirm\", X = \"cancel it\", I = \"info pack\", \
         Y = \"cancel_appointment\", O = \"opt out of reminders\", S = \"stopover\" } } }]\n",
    );
    let flows = smsflow::flows::load_dir(dir.path()).unwrap();
    let warned: Vec<String> = flows.warnings().iter().map(|w| w.to_string()).collect();
    assert_eq!(warned.len(), 4, "{warned:?}");
    let has = |says: &str, opts: bool| {
        warned.iter().any(|w| {
            w.contains("bot.toml:3:")
                && w.contains(says)
                && w.contains("opts the number out") == opts
        })
    };
    for (says, opts) in [
        ("choice \"X\" has the label \"cancel it\", which starts with the keyword CANCEL (keywords.opt_out)", true),
        ("choice \"Y\" has the label \"cancel_appointment\", which starts with the keyword CANCEL", true),
        ("choice \"O\" has the label \"opt out of reminders\", which starts with the keyword OPTOUT", true),
        ("choice \"I\" has the label \"info pack\", which starts with the keyword INFO (keywords.help)", false),
    ] {
        assert!(has(says, opts), "{says}: {warned:?}");
    }
}

/// An unknown placeholder is located where it is written, not at the start of its text.
#[test]
fn an_unknown_placeholder_is_located_at_its_brace() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "bot.toml",
        "[replies]\nhelp = \"Hi {field.first} and { nme } or {nme2}\"\nunknown = \"Type {{nme}} for {nme}\"\n",
    );
    let problems = problems_in(dir.path());
    assert_told(
        &problems,
        &[
            ("bot.toml:2:12:", "unknown placeholder {field.first}"),
            ("bot.toml:2:30:", "unknown placeholder {nme}"),
            ("bot.toml:2:41:", "unknown placeholder {nme2}"),
            // Not `{{nme}}`, a brace written as itself.
            ("bot.toml:3:29:", "unknown placeholder {nme}"),
        ],
    );
}

/// `EST` is a real tz name, but a fixed UTC-5 all year: quiet hours an hour off all summer.
/// A name in the wrong case is told its right spelling.
#[test]
fn a_timezone_without_daylight_saving_or_in_the_wrong_case_says_what_to_write() {
    let dir = tempfile::tempdir().unwrap();
    for (zone, says) in [
        ("EST", "fixed offset all year, with no daylight saving: for the region's local time write America/New_York"),
        ("MST", "write America/Denver (America/Phoenix for Arizona)"),
        ("america/new_york", "did you mean America/New_York? names are case-sensitive"),
        ("est", "a zone's abbreviation: for the region's local time write America/New_York"),
        ("PST", "write America/Los_Angeles"),
    ] {
        write(dir.path(), "bot.toml", &format!("[bot]\ntimezone = \"{zone}\"\n"));
        let problems = problems_in(dir.path());
        assert!(
            problems.lines().any(|l| l.contains("bot.toml:2:12:") && l.contains(says)),
            "{zone}: {problems}"
        );
    }
    for zone in [
        "America/New_York",
        "Pacific/Honolulu",
        "HST",
        "Etc/GMT+5",
        "UTC",
    ] {
        write(
            dir.path(),
            "bot.toml",
            &format!("[bot]\ntimezone = \"{zone}\"\n"),
        );
        assert!(smsflow::flows::load_dir(dir.path()).is_ok(), "{zone}");
    }
}

/// A mistyped table name (`[bott]`, `[bot.extra]`, `[[sequnce]]`) is told, and the rest of the
/// file is still checked: before, everything else in the file went unsaid.
#[test]
fn an_unknown_table_does_not_hide_the_other_problems_of_its_file() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "b.toml",
        "[bot]\nname = \"X\"\ntimezone = \"Mars/Olympus\"\n[verify]\nsend = \"Code {code}\"\n\
         ttl = \"0s\"\n[bott]\nfoo = 1\n[bot.extra]\nx = 2\n[[sequnce]]\nname = \"a\"\n",
    );
    let problems = problems_in(dir.path());
    assert_told(
        &problems,
        &[
            ("b.toml:3:12:", "unknown timezone"),
            ("b.toml:6:7:", "bad duration \"0s\""),
            ("b.toml:7:2:", "unknown field `bott`"),
            ("b.toml:9:6:", "unknown field `extra`"),
            ("b.toml:11:3:", "unknown field `sequnce`"),
        ],
    );
    // A line of the mistyped table that starts with `[` inside a multi-line string or an
    // array is no header: the table goes up to the real one.
    write(
        dir.path(),
        "b.toml",
        "[bot]\nname = \"X\"\n[bott]\ntext = \"\"\"\n[not a header]\n\"\"\"\nlist = [\n  [1, 2],\n]\n\
         [verify]\ncode_length = 99\n",
    );
    let problems = problems_in(dir.path());
    assert_told(
        &problems,
        &[
            ("b.toml:3:2:", "unknown field `bott`"),
            ("b.toml:11:15:", "verify.code_length is 99"),
        ],
    );
}

/// Voice texts are spoken without the caller's record at hand: `check` refuses the
/// placeholders they could not fill, and a `say:` key's text is a template like the rest.
#[test]
fn voice_texts_may_name_the_bot_but_not_a_numbers_fields_or_sequence() {
    let dir = tempfile::tempdir().unwrap();
    let flow = r#"[bot]
name = "Vox"

[[form.field]]
key = "first_name"
ask = "Name?"

[ivr.menu.main]
say = "Hi {field.first_name}, press 1 or 2"
press = { "1" = "say:Thanks for calling {bot.name}", "2" = "say:You are in {sequence}" }
"#;
    write(dir.path(), "v.toml", flow);
    let problems = problems_in(dir.path());
    assert!(
        problems.contains("v.toml:9:") && problems.contains("{field.first_name}"),
        "{problems}"
    );
    assert!(
        problems.contains("v.toml:10:") && problems.contains("{sequence}"),
        "{problems}"
    );
    assert_eq!(
        problems.matches("a voice text knows").count(),
        2,
        "{problems}"
    );

    write(
        dir.path(),
        "v.toml",
        &flow
            .replace("Hi {field.first_name}, p", "P")
            .replace("You are in {sequence}", "Bye"),
    );
    let flows = smsflow::flows::load_dir(dir.path()).unwrap();
    match smsflow::ivr::key_pressed(&flows, "main", 0, Some("1")) {
        smsflow::ivr::Turn::End(said) => assert_eq!(
            said[0],
            smsflow::ivr::Speech::Say("Thanks for calling Vox".into())
        ),
        other => panic!("{other:?}"),
    }
}

#[test]
fn voice_menus_without_main_or_a_start_or_at_all_say_so_where_the_voice_settings_are() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "v.toml",
        "[bot]\nname = \"Vox\"\n\n[ivr.menu.welcome]\nsay = \"Press 1\"\npress = { \"1\" = \"hangup\" }\n",
    );
    let problems = problems_in(dir.path());
    assert!(problems.contains("v.toml:4:"), "{problems}");
    assert!(problems.contains("set ivr.start"), "{problems}");
    // Voice settings with no menu at all: every call would hear goodbye and nothing else.
    write(
        dir.path(),
        "v.toml",
        "[bot]\nname = \"Vox\"\n\n[ivr]\nretries = 1\n",
    );
    let problems = problems_in(dir.path());
    assert!(
        problems.contains("v.toml:4:") && problems.contains("[ivr] has no menus"),
        "{problems}"
    );
    // A line that only announces something: what it says is its goodbye.
    write(
        dir.path(),
        "v.toml",
        "[bot]\nname = \"Vox\"\n\n[ivr]\ngoodbye = \"This line takes texts only.\"\n",
    );
    smsflow::flows::load_dir(dir.path()).expect("an announcement line is a voice setting");
}

#[test]
fn keep_is_refused_as_a_form_choice_but_allowed_in_a_sequence_question() {
    let dir = tempfile::tempdir().unwrap();
    let flow = |form_choice: &str| {
        format!(
            r#"[bot]
name = "Keeper"

[form]
extra_fields = ["tips"]

[[form.field]]
key = "plan"
ask = "Plan? A or {form_choice}"
expect = {{ choices = {{ A = "basic", {form_choice} = "more" }} }}

[[sequence]]
name = "tips"
steps = [
  {{ after = "1d", ask = "Still want tips? KEEP or DROP", save = "tips", expect = {{ choices = {{ KEEP = "yes", DROP = "no" }} }} }},
]
"#
        )
    };
    write(dir.path(), "k.toml", &flow("KEEP"));
    let problems = problems_in(dir.path());
    assert!(
        problems.contains("k.toml:10:") && problems.contains("keywords.keep"),
        "{problems}"
    );
    assert_eq!(problems.matches("keywords.keep").count(), 1, "{problems}");

    write(dir.path(), "k.toml", &flow("B"));
    let flows = smsflow::flows::load_dir(dir.path()).unwrap();
    assert_eq!(flows.sequences.len(), 1);
}

/// A label is an answer too, read without case and punctuation: one that reads as another
/// choice's key ("2+" as "2") or label ("<18" and "18+" both read "18") would be stored as the
/// wrong choice, so `check` refuses it. A label with nothing to read (an emoji) is allowed: it
/// is matched only as written.
#[test]
fn a_choice_label_that_reads_as_another_choice_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let flow = |choices: &str| {
        format!(
            "[bot]\nname = \"Labels\"\n\n[[form.field]]\nkey = \"pick\"\nask = \"Pick one\"\nexpect = {{ choices = {{ {choices} }} }}\n"
        )
    };
    for (choices, says) in [
        (
            r#""1" = "0", "2" = "1", "3" = "2+""#,
            r#"choice "2" has the label "1", which reads as "1", the key of another choice"#,
        ),
        (
            r#"A = "<18", B = "18+""#,
            r#"choices "A" and "B" have labels that read the same ("<18" and "18+"; answers"#,
        ),
        // Keys read as answers are: case aside, and any script's digits as 0-9.
        (
            r#""1" = "yes", "١" = "no""#,
            r#"choice key "١" reads the same as key "1" (answers are read without case, spaces and punctuation, and with any script's digits as 0-9)"#,
        ),
        (
            r#"a = "yes", A = "no""#,
            r#"choice key "A" reads the same as key "a""#,
        ),
    ] {
        write(dir.path(), "l.toml", &flow(choices));
        let problems = problems_in(dir.path());
        assert!(
            problems.contains("l.toml:7:") && problems.contains(says),
            "{choices}: {problems}"
        );
    }
    write(
        dir.path(),
        "l.toml",
        &flow(r#"Y = "👍", N = "👎", M = "meh""#),
    );
    smsflow::flows::load_dir(dir.path()).unwrap();
}

/// Replies are matched without punctuation: a keyword of punctuation alone could never match,
/// and `check` says so rather than calling it empty.
#[test]
fn a_keyword_of_punctuation_alone_is_refused_as_one_that_could_never_match() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "k.toml",
        "[bot]\nname = \"Keys\"\n\n[keywords]\nhelp = [\"?\", \" \"]\n",
    );
    let problems = problems_in(dir.path());
    assert!(
        problems.contains(r#"keyword "?" in keywords.help has no letters or digits"#)
            && problems.contains("empty keyword in keywords.help"),
        "{problems}"
    );
}

/// A built-in keyword added to another list is located where the flow added it, whichever
/// list is read first.
#[test]
fn a_keyword_in_two_lists_is_located_where_the_flow_wrote_it() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "k.toml",
        "[bot]\nname = \"Keys\"\n\n[keywords]\nopt_out = [\"JOIN\"]\nedit = [\"help\"]\n",
    );
    let problems = problems_in(dir.path());
    assert!(
        problems.contains(
            r#"k.toml:5:12: keyword "JOIN" is both in keywords.opt_out and keywords.opt_in (built in)"#
        ) && problems.contains(r#"k.toml:6:9: keyword "HELP" is both in keywords.help"#),
        "{problems}"
    );
}

/// A form field named like a fixed column of the export ("state" for a US state, say) would
/// give the dataset two columns of one name: `check` refuses it and says which names are taken.
#[test]
fn a_field_named_like_an_export_column_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let flow = |key: &str| {
        format!(
            r#"[bot]
name = "Census"

[[form.field]]
key = "{key}"
ask = "Which state do you live in?"
"#
        )
    };
    write(dir.path(), "c.toml", &flow("state"));
    let problems = problems_in(dir.path());
    assert!(
        problems.contains("c.toml:5:") && problems.contains("already a column of the dataset"),
        "{problems}"
    );
    write(dir.path(), "c.toml", &flow("home_state"));
    let flows = smsflow::flows::load_dir(dir.path()).unwrap();
    assert_eq!(flows.form.fields.len(), 1);
}

/// A code text that names no `{code}` would text (or read) no code, and no one could ever
/// verify; a start menu named where there are no menus would only ever say goodbye. And a
/// `{code}` where none exists is told where one does.
#[test]
fn a_code_text_without_its_code_and_a_start_menu_without_menus_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "v.toml",
        r#"[bot]
name = "Verifier"

[verify]
send = "Welcome! Reply with the code we sent."
voice = "Hello from {bot.name}."
expired = "Code {code} expired."
welcome_back = "Welcome back, your code was {code}."

[ivr]
start = "welcome"
read_code = "Hello."
read_code_callers = "verified"
"#,
    );
    let problems = problems_in(dir.path());
    for (place, what) in [
        ("v.toml:5:", "verify.send must contain {code}"),
        ("v.toml:6:", "verify.voice must contain {code}"),
        ("v.toml:12:", "ivr.read_code must contain {code}"),
        ("v.toml:11:", "there is no [ivr.menu.*] at all"),
        (
            "v.toml:7:",
            "verify.send, verify.api_send, verify.voice and ivr.read_code",
        ),
        (
            "v.toml:8:",
            "verify.welcome_back: unknown placeholder {code}",
        ),
        (
            "v.toml:13:",
            r#"ivr.read_code_callers is "verified", expected "any" or "attested""#,
        ),
    ] {
        assert!(
            problems
                .lines()
                .any(|l| l.contains(place) && l.contains(what)),
            "{place} {what}:\n{problems}"
        );
    }
}

/// TOML shape mistakes are told in the flow's words, with what to write instead; an empty
/// pattern, which no answer could meet, is refused; a key or table written twice is named.
#[test]
fn a_shape_mistake_says_what_to_write_instead() {
    let cases = [
        (
            "[bot]\nname = \"X\"\n\n[form.field]\nkey = \"a\"\nask = \"A?\"\n",
            "a.toml:4:1:",
            "[form.field] is one table, but field is a list of them: write [[form.field]] (two brackets) before each",
        ),
        (
            "[[sequence]]\nname = \"s\"\n[sequence.steps]\nsay = \"hi\"\n",
            "a.toml:3:1:",
            "[sequence.steps] is one table, but steps is a list of them: write [[sequence.steps]] (two brackets) before each",
        ),
        (
            "[bot]\nname = \"X\"\n[keywords]\nopt_out = \"STOP2\"\n",
            "a.toml:4:11:",
            "such as [\"STOP2\"]",
        ),
        // A list of names written as a table is not a list of tables.
        (
            "[bot]\nname = \"X\"\n\n[form.extra_fields]\nzip = \"x\"\n",
            "a.toml:4:1:",
            "[form.extra_fields] is a table, but extra_fields is a list of values: under [form], write extra_fields = [\"…\", \"…\"]",
        ),
        (
            "[[sequence]]\nname = \"s\"\nsteps = [{ ask = \"A?\", expect = { choices = { X = 1 } } }]\n",
            "a.toml:3:",
            "choice \"X\" has 1 as its label: a label is text, in quotes (X = \"1\")",
        ),
        (
            "[bot]\nname = \"X\"\n[[sequence]]\nname = \"s\"\nweight = \"2\"\nsteps = [ { after = \"0s\", say = \"hi\" } ]\n",
            "a.toml:5:10:",
            "a number is written without quotes",
        ),
        (
            "[verify]\ncode_length = 99999999999999999999\n",
            "a.toml:2:15:",
            "99999999999999999999 is out of range: no setting takes a number this far from 0",
        ),
        (
            "[verify]\ncode_length = 10000000000000000000\n",
            "a.toml:2:15:",
            "10000000000000000000 is out of range",
        ),
        (
            "[bot]\nname = 99999999999999999999\n",
            "a.toml:2:8:",
            "written in quotes",
        ),
        (
            "[bot]\nname = \"X\"\n[[form.field]]\nkey = \"zip\"\nask = \"Zip?\"\nexpect = { pattern = \"\" }\n",
            "a.toml:6:",
            "empty pattern: no answer could ever match it",
        ),
        (
            "[bot]\nname = \"X\"\n[keywords]\nopt_in = [\"GO\"]\n\n[ keywords ]\nedit = [\"ME\"]\n",
            "a.toml:6:3:",
            "table [ keywords ] is already defined in this file; merge the two",
        ),
        (
            "[bot]\nname = \"X\"\n[ivr.menu.main]\nsay = \"Hi\"\n[ivr.menu.main] # again\nsay = \"Ho\"\n",
            "a.toml:5:",
            "table [ivr.menu.main] is already defined in this file; merge the two",
        ),
        (
            "[bot]\nname = \"X\"\nname = \"Y\"\n",
            "a.toml:3:1:",
            "key \"name\" is written twice in its table; keep one",
        ),
        // The loader's own type names never show; what to write does.
        (
            "[bot]\nname = \"X\"\nquiet_hours = \"21:00-08:00\"\n",
            "a.toml:3:15:",
            "expected a table such as { from = \"21:00\", to = \"08:00\" }",
        ),
        (
            "[verify]\ncode_length = 6.0\n",
            "a.toml:2:15:",
            "expected a whole number (without a decimal point, as in code_length = 6)",
        ),
        (
            "[verify]\nttl = 600\n",
            "a.toml:2:7:",
            "written in quotes, as in ttl = \"10m\"",
        ),
        (
            "[[form.field]]\nkey = \"a\"\n",
            "a.toml:1:1:",
            "missing field `ask`, which this table needs (the rest of this file is not checked",
        ),
        (
            "[[form.field]]\nkey = \"1st\"\nask = \"A?\"\n",
            "a.toml:2:",
            "field key \"1st\" must start with a letter a-z, then a-z, 0-9 or _",
        ),
        // A choice no one could give: a reply with the word stop asks to stop, and both its
        // key and its label have it. (Key A with that label is fine: "A" gives it.)
        (
            "[[form.field]]\nkey = \"goal\"\nask = \"Goal?\"\nexpect = { choices = { stop_now = \"stop_drinking\", B = \"run\" } }\n",
            "a.toml:4:",
            "choice \"stop_now\" = \"stop_drinking\" has the word stop or unsubscribe in both",
        ),
        // A code that expires before anyone could type it back.
        (
            "[verify]\nttl = \"500ms\"\n",
            "a.toml:2:",
            "bad duration \"500ms\" for verify.ttl: must be at least 1s",
        ),
        // An unknown placeholder lists what that text may hold, and nothing it may not.
        (
            "[[sequence]]\nname = \"s\"\nsteps = [{ after = \"0s\", say = \"x {sequense}\" }]\n",
            "a.toml:3:",
            "unknown placeholder {sequense} (this text knows {bot.name}, {sequence}, {field.KEY})",
        ),
        (
            "[ivr]\ngoodbye = \"Bye {nme}\"\n",
            "a.toml:2:",
            "unknown placeholder {nme} (this text knows {bot.name})",
        ),
        // A bad pattern in the author's own words, on one line.
        (
            "[[form.field]]\nkey = \"a\"\nask = \"A?\"\nexpect = { pattern = \"([a-z\" }\n",
            "a.toml:4:",
            "bad pattern \"([a-z\": unclosed character class",
        ),
    ];
    // A choice whose label has the word stop, given by its key, is one people can answer.
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "a.toml",
        "[[form.field]]\nkey = \"goal\"\nask = \"Goal? A) stop smoking, B) cut down\"\nexpect = { choices = { A = \"stop_smoking\", B = \"cut_down\" } }\n",
    );
    smsflow::flows::load_dir(dir.path()).expect("A gives stop_smoking");
    for (text, place, hint) in cases {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "a.toml", text);
        let problems = problems_in(dir.path());
        assert!(
            problems
                .lines()
                .any(|l| l.contains(place) && l.contains(hint)),
            "{place} {hint}:\n{problems}"
        );
        // (Not in the temporary dir's random name, which may hold `i64`.)
        let words = problems.replace(&dir.path().display().to_string(), "");
        assert!(!words.contains("struct Raw"), "{problems}");
        assert!(!words.contains("i64"), "{problems}");
    }
}

#[test]
fn an_empty_flow_file_is_a_problem_not_an_empty_flow_set() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "a.toml", "[bot]\nname = \"Bot\"\n");
    write(dir.path(), "b.toml", " \n");
    // Comments alone (a file caught with its header written, the rest not yet) are empty too.
    write(dir.path(), "c.toml", "# the follow-ups\n\n  # more soon\n");
    let out = smsflow().arg("check").arg(dir.path()).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(stderr.contains("b.toml:1:1: empty flow file"), "{stderr}");
    assert!(
        stderr.contains("c.toml:1:1: empty flow file (comments only)"),
        "{stderr}"
    );
}

/// A file saved in another encoding is located at its first byte that is not UTF-8.
#[test]
fn a_flow_file_that_is_not_utf8_is_located_at_its_first_bad_byte() {
    let dir = tempfile::tempdir().unwrap();
    let mut text = b"[bot]\nname = \"Caf".to_vec();
    text.extend([0xE9, b'"', b'\n']);
    std::fs::write(dir.path().join("a.toml"), text).unwrap();
    let out = smsflow().arg("check").arg(dir.path()).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stderr.contains("a.toml:2:12: byte 0xE9 is not UTF-8: save the file as UTF-8"),
        "{stderr}"
    );
}

/// Every file that cannot be read is told in one run, not only the first: a fix for one does
/// not meet the next at the next check.
#[cfg(unix)]
#[test]
fn every_flow_file_that_cannot_be_read_is_told_in_one_run() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("a.toml"), b"[bot]\nname = \"Caf\xE9\"\n").unwrap();
    std::os::unix::fs::symlink(dir.path().join("gone.toml"), dir.path().join("b.toml")).unwrap();
    std::fs::write(dir.path().join("c.toml"), b"# only \xFF\n").unwrap();
    write(dir.path(), "d.toml", "[bot]\nname = \"Bot\"\n");
    // Names that are no file: not skipped (the set would load without them), nor opened (a
    // named pipe would be waited on for ever).
    let made = Command::new("mkfifo")
        .arg(dir.path().join("e.toml"))
        .status()
        .unwrap();
    assert!(made.success());
    std::fs::create_dir(dir.path().join("f.toml")).unwrap();
    let out = smsflow().arg("check").arg(dir.path()).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8(out.stderr).unwrap();
    for told in [
        "a.toml:2:12: byte 0xE9 is not UTF-8",
        "b.toml:1:1: cannot read: it is a link to ",
        "c.toml:1:8: byte 0xFF is not UTF-8",
        "e.toml:1:1: cannot read: it is a named pipe, not a file",
        "f.toml:1:1: cannot read: it is a directory, not a file",
    ] {
        assert!(stderr.contains(told), "{told:?} not in {stderr}");
    }
}

#[cfg(unix)]
#[test]
fn a_flow_file_link_to_nothing_cannot_be_read_but_hidden_files_and_lock_links_are_ignored() {
    use std::os::unix::fs::symlink;
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "a.toml", "[bot]\nname = \"Bot\"\n");
    // Emacs's lock: a dangling link named like a hidden flow file.
    symlink("user@host.1234:1700000000", dir.path().join(".#a.toml")).unwrap();
    // macOS's AppleDouble file beside a copied one, or any hidden file: no flow file either.
    write(dir.path(), "._a.toml", "\u{0}\u{5}\u{16}\u{7} not TOML [");
    smsflow::flows::load_dir(dir.path()).expect("hidden files are no flow files");
    // A link to a flow file that is not there: not skipped, or the set would load without it.
    symlink(
        dir.path().join("elsewhere.toml.missing"),
        dir.path().join("b.toml"),
    )
    .unwrap();
    let out = smsflow().arg("check").arg(dir.path()).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(stderr.contains("b.toml:1:1: cannot read: "), "{stderr}");
    assert!(
        stderr.contains("it is a link to ")
            && stderr.contains("elsewhere.toml.missing, which is not there"),
        "{stderr}"
    );
}

#[test]
fn problems_are_listed_in_reading_order_whatever_check_found_first() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "flows.toml",
        r#"
[[sequence]]
name = "s"
steps = [ { after = "1s", say = "hi {field.zzz}" } ]

[verify]
ttl = "ten minutes please"

[[form.field]]
key = "age"
ask = "Age? {field.nope}"
"#,
    );
    let found = problems_in(dir.path());
    let lines: Vec<usize> = found
        .lines()
        .filter_map(|l| l.split(':').nth(1)?.parse().ok())
        .collect();
    assert_eq!(lines, [4, 7, 11], "{found}");
}

/// Twilio's 1,600-character limit counts an emoji as two: a text of 801 emoji is over it.
#[test]
fn a_text_over_twilios_limit_as_twilio_counts_it_is_refused() {
    let text = |n: usize| {
        format!(
            "[bot]\nname = \"X\"\n[replies]\nhelp = \"{}\"\n",
            "🙂".repeat(n)
        )
    };
    fits_until(text, 800, "a.toml:4:", "replies.help is longer than 1600");
}

/// The flow `text(fits)` passes check; `text(fits + 1)` is refused with `problem` at `at`.
fn fits_until(text: impl Fn(usize) -> String, fits: usize, at: &str, problem: &str) {
    let dir = tempfile::tempdir().unwrap();
    let file = at.split(':').next().unwrap();
    write(dir.path(), file, &text(fits));
    smsflow::flows::load_dir(dir.path()).expect("within the limit");
    write(dir.path(), file, &text(fits + 1));
    let problems = problems_in(dir.path());
    assert!(
        problems.contains(at) && problems.contains(problem),
        "{problems}"
    );
}

/// Every command that loads flows (`check`, `test`, `simulate`, `export`) lists a broken
/// directory's problems and counts them, the same way.
#[test]
fn every_command_that_loads_broken_flows_lists_and_counts_their_problems() {
    let broken = tempfile::tempdir().unwrap();
    write(broken.path(), "a.toml", "[bot]\nname = \n");
    let dir = broken.path().to_str().unwrap();
    let data = tempfile::tempdir().unwrap();
    drop(smsflow::store::Store::open(data.path()).unwrap());
    let data = data.path().to_str().unwrap();
    let runs: [&[&str]; 4] = [
        &["check", dir],
        &["test", dir],
        &["simulate", "--flows", dir],
        &["export", "--data", data, "--flows", dir],
    ];
    for args in runs {
        let out = smsflow().args(args).output().unwrap();
        assert_eq!(out.status.code(), Some(1), "smsflow {args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("a.toml:2:"), "smsflow {args:?}: {stderr}");
        assert!(
            stderr.contains(&format!("1 problem(s) in {dir}")),
            "smsflow {args:?}: {stderr}"
        );
    }
}

/// `smsflow check flows | head -0`: the reader is gone before anything is written. The
/// commands lose their output and end with their usual exit code, not a panic (101).
#[test]
fn check_test_and_simulate_end_normally_when_their_output_is_no_longer_read() {
    use std::io::Write;
    use std::process::Stdio;
    let broken = tempfile::tempdir().unwrap();
    write(broken.path(), "a.toml", "[bot]\nname = \n");
    let runs: [(&[&str], &str, i32); 4] = [
        (&["check", "flows"], "", 0),
        (&["check", broken.path().to_str().unwrap()], "", 1),
        (&["test", "flows"], "", 0),
        (&["simulate", "--flows", "flows"], "HELP\nJOIN\n", 0),
    ];
    for (args, input, code) in runs {
        // Its stdout and stderr are pipes whose reading ends are already closed: its first
        // write to either fails, as after `| head -0`.
        let (out_reader, out_writer) = std::io::pipe().unwrap();
        let (err_reader, err_writer) = std::io::pipe().unwrap();
        drop((out_reader, err_reader));
        let mut child = smsflow()
            .args(args)
            .stdin(Stdio::piped())
            .stdout(out_writer)
            .stderr(err_writer)
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(input.as_bytes()).unwrap();
        drop(stdin);
        let status = child.wait().unwrap();
        assert_eq!(status.code(), Some(code), "smsflow {args:?}");
    }
}

/// A code fills `{code}` with its digits: a text that is within the limit as written is
/// over it once a 10-digit code is in it.
#[test]
fn a_code_text_is_measured_with_its_code_filled_in() {
    let dir = tempfile::tempdir().unwrap();
    let text = |digits: u8| {
        format!(
            "[bot]\nname = \"X\"\n[verify]\ncode_length = {digits}\nsend = \"{}{{code}}\"\n",
            "x".repeat(1594)
        )
    };
    write(dir.path(), "a.toml", &text(6));
    smsflow::flows::load_dir(dir.path()).expect("1,594 characters and 6 digits fit");
    write(dir.path(), "a.toml", &text(10));
    let problems = problems_in(dir.path());
    assert!(
        problems.contains("a.toml:5:")
            && problems.contains("verify.send is longer than 1600")
            && problems.contains("10 digits"),
        "{problems}"
    );
}

/// The bot's name fills `{bot.name}` and a spoken code is read out digit by digit: a text is
/// measured that way. One whose braces do not parse is still measured, as written.
#[test]
fn a_text_is_measured_with_the_bots_name_and_a_spoken_code_as_they_go_out() {
    let dir = tempfile::tempdir().unwrap();
    let x = |n: usize| "x".repeat(n);
    let flows = |name: &str, send: &str, voice: &str| {
        format!(
            "[bot]\nname = \"{name}\"\n[verify]\ncode_length = 10\nsend = \"{send}\"\nvoice = \"{voice}\"\n"
        )
    };
    let send = format!("{}{{bot.name}}{{code}}", x(1580));
    write(dir.path(), "a.toml", &flows("Bot", &send, "Code {code}"));
    smsflow::flows::load_dir(dir.path()).expect("1,580 + 3 + 10 fit");
    write(dir.path(), "a.toml", &flows(&x(20), &send, "Code {code}"));
    let problems = problems_in(dir.path());
    assert!(
        problems.contains("a.toml:5:") && problems.contains("{bot.name} is the bot's name"),
        "{problems}"
    );

    // Ten digits read out are "0, 0, …": 28 characters.
    let voice = format!("{}{{code}}", x(1580));
    write(dir.path(), "a.toml", &flows("Bot", "{code}", &voice));
    let problems = problems_in(dir.path());
    assert!(
        problems.contains("a.toml:6:")
            && problems.contains("verify.voice is longer than 1600")
            && problems.contains("read out one by one"),
        "{problems}"
    );

    // A brace left open: both problems are told.
    let broken = format!("{}{{code", x(1600));
    write(dir.path(), "a.toml", &flows("Bot", &broken, "Code {code}"));
    let problems = problems_in(dir.path());
    assert!(
        problems.contains("verify.send is longer than 1600") && problems.contains("verify.send: "),
        "{problems}"
    );
}

/// A voice menu's `say:` key is measured as every other text is.
#[test]
fn a_say_key_longer_than_a_text_may_be_is_refused() {
    let flow = |n: usize| {
        format!(
            "[ivr.menu.main]\nsay = \"Press 1\"\npress = {{ \"1\" = \"say:{}{{bot.name}}\" }}\n",
            "x".repeat(n)
        )
    };
    // "smsflow", the default bot name, is 7 characters: 1,593 + 7 fit.
    fits_until(
        flow,
        1593,
        "v.toml:3:",
        "ivr.menu.main: `say:` text is longer than 1600",
    );
}

/// A text left to its default is measured too: a bot's name can make one too long, and
/// the problem points at the name, with both ways out.
#[test]
fn a_bot_name_that_makes_a_default_text_too_long_is_named_as_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let flows = |name: usize| {
        format!(
            "[bot]\nname = \"{}\"\n[verify]\nsend = \"Code {{code}}\"\n",
            "x".repeat(name)
        )
    };
    write(dir.path(), "a.toml", &flows(1500));
    smsflow::flows::load_dir(dir.path()).expect("every default text fits with 1,500");
    write(dir.path(), "a.toml", &flows(2000));
    let problems = problems_in(dir.path());
    for what in [
        "the default replies.help 2043 characters, over the 1600 of a text",
        "the default replies.not_joined",
        "the default verify.voice a call of",
    ] {
        assert!(
            problems.lines().any(|l| l.contains("a.toml:2:")
                && l.contains("bot.name is 2000 characters, which makes")
                && l.contains(what)
                && l.contains("shorten bot.name, or set ")),
            "{what}:\n{problems}"
        );
    }
    assert!(!problems.contains("verify.send"), "{problems}");
}

/// An answer filled into a text counts as the most of it a too-long text keeps (41
/// characters), so a code is never what gets cut; and a question must fit with its retry,
/// which go out as one message when an answer is refused.
#[test]
fn texts_are_measured_with_answers_at_their_longest_and_questions_with_their_retry() {
    let dir = tempfile::tempdir().unwrap();
    let x = |n: usize| "x".repeat(n);
    let send = format!("Hi {{field.first_name}}! {} code {{code}}", x(1560));
    write(
        dir.path(),
        "a.toml",
        &format!(
            "[bot]\nname = \"B\"\n[verify]\nsend = \"{send}\"\n[[form.field]]\nkey = \"first_name\"\nask = \"Name?\"\n"
        ),
    );
    let problems = problems_in(dir.path());
    assert!(
        problems.contains("a.toml:4:")
            && problems.contains("verify.send is longer than 1600")
            && problems.contains("an answer or a sequence's name counts 41 characters"),
        "{problems}"
    );

    let form = |ask: usize, retry: usize| {
        format!(
            "[bot]\nname = \"B\"\n[[form.field]]\nkey = \"a\"\nask = \"{}\"\nretry = \"{}\"\n",
            x(ask),
            x(retry)
        )
    };
    // Retry, question and the saved answer's note (`(now: {current}; reply KEEP to keep
    // it)`, 71 with the answer at its longest): 527 + 1 + 1,000 + 1 + 71 = 1,600 fit.
    write(dir.path(), "a.toml", &form(1000, 527));
    smsflow::flows::load_dir(dir.path()).expect("fits with its retry");
    write(dir.path(), "a.toml", &form(1000, 528));
    let problems = problems_in(dir.path());
    assert!(
        problems.contains("a.toml:5:")
            && problems
                .contains("form field \"a\": its retry and question (and form.current) go out")
            && problems.contains("1601 characters"),
        "{problems}"
    );

    let sequence = format!(
        "[bot]\nname = \"B\"\n[[sequence]]\nname = \"s\"\nsteps = [{{ after = \"1d\", ask = \"{}\", retry = \"{}\" }}]\n",
        x(1000),
        x(700)
    );
    write(dir.path(), "a.toml", &sequence);
    let problems = problems_in(dir.path());
    assert!(
        problems.contains("its retry and question go out as one message"),
        "{problems}"
    );
}

/// The OTP API's voice call reads `verify.voice` twice, as inline TwiML Twilio takes up to
/// 4,000 characters of; quotes and ampersands grow when escaped. A text within 1,600 that
/// makes a longer call is refused.
#[test]
fn a_voice_code_text_that_makes_a_call_too_long_for_twilio_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let voice = |text: &str| format!("[bot]\nname = \"B\"\n[verify]\nvoice = '{text} {{code}}'\n");
    write(dir.path(), "a.toml", &voice(&"x".repeat(1500)));
    smsflow::flows::load_dir(dir.path()).expect("twice 1,500 and some is within 4,000");
    write(
        dir.path(),
        "a.toml",
        &voice(&"Tom & Jerry & co ".repeat(90)),
    );
    let problems = problems_in(dir.path());
    assert!(
        problems.contains("a.toml:4:")
            && problems.contains("verify.voice makes a call of")
            && problems.contains("over Twilio's 4000"),
        "{problems}"
    );
}

#[test]
fn thanks_belongs_on_a_question_and_is_checked_like_any_text() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "flows.toml",
        r#"[form]
extra_fields = ["rating"]

[[sequence]]
name = "s"
steps = [
  { say = "Hi", thanks = "Thanks!" },
  { ask = "Rate us 1-5", save = "rating", expect = { range = [1, 5] }, thanks = "Thanks {field.ratin}!" },
]
"#,
    );
    let problems = problems_in(dir.path());
    assert!(
        problems.contains("flows.toml:7:")
            && problems.contains("`thanks` only belongs on an `ask` step"),
        "{problems}"
    );
    assert!(
        problems.contains("flows.toml:8:") && problems.contains("{field.ratin}"),
        "{problems}"
    );
}

#[test]
fn a_daemon_wide_code_limit_of_none_an_hour_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "a.toml",
        "[bot]\nname = \"X\"\n[verify]\nmax_codes_per_hour = 0\n",
    );
    let problems = problems_in(dir.path());
    assert!(
        problems.contains("a.toml:4:22: verify.max_codes_per_hour is 0, must be from 1 to 1000000"),
        "{problems}"
    );
}

/// Keywords are matched before answers: a range that holds a number made a keyword could
/// never be answered with it, and `check` says so (a sequence question's range may hold
/// KEEP's numbers, a form field's may not).
#[test]
fn a_range_holding_a_keyword_number_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "flows.toml",
        "[keywords]\nhelp = [\"1\"]\nkeep = [\"9\"]\n\n[[form.field]]\nkey = \"score\"\n\
         ask = \"Rate us 1-5\"\nexpect = { range = [1, 5] }\n\n[[form.field]]\nkey = \"n\"\n\
         ask = \"1 to 10?\"\nexpect = { range = [2, 10] }\n\n[[sequence]]\nname = \"s\"\n\
         steps = [{ ask = \"And now?\", save = \"n\", expect = { range = [2, 10] } }]\n\n\
         [[form.field]]\nkey = \"m\"\nask = \"Below zero?\"\nexpect = { range = [-5, -1] }\n",
    );
    let problems = problems_in(dir.path());
    let expected = [
        (
            "flows.toml:8:10:",
            "range [1, 5] holds 1, which is a keyword (keywords.help), so no one could answer with it",
        ),
        ("flows.toml:13:10:", "range [2, 10] holds 9, which is a keyword (keywords.keep)"),
        // `-1` is read as the keyword 1: the minus sign goes with the punctuation.
        ("flows.toml:22:10:", "range [-5, -1] holds 1, which is a keyword (keywords.help)"),
    ];
    assert_told(&problems, &expected);
    assert_eq!(
        problems.matches("which is a keyword").count(),
        3,
        "{problems}"
    );
}

/// A voice menu that reads codes with `read_code_callers` left to its default ("any") is
/// warned of: caller ID can be spoofed. Said either way, it is no warning.
#[test]
fn a_menu_reading_codes_to_any_caller_by_default_is_warned_of() {
    let shipped = std::fs::read_to_string("flows/bot.toml").unwrap();
    let unsaid: String = (shipped.lines())
        .filter(|l| !l.trim_start().starts_with("read_code_callers"))
        .map(|l| format!("{l}\n"))
        .collect();
    for (text, warned) in [
        (unsaid.clone(), true),
        (shipped.clone(), false),
        (
            unsaid.replace("[ivr]\n", "[ivr]\nread_code_callers = \"any\"\n"),
            false,
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "bot.toml", &text);
        let out = smsflow().arg("check").arg(dir.path()).output().unwrap();
        assert!(out.status.success());
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert_eq!(
            stderr.contains("warning: read_code reads a code to any caller"),
            warned,
            "{stderr}"
        );
    }
}
