//! `smsflow test`: transcripts run against the engine; a mismatch names file:line.

use std::process::Command;

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
    let out = Command::new(env!("CARGO_BIN_EXE_smsflow"))
        .arg("test")
        .arg(dir.path())
        .output()
        .unwrap();
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

#[test]
fn a_message_nobody_expected_fails_the_transcript() {
    let flows = smsflow::flows::load_dir("flows".as_ref()).unwrap();
    let err = smsflow::transcript::run(&flows, "t.txt".as_ref(), "> JOIN\n> HELP\n").unwrap_err();
    assert_eq!(err.line, 1);
    assert!(err.message.contains("unexpected message"), "{err}");
}
