//! Where node records are shared: a directory ([`directory`]), the embedded
//! default, or etcd v3 ([`etcd`]). Both hold one entry per node and
//! [`Section`], filed under its name, and tell of changes through a
//! [`StoreWatch`].
//!
//! A store is only read, never trusted: [`super::membership`] checks every
//! entry. A store that cannot be read changes nothing — the caller keeps
//! the last good state.

mod directory;
mod etcd;

use std::{fmt, io, path::PathBuf, str::FromStr};

use futures_util::{FutureExt as _, StreamExt as _, stream::BoxStream};

pub use self::{
    directory::{DirectoryStore, watch_dirs},
    etcd::EtcdStore,
};
use super::{
    Entry, NodeName,
    signed::{MAX_BINDINGS_LEN, MAX_DOCUMENT_LEN},
};

/// Where records are kept, as `--store` names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreSpec {
    /// `dir:PATH`, or a plain path.
    Directory(PathBuf),
    /// `etcd://HOST:PORT[,HOST:PORT…][/PREFIX]`: the cluster's client
    /// endpoints, and the key prefix (`mesh` if none) under which records
    /// are `PREFIX/nodes/NAME`.
    Etcd {
        endpoints: Vec<String>,
        prefix: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreSpecError {
    #[error("`{0}`: expected etcd://HOST:PORT[,HOST:PORT…][/PREFIX]")]
    Etcd(String),
    #[error("`{0}`: unknown store; expected dir:PATH, a path, or etcd://HOST:PORT/PREFIX")]
    Unknown(String),
}

impl FromStr for StoreSpec {
    type Err = StoreSpecError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if let Some(rest) = text.strip_prefix("etcd://") {
            let (hosts, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            let endpoints: Vec<String> = hosts.split(',').map(str::to_owned).collect();
            let valid = endpoints.iter().all(|endpoint| {
                endpoint.rsplit_once(':').is_some_and(|(host, port)| {
                    !host.is_empty()
                        && !host.contains(['/', '@', '?', '#'])
                        && port.parse::<u16>().is_ok_and(|port| port != 0)
                })
            });
            let prefix = prefix.trim_matches('/');
            if !valid || prefix.contains(|c: char| c.is_whitespace() || c.is_control()) {
                return Err(StoreSpecError::Etcd(text.to_owned()));
            }
            let prefix = if prefix.is_empty() { "mesh" } else { prefix };
            return Ok(Self::Etcd {
                endpoints,
                prefix: prefix.to_owned(),
            });
        }
        let path = text.strip_prefix("dir:").unwrap_or(text);
        if path.is_empty() || (path.contains("://") && !text.starts_with("dir:")) {
            return Err(StoreSpecError::Unknown(text.to_owned()));
        }
        Ok(Self::Directory(PathBuf::from(path)))
    }
}

impl fmt::Display for StoreSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Directory(path) => write!(f, "dir:{}", path.display()),
            Self::Etcd { endpoints, prefix } => {
                write!(f, "etcd://{}/{prefix}", endpoints.join(","))
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store {}: cannot {what}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("etcd store {store}: cannot {what}")]
    Etcd {
        what: &'static str,
        store: String,
        #[source]
        source: etcd_client::Error,
    },
    #[error("etcd store {store}: {what}")]
    Lease { what: &'static str, store: String },
    #[error("store {store}: more than {limit} entries; the last good state stays")]
    TooMany { store: String, limit: usize },
}

/// What a store keeps, each in a section of its own, by node name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Section {
    /// Node records; on etcd, on the node's lease.
    Nodes,
    /// Each node's revocations; they outlive their node's lease.
    Revocations,
    /// Each node's process bindings; on etcd, on the node's lease, as they
    /// grant what the record's node may send.
    Bindings,
    /// The admin's revocations of nodes, by the revoked node's name; on
    /// no lease.
    RevokedNodes,
}

impl Section {
    pub const ALL: [Self; 4] = [
        Self::Nodes,
        Self::Revocations,
        Self::Bindings,
        Self::RevokedNodes,
    ];

    /// The section's folder or key segment.
    pub fn name(self) -> &'static str {
        match self {
            Self::Nodes => "nodes",
            Self::Revocations => "revocations",
            Self::Bindings => "bindings",
            Self::RevokedNodes => "revoked-nodes",
        }
    }

    /// The longest entry of the section that is read whole: a longer one is
    /// read as its first bytes past this, to be rejected, not skipped unseen.
    pub fn max_len(self) -> usize {
        match self {
            Self::Nodes | Self::Revocations | Self::RevokedNodes => MAX_DOCUMENT_LEN,
            Self::Bindings => MAX_BINDINGS_LEN,
        }
    }
}

/// Most entries a store is read with: far beyond any mesh, and a bound on
/// what a flooded store costs.
pub const MAX_ENTRIES: usize = 10_000;

/// An open store.
pub enum Store {
    Directory(DirectoryStore),
    Etcd(Box<EtcdStore>),
}

impl Store {
    /// Opens the store `spec` names (a directory is made if missing).
    pub async fn open(spec: &StoreSpec) -> Result<Self, StoreError> {
        Ok(match spec {
            StoreSpec::Directory(dir) => Self::Directory(DirectoryStore::open(dir)?),
            StoreSpec::Etcd { endpoints, prefix } => {
                Self::Etcd(Box::new(EtcdStore::connect(endpoints, prefix).await?))
            }
        })
    }

    /// Writes this node's entry in `section`, replacing its previous one
    /// at once.
    pub async fn publish(
        &mut self,
        section: Section,
        name: &NodeName,
        bytes: &[u8],
    ) -> Result<(), StoreError> {
        match self {
            Self::Directory(store) => store.publish(section, name, bytes),
            Self::Etcd(store) => store.publish(section, name, bytes).await,
        }
    }

    /// Every entry of `section`, by name.
    pub async fn read(&mut self, section: Section) -> Result<Vec<Entry>, StoreError> {
        match self {
            Self::Directory(store) => store.read(section),
            Self::Etcd(store) => store.read(section).await,
        }
    }

    /// Tells of changes to any entry from now on.
    pub async fn watch(&mut self) -> Result<StoreWatch, StoreError> {
        match self {
            Self::Directory(store) => store.watch(),
            Self::Etcd(store) => store.watch().await,
        }
    }

    /// Keeps this node's entry alive where the store ages entries out (on
    /// etcd, its lease); an entry that aged out is published again by the
    /// next sync, which finds it missing.
    pub async fn keep_alive(&mut self) -> Result<(), StoreError> {
        match self {
            Self::Directory(_) => Ok(()),
            Self::Etcd(store) => store.keep_alive().await,
        }
    }
}

/// Changes to a store (or a watched folder): each item is one or more.
pub struct StoreWatch {
    events: BoxStream<'static, io::Result<()>>,
}

impl StoreWatch {
    fn new(events: BoxStream<'static, io::Result<()>>) -> Self {
        Self { events }
    }

    /// Waits for the next change.
    pub async fn changed(&mut self) -> io::Result<()> {
        match self.events.next().await {
            Some(event) => event,
            None => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the watch ended",
            )),
        }
    }

    /// Discards changes already queued: one read covers them all.
    pub fn drain(&mut self) {
        while let Some(Some(_)) = self.events.next().now_or_never() {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_store_names() {
        assert_eq!(
            "dir:/srv/mesh".parse(),
            Ok(StoreSpec::Directory("/srv/mesh".into()))
        );
        assert_eq!(
            "/srv/mesh".parse(),
            Ok(StoreSpec::Directory("/srv/mesh".into()))
        );
        let etcd = |endpoints: &[&str], prefix: &str| StoreSpec::Etcd {
            endpoints: endpoints.iter().map(|e| e.to_string()).collect(),
            prefix: prefix.into(),
        };
        assert_eq!(
            "etcd://127.0.0.1:2379/mesh/prod".parse(),
            Ok(etcd(&["127.0.0.1:2379"], "mesh/prod"))
        );
        assert_eq!(
            "etcd://a:2379,b:2379".parse(),
            Ok(etcd(&["a:2379", "b:2379"], "mesh"))
        );
        assert_eq!(
            etcd(&["a:1", "b:2"], "x").to_string().parse(),
            Ok(etcd(&["a:1", "b:2"], "x"))
        );
        for bad in [
            "etcd://",
            "etcd://host",
            "etcd://host:0/x",
            "etcd://a:1,/x",
            "etcd://u@h:1/x",
            "s3://bucket",
        ] {
            assert!(bad.parse::<StoreSpec>().is_err(), "{bad}");
        }
    }
}
