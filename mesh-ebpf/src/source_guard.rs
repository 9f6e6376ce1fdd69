//! The source guard (docs/identity.md): other nodes know a bound process's
//! identity by its pool address, so no other socket on this host may send
//! from one. Attached at the root of the cgroup hierarchy, the program sees
//! the packets of every socket on the host, in every network namespace and
//! whatever set their source — `bind()`, `IP_PKTINFO`, `IP_FREEBIND`, a raw
//! or ping socket — and drops those from a pool address that the socket's
//! cgroup does not own. The socket hooks bind sockets with `bpf_bind`,
//! which runs no bind hooks, so only this check sees every path.

use aya_ebpf::{helpers::bpf_skb_cgroup_id, maps::lpm_trie::Key, programs::SkBuffContext};
use mesh_common::ADDR_BITS;

use crate::maps::SOURCE_OWNERS;

/// Offsets of the source address in the IPv4 and IPv6 headers.
const IPV4_SOURCE: usize = 12;
const IPV6_SOURCE: usize = 8;

/// Whether the packet may leave: its source is no pool address, or one
/// owned by the sending socket's cgroup.
#[inline(always)]
pub fn admits(ctx: &SkBuffContext) -> bool {
    // Cgroup egress programs see the packet from its network header on.
    let Ok(first) = ctx.load::<u8>(0) else {
        return false;
    };
    let mut source = [0u8; 16];
    let loaded = match first >> 4 {
        4 => ctx.load::<[u8; 4]>(IPV4_SOURCE).map(|v4| {
            source[10] = 0xff;
            source[11] = 0xff;
            source[12..].copy_from_slice(&v4);
        }),
        6 => ctx.load::<[u8; 16]>(IPV6_SOURCE).map(|v6| source = v6),
        // Neither IPv4 nor IPv6: no address to guard.
        _ => return true,
    };
    if loaded.is_err() {
        return false;
    }
    let Some(&owner) = SOURCE_OWNERS.get(Key::new(ADDR_BITS, source)) else {
        return true;
    };
    // SAFETY: the program's own context.
    let cgroup = unsafe { bpf_skb_cgroup_id(ctx.skb.skb) };
    // Owner 0 is a pool address bound to nobody.
    owner != 0 && owner == cgroup
}
