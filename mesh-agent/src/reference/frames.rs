//! Test frames, byte by byte: just enough of each header for the parser.

/// A bare IPv4 packet (no options) around `l4`.
pub fn ipv4(src: [u8; 4], dst: [u8; 4], proto: u8, l4: &[u8]) -> Vec<u8> {
    ipv4_fragment(src, dst, proto, 0, 0, false, l4)
}

/// A bare IPv4 packet with fragment id, offset (in 8-byte units) and the
/// more-fragments flag.
pub fn ipv4_fragment(
    src: [u8; 4],
    dst: [u8; 4],
    proto: u8,
    id: u16,
    offset: u16,
    more: bool,
    l4: &[u8],
) -> Vec<u8> {
    let mut h = vec![0x45, 0];
    h.extend_from_slice(&(20 + l4.len() as u16).to_be_bytes());
    h.extend_from_slice(&id.to_be_bytes());
    h.extend_from_slice(&(offset | if more { 0x2000 } else { 0 }).to_be_bytes());
    h.extend_from_slice(&[64, proto, 0, 0]);
    h.extend_from_slice(&src);
    h.extend_from_slice(&dst);
    h.extend_from_slice(l4);
    h
}

/// A bare IPv6 packet whose first header after the fixed one is `next`.
pub fn ipv6(src: [u8; 16], dst: [u8; 16], next: u8, payload: &[u8]) -> Vec<u8> {
    let mut h = vec![0x60, 0, 0, 0];
    h.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    h.extend_from_slice(&[next, 64]);
    h.extend_from_slice(&src);
    h.extend_from_slice(&dst);
    h.extend_from_slice(payload);
    h
}

/// An 8-byte IPv6 extension header (hop-by-hop, routing, destination
/// options) or Fragment header with `fields` after the Next Header byte.
pub fn ext(next: u8, fields: [u8; 7]) -> Vec<u8> {
    let mut h = vec![next];
    h.extend_from_slice(&fields);
    h
}

pub fn ethernet(ethertype: u16, tags: &[u16], payload: &[u8]) -> Vec<u8> {
    let mut frame = vec![0x02, 0, 0, 0, 0, 2, 0x02, 0, 0, 0, 0, 1];
    for tpid in tags {
        frame.extend_from_slice(&tpid.to_be_bytes());
        frame.extend_from_slice(&[0, 7]);
    }
    frame.extend_from_slice(&ethertype.to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

pub fn tcp(sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    let mut h = vec![0; 20];
    h[..2].copy_from_slice(&sport.to_be_bytes());
    h[2..4].copy_from_slice(&dport.to_be_bytes());
    h[12] = 5 << 4;
    h[13] = flags;
    h
}

pub fn udp(sport: u16, dport: u16) -> Vec<u8> {
    let mut h = vec![0; 8];
    h[..2].copy_from_slice(&sport.to_be_bytes());
    h[2..4].copy_from_slice(&dport.to_be_bytes());
    h[4..6].copy_from_slice(&8u16.to_be_bytes());
    h
}

/// An ICMP or ICMPv6 message: type, code 0, the 4 bytes after the checksum
/// (identifier and sequence for echo), then `body`.
pub fn icmp(kind: u8, rest: [u8; 4], body: &[u8]) -> Vec<u8> {
    let mut h = vec![kind, 0, 0, 0];
    h.extend_from_slice(&rest);
    h.extend_from_slice(body);
    h
}
