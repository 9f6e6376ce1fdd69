//! Verifying tokens. Every part of a token is untrusted input, so each check
//! fails with its own [`TokenError`] and nothing is read from the claims
//! before the signature holds.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, de::DeserializeOwned};
use time::{OffsetDateTime, format_description::well_known::Rfc3339};

use super::{Algorithm, TrustBundle, b64_decode};
use crate::policy::{SpiffeId, TrustDomain};

/// How far in the future `iat` and `nbf` may lie, for clocks that are a
/// little apart. `exp` gets none: a token is expired from `exp` on.
pub const LEEWAY: Duration = Duration::from_secs(60);

/// Far beyond any real token; bounds the work an attacker can cause.
const MAX_TOKEN_LEN: usize = 8 * 1024;

/// Ed25519 and P-256 ECDSA signatures (`r || s`) are both 64 bytes.
const SIGNATURE_LEN: usize = 64;

/// Checks tokens for one trust domain and one audience.
#[derive(Debug)]
pub struct Verifier {
    bundle: TrustBundle,
    trust_domain: TrustDomain,
    audience: String,
}

/// What a valid token proves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedToken {
    pub spiffe_id: SpiffeId,
    pub audience: Vec<String>,
    pub issued_at: SystemTime,
    pub expires_at: SystemTime,
    /// The token's unique ID. SPIRE's JWT-SVIDs carry none.
    pub jti: Option<String>,
    pub kid: String,
    pub algorithm: Algorithm,
}

/// Why a token is not valid: one variant per reason, so that callers can
/// record the reason ([`TokenError::reason`]) in audit events.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Not three base64url parts with a JSON header and JSON claims.
    #[error("malformed: {0}")]
    Malformed(String),
    #[error("algorithm `{0}` is not allowed; expected EdDSA or ES256")]
    DisallowedAlgorithm(String),
    #[error("the header has no key ID (`kid`)")]
    MissingKeyId,
    #[error("unknown key ID `{0}`: the trust bundle has no JWT key with it")]
    UnknownKeyId(String),
    #[error("algorithm {algorithm} does not fit key `{kid}`, a {key} key")]
    AlgorithmMismatch {
        algorithm: Algorithm,
        kid: String,
        key: String,
    },
    #[error("bad signature: not made with key `{0}`")]
    BadSignature(String),
    #[error("missing claim `{0}`")]
    MissingClaim(&'static str),
    #[error("invalid claim `{claim}`: {reason}")]
    InvalidClaim { claim: &'static str, reason: String },
    #[error("{subject} is in trust domain `{}`, not `{expected}`", .subject.trust_domain())]
    ForeignTrustDomain {
        subject: SpiffeId,
        expected: TrustDomain,
    },
    #[error("wrong audience: the token is for {found:?}, not `{expected}`")]
    WrongAudience {
        expected: String,
        found: Vec<String>,
    },
    #[error("expired at {} ({} s ago)", rfc3339(*.expired_at), .now - .expired_at)]
    Expired { expired_at: u64, now: u64 },
    #[error(
        "not yet valid: `{claim}` is {}, {} s from now, more than the {} s leeway",
        rfc3339(*.at), .at - .now, LEEWAY.as_secs()
    )]
    NotYetValid {
        claim: &'static str,
        at: u64,
        now: u64,
    },
}

impl TokenError {
    /// A short, stable name of the reason, for audit events and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Malformed(_) => "malformed",
            Self::DisallowedAlgorithm(_) => "disallowed_algorithm",
            Self::MissingKeyId => "missing_key_id",
            Self::UnknownKeyId(_) => "unknown_key_id",
            Self::AlgorithmMismatch { .. } => "algorithm_mismatch",
            Self::BadSignature(_) => "bad_signature",
            Self::MissingClaim(_) => "missing_claim",
            Self::InvalidClaim { .. } => "invalid_claim",
            Self::ForeignTrustDomain { .. } => "foreign_trust_domain",
            Self::WrongAudience { .. } => "wrong_audience",
            Self::Expired { .. } => "expired",
            Self::NotYetValid { .. } => "not_yet_valid",
        }
    }
}

/// The header members that are checked. Declared ones may appear once only
/// (serde rejects duplicates), so no two parsers can read different values.
#[derive(Deserialize)]
struct Header {
    alg: Option<String>,
    kid: Option<String>,
    typ: Option<String>,
    crit: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct Claims {
    sub: Option<String>,
    aud: Option<Audience>,
    exp: Option<u64>,
    iat: Option<u64>,
    nbf: Option<u64>,
    jti: Option<String>,
}

/// `aud` is one string or an array of them (RFC 7519, section 4.1.3).
#[derive(Deserialize)]
#[serde(untagged)]
pub(crate) enum Audience {
    One(String),
    Many(Vec<String>),
}

impl Audience {
    /// The audiences, or [`TokenError::WrongAudience`] if `expected` is not
    /// among them.
    pub(crate) fn require(self, expected: &str) -> Result<Vec<String>, TokenError> {
        let found = match self {
            Audience::One(one) => vec![one],
            Audience::Many(many) => many,
        };
        if found.iter().any(|aud| aud == expected) {
            Ok(found)
        } else {
            Err(TokenError::WrongAudience {
                expected: expected.to_owned(),
                found,
            })
        }
    }
}

/// A token's header and claims, decoded but not verified: for showing, never
/// for trusting.
#[derive(Debug, Clone)]
pub struct Unverified {
    pub header: serde_json::Value,
    pub claims: serde_json::Value,
}

/// Decodes a token's header and claims without checking anything else.
pub fn decode_unverified(token: &str) -> Result<Unverified, TokenError> {
    let [header, claims, _] = split(token)?;
    Ok(Unverified {
        header: decode_json(header, "header")?,
        claims: decode_json(claims, "claim set")?,
    })
}

impl Verifier {
    /// Accepts tokens signed with a key of `bundle`, for identities in
    /// `trust_domain`, that name `audience` in `aud`.
    pub fn new(
        bundle: TrustBundle,
        trust_domain: TrustDomain,
        audience: impl Into<String>,
    ) -> Self {
        Self {
            bundle,
            trust_domain,
            audience: audience.into(),
        }
    }

    pub fn verify(&self, token: &str, now: SystemTime) -> Result<VerifiedToken, TokenError> {
        let signed = verify_signed(&self.bundle, token)?;
        let claims: Claims = decode_json(signed.claims, "claim set")?;
        self.check_claims(claims, signed.kid, signed.algorithm, now)
    }

    fn check_claims(
        &self,
        claims: Claims,
        kid: String,
        algorithm: Algorithm,
        now: SystemTime,
    ) -> Result<VerifiedToken, TokenError> {
        let sub = claims.sub.ok_or(TokenError::MissingClaim("sub"))?;
        let spiffe_id: SpiffeId = sub.parse().map_err(|err| TokenError::InvalidClaim {
            claim: "sub",
            reason: format!("`{sub}` is not a SPIFFE ID: {err}"),
        })?;
        if spiffe_id.trust_domain() != self.trust_domain.as_str() {
            return Err(TokenError::ForeignTrustDomain {
                subject: spiffe_id,
                expected: self.trust_domain.clone(),
            });
        }

        let audience = claims
            .aud
            .ok_or(TokenError::MissingClaim("aud"))?
            .require(&self.audience)?;

        let exp = claims.exp.ok_or(TokenError::MissingClaim("exp"))?;
        let iat = claims.iat.ok_or(TokenError::MissingClaim("iat"))?;
        check_times(exp, iat, claims.nbf, now)?;

        Ok(VerifiedToken {
            spiffe_id,
            audience,
            issued_at: system_time(iat, "iat")?,
            expires_at: system_time(exp, "exp")?,
            jti: claims.jti,
            kid,
            algorithm,
        })
    }
}

/// A token whose signature holds: its claims part, still encoded, and the
/// key that signed it.
pub(crate) struct Signed<'a> {
    pub claims: &'a str,
    pub kid: String,
    pub algorithm: Algorithm,
}

/// Checks a token's header and signature against `bundle`; nothing of the
/// claims is read. Every kind of token the mesh issues starts here.
pub(crate) fn verify_signed<'a>(
    bundle: &TrustBundle,
    token: &'a str,
) -> Result<Signed<'a>, TokenError> {
    let [header_part, claims_part, signature_part] = split(token)?;
    let header: Header = decode_json(header_part, "header")?;
    let alg = header
        .alg
        .ok_or_else(|| TokenError::Malformed("the header has no `alg`".into()))?;
    // First, so that `none` and HMAC tokens get no further.
    let algorithm = Algorithm::from_jose_name(&alg).ok_or(TokenError::DisallowedAlgorithm(alg))?;
    if header.crit.is_some() {
        return Err(TokenError::Malformed(
            "the header names critical extensions (`crit`); none are supported".into(),
        ));
    }
    if let Some(typ) = header.typ
        && typ != "JWT"
        && typ != "JOSE"
    {
        return Err(TokenError::Malformed(format!(
            "`typ` is `{typ}`; expected JWT or JOSE"
        )));
    }
    let kid = header.kid.ok_or(TokenError::MissingKeyId)?;
    let key = bundle.key(&kid, algorithm)?;

    let signature = b64_decode(signature_part)
        .map_err(|err| TokenError::Malformed(format!("the signature is not base64url: {err}")))?;
    if signature.len() != SIGNATURE_LEN {
        return Err(TokenError::Malformed(format!(
            "the signature is {} bytes; {algorithm} signatures are {SIGNATURE_LEN}",
            signature.len()
        )));
    }
    let signed = &token[..header_part.len() + 1 + claims_part.len()];
    if !jsonwebtoken::crypto::verify(signature_part, signed.as_bytes(), key, algorithm.jwt())
        .unwrap_or(false)
    {
        return Err(TokenError::BadSignature(kid));
    }
    Ok(Signed {
        claims: claims_part,
        kid,
        algorithm,
    })
}

/// Checks `exp` (no leeway), then `iat` and `nbf` (at most [`LEEWAY`] in
/// the future) against `now`.
pub(crate) fn check_times(
    exp: u64,
    iat: u64,
    nbf: Option<u64>,
    now: SystemTime,
) -> Result<(), TokenError> {
    let now = now
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_secs());
    if now >= exp {
        return Err(TokenError::Expired {
            expired_at: exp,
            now,
        });
    }
    let latest = now.saturating_add(LEEWAY.as_secs());
    for (claim, at) in [("iat", Some(iat)), ("nbf", nbf)] {
        if let Some(at) = at
            && at > latest
        {
            return Err(TokenError::NotYetValid { claim, at, now });
        }
    }
    Ok(())
}

/// The header, claims and signature parts of a compact JWS.
fn split(token: &str) -> Result<[&str; 3], TokenError> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(TokenError::Malformed(format!(
            "{} bytes long; expected at most {MAX_TOKEN_LEN}",
            token.len()
        )));
    }
    let mut parts = token.split('.');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(header), Some(claims), Some(signature), None) => Ok([header, claims, signature]),
        _ => Err(TokenError::Malformed(format!(
            "expected 3 parts separated by `.` (header.claims.signature), found {}",
            token.split('.').count()
        ))),
    }
}

pub(crate) fn decode_json<T: DeserializeOwned>(part: &str, what: &str) -> Result<T, TokenError> {
    let bytes = b64_decode(part)
        .map_err(|err| TokenError::Malformed(format!("the {what} is not base64url: {err}")))?;
    serde_json::from_slice(&bytes).map_err(|err| {
        TokenError::Malformed(format!("the {what} is not a valid JSON object: {err}"))
    })
}

pub(crate) fn system_time(unix: u64, claim: &'static str) -> Result<SystemTime, TokenError> {
    UNIX_EPOCH
        .checked_add(Duration::from_secs(unix))
        .ok_or_else(|| TokenError::InvalidClaim {
            claim,
            reason: format!("{unix} is out of range"),
        })
}

/// A time in claims, for people.
fn rfc3339(unix: u64) -> String {
    i64::try_from(unix)
        .ok()
        .and_then(|secs| OffsetDateTime::from_unix_timestamp(secs).ok())
        .and_then(|time| time.format(&Rfc3339).ok())
        .unwrap_or_else(|| format!("{unix} (seconds since 1970)"))
}
