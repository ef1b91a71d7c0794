//! `smsflow test`: transcripts run against the engine; a mismatch names file:line.

use std::process::Command;

/// `smsflow test DIR`, run to its end.
fn smsflow_test(dir: &std::path::Path) -> std::process::Output {
    let test = Command::new(env!("CARGO_BIN_EXE_smsflow"))
        .arg("test")
        .arg(dir)
        .output();
    test.unwrap()
}

#[test]
fn every_shipped_transcript_passes() {
    let out = Command::new(env!("CARGO_BIN_EXE_smsflow"))
        .args(["test", "flows"])
        .output()
        .unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains(" passed, 0 failed"), "{stdout}");
    assert!(
        stdout.lines().filter(|l| l.starts_with("ok ")).count() >= 14,
        "{stdout}"
    );
}

#[test]
fn a_wrong_expectation_fails_with_file_line_expected_and_actual() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("tests")).unwrap();
    for f in std::fs::read_dir("flows").unwrap() {
        let f = f.unwrap().path();
        if f.extension().is_some_and(|x| x == "toml") {
            std::fs::copy(&f, dir.path().join(f.file_name().unwrap())).unwrap();
        }
    }
    std::fs::write(
        dir.path().join("tests/bad.txt"),
        "# header\n> hello\n< Welcome aboard!\n",
    )
    .unwrap();
    let out = smsflow_test(dir.path());
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(
        stdout.contains("bad.txt:3: expected: Welcome aboard!"),
        "{stdout}"
    );
    assert!(
        stdout.contains("actual: Acme Contest: reply JOIN to enter the contest."),
        "{stdout}"
    );
}

/// A flow dir with a bot of its own and one passing transcript, `tests/real.txt`.
fn quiet_bot() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("tests")).unwrap();
    std::fs::write(dir.path().join("bot.toml"), "[bot]\nname = \"Quiet\"\n").unwrap();
    std::fs::write(
        dir.path().join("tests/real.txt"),
        "> HELP\n< Quiet: reply JOIN to subscribe, STOP to opt out.\n",
    )
    .unwrap();
    dir
}

/// A transcript that is no file (a named pipe would be waited on for ever) or not UTF-8 fails
/// itself, located, and the run goes on.
#[test]
fn a_transcript_that_is_no_file_or_not_utf8_fails_itself_located() {
    let dir = quiet_bot();
    let fifo = dir.path().join("tests/pipe.txt");
    let made = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(made.success());
    std::fs::write(dir.path().join("tests/latin.txt"), b"> HELP\n< caf\xE9\n").unwrap();
    // Links that name each other; and hidden files, which are no transcripts (an editor's
    // lock, macOS's copy of a file's attributes): left out.
    std::os::unix::fs::symlink("loop2.txt", dir.path().join("tests/loop1.txt")).unwrap();
    std::os::unix::fs::symlink("loop1.txt", dir.path().join("tests/loop2.txt")).unwrap();
    std::os::unix::fs::symlink("user@host.1", dir.path().join("tests/.#real.txt")).unwrap();
    std::fs::write(dir.path().join("tests/._real.txt"), b"\0\x05\x16\x07").unwrap();
    let out = smsflow_test(dir.path());
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8(out.stdout).unwrap();
    for said in [
        "latin.txt:2: byte 0xE9 is not UTF-8",
        "pipe.txt:1: cannot read: it is a named pipe, not a file",
        "loop1.txt:1: cannot read: it is a link in a loop of links",
        "1 passed, 4 failed",
    ] {
        assert!(stdout.contains(said), "{said:?} not in {stdout}");
    }
}

/// A transcript with nothing in it but comments (or directives: a seed, a wait) passed as
/// `ok`, vouching for nothing.
#[test]
fn an_empty_transcript_fails_as_one_that_tests_nothing() {
    let dir = quiet_bot();
    std::fs::write(dir.path().join("tests/empty.txt"), "").unwrap();
    std::fs::write(dir.path().join("tests/notes.txt"), "# to do\n\n").unwrap();
    std::fs::write(dir.path().join("tests/setup.txt"), "! seed 1\n~ 1d\n").unwrap();
    let out = smsflow_test(dir.path());
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8(out.stdout).unwrap();
    for name in ["empty.txt", "notes.txt", "setup.txt"] {
        assert!(
            stdout
                .lines()
                .any(|l| l.contains(&format!("tests/{name}: nothing to run"))),
            "{stdout}"
        );
    }
    assert!(stdout.contains("1 passed, 3 failed"), "{stdout}");
}

/// `\n` in a transcript is a line break; a text that says backslash-n (a flow's single-quoted
/// TOML string) is written `\\n`, and does not pass for one with a line break.
#[test]
fn a_line_break_and_a_backslash_n_are_told_apart() {
    let flows = |not_joined: &str| {
        smsflow::flows::load_sources(vec![(
            "f.toml".into(),
            format!("[bot]\nname = \"B\"\n[replies]\nnot_joined = {not_joined}\n"),
        )])
        .unwrap()
    };
    let broken = flows("'Welcome!\\nReply JOIN.'");
    let right = flows("\"Welcome!\\nReply JOIN.\"");
    let expect_break = "> hi\n< Welcome!\\nReply JOIN.\n";
    let expect_backslash = "> hi\n< Welcome!\\\\nReply JOIN.\n";
    let run = |f: &smsflow::flows::Flows, text: &str| {
        smsflow::transcript::run(f, "t.txt".as_ref(), text).map_err(|e| e.to_string())
    };
    assert!(run(&right, expect_break).is_ok());
    let failed = run(&broken, expect_break).expect_err("a backslash-n is no line break");
    assert!(
        failed.contains("actual: Welcome!\\\\nReply JOIN."),
        "{failed}"
    );
    assert!(run(&broken, expect_backslash).is_ok());
    assert!(run(&right, expect_backslash).is_err());
    // A backslash written alone: the texts read the same, so the failure says how to write it.
    let path = flows("'Saved to C:\\data'");
    run(&path, "> hi\n< Saved to C:\\\\data\n").unwrap();
    let failed = run(&path, "> hi\n< Saved to C:\\data\n").unwrap_err();
    assert!(failed.contains("a backslash is written \\\\"), "{failed}");
}

/// What a `>` line sends is written as an expected text is: `\n` is a line break. A failure
/// names the first difference in the texts themselves, where a line break is one character.
#[test]
fn a_sent_line_break_is_written_as_n_and_a_difference_is_counted_in_the_texts() {
    let flows = smsflow::flows::load_dir("flows".as_ref()).unwrap();
    let run = |thanks: &str| {
        let text = format!(
            "! seed 0\n> JOIN\n< {{*}}{{$code}}. Reply with it to confirm.\n> {{$code}}\n< {{*}}\n\
             < What's your first name?\n> Ann\\nMarie\n< {{*}}\n> a\n< {{*}}\n> b\n\
             < Thanks {thanks}! You'll get a short daily reminder.\n? field first_name = Ann\\nMarie\n"
        );
        smsflow::transcript::run(&flows, "t.txt".as_ref(), &text).map_err(|e| e.to_string())
    };
    run("Ann\\nMarie").unwrap();
    let failed = run("Ann Marie").unwrap_err();
    assert!(
        failed.contains(
            "first difference at character 11: expected ' ' (U+0020), actual '\\n' (U+000A)"
        ),
        "{failed}"
    );
}

#[test]
fn odd_transcript_text_fails_at_its_line_instead_of_crashing() {
    let flows = smsflow::flows::load_dir("flows".as_ref()).unwrap();
    let run = |text: &str| smsflow::transcript::run(&flows, "t.txt".as_ref(), text);
    // A byte-order mark (as some editors save) is not part of the first line.
    run("\u{feff}# saved on Windows\n> HELP\n< Acme Contest: {*}\n").unwrap();
    let err = run("> HELP\né what\n").unwrap_err();
    assert_eq!(err.line, 2, "{err}");
    let err = run("~ 99999999d\n").unwrap_err();
    assert!(err.message.contains("century"), "{err}");
    // A capture with no name (or one a regex group cannot have) says how to name it; a
    // name in another script is a name.
    run("> HELP\n< {$prénom}\n").unwrap();
    for bad in ["{$}", "{$1st}", "{$a-b}"] {
        let err = run(&format!("> HELP\n< Acme Contest: {bad}\n")).unwrap_err();
        assert_eq!(err.line, 2, "{err}");
        assert!(
            err.message
                .contains("a capture's name is letters, digits and _"),
            "{err}"
        );
    }
}

/// A failure a reader could not see: the first differing character is named by code
/// point. A field or sequence the flows do not have is named as a typo, not a wrong value.
#[test]
fn a_failure_names_what_it_cannot_show_and_a_typo_in_a_check_is_called_one() {
    let flows = smsflow::flows::load_dir("flows".as_ref()).unwrap();
    let run = |text: &str| smsflow::transcript::run(&flows, "t.txt".as_ref(), text);
    let help = "Acme\u{a0}Contest: reply JOIN to enter, PROFILE to update your answers, STOP to opt out. Msg&data rates may apply.";
    run(&format!("> HELP\n< {}\n", help.replace('\u{a0}', " "))).unwrap();
    let err = run(&format!("> HELP\n< {help}\n")).unwrap_err();
    assert!(
        err.message.contains("first difference at character 5")
            && err.message.contains("(U+00A0), actual ' ' (U+0020)"),
        "{err}"
    );
    let err = run("> HELP\n? field frist_name = Ann\n").unwrap_err();
    assert!(
        err.message.contains("no field is called \"frist_name\"")
            && err.message.contains("first_name"),
        "{err}"
    );
    let err = run("> HELP\n? sequence dayly\n").unwrap_err();
    assert!(
        err.message.contains("no sequence is called \"dayly\"") && err.message.contains("daily"),
        "{err}"
    );
    // A declared one that is not set yet is still a plain mismatch, said as none.
    let err = run("> HELP\n? field first_name = Ann\n").unwrap_err();
    assert!(
        err.message
            .contains("expected field first_name = \"Ann\", actual: none saved"),
        "{err}"
    );
    let err = run("> HELP\n? sequence daily\n").unwrap_err();
    assert!(
        err.message
            .contains("expected sequence \"daily\", actual: none"),
        "{err}"
    );
}

#[test]
fn an_expected_message_must_go_to_the_number_the_transcript_texts_as() {
    let flows = smsflow::flows::load_dir("flows".as_ref()).unwrap();
    let run = |text: &str| smsflow::transcript::run(&flows, "t.txt".as_ref(), text);
    let join = "! phone +15550002222\n> HELP\n";
    run(&format!("{join}< Acme Contest: {{*}}\n")).unwrap();
    let err = run(&format!(
        "{join}! phone +15550001111\n< Acme Contest: {{*}}\n"
    ))
    .unwrap_err();
    assert_eq!(err.line, 4, "{err}");
    assert!(err.message.contains("went to +15550002222"), "{err}");
}

/// A failure says what a transcript writer needs: a misspelt state is no state, a capture
/// bound earlier shows its value, and a message nobody expected names the number it went to.
#[test]
fn failures_name_a_misspelt_state_a_bound_capture_and_the_number_a_message_went_to() {
    let flows = smsflow::flows::load_dir("flows".as_ref()).unwrap();
    let run = |text: &str| smsflow::transcript::run(&flows, "t.txt".as_ref(), text);
    let err = run("> HELP\n< {*}\n? state verifed\n").unwrap_err();
    assert!(
        err.message
            .contains("no state is called \"verifed\" (one of: unverified,"),
        "{err}"
    );
    let err = run("! seed 0\n> JOIN\n< {*} your code is {$code}. {*}\n> JOIN\n< {*} your code is {$code}. {*}\n")
        .unwrap_err();
    assert_eq!(err.line, 5, "{err}");
    assert!(err.message.contains("(with {$code} = "), "{err}");
    let err = run("> HELP\n< {*}\n! phone +15550002222\n> HELP\n! phone +15550001111\n> HELP\n")
        .unwrap_err();
    assert!(
        err.message
            .contains("unexpected message from the bot to +15550002222"),
        "{err}"
    );
    // A capture never closed is a typo, told as one.
    let err = run("! seed 0\n> JOIN\n< {*} your code is {$code\n").unwrap_err();
    assert!(
        err.message
            .contains("{$code is not closed: a capture is written {$name}"),
        "{err}"
    );
    // One more message than expected, at the end: told at the line that made it, with where
    // its `<` line goes.
    let err =
        run("! seed 0\n> JOIN\n< {*} your code is {$code}. {*}\n> {$code}\n< {*}\n").unwrap_err();
    assert_eq!(err.line, 4, "{err}");
    assert!(
        err.message
            .contains("unexpected message from the bot, after the replies expected up to line 5: "),
        "{err}"
    );
}

/// `! at` moves the clock as `~` does, firing the timers due on the way; it may set the
/// start, but not turn the clock back once a number has texted.
#[test]
fn setting_the_clock_fires_the_timers_due_on_the_way_and_cannot_turn_it_back() {
    let flows = smsflow::flows::load_dir("flows".as_ref()).unwrap();
    let run = |text: &str| smsflow::transcript::run(&flows, "t.txt".as_ref(), text);
    let joined = "! seed 0\n! at 2026-01-05T10:00:00Z\n> JOIN\n< {*} your code is {$code}. {*}\n> {$code}\n< You're in!{*}\n< What's your first name?\n";
    // The code expires after 10 minutes: an hour later, the first name is still asked (no
    // timer), and the reminder sequence has not started.
    run(&format!(
        "{joined}! at 2026-01-05T11:00:00Z\n> Ann\n< Your age group?{{*}}\n"
    ))
    .unwrap();
    let err = run(&format!("{joined}! at 2026-01-05T09:00:00Z\n")).unwrap_err();
    assert_eq!(err.line, 8, "{err}");
    assert!(err.message.contains("cannot turn the clock back"), "{err}");
    // Enrolled, then a jump of two days: the first reminder (a day on) is due on the way.
    let enrolled = format!(
        "{joined}> Ann\n< {{*}}\n> A\n< {{*}}\n> A\n< Thanks Ann!{{*}}\n! at 2026-01-07T10:00:00Z\n"
    );
    let err = run(&enrolled).unwrap_err();
    assert!(err.message.contains("unexpected message"), "{err}");
    run(&format!("{enrolled}< Reminder: {{*}}\n")).unwrap();
}

#[test]
fn a_transcript_that_cannot_be_read_fails_alone() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("tests")).unwrap();
    std::fs::write(dir.path().join("tests/a.txt"), [0xff, 0xfe, b'>', b'\n']).unwrap();
    std::fs::write(
        dir.path().join("tests/b.txt"),
        "> HELP\n< Acme Contest: {*}\n",
    )
    .unwrap();
    let flows = smsflow::flows::load_dir("flows".as_ref()).unwrap();
    let report = smsflow::transcript::run_dir(&flows, &dir.path().join("tests")).unwrap();
    assert_eq!(report.passed.len(), 1);
    assert_eq!(report.failures.len(), 1);
    assert!(
        report.failures[0]
            .message
            .contains("byte 0xFF is not UTF-8"),
        "{}",
        report.failures[0]
    );
}

#[test]
fn a_message_nobody_expected_fails_the_transcript() {
    let flows = smsflow::flows::load_dir("flows".as_ref()).unwrap();
    let err = smsflow::transcript::run(&flows, "t.txt".as_ref(), "> JOIN\n> HELP\n").unwrap_err();
    assert_eq!(err.line, 1);
    assert!(err.message.contains("unexpected message"), "{err}");
}

/// A capture used twice in one expected line must match the same text both times.
#[test]
fn a_capture_used_twice_in_a_line_matches_the_same_text_twice() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("f.toml"),
        "[bot]\nname = \"Twice\"\n\n[verify]\nsend = \"Code {code}. Reply {code} to confirm.\"\n",
    )
    .unwrap();
    let flows = smsflow::flows::load_dir(dir.path()).unwrap();
    let run = |text: &str| smsflow::transcript::run(&flows, "t.txt".as_ref(), text);
    run("> JOIN\n< Code {$code}. Reply {$code} to confirm.\n> {$code}\n< {*}\n").unwrap();
    let err = run("> JOIN\n< {$x} {$x}. Reply {*}\n").unwrap_err();
    assert!(err.message.starts_with("expected:"), "{err}");
}

/// The clock keeps to years a flow's timers and quiet hours can be reckoned in: `! at` far
/// past them is refused at its line, and jumps stop at the end of 9999, without a panic.
#[test]
fn the_clock_stays_within_years_a_flow_can_be_reckoned_in() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("f.toml"),
        "[bot]\nname = \"Far\"\ntimezone = \"Asia/Tokyo\"\nquiet_hours = { from = \"21:00\", to = \"08:00\" }\n\
         [[sequence]]\nname = \"s\"\nsteps = [{ after = \"1d\", say = \"later\" }]\n",
    )
    .unwrap();
    let flows = smsflow::flows::load_dir(dir.path()).unwrap();
    let run = |text: &str| smsflow::transcript::run(&flows, "t.txt".as_ref(), text);
    for at in [
        "+262142-12-31T20:00:00Z",
        "-262143-01-01T00:00:00Z",
        "1969-12-31T23:59:59Z",
    ] {
        let err = run(&format!("! at {at}\n> JOIN\n")).unwrap_err();
        assert_eq!(err.line, 1, "{err}");
        assert!(
            err.message.contains("from 1970 up to 9999-12-31T23:59:59Z"),
            "{err}"
        );
    }
    // Late on the last day allowed, then a century on: the day-later step is reckoned past
    // the end of 9999 without a panic, and the clock stops short of it.
    let joined = "! seed 0\n! at 9999-12-31T11:00:00Z\n> JOIN\n< Far: your code is {$code}. Reply with it to confirm.\n> {$code}\n< {*}\n? state in_sequence\n";
    run(&format!("{joined}~ 36500d\n? state in_sequence\n")).unwrap();
    let err = run(&format!("{joined}~ 36500d\n< later\n")).unwrap_err();
    assert!(err.message.contains("sent nothing more"), "{err}");
}

/// `smsflow simulate --seed 0` fed `input`: its output, once it ended with exit 0.
fn simulate(input: &[u8]) -> String {
    simulate_seeded(0, input)
}

fn simulate_seeded(seed: u64, input: &[u8]) -> String {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_smsflow"))
        .args(["simulate", "--seed", &seed.to_string()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()
}

/// In a call, several keys typed at once are refused with a hint, not texted (a code guess
/// by SMS would use up an attempt).
#[test]
fn simulate_in_a_call_takes_one_key_at_a_time() {
    let stdout = simulate(b"JOIN\n/call\n12\n/hangup\n/hangup\n/state\n");
    assert!(stdout.contains("press one key at a time"), "{stdout}");
    // A hang-up with no call says so (not "unknown command").
    assert!(stdout.contains("[no call in progress"), "{stdout}");
    assert!(!stdout.contains("didn't match"), "{stdout}");
    assert!(stdout.contains("+15550001111: awaiting_code"), "{stdout}");
}

/// A timed message to a number other than the one being texted as names its number (a reply
/// would answer as the current one).
#[test]
fn simulate_names_the_number_of_a_timed_message_to_another_number() {
    // Seed 0 draws the code 875780 and the daily reminders.
    let stdout = simulate(b"JOIN\n875780\nAnn\nA\nA\n/phone +15550002222\n/wait 1d\n");
    assert!(
        stdout.contains("< [to +15550001111] Reminder: the contest closes in 2 days."),
        "{stdout}"
    );
    assert!(stdout.contains("< You're in!"), "{stdout}");
}

/// A command that takes no argument, given one, says so instead of running (and one that
/// needs one, given none).
#[test]
fn simulate_refuses_a_word_after_a_command_that_takes_none() {
    let stdout = simulate(b"/otp extra\n/state x\n/state\n");
    assert!(stdout.contains("/otp takes nothing after it"), "{stdout}");
    assert!(stdout.contains("/state takes nothing after it"), "{stdout}");
    assert!(!stdout.contains("code_sent"), "{stdout}");
    assert!(
        stdout.contains("+15550001111: unverified (never seen)"),
        "{stdout}"
    );
    // And one that needs an argument, given none, shows how it is written.
    let stdout = simulate(b"/wait\n/phone\n");
    assert!(
        stdout.contains("/wait takes what follows it, as in /wait 1d"),
        "{stdout}"
    );
    assert!(
        stdout.contains("/phone takes what follows it, as in /phone +14155550100"),
        "{stdout}"
    );
}

/// As in the daemon, a code validated for a number never met leaves it unknown.
#[test]
fn simulate_validating_a_code_for_a_number_never_met_leaves_it_unknown() {
    let stdout = simulate(b"/validate 123456\n/state\n");
    assert!(
        stdout.contains("+15550001111: unverified (never seen)"),
        "{stdout}"
    );
}

/// A line that is not UTF-8 is refused with a word, and the simulator goes on.
#[test]
fn simulate_refuses_a_line_that_is_not_text_and_goes_on() {
    let stdout = simulate(b"caf\xe9\nJOIN\n/state\n");
    assert!(stdout.contains("not UTF-8"), "{stdout}");
    assert!(stdout.contains("< Acme Contest: your code is"), "{stdout}");
    assert!(stdout.contains("+15550001111: awaiting_code"), "{stdout}");
}

#[test]
fn simulate_drives_the_voice_menu_and_texts() {
    let stdout = simulate(b"/call\n7\n4\n9\n1\n/state\nJOIN\n/wait 1d\n/quit\n");
    assert!(
        stdout.contains("[voice] Welcome to Acme Contest. Press 1"),
        "{stdout}"
    );
    assert!(
        stdout.contains("[voice] Sorry, I didn't get that."),
        "{stdout}"
    );
    assert!(
        stdout.contains("[voice] The contest runs until the end of the month."),
        "{stdout}"
    );
    let spoken = stdout
        .lines()
        .find(|l| l.starts_with("[voice] Your Acme Contest code is"))
        .expect(&stdout);
    assert_eq!(spoken.chars().filter(char::is_ascii_digit).count(), 6);
    assert!(stdout.contains("[call ended]"));
    assert!(stdout.contains("+15550001111: awaiting_code"), "{stdout}");
    assert!(stdout.contains("< Acme Contest: your code is"), "{stdout}");
    assert!(
        stdout.contains("[clock is now 2026-01-06 15:00:00 UTC]"),
        "{stdout}"
    );
}

#[test]
fn the_transcript_sample_in_the_readme_passes() {
    let readme = std::fs::read_to_string("README.md").unwrap();
    let section = &readme[readme.find("## Transcripts").expect("the section")..];
    let start = section.find("```text\n").expect("a sample") + "```text\n".len();
    let end = start + section[start..].find("```").unwrap();
    let flows = smsflow::flows::load_dir("flows".as_ref()).unwrap();
    if let Err(e) = smsflow::transcript::run(&flows, "README.md".as_ref(), &section[start..end]) {
        panic!("the README's transcript fails: {e:?}");
    }
}

/// `/validate` takes a code as the daemon's validate_otp does: a text that is not
/// `code_length` digits is refused (the daemon's 400) and costs no attempt, so the
/// simulator cannot verify with `123-456` or lock a code with `12345`s the daemon refuses.
#[test]
fn simulate_validate_refuses_what_the_otp_api_refuses_and_counts_no_attempt() {
    let stdout = simulate(b"/otp\n/validate 12345\n/validate 123-456\n/validate abc\n/state\n");
    assert_eq!(
        stdout
            .matches("[otp api: 400, exit 2: otp must be 6 digits]")
            .count(),
        3,
        "{stdout}"
    );
    assert!(!stdout.contains("invalid OTP"), "{stdout}");
    assert!(stdout.contains("+15550001111: awaiting_code"), "{stdout}");
}

/// `/otp` and `/validate` answer as the daemon's OTP API does (status, exit code, error): a
/// code used twice is "already used", as validate_otp says, not a wrong guess.
#[test]
fn simulate_answers_otp_requests_as_the_otp_api_does() {
    let first = simulate(b"/otp\n");
    let code = (first.lines())
        .find(|l| l.contains("your code is"))
        .and_then(|l| {
            l.split(|c: char| !c.is_ascii_digit())
                .find(|d| d.len() == 6)
        })
        .expect(&first)
        .to_string();
    let script = format!("/otp\n/validate {code}\n/validate {code}\n/validate 000000\n");
    let stdout = simulate(script.as_bytes());
    let answers: Vec<&str> = (stdout.lines())
        .filter_map(|l| l.strip_prefix("[otp api: "))
        .collect();
    assert_eq!(answers.len(), 4, "{stdout}");
    assert_eq!(answers[0], "200, exit 0: success]");
    assert_eq!(answers[1], "200, exit 0: success]");
    assert!(
        answers[2].starts_with("403, exit 1: this OTP was already used"),
        "{stdout}"
    );
    assert!(
        answers[3].starts_with("403, exit 1: invalid OTP"),
        "{stdout}"
    );
}

/// `/call unattested` is a caller ID its carrier did not vouch for: with the shipped flows
/// (`read_code_callers = "attested"`) pressing 1 texts the code instead of reading it.
#[test]
fn simulate_texts_the_code_to_an_unattested_caller_and_reads_it_to_an_attested_one() {
    let stdout = simulate(b"/call unattested\n1\n/call\n1\n");
    let (unattested, attested) = stdout
        .split_once("[call from")
        .unwrap()
        .1
        .split_once("[call from")
        .unwrap();
    assert!(
        unattested.contains("[voice] We've sent you a text message with a code."),
        "{stdout}"
    );
    assert!(
        unattested.contains("< Acme Contest: your code is"),
        "{stdout}"
    );
    assert!(
        !unattested.contains("[voice] Your Acme Contest code is"),
        "{stdout}"
    );
    assert!(
        attested.contains("[voice] Your Acme Contest code is"),
        "{stdout}"
    );
    assert!(
        !attested.contains("< Acme Contest: your code is"),
        "{stdout}"
    );
}

/// `/state` shows a question whose late answer is still taken (seed 6 draws the quiz).
#[test]
fn simulate_shows_the_question_whose_late_answer_is_still_taken() {
    let first = simulate_seeded(6, b"JOIN\n");
    let code = first
        .split("your code is ")
        .nth(1)
        .map(|rest| &rest[..6])
        .expect("a code");
    let script = format!("JOIN\n{code}\nCy\nB\nC\n/wait 1d\n/wait 1d\n/state\n");
    let stdout = simulate_seeded(6, script.as_bytes());
    assert!(
        stdout
            .contains("late answer to quiz step 2 (favorite) taken until 2026-01-08 15:00:00 UTC"),
        "{stdout}"
    );
}

/// `test` steps as the daemon does, within `verify.max_codes_per_hour`: once the hour's codes
/// are spent, another number hears the `busy` text, and gets a code once the hour has passed.
#[test]
fn transcripts_hold_the_daemon_wide_code_limit() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("tests")).unwrap();
    let bot = std::fs::read_to_string("flows/bot.toml").unwrap();
    assert!(bot.contains("max_codes_per_hour = 500"));
    let capped = bot.replace("max_codes_per_hour = 500", "max_codes_per_hour = 1");
    std::fs::write(dir.path().join("bot.toml"), capped).unwrap();
    std::fs::write(
        dir.path().join("tests/cap.txt"),
        "> JOIN\n< Acme Contest: your code is {$code}. Reply with it to confirm.\n\
         ! phone +15550002222\n> JOIN\n\
         < We're sending a lot of codes right now. Please try again later.\n\
         ~ 62m\n> JOIN\n< Acme Contest: your code is {$later}. Reply with it to confirm.\n",
    )
    .unwrap();
    let out = smsflow_test(dir.path());
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(stdout.contains("1 passed, 0 failed"), "{stdout}");
}
