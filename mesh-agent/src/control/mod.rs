//! The agent's control socket: a Unix socket in the state folder, mode
//! 0600, on which `mesh-agent exec`, `revoke` and `unrevoke` ask the
//! running agent to act. One JSON request line, one JSON response line.
//! The agent checks each peer's credentials: root, or the socket's owner.

mod client;
mod server;

use std::{net::IpAddr, path::PathBuf};

use serde::{Deserialize, Serialize};

pub use client::request;
pub use server::{ControlServer, Peer, Pending};

/// The socket's name in the state folder.
pub const SOCKET_FILE: &str = "agent.sock";

/// The longest request line: a token is at most 8 KiB.
const MAX_REQUEST: usize = 64 * 1024;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    /// Verify `token` and bind the calling process to its identity.
    Bind { token: String },
    /// A new token for the binding of cgroup `cgroup`, which the calling
    /// process must be in.
    Refresh { cgroup: String, token: String },
    /// Revoke an identity (a SPIFFE ID).
    Revoke { id: String, reason: Option<String> },
    /// Lift a revocation.
    Unrevoke { id: String },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "kebab-case")]
pub enum Response {
    /// The calling process is bound (or its binding refreshed).
    Bound(Bound),
    /// A revocation was recorded or lifted.
    Done { message: String },
    /// Nothing was done; `reason` is a short name (a token's reason, or
    /// `permission`, `revoked`, `unknown-identity`, …).
    Refused { reason: String, message: String },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bound {
    pub identity: String,
    /// The binding's cgroup: its name (for refreshes) and folder.
    pub cgroup: String,
    pub path: PathBuf,
    pub addresses: Vec<IpAddr>,
    /// When the token expires, in seconds since 1970.
    pub expires: u64,
}

impl Response {
    pub fn refused(reason: &str, message: impl Into<String>) -> Self {
        Self::Refused {
            reason: reason.to_owned(),
            message: message.into(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("the control socket {}: {source}", path.display())]
    Socket {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("an agent already serves the control socket {}", .0.display())]
    InUse(PathBuf),
    #[error("the agent's answer is not understood: {0}")]
    Protocol(String),
}
