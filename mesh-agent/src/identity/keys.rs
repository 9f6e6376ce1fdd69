//! Issuer keys: made by `mesh-agent token keygen`, kept as a private JWK
//! (RFC 7517, with `d` as RFC 8037 and RFC 7518 define it), and used to
//! issue tokens.

use std::{
    fmt, fs,
    io::{self, Write as _},
    os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _},
    path::{Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use jsonwebtoken::{
    EncodingKey, Header,
    jwk::{
        AlgorithmParameters, CommonParameters, EllipticCurve, EllipticCurveKeyParameters,
        EllipticCurveKeyType, Jwk, JwkSet, KeyAlgorithm, OctetKeyPairParameters, OctetKeyPairType,
        PublicKeyUse, ThumbprintHash,
    },
};
use p256::{elliptic_curve::sec1::ToSec1Point as _, pkcs8::EncodePrivateKey as _};
use serde_json::{Value, json};
use zeroize::{Zeroize as _, Zeroizing};

use super::{Algorithm, MAX_TTL, TtlError, b64_decode, b64_encode, bundle::JWT_SVID_USE};
use crate::policy::SpiffeId;

/// The private key's name in the folder `keygen` writes to.
pub const KEY_FILE: &str = "issuer.jwk";
/// The trust bundle's name in the folder `keygen` writes to.
pub const BUNDLE_FILE: &str = "bundle.json";

const MAX_KID_LEN: usize = 255;

/// A key that signs tokens. Its private half is never shown: `Debug` leaves
/// it out, and only [`IssuerKey::save`] writes it, to a file only its owner
/// can read.
pub struct IssuerKey {
    algorithm: Algorithm,
    kid: String,
    /// The Ed25519 seed, or the P-256 scalar (big-endian).
    secret: Zeroizing<[u8; 32]>,
    /// The public key: `x` of Ed25519, `x` and `y` of P-256.
    public: AlgorithmParameters,
    signing: EncodingKey,
}

/// Where [`IssuerKey::save`] wrote the key and its bundle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Saved {
    pub key: PathBuf,
    pub bundle: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot get random bytes from the system: {0}")]
    Random(getrandom::Error),
    #[error(
        "invalid key ID `{0}`: expected 1 to {MAX_KID_LEN} printable ASCII characters, no spaces"
    )]
    KeyId(String),
    #[error("{}: cannot read", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{}: not an issuer key: {reason}", path.display())]
    Invalid { path: PathBuf, reason: String },
    #[error("{}: cannot write", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Ttl(#[from] TtlError),
    #[error("cannot sign")]
    Sign(#[source] jsonwebtoken::errors::Error),
}

impl fmt::Debug for IssuerKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssuerKey")
            .field("algorithm", &self.algorithm)
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

impl IssuerKey {
    /// A new random key. Its ID is `kid`, or else its RFC 7638 thumbprint.
    pub fn generate(algorithm: Algorithm, kid: Option<String>) -> Result<Self, KeyError> {
        if let Some(kid) = kid.as_deref().filter(|kid| !valid_kid(kid)) {
            return Err(KeyError::KeyId(kid.to_owned()));
        }
        let mut secret = Zeroizing::new([0; 32]);
        loop {
            getrandom::fill(secret.as_mut()).map_err(KeyError::Random)?;
            // About 1 draw in 2^32 is no P-256 scalar (0, or past the order).
            if let Some(key) = Self::from_secret(algorithm, &secret, kid.clone()) {
                return Ok(key);
            }
        }
    }

    /// Reads a key written by [`IssuerKey::save`], or any private Ed25519 or
    /// P-256 JWK with a `kid`.
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let text = Zeroizing::new(fs::read_to_string(path).map_err(|source| KeyError::Read {
            path: path.to_owned(),
            source,
        })?);
        Self::from_private_jwk(&text).map_err(|reason| KeyError::Invalid {
            path: path.to_owned(),
            reason,
        })
    }

    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// A trust bundle (JWKS) with this key's public half, as JSON.
    pub fn bundle_json(&self) -> String {
        let bundle = JwkSet {
            keys: vec![self.public_jwk()],
        };
        serde_json::to_string_pretty(&bundle).expect("a JWKS is plain JSON") + "\n"
    }

    /// Writes the private key to `dir`/[`KEY_FILE`] and the bundle to
    /// `dir`/[`BUNDLE_FILE`], making `dir` (mode 0700) if it is missing.
    /// Refuses to replace either file.
    pub fn save(&self, dir: &Path) -> Result<Saved, KeyError> {
        let failed = |path: &Path| {
            let path = path.to_owned();
            move |source| KeyError::Write { path, source }
        };
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(failed(dir))?;
        let saved = Saved {
            key: dir.join(KEY_FILE),
            bundle: dir.join(BUNDLE_FILE),
        };
        // Mode 0600 from the moment it exists, so it is never readable by
        // others, not even between creating and restricting it.
        let mut key_file = create_new(&saved.key, 0o600).map_err(failed(&saved.key))?;
        let mut bundle_file = match create_new(&saved.bundle, 0o644) {
            Ok(file) => file,
            Err(source) => {
                // Nothing half done: a key without its bundle is of no use.
                let _ = fs::remove_file(&saved.key);
                return Err(failed(&saved.bundle)(source));
            }
        };
        let private = self.private_jwk_json();
        key_file
            .write_all(private.as_bytes())
            .and_then(|()| key_file.write_all(b"\n"))
            .and_then(|()| key_file.sync_all())
            .map_err(failed(&saved.key))?;
        bundle_file
            .write_all(self.bundle_json().as_bytes())
            .and_then(|()| bundle_file.sync_all())
            .map_err(failed(&saved.bundle))?;
        Ok(saved)
    }

    /// A token for `subject`, valid for `ttl` from `now`, with a random
    /// `jti`.
    pub fn issue(
        &self,
        subject: &SpiffeId,
        audience: &str,
        ttl: Duration,
        now: SystemTime,
    ) -> Result<String, KeyError> {
        self.sign(
            json!({ "sub": subject.as_str(), "aud": [audience] }),
            ttl,
            now,
        )
    }

    /// Signs `claims` (a JSON object) with `iat`, `exp` and a random `jti`
    /// added: the one way every kind of token the mesh issues is made.
    pub(crate) fn sign(
        &self,
        mut claims: Value,
        ttl: Duration,
        now: SystemTime,
    ) -> Result<String, KeyError> {
        if ttl.as_secs() == 0 {
            return Err(TtlError::Zero.into());
        }
        if ttl > MAX_TTL {
            return Err(TtlError::TooLong(format!("{}s", ttl.as_secs())).into());
        }
        let iat = now
            .duration_since(UNIX_EPOCH)
            .map_or(0, |since| since.as_secs());
        let mut jti = [0; 16];
        getrandom::fill(&mut jti).map_err(KeyError::Random)?;
        claims["iat"] = iat.into();
        claims["exp"] = iat.saturating_add(ttl.as_secs()).into();
        claims["jti"] = b64_encode(&jti).into();
        let mut header = Header::new(self.algorithm.jwt());
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, &claims, &self.signing).map_err(KeyError::Sign)
    }

    /// `None` if `secret` is no P-256 scalar. `kid` is a valid key ID, or
    /// `None` for the thumbprint.
    fn from_secret(
        algorithm: Algorithm,
        secret: &Zeroizing<[u8; 32]>,
        kid: Option<String>,
    ) -> Option<Self> {
        let (public, signing) = match algorithm {
            Algorithm::EdDsa => {
                let key = ed25519_dalek::SigningKey::from_bytes(secret);
                let der = key.to_pkcs8_der().ok()?;
                let public = AlgorithmParameters::OctetKeyPair(OctetKeyPairParameters {
                    key_type: OctetKeyPairType::OctetKeyPair,
                    curve: EllipticCurve::Ed25519,
                    x: b64_encode(key.verifying_key().as_bytes()),
                });
                (public, EncodingKey::from_ed_der(der.as_bytes()))
            }
            Algorithm::Es256 => {
                let key = p256::SecretKey::from_slice(secret.as_ref()).ok()?;
                let der = key.to_pkcs8_der().ok()?;
                let point = key.public_key().to_sec1_point(false);
                let public = AlgorithmParameters::EllipticCurve(EllipticCurveKeyParameters {
                    key_type: EllipticCurveKeyType::EC,
                    curve: EllipticCurve::P256,
                    x: b64_encode(point.x()?),
                    y: b64_encode(point.y()?),
                });
                (public, EncodingKey::from_ec_der(der.as_bytes()))
            }
        };
        let mut key = Self {
            algorithm,
            kid: kid.unwrap_or_default(),
            secret: secret.clone(),
            public,
            signing,
        };
        if key.kid.is_empty() {
            key.kid = key
                .public_jwk()
                .thumbprint(ThumbprintHash::SHA256)
                .expect("Ed25519 and P-256 keys have thumbprints");
        }
        Some(key)
    }

    fn from_private_jwk(text: &str) -> Result<Self, String> {
        let mut jwk: Value =
            serde_json::from_str(text).map_err(|err| format!("not JSON: {err}"))?;
        // Taken out first, so that no error below can quote it.
        let d = match jwk.as_object_mut().and_then(|members| members.remove("d")) {
            Some(Value::String(d)) => Zeroizing::new(d),
            _ => return Err("no private key (`d`); is this a public key or a bundle?".into()),
        };
        let jwk: Jwk = serde_json::from_value(jwk).map_err(|err| format!("not a JWK: {err}"))?;
        let algorithm = match jwk.common.key_algorithm {
            Some(KeyAlgorithm::EdDSA) => Algorithm::EdDsa,
            Some(KeyAlgorithm::ES256) => Algorithm::Es256,
            _ => return Err("`alg` is not EdDSA or ES256".into()),
        };
        let kid = jwk.common.key_id.ok_or("no key ID (`kid`)")?;
        if !valid_kid(&kid) {
            return Err(KeyError::KeyId(kid).to_string());
        }
        let secret = Zeroizing::new(b64_decode(&d).unwrap_or_default());
        let secret: Zeroizing<[u8; 32]> = Zeroizing::new(
            secret
                .as_slice()
                .try_into()
                .map_err(|_| "`d` is not 32 bytes of base64url".to_owned())?,
        );
        let key = Self::from_secret(algorithm, &secret, Some(kid))
            .ok_or("`d` is not a P-256 private key")?;
        if key.public != jwk.algorithm {
            return Err(format!(
                "the public key (`kty`, `crv`, `x`{}) is not that of `d`, an {algorithm} key",
                if algorithm == Algorithm::Es256 {
                    ", `y`"
                } else {
                    ""
                }
            ));
        }
        Ok(key)
    }

    fn public_jwk(&self) -> Jwk {
        Jwk {
            common: CommonParameters {
                public_key_use: Some(PublicKeyUse::Other(JWT_SVID_USE.into())),
                key_algorithm: Some(self.algorithm.jwt().into()),
                key_id: Some(self.kid.clone()),
                ..CommonParameters::default()
            },
            algorithm: self.public.clone(),
        }
    }

    /// The public JWK with `d` added: the key file.
    fn private_jwk_json(&self) -> Zeroizing<String> {
        let mut jwk = serde_json::to_value(self.public_jwk()).expect("a JWK is plain JSON");
        jwk["d"] = Value::String(b64_encode(self.secret.as_ref()));
        let text = Zeroizing::new(serde_json::to_string_pretty(&jwk).expect("a JWK is plain JSON"));
        if let Value::String(d) = &mut jwk["d"] {
            d.zeroize();
        }
        text
    }
}

fn valid_kid(kid: &str) -> bool {
    (1..=MAX_KID_LEN).contains(&kid.len()) && kid.bytes().all(|b| b.is_ascii_graphic())
}

fn create_new(path: &Path, mode: u32) -> io::Result<fs::File> {
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
}
