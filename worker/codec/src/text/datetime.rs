//! Dates, times and intervals in PostgreSQL's ISO / `postgres` text: proleptic Gregorian
//! calendar with BC years, ±infinity, microsecond fractions printed without trailing zeros.
//! The calendar arithmetic is written out (Hinnant's civil-day algorithms) because chrono
//! stops at year 262143 and PostgreSQL dates go to 5874897.

use std::fmt::Write;

const MICROS_PER_SECOND: i64 = 1_000_000;
const MICROS_PER_DAY: i64 = 86_400 * MICROS_PER_SECOND;

/// Days since 1970-01-01 of an astronomical year (1 BC is year 0), month and day.
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn num(s: &str, what: &str) -> Result<i64, String> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("expected digits for the {what}, got {s:?}"));
    }
    s.parse::<i64>().map_err(|e| format!("{what}: {e}"))
}

/// `YYYY-MM-DD` with the BC flag to days since 1970-01-01.
fn parse_ymd(text: &str, bc: bool) -> Result<i64, String> {
    let mut parts = text.splitn(3, '-');
    let (Some(y), Some(m), Some(d)) = (parts.next(), parts.next(), parts.next()) else {
        return Err("expected YYYY-MM-DD".into());
    };
    let (y, m, d) = (num(y, "year")?, num(m, "month")?, num(d, "day")?);
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) || y == 0 {
        return Err("date field out of range".into());
    }
    Ok(days_from_civil(if bc { 1 - y } else { y }, m, d))
}

fn strip_bc(text: &str) -> (&str, bool) {
    match text.strip_suffix(" BC") {
        Some(t) => (t, true),
        None => (text, false),
    }
}

pub(super) fn parse_date(text: &str) -> Result<i32, String> {
    match text {
        "infinity" => return Ok(i32::MAX),
        "-infinity" => return Ok(i32::MIN),
        _ => {}
    }
    let (ymd, bc) = strip_bc(text);
    let days = parse_ymd(ymd, bc)?;
    i32::try_from(days)
        .ok()
        .filter(|d| *d != i32::MAX && *d != i32::MIN)
        .ok_or_else(|| "date out of range".to_owned())
}

/// `HH:MM:SS[.ffffff]` to microseconds (24:00:00 included).
pub(super) fn parse_time(text: &str) -> Result<i64, String> {
    i64::try_from(parse_hms(text)?).map_err(|_| "time out of range".to_owned())
}

/// Wide enough for an interval's hours (up to 2562047788) before the sign is applied.
fn parse_hms(text: &str) -> Result<i128, String> {
    let (hms, frac) = text.split_once('.').unwrap_or((text, ""));
    let mut parts = hms.splitn(3, ':');
    let (Some(h), Some(m), Some(s)) = (parts.next(), parts.next(), parts.next()) else {
        return Err("expected HH:MM:SS".into());
    };
    let (h, m, s) = (num(h, "hour")?, num(m, "minute")?, num(s, "second")?);
    if m > 59 || s > 60 {
        return Err("time field out of range".into());
    }
    let micros = if frac.is_empty() {
        0
    } else {
        if frac.len() > 6 {
            return Err("more than 6 fractional digits".into());
        }
        num(frac, "fraction")? * 10_i64.pow(6 - frac.len() as u32)
    };
    Ok(i128::from(h) * i128::from(3_600 * MICROS_PER_SECOND)
        + i128::from((m * 60 + s) * MICROS_PER_SECOND + micros))
}

/// `+HH[:MM[:SS]]` / `-…` to seconds east of UTC.
fn parse_offset(text: &str) -> Result<i32, String> {
    let (sign, rest) = match text.as_bytes().first() {
        Some(b'+') => (1, &text[1..]),
        Some(b'-') => (-1, &text[1..]),
        _ => return Err("expected a zone offset (+HH, -HH:MM)".into()),
    };
    let mut total = 0i64;
    let mut count = 0;
    for (i, part) in rest.split(':').enumerate() {
        if i > 2 {
            return Err("zone offset has too many fields".into());
        }
        total = total * 60 + num(part, "zone offset")?;
        count = i + 1;
    }
    for _ in count..3 {
        total *= 60;
    }
    i32::try_from(sign * total).map_err(|_| "zone offset out of range".to_owned())
}

/// Splits `HH:MM:SS.f+05:30` into the time and the offset.
fn split_offset(text: &str) -> Result<(&str, &str), String> {
    text.char_indices()
        .skip(1)
        .find(|(_, c)| *c == '+' || *c == '-')
        .map(|(i, _)| (&text[..i], &text[i..]))
        .ok_or_else(|| "missing zone offset".to_owned())
}

pub(super) fn parse_timetz(text: &str) -> Result<(i64, i32), String> {
    let (time, offset) = split_offset(text)?;
    Ok((parse_time(time)?, parse_offset(offset)?))
}

/// `YYYY-MM-DD HH:MM:SS[.f][+HH[:MM]][ BC]` to microseconds since the Unix epoch (UTC for
/// timestamptz). Beyond i64 microseconds since 1970 (after 294246 AD) is an error: the
/// value model counts from 1970, PostgreSQL from 2000.
pub(super) fn parse_timestamp(text: &str, with_zone: bool) -> Result<i64, String> {
    match parse_timestamp_iso(text.as_bytes(), with_zone) {
        Some(micros) => Ok(micros),
        None => parse_timestamp_general(text, with_zone),
    }
}

fn parse_timestamp_general(text: &str, with_zone: bool) -> Result<i64, String> {
    match text {
        "infinity" => return Ok(i64::MAX),
        "-infinity" => return Ok(i64::MIN),
        _ => {}
    }
    let (text, bc) = strip_bc(text);
    let (date, time) = text.split_once(' ').ok_or("expected YYYY-MM-DD HH:MM:SS")?;
    let days = parse_ymd(date, bc)?;
    let (time, offset) = if with_zone {
        let (t, o) = split_offset(time)?;
        (t, parse_offset(o)?)
    } else {
        (time, 0)
    };
    let micros = i128::from(days) * i128::from(MICROS_PER_DAY) + i128::from(parse_time(time)?)
        - i128::from(offset) * i128::from(MICROS_PER_SECOND);
    i64::try_from(micros)
        .ok()
        .filter(|m| *m != i64::MAX && *m != i64::MIN)
        .ok_or_else(|| {
            "timestamp beyond the codec's range (i64 microseconds since 1970, up to 294246 AD)"
                .to_owned()
        })
}

/// The form PostgreSQL prints with `DateStyle` ISO for years 1–9999 AD,
/// `YYYY-MM-DD HH:MM:SS[.f{1,6}]` (then `±HH[:MM[:SS]]` with a zone), read by byte
/// position: every replicated timestamp goes through here, so the common case does not
/// split strings. `None` for anything else (BC, infinity, wider years, out-of-range
/// fields), which the general parser handles or rejects with its precise message.
fn parse_timestamp_iso(b: &[u8], with_zone: bool) -> Option<i64> {
    fn digits(b: &[u8]) -> Option<i64> {
        b.iter().try_fold(0i64, |n, &c| {
            c.is_ascii_digit().then(|| n * 10 + i64::from(c - b'0'))
        })
    }
    if b.len() < 19
        || b[4] != b'-'
        || b[7] != b'-'
        || b[10] != b' '
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let (y, mo, d) = (digits(&b[0..4])?, digits(&b[5..7])?, digits(&b[8..10])?);
    let (h, mi, sec) = (
        digits(&b[11..13])?,
        digits(&b[14..16])?,
        digits(&b[17..19])?,
    );
    if y == 0 || !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 24 || mi > 59 || sec > 60
    {
        return None;
    }
    let mut rest = &b[19..];
    let mut micros = 0;
    if let Some(frac) = rest.strip_prefix(b".") {
        let n = frac.iter().take_while(|c| c.is_ascii_digit()).count();
        if n == 0 || n > 6 {
            return None;
        }
        micros = digits(&frac[..n])? * 10_i64.pow(6 - n as u32);
        rest = &frac[n..];
    }
    let mut offset = 0;
    if with_zone {
        let sign = match rest.first() {
            Some(b'+') => 1,
            Some(b'-') => -1,
            _ => return None,
        };
        let mut unit = 3600;
        let mut fields = rest[1..].split(|&c| c == b':');
        for field in fields.by_ref().take(3) {
            if field.len() != 2 {
                return None;
            }
            offset += digits(field)? * unit;
            unit /= 60;
        }
        if fields.next().is_some() {
            return None;
        }
        offset *= sign;
    } else if !rest.is_empty() {
        return None;
    }
    let days = days_from_civil(y, mo, d);
    Some(
        days * MICROS_PER_DAY + ((h * 60 + mi) * 60 + sec) * MICROS_PER_SECOND + micros
            - offset * MICROS_PER_SECOND,
    )
}

fn push_ymd(days: i64, out: &mut String) -> bool {
    let (y, m, d) = civil_from_days(days);
    let bc = y <= 0;
    let _ = write!(out, "{:04}-{m:02}-{d:02}", if bc { 1 - y } else { y });
    bc
}

pub(super) fn render_date(days: i32, out: &mut String) {
    match days {
        i32::MAX => out.push_str("infinity"),
        i32::MIN => out.push_str("-infinity"),
        _ => {
            if push_ymd(i64::from(days), out) {
                out.push_str(" BC");
            }
        }
    }
}

/// Seconds and fraction: `SS[.ffffff]` without trailing zeros, as PostgreSQL's
/// `AppendSeconds`.
fn push_seconds(seconds: i64, fraction: i64, out: &mut String) {
    let _ = write!(out, "{seconds:02}");
    if fraction != 0 {
        let digits = format!("{fraction:06}");
        out.push('.');
        out.push_str(digits.trim_end_matches('0'));
    }
}

pub(super) fn render_time(micros: i64, out: &mut String) {
    let secs = micros.div_euclid(MICROS_PER_SECOND);
    let fraction = micros.rem_euclid(MICROS_PER_SECOND);
    let _ = write!(out, "{:02}:{:02}:", secs / 3600, secs / 60 % 60);
    push_seconds(secs % 60, fraction, out);
}

pub(super) fn render_offset(seconds_east: i32, out: &mut String) {
    out.push(if seconds_east < 0 { '-' } else { '+' });
    let abs = seconds_east.unsigned_abs();
    let _ = write!(out, "{:02}", abs / 3600);
    let (m, s) = (abs / 60 % 60, abs % 60);
    if m != 0 || s != 0 {
        let _ = write!(out, ":{m:02}");
    }
    if s != 0 {
        let _ = write!(out, ":{s:02}");
    }
}

pub(super) fn render_timestamp(micros: i64, with_zone: bool, out: &mut String) {
    match micros {
        i64::MAX => out.push_str("infinity"),
        i64::MIN => out.push_str("-infinity"),
        _ => {
            let bc = push_ymd(micros.div_euclid(MICROS_PER_DAY), out);
            out.push(' ');
            render_time(micros.rem_euclid(MICROS_PER_DAY), out);
            if with_zone {
                // TimeZone is UTC on every worker session.
                out.push_str("+00");
            }
            if bc {
                out.push_str(" BC");
            }
        }
    }
}

/// IntervalStyle `postgres`, as PostgreSQL's `EncodeInterval`: `1 year 2 mons -3 days
/// +04:05:06.789`: after a negative part, a positive one carries `+`.
pub(super) fn render_interval(months: i32, days: i32, micros: i64, out: &mut String) {
    let mut is_zero = true;
    let mut is_before = false;
    let mut part = |value: i64, unit: &str, out: &mut String| {
        if value == 0 {
            return;
        }
        let _ = write!(
            out,
            "{}{}{value} {unit}{}",
            if is_zero { "" } else { " " },
            if is_before && value > 0 { "+" } else { "" },
            if value != 1 { "s" } else { "" }
        );
        is_before = value < 0;
        is_zero = false;
    };
    part(i64::from(months / 12), "year", out);
    part(i64::from(months % 12), "mon", out);
    part(i64::from(days), "day", out);
    if is_zero || micros != 0 {
        let hours = micros / (3_600 * MICROS_PER_SECOND);
        let rest = micros % (3_600 * MICROS_PER_SECOND);
        let minutes = rest / (60 * MICROS_PER_SECOND);
        let rest = rest % (60 * MICROS_PER_SECOND);
        let seconds = rest / MICROS_PER_SECOND;
        let fraction = rest % MICROS_PER_SECOND;
        let minus = micros < 0;
        let _ = write!(
            out,
            "{}{}{:02}:{:02}:",
            if is_zero { "" } else { " " },
            if minus {
                "-"
            } else if is_before {
                "+"
            } else {
                ""
            },
            hours.unsigned_abs(),
            minutes.unsigned_abs()
        );
        push_seconds(
            seconds.unsigned_abs() as i64,
            fraction.unsigned_abs() as i64,
            out,
        );
    }
}

/// Parses IntervalStyle `postgres` output: `N year(s)`, `N mon(s)`, `N day(s)` and an
/// optional signed `HH:MM:SS[.f]`.
pub(super) fn parse_interval(text: &str) -> Result<(i32, i32, i64), String> {
    let mut months: i64 = 0;
    let mut days: i64 = 0;
    let mut micros: i64 = 0;
    let mut tokens = text.split_whitespace();
    while let Some(token) = tokens.next() {
        if token.contains(':') {
            let (negative, t) = match token.as_bytes().first() {
                Some(b'-') => (true, &token[1..]),
                Some(b'+') => (false, &token[1..]),
                _ => (false, token),
            };
            let m = parse_hms(t)?;
            micros = i64::try_from(if negative { -m } else { m })
                .map_err(|_| "interval time out of range".to_owned())?;
            continue;
        }
        let n: i64 = token
            .parse()
            .map_err(|_| format!("expected a number, got {token:?}"))?;
        let unit = tokens.next().ok_or("number without unit")?;
        match unit.trim_end_matches('s') {
            "year" => {
                months = n
                    .checked_mul(12)
                    .and_then(|y| months.checked_add(y))
                    .ok_or("years out of range")?
            }
            "mon" => months = months.checked_add(n).ok_or("months out of range")?,
            "day" => days = days.checked_add(n).ok_or("days out of range")?,
            other => return Err(format!("unexpected unit {other:?}")),
        }
    }
    let months = i32::try_from(months).map_err(|_| "months out of range".to_owned())?;
    let days = i32::try_from(days).map_err(|_| "days out of range".to_owned())?;
    Ok((months, days, micros))
}

#[cfg(test)]
mod fast_path_tests {
    use super::*;

    #[test]
    fn the_iso_fast_path_agrees_with_the_general_parser() {
        for (text, zone) in [
            ("2026-11-22 03:04:05", false),
            ("2026-11-22 03:04:05.5", false),
            ("2026-11-22 03:04:05.123456", false),
            ("1970-01-01 00:00:00", false),
            ("0001-01-01 00:00:00", false),
            ("9999-12-31 24:00:00", false),
            ("2026-11-22 03:04:05+00", true),
            ("2026-11-22 03:04:05.000042+05:30", true),
            ("1969-12-31 23:59:59.999999-09:30:15", true),
            ("2000-02-29 12:00:00-12", true),
        ] {
            let fast = parse_timestamp_iso(text.as_bytes(), zone);
            assert!(fast.is_some(), "{text} takes the fast path");
            assert_eq!(
                fast.map(Ok),
                Some(parse_timestamp_general(text, zone)),
                "{text}"
            );
        }
        // Everything else goes to the general parser.
        for (text, zone) in [
            ("2026-11-22 03:04:05 BC", false),
            ("12026-11-22 03:04:05", false),
            ("2026-11-22 03:04:05.1234567", false),
            ("2026-11-22 03:04:05", true),
            ("2026-11-22 03:04:05+0530", true),
            ("2026-13-22 03:04:05", false),
            ("infinity", false),
        ] {
            assert_eq!(parse_timestamp_iso(text.as_bytes(), zone), None, "{text}");
        }
    }
}
