//! Map sizes, chosen at load time.

use aya::EbpfLoader;
use mesh_common::{capacity, maps};

/// Entries per map. The policy maps hold two generations during a swap, so
/// a policy may use half of each; `grant_info` likewise splits in halves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapSizes {
    pub identity_hosts: u32,
    pub identity_prefixes: u32,
    pub destinations: u32,
    pub service_ports: u32,
    pub grants: u32,
    pub grant_info: u32,
    pub rate_buckets: u32,
    pub revoked: u32,
    pub flows: u32,
    pub fragments: u32,
    pub counters: u32,
}

impl Default for MapSizes {
    fn default() -> Self {
        Self {
            identity_hosts: capacity::IDENTITY_HOSTS,
            identity_prefixes: capacity::IDENTITY_PREFIXES,
            destinations: capacity::DESTINATIONS,
            service_ports: capacity::SERVICE_PORTS,
            grants: capacity::GRANTS,
            grant_info: 2 * capacity::GRANT_INFO_PER_GENERATION,
            rate_buckets: capacity::RATE_BUCKETS,
            revoked: capacity::REVOKED,
            flows: capacity::FLOWS,
            fragments: capacity::FRAGMENTS,
            counters: capacity::COUNTERS,
        }
    }
}

impl MapSizes {
    /// Grant indexes available to one policy generation.
    pub fn grants_per_generation(&self) -> u32 {
        self.grant_info / 2
    }

    pub(super) fn apply(&self, loader: &mut EbpfLoader<'_>) {
        for (name, size) in [
            (maps::IDENTITY_HOSTS, self.identity_hosts),
            (maps::IDENTITY_PREFIXES, self.identity_prefixes),
            (maps::DESTINATIONS, self.destinations),
            (maps::SERVICE_PORTS, self.service_ports),
            (maps::GRANTS, self.grants),
            (maps::GRANT_INFO, self.grant_info),
            (maps::RATE_BUCKETS, self.rate_buckets),
            (maps::REVOKED, self.revoked),
            (maps::FLOWS, self.flows),
            (maps::FRAGMENTS, self.fragments),
            (maps::COUNTERS, self.counters),
        ] {
            loader.map_max_entries(name, size);
        }
    }
}
