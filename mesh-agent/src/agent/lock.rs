//! One agent per bpffs folder: an exclusive flock on the pin root, held for
//! the agent's life and released by the kernel when it dies, however it dies.

use std::{fs::File, io, path::Path};

use nix::fcntl::{Flock, FlockArg};

/// The held lock; dropping it releases it.
pub struct AgentLock {
    _lock: Flock<File>,
}

impl AgentLock {
    /// Takes the lock on `root` (a folder), or says who holds it.
    pub fn take(root: &Path) -> Result<Self, LockError> {
        let dir = File::open(root).map_err(|source| LockError::Open {
            path: root.display().to_string(),
            source,
        })?;
        match Flock::lock(dir, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => Ok(Self { _lock: lock }),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => Err(LockError::Held {
                path: root.display().to_string(),
            }),
            Err((_, errno)) => Err(LockError::Open {
                path: root.display().to_string(),
                source: io::Error::from(errno),
            }),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("another mesh-agent is running on {path}: stop it first (see `mesh-agent status`)")]
    Held { path: String },
    #[error("locking {path}")]
    Open {
        path: String,
        #[source]
        source: io::Error,
    },
}
