//! The validated policy. Only [`super::parse`] builds one from a file, and
//! every reference in it is resolved: grants hold indices into
//! [`Policy::identities`] and [`Policy::services`].

use std::{collections::BTreeMap, fmt};

use ipnet::IpNet;
use time::OffsetDateTime;

use super::{
    ports::PortSet,
    rate::Rate,
    spiffe::{SpiffeId, TrustDomain},
};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub trust_domain: TrustDomain,
    pub identities: Vec<Identity>,
    pub services: Vec<Service>,
    pub grants: Vec<Grant>,
}

/// Who: an agent or workload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub id: SpiffeId,
    /// Static bindings; empty when the identity gets its addresses at run
    /// time, by presenting a token.
    pub addresses: Vec<IpNet>,
    pub labels: BTreeMap<String, String>,
}

/// What: a named destination on the private network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub name: String,
    pub addresses: Vec<IpNet>,
    pub ports: PortSet,
}

/// Who may reach what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The `from` entries as written.
    pub from: Vec<Selector>,
    /// What `from` selects.
    pub sources: Sources,
    /// The `ports` narrowing, as written; `None` allows all of the services'
    /// ports.
    pub ports: Option<PortSet>,
    /// One per service in `to`, in order.
    pub targets: Vec<Target>,
    /// In UTC, in the years 0 to 9999 (so RFC 3339 can express it).
    pub expires: Option<OffsetDateTime>,
    pub rate: Option<Rate>,
}

/// An entry of a grant's `from`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selector {
    Id(SpiffeId),
    /// All identities carrying this label.
    Label {
        key: String,
        value: String,
    },
    /// Any source, known or not (`*`).
    Any,
}

/// The sources a grant admits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sources {
    /// Any source address, whether it belongs to an identity or not.
    Any,
    /// Indices into [`Policy::identities`], ascending, never empty.
    Identities(Vec<usize>),
}

/// A service a grant reaches, and the ports it allows there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Index into [`Policy::services`].
    pub service: usize,
    /// The service's ports, narrowed by the grant's; never empty.
    pub ports: PortSet,
}

impl Policy {
    /// Counts, as in `3 identities, 2 services, 4 grants`.
    pub fn summary(&self) -> String {
        format!(
            "{}, {}, {}",
            Count(self.identities.len(), "identity", "identities"),
            Count(self.services.len(), "service", "services"),
            Count(self.grants.len(), "grant", "grants"),
        )
    }
}

struct Count(usize, &'static str, &'static str);

impl fmt::Display for Count {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Self(count, one, many) = *self;
        write!(f, "{count} {}", if count == 1 { one } else { many })
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Id(id) => write!(f, "{id}"),
            Self::Label { key, value } => write!(f, "{key}={value}"),
            Self::Any => f.write_str("*"),
        }
    }
}
