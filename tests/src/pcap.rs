//! Writing small pcap files for replay tests.

use std::{io, path::Path, time::Duration};

/// Link types the replay command accepts.
pub const LINKTYPE_ETHERNET: u32 = 1;
pub const LINKTYPE_RAW: u32 = 101;

/// Writes a microsecond pcap of `link_type` with one record per
/// (timestamp since the epoch, packet bytes).
pub fn write(path: &Path, link_type: u32, packets: &[(Duration, Vec<u8>)]) -> io::Result<()> {
    let mut out = Vec::new();
    out.extend_from_slice(&0xa1b2_c3d4u32.to_le_bytes());
    out.extend_from_slice(&2u16.to_le_bytes());
    out.extend_from_slice(&4u16.to_le_bytes());
    out.extend_from_slice(&0i32.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&65535u32.to_le_bytes());
    out.extend_from_slice(&link_type.to_le_bytes());
    for (at, bytes) in packets {
        let len = bytes.len() as u32;
        out.extend_from_slice(&(at.as_secs() as u32).to_le_bytes());
        out.extend_from_slice(&at.subsec_micros().to_le_bytes());
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(bytes);
    }
    std::fs::write(path, out)
}
