//! The underlay shield (XDP), an object of its own with its own maps: on
//! the interface that carries the tunnel it admits WireGuard from known
//! peers, rate-limits what anyone else sends to the WireGuard port (per
//! source /24 — /48 for IPv6 — and overall), admits configured host
//! services and what keeps the host working, and drops everything else
//! before the stack sees it. The layout is in mesh-common's `shield`.
#![no_std]
#![no_main]

mod frame;
// Shared with the enforcement programs; the shield reads part of what it
// parses.
#[allow(dead_code)]
mod parse;

use aya_ebpf::{
    bindings::xdp_action,
    helpers::bpf_ktime_get_boot_ns,
    macros::{map, xdp},
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, lpm_trie::Key},
    programs::XdpContext,
};
use mesh_common::shield::{
    Rate, SERVICE_KEY_FIXED_BITS, ServiceKey, ShieldAddr, ShieldConfig, SubnetKey, capacity,
    reason, side,
};
use parse::{IPPROTO_TCP, IPPROTO_UDP, Kind, Packet, Parsed};

#[map]
static SHIELD_CONFIG: Array<ShieldConfig> = Array::with_max_entries(1, 0);

#[map]
static SHIELD_PEERS: HashMap<ShieldAddr, u8> = HashMap::with_max_entries(capacity::PEERS, 0);

#[map]
static SHIELD_SERVICES: LpmTrie<ServiceKey, u8> = LpmTrie::with_max_entries(capacity::SERVICES, 0);

#[map]
static SHIELD_SUBNETS: LruHashMap<SubnetKey, u64> =
    LruHashMap::with_max_entries(capacity::SUBNETS, 0);

#[map]
static SHIELD_OVERALL: Array<u64> = Array::with_max_entries(1, 0);

#[map]
static SHIELD_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(reason::LEN, 0);

const TCP_ACK: u8 = 0x10;

#[xdp]
pub fn mesh_shield(ctx: XdpContext) -> u32 {
    let why = judge(&ctx);
    if let Some(count) = SHIELD_COUNTERS.get_ptr_mut(why) {
        // SAFETY: this CPU's own slot.
        unsafe { *count += 1 };
    }
    match why {
        reason::HANDSHAKE_LIMITED | reason::DROPPED => xdp_action::XDP_DROP,
        _ => xdp_action::XDP_PASS,
    }
}

#[inline(always)]
fn judge(ctx: &XdpContext) -> u32 {
    let mut packet = Packet::EMPTY;
    match parse::parse(ctx, true, &mut packet) {
        // ARP and other link traffic, IPv6 neighbour discovery.
        Parsed::Passthrough => return reason::CONTROL,
        Parsed::Malformed => return reason::DROPPED,
        Parsed::Ip => {}
    }
    // Without a configuration, nothing is admitted to the WireGuard port
    // and no service: fail closed.
    let Some(config) = SHIELD_CONFIG.get(0) else {
        return reason::DROPPED;
    };
    // SAFETY: a lookup; the value is not kept.
    let peer = unsafe { SHIELD_PEERS.get(&packet.src) }.is_some();
    match packet.kind {
        Kind::IcmpError => return reason::CONTROL,
        Kind::LaterFragment => {
            return if peer { reason::PEER } else { reason::DROPPED };
        }
        _ => {}
    }
    if packet.proto == IPPROTO_UDP && config.listen_port != 0 && packet.dport == config.listen_port
    {
        if peer {
            return reason::PEER;
        }
        return if admit_handshake(&packet.src, config) {
            reason::HANDSHAKE
        } else {
            reason::HANDSHAKE_LIMITED
        };
    }
    if packet.proto == IPPROTO_TCP && packet.tcp_flags & TCP_ACK != 0 {
        return reason::ESTABLISHED;
    }
    let port = if packet.kind == Kind::Ports {
        packet.dport
    } else {
        0
    };
    if admitted(packet.proto, side::HOST, port, &packet.src) {
        return reason::SERVICE;
    }
    // An answer of a server the host asks over UDP: DNS, NTP.
    if packet.proto == IPPROTO_UDP
        && packet.kind == Kind::Ports
        && admitted(packet.proto, side::SERVER, packet.sport, &packet.src)
    {
        return reason::SERVICE;
    }
    reason::DROPPED
}

/// Whether `SHIELD_SERVICES` admits `protocol` with `port` on `side` from
/// `source`.
#[inline(always)]
fn admitted(protocol: u8, side: u8, port: u16, source: &ShieldAddr) -> bool {
    let key = ServiceKey {
        protocol,
        side,
        port_be: port.to_be(),
        source: *source,
    };
    SHIELD_SERVICES
        .get(Key::new(SERVICE_KEY_FIXED_BITS + 128, key))
        .is_some()
}

/// Whether a packet from `src` to the WireGuard port is within the rates of
/// its subnet and of all unknown sources; charged to both only if so.
#[inline(always)]
fn admit_handshake(src: &ShieldAddr, config: &ShieldConfig) -> bool {
    // SAFETY: reads the clock.
    let now = unsafe { bpf_ktime_get_boot_ns() };
    // An IPv4-mapped source keeps its /24, an IPv6 one its /48.
    let mut subnet: SubnetKey = [0; 16];
    if src[..12] == [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff] {
        subnet[..15].copy_from_slice(&src[..15]);
    } else {
        subnet[..6].copy_from_slice(&src[..6]);
    }
    // SAFETY: a copy of the value is taken at once.
    let subnet_tat = unsafe { SHIELD_SUBNETS.get(&subnet) }.copied();
    let Some(overall) = SHIELD_OVERALL.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: the array's only slot; racing CPUs at worst admit a few more.
    let overall_tat = unsafe { *overall };
    let (Some(next_subnet), Some(next_overall)) = (
        gcra(subnet_tat.unwrap_or(now), &config.per_subnet, now),
        gcra(overall_tat, &config.overall, now),
    ) else {
        return false;
    };
    // SAFETY: as above.
    unsafe { *overall = next_overall };
    SHIELD_SUBNETS.insert(&subnet, &next_subnet, 0).is_ok()
}

/// The bucket's next theoretical arrival time if a packet at `now` is
/// within `rate`.
#[inline(always)]
fn gcra(tat: u64, rate: &Rate, now: u64) -> Option<u64> {
    if tat > now + rate.tolerance_ns {
        return None;
    }
    Some(if tat > now { tat } else { now } + rate.interval_ns)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
