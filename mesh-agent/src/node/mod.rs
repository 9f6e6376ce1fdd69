//! The node mesh: nodes join with a join token signed by the mesh's admin
//! and bound to the node's signing key, publish a record (name, WireGuard
//! key, endpoint, prefix, token) signed with that key to a shared store —
//! a directory or etcd — and make every other node with a valid record a
//! WireGuard peer. Records are checked by every node that reads them; a bad
//! one is logged, counted and never configured, and a store that cannot be
//! read leaves the last good state in place. Revocations made on one node
//! are published the same way and applied on every other, and so are its
//! process bindings, by which every other node classifies its addresses.
//! The admin can revoke a node before its token expires. An XDP shield can
//! guard the underlay.

mod bindings;
mod keys;
mod membership;
mod mesh;
mod name;
mod published;
mod record;
mod revocations;
mod revoked_nodes;
mod sequences;
mod shield;
mod signed;
mod signing;
mod store;
mod teardown;
pub mod token;
mod wireguard;

pub use bindings::{BindingSet, Bound, PeerBinding, PeerBindings};
pub use keys::{InvalidPublicKey, KEY_FILE, NodeKey, NodeKeyError, PublicKey};
pub use membership::{Checker, Entry, Local, Membership, Peer, Rejected};
pub use mesh::{Mesh, MeshError, MeshOptions, check};
pub use name::{InvalidNodeName, NodeName};
pub use record::{NodeRecord, SignedRecord};
pub use revoked_nodes::{REVOKED_NODES_FILE, RevokedNodes, RevokedNodesError};
pub use sequences::{Sequences, SequencesError};
pub use shield::{
    HandshakeRates, InvalidService, ShieldError, ShieldOptions, ShieldService, unpin_shield,
};
pub use signed::{DecodeError, Document, Signed};
pub use signing::{InvalidSigningKey, SIGNING_KEY_FILE, SigningKey, SigningPublicKey};
pub use store::{Section, Store, StoreError, StoreSpec, StoreSpecError, StoreWatch};
pub use teardown::{TeardownError, teardown};
pub use token::{JOIN_AUDIENCE, Join, JoinVerifier, NodeRevocation};
pub use wireguard::{Mode as WireGuardMode, WireGuardError};
