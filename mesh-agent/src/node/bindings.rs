//! Process bindings across the mesh. Each node publishes the bindings in
//! force on it (`mesh-agent exec`: identity, addresses, expiry), signed
//! with its node key; every node classifies its peers' bound addresses by
//! them, as it does its own.
//!
//! A set is believed only from a current peer, signed with the key its
//! join token names, no older than the newest seen of it, and with every
//! address within the peer's prefix: a node speaks only for its own
//! addresses. A set that fails changes nothing (the peer's last good one
//! stays); a binding counts until it expires, its set is replaced by one
//! without it, the set's entry is removed, or the peer leaves.

use std::{
    collections::{BTreeMap, BTreeSet},
    io,
    net::IpAddr,
    path::Path,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::{
    NodeName, Peer, Section,
    published::{FromPeers, Published, Reason},
    signed::{Document, MAX_BINDINGS_LEN},
};
use crate::{agent::read_bindings, policy::SpiffeId};

/// One binding as its node publishes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bound {
    /// The SPIFFE ID its token proves.
    pub identity: String,
    /// Its source addresses, within the node's prefix.
    pub addresses: Vec<IpAddr>,
    /// When its token expires, in seconds since 1970.
    pub expires: u64,
}

impl Bound {
    pub fn expires_at(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(self.expires)
    }
}

/// What a node publishes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BindingSet {
    pub node: NodeName,
    /// Higher in every set the node signs.
    pub sequence: u64,
    pub bindings: Vec<Bound>,
}

impl Document for BindingSet {
    const CONTEXT: &'static [u8] = b"mesh node bindings v1\n";
    const MAX_LEN: usize = MAX_BINDINGS_LEN;
}

impl Published for BindingSet {
    const SECTION: Section = Section::Bindings;
    const REMOVAL_ENDS: bool = true;

    fn node(&self) -> &NodeName {
        &self.node
    }

    fn sequence(&self) -> u64 {
        self.sequence
    }

    /// Identities are SPIFFE IDs, and each address is the peer's, and
    /// bound once.
    fn check(&self, peer: &Peer) -> Result<(), Reason> {
        let mut seen = BTreeSet::new();
        for bound in &self.bindings {
            if let Err(err) = bound.identity.parse::<SpiffeId>() {
                return Err(("malformed", format!("{}: {err}", bound.identity)));
            }
            for address in &bound.addresses {
                if !peer.prefix.contains(address) {
                    return Err((
                        "address_outside_prefix",
                        format!(
                            "{address} of {} is not within node {}'s {}",
                            bound.identity, peer.name, peer.prefix
                        ),
                    ));
                }
                if !seen.insert(*address) {
                    return Err(("malformed", format!("{address} is bound twice")));
                }
            }
        }
        Ok(())
    }
}

/// This node's bindings in force, as it publishes them: their addresses
/// within `prefix` (the only ones its peers take from it), and how many
/// addresses were left out.
pub fn local(state_dir: &Path, prefix: IpNet, now: SystemTime) -> io::Result<(Vec<Bound>, usize)> {
    let mut left_out = 0;
    let bindings = read_bindings(state_dir)?
        .into_iter()
        .filter(|binding| {
            binding.ended.is_none() && UNIX_EPOCH + Duration::from_secs(binding.expires) > now
        })
        .map(|binding| {
            let (inside, outside): (Vec<IpAddr>, Vec<IpAddr>) = binding
                .addresses
                .iter()
                .partition(|address| prefix.contains(*address));
            left_out += outside.len();
            Bound {
                identity: binding.identity,
                addresses: inside,
                expires: binding.expires,
            }
        })
        .filter(|bound| !bound.addresses.is_empty())
        .collect();
    Ok((bindings, left_out))
}

/// A peer's binding of one address, as this node classifies it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerBinding {
    pub node: NodeName,
    pub identity: String,
    pub expires_at: SystemTime,
}

/// The peers' bindings in force, by address.
pub type PeerBindings = BTreeMap<IpAddr, PeerBinding>;

/// Every address of the sets in force, whether or not its binding has
/// expired yet: the agent ends each at its expiry.
pub fn peer_bindings(sets: &FromPeers<BindingSet>) -> PeerBindings {
    sets.in_force()
        .flat_map(|(node, set)| {
            set.bindings.iter().flat_map(move |bound| {
                bound.addresses.iter().map(move |address| {
                    let binding = PeerBinding {
                        node: node.clone(),
                        identity: bound.identity.clone(),
                        expires_at: bound.expires_at(),
                    };
                    (*address, binding)
                })
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::{Entry, NodeKey, Signed, SigningKey};

    const X: &str = "spiffe://test.internal/agent/x";

    fn peer(name: &str, prefix: &str, key: &SigningKey) -> Peer {
        Peer {
            name: name.parse().unwrap(),
            public_key: NodeKey::generate().unwrap().public(),
            endpoint: "192.0.2.1:51820".parse().unwrap(),
            prefix: prefix.parse().unwrap(),
            expires_at: SystemTime::now(),
            node_key: key.public(),
        }
    }

    fn set(node: &str, sequence: u64, bound: &[(&str, &str)], key: &SigningKey) -> Entry {
        let set = BindingSet {
            node: node.parse().unwrap(),
            sequence,
            bindings: bound
                .iter()
                .map(|(identity, address)| Bound {
                    identity: identity.to_string(),
                    addresses: vec![address.parse().unwrap()],
                    expires: 4_000_000_000,
                })
                .collect(),
        };
        Entry {
            name: node.into(),
            bytes: Signed::sign(set, key).encode(),
        }
    }

    fn addresses(sets: &FromPeers<BindingSet>) -> Vec<String> {
        peer_bindings(sets)
            .keys()
            .map(ToString::to_string)
            .collect()
    }

    fn reasons(
        sets: &mut FromPeers<BindingSet>,
        entries: &[Entry],
        peers: &BTreeMap<NodeName, Peer>,
    ) -> Vec<(String, &'static str)> {
        sets.update(entries, peers)
            .into_iter()
            .map(|r| (r.entry, r.reason))
            .collect()
    }

    #[test]
    fn a_peer_speaks_for_its_own_addresses_only() {
        let key = SigningKey::generate().unwrap();
        let peers = BTreeMap::from([("b".parse().unwrap(), peer("b", "10.0.1.0/24", &key))]);
        let mut sets = FromPeers::default();
        let good = set("b", 1, &[(X, "10.0.1.7")], &key);
        assert!(reasons(&mut sets, std::slice::from_ref(&good), &peers).is_empty());
        assert_eq!(addresses(&sets), ["10.0.1.7"]);
        // Another node's address, or one bound twice: the set is refused,
        // and the last good one stays.
        let greedy = set("b", 2, &[(X, "10.0.1.8"), (X, "10.0.2.1")], &key);
        assert_eq!(
            reasons(&mut sets, &[greedy], &peers),
            [("bindings/b".into(), "address_outside_prefix")]
        );
        let twice = set("b", 3, &[(X, "10.0.1.8"), (X, "10.0.1.8")], &key);
        assert_eq!(
            reasons(&mut sets, &[twice], &peers),
            [("bindings/b".into(), "malformed")]
        );
        assert_eq!(addresses(&sets), ["10.0.1.7"]);
        // B's record moves it elsewhere: what it said of the old prefix
        // counts no more.
        let moved = BTreeMap::from([("b".parse().unwrap(), peer("b", "10.0.5.0/24", &key))]);
        reasons(&mut sets, &[good], &moved);
        assert!(addresses(&sets).is_empty());
    }

    #[test]
    fn forged_replayed_removed_and_foreign_sets_grant_nothing() {
        let key = SigningKey::generate().unwrap();
        let peers = BTreeMap::from([("b".parse().unwrap(), peer("b", "10.0.1.0/24", &key))]);
        let mut sets = FromPeers::default();
        let newer = set("b", 5, &[(X, "10.0.1.7")], &key);
        reasons(&mut sets, std::slice::from_ref(&newer), &peers);
        let forger = SigningKey::generate().unwrap();
        assert_eq!(
            reasons(
                &mut sets,
                &[set("b", 6, &[(X, "10.0.1.9")], &forger)],
                &peers
            ),
            [("bindings/b".into(), "bad_record_signature")]
        );
        assert_eq!(
            reasons(&mut sets, &[set("b", 4, &[(X, "10.0.1.9")], &key)], &peers),
            [("bindings/b".into(), "replayed")]
        );
        // A node that is no peer is not listened to.
        assert!(
            reasons(
                &mut sets,
                &[newer.clone(), set("c", 9, &[(X, "10.0.9.1")], &forger)],
                &peers
            )
            .is_empty()
        );
        assert_eq!(addresses(&sets), ["10.0.1.7"]);
        // The entry goes: its bindings go with it, and the older set
        // written back is a replay still.
        reasons(&mut sets, &[], &peers);
        assert!(addresses(&sets).is_empty());
        let older = set("b", 4, &[(X, "10.0.1.9")], &key);
        assert_eq!(
            reasons(&mut sets, &[older], &peers),
            [("bindings/b".into(), "replayed")]
        );
        assert!(addresses(&sets).is_empty());
        // Written again, the newest counts again; until B leaves.
        reasons(&mut sets, std::slice::from_ref(&newer), &peers);
        assert_eq!(addresses(&sets), ["10.0.1.7"]);
        reasons(&mut sets, &[newer], &BTreeMap::new());
        assert!(addresses(&sets).is_empty());
    }

    #[test]
    fn a_node_publishes_its_bindings_in_force_within_its_prefix() {
        use crate::agent::Binding;
        let dir = tempfile::tempdir().unwrap();
        let binding = |name: &str, addresses: &[&str], expires: u64, ended: Option<&str>| Binding {
            identity: X.into(),
            cgroup: format!("/sys/fs/cgroup/mesh/{name}").into(),
            cgroup_id: 1,
            pid: 1,
            addresses: addresses.iter().map(|a| a.parse().unwrap()).collect(),
            expires,
            token_id: None,
            ended: ended.map(str::to_owned),
        };
        let bindings = [
            binding("x-1", &["10.0.1.7", "fd00::7"], 4_000_000_000, None),
            binding("x-2", &["10.0.1.8"], 4_000_000_000, Some("expired")),
            binding("x-3", &["10.0.1.9"], 1, None),
        ];
        std::fs::write(
            dir.path().join(crate::agent::BINDINGS_FILE),
            serde_json::to_vec(&bindings).unwrap(),
        )
        .unwrap();
        let (published, left_out) = local(
            dir.path(),
            "10.0.1.0/24".parse().unwrap(),
            SystemTime::now(),
        )
        .unwrap();
        assert_eq!(
            published,
            [Bound {
                identity: X.into(),
                addresses: vec!["10.0.1.7".parse().unwrap()],
                expires: 4_000_000_000,
            }]
        );
        assert_eq!(left_out, 1);
        // No bindings at all: an empty set.
        let empty = tempfile::tempdir().unwrap();
        assert_eq!(
            local(
                empty.path(),
                "10.0.1.0/24".parse().unwrap(),
                SystemTime::now()
            )
            .unwrap(),
            (vec![], 0)
        );
    }
}
