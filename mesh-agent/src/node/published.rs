//! What a node publishes about itself beside its record — its revocations,
//! its bindings — and how the other nodes take it. Each kind is a signed
//! document filed under the node's name in a section of its own, and is
//! believed only from a current peer, signed with the key its join token
//! names, and no older than the newest seen of it. A document that fails
//! changes nothing: the peer's last good one stays.

use std::collections::{BTreeMap, btree_map};

use super::{Entry, NodeName, Peer, Rejected, Section, Sequences, Signed, signed::Document};

/// Why a document is not taken: a short reason and the details.
pub type Reason = (&'static str, String);

/// A kind of document a node publishes about itself.
pub trait Published: Document + Clone + PartialEq {
    /// Where it is filed; a rejected one is reported as `SECTION/NODE`.
    const SECTION: Section;
    /// Whether removing a node's entry takes its last good document out of
    /// force. Bindings grant, and go with their entry; revocations only
    /// take away, and stay until the node signs a newer list or leaves.
    const REMOVAL_ENDS: bool;

    /// The node that signed it.
    fn node(&self) -> &NodeName;
    /// Higher in every document the node signs.
    fn sequence(&self) -> u64;
    /// What else it must be, coming from `peer`.
    fn check(&self, peer: &Peer) -> Result<(), Reason>;
}

/// The newest good document of each node, and whether it is in force: it
/// is while its node is a peer whose record it fits (and, where removal
/// ends it, its entry is in the store). The newest is remembered after
/// that, so that an older one written back later is refused as a replay.
#[derive(Debug)]
pub struct FromPeers<T> {
    newest: BTreeMap<NodeName, (T, bool)>,
    /// The newest sequence of each node's documents, kept across restarts.
    sequences: Sequences,
}

impl<T> Default for FromPeers<T> {
    fn default() -> Self {
        Self::new(Sequences::default())
    }
}

impl<T> FromPeers<T> {
    /// None yet; documents older than `sequences` are refused.
    pub fn new(sequences: Sequences) -> Self {
        Self {
            newest: BTreeMap::new(),
            sequences,
        }
    }
}

impl<T: Published> FromPeers<T> {
    /// Takes the good documents among `entries` from `peers`; returns the
    /// rest with their reasons. Entries of nodes that are no peers are
    /// skipped: they are not in the mesh.
    pub fn update(&mut self, entries: &[Entry], peers: &BTreeMap<NodeName, Peer>) -> Vec<Rejected> {
        // A peer's record may have changed what its documents may say.
        for (name, (document, in_force)) in &mut self.newest {
            let fits = peers
                .get(name)
                .is_some_and(|peer| document.check(peer).is_ok());
            let removed = T::REMOVAL_ENDS && !entries.iter().any(|e| e.name == name.as_str());
            if !fits || removed {
                *in_force = false;
            }
        }
        let mut rejected = Vec::new();
        for entry in entries {
            let Some(peer) = entry
                .name
                .parse::<NodeName>()
                .ok()
                .and_then(|name| peers.get(&name))
            else {
                continue;
            };
            if let Err((reason, detail)) = self.take(entry, peer) {
                rejected.push(Rejected {
                    entry: format!("{}/{}", T::SECTION.name(), entry.name),
                    reason,
                    detail,
                });
            }
        }
        self.sequences.save();
        rejected
    }

    fn take(&mut self, entry: &Entry, peer: &Peer) -> Result<(), Reason> {
        let signed =
            Signed::<T>::decode(&entry.bytes).map_err(|err| ("malformed", err.to_string()))?;
        let document = signed.verify(&peer.node_key).map_err(|_| {
            (
                "bad_record_signature",
                format!("not signed by node {}'s key", peer.name),
            )
        })?;
        if *document.node() != peer.name {
            return Err((
                "name_mismatch",
                format!("the document is node {}'s", document.node()),
            ));
        }
        document.check(peer)?;
        if let Some(newest) = self.sequences.newer_than(&peer.name, document.sequence()) {
            return Err((
                "replayed",
                format!(
                    "sequence {} is older than {newest}, the newest seen of the node",
                    document.sequence()
                ),
            ));
        }
        self.sequences.saw(&peer.name, document.sequence());
        match self.newest.entry(peer.name.clone()) {
            btree_map::Entry::Occupied(newest)
                if newest.get().0.sequence() > document.sequence()
                    || (newest.get().0.sequence() == document.sequence()
                        && newest.get().0 != *document) =>
            {
                Err((
                    "replayed",
                    format!(
                        "sequence {} is not past {} of the newest seen",
                        document.sequence(),
                        newest.get().0.sequence()
                    ),
                ))
            }
            btree_map::Entry::Occupied(mut newest) => {
                newest.insert((document.clone(), true));
                Ok(())
            }
            btree_map::Entry::Vacant(slot) => {
                slot.insert((document.clone(), true));
                Ok(())
            }
        }
    }

    /// The documents in force, by node.
    pub fn in_force(&self) -> impl Iterator<Item = (&NodeName, &T)> {
        self.newest
            .iter()
            .filter(|(_, (_, in_force))| *in_force)
            .map(|(node, (document, _))| (node, document))
    }
}
