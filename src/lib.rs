//! smsflow runs SMS conversations for Twilio numbers. Every phone number is a finite state
//! machine (`machine`), driven by events and declared by operators in TOML flows (`flows`).
//!
//! Architecture invariant: `machine` is pure. It takes time and randomness as arguments and
//! returns effects as data; it never touches the network, the disk, the clock or a global RNG.
//!
//! The way in: `main` dispatches to `cli`; `serve` builds an `app::Application`, whose HTTP
//! routes (`http`), scheduler and outbox hand every event to the `engine`'s writer thread,
//! which steps `machine` and commits to the `store`. The code map and the full list of
//! invariants are in README.md, section "Architecture".

pub mod app;
pub mod bench;
pub mod cli;
pub mod clock;
pub mod config;
pub mod conns;
pub mod engine;
pub mod export;
pub mod flows;
pub mod http;
pub mod ivr;
pub mod machine;
pub mod metrics;
pub mod outbox;
pub mod phone;
pub mod provider;
pub mod reload;
pub mod scheduler;
pub mod sim;
pub mod store;
pub mod transcript;
pub mod twiml;

/// What a caught panic said (its message, when it had one).
pub fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    (panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "no message".into())
}

/// Caller input as an error message or a log line may repeat it: at most 40 characters, then
/// `…`. A request body may be 64 KiB, and a refusal should name the mistake, not echo it whole.
pub fn clip(input: &str) -> std::borrow::Cow<'_, str> {
    const MAX: usize = 40;
    match input.char_indices().nth(MAX) {
        None => input.into(),
        Some((end, _)) => format!("{}…", &input[..end]).into(),
    }
}

/// `text` with each decimal digit of any script as its ASCII digit: a code, a choice, a
/// number or a phone number typed on an Arabic, Persian, Devanagari or full-width keyboard
/// ("٤٢", "４２") is the same one typed as "42".
pub fn ascii_digits(text: &str) -> std::borrow::Cow<'_, str> {
    if text.is_ascii() {
        text.into()
    } else {
        dec_from_char::normalize_decimals(text).into()
    }
}

/// 1-based line and column (in characters) of the character byte `offset` of `text` is in
/// (an offset inside a character counts as that character's; past the end, as the end).
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let start = (0..=offset.min(text.len()))
        .rev()
        .find(|&i| text.is_char_boundary(i))
        .unwrap_or(0);
    let before = &text[..start];
    (
        before.matches('\n').count() + 1,
        before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1,
    )
}

/// Reads a file of text the user wrote (a flow file, a transcript): a regular file (a link is
/// followed) in UTF-8. Else what is wrong, with where: `(line, col, message)`. A FIFO or a
/// device is not opened (reading one would wait, or never end).
pub fn read_text_file(path: &std::path::Path) -> Result<String, (usize, usize, String)> {
    let meta = std::fs::metadata(path).map_err(|e| {
        // A link whose target is not there says where it points.
        let message = match std::fs::read_link(path) {
            _ if e.raw_os_error() == Some(libc::ELOOP) => {
                "cannot read: it is a link in a loop of links (each names another)".to_string()
            }
            Ok(to) if !path.exists() => format!(
                "cannot read: it is a link to {}, which is not there ({e})",
                to.display()
            ),
            _ => format!("cannot read: {e}"),
        };
        (1, 1, message)
    })?;
    if !meta.is_file() {
        use std::os::unix::fs::FileTypeExt;
        let kind = meta.file_type();
        let what = if kind.is_dir() {
            "a directory"
        } else if kind.is_fifo() {
            "a named pipe"
        } else if kind.is_socket() {
            "a socket"
        } else {
            "a device"
        };
        return Err((
            1,
            1,
            format!(
                "cannot read: it is {what}, not a file (rename it so that its name does not \
                 end in .{} to leave it out)",
                path.extension().unwrap_or_default().to_string_lossy()
            ),
        ));
    }
    let bytes = std::fs::read(path).map_err(|e| (1, 1, format!("cannot read: {e}")))?;
    String::from_utf8(bytes).map_err(|e| {
        // Where the first byte that is not UTF-8 is (an editor saved it as Latin-1).
        let bytes = e.as_bytes();
        let good = e.utf8_error().valid_up_to();
        let before = String::from_utf8_lossy(&bytes[..good]);
        let (line, col) = line_col(&before, good);
        let message = match bytes.get(good) {
            Some(b) => format!("byte 0x{b:02X} is not UTF-8: save the file as UTF-8"),
            None => "the file is not UTF-8: save it as UTF-8".into(),
        };
        (line, col, message)
    })
}

/// A duration as flows and transcripts write it (`30s`, `10m`, `1h 30m`), read by humantime,
/// with its complaint in words that name the character at fault rather than its 0-based
/// offset (which would read as a column beside a file's 1-based line:col).
pub fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    let text = text.trim();
    // The character humantime stopped at (past any spaces, which it reports the start of).
    let at = |offset: usize| {
        text.get(offset..)
            .and_then(|rest| rest.trim_start().chars().next())
            .map_or_else(|| "the end".to_string(), |c| format!("{c:?}"))
    };
    // humantime 2.4 panics ("overflow in Duration::new") on a sum of exactly u64::MAX
    // seconds plus a carried second (chronotope/humantime#66). Numbers of at most 9 digits in
    // at most 100 characters stay far below that (50 terms of 999,999,999 years are 1.6e18
    // seconds), and far above any duration smsflow takes.
    if text.chars().count() > 100 {
        return Err("too long for a duration (at most 100 characters)".to_string());
    }
    if (text.split(|c: char| !c.is_ascii_digit())).any(|digits| digits.len() > 9) {
        return Err("number is too large (at most 9 digits)".to_string());
    }
    // humantime reads `1 30m` as 130 minutes: a number must have its unit.
    let words: Vec<&str> = text.split_whitespace().collect();
    if let Some(pair) = words.windows(2).find(|w| {
        w[0].ends_with(|c: char| c.is_ascii_digit())
            && w[1].starts_with(|c: char| c.is_ascii_digit())
    }) {
        return Err(format!("a unit is needed after {}", pair[0]));
    }
    humantime::parse_duration(text).map_err(|e| match e {
        humantime::DurationError::InvalidCharacter(i) => {
            format!("unexpected {}", at(i))
        }
        humantime::DurationError::NumberExpected(i) => {
            format!("a number is needed before {}", at(i))
        }
        // (Each caller says what to write.)
        humantime::DurationError::UnknownUnit { unit, value, .. } if unit.is_empty() => {
            format!("a unit is needed after {value}")
        }
        humantime::DurationError::UnknownUnit { unit, .. } => format!("unknown unit {unit:?}"),
        humantime::DurationError::NumberOverflow => {
            "a number too large, or too fine, to read exactly".to_string()
        }
        other => other.to_string(),
    })
}

/// A duration in a flow or a transcript, as [`parse_duration`] reads it, but not in months
/// or years: humantime reads `M` as a month and `y` as a year (30.44 and 365.25 days), and a
/// step's `1M` is easily meant as a minute. (The config's retention may say `1y`.)
pub fn parse_flow_duration(text: &str) -> Result<std::time::Duration, String> {
    let units = text.split(|c: char| c.is_ascii_digit() || c.is_whitespace() || c == '.');
    for unit in units.filter(|u| !u.is_empty()) {
        let why = match unit {
            "M" => "`M` is a month here, not a minute: write `m` for minutes, or days (`30d`)",
            "month" | "months" => "months vary in length: write days (`30d`)",
            "y" | "yr" | "yrs" | "year" | "years" => "years vary in length: write days (`365d`)",
            _ => continue,
        };
        return Err(why.to_string());
    }
    parse_duration(text)
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_duration_error_names_the_character_at_fault() {
        for (text, read) in [
            (" 10 minutes! ", Err("unexpected '!'")),
            ("1.", Err("unexpected '.'")),
            ("10m  x", Err("a number is needed before 'x'")),
            ("m", Err("a number is needed before 'm'")),
            ("1h 30m", Ok(5400)),
            // Not 130 minutes, as humantime would read it.
            ("1 30m", Err("a unit is needed after 1")),
            ("1 2h", Err("a unit is needed after 1")),
            ("1D", Err("unknown unit \"D\"")),
            ("30", Err("a unit is needed after 30")),
        ] {
            let read = read
                .map(std::time::Duration::from_secs)
                .map_err(str::to_string);
            assert_eq!(super::parse_duration(text), read, "{text:?}");
        }
        assert!(super::parse_duration("1.333h")
            .unwrap_err()
            .starts_with("a number too large, or too fine"));
    }

    #[test]
    fn a_flow_duration_in_months_or_years_is_refused_with_what_to_write_instead() {
        use std::time::Duration;
        for (text, says) in [
            ("1M", "`M` is a month here, not a minute"),
            ("2 months", "months vary in length: write days (`30d`)"),
            ("1month 2d", "months vary in length"),
            ("1y", "years vary in length: write days (`365d`)"),
            ("1d 2years", "years vary in length"),
            ("1yr", "years vary in length"),
            ("2 yrs", "years vary in length"),
        ] {
            let refused = super::parse_flow_duration(text).unwrap_err();
            assert!(refused.contains(says), "{text}: {refused}");
        }
        assert_eq!(
            super::parse_duration("1y"),
            Ok(Duration::from_secs(31_557_600))
        );
        assert_eq!(
            super::parse_flow_duration("1m 2d 1w"),
            Ok(Duration::from_secs(60 + 2 * 86_400 + 7 * 86_400))
        );
    }

    #[test]
    fn a_duration_too_large_for_humantime_is_refused_not_a_panic() {
        for text in [
            "18446744073709551615s 1000000000ns",
            "18446744073709551615s 999999999ns 1ns",
            "1000000000s",
        ] {
            assert_eq!(
                super::parse_duration(text),
                Err("number is too large (at most 9 digits)".to_string())
            );
        }
        let many = "999999999y ".repeat(60);
        assert_eq!(
            super::parse_duration(&many),
            Err("too long for a duration (at most 100 characters)".to_string())
        );
        assert_eq!(
            super::parse_duration("999999999s"),
            Ok(std::time::Duration::from_secs(999_999_999))
        );
    }

    #[test]
    fn clip_keeps_short_input_and_cuts_long_input_on_a_character_boundary() {
        assert_eq!(super::clip("+1 555"), "+1 555");
        let long = "é".repeat(100);
        let clipped = super::clip(&long);
        assert_eq!(clipped, format!("{}…", "é".repeat(40)));
    }
}
