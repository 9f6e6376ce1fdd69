//! Building test frames byte by byte: Ethernet (with VLAN tags) or bare IP,
//! IPv4 with options, IPv6 with extension headers, fragments, TCP, UDP, ICMP
//! echo and ICMP errors quoting another packet.

use std::net::IpAddr;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// The L4 part of a packet.
#[derive(Clone, Debug)]
pub enum L4 {
    Tcp {
        sport: u16,
        dport: u16,
        flags: u8,
    },
    Udp {
        sport: u16,
        dport: u16,
    },
    /// ICMP or ICMPv6 (by the packet's family): type, code, and the rest of
    /// the header (identifier and sequence for echo).
    Icmp {
        kind: u8,
        code: u8,
        rest: [u8; 4],
        body: Vec<u8>,
    },
    /// Any protocol number with an opaque payload.
    Raw {
        proto: u8,
        payload: Vec<u8>,
    },
}

/// An IPv6 extension header in front of the L4 header.
#[derive(Clone, Copy, Debug)]
pub enum Ext {
    HopByHop,
    Routing,
    DestinationOptions,
}

/// Where a fragment sits in its datagram.
#[derive(Clone, Copy, Debug)]
pub struct Fragment {
    pub id: u32,
    /// In 8-byte units.
    pub offset: u16,
    pub more: bool,
}

#[derive(Clone, Debug)]
pub struct Packet {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub l4: L4,
    /// 802.1Q/802.1ad tag protocol ids, outermost first.
    pub vlans: Vec<u16>,
    /// Bytes of IPv4 options (padded to 4 bytes when built).
    pub ipv4_options: Vec<u8>,
    pub ipv6_ext: Vec<Ext>,
    pub fragment: Option<Fragment>,
    /// Without an Ethernet header, as on L3 devices.
    pub bare: bool,
}

impl Packet {
    fn new(src: IpAddr, dst: IpAddr, l4: L4) -> Self {
        Self {
            src,
            dst,
            l4,
            vlans: Vec::new(),
            ipv4_options: Vec::new(),
            ipv6_ext: Vec::new(),
            fragment: None,
            bare: false,
        }
    }

    pub fn tcp(src: IpAddr, sport: u16, dst: IpAddr, dport: u16, flags: u8) -> Self {
        Self::new(
            src,
            dst,
            L4::Tcp {
                sport,
                dport,
                flags,
            },
        )
    }

    pub fn udp(src: IpAddr, sport: u16, dst: IpAddr, dport: u16) -> Self {
        Self::new(src, dst, L4::Udp { sport, dport })
    }

    /// An echo request, or the reply to one, with identifier `id`.
    pub fn echo(src: IpAddr, dst: IpAddr, id: u16, request: bool) -> Self {
        let kind = match (src.is_ipv4(), request) {
            (true, true) => 8,
            (true, false) => 0,
            (false, true) => 128,
            (false, false) => 129,
        };
        let [a, b] = id.to_be_bytes();
        Self::new(
            src,
            dst,
            L4::Icmp {
                kind,
                code: 0,
                rest: [a, b, 0, 1],
                body: vec![0; 8],
            },
        )
    }

    /// An ICMP error of `kind`/`code` from `src` quoting `quoted` (its IP
    /// header and L4 header, as routers do).
    pub fn icmp_error(src: IpAddr, kind: u8, code: u8, quoted: &Packet) -> Self {
        let mut inner = quoted.clone();
        inner.bare = true;
        inner.vlans.clear();
        let mut body = inner.bytes();
        body.truncate(quoted.ip_header_len() + 8);
        Self::new(
            src,
            quoted.src,
            L4::Icmp {
                kind,
                code,
                rest: [0; 4],
                body,
            },
        )
    }

    pub fn raw(src: IpAddr, dst: IpAddr, proto: u8, payload: Vec<u8>) -> Self {
        Self::new(src, dst, L4::Raw { proto, payload })
    }

    pub fn with_vlans(mut self, tpids: &[u16]) -> Self {
        self.vlans = tpids.to_vec();
        self
    }

    pub fn with_ipv4_options(mut self, options: &[u8]) -> Self {
        self.ipv4_options = options.to_vec();
        self
    }

    pub fn with_ext(mut self, ext: &[Ext]) -> Self {
        self.ipv6_ext = ext.to_vec();
        self
    }

    pub fn fragment(mut self, id: u32, offset: u16, more: bool) -> Self {
        self.fragment = Some(Fragment { id, offset, more });
        self
    }

    pub fn bare(mut self) -> Self {
        self.bare = true;
        self
    }

    /// The same flow in the other direction (ports swapped; echo requests
    /// become replies).
    pub fn reply(&self) -> Self {
        let l4 = match &self.l4 {
            L4::Tcp { sport, dport, .. } => L4::Tcp {
                sport: *dport,
                dport: *sport,
                flags: TCP_ACK,
            },
            L4::Udp { sport, dport } => L4::Udp {
                sport: *dport,
                dport: *sport,
            },
            L4::Icmp {
                kind,
                code,
                rest,
                body,
            } => {
                let kind = match kind {
                    8 => 0,
                    128 => 129,
                    other => *other,
                };
                L4::Icmp {
                    kind,
                    code: *code,
                    rest: *rest,
                    body: body.clone(),
                }
            }
            raw => raw.clone(),
        };
        Self {
            src: self.dst,
            dst: self.src,
            l4,
            ..self.clone()
        }
    }

    fn proto(&self) -> u8 {
        match &self.l4 {
            L4::Tcp { .. } => 6,
            L4::Udp { .. } => 17,
            L4::Icmp { .. } if self.src.is_ipv4() => 1,
            L4::Icmp { .. } => 58,
            L4::Raw { proto, .. } => *proto,
        }
    }

    fn ip_header_len(&self) -> usize {
        if self.src.is_ipv4() {
            20 + self.ipv4_options.len().div_ceil(4) * 4
        } else {
            40 + self.ipv6_ext.len() * 8 + if self.fragment.is_some() { 8 } else { 0 }
        }
    }

    fn l4_bytes(&self) -> Vec<u8> {
        if self.fragment.is_some_and(|f| f.offset > 0) {
            // Later fragments carry payload only.
            return vec![0xab; 16];
        }
        match &self.l4 {
            L4::Tcp {
                sport,
                dport,
                flags,
            } => {
                let mut h = vec![0u8; 20];
                h[0..2].copy_from_slice(&sport.to_be_bytes());
                h[2..4].copy_from_slice(&dport.to_be_bytes());
                h[12] = 5 << 4;
                h[13] = *flags;
                h
            }
            L4::Udp { sport, dport } => {
                let mut h = vec![0u8; 8];
                h[0..2].copy_from_slice(&sport.to_be_bytes());
                h[2..4].copy_from_slice(&dport.to_be_bytes());
                h[4..6].copy_from_slice(&8u16.to_be_bytes());
                h
            }
            L4::Icmp {
                kind,
                code,
                rest,
                body,
            } => {
                let mut h = vec![*kind, *code, 0, 0];
                h.extend_from_slice(rest);
                h.extend_from_slice(body);
                h
            }
            L4::Raw { payload, .. } => payload.clone(),
        }
    }

    /// The frame as it appears on the wire.
    pub fn bytes(&self) -> Vec<u8> {
        let l4 = self.l4_bytes();
        let ip = match (self.src, self.dst) {
            (IpAddr::V4(src), IpAddr::V4(dst)) => {
                let mut options = self.ipv4_options.clone();
                options.resize(options.len().div_ceil(4) * 4, 0);
                let ihl = 20 + options.len();
                let mut h = vec![0u8; 20];
                h[0] = 0x40 | (ihl / 4) as u8;
                h[2..4].copy_from_slice(&((ihl + l4.len()) as u16).to_be_bytes());
                if let Some(f) = self.fragment {
                    h[4..6].copy_from_slice(&(f.id as u16).to_be_bytes());
                    let flags = f.offset & 0x1fff | if f.more { 0x2000 } else { 0 };
                    h[6..8].copy_from_slice(&flags.to_be_bytes());
                }
                h[8] = 64;
                h[9] = self.proto();
                h[12..16].copy_from_slice(&src.octets());
                h[16..20].copy_from_slice(&dst.octets());
                h.extend_from_slice(&options);
                let sum = checksum(&h);
                h[10..12].copy_from_slice(&sum.to_be_bytes());
                h.extend_from_slice(&l4);
                h
            }
            (IpAddr::V6(src), IpAddr::V6(dst)) => {
                // Extension headers in order, then the fragment header, each
                // naming the next.
                let mut chain: Vec<(u8, Vec<u8>)> = self
                    .ipv6_ext
                    .iter()
                    .map(|ext| {
                        let kind = match ext {
                            Ext::HopByHop => 0,
                            Ext::Routing => 43,
                            Ext::DestinationOptions => 60,
                        };
                        (kind, vec![0u8; 8])
                    })
                    .collect();
                if let Some(f) = self.fragment {
                    let mut h = vec![0u8; 8];
                    let offset_flags = (f.offset << 3) | u16::from(f.more);
                    h[2..4].copy_from_slice(&offset_flags.to_be_bytes());
                    h[4..8].copy_from_slice(&f.id.to_be_bytes());
                    chain.push((44, h));
                }
                let first = chain.first().map_or(self.proto(), |(kind, _)| *kind);
                let mut payload = Vec::new();
                for i in 0..chain.len() {
                    let next = chain.get(i + 1).map_or(self.proto(), |(kind, _)| *kind);
                    let mut h = chain[i].1.clone();
                    h[0] = next;
                    payload.extend_from_slice(&h);
                }
                payload.extend_from_slice(&l4);
                let mut h = vec![0u8; 40];
                h[0] = 0x60;
                h[4..6].copy_from_slice(&(payload.len() as u16).to_be_bytes());
                h[6] = first;
                h[7] = 64;
                h[8..24].copy_from_slice(&src.octets());
                h[24..40].copy_from_slice(&dst.octets());
                h.extend_from_slice(&payload);
                h
            }
            _ => panic!("mixed address families: {} → {}", self.src, self.dst),
        };
        if self.bare {
            return ip;
        }
        let mut frame = vec![0x02, 0, 0, 0, 0, 0x02, 0x02, 0, 0, 0, 0, 0x01];
        for tpid in &self.vlans {
            frame.extend_from_slice(&tpid.to_be_bytes());
            frame.extend_from_slice(&7u16.to_be_bytes());
        }
        let ethertype: u16 = if self.src.is_ipv4() { 0x0800 } else { 0x86dd };
        frame.extend_from_slice(&ethertype.to_be_bytes());
        frame.extend_from_slice(&ip);
        frame
    }
}

/// The Internet checksum.
fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|pair| u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}
