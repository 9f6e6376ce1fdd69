//! The agent's account of itself, written atomically to the state folder on
//! every change, and read by `mesh-agent status`.

use std::{
    io,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

pub const STATUS_FILE: &str = "status.json";

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentStatus {
    /// The running agent's process id; `None` once it has stopped.
    pub pid: Option<u32>,
    pub policy: PathBuf,
    /// The bpffs folder holding the pins.
    pub bpffs: PathBuf,
    /// Interfaces and the hooks on each.
    pub interfaces: Vec<(String, Vec<String>)>,
    /// The last policy applied: its summary and when (RFC 3339).
    pub applied: Option<Applied>,
    /// The errors of the last policy that was rejected, if it is still the
    /// file's content: the previous policy keeps enforcing meanwhile.
    pub rejected: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied {
    pub at: String,
    pub summary: String,
    /// Policy generations applied by this agent since it started.
    pub reloads: u64,
}

impl AgentStatus {
    pub fn path(state_dir: &Path) -> PathBuf {
        state_dir.join(STATUS_FILE)
    }

    /// Writes it whole: readers never see half.
    pub fn write(&self, state_dir: &Path) -> io::Result<()> {
        crate::state_file::write_json(&Self::path(state_dir), self)
    }

    pub fn read(state_dir: &Path) -> io::Result<Self> {
        let bytes = std::fs::read(Self::path(state_dir))?;
        serde_json::from_slice(&bytes).map_err(io::Error::other)
    }
}
