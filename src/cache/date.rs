//! HTTP-date as recipients must read it (RFC 9110 §5.6.7): the preferred IMF-fixdate and the
//! two obsolete forms, RFC 850 and asctime, "MUST" all be accepted. Names are compared without
//! regard to case and the weekday is not checked against the date (it adds nothing a cache
//! needs, and an origin that gets it wrong still means the date it wrote). A value that is
//! none of these is `None`; for `Expires` that means already expired (RFC 9111 §5.3).

use std::time::{Duration, SystemTime};

const MONTHS: [&[u8; 3]; 12] = [
    b"jan", b"feb", b"mar", b"apr", b"may", b"jun", b"jul", b"aug", b"sep", b"oct", b"nov", b"dec",
];

/// Parses `Sun, 06 Nov 1994 08:49:37 GMT`, `Sunday, 06-Nov-94 08:49:37 GMT` or
/// `Sun Nov  6 08:49:37 1994`.
pub fn parse(value: &str) -> Option<SystemTime> {
    let value = value.trim();
    imf_fixdate(value.as_bytes()).unwrap_or_else(|| any_form(value))
}

/// [`parse`] of a trimmed value, by splitting it into its fields.
fn any_form(value: &str) -> Option<SystemTime> {
    // The grammar separates fields by exactly one SP; `18  Aug` is no date (the conformance
    // suite's `freshness-expires-invalid-multiple-spaces`), but asctime pads a one-digit day.
    let (day, month, year, time) = match value.split_once(',') {
        Some((_weekday, rest)) => {
            let parts: Vec<&str> = rest.strip_prefix(' ')?.split(' ').collect();
            match parts.as_slice() {
                [day, month, year, time, gmt] if gmt.eq_ignore_ascii_case("GMT") => {
                    (*day, *month, year_of(year, false)?, *time)
                }
                [date, time, gmt] if gmt.eq_ignore_ascii_case("GMT") => {
                    let mut fields = date.split('-');
                    let (day, month, year) = (fields.next()?, fields.next()?, fields.next()?);
                    if fields.next().is_some() {
                        return None;
                    }
                    (day, month, year_of(year, true)?, *time)
                }
                _ => return None,
            }
        }
        None => match value.split(' ').collect::<Vec<_>>().as_slice() {
            [_weekday, month, day, time, year] if day.len() == 2 => {
                (*day, *month, year_of(year, false)?, *time)
            }
            [_weekday, month, "", day, time, year] if day.len() == 1 => {
                (*day, *month, year_of(year, false)?, *time)
            }
            _ => return None,
        },
    };
    let day: u32 = digits(day, 1, 2)?;
    let month = month_of(month.as_bytes())?;
    let mut hms = time.split(':');
    let (hour, minute, second) = (
        digits(hms.next()?, 2, 2)?,
        digits(hms.next()?, 2, 2)?,
        digits(hms.next()?, 2, 2)?,
    );
    if hms.next().is_some() {
        return None;
    }
    time_of(year, month, day, hour, minute, second)
}

/// The IMF-fixdate every current origin sends, read at its fixed offsets: one pass where the
/// general reading above splits and collects (a stored response has two or three dates, so
/// this is part of every miss). `None`: not laid out as one, read it the general way;
/// `Some(None)`: laid out as one but no valid date, as the general reading would also find.
fn imf_fixdate(b: &[u8]) -> Option<Option<SystemTime>> {
    let laid_out = b.len() == 29
        && b[..3].iter().all(u8::is_ascii_alphabetic)
        && &b[3..5] == b", "
        && [7, 11, 16, 25].iter().all(|&i| b[i] == b' ')
        && b[19] == b':'
        && b[22] == b':'
        && b[26..].eq_ignore_ascii_case(b"GMT");
    if !laid_out {
        return None;
    }
    let number = |range: std::ops::Range<usize>| {
        b[range].iter().try_fold(0u32, |n, d| {
            d.is_ascii_digit().then(|| n * 10 + u32::from(d - b'0'))
        })
    };
    Some((|| {
        let year = i64::from(number(12..16)?);
        let (day, month) = (number(5..7)?, month_of(&b[8..11])?);
        let (hour, minute, second) = (number(17..19)?, number(20..22)?, number(23..25)?);
        time_of(year, month, day, hour, minute, second)
    })())
}

/// An IMF-fixdate alone (no other form, no surrounding whitespace), read as [`parse`] reads it.
pub fn parse_imf_fixdate(value: &[u8]) -> Option<SystemTime> {
    imf_fixdate(value).flatten()
}

fn month_of(name: &[u8]) -> Option<u32> {
    let at = MONTHS
        .iter()
        .position(|m| name.len() == 3 && name.eq_ignore_ascii_case(&m[..]))?;
    Some(at as u32 + 1)
}

/// The instant of a date and time of day read from an HTTP-date, if they are valid.
fn time_of(
    year: i64,
    month: u32,
    day: u32,
    hour: u32,
    minute: u32,
    second: u32,
) -> Option<SystemTime> {
    if hour > 23 || minute > 59 || second > 60 {
        return None;
    }
    if day == 0 || day > days_in_month(year, month) {
        return None;
    }
    let days = days_from_civil(year, month, day);
    let seconds = days * 86_400 + i64::from(hour * 3600 + minute * 60 + second.min(59));
    let seconds = u64::try_from(seconds).ok()?;
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs(seconds))
}

/// A decimal number of `min..=max` digits.
fn digits(s: &str, min: usize, max: usize) -> Option<u32> {
    if s.len() < min || s.len() > max || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// A four-digit year, or with `two_digits` RFC 850's two: RFC 9110 §5.6.7, "a timestamp that
/// appears to be more than 50 years in the future is in fact in the past", read against today.
fn year_of(s: &str, two_digits: bool) -> Option<i64> {
    if !two_digits {
        return digits(s, 4, 4).map(i64::from);
    }
    let yy = i64::from(digits(s, 2, 2)?);
    let this_year = 1970
        + SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() / 31_556_952) as i64;
    let century = this_year - this_year % 100;
    let year = century + yy;
    Some(if year > this_year + 50 {
        year - 100
    } else {
        year
    })
}

fn is_leap(year: i64) -> bool {
    (year % 4 == 0 && year % 100 != 0) || year % 400 == 0
}

fn days_in_month(year: i64, month: u32) -> u32 {
    match month {
        2 if is_leap(year) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days from 1970-01-01 to a proleptic Gregorian date (H. Hinnant's `days_from_civil`).
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(month);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The last dates this thread wrote, by their second (`secs + 1`; 0 is empty), in slot
/// `secs % 64`. A hit writes its object's stored `Date` and `Last-Modified` again (a head keeps
/// them as seconds, `head.rs`), and the objects hit are hit again and again: most dates are
/// copied from here rather than worked out (about 150 instructions each).
const RECENT_SLOTS: usize = 64;
type Recent = [std::cell::Cell<(u64, [u8; 29])>; RECENT_SLOTS];
thread_local! {
    static RECENT: Recent = const { [const { std::cell::Cell::new((0, [0; 29])) }; RECENT_SLOTS] };
}

/// Appends `secs` (since the Unix epoch) as an IMF-fixdate, `Sun, 06 Nov 1994 08:49:37 GMT`
/// (RFC 9110 §5.6.7), the form a sender generates.
pub fn write_imf_fixdate(out: &mut Vec<u8>, secs: u64) {
    out.extend_from_slice(&imf_fixdate_text(secs));
}

/// `secs` (since the Unix epoch) as an IMF-fixdate's 29 bytes.
pub fn imf_fixdate_text(secs: u64) -> [u8; 29] {
    let key = secs.wrapping_add(1);
    let slot = (secs % RECENT_SLOTS as u64) as usize;
    let recent = RECENT.try_with(|recent| {
        let (at, text) = recent[slot].get();
        if at == key {
            return text;
        }
        let text = format_imf_fixdate(secs);
        recent[slot].set((key, text));
        text
    });
    recent.unwrap_or_else(|_| format_imf_fixdate(secs))
}

fn format_imf_fixdate(secs: u64) -> [u8; 29] {
    const WEEKDAYS: [&[u8; 3]; 7] = [b"Thu", b"Fri", b"Sat", b"Sun", b"Mon", b"Tue", b"Wed"];
    const NAMES: [&[u8; 3]; 12] = [
        b"Jan", b"Feb", b"Mar", b"Apr", b"May", b"Jun", b"Jul", b"Aug", b"Sep", b"Oct", b"Nov",
        b"Dec",
    ];
    let days = secs / 86_400;
    let of_day = secs % 86_400;
    let (year, month, day) = civil_from_days(days as i64);
    let year = year.clamp(0, 9999) as u64;
    let mut text = *b"Thu, 01 Jan 1970 00:00:00 GMT";
    let mut two = |at: usize, n: u64| {
        text[at] = b'0' + (n / 10 % 10) as u8;
        text[at + 1] = b'0' + (n % 10) as u8;
    };
    two(5, u64::from(day));
    two(12, year / 100);
    two(14, year % 100);
    two(17, of_day / 3600);
    two(20, of_day / 60 % 60);
    two(23, of_day % 60);
    text[..3].copy_from_slice(WEEKDAYS[(days % 7) as usize]);
    text[8..11].copy_from_slice(NAMES[(month - 1) as usize]);
    text
}

/// The proleptic Gregorian date `days` after 1970-01-01 (H. Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::parse;
    use std::time::{Duration, SystemTime};

    #[test]
    fn imf_fixdate_is_written_as_it_is_read() {
        for (secs, text) in [
            (0, "Thu, 01 Jan 1970 00:00:00 GMT"),
            (784_111_777, "Sun, 06 Nov 1994 08:49:37 GMT"),
            (951_782_400, "Tue, 29 Feb 2000 00:00:00 GMT"),
            (1_796_228_767, "Wed, 02 Dec 2026 16:26:07 GMT"),
            (u64::from(u32::MAX), "Sun, 07 Feb 2106 06:28:15 GMT"),
        ] {
            // The second time from the thread's recent dates.
            for _ in 0..2 {
                let mut out = Vec::new();
                super::write_imf_fixdate(&mut out, secs);
                assert_eq!(String::from_utf8(out).unwrap(), text);
            }
            assert_eq!(
                parse(text),
                Some(SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
            );
        }
        // Every day of four years, leap days included, round-trips (twice: each day's date
        // takes the same slot of the recent dates as the day before's).
        for day in (20_000..21_461u64).chain(20_000..21_461) {
            let secs = day * 86_400 + 45_296;
            let mut out = Vec::new();
            super::write_imf_fixdate(&mut out, secs);
            let text = String::from_utf8(out).unwrap();
            assert_eq!(
                parse(&text),
                Some(SystemTime::UNIX_EPOCH + Duration::from_secs(secs)),
                "{text}"
            );
        }
    }

    /// regression guard for the fixed-offset reading: wherever it answers, it answers as the
    /// general one does, for dates valid and not (every byte of several dates replaced by
    /// characters that matter to either reading).
    #[test]
    fn the_fixed_offset_reading_agrees_with_the_general_one() {
        let mut answered = 0;
        for date in [
            "Sun, 06 Nov 1994 08:49:37 GMT",
            "Tue, 29 Feb 2000 23:59:60 gmt",
            "Sat, 29 Feb 2001 00:00:00 GMT",
            "Mon, 31 Apr 2024 24:00:00 GMT",
        ] {
            for at in 0..date.len() {
                for c in [b'0', b'9', b' ', b',', b':', b'-', b'a', b'Z', 0xc3] {
                    let mut bytes = date.as_bytes().to_vec();
                    bytes[at] = c;
                    let Ok(text) = std::str::from_utf8(&bytes) else {
                        continue;
                    };
                    if let Some(fast) = super::imf_fixdate(text.as_bytes()) {
                        answered += 1;
                        assert_eq!(fast, super::any_form(text), "{text:?}");
                    }
                }
            }
        }
        assert!(answered > 100);
    }

    #[test]
    fn all_three_forms_in_any_case_with_any_weekday() {
        let want = SystemTime::UNIX_EPOCH + Duration::from_secs(784_111_777);
        for form in [
            "Sun, 06 Nov 1994 08:49:37 GMT",
            "sun, 06 nov 1994 08:49:37 gmt",
            "Fri, 06 Nov 1994 08:49:37 GMT",
            "Sunday, 06-Nov-94 08:49:37 GMT",
            "Sun Nov  6 08:49:37 1994",
            "Sun Nov 06 08:49:37 1994",
            "  Sun, 06 NOV 1994 08:49:37 GMT ",
        ] {
            assert_eq!(parse(form), Some(want), "{form}");
        }
        assert_eq!(
            parse("Thu, 01 Jan 1970 00:00:00 GMT"),
            Some(SystemTime::UNIX_EPOCH)
        );
        assert!(
            parse("Tue, 29 Feb 2028 12:00:00 GMT").is_some(),
            "a leap day"
        );
    }

    #[test]
    fn anything_else_is_not_a_date() {
        for bad in [
            "0",
            "-1",
            "",
            "Sun, 06 Nov 1994 08:49:37",
            "Sun, 06 Nov 1994 08:49:37 PST",
            "Sun, 31 Feb 1994 08:49:37 GMT",
            "Sun, 06 Foo 1994 08:49:37 GMT",
            "Sun, 06 Nov 1994 25:49:37 GMT",
            "Sun, 06 Nov 94 08:49:37 GMT",
            "Sun, 06 Nov 1994 8:49:37 GMT",
            "Thu, 18  Aug  2050 02:01:18 GMT",
            "Sun,06 Nov 1994 08:49:37 GMT",
            "Sun Nov 6 08:49:37 1994",
            "Sun Nov   6 08:49:37 1994",
        ] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
    }
}
