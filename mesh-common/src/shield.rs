//! The underlay shield: an XDP program of its own (the `shield` object),
//! with its own maps, on the interface that carries the tunnel. It admits
//! WireGuard from known peers, rate-limits handshakes from anyone else (per
//! /24, or /48 for IPv6, and overall), admits configured host services and
//! the traffic that keeps the host working (ARP, neighbour discovery, ICMP
//! errors, TCP segments of open connections), and drops the rest.

/// Map names, as the agent looks them up.
pub mod maps {
    pub const CONFIG: &str = "SHIELD_CONFIG";
    pub const PEERS: &str = "SHIELD_PEERS";
    pub const SERVICES: &str = "SHIELD_SERVICES";
    pub const SUBNETS: &str = "SHIELD_SUBNETS";
    pub const OVERALL: &str = "SHIELD_OVERALL";
    pub const COUNTERS: &str = "SHIELD_COUNTERS";
}

/// The program's name in the object.
pub const PROGRAM: &str = "mesh_shield";

/// Entries of the maps.
pub mod capacity {
    /// Known peer addresses.
    pub const PEERS: u32 = 16_384;
    /// Admitted host services (protocol, port, source prefix).
    pub const SERVICES: u32 = 1_024;
    /// Handshake buckets of source subnets; the least recently used go.
    pub const SUBNETS: u32 = 65_536;
}

/// Why a packet was passed or dropped: the index in
/// [`maps::COUNTERS`], a per-CPU array of packet counts.
pub mod reason {
    /// WireGuard to the listen port from a known peer.
    pub const PEER: u32 = 0;
    /// A handshake initiation from elsewhere, within the rates.
    pub const HANDSHAKE: u32 = 1;
    /// A handshake initiation from elsewhere, over a rate: dropped.
    pub const HANDSHAKE_LIMITED: u32 = 2;
    /// A configured host service.
    pub const SERVICE: u32 = 3;
    /// A TCP segment with ACK set: part of an open connection (the kernel
    /// checks which).
    pub const ESTABLISHED: u32 = 4;
    /// ARP, IPv6 neighbour discovery, ICMP errors.
    pub const CONTROL: u32 = 5;
    /// Anything else: dropped.
    pub const DROPPED: u32 = 6;
    pub const LEN: u32 = 7;
    /// The names, by index, for metrics.
    pub const NAMES: [&str; LEN as usize] = [
        "peer",
        "handshake",
        "handshake_limited",
        "service",
        "established",
        "control",
        "other",
    ];
}

/// Rate limits as GCRA: a packet is admitted if its bucket's theoretical
/// arrival time is at most `tolerance_ns` ahead of now, which then moves
/// `interval_ns` on.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Rate {
    pub interval_ns: u64,
    pub tolerance_ns: u64,
}
const _: () = assert!(core::mem::size_of::<Rate>() == 16);

/// The single entry of [`maps::CONFIG`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ShieldConfig {
    /// WireGuard's listen port, in host order; 0 until configured, when
    /// every packet but control traffic is dropped.
    pub listen_port: u16,
    pub _pad: [u8; 6],
    /// Handshakes from unknown sources, per source subnet.
    pub per_subnet: Rate,
    /// Handshakes from unknown sources, all together.
    pub overall: Rate,
}
const _: () = assert!(core::mem::size_of::<ShieldConfig>() == 40);

/// An address as the shield keys it: IPv4 as IPv4-mapped IPv6.
pub type ShieldAddr = [u8; 16];

/// A source subnet's key in [`maps::SUBNETS`]: the /24 of an IPv4 source
/// (mapped), the /48 of an IPv6 one; the rest zero.
pub type SubnetKey = [u8; 16];

/// The data of a [`maps::SERVICES`] LPM key: protocol, side and port
/// always match (their 32 bits count first in the prefix length), then the
/// source address by its prefix.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceKey {
    /// IP protocol number (6 TCP, 17 UDP, 1 ICMP, 58 ICMPv6).
    pub protocol: u8,
    /// [`side::HOST`]: `port` is the host's, a service it offers;
    /// [`side::SERVER`]: `port` is the source's, a server whose answers
    /// the host takes (UDP, which has no handshake to recognise them by).
    pub side: u8,
    /// The port, network order; 0 for ICMP.
    pub port_be: u16,
    pub source: ShieldAddr,
}
const _: () = assert!(core::mem::size_of::<ServiceKey>() == 20);

/// Which end of a packet a [`ServiceKey`]'s port is.
pub mod side {
    /// The destination's: a service of the host.
    pub const HOST: u8 = 0;
    /// The source's: a server whose answers the host takes.
    pub const SERVER: u8 = 1;
}

/// Prefix bits of a [`ServiceKey`] before the source address.
pub const SERVICE_KEY_FIXED_BITS: u32 = 32;

/// The IPv4-mapped form of an IPv4 address.
pub const fn mapped_v4(octets: [u8; 4]) -> ShieldAddr {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, octets[0], octets[1], octets[2], octets[3],
    ]
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: plain #[repr(C)] data without padding the kernel could leave
    // uninitialised: every byte is a field.
    unsafe impl aya::Pod for Rate {}
    unsafe impl aya::Pod for ShieldConfig {}
    unsafe impl aya::Pod for ServiceKey {}
}
