//! The bindings other nodes of the mesh made, in this node's datapath: the
//! mesh hands over its peers' checked binding sets, and each address whose
//! identity the applied policy declares is classified as that identity
//! (`IDENTITY_HOSTS`, like this node's own bindings) until its binding
//! expires, or the mesh says it ended. An identity the policy does not
//! declare classifies as nothing. Every policy generation carries the
//! addresses, as it carries this node's own bindings'.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    time::SystemTime,
};

use prometheus::IntGauge;
use tokio::sync::watch;

use crate::{
    datapath::{BoundHost, Clock, Datapath, DatapathError},
    metrics::Metrics,
    node::PeerBindings as Received,
    policy::SpiffeId,
};

/// Address → its identity tag and expiry: what the datapath classifies.
pub(super) type Classified = BTreeMap<IpAddr, BoundHost>;

pub(super) struct PeerBindings {
    /// From the mesh; none without one.
    updates: Option<watch::Receiver<Received>>,
    /// The peers' bindings, as last handed over.
    received: Received,
    /// SPIFFE ID → tag under the applied policy.
    tags: HashMap<String, u32>,
    /// What the live generation holds of them.
    classified: Classified,
    gauge: Option<IntGauge>,
}

impl PeerBindings {
    /// Follows `updates`, from the node mesh if the agent is in one.
    pub fn new(
        updates: Option<watch::Receiver<Received>>,
        metrics: &Metrics,
    ) -> prometheus::Result<Self> {
        let gauge = match &updates {
            Some(_) => {
                let gauge = IntGauge::new(
                    "mesh_node_peer_bindings",
                    "Addresses of other nodes' process bindings this node classifies by identity.",
                )?;
                metrics.register(Box::new(gauge.clone()))?;
                Some(gauge)
            }
            None => None,
        };
        Ok(Self {
            updates,
            received: Received::new(),
            tags: HashMap::new(),
            classified: Classified::new(),
            gauge,
        })
    }

    /// Waits until the mesh hands over a change; never without a mesh, or
    /// once it has stopped (what it said last stays).
    pub async fn changed(&mut self) {
        if let Some(updates) = &mut self.updates {
            if updates.changed().await.is_ok() {
                self.received = updates.borrow_and_update().clone();
                return;
            }
            self.updates = None;
        }
        std::future::pending().await
    }

    /// The addresses a policy declaring `identities` classifies, with their
    /// tags: those of the bindings in force whose identity it declares.
    pub fn classify(&self, identities: &BTreeMap<u32, SpiffeId>) -> Classified {
        let tags: HashMap<&str, u32> = identities
            .iter()
            .map(|(tag, id)| (id.as_str(), *tag))
            .collect();
        self.in_force(|id| tags.get(id).copied())
    }

    fn in_force(&self, tag: impl Fn(&str) -> Option<u32>) -> Classified {
        let now = SystemTime::now();
        self.received
            .iter()
            .filter(|(_, binding)| binding.expires_at > now)
            .filter_map(|(&addr, binding)| {
                let host = BoundHost {
                    addr,
                    tag: tag(&binding.identity)?,
                    expires_at: binding.expires_at,
                };
                Some((addr, host))
            })
            .collect()
    }

    /// The entries of a policy generation for `classified`.
    pub fn host_entries(classified: &Classified) -> impl Iterator<Item = BoundHost> + '_ {
        classified.values().copied()
    }

    /// After a policy declaring `identities` is installed with `installed`
    /// (from [`Self::classify`]): its tags from now on, and what expired
    /// meanwhile taken out.
    pub fn adopt_policy(
        &mut self,
        identities: &BTreeMap<u32, SpiffeId>,
        installed: Classified,
        datapath: &mut Datapath,
    ) -> Result<(), DatapathError> {
        self.tags = identities
            .iter()
            .map(|(tag, id)| (id.to_string(), *tag))
            .collect();
        self.classified = installed;
        self.update(datapath)
    }

    /// When the next binding classified here expires.
    pub fn next_expiry(&self) -> Option<SystemTime> {
        self.classified.values().map(|host| host.expires_at).min()
    }

    /// Brings the datapath to the bindings in force now: after a change
    /// from the mesh, and when one expires.
    pub fn sync(&mut self, datapath: &mut Datapath) {
        if let Err(err) = self.update(datapath) {
            tracing::error!(error = %err, "updating other nodes' bindings in the datapath");
        }
    }

    fn update(&mut self, datapath: &mut Datapath) -> Result<(), DatapathError> {
        let wanted = self.in_force(|id| self.tags.get(id).copied());
        let gone: Vec<IpAddr> = self
            .classified
            .iter()
            .filter(|(address, host)| wanted.get(address).map(|h| h.tag) != Some(host.tag))
            .map(|(address, _)| *address)
            .collect();
        for address in gone {
            datapath.remove_identity_host(address)?;
            self.classified.remove(&address);
            tracing::info!(%address, "a peer's binding no longer classified");
        }
        let clock = Clock::now()?;
        for (address, host) in wanted {
            if self.classified.get(&address) == Some(&host) {
                continue;
            }
            // New, or refreshed with a later expiry.
            datapath.add_identity_host(&host, &clock)?;
            self.classified.insert(address, host);
            if let Some(binding) = self.received.get(&address) {
                tracing::info!(
                    %address,
                    identity = binding.identity,
                    node = %binding.node,
                    "a peer's binding classified"
                );
            }
        }
        if let Some(gauge) = &self.gauge {
            gauge.set(self.classified.len() as i64);
        }
        Ok(())
    }
}
