//! Agent identity at run time: signed tokens that prove a SPIFFE ID.
//!
//! A token is a JWT in the form of a SPIFFE JWT-SVID: `sub` is the SPIFFE ID,
//! `aud`, `exp` and `iat` are required, and the header's `kid` picks the key
//! that checks the signature from a trust bundle (a JWKS in the SPIFFE bundle
//! format, so a bundle exported by a SPIRE server works as it is). Only
//! EdDSA (Ed25519) and ES256 (ECDSA P-256) signatures are accepted.
//!
//! [`Verifier`] checks tokens against a [`TrustBundle`]; [`IssuerKey`] makes
//! keys and issues tokens, for deployments without a SPIFFE issuer of their
//! own.
//!
//! A process proves its identity to the node agent with a token and is
//! bound to it: the pieces of that are here — its cgroup ([`cgroup`]), its
//! source address ([`pool`], [`loopback`]), revocations ([`revocations`])
//! and the audit log ([`audit`]); the agent puts them together.

pub mod audit;
mod bundle;
pub mod cgroup;
mod duration;
mod keys;
pub mod loopback;
pub mod pool;
pub mod revocations;
mod token;

pub use bundle::{BundleError, InvalidBundle, TrustBundle};
pub use duration::{MAX_TTL, TtlError, parse_ttl};
pub use keys::{BUNDLE_FILE, IssuerKey, KEY_FILE, KeyError, Saved};
pub(crate) use token::{Audience, check_times, decode_json, system_time, verify_signed};
pub use token::{LEEWAY, TokenError, Unverified, VerifiedToken, Verifier, decode_unverified};

/// The audience tokens are issued for and checked against when none is
/// named.
pub const DEFAULT_AUDIENCE: &str = "mesh";

/// The signature algorithms a token may use. Everything else is refused:
/// `none`, HMAC (whose secret a verifier would have to share, and which is
/// the lever of algorithm-confusion attacks), RSA and the other curves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum Algorithm {
    /// Ed25519 (`EdDSA`).
    #[value(name = "eddsa")]
    EdDsa,
    /// ECDSA on P-256 with SHA-256 (`ES256`).
    #[value(name = "es256")]
    Es256,
}

impl Algorithm {
    /// The name in a JOSE header's and a JWK's `alg`.
    pub fn jose_name(self) -> &'static str {
        match self {
            Self::EdDsa => "EdDSA",
            Self::Es256 => "ES256",
        }
    }

    fn from_jose_name(name: &str) -> Option<Self> {
        match name {
            "EdDSA" => Some(Self::EdDsa),
            "ES256" => Some(Self::Es256),
            _ => None,
        }
    }

    fn jwt(self) -> jsonwebtoken::Algorithm {
        match self {
            Self::EdDsa => jsonwebtoken::Algorithm::EdDSA,
            Self::Es256 => jsonwebtoken::Algorithm::ES256,
        }
    }
}

impl std::fmt::Display for Algorithm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.jose_name())
    }
}

/// Strict base64url without padding, as JWS and JWK use it.
fn b64_decode(text: &str) -> Result<Vec<u8>, base64::DecodeError> {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(text)
}

fn b64_encode(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}
