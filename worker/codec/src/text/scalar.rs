//! Scalar types whose text PostgreSQL prints in one piece: floats (shortest round-trip
//! output), numeric, money, bytea, uuid, network addresses, MAC addresses, hex EWKB.

use std::fmt::Write;
use std::net::{Ipv4Addr, Ipv6Addr};

pub(super) fn parse_float<T: std::str::FromStr>(text: &str) -> Result<T, String>
where
    T::Err: std::fmt::Display,
{
    // Rust's float parser accepts PostgreSQL's NaN / Infinity / -Infinity spellings too.
    text.parse::<T>().map_err(|e| e.to_string())
}

pub(super) fn render_float4(v: f32, out: &mut String) {
    if v.is_finite() {
        // `{:e}` is Rust's shortest round-trip form, as Ryu in PostgreSQL's float4out.
        shortest(&format!("{v:e}"), 6, out);
    } else {
        non_finite(v.is_nan(), v.is_sign_negative(), out);
    }
}

pub(super) fn render_float8(v: f64, out: &mut String) {
    if v.is_finite() {
        shortest(&format!("{v:e}"), 15, out);
    } else {
        non_finite(v.is_nan(), v.is_sign_negative(), out);
    }
}

fn non_finite(nan: bool, negative: bool, out: &mut String) {
    out.push_str(match (nan, negative) {
        (true, _) => "NaN",
        (false, false) => "Infinity",
        (false, true) => "-Infinity",
    });
}

/// Lays out shortest digits as PostgreSQL's `d2s`/`f2s` do (printf `%g` thresholds):
/// fixed notation for decimal exponents in `-4..fixed_below`, otherwise `d.ddde±XX` with
/// at least two exponent digits.
fn shortest(sci: &str, fixed_below: i32, out: &mut String) {
    let (mantissa, exp) = sci.split_once('e').unwrap_or((sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let (negative, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => (true, m),
        None => (false, mantissa),
    };
    let digits: String = mantissa.chars().filter(char::is_ascii_digit).collect();
    if negative {
        out.push('-');
    }
    if (-4..fixed_below).contains(&exp) {
        if exp >= 0 {
            let int_len = exp as usize + 1;
            if digits.len() <= int_len {
                out.push_str(&digits);
                out.extend(std::iter::repeat_n('0', int_len - digits.len()));
            } else {
                out.push_str(&digits[..int_len]);
                out.push('.');
                out.push_str(&digits[int_len..]);
            }
        } else {
            out.push_str("0.");
            out.extend(std::iter::repeat_n('0', (-exp - 1) as usize));
            out.push_str(&digits);
        }
    } else {
        out.push_str(&digits[..1]);
        if digits.len() > 1 {
            out.push('.');
            out.push_str(&digits[1..]);
        }
        let _ = write!(
            out,
            "e{}{:02}",
            if exp < 0 { '-' } else { '+' },
            exp.unsigned_abs()
        );
    }
}

/// Numeric text is kept as it is (arbitrary precision); only its shape is checked.
pub(super) fn check_numeric(text: &str) -> Result<String, String> {
    if matches!(text, "NaN" | "Infinity" | "-Infinity") {
        return Ok(text.to_owned());
    }
    let body = text.strip_prefix('-').unwrap_or(text);
    let (int, frac) = body.split_once('.').unwrap_or((body, ""));
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if int.is_empty() || !digits(int) || !digits(frac) || (body.contains('.') && frac.is_empty()) {
        return Err("expected a decimal number, NaN, Infinity or -Infinity".into());
    }
    Ok(text.to_owned())
}

/// `$1,234.56` / `-$1,234.56` (lc_monetary C: `$`, `,` groups, two decimals) to cents.
pub(super) fn parse_money(text: &str) -> Result<i64, String> {
    let (negative, rest) = match text.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, text),
    };
    let rest = rest.strip_prefix('$').ok_or("expected $ (lc_monetary C)")?;
    let (units, cents) = rest.split_once('.').unwrap_or((rest, "00"));
    if cents.len() != 2 || !cents.bytes().all(|b| b.is_ascii_digit()) {
        return Err("expected two decimals".into());
    }
    let mut total: i128 = 0;
    for b in units.bytes().chain(cents.bytes()) {
        match b {
            b'0'..=b'9' => total = total * 10 + i128::from(b - b'0'),
            b',' => {}
            _ => return Err(format!("unexpected character {:?}", b as char)),
        }
        if total > i128::from(i64::MAX) + 1 {
            return Err("out of range for money".into());
        }
    }
    let total = if negative { -total } else { total };
    i64::try_from(total).map_err(|_| "out of range for money".to_owned())
}

pub(super) fn render_money(cents: i64, out: &mut String) {
    if cents < 0 {
        out.push('-');
    }
    out.push('$');
    let abs = cents.unsigned_abs();
    let units = (abs / 100).to_string();
    for (i, c) in units.chars().enumerate() {
        if i > 0 && (units.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    let _ = write!(out, ".{:02}", abs % 100);
}

pub(super) fn parse_bytea(text: &str) -> Result<Vec<u8>, String> {
    let hex = text
        .strip_prefix("\\x")
        .ok_or("expected hex output (\\x…); set bytea_output to hex")?;
    parse_hex(hex)
}

pub(super) fn parse_hex(text: &str) -> Result<Vec<u8>, String> {
    if !text.len().is_multiple_of(2) {
        return Err("odd number of hex digits".into());
    }
    text.as_bytes()
        .chunks(2)
        .map(|pair| {
            std::str::from_utf8(pair)
                .ok()
                .and_then(|s| u8::from_str_radix(s, 16).ok())
                .ok_or_else(|| "invalid hex digit".to_owned())
        })
        .collect()
}

pub(super) fn push_hex(bytes: &[u8], upper: bool, out: &mut String) {
    for b in bytes {
        let _ = if upper {
            write!(out, "{b:02X}")
        } else {
            write!(out, "{b:02x}")
        };
    }
}

pub(super) fn parse_uuid(text: &str) -> Result<[u8; 16], String> {
    let hex: String = text.chars().filter(|c| *c != '-').collect();
    let bytes = parse_hex(&hex)?;
    bytes
        .try_into()
        .map_err(|_| "a uuid has 32 hex digits".to_owned())
}

pub(super) fn render_uuid(u: &[u8; 16], out: &mut String) {
    for (i, b) in u.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            out.push('-');
        }
        let _ = write!(out, "{b:02x}");
    }
}

pub(super) fn parse_inet(text: &str) -> Result<(Vec<u8>, u8), String> {
    let (addr, prefix) = match text.split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (text, None),
    };
    let (bytes, max): (Vec<u8>, u8) = if addr.contains(':') {
        let a: Ipv6Addr = addr.parse().map_err(|e| format!("{e}"))?;
        (a.octets().to_vec(), 128)
    } else {
        let a: Ipv4Addr = addr.parse().map_err(|e| format!("{e}"))?;
        (a.octets().to_vec(), 32)
    };
    let prefix = match prefix {
        Some(p) => p.parse::<u8>().map_err(|e| format!("prefix: {e}"))?,
        None => max,
    };
    if prefix > max {
        return Err(format!("prefix {prefix} exceeds {max}"));
    }
    Ok((bytes, prefix))
}

/// inet omits a full-length prefix, cidr always prints it. IPv6 follows PostgreSQL's
/// `inet_net_ntop`: RFC 5952 compression, and an IPv4 tail in dotted form for
/// IPv4-compatible (`::a.b.c.d`) and IPv4-mapped (`::ffff:a.b.c.d`) addresses.
pub(super) fn render_inet(addr: &[u8], prefix: u8, cidr: bool, out: &mut String) {
    let full = match addr.len() {
        4 => {
            let a = Ipv4Addr::new(addr[0], addr[1], addr[2], addr[3]);
            let _ = write!(out, "{a}");
            32
        }
        16 => {
            let mut octets = [0u8; 16];
            octets.copy_from_slice(addr);
            let a = Ipv6Addr::from(octets);
            let w = a.segments();
            let tail = Ipv4Addr::new(addr[12], addr[13], addr[14], addr[15]);
            if w[..6].iter().all(|x| *x == 0) && w[6] != 0 {
                let _ = write!(out, "::{tail}");
            } else if w[..5].iter().all(|x| *x == 0) && w[5] == 0xffff {
                let _ = write!(out, "::ffff:{tail}");
            } else {
                let _ = write!(out, "{a}");
            }
            128
        }
        _ => {
            push_hex(addr, false, out);
            0
        }
    };
    if cidr || prefix != full {
        let _ = write!(out, "/{prefix}");
    }
}

pub(super) fn parse_mac(text: &str, len: usize) -> Result<Vec<u8>, String> {
    let hex: String = text
        .chars()
        .filter(|c| !matches!(c, ':' | '-' | '.'))
        .collect();
    let bytes = parse_hex(&hex)?;
    if bytes.len() != len {
        return Err(format!("expected {len} bytes"));
    }
    Ok(bytes)
}

pub(super) fn render_mac(bytes: &[u8], out: &mut String) {
    for (i, b) in bytes.iter().enumerate() {
        if i > 0 {
            out.push(':');
        }
        let _ = write!(out, "{b:02x}");
    }
}
