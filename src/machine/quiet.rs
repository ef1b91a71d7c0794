//! Quiet hours: when a follow-up falls inside them, it waits until they end in the bot's timezone.

use chrono::{DateTime, Days, LocalResult, NaiveDateTime, Offset, TimeDelta, TimeZone, Utc};

use crate::flows::Bot;

/// When `at` falls in the bot's quiet hours, the moment they end; otherwise `None`.
pub fn quiet_end(bot: &Bot, at: DateTime<Utc>) -> Option<DateTime<Utc>> {
    let end = quiet_stretch_end(bot, at)?;
    // A clock jump can put that end inside the next quiet stretch (Samoa skipped the day
    // quiet hours were to end on): wait that one out too.
    Some(quiet_stretch_end(bot, end).unwrap_or(end))
}

/// When a step `after` a delay from `now` is due (or a question's `timeout` runs out): a
/// whole number of days, however written (`1d`, `24h`, `1w`), is that many calendar days in
/// the bot's timezone, at the same wall time, as "tomorrow at this time" is meant (23 or 25
/// hours across a DST change, so a daily step does not drift into quiet hours); a wall time
/// the change skips (or a skipped day) is whole days of 24 hours; any other delay is exact.
pub fn step_due(bot: &Bot, now: DateTime<Utc>, after: TimeDelta) -> DateTime<Utc> {
    let exact = now.checked_add_signed(after).unwrap_or(now);
    const DAY: i64 = 86_400;
    let secs = after.num_seconds();
    if secs <= 0 || after.subsec_nanos() != 0 || secs % DAY != 0 {
        return exact;
    }
    let days = Days::new((secs / DAY).unsigned_abs());
    let offset = bot
        .timezone
        .offset_from_utc_datetime(&now.naive_utc())
        .fix();
    let target =
        (now.naive_utc().checked_add_offset(offset)).and_then(|local| local.checked_add_days(days));
    match target.map(|t| bot.timezone.from_local_datetime(&t)) {
        Some(LocalResult::Single(t)) => t.with_timezone(&Utc),
        // The first of a wall time a clock change repeats (whole days ahead, it is to come).
        Some(LocalResult::Ambiguous(early, _)) => early.with_timezone(&Utc).max(now),
        Some(LocalResult::None) | None => exact,
    }
}

/// The end of the quiet stretch `at` falls in, if any.
fn quiet_stretch_end(bot: &Bot, at: DateTime<Utc>) -> Option<DateTime<Utc>> {
    let q = bot.quiet_hours?;
    // Checked: at the ends of the time a date can hold, a local time may not exist (a clock
    // moved that far has no quiet hours).
    let offset = bot.timezone.offset_from_utc_datetime(&at.naive_utc()).fix();
    let local = at.naive_utc().checked_add_offset(offset)?;
    let t = local.time();
    let (inside, end_date) = if q.from < q.to {
        (t >= q.from && t < q.to, local.date())
    } else if t >= q.from {
        (true, local.date().checked_add_days(Days::new(1))?)
    } else {
        (t < q.to, local.date())
    };
    if !inside {
        return None;
    }
    let end = first_instant_at_or_after(bot, end_date.and_time(q.to), at)?;
    // Never move a message earlier.
    Some(end.max(at.checked_add_signed(TimeDelta::seconds(1))?))
}

/// The UTC instant of a local wall time, after `after`: a time skipped by a clock jump moves
/// to just after it (in half hours, up to two days: Samoa skipped a whole day in 2011), and of
/// a time a DST fold repeats, the first copy still ahead is taken (in the repeated hour
/// itself, the second: the first is already past).
fn first_instant_at_or_after(
    bot: &Bot,
    mut naive: NaiveDateTime,
    after: DateTime<Utc>,
) -> Option<DateTime<Utc>> {
    // Near the ends of time there is nothing to find: the loop moves up to two days on, and
    // an offset a day more, past what a date can hold.
    naive.checked_sub_days(Days::new(4))?;
    naive.checked_add_days(Days::new(4))?;
    for _ in 0..=96 {
        match bot.timezone.from_local_datetime(&naive) {
            LocalResult::Single(t) => return Some(t.with_timezone(&Utc)),
            LocalResult::Ambiguous(early, late) => {
                let early = early.with_timezone(&Utc);
                return Some(if early > after {
                    early
                } else {
                    late.with_timezone(&Utc)
                });
            }
            LocalResult::None => naive = naive.checked_add_signed(TimeDelta::minutes(30))?,
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flows::QuietHours;
    use chrono::NaiveTime;

    /// A step a whole number of days later is due at the same wall time in the bot's
    /// timezone, across a DST change too; other delays are exact. (Samoa's skipped day: see
    /// `a_skipped_day_gives_a_step_whole_days_of_24_hours`.)
    #[test]
    fn a_step_days_later_keeps_its_wall_time_across_a_dst_change() {
        let b = bot(chrono_tz::America::New_York, "21:00", "08:00");
        let at = |s: &str| s.parse::<DateTime<Utc>>().unwrap();
        for (now, after, due) in [
            // 20:30 EST, then 20:30 EDT: 23 hours.
            (
                "2026-03-08T01:30:00Z",
                TimeDelta::days(1),
                "2026-03-09T00:30:00Z",
            ),
            // 20:30 EDT, then 20:30 EST: 25 hours.
            (
                "2026-11-01T00:30:00Z",
                TimeDelta::days(1),
                "2026-11-02T01:30:00Z",
            ),
            (
                "2026-11-01T00:30:00Z",
                TimeDelta::weeks(1),
                "2026-11-08T01:30:00Z",
            ),
            // 02:15 and 02:30 do not exist on the day clocks spring forward: 24 hours, in
            // order.
            (
                "2026-03-07T07:15:00Z",
                TimeDelta::days(1),
                "2026-03-08T07:15:00Z",
            ),
            (
                "2026-03-07T07:30:00Z",
                TimeDelta::days(1),
                "2026-03-08T07:30:00Z",
            ),
            // 01:30 comes twice when clocks fall back: the first.
            (
                "2026-10-31T05:30:00Z",
                TimeDelta::days(1),
                "2026-11-01T05:30:00Z",
            ),
            // However written.
            (
                "2026-03-08T01:30:00Z",
                TimeDelta::hours(24),
                "2026-03-09T00:30:00Z",
            ),
            // Not whole days: exact.
            (
                "2026-03-08T01:30:00Z",
                TimeDelta::hours(25),
                "2026-03-09T02:30:00Z",
            ),
            (
                "2026-03-08T01:30:00Z",
                TimeDelta::zero(),
                "2026-03-08T01:30:00Z",
            ),
            // No change of offset: 24 hours.
            (
                "2026-01-05T15:00:00Z",
                TimeDelta::days(2),
                "2026-01-07T15:00:00Z",
            ),
        ] {
            assert_eq!(step_due(&b, at(now), after), at(due), "{now} + {after}");
        }
    }

    #[test]
    fn a_skipped_day_gives_a_step_whole_days_of_24_hours() {
        let b = bot(chrono_tz::Pacific::Apia, "21:00", "08:00");
        // 23:30 on 29 December 2011 in Samoa; the 30th did not happen there.
        let now: DateTime<Utc> = "2011-12-30T09:30:00Z".parse().unwrap();
        assert_eq!(
            step_due(&b, now, TimeDelta::days(1)),
            now + TimeDelta::days(1)
        );
    }

    fn bot(tz: chrono_tz::Tz, from: &str, to: &str) -> Bot {
        let t = |s| NaiveTime::parse_from_str(s, "%H:%M").unwrap();
        Bot {
            name: "t".into(),
            timezone: tz,
            quiet_hours: Some(QuietHours {
                from: t(from),
                to: t(to),
            }),
        }
    }

    fn utc(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    #[test]
    fn at_the_ends_of_time_quiet_hours_give_no_answer_rather_than_a_panic() {
        for tz in [
            chrono_tz::Asia::Tokyo,
            chrono_tz::America::Los_Angeles,
            chrono_tz::UTC,
        ] {
            let quiet = bot(tz, "21:00", "08:00");
            for at in [DateTime::<Utc>::MAX_UTC, DateTime::<Utc>::MIN_UTC] {
                // Whatever it says, it says it without panicking, and never earlier.
                if let Some(end) = quiet_end(&quiet, at) {
                    assert!(end > at, "{tz} {at}");
                }
            }
        }
    }

    #[test]
    fn a_late_evening_message_waits_until_the_morning_in_the_bots_timezone() {
        let b = bot(chrono_tz::America::New_York, "21:00", "08:00");
        // 23:30 in New York (EST, UTC-5) on 2026-01-10.
        let end = quiet_end(&b, utc("2026-01-11T04:30:00Z")).unwrap();
        assert_eq!(end, utc("2026-01-11T13:00:00Z"));
        // 02:00 local: same morning.
        assert_eq!(
            quiet_end(&b, utc("2026-01-11T07:00:00Z")).unwrap(),
            utc("2026-01-11T13:00:00Z")
        );
    }

    #[test]
    fn quiet_hours_ending_in_the_hour_a_fold_repeats_end_once_not_every_second() {
        // New York falls back at 02:00 EDT on 2026-11-01: 01:00-02:00 comes twice.
        let b = bot(chrono_tz::America::New_York, "21:00", "01:30");
        // 01:15 in the first copy (EDT, UTC-4): quiet until 01:30 EDT.
        assert_eq!(
            quiet_end(&b, utc("2026-11-01T05:15:00Z")),
            Some(utc("2026-11-01T05:30:00Z"))
        );
        // 01:15 in the second copy (EST, UTC-5): quiet until 01:30 EST, a quarter hour on,
        // not one second on (which deferred the message again every second).
        assert_eq!(
            quiet_end(&b, utc("2026-11-01T06:15:00Z")),
            Some(utc("2026-11-01T06:30:00Z"))
        );
    }

    #[test]
    fn quiet_hours_ending_in_a_skipped_day_end_when_the_clock_comes_back() {
        // Samoa skipped 30 December 2011: 29 Dec 23:59:59 (UTC-10) was followed by
        // 31 Dec 00:00 (UTC+14). Quiet from 21:00 to 08:00 from the 29th would end on the
        // skipped day; it ends when the quiet night the jump lands in does, 31 Dec 08:00,
        // not never (which sent the message at once).
        let b = bot(chrono_tz::Pacific::Apia, "21:00", "08:00");
        // 22:00 local on the 29th.
        assert_eq!(
            quiet_end(&b, utc("2011-12-30T08:00:00Z")),
            Some(utc("2011-12-30T18:00:00Z"))
        );
    }

    #[test]
    fn daytime_is_not_quiet() {
        let b = bot(chrono_tz::America::New_York, "21:00", "08:00");
        assert_eq!(quiet_end(&b, utc("2026-01-11T15:00:00Z")), None);
    }

    #[test]
    fn quiet_hours_within_one_day_work_too() {
        let b = bot(chrono_tz::UTC, "12:00", "13:00");
        assert_eq!(
            quiet_end(&b, utc("2026-01-11T12:30:00Z")).unwrap(),
            utc("2026-01-11T13:00:00Z")
        );
        assert_eq!(quiet_end(&b, utc("2026-01-11T13:00:00Z")), None);
    }
}
