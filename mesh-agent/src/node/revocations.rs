//! Revocations across the mesh. Each node publishes the identities revoked
//! on it (`mesh-agent revoke`), signed with its node key; every node
//! applies its peers' through its own agent's control socket, as
//! `mesh-agent revoke` would, with a reason that marks them as the mesh's,
//! and lifts those when no peer revokes them any more. A node's own
//! revocations are never lifted by the mesh, and never published back.
//!
//! A list is believed only from a current peer, signed with the key its
//! join token names, and no older than the newest seen of it; a list that
//! fails changes nothing (the peer's last good one stays). A peer that
//! leaves takes its revocations with it.

use std::{collections::BTreeMap, io, path::Path};

use serde::{Deserialize, Serialize};

use super::{
    Entry, NodeName, Peer, Rejected, Section,
    published::{FromPeers, Published, Reason},
    signed::Document,
};
use crate::identity::revocations::{self, Revocation, Revoked};

/// How a revocation the mesh applied names its reason: this, then the
/// node it came from.
pub const MESH_REASON: &str = "revoked on node ";

/// What a node publishes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevocationList {
    pub node: NodeName,
    /// Higher in every list the node signs.
    pub sequence: u64,
    /// SPIFFE ID → revocation.
    pub revoked: Revoked,
}

impl Document for RevocationList {
    const CONTEXT: &'static [u8] = b"mesh node revocations v1\n";
}

/// This node's own revocations: those in its state folder that the mesh
/// did not apply.
pub fn local(state_dir: &Path) -> io::Result<Revoked> {
    let mut revoked = revocations::read(state_dir)?;
    revoked.retain(|_, revocation| !applied_by_mesh(revocation));
    Ok(revoked)
}

fn applied_by_mesh(revocation: &Revocation) -> bool {
    revocation
        .reason
        .as_deref()
        .is_some_and(|reason| reason.starts_with(MESH_REASON))
}

impl Published for RevocationList {
    const SECTION: Section = Section::Revocations;
    const REMOVAL_ENDS: bool = false;

    fn node(&self) -> &NodeName {
        &self.node
    }

    fn sequence(&self) -> u64 {
        self.sequence
    }

    /// Any peer may revoke any identity: a revocation only takes away.
    fn check(&self, _peer: &Peer) -> Result<(), Reason> {
        Ok(())
    }
}

/// The peers' newest good lists.
#[derive(Debug, Default)]
pub struct Remote {
    lists: FromPeers<RevocationList>,
}

/// What brings this node's revocations to the peers': revoke these (SPIFFE
/// ID, reason), lift those.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub revoke: Vec<(String, String)>,
    pub lift: Vec<String>,
}

impl Remote {
    /// None yet; lists older than `sequences` are refused.
    pub fn new(sequences: super::Sequences) -> Self {
        Self {
            lists: FromPeers::new(sequences),
        }
    }

    /// Takes the good lists among `entries` from `peers`; returns the rest
    /// with their reasons.
    pub fn update(&mut self, entries: &[Entry], peers: &BTreeMap<NodeName, Peer>) -> Vec<Rejected> {
        self.lists.update(entries, peers)
    }

    /// What to revoke and lift here, given this node's revocations now.
    pub fn plan(&self, here: &Revoked) -> Plan {
        let mut wanted: BTreeMap<&str, &NodeName> = BTreeMap::new();
        for (node, list) in self.lists.in_force() {
            for id in list.revoked.keys() {
                wanted.entry(id).or_insert(node);
            }
        }
        Plan {
            revoke: wanted
                .iter()
                .filter(|(id, _)| !here.contains_key(**id))
                .map(|(id, node)| (id.to_string(), format!("{MESH_REASON}{node}")))
                .collect(),
            lift: here
                .iter()
                .filter(|(id, revocation)| {
                    applied_by_mesh(revocation) && !wanted.contains_key(id.as_str())
                })
                .map(|(id, _)| id.clone())
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;
    use crate::node::{NodeKey, Signed, SigningKey};

    fn peer(name: &str, key: &SigningKey) -> Peer {
        Peer {
            name: name.parse().unwrap(),
            public_key: NodeKey::generate().unwrap().public(),
            endpoint: "192.0.2.1:51820".parse().unwrap(),
            prefix: "10.0.1.0/24".parse().unwrap(),
            expires_at: SystemTime::now(),
            node_key: key.public(),
        }
    }

    fn list(node: &str, sequence: u64, ids: &[&str], key: &SigningKey) -> Entry {
        let revoked = ids
            .iter()
            .map(|id| {
                (
                    id.to_string(),
                    Revocation {
                        at: "2026-01-01T00:00:00Z".into(),
                        reason: None,
                    },
                )
            })
            .collect();
        let list = RevocationList {
            node: node.parse().unwrap(),
            sequence,
            revoked,
        };
        Entry {
            name: node.into(),
            bytes: Signed::sign(list, key).encode(),
        }
    }

    fn revoked(entries: &[(&str, Option<&str>)]) -> Revoked {
        entries
            .iter()
            .map(|(id, reason)| {
                (
                    id.to_string(),
                    Revocation {
                        at: "2026-01-01T00:00:00Z".into(),
                        reason: reason.map(str::to_owned),
                    },
                )
            })
            .collect()
    }

    const X: &str = "spiffe://test.internal/x";
    const Y: &str = "spiffe://test.internal/y";

    #[test]
    fn applies_the_peers_lists_and_lifts_what_they_lift() {
        let key = SigningKey::generate().unwrap();
        let peers = BTreeMap::from([("b".parse().unwrap(), peer("b", &key))]);
        let mut remote = Remote::default();
        assert!(
            remote
                .update(&[list("b", 1, &[X, Y], &key)], &peers)
                .is_empty()
        );
        // Y is revoked here already, by this node: only X is to do.
        let here = revoked(&[(Y, Some("mine"))]);
        assert_eq!(
            remote.plan(&here),
            Plan {
                revoke: vec![(X.into(), format!("{MESH_REASON}b"))],
                lift: vec![]
            }
        );
        // B lifts both: the mesh's X goes, this node's Y stays.
        assert!(remote.update(&[list("b", 2, &[], &key)], &peers).is_empty());
        let here = revoked(&[(X, Some("revoked on node b")), (Y, Some("mine"))]);
        assert_eq!(
            remote.plan(&here),
            Plan {
                revoke: vec![],
                lift: vec![X.into()]
            }
        );
    }

    #[test]
    fn forged_replayed_and_foreign_lists_change_nothing() {
        let key = SigningKey::generate().unwrap();
        let peers = BTreeMap::from([("b".parse().unwrap(), peer("b", &key))]);
        let mut remote = Remote::default();
        remote.update(&[list("b", 5, &[X], &key)], &peers);
        let forger = SigningKey::generate().unwrap();
        let reasons = |remote: &mut Remote, entry: Entry| -> Vec<&'static str> {
            remote
                .update(&[entry], &peers)
                .into_iter()
                .map(|r| r.reason)
                .collect()
        };
        assert_eq!(
            reasons(&mut remote, list("b", 6, &[], &forger)),
            ["bad_record_signature"]
        );
        assert_eq!(reasons(&mut remote, list("b", 4, &[], &key)), ["replayed"]);
        // A node that is no peer is not listened to.
        assert!(reasons(&mut remote, list("c", 9, &[Y], &forger)).is_empty());
        assert_eq!(remote.plan(&Revoked::new()).revoke.len(), 1);
        // B leaves: its revocations go with it.
        remote.update(&[], &BTreeMap::new());
        assert_eq!(remote.plan(&Revoked::new()), Plan::default());
        // The mesh never lifts what this node revoked itself.
        let here = revoked(&[(X, None)]);
        assert_eq!(remote.plan(&here), Plan::default());
    }

    #[test]
    fn a_node_publishes_only_its_own_revocations() {
        let dir = tempfile::tempdir().unwrap();
        let here = revoked(&[(X, None), (Y, Some("revoked on node b"))]);
        std::fs::write(
            dir.path().join(revocations::REVOCATIONS_FILE),
            serde_json::to_vec(&here).unwrap(),
        )
        .unwrap();
        let own: Vec<String> = local(dir.path()).unwrap().into_keys().collect();
        assert_eq!(own, [X]);
    }
}
