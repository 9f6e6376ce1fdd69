//! Revoked identities, kept in the state folder so that a restarted agent
//! enforces them too.

use std::{
    collections::BTreeMap,
    io,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

/// The revocations' file in the state folder.
pub const REVOCATIONS_FILE: &str = "revoked.json";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocation {
    /// When (RFC 3339).
    pub at: String,
    pub reason: Option<String>,
}

/// SPIFFE ID → revocation, as on disk.
pub type Revoked = BTreeMap<String, Revocation>;

pub struct Revocations {
    path: PathBuf,
    revoked: Revoked,
}

impl Revocations {
    /// Reads the file in `state_dir`; none there means none revoked.
    pub fn load(state_dir: &Path) -> io::Result<Self> {
        let path = state_dir.join(REVOCATIONS_FILE);
        Ok(Self {
            revoked: read(state_dir)?,
            path,
        })
    }

    pub fn revoked(&self) -> &Revoked {
        &self.revoked
    }

    pub fn contains(&self, id: &str) -> bool {
        self.revoked.contains_key(id)
    }

    /// Adds or replaces a revocation, on disk first.
    pub fn insert(&mut self, id: &str, revocation: Revocation) -> io::Result<()> {
        let mut next = self.revoked.clone();
        next.insert(id.to_owned(), revocation);
        self.save(next)
    }

    /// Lifts a revocation; `false` if there was none.
    pub fn remove(&mut self, id: &str) -> io::Result<bool> {
        let mut next = self.revoked.clone();
        let found = next.remove(id).is_some();
        self.save(next)?;
        Ok(found)
    }

    fn save(&mut self, revoked: Revoked) -> io::Result<()> {
        crate::state_file::write_json(&self.path, &revoked)?;
        self.revoked = revoked;
        Ok(())
    }
}

/// The revocations recorded in `state_dir`, for `status`.
pub fn read(state_dir: &Path) -> io::Result<Revoked> {
    crate::state_file::read_json(&state_dir.join(REVOCATIONS_FILE))
}
