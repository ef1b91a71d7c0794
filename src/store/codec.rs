//! The stored form of records: one version byte, then bincode. Old versions migrate on read.

use std::collections::BTreeMap;

use bincode::Options;
use chrono::{DateTime, Utc};
use serde::{de::DeserializeOwned, Serialize};

use crate::machine::{FormCursor, IssuedCode, LateQuestion, State, Subscriber, Timer, TimerKind};
use crate::phone::Phone;

/// The version written today. Bump it (and add a migration arm) whenever a stored type changes:
/// bincode is not self-describing, so an old record must never be read as a new one.
/// v1: the subscriber alone. v2: the subscriber and its last few webhook replies.
/// v3: as v2, with variable-length integers (a typical record shrinks from 239 to 138 bytes:
/// every length prefix was 8 bytes).
/// v4: as v3, with times as whole seconds and nanoseconds since 1970 instead of RFC 3339
/// text (about 10 bytes a time instead of 31, and no formatting or parsing).
/// v5: as v4, then the key of the form field asked (v4 and older read as `None`: by index).
/// v6: as v5, then the code the number verified with by text (older ones read as none).
/// v7: as v6, with every code the number held when it verified by text.
/// v8: as v7, then the question whose late answer is still taken, and the number of ours it
/// last texted or called (older ones read as none).
/// v9: as v8, then which of the number's codes an app asked for (older ones read as none).
pub const SUBSCRIBER_VERSION: u8 = 9;

/// bincode as v3 and v4 write it. (v1 and v2 use bincode's default fixed-width integers.)
fn compact() -> impl Options {
    bincode::DefaultOptions::new().with_varint_encoding()
}

/// How many recent webhook replies a record keeps for exactly-once retries. Twilio retries a
/// webhook within seconds, long before a number sends this many new messages.
pub const KEPT_REPLIES: usize = 4;

/// The answer given to one inbound message, kept so a retried webhook gets it again.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Replied {
    pub sid: String,
    pub twiml: String,
}

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("empty record")]
    Empty,
    #[error("record version {0} is newer than this smsflow understands (upgrade smsflow)")]
    UnknownVersion(u8),
    #[error("corrupt record: {0}")]
    Corrupt(#[from] bincode::Error),
    #[error("corrupt record: a time {0} seconds from 1970 is out of range")]
    Time(i64),
    #[error("corrupt record: {0}")]
    Phone(String),
    #[error("corrupt key in the {0} tree")]
    Key(&'static str),
}

/// Whether an error is a stored value that cannot be read (as opposed to the storage failing,
/// which a later try may get past).
pub fn is_unreadable(e: &anyhow::Error) -> bool {
    e.downcast_ref::<CodecError>().is_some()
}

pub fn encode_subscriber(s: &Subscriber) -> Vec<u8> {
    encode_record(s, &[])
}

/// A time as v4 stores it: whole seconds since 1970 and the nanoseconds past them.
type At = (i64, u32);

fn at(t: &DateTime<Utc>) -> At {
    (t.timestamp(), t.timestamp_subsec_nanos())
}

fn from_at((secs, nanos): At) -> Result<DateTime<Utc>, CodecError> {
    DateTime::from_timestamp(secs, nanos).ok_or(CodecError::Time(secs))
}

/// A subscriber as v4 lays it out: the fields of [`Subscriber`] in order (phone and state
/// first, which [`state_of_record`] relies on), with every time as an [`At`].
type V4<'a> = (
    &'a str,
    &'a State,
    &'a BTreeMap<String, String>,
    Vec<(&'a str, At, At, u8)>,
    Vec<At>,
    &'a Option<FormCursor>,
    &'a Option<String>,
    Option<(At, TimerKind, u64)>,
    u64,
    At,
    Option<At>,
    Option<At>,
);

/// The owned form of [`V4`], as read back.
type V4Owned = (
    String,
    State,
    BTreeMap<String, String>,
    Vec<(String, At, At, u8)>,
    Vec<At>,
    Option<FormCursor>,
    Option<String>,
    Option<(At, TimerKind, u64)>,
    u64,
    At,
    Option<At>,
    Option<At>,
);

fn to_v4(s: &Subscriber) -> V4<'_> {
    (
        s.phone.as_str(),
        &s.state,
        &s.fields,
        s.codes.iter().map(code_to_store).collect(),
        s.code_sends.iter().map(at).collect(),
        &s.form,
        &s.sequence,
        s.timer.map(|t| (at(&t.at), t.kind, t.epoch)),
        s.epoch,
        at(&s.created_at),
        s.verified_at.as_ref().map(at),
        s.last_inbound_at.as_ref().map(at),
    )
}

fn from_v4(v: V4Owned) -> Result<Subscriber, CodecError> {
    let (
        phone,
        state,
        fields,
        codes,
        sends,
        form,
        sequence,
        timer,
        epoch,
        created,
        verified,
        inbound,
    ) = v;
    Ok(Subscriber {
        phone: Phone::from_stored(phone).map_err(|e| CodecError::Phone(e.without_number()))?,
        state,
        fields,
        codes: codes
            .into_iter()
            .map(code_from_store)
            .collect::<Result<_, CodecError>>()?,
        code_sends: sends.into_iter().map(from_at).collect::<Result<_, _>>()?,
        form,
        sequence,
        timer: timer
            .map(|(t, kind, epoch)| {
                Ok::<_, CodecError>(Timer {
                    at: from_at(t)?,
                    kind,
                    epoch,
                })
            })
            .transpose()?,
        epoch,
        created_at: from_at(created)?,
        verified_at: verified.map(from_at).transpose()?,
        last_inbound_at: inbound.map(from_at).transpose()?,
        used_codes: Vec::new(),
        late: None,
        via: None,
    })
}

/// A record with the key of the form field it was asked (v5 on), kept beside the v4 layout.
fn with_asked(mut s: Subscriber, asked: Option<String>) -> Subscriber {
    if let Some(cursor) = s.form.as_mut() {
        cursor.key = asked;
    }
    s
}

/// An issued code as v4 on store it (in the codes list, and kept from a verification).
fn code_to_store(c: &IssuedCode) -> (&str, At, At, u8) {
    (
        c.code.as_str(),
        at(&c.issued_at),
        at(&c.expires_at),
        c.wrong,
    )
}

/// [`code_to_store`] read back.
fn code_from_store(
    (code, issued, expires, wrong): (String, At, At, u8),
) -> Result<IssuedCode, CodecError> {
    Ok(IssuedCode {
        code,
        issued_at: from_at(issued)?,
        expires_at: from_at(expires)?,
        wrong,
        by_app: false,
    })
}

/// A subscriber with its recent replies, as stored.
pub fn encode_record(s: &Subscriber, replies: &[Replied]) -> Vec<u8> {
    let mut out = vec![SUBSCRIBER_VERSION];
    let asked = s.form.as_ref().and_then(|c| c.key.as_deref());
    let used: Vec<_> = s.used_codes.iter().map(code_to_store).collect();
    let late = (s.late.as_ref()).map(|l| {
        (
            l.sequence.as_str(),
            l.step as u64,
            l.field.as_str(),
            at(&l.until),
        )
    });
    // As in `encode`: plain data into a Vec cannot fail.
    let via = s.via.as_ref().map(Phone::as_str);
    let by_app: Vec<bool> = s.codes.iter().map(|c| c.by_app).collect();
    let record = (to_v4(s), asked, replies, used, late, via, by_app);
    if let Err(e) = compact().serialize_into(&mut out, &record) {
        tracing::error!("serializing a subscriber failed: {e}");
    }
    out
}

/// A v6 or later record: as v5, then the codes kept from a verification (`U`: v6's one,
/// or v7's list).
fn with_kept<U>(body: &[u8]) -> Result<(Subscriber, Vec<Replied>), CodecError>
where
    U: serde::de::DeserializeOwned + IntoIterator<Item = (String, At, At, u8)>,
{
    let (v, asked, replies, used): (V4Owned, Option<String>, Vec<Replied>, U) =
        compact().deserialize(body)?;
    Ok((with_used(v, asked, used)?, replies))
}

/// A subscriber from the v4 layout, the key of the form field asked (v5 on), and the codes
/// kept from its verification (v6 on).
fn with_used(
    v: V4Owned,
    asked: Option<String>,
    used: impl IntoIterator<Item = (String, At, At, u8)>,
) -> Result<Subscriber, CodecError> {
    let mut s = with_asked(from_v4(v)?, asked);
    s.used_codes = used
        .into_iter()
        .map(code_from_store)
        .collect::<Result<_, _>>()?;
    Ok(s)
}

type Kept = Vec<(String, At, At, u8)>;
type Late = Option<(String, u64, String, At)>;
/// A v8 record: as v7, then the question whose late answer is still taken, and the number
/// of ours it last texted or called.
type V8 = (
    V4Owned,
    Option<String>,
    Vec<Replied>,
    Kept,
    Late,
    Option<String>,
);
/// A v9 record: as v8, then whether each of the number's codes was asked for by an app.
/// (bincode writes a tuple as its fields one after another, so the v8 part nests.)
type V9 = (V8, Vec<bool>);

/// A v9 record (see [`V9`]).
fn with_app(body: &[u8]) -> Result<(Subscriber, Vec<Replied>), CodecError> {
    let (v8, by_app): V9 = compact().deserialize(body)?;
    let mut s = with_late(v8)?;
    for (code, by_app) in s.0.codes.iter_mut().zip(by_app) {
        code.by_app = by_app;
    }
    Ok(s)
}

/// A v8 record (see [`V8`]).
fn with_late(
    (v, asked, replies, used, late, via): V8,
) -> Result<(Subscriber, Vec<Replied>), CodecError> {
    let mut s = with_used(v, asked, used)?;
    s.late = late
        .map(|(sequence, step, field, until)| {
            Ok::<_, CodecError>(LateQuestion {
                sequence,
                step: usize::try_from(step).unwrap_or(usize::MAX),
                field,
                until: from_at(until)?,
            })
        })
        .transpose()?;
    s.via = via
        .map(|p| Phone::from_stored(p).map_err(|e| CodecError::Phone(e.without_number())))
        .transpose()?;
    Ok((s, replies))
}

/// Reads any known version; older ones migrate (v1 had no replies).
pub fn decode_record(bytes: &[u8]) -> Result<(Subscriber, Vec<Replied>), CodecError> {
    match split(bytes)? {
        (1, body) => Ok((bincode::deserialize(body)?, Vec::new())),
        (2, body) => Ok(bincode::deserialize(body)?),
        (3, body) => Ok(compact().deserialize(body)?),
        (4, body) => {
            let (v, replies): (V4Owned, Vec<Replied>) = compact().deserialize(body)?;
            Ok((from_v4(v)?, replies))
        }
        (5, body) => {
            let (v, asked, replies): (V4Owned, Option<String>, Vec<Replied>) =
                compact().deserialize(body)?;
            Ok((with_asked(from_v4(v)?, asked), replies))
        }
        // v6 kept one code from the verification, v7 every one the number may text back.
        (6, body) => with_kept::<Option<(String, At, At, u8)>>(body),
        (7, body) => with_kept::<Vec<(String, At, At, u8)>>(body),
        (8, body) => with_late(compact().deserialize(body)?),
        (9, body) => with_app(body),
        (v, _) => Err(CodecError::UnknownVersion(v)),
    }
}

/// The state of a stored record, read without decoding the rest (every version so far starts
/// with the subscriber, whose first fields are its phone and its state).
pub fn state_of_record(bytes: &[u8]) -> Result<State, CodecError> {
    match split(bytes)? {
        (1 | 2, body) => Ok(bincode::deserialize::<(String, State)>(body)?.1),
        // Only a prefix is read, so trailing bytes are expected here.
        (3..=9, body) => Ok(compact()
            .allow_trailing_bytes()
            .deserialize::<(String, State)>(body)?
            .1),
        (v, _) => Err(CodecError::UnknownVersion(v)),
    }
}

pub fn decode_subscriber(bytes: &[u8]) -> Result<Subscriber, CodecError> {
    decode_record(bytes).map(|(s, _)| s)
}

/// Versioned bincode for any other stored value (outbox entries, deliveries, history).
pub fn encode<T: Serialize>(version: u8, value: &T) -> Vec<u8> {
    let mut out = vec![version];
    // Serializing plain data into a Vec cannot fail: no maps with non-string keys, no IO.
    if let Err(e) = bincode::serialize_into(&mut out, value) {
        tracing::error!("serializing a record failed: {e}");
    }
    out
}

/// Decodes a value written by [`encode`] with exactly `version`.
pub fn decode<T: DeserializeOwned>(version: u8, bytes: &[u8]) -> Result<T, CodecError> {
    match split(bytes)? {
        (v, body) if v == version => Ok(bincode::deserialize(body)?),
        (v, _) => Err(CodecError::UnknownVersion(v)),
    }
}

fn split(bytes: &[u8]) -> Result<(u8, &[u8]), CodecError> {
    bytes
        .split_first()
        .map(|(v, b)| (*v, b))
        .ok_or(CodecError::Empty)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::machine::{FormCursor, IssuedCode, Timer, TimerKind};
    use crate::phone::Phone;

    #[test]
    fn a_subscriber_round_trips_through_its_stored_form() {
        let now = "2026-01-05T15:00:00Z".parse().unwrap();
        let mut s = Subscriber::new(Phone::parse("+14155550100").unwrap(), now);
        s.state = State::InSequence {
            name: "gentle".into(),
            step: 2,
            waiting: true,
        };
        s.fields.insert("first_name".into(), "Ann".into());
        s.codes.push(IssuedCode {
            code: "012345".into(),
            issued_at: now,
            expires_at: now,
            wrong: 3,
            by_app: false,
        });
        s.codes.push(IssuedCode {
            code: "543210".into(),
            issued_at: now,
            expires_at: now,
            wrong: 0,
            by_app: true,
        });
        s.form = Some(FormCursor {
            index: 1,
            editing: true,
            key: Some("age_group".into()),
        });
        s.timer = Some(Timer {
            at: now,
            kind: TimerKind::AskTimeout,
            epoch: 7,
        });
        s.used_codes = ["987654", "555444"]
            .map(|code| IssuedCode {
                code: code.into(),
                issued_at: now,
                expires_at: now,
                wrong: 0,
                by_app: false,
            })
            .to_vec();
        let bytes = encode_subscriber(&s);
        assert_eq!(bytes[0], SUBSCRIBER_VERSION);
        assert_eq!(decode_subscriber(&bytes).unwrap(), s);
    }

    #[test]
    fn a_version_5_record_reads_as_it_was_with_no_code_kept_from_its_verification() {
        let now = "2026-01-05T15:00:00Z".parse().unwrap();
        let mut s = Subscriber::new(Phone::parse("+14155550100").unwrap(), now);
        s.state = State::Verified;
        s.form = Some(FormCursor {
            index: 0,
            editing: false,
            key: Some("first_name".into()),
        });
        let replies = vec![Replied {
            sid: "SM1".into(),
            twiml: "<Response/>".into(),
        }];
        let v5 = v5(&s, &replies);
        assert_eq!(decode_record(&v5).unwrap(), (s.clone(), replies));
        assert_eq!(state_of_record(&v5).unwrap(), State::Verified);
    }

    /// A record as v6 and v7 wrote it (no replies, no form key): as v5, then `used`, the
    /// kept codes in that version's form.
    fn with_kept_as(version: u8, s: &Subscriber, used: impl Serialize) -> Vec<u8> {
        let mut out = vec![version];
        compact()
            .serialize_into(
                &mut out,
                &(to_v4(s), None::<&str>, Vec::<Replied>::new(), used),
            )
            .unwrap();
        out
    }

    /// A verified number that kept the code it verified with.
    fn verified_keeping_a_code() -> Subscriber {
        let now: DateTime<Utc> = "2026-01-05T15:00:00Z".parse().unwrap();
        let mut s = Subscriber::new(Phone::parse("+14155550100").unwrap(), now);
        s.state = State::Verified;
        s.used_codes = vec![IssuedCode {
            code: "987654".into(),
            issued_at: now,
            expires_at: now,
            wrong: 0,
            by_app: false,
        }];
        s
    }

    #[test]
    fn a_version_6_record_reads_with_the_one_code_it_kept_from_its_verification() {
        let s = verified_keeping_a_code();
        let v6 = with_kept_as(6, &s, s.used_codes.first().map(code_to_store));
        assert_eq!(decode_record(&v6).unwrap(), (s, Vec::new()));
    }

    #[test]
    fn a_version_7_record_reads_as_it_was_with_no_late_answer_taken() {
        let mut s = verified_keeping_a_code();
        let now = s.created_at;
        let used: Vec<_> = s.used_codes.iter().map(code_to_store).collect();
        let v7 = with_kept_as(7, &s, used);
        assert_eq!(decode_record(&v7).unwrap(), (s.clone(), Vec::new()));
        // And today's, with one.
        s.late = Some(LateQuestion {
            sequence: "quiz".into(),
            step: 1,
            field: "favorite".into(),
            until: now,
        });
        s.via = Some(Phone::parse("+15005550006").unwrap());
        assert_eq!(decode_subscriber(&encode_subscriber(&s)).unwrap(), s);
        assert_eq!(
            state_of_record(&encode_subscriber(&s)).unwrap(),
            State::Verified
        );
    }

    #[test]
    fn a_version_8_record_reads_as_it_was_with_no_code_asked_for_by_an_app() {
        let mut s = verified_keeping_a_code();
        s.state = State::AwaitingCode;
        s.codes = s.used_codes.clone();
        s.via = Some(Phone::parse("+15005550006").unwrap());
        let used: Vec<_> = s.used_codes.iter().map(code_to_store).collect();
        let via = s.via.as_ref().map(Phone::as_str);
        let mut v8 = vec![8];
        let record = (
            to_v4(&s),
            None::<&str>,
            Vec::<Replied>::new(),
            used,
            None::<()>,
            via,
        );
        compact().serialize_into(&mut v8, &record).unwrap();
        assert_eq!(decode_record(&v8).unwrap(), (s.clone(), Vec::new()));
        assert_eq!(state_of_record(&v8).unwrap(), State::AwaitingCode);
        // Today's keeps which ones an app asked for.
        s.codes[0].by_app = true;
        assert_eq!(decode_subscriber(&encode_subscriber(&s)).unwrap(), s);
    }

    /// A record as smsflow wrote it before v6: no code kept from a verification.
    fn v5(s: &Subscriber, replies: &[Replied]) -> Vec<u8> {
        let asked = s.form.as_ref().and_then(|c| c.key.as_deref());
        let mut out = vec![5];
        compact()
            .serialize_into(&mut out, &(to_v4(s), asked, replies))
            .unwrap();
        out
    }

    #[test]
    fn the_state_read_alone_is_the_state_of_the_whole_record_in_every_version() {
        let now = "2026-01-05T15:00:00Z".parse().unwrap();
        let mut s = Subscriber::new(Phone::parse("+14155550100").unwrap(), now);
        s.fields.insert("first_name".into(), "Ann".into());
        for state in [
            State::Unverified,
            State::AwaitingCode,
            State::Verified,
            State::InSequence {
                name: "gentle".into(),
                step: 2,
                waiting: true,
            },
            State::OptedOut,
        ] {
            s.state = state.clone();
            let replies = [Replied {
                sid: "SM1".into(),
                twiml: "<Response/>".into(),
            }];
            assert_eq!(
                state_of_record(&encode_record(&s, &replies)).unwrap(),
                state
            );
            assert_eq!(state_of_record(&v4(&s, &replies)).unwrap(), state);
            assert_eq!(state_of_record(&v3(&s, &replies)).unwrap(), state);
            assert_eq!(state_of_record(&encode(2, &(&s, &replies))).unwrap(), state);
            assert_eq!(state_of_record(&encode(1, &s)).unwrap(), state);
        }
        assert!(matches!(
            state_of_record(&[10, 0]),
            Err(CodecError::UnknownVersion(10))
        ));
    }

    #[test]
    fn a_version_2_record_with_fixed_width_integers_migrates_on_read() {
        let now = "2026-01-05T15:00:00Z".parse().unwrap();
        let mut s = Subscriber::new(Phone::parse("+14155550100").unwrap(), now);
        s.epoch = 300;
        s.fields.insert("first_name".into(), "Ann".into());
        let replies = vec![Replied {
            sid: "SM1".into(),
            twiml: "<Response/>".into(),
        }];
        let v2 = encode(2, &(&s, &replies));
        assert_eq!(decode_record(&v2).unwrap(), (s.clone(), replies.clone()));
        // And today's form is the smaller one.
        assert!(encode_record(&s, &replies).len() < v2.len());
    }

    /// A record as smsflow wrote it before v5: no key of the form field asked.
    fn v4(s: &Subscriber, replies: &[Replied]) -> Vec<u8> {
        let mut out = vec![4];
        compact()
            .serialize_into(&mut out, &(to_v4(s), replies))
            .unwrap();
        out
    }

    #[test]
    fn a_version_4_record_asking_a_form_field_reads_with_its_place_and_no_key() {
        let now = "2026-01-05T15:00:00Z".parse().unwrap();
        let mut s = Subscriber::new(Phone::parse("+14155550100").unwrap(), now);
        s.state = State::Verified;
        s.form = Some(FormCursor {
            index: 2,
            editing: false,
            key: Some("channel".into()),
        });
        let (read, _) = decode_record(&v4(&s, &[])).unwrap();
        assert_eq!(
            read.form,
            Some(FormCursor {
                index: 2,
                editing: false,
                key: None
            })
        );
        let (read, _) = decode_record(&encode_record(&s, &[])).unwrap();
        assert_eq!(read, s);
    }

    /// A record as smsflow wrote it before v4: the subscriber with RFC 3339 times.
    fn v3(s: &Subscriber, replies: &[Replied]) -> Vec<u8> {
        let mut out = vec![3];
        compact().serialize_into(&mut out, &(s, replies)).unwrap();
        out
    }

    #[test]
    fn a_version_3_record_with_times_as_text_migrates_on_read() {
        let now: DateTime<Utc> = "2026-01-05T15:00:00.123456789Z".parse().unwrap();
        let mut s = Subscriber::new(Phone::parse("+14155550100").unwrap(), now);
        s.last_inbound_at = Some(now);
        s.code_sends.push(now);
        s.codes.push(IssuedCode {
            code: "012345".into(),
            issued_at: now,
            expires_at: now,
            wrong: 1,
            by_app: false,
        });
        let replies = vec![Replied {
            sid: "SM1".into(),
            twiml: "<Response/>".into(),
        }];
        let old = v3(&s, &replies);
        assert_eq!(decode_record(&old).unwrap(), (s.clone(), replies.clone()));
        // Today's form keeps every nanosecond and is smaller.
        let new = encode_record(&s, &replies);
        assert_eq!(decode_record(&new).unwrap(), (s, replies));
        assert!(new.len() + 60 < old.len(), "{} vs {}", new.len(), old.len());
    }

    #[test]
    fn a_stored_time_out_of_range_is_a_corrupt_record_not_a_panic() {
        let now = "2026-01-05T15:00:00Z".parse().unwrap();
        let s = Subscriber::new(Phone::parse("+14155550100").unwrap(), now);
        let mut v = to_v4(&s);
        v.9 = (i64::MAX, 0);
        let mut bytes = vec![4];
        compact()
            .serialize_into(&mut bytes, &(v, Vec::<Replied>::new()))
            .unwrap();
        let err = decode_record(&bytes).unwrap_err();
        assert!(matches!(err, CodecError::Time(_)), "{err}");
        assert!(err.to_string().contains("out of range"), "{err}");
    }

    #[test]
    fn a_stored_number_that_is_not_valid_is_a_corrupt_record_that_does_not_show_the_number() {
        let now = "2026-01-05T15:00:00Z".parse().unwrap();
        let s = Subscriber::new(Phone::parse("+14155550100").unwrap(), now);
        let mut v = to_v4(&s);
        v.0 = "415 555 0100 ext. 7";
        let mut bytes = vec![4];
        compact()
            .serialize_into(&mut bytes, &(v, Vec::<Replied>::new()))
            .unwrap();
        let err = decode_record(&bytes).unwrap_err().to_string();
        assert!(err.contains("extension"), "{err}");
        assert!(!err.contains("555"), "{err}");
        // The same for a number inside another stored value (read through serde).
        let bad: Result<Phone, _> = serde_json::from_str("\"415 555 0100 ext. 7\"");
        let err = bad.unwrap_err().to_string();
        assert!(err.contains("extension") && !err.contains("555"), "{err}");
    }

    #[test]
    fn a_version_1_record_migrates_on_read() {
        let now = "2026-01-05T15:00:00Z".parse().unwrap();
        let s = Subscriber::new(Phone::parse("+14155550100").unwrap(), now);
        let v1 = encode(1, &s);
        assert_eq!(decode_record(&v1).unwrap(), (s, Vec::new()));
    }

    #[test]
    fn replies_round_trip_with_the_subscriber() {
        let now = "2026-01-05T15:00:00Z".parse().unwrap();
        let s = Subscriber::new(Phone::parse("+14155550100").unwrap(), now);
        let replies = vec![Replied {
            sid: "SM1".into(),
            twiml: "<Response/>".into(),
        }];
        assert_eq!(
            decode_record(&encode_record(&s, &replies)).unwrap(),
            (s, replies)
        );
    }

    #[test]
    fn an_unknown_version_is_refused_not_misread() {
        let now = "2026-01-05T15:00:00Z".parse().unwrap();
        let mut bytes =
            encode_subscriber(&Subscriber::new(Phone::parse("+14155550100").unwrap(), now));
        bytes[0] = 99;
        assert!(matches!(
            decode_subscriber(&bytes),
            Err(CodecError::UnknownVersion(99))
        ));
        assert!(matches!(decode_subscriber(&[]), Err(CodecError::Empty)));
        assert!(matches!(
            decode_subscriber(&[1, 0xff]),
            Err(CodecError::Corrupt(_))
        ));
    }
}

#[cfg(test)]
mod history_tests {
    use super::*;
    use crate::machine::Record;
    use crate::store::HistoryEntry;

    #[test]
    fn every_kind_of_history_entry_round_trips_through_bincode() {
        let at = "2026-01-05T15:00:00Z".parse().unwrap();
        for record in [
            Record::CodeSent,
            Record::OptedIn { via: "sms".into() },
            Record::FieldSaved {
                key: "k".into(),
                value: "v".into(),
            },
            Record::Deferred { until: at },
        ] {
            let h = HistoryEntry { at, record };
            let bytes = encode(1, &h);
            assert_eq!(decode::<HistoryEntry>(1, &bytes).unwrap(), h);
        }
    }
}
