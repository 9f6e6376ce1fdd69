//! Trust bundles: the public keys tokens are checked against, as a JWKS in
//! the SPIFFE bundle format.
//!
//! Only keys with `"use": "jwt-svid"` sign tokens. Other entries, such as
//! the `x509-svid` CA certificates of a SPIRE bundle, are skipped unread, as
//! are members beside `keys` (`spiffe_sequence`, `spiffe_refresh_hint`).

use std::{
    collections::{BTreeMap, btree_map::Entry},
    fs,
    path::{Path, PathBuf},
};

use jsonwebtoken::{
    DecodingKey,
    jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm},
};
use serde::Deserialize;

use super::{Algorithm, TokenError, b64_decode};

/// The `use` of JWT signing keys in a SPIFFE bundle.
pub(super) const JWT_SVID_USE: &str = "jwt-svid";

/// JWK members that hold private key material, for any key type.
const PRIVATE_MEMBERS: [&str; 7] = ["d", "p", "q", "dp", "dq", "qi", "k"];

/// The JWT signing keys of one trust domain, by key ID.
#[derive(Debug)]
pub struct TrustBundle {
    keys: BTreeMap<String, BundleKey>,
}

#[derive(Debug)]
enum BundleKey {
    Usable {
        algorithm: Algorithm,
        key: DecodingKey,
    },
    /// A `jwt-svid` key of a type tokens may not use (an RSA key of a SPIRE
    /// server, say): kept to tell a token signed with it from one signed
    /// with a key nobody knows.
    Unsupported(String),
}

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("{}: cannot read", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: not a usable trust bundle", path.display())]
    Invalid {
        path: PathBuf,
        #[source]
        source: InvalidBundle,
    },
}

/// Why a JWKS cannot serve as a trust bundle.
#[derive(Debug, thiserror::Error)]
pub enum InvalidBundle {
    #[error("not a JWKS (a JSON object with a `keys` array): {0}")]
    NotJwks(#[from] serde_json::Error),
    #[error("key {index} (from 0): {reason}")]
    BadKey { index: usize, reason: String },
    #[error("two jwt-svid keys have the key ID `{0}`")]
    DuplicateKeyId(String),
    #[error(
        "no EdDSA (OKP Ed25519) or ES256 (EC P-256) key with \"use\": \"jwt-svid\"{}",
        if *.unsupported == 0 { String::new() } else { format!("; {} of another type", .unsupported) }
    )]
    NoUsableKey { unsupported: usize },
}

#[derive(Deserialize)]
struct Jwks {
    keys: Vec<serde_json::Value>,
}

impl TrustBundle {
    /// Reads the bundle at `path`; errors name it as written.
    pub fn load(path: &Path) -> Result<Self, BundleError> {
        let bytes = fs::read(path).map_err(|source| BundleError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_json(&bytes).map_err(|source| BundleError::Invalid {
            path: path.to_owned(),
            source,
        })
    }

    pub fn from_json(json: &[u8]) -> Result<Self, InvalidBundle> {
        let jwks: Jwks = serde_json::from_slice(json)?;
        let mut keys = BTreeMap::new();
        for (index, entry) in jwks.keys.into_iter().enumerate() {
            if entry.get("use").and_then(|value| value.as_str()) != Some(JWT_SVID_USE) {
                continue;
            }
            let bad = |reason: String| InvalidBundle::BadKey { index, reason };
            let (kid, key) = parse_key(entry).map_err(bad)?;
            match keys.entry(kid) {
                Entry::Vacant(slot) => {
                    slot.insert(key);
                }
                Entry::Occupied(slot) => {
                    return Err(InvalidBundle::DuplicateKeyId(slot.key().clone()));
                }
            }
        }
        let usable = keys
            .values()
            .filter(|key| matches!(key, BundleKey::Usable { .. }))
            .count();
        if usable == 0 {
            return Err(InvalidBundle::NoUsableKey {
                unsupported: keys.len(),
            });
        }
        Ok(Self { keys })
    }

    /// The IDs and algorithms of the keys tokens can be checked with.
    pub fn keys(&self) -> impl Iterator<Item = (&str, Algorithm)> {
        self.keys.iter().filter_map(|(kid, key)| match key {
            BundleKey::Usable { algorithm, .. } => Some((kid.as_str(), *algorithm)),
            BundleKey::Unsupported(_) => None,
        })
    }

    /// The key with ID `kid`, if it is a key for `algorithm`.
    pub(super) fn key(&self, kid: &str, algorithm: Algorithm) -> Result<&DecodingKey, TokenError> {
        let mismatch = |key: String| TokenError::AlgorithmMismatch {
            algorithm,
            kid: kid.to_owned(),
            key,
        };
        match self.keys.get(kid) {
            None => Err(TokenError::UnknownKeyId(kid.to_owned())),
            Some(BundleKey::Usable { algorithm: a, key }) if *a == algorithm => Ok(key),
            Some(BundleKey::Usable { algorithm: a, .. }) => Err(mismatch(a.to_string())),
            Some(BundleKey::Unsupported(kind)) => Err(mismatch(kind.clone())),
        }
    }
}

/// One `jwt-svid` entry: its key ID and key, checked whole so that a bad key
/// fails when the bundle is read, not when a token comes.
fn parse_key(entry: serde_json::Value) -> Result<(String, BundleKey), String> {
    if let Some(member) = PRIVATE_MEMBERS.iter().find(|m| entry.get(**m).is_some()) {
        return Err(format!(
            "holds private key material (`{member}`); a bundle holds public keys only"
        ));
    }
    let jwk: Jwk = serde_json::from_value(entry).map_err(|err| format!("not a JWK: {err}"))?;
    let kid = match jwk.common.key_id.as_deref() {
        None | Some("") => return Err("no `kid`; every jwt-svid key needs one".into()),
        Some(kid) => kid.to_owned(),
    };
    let algorithm = match &jwk.algorithm {
        AlgorithmParameters::OctetKeyPair(okp) if okp.curve == EllipticCurve::Ed25519 => {
            let x = decode_coordinate(&okp.x, "x")?;
            let public = ed25519_dalek::VerifyingKey::from_bytes(&x)
                .map_err(|_| "`x` is not an Ed25519 public key".to_owned())?;
            // A small-order key lets one signature pass for many messages.
            if public.is_weak() {
                return Err("`x` is a weak (small-order) Ed25519 key".into());
            }
            Algorithm::EdDsa
        }
        AlgorithmParameters::EllipticCurve(ec) if ec.curve == EllipticCurve::P256 => {
            let x = decode_coordinate(&ec.x, "x")?;
            let y = decode_coordinate(&ec.y, "y")?;
            p256::PublicKey::from_sec1_bytes(&[&[0x04][..], &x, &y].concat())
                .map_err(|_| "`x` and `y` are not a point on P-256".to_owned())?;
            Algorithm::Es256
        }
        other => return Ok((kid, BundleKey::Unsupported(describe(other)))),
    };
    if let Some(alg) = jwk.common.key_algorithm
        && alg != KeyAlgorithm::from(algorithm.jwt())
    {
        return Err(format!("`alg` is {alg}, but the key is an {algorithm} key"));
    }
    let key = DecodingKey::from_jwk(&jwk).map_err(|err| format!("not a usable key: {err}"))?;
    Ok((kid, BundleKey::Usable { algorithm, key }))
}

fn decode_coordinate(text: &str, member: &str) -> Result<[u8; 32], String> {
    b64_decode(text)
        .ok()
        .and_then(|bytes| bytes.try_into().ok())
        .ok_or_else(|| format!("`{member}` is not 32 bytes of base64url"))
}

/// Names a key type tokens may not use, for errors.
fn describe(params: &AlgorithmParameters) -> String {
    match params {
        AlgorithmParameters::EllipticCurve(ec) => format!("EC {:?}", ec.curve),
        AlgorithmParameters::RSA(_) => "RSA".into(),
        AlgorithmParameters::OctetKey(_) => "symmetric (oct)".into(),
        AlgorithmParameters::OctetKeyPair(okp) => format!("OKP {:?}", okp.curve),
        _ => "unknown type".into(),
    }
}
