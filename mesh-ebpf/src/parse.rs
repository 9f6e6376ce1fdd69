//! Frame and header parsing: Ethernet with up to two VLAN tags or bare IP,
//! IPv4 with options, IPv6 with up to six extension headers, fragments, and
//! the L4 fields the policy needs.

use crate::frame::Frame;

const ETH_HLEN: u32 = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const MAX_VLAN_TAGS: usize = 2;
const MAX_EXT_HEADERS: usize = 6;

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMPV6: u8 = 58;
const IPPROTO_HOPOPTS: u8 = 0;
const IPPROTO_ROUTING: u8 = 43;
const IPPROTO_FRAGMENT: u8 = 44;
const IPPROTO_DSTOPTS: u8 = 60;

const TCP_MIN_HLEN: u32 = 20;
const UDP_HLEN: u32 = 8;
const ICMP_HLEN: u32 = 8;

/// What a packet is, for the verdict.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// TCP or UDP with ports.
    Ports,
    /// ICMP/ICMPv6 echo request; the identifier is in both ports.
    EchoRequest,
    /// ICMP/ICMPv6 echo reply; the identifier is in both ports.
    EchoReply,
    /// ICMP/ICMPv6 error quoting the packet that caused it at `quote`.
    IcmpError,
    /// A fragment after the first: no L4 header.
    LaterFragment,
    /// Any other protocol or ICMP type: no ports.
    Other,
}

#[derive(Clone, Copy)]
pub struct Packet {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    /// The IP protocol number of the L4 header.
    pub proto: u8,
    pub kind: Kind,
    pub tcp_flags: u8,
    pub v6: bool,
    /// First fragment of a fragmented datagram (offset 0, more to come).
    pub first_fragment: bool,
    pub fragment_id: u32,
    /// The protocol every fragment of the datagram names: the IPv4 header's,
    /// or the Next Header of IPv6's Fragment header (later fragments do not
    /// show the headers behind it).
    pub fragment_proto: u8,
    /// Offset of the quoted IP header of an ICMP error.
    pub quote: u32,
    /// End of the IP packet (the frame may carry link-layer padding).
    pub ip_end: u32,
}

pub enum Parsed {
    Passthrough,
    Malformed,
    /// An IP packet, now in the caller's `Packet`.
    Ip,
}

impl Packet {
    pub const EMPTY: Packet = Packet {
        src: [0; 16],
        dst: [0; 16],
        sport: 0,
        dport: 0,
        proto: 0,
        kind: Kind::Other,
        tcp_flags: 0,
        v6: false,
        first_fragment: false,
        fragment_id: 0,
        fragment_proto: 0,
        quote: 0,
        ip_end: 0,
    };
}

/// IPv4 header fields, as on the wire.
#[repr(C)]
#[derive(Clone, Copy)]
struct Ipv4Header {
    version_ihl: u8,
    tos: u8,
    total_len: [u8; 2],
    id: [u8; 2],
    frag: [u8; 2],
    ttl: u8,
    proto: u8,
    check: [u8; 2],
    src: [u8; 4],
    dst: [u8; 4],
}

#[repr(C)]
#[derive(Clone, Copy)]
struct Ipv6Header {
    version_class_flow: [u8; 4],
    payload_len: [u8; 2],
    next_header: u8,
    hop_limit: u8,
    src: [u8; 16],
    dst: [u8; 16],
}

#[repr(C)]
#[derive(Clone, Copy)]
struct FragmentHeader {
    next_header: u8,
    reserved: u8,
    offset_flags: [u8; 2],
    id: [u8; 4],
}

#[inline(always)]
fn is_v4_mapped(addr: &[u8; 16]) -> bool {
    addr[..12] == [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff]
}

/// `::ffff:a.b.c.d`: IPv4 addresses in the maps' 16-byte form.
#[inline(always)]
pub fn ipv4_mapped(addr: [u8; 4]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, addr[0], addr[1], addr[2], addr[3],
    ]
}

/// Parses a frame that starts with an Ethernet header (`l2`) or with the IP
/// header into `packet`. Not inlined: its stack frame is reused by the
/// verdict's later steps (BPF allows 512 bytes in all).
#[inline(never)]
pub fn parse<F: Frame>(frame: &F, l2: bool, packet: &mut Packet) -> Parsed {
    let len = frame.len();
    let mut off = 0;
    let v6 = if l2 {
        let Some(mut ethertype) = frame.load::<[u8; 2]>(12).map(u16::from_be_bytes) else {
            return Parsed::Malformed;
        };
        off = ETH_HLEN;
        for _ in 0..MAX_VLAN_TAGS {
            if ethertype != ETH_P_8021Q && ethertype != ETH_P_8021AD {
                break;
            }
            let Some(inner) = frame.load::<[u8; 2]>(off + 2) else {
                return Parsed::Malformed;
            };
            ethertype = u16::from_be_bytes(inner);
            off += 4;
        }
        match ethertype {
            ETH_P_IP => false,
            ETH_P_IPV6 => true,
            ETH_P_8021Q | ETH_P_8021AD => return Parsed::Malformed,
            _ => return Parsed::Passthrough,
        }
    } else {
        match frame.load::<u8>(0).map(|b| b >> 4) {
            Some(4) => false,
            Some(6) => true,
            _ => return Parsed::Malformed,
        }
    };
    let l4 = if v6 {
        parse_ipv6(frame, off, len, packet)
    } else {
        parse_ipv4(frame, off, len, packet)
    };
    match l4 {
        Some(l4) => parse_l4(frame, l4, packet),
        None => Parsed::Malformed,
    }
}

/// Fills the network-layer fields; returns where the L4 header starts.
#[inline(always)]
fn parse_ipv4<F: Frame>(frame: &F, off: u32, len: u32, packet: &mut Packet) -> Option<u32> {
    let h: Ipv4Header = frame.load(off)?;
    let ihl = (h.version_ihl & 0x0f) as u32 * 4;
    let total = u16::from_be_bytes(h.total_len) as u32;
    if h.version_ihl >> 4 != 4 || ihl < 20 || total < ihl || off + total > len {
        return None;
    }
    let frag = u16::from_be_bytes(h.frag);
    let more_fragments = frag & 0x2000 != 0;
    let offset = frag & 0x1fff;
    packet.src = ipv4_mapped(h.src);
    packet.dst = ipv4_mapped(h.dst);
    packet.proto = h.proto;
    if offset != 0 {
        packet.kind = Kind::LaterFragment;
    }
    packet.first_fragment = offset == 0 && more_fragments;
    packet.fragment_id = u16::from_be_bytes(h.id) as u32;
    packet.fragment_proto = h.proto;
    packet.ip_end = off + total;
    Some(off + ihl)
}

#[inline(always)]
fn parse_ipv6<F: Frame>(frame: &F, off: u32, len: u32, packet: &mut Packet) -> Option<u32> {
    let h: Ipv6Header = frame.load(off)?;
    let end = off + 40 + u16::from_be_bytes(h.payload_len) as u32;
    // IPv4-mapped addresses never appear on the wire, and would pass for
    // the IPv4 addresses they map to in the maps' 16-byte form.
    if h.version_class_flow[0] >> 4 != 6
        || end > len
        || is_v4_mapped(&h.src)
        || is_v4_mapped(&h.dst)
    {
        return None;
    }
    packet.src = h.src;
    packet.dst = h.dst;
    packet.proto = h.next_header;
    packet.v6 = true;
    packet.ip_end = end;
    let mut cur = off + 40;
    for _ in 0..MAX_EXT_HEADERS {
        match packet.proto {
            IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS => {
                let [next, hdr_len]: [u8; 2] = frame.load(cur)?;
                packet.proto = next;
                cur += (hdr_len as u32 + 1) * 8;
            }
            IPPROTO_FRAGMENT => {
                let f: FragmentHeader = frame.load(cur)?;
                let offset_flags = u16::from_be_bytes(f.offset_flags);
                packet.proto = f.next_header;
                cur += 8;
                if offset_flags >> 3 != 0 {
                    packet.kind = Kind::LaterFragment;
                    packet.fragment_id = u32::from_be_bytes(f.id);
                    packet.fragment_proto = f.next_header;
                    // Later fragments carry no further headers to parse.
                    return (cur <= end).then_some(cur);
                }
                if offset_flags & 1 != 0 {
                    packet.first_fragment = true;
                    packet.fragment_id = u32::from_be_bytes(f.id);
                    packet.fragment_proto = f.next_header;
                }
            }
            _ => return (cur <= end).then_some(cur),
        }
    }
    match packet.proto {
        IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS | IPPROTO_FRAGMENT => None,
        _ => (cur <= end).then_some(cur),
    }
}

#[inline(always)]
fn parse_l4<F: Frame>(frame: &F, l4: u32, packet: &mut Packet) -> Parsed {
    if packet.kind == Kind::LaterFragment {
        return Parsed::Ip;
    }
    let end = packet.ip_end;
    match (packet.proto, packet.v6) {
        (IPPROTO_TCP, _) => {
            let Some(h) = frame
                .load::<[u8; 14]>(l4)
                .filter(|_| l4 + TCP_MIN_HLEN <= end)
            else {
                return Parsed::Malformed;
            };
            packet.sport = u16::from_be_bytes([h[0], h[1]]);
            packet.dport = u16::from_be_bytes([h[2], h[3]]);
            packet.tcp_flags = h[13];
            packet.kind = Kind::Ports;
        }
        (IPPROTO_UDP, _) => {
            let Some(h) = frame.load::<[u8; 4]>(l4).filter(|_| l4 + UDP_HLEN <= end) else {
                return Parsed::Malformed;
            };
            packet.sport = u16::from_be_bytes([h[0], h[1]]);
            packet.dport = u16::from_be_bytes([h[2], h[3]]);
            packet.kind = Kind::Ports;
        }
        (IPPROTO_ICMP, false) | (IPPROTO_ICMPV6, true) => {
            let Some(h) = frame.load::<[u8; 6]>(l4).filter(|_| l4 + ICMP_HLEN <= end) else {
                return Parsed::Malformed;
            };
            let id = u16::from_be_bytes([h[4], h[5]]);
            packet.kind = match (h[0], packet.v6) {
                (8, false) | (128, true) => Kind::EchoRequest,
                (0, false) | (129, true) => Kind::EchoReply,
                (3 | 11 | 12, false) | (1..=4, true) => Kind::IcmpError,
                (133..=137, true) => return Parsed::Passthrough,
                _ => Kind::Other,
            };
            if matches!(packet.kind, Kind::EchoRequest | Kind::EchoReply) {
                packet.sport = id;
                packet.dport = id;
            }
            packet.quote = l4 + ICMP_HLEN;
        }
        _ => {}
    }
    Parsed::Ip
}

/// The addresses, ports and protocol of one direction of a flow; echo
/// identifiers stand in both ports.
#[derive(Clone, Copy)]
pub struct Tuple {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
}

#[inline(always)]
fn echo_ports(quoted: &mut Tuple, icmp: &[u8; 8]) {
    let id = u16::from_be_bytes([icmp[4], icmp[5]]);
    quoted.sport = id;
    quoted.dport = id;
}

/// The tuple of the packet quoted by an ICMP error, written into `quoted`.
/// `false` if it cannot be read.
#[inline(never)]
pub fn quoted<F: Frame>(frame: &F, error: &Packet, quoted: &mut Tuple) -> bool {
    quoted_tuple(frame, error, quoted).is_some()
}

#[inline(always)]
fn quoted_tuple<F: Frame>(frame: &F, error: &Packet, quoted: &mut Tuple) -> Option<()> {
    let l4 = if error.v6 {
        let h: Ipv6Header = frame.load(error.quote)?;
        if h.version_class_flow[0] >> 4 != 6 || is_v4_mapped(&h.src) || is_v4_mapped(&h.dst) {
            return None;
        }
        quoted.src = h.src;
        quoted.dst = h.dst;
        quoted.proto = h.next_header;
        error.quote + 40
    } else {
        let h: Ipv4Header = frame.load(error.quote)?;
        let ihl = (h.version_ihl & 0x0f) as u32 * 4;
        if h.version_ihl >> 4 != 4 || ihl < 20 {
            return None;
        }
        quoted.src = ipv4_mapped(h.src);
        quoted.dst = ipv4_mapped(h.dst);
        quoted.proto = h.proto;
        error.quote + ihl
    };
    // Errors quote at least 8 bytes of the L4 header: enough for ports and
    // for the echo identifier.
    let h: [u8; 8] = frame.load(l4).filter(|_| l4 + 8 <= error.ip_end)?;
    match (quoted.proto, error.v6) {
        (IPPROTO_TCP | IPPROTO_UDP, _) => {
            quoted.sport = u16::from_be_bytes([h[0], h[1]]);
            quoted.dport = u16::from_be_bytes([h[2], h[3]]);
        }
        // Only echo has flows: other quoted ICMP names none.
        (IPPROTO_ICMP, false) if matches!(h[0], 0 | 8) => echo_ports(quoted, &h),
        (IPPROTO_ICMPV6, true) if matches!(h[0], 128 | 129) => echo_ports(quoted, &h),
        _ => return None,
    }
    Some(())
}
