//! `Phone`: an E.164 phone number, parsed once at the edge and trusted after.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A phone number in E.164 form (`+14155550100`). Once a `Phone` exists it is valid.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(into = "String")]
pub struct Phone(String);

/// Stored numbers were validated when first seen; already-E.164 text is taken without a full
/// re-parse (which is slow), anything else goes through [`Phone::parse`].
impl<'de> Deserialize<'de> for Phone {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Phone, D::Error> {
        let s = String::deserialize(d)?;
        Phone::from_stored(s).map_err(|e| serde::de::Error::custom(e.without_number()))
    }
}

/// A country calling code, the metadata of its regions, and the national number after it.
type Country<'a> = (u16, Vec<&'static phonenumber::Metadata>, &'a str);

/// The country calling code `digits` starts with, if the metadata knows it (codes are
/// prefix-free, so at most one of the first 1–3 digits matches), and the rest.
fn split_country_code(digits: &str) -> Option<Country<'_>> {
    (1..=3).find_map(|n| {
        let code = digits.get(..n)?.parse::<u16>().ok()?;
        let regions = phonenumber::metadata::DATABASE.by_code(&code)?;
        Some((code, regions, &digits[n..]))
    })
}

/// The kinds of number a country's metadata describes by pattern and length.
const KINDS: [phonenumber::Type; 11] = {
    use phonenumber::Type::*;
    [
        FixedLine,
        Mobile,
        TollFree,
        PremiumRate,
        SharedCost,
        PersonalNumber,
        Voip,
        Pager,
        Uan,
        Voicemail,
        NoInternational,
    ]
};

/// Whether `national` is a number of country code `code`: for North America ten digits,
/// the first 2–9 (the shape, in service or not: the metadata has no 555 or 200, which tests
/// and the benchmark use); elsewhere, one of the metadata's patterns for some region of it.
fn fits(code: u16, regions: &[&phonenumber::Metadata], national: &str) -> bool {
    if code == 1 {
        return is_north_american(national);
    }
    regions.iter().any(|m| {
        KINDS
            .iter()
            .filter_map(|k| m.descriptors().get(*k))
            .any(|d| d.is_match(national))
    })
}

/// Ten digits, the first 2–9: the shape of a North American number after its `+1`.
fn is_north_american(national: &str) -> bool {
    national.len() == 10 && !national.starts_with(['0', '1'])
}

/// Whether E.164 text is a number of its country (see [`fits`]).
fn fits_e164(e164: &str) -> bool {
    e164.strip_prefix('+')
        .and_then(split_country_code)
        .is_some_and(|(code, regions, national)| fits(code, &regions, national))
}

/// Separators people write in phone numbers: whitespace (a no-break space too), dashes of
/// any width, dots, slashes, parentheses.
fn is_separator(c: char) -> bool {
    c.is_whitespace()
        || matches!(
            c,
            '-' | '.' | '/' | '(' | ')' | '\u{2010}'..='\u{2015}' | '\u{2212}'
        )
}

/// Invisible formatting characters: zero-width spaces and joiners, direction marks and
/// isolates, the word joiner, a byte order mark.
fn is_invisible(c: char) -> bool {
    matches!(
        c,
        '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2060}'..='\u{2064}'
            | '\u{2066}'..='\u{2069}' | '\u{FEFF}'
    )
}

/// An international number written with its `+`, a known country code, and only digits and
/// separators, in E.164: its digits when they already form a number of its country; else
/// without a trunk prefix typed after the country code (`+44 (0)20…`, `+7 8 912…`,
/// `+1 1 415…`) when that makes one. Outside North America, else as the library reads it
/// when that makes one (Argentina's `15` after the area code: a mobile `9`); else its
/// digits as written. In North America nothing else: there the library makes up an area
/// code for seven digits, and a number that is not ten digits is refused.
/// Not the library's parse first: it strips what it takes for a national prefix even where
/// it belongs to the number (Russia's `+7 812…` would lose its area code's 8), and costs
/// ~100 µs.
fn international(s: &str) -> Option<Result<String, PhoneError>> {
    let rest = s.strip_prefix('+')?;
    if !rest.chars().all(|c| c.is_ascii_digit() || is_separator(c)) {
        return None;
    }
    let digits: String = rest.chars().filter(char::is_ascii_digit).collect();
    let written = format!("+{digits}");
    if !is_e164(&written) {
        return None;
    }
    let (code, regions, national) = split_country_code(&digits)?;
    // Mexico's mobiles were dialled from abroad with a 1 after the country code until 2019;
    // the same phone is now +52 and its ten digits, as Twilio writes it.
    if code == 52 && national.len() == 11 && national.starts_with('1') {
        return Some(Ok(format!("+52{}", &national[1..])));
    }
    if fits(code, &regions, national) {
        return Some(Ok(written));
    }
    let without_trunk = regions.iter().find_map(|m| {
        let rest = national.strip_prefix(m.national_prefix()?)?;
        fits(code, &regions, rest).then(|| format!("+{code}{rest}"))
    });
    if code == 1 {
        return Some(without_trunk.ok_or_else(|| not_north_american(s)));
    }
    let read = || {
        let n = phonenumber::parse(None, s).ok()?;
        let e164 = n.format().mode(phonenumber::Mode::E164).to_string();
        fits_e164(&e164).then_some(e164)
    };
    Some(Ok(without_trunk.or_else(read).unwrap_or(written)))
}

fn not_north_american(input: &str) -> PhoneError {
    PhoneError::Unparsable(
        crate::clip(input).into_owned(),
        "not a North American number (ten digits after +1, the first 2 to 9; a number \
         abroad starts with + and its country code, or 011)"
            .into(),
    )
}

/// How many digits an E.164 number has, country code included (Niue's have 7).
const DIGITS: std::ops::RangeInclusive<usize> = 7..=15;

/// Whether `s` is E.164 text as stored: `+`, then 7 to 15 digits, the first not 0.
pub fn is_e164(s: &str) -> bool {
    s.strip_prefix('+').is_some_and(|d| {
        DIGITS.contains(&d.len()) && d.bytes().all(|b| b.is_ascii_digit()) && !d.starts_with('0')
    })
}

/// Why a string is not a phone number.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PhoneError {
    #[error("phone number is empty")]
    Empty,
    #[error("{0:?} is not a phone number: {1}")]
    Unparsable(String, String),
    #[error("{0:?} has an extension; a text message needs a plain number")]
    Extension(String),
    #[error("{0:?} has {1} digits; an E.164 number has 7 to 15")]
    Length(String, usize),
    #[error("unknown default region {0:?} (expected a two-letter code such as US)")]
    Region(String),
}

impl PhoneError {
    /// What is wrong, without the number itself: for numbers read back from storage, whose
    /// errors end up in logs, where a number is only ever shown masked.
    pub fn without_number(&self) -> String {
        match self {
            PhoneError::Empty => "stored phone number is empty".into(),
            PhoneError::Unparsable(_, why) => format!("stored phone number is not valid: {why}"),
            PhoneError::Extension(_) => "stored phone number has an extension".into(),
            PhoneError::Length(_, n) => format!("stored phone number has {n} digits"),
            PhoneError::Region(_) => "stored phone number has an unknown region".into(),
        }
    }
}

/// Region used to read numbers written without a `+` country code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Region(phonenumber::country::Id);

impl Region {
    pub fn parse(code: &str) -> Result<Region, PhoneError> {
        code.trim()
            .to_ascii_uppercase()
            .parse::<phonenumber::country::Id>()
            .map(Region)
            .map_err(|_| PhoneError::Region(code.to_string()))
    }
}

impl Default for Region {
    fn default() -> Self {
        Region(phonenumber::country::Id::US)
    }
}

impl Phone {
    /// Parses a number written any common way; numbers without `+` are read in `region`.
    pub fn parse_in(input: &str, region: Region) -> Result<Phone, PhoneError> {
        // Invisible formatting a number copied from a contact card or a web page often carries
        // (direction marks, zero-width spaces, a byte order mark) is no part of it.
        let visible: String;
        let input = if input.contains(is_invisible) {
            visible = input.chars().filter(|c| !is_invisible(*c)).collect();
            visible.as_str()
        } else {
            input
        };
        let mut input = crate::ascii_digits(input);
        // A full-width plus (typed on an East Asian keyboard) leads a number with its country
        // code as `+` does; read without it, the number would be taken as national.
        if input.contains('＋') {
            input = input.replace('＋', "+").into();
        }
        let trimmed = input.trim();
        if trimmed.is_empty() {
            return Err(PhoneError::Empty);
        }
        // A country code in brackets, as numbers are often written in Europe ("(+44) 20 7946
        // 0958"): the brackets are no part of it.
        let unbracketed: String;
        let trimmed = match trimmed.strip_prefix("(+").and_then(|r| r.split_once(')')) {
            Some((code, rest))
                if (1..=3).contains(&code.len()) && code.bytes().all(|b| b.is_ascii_digit()) =>
            {
                unbracketed = format!("+{code} {}", rest.trim_start());
                unbracketed.as_str()
            }
            _ => trimmed,
        };
        if let Some(read) = international(trimmed) {
            return read.map(Phone);
        }
        // A number with its country code is read by that code alone: given a region too, the
        // parser strips that region's national prefix ("+44 1632…" lost its 1 under US).
        let region = (!trimmed.starts_with('+')).then_some(region.0);
        let parsed = phonenumber::parse(region, trimmed);
        let unparsable =
            |why: String| PhoneError::Unparsable(crate::clip(trimmed).into_owned(), why);
        if parsed.as_ref().is_ok_and(|n| n.extension().is_some()) {
            return Err(PhoneError::Extension(crate::clip(trimmed).into_owned()));
        }
        // Digits and separators only, after one leading `+`: the library would read letters
        // as a keypad's digits (`+1555CALLNOW`), and pass over other characters.
        let odd = trimmed
            .char_indices()
            .find(|&(i, c)| !(c.is_ascii_digit() || is_separator(c) || (c == '+' && i == 0)));
        if let Some((_, c)) = odd {
            return Err(unparsable(if c.is_alphabetic() {
                "letters are not digits (write a number such as 1-800-FLOWERS in digits)".into()
            } else if c == '+' {
                "'+' comes first, before the country code (such as +1 415 555 0100)".into()
            } else {
                format!("{c:?} is neither a digit nor a separator")
            }));
        }
        let number = parsed.map_err(|e| unparsable(e.to_string()))?;
        let e164 = number.format().mode(phonenumber::Mode::E164).to_string();
        // A national number read in a North American region must come out in its shape
        // (`020 7946 0018` read as US is no number, not `+102…`).
        if let Some(national) = e164.strip_prefix("+1") {
            if !is_north_american(national) {
                return Err(not_north_american(trimmed));
            }
        }
        let digits = e164.chars().filter(char::is_ascii_digit).count();
        if !DIGITS.contains(&digits) {
            return Err(PhoneError::Length(
                crate::clip(trimmed).into_owned(),
                digits,
            ));
        }
        Ok(Phone(e164))
    }

    /// A number read back from the store: E.164 text is taken as is.
    pub fn from_stored(s: String) -> Result<Phone, PhoneError> {
        if is_e164(&s) {
            Ok(Phone(s))
        } else {
            Phone::parse(&s)
        }
    }

    /// Parses with the default region (US).
    pub fn parse(input: &str) -> Result<Phone, PhoneError> {
        Phone::parse_in(input, Region::default())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The number with its middle hidden, for logs: `+1415***0100`. Long numbers keep their
    /// first four and last four digits; shorter ones (many countries use 8 to 10 digits)
    /// show less, so that at least half their digits stay hidden.
    pub fn masked(&self) -> String {
        let digits = self.0.strip_prefix('+').unwrap_or(&self.0);
        let d = digits.len();
        let (hidden, tail) = if d >= 11 {
            (d - 8, 4)
        } else {
            (d.div_ceil(2).max(3), 2)
        };
        let head = d.saturating_sub(hidden + tail);
        match (digits.get(..head), digits.get(d.saturating_sub(tail)..)) {
            (Some(h), Some(t)) if head > 0 => format!("+{h}***{t}"),
            _ => "+***".to_string(),
        }
    }
}

impl TryFrom<String> for Phone {
    type Error = PhoneError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Phone::parse(&value)
    }
}

impl From<Phone> for String {
    fn from(p: Phone) -> String {
        p.0
    }
}

impl fmt::Display for Phone {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Debug prints the masked form so a stray `{:?}` never leaks a number into a log.
impl fmt::Debug for Phone {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Phone({})", self.masked())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_us_number_written_loosely_normalizes_to_e164() {
        assert_eq!(
            Phone::parse("+1 (415) 555-0100").unwrap().as_str(),
            "+14155550100"
        );
        assert_eq!(
            Phone::parse("(415) 555-0100").unwrap().as_str(),
            "+14155550100"
        );
    }

    #[test]
    fn a_number_typed_in_another_scripts_digits_is_those_digits() {
        for (typed, number) in [
            ("+١ ٤١٥ ٥٥٥ ٠١٠٠", "+14155550100"),
            ("+۱۴۱۵۵۵۵۰۱۰۰", "+14155550100"),
            // Read by smsflow's own rule (the trunk 8 after +7 dropped), as in ASCII digits.
            ("+٧ ٨ ٩١٢ ٣٤٥ ٦٧ ٨٩", "+79123456789"),
            // A full-width plus is a plus: not read as a US national number.
            ("＋８６ １３９ １２３４ ５６７８", "+8613912345678"),
            ("＋４４ ２０ ７９４６ ００１８", "+442079460018"),
        ] {
            assert_eq!(
                Phone::parse(typed).map(|p| p.as_str().to_string()),
                Ok(number.to_string()),
                "{typed:?}"
            );
        }
    }

    #[test]
    fn a_formatted_number_with_its_country_code_keeps_every_digit_whatever_the_region() {
        for region in ["US", "GB", "CN"] {
            let region = Region::parse(region).unwrap();
            for (written, e164) in [
                ("+44 1632 960983", "+441632960983"),
                ("+86 138 0013 8000", "+8613800138000"),
                ("+1 (415) 555-0100", "+14155550100"),
                ("+1 800-555-0199", "+18005550199"),
                // The country code in brackets.
                ("(+1) 415 555 0163", "+14155550163"),
                ("(+44) 020 7946 0958", "+442079460958"),
                ("(+86)138 0013 8000", "+8613800138000"),
            ] {
                assert_eq!(Phone::parse_in(written, region).unwrap().as_str(), e164);
            }
        }
    }

    #[test]
    fn an_international_number_is_its_digits_and_a_trunk_zero_after_its_country_code_is_dropped() {
        // The national trunk prefix after the country code is dropped however it is written.
        assert_eq!(
            Phone::parse("+4402079460018").unwrap(),
            Phone::parse("+44 020 7946 0018").unwrap()
        );
        assert_eq!(
            Phone::parse("+4402079460018").unwrap().as_str(),
            "+442079460018"
        );
        assert_eq!(
            Phone::parse("+44 (0)20 7946 0018").unwrap().as_str(),
            "+442079460018"
        );
        // Italy keeps its leading 0; a number whose national part starts with what some
        // country uses as a national prefix keeps it (Russia's 8, Argentina's mobile 9).
        for e164 in [
            "+390612345678",
            "+14155550100",
            "+18005550199",
            "+6834001",
            "+78121234567",
            "+78001234567",
            "+8613800138000",
            "+5491123456789",
            "+5511987654321",
        ] {
            assert_eq!(Phone::parse(e164).unwrap().as_str(), e164);
        }
        // A trunk prefix typed after the country code is dropped (Russia's and Lithuania's
        // 8, North America's 1, Argentina's 15 after the area code, which makes it a mobile
        // 9), but never a digit of the number itself.
        for (written, e164) in [
            ("+7 (812) 123-45-67", "+78121234567"),
            ("+7 8 912 345 67 89", "+79123456789"),
            ("+7 8 812 123 45 67", "+78121234567"),
            ("+370 8 612 34567", "+37061234567"),
            ("+54 11 15 1234 5678", "+5491112345678"),
            ("+1 1 415 555 0100", "+14155550100"),
        ] {
            assert_eq!(Phone::parse(written).unwrap().as_str(), e164, "{written}");
        }
        // Nothing fits: taken as written, not as the library's guess.
        assert_eq!(
            Phone::parse("+7 999").unwrap_err(),
            PhoneError::Length("+7 999".into(), 4)
        );
        assert_eq!(Phone::parse("+7 0000 0000").unwrap().as_str(), "+700000000");
        // A national number read as North American must have that shape, and so must one
        // written with +1 (the library would make up an area code for seven digits).
        for not_one in [
            "020 7946 0019",
            "+1 441 5555",
            "+1 555 0100",
            "+1 415 555 01000",
        ] {
            let err = Phone::parse(not_one).unwrap_err().to_string();
            assert!(
                err.contains("not a North American number"),
                "{not_one}: {err}"
            );
        }
        // Any common separator, a no-break space or a wide dash too.
        assert_eq!(
            Phone::parse("+7\u{a0}812\u{2011}123\u{2011}45\u{2011}67")
                .unwrap()
                .as_str(),
            "+78121234567"
        );
        assert_eq!(
            Phone::parse("+7 812/123 45 67").unwrap().as_str(),
            "+78121234567"
        );
        // Mexico's old mobile 1 after +52 is the same phone without it.
        assert_eq!(
            Phone::parse("+52 1 55 1234 5678").unwrap(),
            Phone::parse("+52 55 1234 5678").unwrap()
        );
        assert_eq!(
            Phone::parse("+5215512345678").unwrap().as_str(),
            "+525512345678"
        );
    }

    #[test]
    fn the_default_region_decides_how_a_national_number_is_read() {
        let gb = Region::parse("gb").unwrap();
        assert_eq!(
            Phone::parse_in("020 7946 0018", gb).unwrap().as_str(),
            "+442079460018"
        );
    }

    #[test]
    fn garbage_is_an_error_that_says_why() {
        let err = Phone::parse("hello").unwrap_err().to_string();
        assert!(err.contains("not a phone number"), "{err}");
        assert_eq!(Phone::parse("  ").unwrap_err(), PhoneError::Empty);
        assert!(Phone::parse("+1").is_err());
        assert!(Region::parse("XX").is_err());
    }

    #[test]
    fn letters_and_other_characters_are_not_read_as_digits() {
        for (typed, why) in [
            ("+1555CALLNOW", "letters are not digits"),
            ("+1555000444A", "letters are not digits"),
            ("1-800-FLOWERS", "letters are not digits"),
            ("tel:+14155550100", "letters are not digits"),
            ("++14155550100", "'+' comes first, before the country code"),
            ("+14155550100\0", "'\\0' is neither a digit nor a separator"),
            (
                "\u{fffd}+14155550100",
                "'\u{fffd}' is neither a digit nor a separator",
            ),
            ("415*555*0100", "'*' is neither a digit nor a separator"),
            ("(+1 415) 555 0163", "'+' comes first"),
            // A number abroad written with Europe's 00, read in a North American region.
            (
                "0044 20 7946 0019",
                "starts with + and its country code, or 011",
            ),
        ] {
            let err = Phone::parse(typed).unwrap_err().to_string();
            assert!(
                err.contains("is not a phone number") && err.contains(why),
                "{typed:?}: {err}"
            );
        }
        // Invisible formatting copied along with a number is no part of it.
        assert_eq!(
            Phone::parse("\u{202A}+1 415\u{200B}555 0100\u{202C}")
                .unwrap()
                .as_str(),
            "+14155550100"
        );
        // An extension is named as one, as before.
        assert!(matches!(
            Phone::parse("+1 415 555 0100 ext. 12"),
            Err(PhoneError::Extension(_))
        ));
    }

    #[test]
    fn the_shortest_real_numbers_are_accepted_and_shorter_ones_are_not() {
        assert_eq!(Phone::parse("+683 4001").unwrap().as_str(), "+6834001");
        assert_eq!(Phone::parse("+6834001").unwrap().as_str(), "+6834001");
        let err = Phone::parse("+68340").unwrap_err().to_string();
        assert!(err.contains("7 to 15"), "{err}");
    }

    #[test]
    fn e164_text_with_an_unknown_country_code_is_refused() {
        assert!(Phone::parse("+9991234567890").is_err());
        assert!(Phone::parse("+0123456789").is_err());
    }

    #[test]
    fn the_original_services_example_number_is_accepted() {
        assert_eq!(
            Phone::parse("+912873645289").unwrap().as_str(),
            "+912873645289"
        );
    }

    #[test]
    fn masking_hides_the_middle_digits() {
        assert_eq!(
            Phone::parse("+14155550100").unwrap().masked(),
            "+1415***0100"
        );
        assert_eq!(
            format!("{:?}", Phone::parse("+14155550100").unwrap()),
            "Phone(+1415***0100)"
        );
        assert_eq!(
            Phone::parse("+912873645289").unwrap().masked(),
            "+9128***5289"
        );
    }

    #[test]
    fn masking_a_short_number_hides_at_least_half_of_its_digits() {
        for (number, masked) in [
            ("+29022222", "+29***22"),
            ("+298123456", "+29***56"),
            ("+3361234567", "+336***67"),
        ] {
            assert_eq!(Phone::parse(number).unwrap().masked(), masked, "{number}");
        }
    }
}
