//! The node's signing key: an Ed25519 key made on the first start and kept
//! in the state folder beside the WireGuard key (mode 0600). The admin binds
//! its public half to the node's join token (an RFC 7800 `cnf` claim), and
//! the node signs its records with it, so a record is believed only if the
//! node that holds the key wrote it: a join token copied out of the store is
//! of no use to anyone else. The WireGuard key can then change without the
//! admin.

use std::{fmt, path::Path, str::FromStr};

use base64::Engine as _;
use ed25519_dalek::{Signer as _, SigningKey as Ed25519};
use zeroize::Zeroizing;

use super::{
    NodeKeyError,
    keys::{load_or_create_secret, load_secret},
};

/// The signing key's name in the state folder.
pub const SIGNING_KEY_FILE: &str = "node-signing.key";

/// The public half, as `mesh-agent node key` prints it and `node token issue
/// --node-key` takes it: the 32 bytes in base64url without padding, as a
/// JWK's `x`.
/// Kept as its bytes (checked to be a strong key when made), which are
/// small to carry around; decompressed to check a signature.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct SigningPublicKey([u8; 32]);

/// The node's signing key. Its private half never leaves it: no `Debug`, no
/// `Display`.
pub struct SigningKey(Ed25519);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a node's signing key (32 bytes of base64url, an Ed25519 public key)")]
pub struct InvalidSigningKey(String);

/// A signature that does not check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the signature is not the node key's")]
pub struct BadSignature;

impl SigningKey {
    /// A new random key.
    pub fn generate() -> Result<Self, NodeKeyError> {
        let mut seed = Zeroizing::new([0; 32]);
        getrandom::fill(seed.as_mut()).map_err(NodeKeyError::Random)?;
        Ok(Self(Ed25519::from_bytes(&seed)))
    }

    /// The key in `dir`, or a new one saved there if there is none. `true`
    /// with a new key.
    pub fn load_or_create(dir: &Path) -> Result<(Self, bool), NodeKeyError> {
        let (seed, created) = load_or_create_secret(dir, SIGNING_KEY_FILE, || {
            Ok(Zeroizing::new(Self::generate()?.0.to_bytes()))
        })?;
        Ok((Self(Ed25519::from_bytes(&seed)), created))
    }

    /// Reads the key in `dir`, refusing one that others can read.
    pub fn load(dir: &Path) -> Result<Self, NodeKeyError> {
        let seed = load_secret(&dir.join(SIGNING_KEY_FILE))?;
        Ok(Self(Ed25519::from_bytes(&seed)))
    }

    pub fn public(&self) -> SigningPublicKey {
        SigningPublicKey(self.0.verifying_key().to_bytes())
    }

    pub fn sign(&self, message: &[u8]) -> [u8; 64] {
        self.0.sign(message).to_bytes()
    }
}

impl SigningPublicKey {
    /// Checks `signature` over `message` strictly: no malleable or
    /// small-order forms.
    pub fn verify(&self, message: &[u8], signature: &[u8; 64]) -> Result<(), BadSignature> {
        ed25519_dalek::VerifyingKey::from_bytes(&self.0)
            .and_then(|key| {
                key.verify_strict(message, &ed25519_dalek::Signature::from_bytes(signature))
            })
            .map_err(|_| BadSignature)
    }

    /// The key's `x`, for a JWK.
    pub fn to_base64url(&self) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(self.0)
    }
}

impl fmt::Display for SigningPublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_base64url())
    }
}

impl fmt::Debug for SigningPublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for SigningPublicKey {
    type Err = InvalidSigningKey;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(text)
            .ok()
            .and_then(|bytes| <[u8; 32]>::try_from(bytes).ok())
            // Weak (small-order) keys would let one signature fit many
            // messages.
            .and_then(|bytes| ed25519_dalek::VerifyingKey::from_bytes(&bytes).ok())
            .filter(|key| !key.is_weak())
            .map(|key| Self(key.to_bytes()))
            .ok_or_else(|| InvalidSigningKey(text.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt as _;

    use super::*;

    #[test]
    fn made_once_kept_private_and_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let (key, created) = SigningKey::load_or_create(dir.path()).unwrap();
        assert!(created);
        let mode = std::fs::metadata(dir.path().join(SIGNING_KEY_FILE))
            .unwrap()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let (again, created) = SigningKey::load_or_create(dir.path()).unwrap();
        assert!(!created);
        assert_eq!(again.public(), key.public());
        assert_eq!(SigningKey::load(dir.path()).unwrap().public(), key.public());
    }

    #[test]
    fn signatures_check_only_with_their_key_and_message() {
        let key = SigningKey::generate().unwrap();
        let other = SigningKey::generate().unwrap();
        let signature = key.sign(b"record");
        assert_eq!(key.public().verify(b"record", &signature), Ok(()));
        assert!(key.public().verify(b"recorD", &signature).is_err());
        assert!(other.public().verify(b"record", &signature).is_err());
    }

    #[test]
    fn public_keys_parse_strictly() {
        let key = SigningKey::generate().unwrap().public();
        assert_eq!(key.to_string().parse::<SigningPublicKey>(), Ok(key));
        // The identity point is of small order; base64 with padding is not
        // base64url.
        let identity = format!("AQ{}", "A".repeat(41));
        for bad in ["", "AAAA", identity.as_str(), &format!("{key}=")] {
            assert!(bad.parse::<SigningPublicKey>().is_err(), "{bad:?}");
        }
    }
}
