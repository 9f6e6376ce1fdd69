//! What the mesh leaves when the agent stops, on purpose: a kernel
//! WireGuard interface (a userspace one ends with the agent) and the routes
//! into it, with the blackhole under the mesh's range, so that nothing for
//! another node leaves in clear meanwhile. The agent notes the interface's
//! name in its state folder; `mesh-agent teardown` removes them.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use super::wireguard::{Links, WireGuardError};

/// The mesh interface's name, in the state folder.
const FILE: &str = "mesh-interface";

#[derive(Debug, thiserror::Error)]
#[error("{}: cannot {what}", path.display())]
pub struct StateError {
    what: &'static str,
    path: PathBuf,
    #[source]
    source: io::Error,
}

#[derive(Debug, thiserror::Error)]
pub enum TeardownError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error("removing the mesh interface")]
    WireGuard(#[from] WireGuardError),
}

/// Notes that this node's mesh interface is `name`.
pub(super) fn remember(state_dir: &Path, name: &str) -> Result<(), StateError> {
    let path = state_dir.join(FILE);
    fs::write(&path, name).map_err(|source| StateError {
        what: "write",
        path,
        source,
    })
}

/// Removes the mesh interface the agent with `state_dir` made, if it is
/// still there, and the routes it made. Its name, if there was one.
pub async fn teardown(state_dir: &Path) -> Result<Option<String>, TeardownError> {
    let path = state_dir.join(FILE);
    let name = match fs::read_to_string(&path) {
        Ok(name) => name.trim().to_owned(),
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(StateError {
                what: "read",
                path,
                source,
            }
            .into());
        }
    };
    Links::new()?.remove(&name).await?;
    fs::remove_file(&path).map_err(|source| StateError {
        what: "remove",
        path,
        source,
    })?;
    Ok(Some(name))
}
