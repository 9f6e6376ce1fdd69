//! Trust domains and SPIFFE IDs, checked as the SPIFFE ID standard
//! prescribes.

use std::{fmt, str::FromStr};

const SCHEME: &str = "spiffe://";
/// The SPIFFE ID standard caps trust domain names at 255 characters.
const MAX_TRUST_DOMAIN_LEN: usize = 255;
/// ...and SPIFFE IDs at 2048 bytes, the URI SAN limit.
const MAX_ID_LEN: usize = 2048;

/// A trust domain name such as `acme.internal`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TrustDomain(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TrustDomainError {
    #[error("empty; expected a name like `acme.internal`")]
    Empty,
    #[error("{0} characters long; expected at most {MAX_TRUST_DOMAIN_LEN}")]
    TooLong(usize),
    #[error("`{0}` is not allowed; expected lowercase letters, digits, `.`, `-` and `_`")]
    Char(char),
}

impl TrustDomain {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for TrustDomain {
    type Err = TrustDomainError;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        if name.is_empty() {
            return Err(TrustDomainError::Empty);
        }
        if name.len() > MAX_TRUST_DOMAIN_LEN {
            return Err(TrustDomainError::TooLong(name.len()));
        }
        match name
            .chars()
            .find(|&c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c)))
        {
            Some(c) => Err(TrustDomainError::Char(c)),
            None => Ok(Self(name.to_owned())),
        }
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The SPIFFE ID of a workload: `spiffe://TRUST-DOMAIN/PATH`. The path is
/// required, since the ID of a trust domain itself names no workload.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SpiffeId(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeIdError {
    #[error("expected it to start with `{SCHEME}`")]
    Scheme,
    #[error("{0} bytes long; expected at most {MAX_ID_LEN}")]
    TooLong(usize),
    #[error("a query (`?`) is not allowed")]
    Query,
    #[error("a fragment (`#`) is not allowed")]
    Fragment,
    #[error("user info (`@`) is not allowed")]
    UserInfo,
    #[error("a port (`:`) is not allowed")]
    Port,
    #[error("bad trust domain: {0}")]
    TrustDomain(#[from] TrustDomainError),
    #[error("no path; expected a workload path after the trust domain, like `/agent/name`")]
    NoPath,
    #[error("a trailing `/` is not allowed")]
    TrailingSlash,
    #[error("an empty path segment (`//`) is not allowed")]
    EmptySegment,
    #[error("the path segment `{0}` is not allowed")]
    DotSegment(&'static str),
    #[error("`{0}` is not allowed in the path; expected letters, digits, `.`, `-` and `_`")]
    PathChar(char),
}

impl SpiffeId {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The trust domain part, e.g. `acme.internal`.
    pub fn trust_domain(&self) -> &str {
        let rest = &self.0[SCHEME.len()..];
        rest.split_once('/').map_or(rest, |(domain, _)| domain)
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;

    fn from_str(id: &str) -> Result<Self, Self::Err> {
        let rest = id.strip_prefix(SCHEME).ok_or(SpiffeIdError::Scheme)?;
        if id.len() > MAX_ID_LEN {
            return Err(SpiffeIdError::TooLong(id.len()));
        }
        match rest.chars().find(|&c| c == '?' || c == '#') {
            Some('?') => return Err(SpiffeIdError::Query),
            Some(_) => return Err(SpiffeIdError::Fragment),
            None => {}
        }
        let (authority, path) = rest.find('/').map_or((rest, ""), |i| rest.split_at(i));
        if authority.contains('@') {
            return Err(SpiffeIdError::UserInfo);
        }
        if authority.contains(':') {
            return Err(SpiffeIdError::Port);
        }
        authority.parse::<TrustDomain>()?;
        let segments = path.strip_prefix('/').ok_or(SpiffeIdError::NoPath)?;
        let mut segments = segments.split('/').peekable();
        while let Some(segment) = segments.next() {
            match segment {
                "" if segments.peek().is_none() => return Err(SpiffeIdError::TrailingSlash),
                "" => return Err(SpiffeIdError::EmptySegment),
                "." => return Err(SpiffeIdError::DotSegment(".")),
                ".." => return Err(SpiffeIdError::DotSegment("..")),
                _ => {}
            }
            if let Some(c) = segment
                .chars()
                .find(|&c| !(c.is_ascii_alphanumeric() || "._-".contains(c)))
            {
                return Err(SpiffeIdError::PathChar(c));
            }
        }
        Ok(Self(id.to_owned()))
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id_error(id: &str) -> SpiffeIdError {
        id.parse::<SpiffeId>().unwrap_err()
    }

    #[test]
    fn accepts_workload_ids() {
        let id: SpiffeId = "spiffe://acme.internal/agent/invoice-bot_2.v1"
            .parse()
            .unwrap();
        assert_eq!(id.trust_domain(), "acme.internal");
        assert_eq!(
            id.to_string(),
            "spiffe://acme.internal/agent/invoice-bot_2.v1"
        );
        assert!("spiffe://a-b_c.0/X".parse::<SpiffeId>().is_ok());
    }

    #[test]
    fn rejects_what_the_standard_forbids() {
        use SpiffeIdError::*;
        assert_eq!(id_error("https://acme.internal/a"), Scheme);
        assert_eq!(id_error("SPIFFE://acme.internal/a"), Scheme);
        assert_eq!(id_error("spiffe://acme.internal/a?x=1"), Query);
        assert_eq!(id_error("spiffe://acme.internal/a#x"), Fragment);
        assert_eq!(id_error("spiffe://acme.internal?x"), Query);
        assert_eq!(id_error("spiffe://me@acme.internal/a"), UserInfo);
        assert_eq!(id_error("spiffe://acme.internal:443/a"), Port);
        assert_eq!(
            id_error("spiffe:///a"),
            TrustDomain(TrustDomainError::Empty)
        );
        assert_eq!(
            id_error("spiffe://Acme/a"),
            TrustDomain(TrustDomainError::Char('A'))
        );
        assert_eq!(id_error("spiffe://acme.internal"), NoPath);
        assert_eq!(id_error("spiffe://acme.internal/"), TrailingSlash);
        assert_eq!(id_error("spiffe://acme.internal/a/"), TrailingSlash);
        assert_eq!(id_error("spiffe://acme.internal/a//b"), EmptySegment);
        assert_eq!(id_error("spiffe://acme.internal/a/./b"), DotSegment("."));
        assert_eq!(id_error("spiffe://acme.internal/.."), DotSegment(".."));
        assert_eq!(id_error("spiffe://acme.internal/a%20b"), PathChar('%'));
        assert_eq!(id_error("spiffe://acme.internal/é"), PathChar('é'));
    }

    #[test]
    fn enforces_length_limits() {
        let long_domain = "a".repeat(MAX_TRUST_DOMAIN_LEN + 1);
        assert_eq!(
            long_domain.parse::<super::TrustDomain>(),
            Err(TrustDomainError::TooLong(256))
        );
        let long_id = format!("spiffe://acme/{}", "a".repeat(MAX_ID_LEN));
        assert_eq!(id_error(&long_id), SpiffeIdError::TooLong(long_id.len()));
    }
}
