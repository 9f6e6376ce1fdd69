//! The audit log of process bindings: one JSON line per bind, refresh,
//! expiry, release, revocation and rejected token, appended to a file the
//! agent alone may read.

use std::{
    fs::{File, OpenOptions},
    io::{self, Write as _},
    net::IpAddr,
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};
use time::{OffsetDateTime, format_description::well_known::Rfc3339};

/// The audit log's name in the state folder.
pub const AUDIT_FILE: &str = "audit.jsonl";

/// What happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AuditKind {
    /// A token was accepted and a process bound.
    Bind,
    /// A bound process presented a new token.
    Refresh,
    /// A binding's token expired.
    Expire,
    /// A binding's processes have all exited.
    Release,
    /// A binding ended because its identity left the policy.
    Unbind,
    /// An identity was revoked, or a revocation lifted.
    Revoke,
    Unrevoke,
    /// A token was refused.
    Reject,
}

/// One line of the log. `identity` is the SPIFFE ID (for a rejected token,
/// the one it claims, if it could be read); `cgroup` the binding's folder.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEvent {
    pub time: String,
    pub event: AuditKind,
    pub identity: Option<String>,
    pub pid: Option<u32>,
    pub cgroup: Option<PathBuf>,
    pub addresses: Vec<IpAddr>,
    pub reason: Option<String>,
}

impl AuditEvent {
    /// An event of now, with nothing but its kind and identity filled in.
    pub fn new(event: AuditKind, identity: Option<&str>) -> Self {
        Self {
            time: OffsetDateTime::now_utc()
                .format(&Rfc3339)
                .unwrap_or_else(|_| "unknown".to_owned()),
            event,
            identity: identity.map(str::to_owned),
            pid: None,
            cgroup: None,
            addresses: Vec::new(),
            reason: None,
        }
    }

    pub fn reason(mut self, reason: impl Into<String>) -> Self {
        self.reason = Some(reason.into());
        self
    }
}

pub struct AuditLog {
    file: File,
    path: PathBuf,
}

impl AuditLog {
    /// Opens the log for appending, made with mode 0600 if missing.
    pub fn open(path: &Path) -> io::Result<Self> {
        let file = OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .open(path)?;
        Ok(Self {
            file,
            path: path.to_owned(),
        })
    }

    /// Appends one event, and logs it. A failed write is logged, not
    /// fatal: the binding it records has happened either way.
    pub fn record(&mut self, event: &AuditEvent) {
        tracing::info!(
            event = ?event.event,
            identity = event.identity.as_deref().unwrap_or("-"),
            pid = event.pid,
            cgroup = event.cgroup.as_ref().map(|p| p.display().to_string()),
            reason = event.reason.as_deref(),
            "audit"
        );
        let written = serde_json::to_vec(event)
            .map_err(io::Error::other)
            .and_then(|mut line| {
                line.push(b'\n');
                self.file.write_all(&line)
            });
        if let Err(err) = written {
            tracing::error!(path = %self.path.display(), error = %err, "writing the audit log");
        }
    }
}
