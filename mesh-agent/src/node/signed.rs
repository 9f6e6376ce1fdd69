//! Documents a node signs with its signing key: its record, its
//! revocations, its bindings. A signed document is its body and an Ed25519 signature over
//! the kind's context string and the body as compact JSON, base64url. The
//! body is serialized again to check it, so how the store spells it does
//! not matter, only what it says; and the context keeps a signature of one
//! kind from passing for another's.

use base64::Engine as _;
use serde::{Deserialize, Serialize, de::DeserializeOwned};

use super::signing::{BadSignature, SigningKey, SigningPublicKey};

/// Far beyond any real document (a join token is at most 8 KiB); bounds
/// what a bad store entry costs to read.
pub const MAX_DOCUMENT_LEN: usize = 16 * 1024;

/// A node's bindings: some 400 of them.
pub const MAX_BINDINGS_LEN: usize = 64 * 1024;

/// A kind of signed document.
pub trait Document: Serialize + DeserializeOwned {
    /// What a signature of this kind covers first.
    const CONTEXT: &'static [u8];
    /// The longest document of this kind that is read.
    const MAX_LEN: usize = MAX_DOCUMENT_LEN;
}

/// A document as the store holds it. Untrusted until its signature has
/// been checked with the key that should have made it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, bound = "T: Document")]
pub struct Signed<T> {
    body: T,
    signature: Signature,
}

#[derive(Clone, Copy, PartialEq, Eq)]
struct Signature([u8; 64]);

#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("{len} bytes long; a signed document of its kind is at most {max}")]
    TooLong { len: usize, max: usize },
    #[error("not a signed document of its kind: {0}")]
    Json(#[from] serde_json::Error),
}

impl<T: Document> Signed<T> {
    pub fn sign(body: T, key: &SigningKey) -> Self {
        let signature = Signature(key.sign(&signed_bytes(&body)));
        Self { body, signature }
    }

    /// Parses a document strictly: unknown or repeated members are errors.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        if bytes.len() > T::MAX_LEN {
            return Err(DecodeError::TooLong {
                len: bytes.len(),
                max: T::MAX_LEN,
            });
        }
        Ok(serde_json::from_slice(bytes)?)
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut bytes = serde_json::to_vec_pretty(self).expect("a document is plain JSON");
        bytes.push(b'\n');
        bytes
    }

    /// The body as it claims to be, before any check: only to find what
    /// names the key to check it with.
    pub fn unverified(&self) -> &T {
        &self.body
    }

    /// The body, if `key` signed it.
    pub fn verify(&self, key: &SigningPublicKey) -> Result<&T, BadSignature> {
        key.verify(&signed_bytes(&self.body), &self.signature.0)?;
        Ok(&self.body)
    }
}

fn signed_bytes<T: Document>(body: &T) -> Vec<u8> {
    let mut bytes = T::CONTEXT.to_vec();
    serde_json::to_writer(&mut bytes, body).expect("a document is plain JSON");
    bytes
}

impl std::fmt::Debug for Signature {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(self.0))
    }
}

impl Serialize for Signature {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&format_args!("{self:?}"))
    }
}

impl<'de> Deserialize<'de> for Signature {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(&text)
            .ok()
            .and_then(|bytes| bytes.try_into().ok())
            .map(Self)
            .ok_or_else(|| serde::de::Error::custom("a signature is 64 bytes of base64url"))
    }
}
