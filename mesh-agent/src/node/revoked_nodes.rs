//! Nodes the admin revoked (`mesh-agent node revoke`): revocations signed
//! with an admin key, filed in the store's `revoked-nodes` section under
//! the revoked node's name. Each is checked against the admin bundle like
//! a join token. A good one is kept, in memory and in
//! `STATE_DIR/revoked-nodes.json`, until it expires, so removing it from
//! the store lifts nothing; meanwhile no join token of that node issued at
//! or before it admits the node. A new token, issued later, does.

use std::{
    collections::BTreeMap,
    io,
    path::{Path, PathBuf},
    time::SystemTime,
};

use super::{Entry, Join, JoinVerifier, NodeName, Rejected, Section, token::NodeRevocation};
use crate::state_file::{read_json, write_json};

/// The kept revocations, in the state folder.
pub const REVOKED_NODES_FILE: &str = "revoked-nodes.json";

#[derive(Debug, thiserror::Error)]
#[error("{}: cannot read the revoked nodes", path.display())]
pub struct RevokedNodesError {
    path: PathBuf,
    #[source]
    source: io::Error,
}

/// By node, the newest good revocation and the token that states it.
#[derive(Debug, Default)]
pub struct RevokedNodes {
    /// Where they are kept; nowhere if `None`.
    path: Option<PathBuf>,
    newest: BTreeMap<NodeName, (NodeRevocation, String)>,
}

impl RevokedNodes {
    /// The revocations kept in `state_dir` that still check out against
    /// `verifier` at `now`; none if there is no file yet.
    pub fn load(
        state_dir: &Path,
        verifier: &JoinVerifier,
        now: SystemTime,
    ) -> Result<Self, RevokedNodesError> {
        let path = state_dir.join(REVOKED_NODES_FILE);
        let mut revoked = Self {
            path: Some(path.clone()),
            newest: BTreeMap::new(),
        };
        let tokens: Vec<String> = read_json(&path).map_err(|source| RevokedNodesError {
            path: path.clone(),
            source,
        })?;
        for token in tokens {
            // One that expired, or whose key left the bundle, is dropped.
            if let Ok(revocation) = verifier.verify_revocation(&token, now) {
                revoked.keep(revocation, token);
            }
        }
        Ok(revoked)
    }

    /// Takes the good revocations among `entries` (the store's section),
    /// forgets the expired ones, and keeps the result if it changed;
    /// returns the entries that are no good revocation, with their reasons.
    pub fn update(
        &mut self,
        entries: &[Entry],
        verifier: &JoinVerifier,
        now: SystemTime,
    ) -> Vec<Rejected> {
        let mut changed = false;
        let before = self.newest.len();
        self.newest
            .retain(|_, (revocation, _)| revocation.expires_at > now);
        changed |= self.newest.len() != before;
        let mut rejected = Vec::new();
        for entry in entries {
            let reject = |reason, detail| Rejected {
                entry: format!("{}/{}", Section::RevokedNodes.name(), entry.name),
                reason,
                detail,
            };
            let Ok(token) = std::str::from_utf8(&entry.bytes) else {
                rejected.push(reject("malformed", "not UTF-8".into()));
                continue;
            };
            let token = token.trim();
            match verifier.verify_revocation(token, now) {
                Ok(revocation) if revocation.node.as_str() != entry.name => {
                    rejected.push(reject(
                        "name_mismatch",
                        format!("the revocation is of node {}", revocation.node),
                    ));
                }
                Ok(revocation) => changed |= self.keep(revocation, token.to_owned()),
                Err(err) => rejected.push(reject(err.reason(), format!("revocation: {err}"))),
            }
        }
        if changed {
            self.save();
        }
        rejected
    }

    /// The revocation that takes away what `join` grants, if any.
    pub fn revoking(&self, join: &Join) -> Option<&NodeRevocation> {
        self.newest
            .get(&join.node)
            .map(|(revocation, _)| revocation)
            .filter(|revocation| revocation.revokes(join))
    }

    /// Keeps `revocation` if it is newer than the one kept of its node.
    fn keep(&mut self, revocation: NodeRevocation, token: String) -> bool {
        let newer = self
            .newest
            .get(&revocation.node)
            .is_none_or(|(kept, _)| kept.revoked_at < revocation.revoked_at);
        if newer {
            self.newest
                .insert(revocation.node.clone(), (revocation, token));
        }
        newer
    }

    /// Writes the kept revocations; a failure is logged, and they are
    /// enforced from memory meanwhile.
    fn save(&self) {
        let Some(path) = &self.path else {
            return;
        };
        let tokens: Vec<&String> = self.newest.values().map(|(_, token)| token).collect();
        if let Err(err) = write_json(path, &tokens) {
            tracing::error!(
                path = %path.display(),
                error = %err,
                "cannot keep the revoked nodes; they are enforced until the agent stops"
            );
        }
    }
}
