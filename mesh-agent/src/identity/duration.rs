//! Token lifetimes as people write them: `90s`, `15m`, `1h`, `7d`.

use std::time::Duration;

/// The longest lifetime a token is issued with. Tokens cannot be revoked, so
/// anything longer is a standing credential rather than a token.
pub const MAX_TTL: Duration = Duration::from_secs(365 * 86_400);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TtlError {
    #[error(
        "`{0}` is not a lifetime; expected a whole number and s, m, h or d, like 90s, 15m, 1h or 7d"
    )]
    Format(String),
    #[error("a lifetime of 0 makes a token that is never valid")]
    Zero,
    #[error("`{0}` is longer than the most, 365d")]
    TooLong(String),
}

/// Parses a lifetime: a whole number followed by `s`, `m`, `h` or `d`.
pub fn parse_ttl(text: &str) -> Result<Duration, TtlError> {
    let format = || TtlError::Format(text.to_owned());
    let unit_at = text.len().checked_sub(1).ok_or_else(format)?;
    let (number, unit) = text.split_at_checked(unit_at).ok_or_else(format)?;
    let unit_secs = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3_600,
        "d" => 86_400,
        _ => return Err(format()),
    };
    // `u64::from_str` takes a leading `+`; a lifetime is digits only.
    if number.is_empty() || !number.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format());
    }
    let too_long = || TtlError::TooLong(text.to_owned());
    let secs = number
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(unit_secs))
        .ok_or_else(too_long)?;
    match Duration::from_secs(secs) {
        Duration::ZERO => Err(TtlError::Zero),
        ttl if ttl > MAX_TTL => Err(too_long()),
        ttl => Ok(ttl),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_each_unit() {
        assert_eq!(parse_ttl("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_ttl("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(parse_ttl("1h"), Ok(Duration::from_secs(3_600)));
        assert_eq!(parse_ttl("7d"), Ok(Duration::from_secs(604_800)));
        assert_eq!(parse_ttl("365d"), Ok(MAX_TTL));
    }

    #[test]
    fn rejects_what_is_not_a_lifetime() {
        for text in [
            "", "s", "90", "1.5h", "-1h", "+1h", "1 h", "1H", "1w", "h1", "1é",
        ] {
            assert_eq!(
                parse_ttl(text),
                Err(TtlError::Format(text.to_owned())),
                "{text:?}"
            );
        }
        assert_eq!(parse_ttl("0s"), Err(TtlError::Zero));
        assert_eq!(parse_ttl("366d"), Err(TtlError::TooLong("366d".into())));
        let huge = format!("{}d", u64::MAX);
        assert_eq!(parse_ttl(&huge), Err(TtlError::TooLong(huge.clone())));
    }
}
