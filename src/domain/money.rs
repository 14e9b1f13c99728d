//! Money is integer micro-USD inside and a decimal string outside. No floats.

use super::FieldError;

pub const MICROS_PER_USD: i64 = 1_000_000;

/// Parses a non-negative decimal USD amount ("12.50", "0.000001", "3") into micro-USD.
pub fn parse_usd(field: &'static str, s: &str) -> Result<i64, FieldError> {
    let bad = || FieldError::new(field, "must be a USD amount like \"12.50\" (at most 6 decimals)");
    let s = s.trim();
    let (whole, frac) = match s.split_once('.') {
        Some((w, f)) => (w, f),
        None => (s, ""),
    };
    if whole.is_empty() && frac.is_empty() {
        return Err(bad());
    }
    if !whole.bytes().all(|b| b.is_ascii_digit()) || !frac.bytes().all(|b| b.is_ascii_digit()) || frac.len() > 6 {
        return Err(bad());
    }
    let whole: i64 = if whole.is_empty() { 0 } else { whole.parse().map_err(|_| bad())? };
    let mut frac_micros: i64 = 0;
    for (i, b) in frac.bytes().enumerate() {
        frac_micros += i64::from(b - b'0') * 10i64.pow(5 - i as u32);
    }
    whole.checked_mul(MICROS_PER_USD).and_then(|w| w.checked_add(frac_micros)).ok_or_else(bad)
}

/// Formats micro-USD as a decimal string with at least two decimals: 12500000 -> "12.50".
pub fn format_usd(micros: i64) -> String {
    let sign = if micros < 0 { "-" } else { "" };
    let m = micros.unsigned_abs();
    let whole = m / MICROS_PER_USD as u64;
    let frac = m % MICROS_PER_USD as u64;
    let mut frac = format!("{frac:06}");
    while frac.len() > 2 && frac.ends_with('0') {
        frac.pop();
    }
    format!("{sign}{whole}.{frac}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_decimal_strings() {
        assert_eq!(parse_usd("f", "12.50"), Ok(12_500_000));
        assert_eq!(parse_usd("f", "3"), Ok(3_000_000));
        assert_eq!(parse_usd("f", "0.000001"), Ok(1));
        assert_eq!(parse_usd("f", ".5"), Ok(500_000));
        assert_eq!(parse_usd("f", "0"), Ok(0));
    }

    #[test]
    fn refuses_what_is_not_money() {
        for bad in ["", ".", "-1", "1.0000001", "1e3", "abc", "1.2.3", "99999999999999999999"] {
            let err = parse_usd("limits.cost_limit_usd", bad).unwrap_err();
            assert_eq!(err.field, "limits.cost_limit_usd", "{bad}");
        }
    }

    #[test]
    fn formats_with_cents() {
        assert_eq!(format_usd(12_500_000), "12.50");
        assert_eq!(format_usd(0), "0.00");
        assert_eq!(format_usd(1), "0.000001");
        assert_eq!(format_usd(1_234_500), "1.2345");
        for m in [0, 1, 10, 999_999, 1_000_000, 123_456_789] {
            assert_eq!(parse_usd("f", &format_usd(m)), Ok(m));
        }
    }
}
