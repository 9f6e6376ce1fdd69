//! Which records of the store make peers. Every record is untrusted: it
//! becomes a peer only if its join token is signed by the admin trust
//! bundle and current, names the node the record is for, and grants the
//! record's prefix; the record is signed with the node key the token names,
//! and is not older than the newest one seen of the node; the prefix lies in
//! the mesh's range and overlaps no other node's; and its key is no other
//! node's. Everything else is rejected with a reason, and never configured.
//!
//! An entry that is not a newer signed record of its node — garbage, a
//! forgery, a replay — changes nothing about that node: the peer of its
//! newest good record stays while that record's token is current. Only the
//! node itself, by signing a newer record, or the entry's removal, changes
//! it; and a removed node stays removed until it signs a newer record.

use std::{collections::BTreeMap, net::SocketAddr, time::SystemTime};

use ipnet::IpNet;

use super::{
    Join, JoinVerifier, NodeName, NodeRecord, PublicKey, RevokedNodes, Sequences, SignedRecord,
    SigningPublicKey,
};

/// A checked record: a node to make a WireGuard peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub name: NodeName,
    pub public_key: PublicKey,
    pub endpoint: SocketAddr,
    pub prefix: IpNet,
    /// When its join token expires: it stops being a peer then.
    pub expires_at: SystemTime,
    /// The key its join token binds it to: what it signs is its.
    pub node_key: SigningPublicKey,
}

/// A store entry that was not made a peer, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    /// The name the store files the entry under.
    pub entry: String,
    /// A short, stable name of the reason, for logs and metrics.
    pub reason: &'static str,
    pub detail: String,
}

/// One store entry: the name it is filed under and its bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub name: String,
    pub bytes: Vec<u8>,
}

#[derive(Debug, Default)]
pub struct Membership {
    /// By name.
    pub peers: BTreeMap<NodeName, Peer>,
    pub rejected: Vec<Rejected>,
}

/// This node, as the checks need it: its own prefix and key are never
/// another node's.
#[derive(Debug, Clone)]
pub struct Local {
    pub name: NodeName,
    pub prefix: IpNet,
    pub public_key: PublicKey,
}

pub struct Checker {
    verifier: JoinVerifier,
    /// Nodes the admin revoked: their records are refused.
    revoked: RevokedNodes,
    /// The newest record sequence of each node, kept across restarts.
    sequences: Sequences,
    /// The mesh's address range: every node's prefix lies in it.
    mesh: IpNet,
    /// By node, its newest record whose signature checked, and the peer it
    /// made if it passed the other checks too.
    newest: BTreeMap<NodeName, (NodeRecord, Option<Peer>)>,
}

/// Why an entry is not a peer: a short reason and the details.
type Reason = (&'static str, String);

/// Why an entry is not a peer; `standing` is the node's peer that stays
/// regardless, from its newest good record.
struct Refusal {
    reason: Reason,
    standing: Option<Box<Peer>>,
}

impl Checker {
    pub fn new(
        verifier: JoinVerifier,
        mesh: IpNet,
        revoked: RevokedNodes,
        sequences: Sequences,
    ) -> Self {
        Self {
            verifier,
            revoked,
            sequences,
            mesh,
            newest: BTreeMap::new(),
        }
    }

    /// Checks this node's own join token: the start fails on any error.
    pub fn check_own(
        &self,
        token: &str,
        now: SystemTime,
    ) -> Result<super::Join, crate::identity::TokenError> {
        self.verifier.verify(token, now)
    }

    /// The revocation of `join`'s node that takes it away, if one is kept.
    pub fn revoking(&self, join: &Join) -> Option<&super::NodeRevocation> {
        self.revoked.revoking(join)
    }

    /// Takes the revocations of nodes among `entries` (see
    /// [`RevokedNodes::update`]); the next [`Checker::check`] applies them.
    pub fn update_revoked(&mut self, entries: &[Entry], now: SystemTime) -> Vec<Rejected> {
        self.revoked.update(entries, &self.verifier, now)
    }

    /// The peers among `entries`, and the rest with their reasons. The
    /// entry filed under `local`'s name is this node's own and skipped.
    pub fn check(&mut self, entries: &[Entry], local: &Local, now: SystemTime) -> Membership {
        let mut membership = Membership::default();
        let mut candidates = Vec::new();
        for entry in entries.iter().filter(|e| e.name != local.name.as_str()) {
            match self.check_one(entry, local, now) {
                Ok(peer) => candidates.push(peer),
                Err(Refusal {
                    reason: (reason, detail),
                    standing,
                }) => {
                    membership.rejected.push(Rejected {
                        entry: entry.name.clone(),
                        reason,
                        detail,
                    });
                    candidates.extend(standing.filter(|peer| peer.expires_at > now).map(|p| *p));
                }
            }
        }
        // A node whose entry is gone has left: nothing written later under
        // its name brings its peer back, short of a newer record.
        for (name, (_, peer)) in &mut self.newest {
            if !entries.iter().any(|e| e.name == name.as_str()) {
                *peer = None;
            }
        }
        // Two nodes claiming the same addresses or the same key: neither is
        // believed, as there is no telling which is right.
        let clash = |a: &Peer, b: &Peer| {
            if overlap(a.prefix, b.prefix) {
                Some((
                    "prefix_overlap",
                    format!("{} overlaps {} of node {}", a.prefix, b.prefix, b.name),
                ))
            } else if a.public_key == b.public_key {
                Some(("key_reused", format!("node {} has the same key", b.name)))
            } else {
                None
            }
        };
        for (i, peer) in candidates.iter().enumerate() {
            let found = candidates
                .iter()
                .enumerate()
                .filter(|(j, other)| *j != i && other.name != peer.name)
                .find_map(|(_, other)| clash(peer, other));
            match found {
                Some((reason, detail)) => membership.rejected.push(Rejected {
                    entry: peer.name.to_string(),
                    reason,
                    detail,
                }),
                None => {
                    membership.peers.insert(peer.name.clone(), peer.clone());
                }
            }
        }
        self.sequences.save();
        membership
    }

    fn check_one(
        &mut self,
        entry: &Entry,
        local: &Local,
        now: SystemTime,
    ) -> Result<Peer, Refusal> {
        // Until the record proves to be a newer one of its node, the peer
        // of the node's newest record stands.
        let standing = entry
            .name
            .parse::<NodeName>()
            .ok()
            .and_then(|name| self.newest.get(&name))
            .and_then(|(_, peer)| peer.clone().map(Box::new));
        let (record, join) = self
            .signed_record(entry, now)
            .map_err(|reason| Refusal { reason, standing })?;
        self.sequences.saw(&record.name, record.sequence);
        let checked = self.check_record(&record, &join, local);
        self.newest.insert(
            record.name.clone(),
            (record, checked.as_ref().ok().cloned()),
        );
        checked.map_err(|reason| Refusal {
            reason,
            standing: None,
        })
    }

    /// The entry's record if it is one signed by the key its join token
    /// binds to the node the entry is filed under, and no older than the
    /// newest seen of that node.
    fn signed_record(&self, entry: &Entry, now: SystemTime) -> Result<(NodeRecord, Join), Reason> {
        let signed =
            SignedRecord::decode(&entry.bytes).map_err(|e| ("malformed", e.to_string()))?;
        let claimed = signed.unverified();
        if claimed.name.as_str() != entry.name {
            return Err((
                "name_mismatch",
                format!("the record is for node {}", claimed.name),
            ));
        }
        let join = self
            .verifier
            .verify(&claimed.join_token, now)
            .map_err(|err| (err.reason(), format!("join token: {err}")))?;
        if join.node != claimed.name {
            return Err((
                "name_mismatch",
                format!("the join token is for node {}", join.node),
            ));
        }
        let record = signed.verify(&join.node_key).map_err(|_| {
            (
                "bad_record_signature",
                format!(
                    "not signed by the node key {} of its join token",
                    join.node_key
                ),
            )
        })?;
        if let Some((newest, _)) = self.newest.get(&record.name)
            && record != newest
            && record.sequence <= newest.sequence
        {
            return Err((
                "replayed",
                format!(
                    "sequence {} is not past {} of the newest record seen",
                    record.sequence, newest.sequence
                ),
            ));
        }
        if let Some(newest) = self.sequences.newer_than(&record.name, record.sequence) {
            return Err((
                "replayed",
                format!(
                    "sequence {} is older than {newest}, the newest record seen of the node",
                    record.sequence
                ),
            ));
        }
        Ok((record.clone(), join))
    }

    /// The checks of a record that is its node's own.
    fn check_record(
        &self,
        record: &NodeRecord,
        join: &Join,
        local: &Local,
    ) -> Result<Peer, Reason> {
        let refuse = |reason, detail| Err((reason, detail));
        if let Some(revocation) = self.revoked.revoking(join) {
            return refuse("revoked", describe_revocation(revocation));
        }
        if record.prefix != record.prefix.trunc() {
            return refuse("malformed", format!("{} has host bits set", record.prefix));
        }
        if !contains(join.prefix, record.prefix) {
            return refuse(
                "prefix_not_granted",
                format!(
                    "{} is not within {}, which the join token grants",
                    record.prefix, join.prefix
                ),
            );
        }
        if !contains(self.mesh, record.prefix) {
            return refuse(
                "prefix_outside_mesh",
                format!("{} is not within the mesh's {}", record.prefix, self.mesh),
            );
        }
        if overlap(record.prefix, local.prefix) {
            return refuse(
                "prefix_overlap",
                format!("{} overlaps this node's {}", record.prefix, local.prefix),
            );
        }
        if record.public_key == local.public_key {
            return refuse("key_reused", "this node's own key".into());
        }
        let endpoint = record.endpoint;
        if endpoint.ip().is_unspecified() || endpoint.ip().is_multicast() || endpoint.port() == 0 {
            return refuse("bad_endpoint", format!("{endpoint} is not reachable"));
        }
        Ok(Peer {
            name: record.name.clone(),
            public_key: record.public_key,
            endpoint,
            prefix: record.prefix,
            expires_at: join.expires_at,
            node_key: join.node_key,
        })
    }
}

/// When the node was revoked, and why.
pub fn describe_revocation(revocation: &super::NodeRevocation) -> String {
    let at = time::OffsetDateTime::from(revocation.revoked_at)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| "?".into());
    match &revocation.reason {
        Some(reason) => format!("node {} revoked at {at}: {reason}", revocation.node),
        None => format!("node {} revoked at {at}", revocation.node),
    }
}

/// Whether `outer` holds all of `inner` (same address family).
fn contains(outer: IpNet, inner: IpNet) -> bool {
    outer.prefix_len() <= inner.prefix_len() && outer.contains(&inner.network())
}

fn overlap(a: IpNet, b: IpNet) -> bool {
    contains(a, b) || contains(b, a)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::{
        identity::{Algorithm, IssuerKey, TrustBundle},
        node::{NodeKey, SigningKey, token},
    };

    const HOUR: Duration = Duration::from_secs(3600);

    struct Fixture {
        admin: IssuerKey,
        checker: Checker,
        local: Local,
        now: SystemTime,
    }

    fn fixture() -> Fixture {
        let admin = IssuerKey::generate(Algorithm::EdDsa, Some("admin".into())).unwrap();
        Fixture {
            checker: checker(&admin, Sequences::default()),
            admin,
            local: Local {
                name: "local".parse().unwrap(),
                prefix: "10.100.0.0/24".parse().unwrap(),
                public_key: NodeKey::generate().unwrap().public(),
            },
            now: SystemTime::now(),
        }
    }

    /// A node's signing key and the record it signs.
    struct Node {
        key: SigningKey,
        record: NodeRecord,
    }

    impl Node {
        fn entry(&self) -> Entry {
            Entry {
                name: self.record.name.to_string(),
                bytes: SignedRecord::sign(self.record.clone(), &self.key).encode(),
            }
        }
    }

    fn checker(admin: &IssuerKey, sequences: Sequences) -> Checker {
        let bundle = TrustBundle::from_json(admin.bundle_json().as_bytes()).unwrap();
        Checker::new(
            JoinVerifier::new(bundle),
            "10.100.0.0/16".parse().unwrap(),
            RevokedNodes::default(),
            sequences,
        )
    }

    impl Fixture {
        /// Node `name`, holding a token from `admin` that grants `granted`
        /// for `ttl` from `issued`, whose record claims `claimed`.
        fn node_by(
            &self,
            admin: &IssuerKey,
            name: &str,
            granted: &str,
            claimed: &str,
            (issued, ttl): (SystemTime, Duration),
        ) -> Node {
            let node: NodeName = name.parse().unwrap();
            let key = SigningKey::generate().unwrap();
            let join_token = token::issue(
                admin,
                &node,
                granted.parse().unwrap(),
                &key.public(),
                ttl,
                issued,
            )
            .unwrap();
            let record = NodeRecord {
                name: node,
                public_key: NodeKey::generate().unwrap().public(),
                endpoint: "192.0.2.7:51820".parse().unwrap(),
                prefix: claimed.parse().unwrap(),
                sequence: 1,
                join_token,
            };
            Node { key, record }
        }

        fn node(&self, name: &str, granted: &str, claimed: &str) -> Node {
            self.node_by(&self.admin, name, granted, claimed, (self.now, HOUR))
        }

        fn entry(&self, name: &str, granted: &str, claimed: &str) -> Entry {
            self.node(name, granted, claimed).entry()
        }

        fn reasons(&mut self, entries: &[Entry]) -> (Vec<String>, Vec<(String, &'static str)>) {
            let membership = self.checker.check(entries, &self.local, self.now);
            let peers = membership.peers.keys().map(|n| n.to_string()).collect();
            let mut rejected: Vec<_> = membership
                .rejected
                .into_iter()
                .map(|r| (r.entry, r.reason))
                .collect();
            rejected.sort();
            (peers, rejected)
        }
    }

    #[test]
    fn valid_records_make_peers() {
        let mut f = fixture();
        let entries = [
            f.entry("b", "10.100.1.0/24", "10.100.1.0/24"),
            f.entry("c", "10.100.2.0/23", "10.100.2.0/24"),
        ];
        assert_eq!(f.reasons(&entries), (vec!["b".into(), "c".into()], vec![]));
    }

    #[test]
    fn bad_records_are_rejected_with_their_reason() {
        let mut f = fixture();
        let forger = IssuerKey::generate(Algorithm::EdDsa, Some("admin".into())).unwrap();
        let forged = f.node_by(
            &forger,
            "forged",
            "10.100.9.0/24",
            "10.100.9.0/24",
            (f.now, HOUR),
        );
        let mut misfiled = f.entry("misfiled", "10.100.8.0/24", "10.100.8.0/24");
        misfiled.name = "other".into();
        let expired = f.node_by(
            &f.admin,
            "expired",
            "10.100.7.0/24",
            "10.100.7.0/24",
            (f.now - HOUR, Duration::from_secs(1)),
        );
        let entries = [
            forged.entry(),
            misfiled,
            expired.entry(),
            f.entry("greedy", "10.100.6.0/24", "10.100.6.0/23"),
            f.entry("outside", "10.200.0.0/24", "10.200.0.0/24"),
            f.entry("mine", "10.100.0.0/25", "10.100.0.0/25"),
            Entry {
                name: "junk".into(),
                bytes: b"{".to_vec(),
            },
        ];
        assert_eq!(
            f.reasons(&entries),
            (
                vec![],
                vec![
                    ("expired".into(), "expired"),
                    ("forged".into(), "bad_signature"),
                    ("greedy".into(), "prefix_not_granted"),
                    ("junk".into(), "malformed"),
                    ("mine".into(), "prefix_overlap"),
                    ("other".into(), "name_mismatch"),
                    ("outside".into(), "prefix_outside_mesh"),
                ]
            )
        );
    }

    #[test]
    fn a_stolen_token_signs_nothing() {
        let mut f = fixture();
        let b = f.node("b", "10.100.1.0/24", "10.100.1.0/24");
        // B's token with another WireGuard key, signed by whoever took it.
        let mut stolen = b.record.clone();
        stolen.public_key = NodeKey::generate().unwrap().public();
        stolen.sequence += 1;
        let thief = Node {
            key: SigningKey::generate().unwrap(),
            record: stolen,
        };
        assert_eq!(
            f.reasons(&[thief.entry()]),
            (vec![], vec![("b".into(), "bad_record_signature")])
        );
    }

    #[test]
    fn a_replayed_record_changes_nothing() {
        let mut f = fixture();
        let mut b = f.node("b", "10.100.1.0/24", "10.100.1.0/24");
        let old = b.entry();
        b.record.public_key = NodeKey::generate().unwrap().public();
        b.record.sequence = 2;
        let new = b.entry();
        let key_of = |f: &mut Fixture, entry: &Entry| {
            let membership = f
                .checker
                .check(std::slice::from_ref(entry), &f.local, f.now);
            membership.peers.get(&b.record.name).map(|p| p.public_key)
        };
        assert_eq!(key_of(&mut f, &new), Some(b.record.public_key));
        // The older record, written back: rejected, and the newer one's
        // peer stays; so it does for garbage under B's name.
        assert_eq!(
            f.reasons(std::slice::from_ref(&old)),
            (vec!["b".into()], vec![("b".into(), "replayed")])
        );
        assert_eq!(key_of(&mut f, &old), Some(b.record.public_key));
        let junk = Entry {
            name: "b".into(),
            bytes: b"{".to_vec(),
        };
        assert_eq!(key_of(&mut f, &junk), Some(b.record.public_key));
        // The node's own newer record takes over; its removal ends it.
        b.record.public_key = NodeKey::generate().unwrap().public();
        b.record.sequence = 3;
        assert_eq!(key_of(&mut f, &b.entry()), Some(b.record.public_key));
        assert_eq!(f.reasons(&[]), (vec![], vec![]));
        assert_eq!(f.reasons(&[new]), (vec![], vec![("b".into(), "replayed")]));
    }

    #[test]
    fn a_restarted_checker_still_refuses_older_records() {
        let state = tempfile::tempdir().unwrap();
        let remembered = || Sequences::load(state.path(), crate::node::Section::Nodes).unwrap();
        let mut f = fixture();
        f.checker = checker(&f.admin, remembered());
        let mut b = f.node("b", "10.100.1.0/24", "10.100.1.0/24");
        let old = b.entry();
        b.record.sequence = 2;
        let new = b.entry();
        assert_eq!(
            f.reasons(std::slice::from_ref(&new)),
            (vec!["b".into()], vec![])
        );
        // A new agent, with the same state folder.
        f.checker = checker(&f.admin, remembered());
        assert_eq!(
            f.reasons(std::slice::from_ref(&old)),
            (vec![], vec![("b".into(), "replayed")])
        );
        assert_eq!(f.reasons(&[new]), (vec!["b".into()], vec![]));
    }

    #[test]
    fn clashing_nodes_are_both_rejected() {
        let mut f = fixture();
        let entries = [
            f.entry("b", "10.100.1.0/24", "10.100.1.0/24"),
            f.entry("c", "10.100.1.0/25", "10.100.1.0/25"),
            f.entry("d", "10.100.3.0/24", "10.100.3.0/24"),
        ];
        assert_eq!(
            f.reasons(&entries),
            (
                vec!["d".into()],
                vec![
                    ("b".into(), "prefix_overlap"),
                    ("c".into(), "prefix_overlap")
                ]
            )
        );
    }
}
