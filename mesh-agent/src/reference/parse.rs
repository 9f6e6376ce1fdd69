//! Frames to packets, as step 1 of docs/datapath.md: Ethernet with up to two
//! VLAN tags or bare IP, IPv4 with options, IPv6 with up to six extension
//! headers, fragments, the L4 fields the policy needs, and the header an ICMP
//! error quotes.

use std::net::{Ipv4Addr, Ipv6Addr};

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
/// 802.1Q and 802.1ad.
const VLAN_TPIDS: [u16; 2] = [0x8100, 0x88a8];
const MAX_VLAN_TAGS: usize = 2;
const MAX_EXT_HEADERS: usize = 6;

const IPV4_MIN_HLEN: usize = 20;
const IPV6_HLEN: usize = 40;
const TCP_MIN_HLEN: usize = 20;
/// UDP and ICMP headers, and the L4 bytes an ICMP error quotes at least.
const L4_MIN_HLEN: usize = 8;

pub(super) const IPPROTO_ICMP: u8 = 1;
pub(super) const IPPROTO_TCP: u8 = 6;
pub(super) const IPPROTO_UDP: u8 = 17;
pub(super) const IPPROTO_ICMPV6: u8 = 58;
const IPPROTO_HOPOPTS: u8 = 0;
const IPPROTO_ROUTING: u8 = 43;
const IPPROTO_FRAGMENT: u8 = 44;
const IPPROTO_DSTOPTS: u8 = 60;

pub(super) const TCP_FIN: u8 = 0x01;
pub(super) const TCP_RST: u8 = 0x04;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Parsed {
    Passthrough,
    Malformed,
    Ip(Packet),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Packet {
    /// Addresses in the maps' 16-byte form: IPv4 mapped into IPv6.
    pub src: Ipv6Addr,
    pub dst: Ipv6Addr,
    /// The IP protocol number of the L4 header, after extension headers.
    pub proto: u8,
    pub l4: L4,
    pub fragment: Fragment,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum L4 {
    Tcp {
        sport: u16,
        dport: u16,
        flags: u8,
    },
    Udp {
        sport: u16,
        dport: u16,
    },
    /// An echo request or reply of the packet's own family.
    Echo {
        id: u16,
        request: bool,
    },
    /// An error of the packet's own family (unreachable, packet too big,
    /// time exceeded, parameter problem) and the flow its quote names, if
    /// the quote names one.
    Error {
        quoted: Option<Tuple>,
    },
    /// Any other protocol or ICMP type, and later fragments: no ports.
    Other,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Fragment {
    Whole,
    /// Offset 0, more fragments to come: judged by its L4 header.
    First(Datagram),
    /// Offset > 0: no L4 header.
    Later(Datagram),
}

/// What the fragments of one datagram have in common.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) struct Datagram {
    pub src: Ipv6Addr,
    pub dst: Ipv6Addr,
    /// IPv4: the header's protocol. IPv6: the Fragment header's Next Header,
    /// which every fragment carries alike (extension headers may follow it
    /// in the first fragment).
    pub proto: u8,
    pub id: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(super) struct Endpoint {
    pub addr: Ipv6Addr,
    pub port: u16,
}

/// One direction of a flow. ICMP echo identifiers stand in both ports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Tuple {
    pub src: Endpoint,
    pub dst: Endpoint,
    /// The IP protocol number.
    pub proto: u8,
}

impl Packet {
    /// The flow the packet belongs to: TCP, UDP and ICMP echo have one.
    pub fn tuple(&self) -> Option<Tuple> {
        let (sport, dport) = match self.l4 {
            L4::Tcp { sport, dport, .. } | L4::Udp { sport, dport } => (sport, dport),
            L4::Echo { id, .. } => (id, id),
            L4::Error { .. } | L4::Other => return None,
        };
        Some(Tuple {
            src: Endpoint {
                addr: self.src,
                port: sport,
            },
            dst: Endpoint {
                addr: self.dst,
                port: dport,
            },
            proto: self.proto,
        })
    }
}

/// Parses a frame that starts with an Ethernet header (`l2`) or with the IP
/// header.
pub(super) fn parse(frame: &[u8], l2: bool) -> Parsed {
    match packet(frame, l2) {
        Ok(packet) => Parsed::Ip(packet),
        Err(verdict) => verdict,
    }
}

/// The network layer's fields and where its parts end.
struct Network {
    src: Ipv6Addr,
    dst: Ipv6Addr,
    proto: u8,
    fragment: Fragment,
    /// Offset of the L4 header.
    l4: usize,
    /// End of the IP packet: the frame may carry link-layer padding.
    end: usize,
}

/// The packet, or the verdict a frame gets without one.
fn packet(frame: &[u8], l2: bool) -> Result<Packet, Parsed> {
    let (v6, start) = network_start(frame, l2)?;
    let network = if v6 {
        ipv6_headers(frame, start)
    } else {
        ipv4_header(frame, start)
    }
    .ok_or(Parsed::Malformed)?;
    let l4 = match network.fragment {
        Fragment::Later(_) => L4::Other,
        _ => transport(&frame[..network.end], network.l4, network.proto, v6)?,
    };
    Ok(Packet {
        src: network.src,
        dst: network.dst,
        proto: network.proto,
        l4,
        fragment: network.fragment,
    })
}

/// Whether the frame carries IPv6 (else IPv4), and where the IP header starts.
fn network_start(frame: &[u8], l2: bool) -> Result<(bool, usize), Parsed> {
    if !l2 {
        return match frame.first().map(|b| b >> 4) {
            Some(4) => Ok((false, 0)),
            Some(6) => Ok((true, 0)),
            _ => Err(Parsed::Malformed),
        };
    }
    let mut ethertype = be16(frame, 12).ok_or(Parsed::Malformed)?;
    let mut start = ETH_HLEN;
    for _ in 0..MAX_VLAN_TAGS {
        if !VLAN_TPIDS.contains(&ethertype) {
            break;
        }
        // A tag is the TPID just read, the TCI, then the next ethertype.
        ethertype = be16(frame, start + 2).ok_or(Parsed::Malformed)?;
        start += 4;
    }
    match ethertype {
        ETH_P_IP => Ok((false, start)),
        ETH_P_IPV6 => Ok((true, start)),
        tpid if VLAN_TPIDS.contains(&tpid) => Err(Parsed::Malformed),
        _ => Err(Parsed::Passthrough),
    }
}

fn ipv4_header(frame: &[u8], start: usize) -> Option<Network> {
    let h: [u8; IPV4_MIN_HLEN] = array(frame, start)?;
    let ihl = usize::from(h[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([h[2], h[3]]));
    if h[0] >> 4 != 4 || ihl < IPV4_MIN_HLEN || total < ihl || start + total > frame.len() {
        return None;
    }
    let (src, dst) = (v4_mapped(array(&h, 12)?), v4_mapped(array(&h, 16)?));
    let datagram = Datagram {
        src,
        dst,
        proto: h[9],
        id: u32::from(u16::from_be_bytes([h[4], h[5]])),
    };
    let flags_offset = u16::from_be_bytes([h[6], h[7]]);
    let more_fragments = flags_offset & 0x2000 != 0;
    let fragment = match (flags_offset & 0x1fff, more_fragments) {
        (0, false) => Fragment::Whole,
        (0, true) => Fragment::First(datagram),
        _ => Fragment::Later(datagram),
    };
    Some(Network {
        src,
        dst,
        proto: h[9],
        fragment,
        l4: start + ihl,
        end: start + total,
    })
}

fn ipv6_headers(frame: &[u8], start: usize) -> Option<Network> {
    let h: [u8; IPV6_HLEN] = array(frame, start)?;
    let end = start + IPV6_HLEN + usize::from(u16::from_be_bytes([h[4], h[5]]));
    if h[0] >> 4 != 6 || end > frame.len() {
        return None;
    }
    let (src, dst) = (
        Ipv6Addr::from(array::<16>(&h, 8)?),
        Ipv6Addr::from(array::<16>(&h, 24)?),
    );
    // IPv4-mapped addresses never appear on the wire, and would pass for
    // the IPv4 addresses they map.
    if src.to_ipv4_mapped().is_some() || dst.to_ipv4_mapped().is_some() {
        return None;
    }
    // Extension headers are read within the packet. (Reading one from the
    // frame's padding instead leaves the headers running past the packet's
    // end, which is malformed all the same.)
    let ip = &frame[..end];
    let mut next = h[6];
    let mut cur = start + IPV6_HLEN;
    let mut fragment = Fragment::Whole;
    let mut headers = 0;
    while matches!(
        next,
        IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS | IPPROTO_FRAGMENT
    ) && !matches!(fragment, Fragment::Later(_))
    {
        headers += 1;
        if headers > MAX_EXT_HEADERS {
            return None;
        }
        if next == IPPROTO_FRAGMENT {
            let f: [u8; 8] = array(ip, cur)?;
            let offset_flags = u16::from_be_bytes([f[2], f[3]]);
            let datagram = Datagram {
                src,
                dst,
                proto: f[0],
                id: u32::from_be_bytes([f[4], f[5], f[6], f[7]]),
            };
            if offset_flags >> 3 != 0 {
                fragment = Fragment::Later(datagram);
            } else if offset_flags & 1 != 0 {
                fragment = Fragment::First(datagram);
            }
            next = f[0];
            cur += 8;
        } else {
            let [following, len]: [u8; 2] = array(ip, cur)?;
            next = following;
            cur += (usize::from(len) + 1) * 8;
        }
    }
    (cur <= end).then_some(Network {
        src,
        dst,
        proto: next,
        fragment,
        l4: cur,
        end,
    })
}

/// The L4 fields; `ip` ends where the IP packet does.
fn transport(ip: &[u8], at: usize, proto: u8, v6: bool) -> Result<L4, Parsed> {
    match (proto, v6) {
        (IPPROTO_TCP, _) => {
            let h: [u8; TCP_MIN_HLEN] = array(ip, at).ok_or(Parsed::Malformed)?;
            Ok(L4::Tcp {
                sport: u16::from_be_bytes([h[0], h[1]]),
                dport: u16::from_be_bytes([h[2], h[3]]),
                flags: h[13],
            })
        }
        (IPPROTO_UDP, _) => {
            let h: [u8; L4_MIN_HLEN] = array(ip, at).ok_or(Parsed::Malformed)?;
            Ok(L4::Udp {
                sport: u16::from_be_bytes([h[0], h[1]]),
                dport: u16::from_be_bytes([h[2], h[3]]),
            })
        }
        (IPPROTO_ICMP, false) | (IPPROTO_ICMPV6, true) => {
            let h: [u8; L4_MIN_HLEN] = array(ip, at).ok_or(Parsed::Malformed)?;
            if let Some(request) = echo(h[0], v6) {
                let id = u16::from_be_bytes([h[4], h[5]]);
                return Ok(L4::Echo { id, request });
            }
            match (h[0], v6) {
                (3 | 11 | 12, false) | (1..=4, true) => Ok(L4::Error {
                    quoted: quoted(ip, at + L4_MIN_HLEN, v6),
                }),
                // Neighbour discovery.
                (133..=137, true) => Err(Parsed::Passthrough),
                _ => Ok(L4::Other),
            }
        }
        // Includes ICMPv4 in IPv6 and ICMPv6 in IPv4.
        _ => Ok(L4::Other),
    }
}

/// `Some(true)` for an echo request of the family, `Some(false)` for a reply.
fn echo(icmp_type: u8, v6: bool) -> Option<bool> {
    match (icmp_type, v6) {
        (8, false) | (128, true) => Some(true),
        (0, false) | (129, true) => Some(false),
        _ => None,
    }
}

/// The flow named by the packet an ICMP error quotes at `at`, a packet of
/// the error's own family. Only TCP, UDP and echo of that family name one;
/// IPv6 extension headers in the quote are not followed.
fn quoted(ip: &[u8], at: usize, v6: bool) -> Option<Tuple> {
    let (src, dst, proto, l4) = if v6 {
        let h: [u8; IPV6_HLEN] = array(ip, at)?;
        if h[0] >> 4 != 6 {
            return None;
        }
        let (src, dst): (Ipv6Addr, Ipv6Addr) =
            (array::<16>(&h, 8)?.into(), array::<16>(&h, 24)?.into());
        if src.to_ipv4_mapped().is_some() || dst.to_ipv4_mapped().is_some() {
            return None;
        }
        (src, dst, h[6], at + IPV6_HLEN)
    } else {
        let h: [u8; IPV4_MIN_HLEN] = array(ip, at)?;
        let ihl = usize::from(h[0] & 0x0f) * 4;
        if h[0] >> 4 != 4 || ihl < IPV4_MIN_HLEN {
            return None;
        }
        let (src, dst) = (v4_mapped(array(&h, 12)?), v4_mapped(array(&h, 16)?));
        (src, dst, h[9], at + ihl)
    };
    let h: [u8; L4_MIN_HLEN] = array(ip, l4)?;
    let (sport, dport) = match (proto, v6) {
        (IPPROTO_TCP | IPPROTO_UDP, _) => (
            u16::from_be_bytes([h[0], h[1]]),
            u16::from_be_bytes([h[2], h[3]]),
        ),
        (IPPROTO_ICMP, false) | (IPPROTO_ICMPV6, true) if echo(h[0], v6).is_some() => {
            let id = u16::from_be_bytes([h[4], h[5]]);
            (id, id)
        }
        _ => return None,
    };
    Some(Tuple {
        src: Endpoint {
            addr: src,
            port: sport,
        },
        dst: Endpoint {
            addr: dst,
            port: dport,
        },
        proto,
    })
}

/// `N` bytes at `at`, if there are that many.
fn array<const N: usize>(bytes: &[u8], at: usize) -> Option<[u8; N]> {
    bytes.get(at..at + N)?.try_into().ok()
}

fn be16(bytes: &[u8], at: usize) -> Option<u16> {
    array(bytes, at).map(u16::from_be_bytes)
}

fn v4_mapped(octets: [u8; 4]) -> Ipv6Addr {
    Ipv4Addr::from(octets).to_ipv6_mapped()
}

#[cfg(test)]
mod tests {
    use super::{super::frames::*, *};

    const A: [u8; 4] = [10, 0, 0, 1];
    const B: [u8; 4] = [10, 0, 0, 2];
    const A6: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
    const B6: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];

    fn ip(frame: &[u8], l2: bool) -> Packet {
        match parse(frame, l2) {
            Parsed::Ip(packet) => packet,
            other => panic!("{other:?}"),
        }
    }

    fn tuple(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, proto: u8) -> Tuple {
        Tuple {
            src: Endpoint {
                addr: v4_mapped(src),
                port: sport,
            },
            dst: Endpoint {
                addr: v4_mapped(dst),
                port: dport,
            },
            proto,
        }
    }

    #[test]
    fn ethernet_with_up_to_two_vlan_tags() {
        let packet = ipv4(A, B, IPPROTO_UDP, &udp(1, 2));
        for tags in [&[][..], &[0x8100], &[0x88a8, 0x8100]] {
            let frame = ethernet(ETH_P_IP, tags, &packet);
            assert_eq!(ip(&frame, true).l4, L4::Udp { sport: 1, dport: 2 });
        }
        let three = ethernet(ETH_P_IP, &[0x88a8, 0x8100, 0x8100], &packet);
        assert_eq!(parse(&three, true), Parsed::Malformed);
        // The tag is cut short before its ethertype.
        let cut = ethernet(ETH_P_IP, &[0x8100], &packet);
        assert_eq!(parse(&cut[..17], true), Parsed::Malformed);
        assert_eq!(parse(&cut[..13], true), Parsed::Malformed);
        // Non-IP is passed whole, however short the rest.
        assert_eq!(
            parse(&ethernet(0x0806, &[], &[]), true),
            Parsed::Passthrough
        );
        assert_eq!(
            parse(&ethernet(0x0806, &[0x8100], &[]), true),
            Parsed::Passthrough
        );
    }

    #[test]
    fn bare_ip_by_version_nibble() {
        assert_eq!(ip(&ipv4(A, B, 47, &[]), false).l4, L4::Other);
        assert_eq!(ip(&ipv6(A6, B6, 59, &[]), false).l4, L4::Other);
        assert_eq!(parse(&[], false), Parsed::Malformed);
        assert_eq!(parse(&[0x50; 40], false), Parsed::Malformed);
        // An Ethernet frame whose ethertype and version disagree.
        let v6_as_v4 = ethernet(ETH_P_IP, &[], &ipv6(A6, B6, 59, &[0; 8]));
        assert_eq!(parse(&v6_as_v4, true), Parsed::Malformed);
    }

    #[test]
    fn ipv4_header_checks() {
        let good = ipv4(A, B, IPPROTO_UDP, &udp(1, 2));
        let with = |at: usize, byte: u8| {
            let mut bad = good.clone();
            bad[at] = byte;
            parse(&bad, false)
        };
        assert_eq!(with(0, 0x44), Parsed::Malformed, "IHL < 5");
        assert_eq!(with(3, 19), Parsed::Malformed, "total < IHL");
        assert_eq!(with(3, 29), Parsed::Malformed, "total beyond the frame");
        assert_eq!(
            with(3, 27),
            Parsed::Malformed,
            "UDP cut by the total length"
        );
        assert_eq!(parse(&good[..19], false), Parsed::Malformed);
        // Options are skipped.
        let mut options = good.clone();
        options[0] = 0x46;
        options[3] += 4;
        options.splice(20..20, [1, 1, 1, 0]);
        assert_eq!(ip(&options, false).l4, L4::Udp { sport: 1, dport: 2 });
    }

    #[test]
    fn l4_headers_must_lie_within_the_ip_packet() {
        let mut short = ipv4(A, B, IPPROTO_TCP, &tcp(1, 2, 0)[..19]);
        assert_eq!(parse(&short, false), Parsed::Malformed);
        // Link-layer padding after the packet does not complete it.
        short.push(0);
        assert_eq!(parse(&short, false), Parsed::Malformed);
        let padded = [ipv4(A, B, IPPROTO_TCP, &tcp(1, 2, 0x11)), vec![0; 6]].concat();
        assert_eq!(
            ip(&padded, false).l4,
            L4::Tcp {
                sport: 1,
                dport: 2,
                flags: 0x11
            }
        );
        for proto in [IPPROTO_UDP, IPPROTO_ICMP] {
            assert_eq!(parse(&ipv4(A, B, proto, &[0; 7]), false), Parsed::Malformed);
        }
        assert_eq!(
            parse(&ipv6(A6, B6, IPPROTO_ICMPV6, &[128; 7]), false),
            Parsed::Malformed
        );
    }

    #[test]
    fn ipv6_extension_headers() {
        let chain = |count: usize| {
            let mut payload = Vec::new();
            for i in 0..count {
                let next = if i + 1 == count {
                    IPPROTO_UDP
                } else {
                    IPPROTO_DSTOPTS
                };
                payload.extend(ext(next, [0; 7]));
            }
            payload.extend(udp(1, 2));
            ipv6(A6, B6, IPPROTO_HOPOPTS, &payload)
        };
        assert_eq!(ip(&chain(6), false).l4, L4::Udp { sport: 1, dport: 2 });
        assert_eq!(parse(&chain(7), false), Parsed::Malformed);
        // A header longer than what is left of the packet.
        let long = ipv6(A6, B6, IPPROTO_ROUTING, &ext(59, [1, 0, 0, 0, 0, 0, 0]));
        assert_eq!(parse(&long, false), Parsed::Malformed);
        let mut cut = chain(1);
        cut[5] -= 1;
        assert_eq!(
            parse(&cut, false),
            Parsed::Malformed,
            "payload length short"
        );
        cut[5] += 2;
        assert_eq!(parse(&cut, false), Parsed::Malformed, "payload length long");
    }

    #[test]
    fn fragments() {
        let first = ipv4_fragment(A, B, IPPROTO_UDP, 9, 0, true, &udp(1, 2));
        let datagram = Datagram {
            src: v4_mapped(A),
            dst: v4_mapped(B),
            proto: IPPROTO_UDP,
            id: 9,
        };
        assert_eq!(ip(&first, false).fragment, Fragment::First(datagram));
        let later = ip(
            &ipv4_fragment(A, B, IPPROTO_UDP, 9, 1, false, &[0; 3]),
            false,
        );
        assert_eq!(
            (later.fragment, later.l4),
            (Fragment::Later(datagram), L4::Other)
        );
        let last = ipv4_fragment(A, B, IPPROTO_UDP, 9, 0, false, &udp(1, 2));
        assert_eq!(ip(&last, false).fragment, Fragment::Whole);

        // IPv6, with a Destination Options header after the Fragment header
        // in the first fragment: every fragment names it as the protocol.
        let id = [0, 0, 0, 9];
        let fragment = |offset_flags: u16, rest: &[u8]| {
            let [hi, lo] = offset_flags.to_be_bytes();
            let header = ext(IPPROTO_DSTOPTS, [0, hi, lo, id[0], id[1], id[2], id[3]]);
            ipv6(A6, B6, IPPROTO_FRAGMENT, &[header, rest.to_vec()].concat())
        };
        let datagram = Datagram {
            src: A6.into(),
            dst: B6.into(),
            proto: IPPROTO_DSTOPTS,
            id: 9,
        };
        let rest = [ext(IPPROTO_UDP, [0; 7]), udp(1, 2)].concat();
        let first = ip(&fragment(1, &rest), false);
        assert_eq!(first.fragment, Fragment::First(datagram));
        assert_eq!(first.l4, L4::Udp { sport: 1, dport: 2 });
        assert_eq!(
            ip(&fragment(8 << 3, &[0; 8]), false).fragment,
            Fragment::Later(datagram)
        );
        // An atomic fragment is whole.
        assert_eq!(ip(&fragment(0, &rest), false).fragment, Fragment::Whole);
    }

    #[test]
    fn icmp_kinds_by_family() {
        let v4 = |kind| {
            ip(
                &ipv4(A, B, IPPROTO_ICMP, &icmp(kind, [0, 5, 0, 1], &[])),
                false,
            )
            .l4
        };
        let v6 = |kind| {
            ip(
                &ipv6(A6, B6, IPPROTO_ICMPV6, &icmp(kind, [0, 5, 0, 1], &[])),
                false,
            )
            .l4
        };
        assert_eq!(
            v4(8),
            L4::Echo {
                id: 5,
                request: true
            }
        );
        assert_eq!(
            v4(0),
            L4::Echo {
                id: 5,
                request: false
            }
        );
        assert_eq!(
            v6(128),
            L4::Echo {
                id: 5,
                request: true
            }
        );
        assert_eq!(
            v6(129),
            L4::Echo {
                id: 5,
                request: false
            }
        );
        for kind in [3, 11, 12] {
            assert_eq!(v4(kind), L4::Error { quoted: None });
        }
        for kind in 1..=4 {
            assert_eq!(v6(kind), L4::Error { quoted: None });
        }
        for (l4, kind) in [(v4(128), 128), (v4(13), 13), (v6(8), 8), (v6(130), 130)] {
            assert_eq!(l4, L4::Other, "type {kind}");
        }
        for kind in 133..=137 {
            let nd = ipv6(A6, B6, IPPROTO_ICMPV6, &icmp(kind, [0; 4], &[]));
            assert_eq!(parse(&nd, false), Parsed::Passthrough);
        }
        // ICMP of the other family is some other protocol.
        let mixed = ipv6(A6, B6, IPPROTO_ICMP, &icmp(8, [0, 5, 0, 1], &[]));
        assert_eq!(ip(&mixed, false).l4, L4::Other);
    }

    #[test]
    fn icmp_errors_name_the_flow_they_quote() {
        let error =
            |quote: &[u8]| match ip(&ipv4(B, A, IPPROTO_ICMP, &icmp(3, [0; 4], quote)), false).l4 {
                L4::Error { quoted } => quoted,
                other => panic!("{other:?}"),
            };
        let sent = ipv4(A, B, IPPROTO_TCP, &tcp(40000, 443, 0));
        assert_eq!(
            error(&sent[..28]),
            Some(tuple(A, 40000, B, 443, IPPROTO_TCP))
        );
        assert_eq!(error(&sent[..27]), None, "fewer than 8 L4 bytes");
        let echo = ipv4(A, B, IPPROTO_ICMP, &icmp(8, [0, 5, 0, 1], &[]));
        assert_eq!(error(&echo), Some(tuple(A, 5, B, 5, IPPROTO_ICMP)));
        let timestamp = ipv4(A, B, IPPROTO_ICMP, &icmp(13, [0, 5, 0, 1], &[]));
        assert_eq!(error(&timestamp), None, "not an echo");
        assert_eq!(error(&ipv4(A, B, 47, &[0; 8])), None, "no ports");
        let mut bad_ihl = sent.clone();
        bad_ihl[0] = 0x44;
        assert_eq!(error(&bad_ihl[..28]), None);

        let error6 = |quote: &[u8]| match ip(
            &ipv6(B6, A6, IPPROTO_ICMPV6, &icmp(2, [0; 4], quote)),
            false,
        )
        .l4
        {
            L4::Error { quoted } => quoted,
            other => panic!("{other:?}"),
        };
        let sent6 = ipv6(A6, B6, IPPROTO_UDP, &udp(5353, 53));
        let named = error6(&sent6).expect("a UDP quote");
        assert_eq!(
            (named.src.port, named.dst.port, named.proto),
            (5353, 53, IPPROTO_UDP)
        );
        let mut not_v6 = sent6.clone();
        not_v6[0] = 0x40;
        assert_eq!(error6(&not_v6), None);
        let with_ext = ipv6(
            A6,
            B6,
            IPPROTO_DSTOPTS,
            &[ext(IPPROTO_UDP, [0; 7]), udp(1, 2)].concat(),
        );
        assert_eq!(
            error6(&with_ext),
            None,
            "extension headers are not followed"
        );
        // The quote must lie within the error's IP packet.
        let mut truncated = ipv4(B, A, IPPROTO_ICMP, &icmp(3, [0; 4], &sent[..28]));
        truncated[3] -= 1;
        truncated.pop();
        let padded = [truncated, vec![0]].concat();
        assert_eq!(ip(&padded, false).l4, L4::Error { quoted: None });
    }
}
