//! Durations as written in manifests: `90s`, `15m`, `1h`, `24h`, `30d`, or combined (`1h30m`).

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid duration {input:?}: {reason} (expected e.g. 90s, 15m, 1h, 30d or 1h30m)")]
pub struct DurationError {
    pub input: String,
    pub reason: &'static str,
}

/// Parses a duration into whole seconds. Zero is rejected: a zero lifetime can never issue a usable token.
/// Like [`parse_duration`], but also accepts zero (`0` or `0s`), for margins that may be switched off.
pub fn parse_duration_or_zero(input: &str) -> Result<u64, DurationError> {
    if matches!(input.trim(), "0" | "0s") { Ok(0) } else { parse_duration(input) }
}

pub fn parse_duration(input: &str) -> Result<u64, DurationError> {
    let err = |reason| DurationError { input: input.to_string(), reason };
    let s = input.trim();
    if s.is_empty() {
        return Err(err("empty"));
    }
    let mut total: u64 = 0;
    let mut digits = String::new();
    for c in s.chars() {
        if c.is_ascii_digit() {
            digits.push(c);
            continue;
        }
        let unit = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86_400,
            _ => return Err(err("unknown unit")),
        };
        if digits.is_empty() {
            return Err(err("a unit needs a number before it"));
        }
        let n: u64 = digits.parse().map_err(|_| err("number too large"))?;
        total = n.checked_mul(unit).and_then(|v| total.checked_add(v)).ok_or_else(|| err("too large"))?;
        digits.clear();
    }
    if !digits.is_empty() {
        return Err(err("a number needs a unit after it"));
    }
    if total == 0 {
        return Err(err("must be greater than zero"));
    }
    // Ten years is far beyond any sane token lifetime and keeps expiry arithmetic far from overflow.
    if total > 10 * 365 * 86_400 {
        return Err(err("longer than ten years"));
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units_and_combinations() {
        assert_eq!(parse_duration("90s"), Ok(90));
        assert_eq!(parse_duration("15m"), Ok(900));
        assert_eq!(parse_duration("1h"), Ok(3600));
        assert_eq!(parse_duration("30d"), Ok(30 * 86_400));
        assert_eq!(parse_duration("1h30m"), Ok(5400));
    }

    #[test]
    fn rejects_malformed_durations() {
        for bad in ["", "h", "10", "1x", "0s", "-1h", "1.5h", "99999999999999999999s", "4000d"] {
            assert!(parse_duration(bad).is_err(), "{bad} should be rejected");
        }
    }
}
