//! One policy's compiled entries in lookup form: what one generation of the
//! kernel's maps holds (step 5 of docs/datapath.md and the grant tables).

use std::{
    collections::{BTreeMap, HashMap},
    net::Ipv6Addr,
};

use mesh_common::{GRANTS_PER_KEY, GrantInfo, identity};

use crate::datapath::{Clock, PolicyEntries};

pub(super) struct Tables {
    /// Hosts and prefixes in one table: an exact host is the longest prefix
    /// there is, so this is the kernel's "hosts first, then prefixes".
    identities: Lpm<128, u32>,
    destinations: Lpm<128, u32>,
    /// (class, protocol code) → port blocks → (service, slot).
    service_ports: HashMap<(u32, u8), Lpm<16, (u32, u32)>>,
    /// (identity or `identity::ANY`, service, slot) → grant indexes.
    grants: HashMap<(u32, u32, u32), Vec<usize>>,
    /// By grant index; limits on the boot clock of the install.
    grant_info: Vec<GrantInfo>,
}

impl Tables {
    pub fn new(entries: &PolicyEntries, clock: &Clock) -> Self {
        let mut identities = Lpm::default();
        for (prefix, tag) in &entries.identities {
            identities.insert(u128::from(prefix.addr), prefix.len.into(), *tag);
        }
        let mut destinations = Lpm::default();
        for (prefix, class) in &entries.destinations {
            destinations.insert(u128::from(prefix.addr), prefix.len.into(), *class);
        }
        let mut service_ports: HashMap<_, Lpm<16, _>> = HashMap::new();
        for (class, block, service, slot) in &entries.service_ports {
            service_ports
                .entry((*class, block.proto))
                .or_default()
                .insert(block.port.into(), block.bits.into(), (*service, *slot));
        }
        let grants = entries
            .grants
            .iter()
            .map(|(key, indexes)| {
                // A grant entry holds at most this many; the installer
                // writes no more.
                let indexes = indexes.iter().take(GRANTS_PER_KEY);
                (*key, indexes.map(|&index| index as usize).collect())
            })
            .collect();
        Self {
            identities,
            destinations,
            service_ports,
            grants,
            grant_info: entries
                .grant_limits
                .iter()
                .map(|limits| limits.to_kernel(clock))
                .collect(),
        }
    }

    /// The identity whose prefix contains `addr`, longest first.
    pub fn identity(&self, addr: Ipv6Addr) -> u32 {
        self.identities
            .longest(addr.into())
            .unwrap_or(identity::UNKNOWN)
    }

    /// (service, slot) of a destination, protocol code and port: the class
    /// of the longest destination prefix, then its longest port block.
    pub fn service(&self, dst: Ipv6Addr, proto: u8, port: u16) -> Option<(u32, u32)> {
        let class = self.destinations.longest(dst.into())?;
        self.service_ports
            .get(&(class, proto))?
            .longest(port.into())
    }

    /// The grants of (identity or `identity::ANY`, service, slot), in
    /// policy order.
    pub fn grants(&self, grantee: u32, service: u32, slot: u32) -> &[usize] {
        self.grants
            .get(&(grantee, service, slot))
            .map_or(&[], Vec::as_slice)
    }

    pub fn grant_info(&self, grant: usize) -> Option<&GrantInfo> {
        self.grant_info.get(grant)
    }
}

/// Longest-prefix match on `BITS`-bit keys, as a kernel LPM trie: bits past
/// a prefix's length are ignored, and a prefix written twice keeps the last
/// value.
struct Lpm<const BITS: u32, V> {
    /// (length, key masked to the length) → value.
    entries: BTreeMap<(u32, u128), V>,
}

impl<const BITS: u32, V> Default for Lpm<BITS, V> {
    fn default() -> Self {
        Self {
            entries: BTreeMap::new(),
        }
    }
}

impl<const BITS: u32, V: Copy> Lpm<BITS, V> {
    fn insert(&mut self, key: u128, len: u32, value: V) {
        self.entries.insert((len, key & mask::<BITS>(len)), value);
    }

    fn longest(&self, key: u128) -> Option<V> {
        self.entries
            .iter()
            .rev()
            .find(|((len, prefix), _)| key & mask::<BITS>(*len) == *prefix)
            .map(|(_, value)| *value)
    }
}

/// The high `len` of `BITS` bits, in the low `BITS` bits of a u128.
fn mask<const BITS: u32>(len: u32) -> u128 {
    match len {
        0 => 0,
        _ => (u128::MAX << (128 - len)) >> (128 - BITS),
    }
}

#[cfg(test)]
mod tests {
    use std::{net::IpAddr, time::SystemTime};

    use mesh_common::proto;

    use super::*;
    use crate::datapath::{GrantLimits, PortBlock, Prefix};

    fn prefix(addr: &str, len: u8) -> Prefix {
        Prefix::new(addr.parse().unwrap(), len)
    }

    fn tables(entries: &PolicyEntries) -> Tables {
        let clock = Clock {
            wall: SystemTime::UNIX_EPOCH,
            boot_ns: 0,
        };
        Tables::new(entries, &clock)
    }

    fn addr(text: &str) -> Ipv6Addr {
        match text.parse().unwrap() {
            IpAddr::V4(v4) => v4.to_ipv6_mapped(),
            IpAddr::V6(v6) => v6,
        }
    }

    #[test]
    fn identities_match_longest_prefix_first() {
        let tables = tables(&PolicyEntries {
            identities: vec![
                (prefix("10.0.0.0", 8), 1),
                (prefix("10.1.0.0", 16), 2),
                (Prefix::host(addr("10.1.0.7").into()), 3),
                (prefix("fd00::", 16), 4),
                // Host bits past the length do not count; the last write wins.
                (prefix("fd00::1", 16), 5),
            ],
            ..Default::default()
        });
        assert_eq!(tables.identity(addr("10.9.9.9")), 1);
        assert_eq!(tables.identity(addr("10.1.2.3")), 2);
        assert_eq!(tables.identity(addr("10.1.0.7")), 3);
        assert_eq!(tables.identity(addr("fd00:1::1")), 5);
        assert_eq!(tables.identity(addr("11.0.0.1")), identity::UNKNOWN);
        // IPv4 prefixes do not contain IPv6 addresses that share their bits.
        assert_eq!(tables.identity(addr("::a00:1")), identity::UNKNOWN);
    }

    #[test]
    fn services_by_destination_class_then_port_block() {
        let tables = tables(&PolicyEntries {
            destinations: vec![(prefix("10.20.0.0", 16), 1), (prefix("10.20.0.5", 32), 2)],
            service_ports: [(1, 7, 0, 8000, 8099), (2, 9, 1, 8000, 8049)]
                .into_iter()
                .flat_map(|(class, service, slot, first, last)| {
                    PortBlock::cover(proto::TCP, first, last)
                        .into_iter()
                        .map(move |block| (class, block, service, slot))
                })
                .collect(),
            ..Default::default()
        });
        assert_eq!(
            tables.service(addr("10.20.1.1"), proto::TCP, 8099),
            Some((7, 0))
        );
        assert_eq!(
            tables.service(addr("10.20.0.5"), proto::TCP, 8049),
            Some((9, 1))
        );
        // Class 2 has no service on 8050: the class does not fall back.
        assert_eq!(tables.service(addr("10.20.0.5"), proto::TCP, 8050), None);
        assert_eq!(tables.service(addr("10.20.1.1"), proto::UDP, 8000), None);
        assert_eq!(tables.service(addr("10.21.0.1"), proto::TCP, 8000), None);
    }

    #[test]
    fn grant_entries_hold_at_most_four_grants_with_limits_on_the_boot_clock() {
        let tables = tables(&PolicyEntries {
            grants: vec![((1, 2, 3), (0..6).collect())],
            grant_limits: vec![GrantLimits::default(); 6],
            ..Default::default()
        });
        assert_eq!(tables.grants(1, 2, 3), [0, 1, 2, 3]);
        assert_eq!(tables.grants(identity::ANY, 2, 3), [] as [usize; 0]);
        assert_eq!(
            tables.grant_info(5).map(|info| info.expires_ns),
            Some(mesh_common::NEVER)
        );
        assert_eq!(tables.grant_info(6), None);
    }

    #[test]
    fn masks() {
        assert_eq!(mask::<128>(0), 0);
        assert_eq!(mask::<128>(128), u128::MAX);
        assert_eq!(mask::<128>(1), 1 << 127);
        assert_eq!(mask::<16>(16), 0xffff);
        assert_eq!(mask::<16>(1), 0x8000);
        assert_eq!(mask::<16>(0), 0);
    }
}
