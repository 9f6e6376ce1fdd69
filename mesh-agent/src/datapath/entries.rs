//! The compiled form of a policy: what the policy compiler produces and the
//! installer writes into the kernel maps, one generation at a time.

use std::{
    net::{IpAddr, Ipv6Addr},
    time::{Duration, SystemTime},
};

use mesh_common::{GrantInfo, IPV4_MAPPED_PREFIX, IdentityValue, NEVER};

/// An address prefix in the maps' 16-byte form (IPv4 mapped into IPv6).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Prefix {
    pub addr: Ipv6Addr,
    /// 0..=128, counted on the 16-byte form.
    pub len: u8,
}

impl Prefix {
    /// `addr/len` in either family; `len` counts bits of that family.
    pub fn new(addr: IpAddr, len: u8) -> Self {
        match addr {
            IpAddr::V4(v4) => Self {
                addr: v4.to_ipv6_mapped(),
                len: len + IPV4_MAPPED_PREFIX as u8,
            },
            IpAddr::V6(v6) => Self { addr: v6, len },
        }
    }

    /// A single address.
    pub fn host(addr: IpAddr) -> Self {
        let len = if addr.is_ipv4() { 32 } else { 128 };
        Self::new(addr, len)
    }

    pub fn is_host(&self) -> bool {
        self.len == 128
    }
}

/// An aligned block of ports: the `bits` high bits of `port` match.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortBlock {
    /// A `mesh_common::proto` code.
    pub proto: u8,
    pub port: u16,
    pub bits: u8,
}

impl PortBlock {
    /// The fewest aligned blocks that cover `first..=last` exactly.
    pub fn cover(proto: u8, first: u16, last: u16) -> Vec<PortBlock> {
        let mut blocks = Vec::new();
        let (mut start, end) = (u32::from(first), u32::from(last));
        while start <= end {
            // The largest aligned block that starts at `start` and fits.
            let mut size = if start == 0 {
                1 << 16
            } else {
                1 << start.trailing_zeros()
            };
            while start + size - 1 > end {
                size >>= 1;
            }
            blocks.push(PortBlock {
                proto,
                port: start as u16,
                bits: 16 - size.trailing_zeros() as u8,
            });
            start += size;
        }
        blocks
    }
}

/// A grant's time and rate limits, before conversion to the kernel's clock.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GrantLimits {
    pub expires: Option<SystemTime>,
    pub rate: Option<Rate>,
}

/// A moment on both clocks: the wall clock policies speak in, and the boot
/// clock the kernel programs read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Clock {
    pub wall: SystemTime,
    pub boot_ns: u64,
}

impl Clock {
    /// `at` on the boot clock: 0 if already past, below [`NEVER`] always.
    pub fn boot_ns_at(&self, at: SystemTime) -> u64 {
        match at.duration_since(self.wall) {
            Ok(ahead) => self
                .boot_ns
                .saturating_add(u64::try_from(ahead.as_nanos()).unwrap_or(u64::MAX))
                .min(NEVER - 1),
            // Already past: expired on arrival.
            Err(_) => 0,
        }
    }
}

impl GrantLimits {
    /// The kernel's form, with the expiry moved onto the boot clock. The
    /// reference model uses the very same numbers.
    pub fn to_kernel(&self, clock: &Clock) -> GrantInfo {
        let expires_ns = self.expires.map_or(NEVER, |at| clock.boot_ns_at(at));
        let (interval_ns, burst_ns) = match self.rate {
            None => (0, 0),
            Some(Rate { count, period }) => {
                let interval = (u64::try_from(period.as_nanos()).unwrap_or(u64::MAX)
                    / u64::from(count.max(1)))
                .max(1);
                (interval, interval * u64::from(count.saturating_sub(1)))
            }
        };
        GrantInfo {
            expires_ns,
            interval_ns,
            burst_ns,
        }
    }
}

/// `count` new flows per `period`, as a bucket of `count` tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rate {
    pub count: u32,
    pub period: Duration,
}

/// Everything the kernel needs to enforce one policy.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicyEntries {
    /// Source prefix → identity tag; host prefixes go to the exact map.
    pub identities: Vec<(Prefix, u32)>,
    /// Destination prefix → destination class.
    pub destinations: Vec<(Prefix, u32)>,
    /// (class, port block) → (service id, slot).
    pub service_ports: Vec<(u32, PortBlock, u32, u32)>,
    /// (identity tag or `identity::ANY`, service id, slot) → indexes into
    /// `grant_limits`, at most [`mesh_common::GRANTS_PER_KEY`], in policy order.
    pub grants: Vec<((u32, u32, u32), Vec<u32>)>,
    pub grant_limits: Vec<GrantLimits>,
    /// The source addresses of process bindings, on this node and others:
    /// not the policy's, so the reference model, which replays the policy
    /// alone, has none.
    pub bound: Vec<BoundHost>,
}

/// A process binding's source address: its identity's until the token
/// expires, when the kernel stops classifying it by itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BoundHost {
    pub addr: IpAddr,
    pub tag: u32,
    pub expires_at: SystemTime,
}

impl BoundHost {
    /// The kernel's form, with the expiry moved onto the boot clock.
    pub fn to_kernel(&self, clock: &Clock) -> IdentityValue {
        IdentityValue {
            tag: self.tag,
            _pad: [0; 4],
            valid_until_ns: clock.boot_ns_at(self.expires_at),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn covered(blocks: &[PortBlock]) -> Vec<u32> {
        blocks
            .iter()
            .flat_map(|b| {
                let size = 1u32 << (16 - b.bits);
                u32::from(b.port)..u32::from(b.port) + size
            })
            .collect()
    }

    #[test]
    fn port_blocks_cover_ranges_exactly() {
        for (first, last) in [
            (1, 1),
            (443, 443),
            (8000, 8099),
            (1, 65535),
            (0, 65535),
            (1023, 1025),
        ] {
            let blocks = PortBlock::cover(6, first, last);
            assert_eq!(
                covered(&blocks),
                (u32::from(first)..=u32::from(last)).collect::<Vec<_>>()
            );
            assert!(
                blocks.len() <= 32,
                "{first}-{last}: {} blocks",
                blocks.len()
            );
        }
        assert_eq!(
            PortBlock::cover(6, 0, 65535),
            vec![PortBlock {
                proto: 6,
                port: 0,
                bits: 0
            }]
        );
    }
}
