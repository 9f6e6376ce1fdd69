//! A node's record in the store: what every other node needs to make it a
//! WireGuard peer, the join token that allows it, and the node's signature
//! over both with the key the token names. The signature makes the record
//! the node's own: whoever else can write the store can copy the token but
//! not sign with its key. The sequence, higher in each record a node signs,
//! tells a replayed older record from the newest.

use std::net::SocketAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::{
    NodeName, PublicKey,
    signed::{Document, Signed},
};

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

impl Document for NodeRecord {
    const CONTEXT: &'static [u8] = b"mesh node record v1\n";
}

/// A record as the store holds it.
pub type SignedRecord = Signed<NodeRecord>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::{SigningKey, signed::MAX_DOCUMENT_LEN};

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
        value["body"]["endpoint"] = "192.0.2.66:51820".into();
        let changed = SignedRecord::decode(value.to_string().as_bytes()).unwrap();
        assert!(changed.verify(&key.public()).is_err());
    }

    #[test]
    fn refuses_unknown_and_repeated_members() {
        let signed = SignedRecord::sign(record(), &key());
        let mut value = serde_json::to_value(&signed).unwrap();
        value["body"]["extra"] = 1.into();
        assert!(SignedRecord::decode(value.to_string().as_bytes()).is_err());
        let text = serde_json::to_string(&signed).unwrap();
        let repeated = text.replacen(r#""name""#, r#""name":"node-b","name""#, 1);
        assert!(SignedRecord::decode(repeated.as_bytes()).is_err());
        assert!(SignedRecord::decode(&vec![b' '; MAX_DOCUMENT_LEN + 1]).is_err());
    }
}
