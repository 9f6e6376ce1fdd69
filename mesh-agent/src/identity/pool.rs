//! The agent address pool: the source addresses this node gives bound
//! processes, one of each family the pool has per binding. Other nodes
//! route the pool to this node and know an identity by its address.

use std::{
    collections::HashSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use ipnet::IpNet;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PoolError {
    #[error(
        "agent pools {0} and {1} are of the same family; give at most one IPv4 and one IPv6 pool"
    )]
    SameFamily(IpNet, IpNet),
    #[error("agent pool {0} is too small: it needs at least two host addresses")]
    TooSmall(IpNet),
    #[error("agent pool {0} has no free address")]
    Exhausted(IpNet),
}

/// One prefix and where the next allocation starts looking.
#[derive(Debug, Clone)]
struct Range {
    net: IpNet,
    /// Offset from the prefix's first address: 1 ..= last.
    next: u128,
    last: u128,
}

/// The pool's prefixes, at most one per family. Addresses are handed out
/// round-robin, so a released one is reused as late as possible.
#[derive(Debug, Clone, Default)]
pub struct AddressPool {
    ranges: Vec<Range>,
}

impl AddressPool {
    pub fn new(nets: &[IpNet]) -> Result<Self, PoolError> {
        let mut ranges: Vec<Range> = Vec::new();
        for net in nets.iter().map(IpNet::trunc) {
            if let Some(other) = ranges
                .iter()
                .find(|r| r.net.addr().is_ipv4() == net.addr().is_ipv4())
            {
                return Err(PoolError::SameFamily(other.net, net));
            }
            let host_bits = u32::from(net.max_prefix_len() - net.prefix_len()).min(64);
            // The first and the last address (network, broadcast, the
            // subnet-router anycast) are never handed out.
            if host_bits < 2 {
                return Err(PoolError::TooSmall(net));
            }
            ranges.push(Range {
                net,
                next: 1,
                last: (1u128 << host_bits) - 2,
            });
        }
        Ok(Self { ranges })
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    pub fn nets(&self) -> Vec<IpNet> {
        self.ranges.iter().map(|r| r.net).collect()
    }

    /// One free address of each family, none of them in `in_use`.
    pub fn allocate(&mut self, in_use: &HashSet<IpAddr>) -> Result<Vec<IpAddr>, PoolError> {
        let mut found = Vec::new();
        for range in &mut self.ranges {
            let tries = (in_use.len() as u128 + 1).min(range.last);
            let free = (0..tries).find_map(|_| {
                let addr = offset(range.net, range.next);
                range.next = if range.next == range.last {
                    1
                } else {
                    range.next + 1
                };
                (!in_use.contains(&addr)).then_some(addr)
            });
            found.push(free.ok_or(PoolError::Exhausted(range.net))?);
        }
        Ok(found)
    }
}

fn offset(net: IpNet, by: u128) -> IpAddr {
    match net {
        IpNet::V4(v4) => Ipv4Addr::from((u32::from(v4.network()) as u128 + by) as u32).into(),
        IpNet::V6(v6) => Ipv6Addr::from(u128::from(v6.network()) + by).into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|n| n.parse().unwrap()).collect()
    }

    #[test]
    fn hands_out_hosts_round_robin_skipping_the_ends_and_what_is_in_use() {
        let mut pool = AddressPool::new(&nets(&["100.96.3.0/30", "fd00::/126"])).unwrap();
        let mut in_use = HashSet::new();
        let first = pool.allocate(&in_use).unwrap();
        assert_eq!(
            first,
            vec![
                "100.96.3.1".parse::<IpAddr>().unwrap(),
                "fd00::1".parse().unwrap()
            ]
        );
        in_use.extend(first);
        let second = pool.allocate(&in_use).unwrap();
        assert_eq!(second[0], "100.96.3.2".parse::<IpAddr>().unwrap());
        in_use.extend(second);
        assert_eq!(
            pool.allocate(&in_use),
            Err(PoolError::Exhausted("100.96.3.0/30".parse().unwrap()))
        );
        in_use.remove(&"100.96.3.1".parse().unwrap());
        in_use.remove(&"fd00::1".parse().unwrap());
        assert_eq!(
            pool.allocate(&in_use).unwrap()[0],
            "100.96.3.1".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn refuses_two_pools_of_a_family_and_tiny_ones() {
        assert!(matches!(
            AddressPool::new(&nets(&["10.0.0.0/24", "10.1.0.0/24"])),
            Err(PoolError::SameFamily(..))
        ));
        assert!(matches!(
            AddressPool::new(&nets(&["10.0.0.0/31"])),
            Err(PoolError::TooSmall(..))
        ));
    }
}
