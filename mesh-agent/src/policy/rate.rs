//! Grant rates: `N/s` or `N/m` new flows per source identity.

use std::{fmt, num::NonZeroU32, str::FromStr};

/// A token bucket of `count` tokens, refilled at `count` per `per`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Rate {
    pub count: NonZeroU32,
    pub per: Per,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Per {
    Second,
    Minute,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RateError {
    #[error("expected `N/s` or `N/m` with N at least 1, like `20/s`")]
    Syntax,
    #[error("unknown unit `{0}`; expected `s` (per second) or `m` (per minute)")]
    Unit(String),
    #[error("a rate of 0 allows no flow; expected at least 1")]
    Zero,
    #[error("the count is too large; expected at most {}", u32::MAX)]
    TooLarge,
}

impl FromStr for Rate {
    type Err = RateError;

    fn from_str(rate: &str) -> Result<Self, Self::Err> {
        let (count, unit) = rate.split_once('/').ok_or(RateError::Syntax)?;
        if count.is_empty() || !count.bytes().all(|b| b.is_ascii_digit()) {
            return Err(RateError::Syntax);
        }
        let per = match unit {
            "s" => Per::Second,
            "m" => Per::Minute,
            _ => return Err(RateError::Unit(unit.to_owned())),
        };
        // Being all digits, it can only fail by overflowing.
        let count: u32 = count.parse().map_err(|_| RateError::TooLarge)?;
        let count = NonZeroU32::new(count).ok_or(RateError::Zero)?;
        Ok(Self { count, per })
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unit = match self.per {
            Per::Second => "s",
            Per::Minute => "m",
        };
        write!(f, "{}/{unit}", self.count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_displays() {
        for rate in ["20/s", "1/m", "4294967295/s"] {
            assert_eq!(rate.parse::<Rate>().unwrap().to_string(), rate);
        }
    }

    #[test]
    fn rejects_bad_rates() {
        use RateError::*;
        let error = |rate: &str| rate.parse::<Rate>().unwrap_err();
        assert_eq!(error("20"), Syntax);
        assert_eq!(error("/s"), Syntax);
        assert_eq!(error("-1/s"), Syntax);
        assert_eq!(error("20/h"), Unit("h".into()));
        assert_eq!(error("20/sec"), Unit("sec".into()));
        assert_eq!(error("0/s"), Zero);
        assert_eq!(error("4294967296/m"), TooLarge);
    }
}
