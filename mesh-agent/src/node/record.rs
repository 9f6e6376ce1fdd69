//! A node's record in the store: what every other node needs to make it a
//! WireGuard peer, the join token that allows it, and the node's signature
//! over both with the key the token names. The signature makes the record
//! the node's own: whoever else can write the store can copy the token but
//! not sign with its key. The sequence, higher in each record a node signs,
//! tells a replayed older record from the newest.

use std::net::SocketAddr;

use base64::Engine as _;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::{
    NodeName, PublicKey,
    signing::{BadSignature, SigningKey, SigningPublicKey},
};

/// Far beyond any real record (a join token is at most 8 KiB); bounds what
/// a bad store entry costs to read.
pub const MAX_RECORD_LEN: usize = 16 * 1024;

/// What the signature covers is this, then the record as compact JSON: a
/// signature made for anything else never checks as a record's.
const SIGNING_CONTEXT: &[u8] = b"mesh node record v1\n";

/// One node's record. Untrusted until [`super::membership`] has checked its
/// signature and its join token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeRecord {
    pub name: NodeName,
    /// The node's WireGuard public key.
    pub public_key: PublicKey,
    /// Where its WireGuard listens, as its peers reach it.
    pub endpoint: SocketAddr,
    /// Its agents' addresses: inside the prefix of its join token.
    pub prefix: IpNet,
    /// Higher in every record the node signs (microseconds since the epoch
    /// when it was signed, or the last one's plus one).
    pub sequence: u64,
    pub join_token: String,
}

/// A record as the store holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedRecord {
    record: NodeRecord,
    /// Ed25519 over [`SIGNING_CONTEXT`] and the record, base64url.
    signature: Signature,
}

#[derive(Clone, Copy, PartialEq, Eq)]
struct Signature([u8; 64]);

#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("{0} bytes long; a record is at most {MAX_RECORD_LEN}")]
    TooLong(usize),
    #[error("not a node record: {0}")]
    Json(#[from] serde_json::Error),
}

impl SignedRecord {
    pub fn sign(record: NodeRecord, key: &SigningKey) -> Self {
        let signature = Signature(key.sign(&signed_bytes(&record)));
        Self { record, signature }
    }

    /// Parses a record strictly: unknown or repeated members are errors.
    pub fn decode(bytes: &[u8]) -> Result<Self, RecordError> {
        if bytes.len() > MAX_RECORD_LEN {
            return Err(RecordError::TooLong(bytes.len()));
        }
        Ok(serde_json::from_slice(bytes)?)
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut bytes = serde_json::to_vec_pretty(self).expect("a record is plain JSON");
        bytes.push(b'\n');
        bytes
    }

    /// The record as it claims to be, before any check: only to find the
    /// join token that names the key to check it with.
    pub fn unverified(&self) -> &NodeRecord {
        &self.record
    }

    /// The record, if `key` signed it.
    pub fn verify(&self, key: &SigningPublicKey) -> Result<&NodeRecord, BadSignature> {
        key.verify(&signed_bytes(&self.record), &self.signature.0)?;
        Ok(&self.record)
    }
}

/// What is signed. The record is serialized again rather than taken as
/// stored, so how the store spells it does not matter, only what it says.
fn signed_bytes(record: &NodeRecord) -> Vec<u8> {
    let mut bytes = SIGNING_CONTEXT.to_vec();
    serde_json::to_writer(&mut bytes, record).expect("a record is plain JSON");
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

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> SigningKey {
        SigningKey::generate().unwrap()
    }

    fn record() -> NodeRecord {
        NodeRecord {
            name: "node-a".parse().unwrap(),
            public_key: "uqVCjAMVCszUNU1UBYcCEL44uWuHQ3FD2PsxuToqyik="
                .parse()
                .unwrap(),
            endpoint: "192.0.2.1:51820".parse().unwrap(),
            prefix: "10.100.1.0/24".parse().unwrap(),
            sequence: 1,
            join_token: "x.y.z".into(),
        }
    }

    #[test]
    fn round_trips_and_checks_its_signature() {
        let key = key();
        let signed = SignedRecord::sign(record(), &key);
        let decoded = SignedRecord::decode(&signed.encode()).unwrap();
        assert_eq!(decoded, signed);
        assert_eq!(decoded.verify(&key.public()), Ok(&record()));
        assert!(decoded.verify(&self::key().public()).is_err());
    }

    #[test]
    fn a_changed_record_fails_its_signature() {
        let key = key();
        let signed = SignedRecord::sign(record(), &key);
        let mut value = serde_json::to_value(&signed).unwrap();
        value["record"]["endpoint"] = "192.0.2.66:51820".into();
        let changed = SignedRecord::decode(value.to_string().as_bytes()).unwrap();
        assert!(changed.verify(&key.public()).is_err());
    }

    #[test]
    fn refuses_unknown_and_repeated_members() {
        let signed = SignedRecord::sign(record(), &key());
        let mut value = serde_json::to_value(&signed).unwrap();
        value["record"]["extra"] = 1.into();
        assert!(SignedRecord::decode(value.to_string().as_bytes()).is_err());
        let text = serde_json::to_string(&signed).unwrap();
        let repeated = text.replacen(r#""name""#, r#""name":"node-b","name""#, 1);
        assert!(SignedRecord::decode(repeated.as_bytes()).is_err());
        assert!(SignedRecord::decode(&vec![b' '; MAX_RECORD_LEN + 1]).is_err());
    }
}
