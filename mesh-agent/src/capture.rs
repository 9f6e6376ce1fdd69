//! Reading packet captures for `policy replay`: every packet of a pcap or
//! pcapng file, in order, as an Ethernet frame ready for BPF_PROG_TEST_RUN.
//!
//! - **Link types.** Ethernet (1) frames are run as captured, cut short by
//!   the snapshot length if they were. Raw IP (101, 228, 229) packets get a
//!   synthetic Ethernet header: zero MAC addresses and the EtherType of IPv4
//!   (228) or IPv6 (229); for 101 the IP version nibble decides, and anything
//!   but 6 (4, garbage, an empty packet) is called IPv4 so that the datapath
//!   judges a bad packet as malformed. In a pcap file the link type is the
//!   whole file's, and any other one is an error even if there are no packets.
//!   In a pcapng file each interface has its own: interfaces of other link
//!   types are fine as long as no packet was captured on them, and a capture
//!   may mix Ethernet and raw IP interfaces.
//! - **Unrunnable frames.** A frame shorter than an Ethernet header or longer
//!   than [`MAX_TEST_RUN_FRAME`] cannot be test-run; it is kept, in its place,
//!   as [`Frame::Unrunnable`] so that replay can report it as malformed.
//! - **Damaged files.** A file that is not a capture, is truncated, or has a
//!   malformed record anywhere is an error naming the file and the problem,
//!   even if many packets could be read before it: no partial capture is ever
//!   returned as if it were the whole one.
//! - **Timestamps** are since the Unix epoch. pcapng Simple Packet Blocks
//!   have none, and neither does a packet whose interface declares a time
//!   resolution or offset that cannot be represented.

use std::{
    fmt, fs, io,
    path::{Path, PathBuf},
    time::Duration,
};

use pcap_parser::{
    Block, InterfaceDescriptionBlock, PcapBlockOwned, PcapError, create_reader,
    traits::PcapNGPacketBlock,
};

/// Length of an Ethernet header; BPF_PROG_TEST_RUN refuses shorter frames.
pub const ETH_HLEN: usize = 14;

/// The longest frame BPF_PROG_TEST_RUN takes for an XDP program.
///
/// `bpf_prog_test_run_xdp` (net/bpf/test_run.c, Linux 5.18 and later) puts
/// the first `PAGE_SIZE - XDP_PACKET_HEADROOM -
/// SKB_DATA_ALIGN(sizeof(struct skb_shared_info))` = 4096 - 256 - 320 = 3520
/// bytes in the linear buffer and the rest in up to `MAX_SKB_FRAGS` (17)
/// page-sized fragments, whether or not the program declared fragment
/// support; longer data fails with ENOMEM. The programs read packets with
/// `bpf_xdp_load_bytes` and `bpf_xdp_get_buff_len`, which cover the
/// fragments, so they judge such frames whole. This is the limit on x86-64
/// with 4 KiB pages and the default fragment count; larger pages or more
/// fragments only raise it.
pub const MAX_TEST_RUN_FRAME: usize = 3520 + 17 * 4096;

const LINKTYPE_ETHERNET: u32 = 1;
const LINKTYPE_RAW: u32 = 101;
const LINKTYPE_IPV4: u32 = 228;
const LINKTYPE_IPV6: u32 = 229;

/// In a pcap header the link type is the low 16 bits; libpcap keeps FCS
/// information in the upper ones, and real captures set them.
const PCAP_LINKTYPE_MASK: u32 = 0xFFFF;

const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_IPV6: u16 = 0x86DD;

/// pcapng's obsolete Packet Block, which the parser does not decode.
const OBSOLETE_PACKET_BLOCK: u32 = 2;

const TICKS_PER_SECOND_MICROS: u64 = 1_000_000;
const TICKS_PER_SECOND_NANOS: u64 = 1_000_000_000;

/// One packet of a capture.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CapturedPacket {
    /// Position in the capture, from 1.
    pub number: usize,
    /// When it was captured, since the Unix epoch, if the capture says.
    pub timestamp: Option<Duration>,
    pub frame: Frame,
}

/// What a captured packet is run as.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    /// An Ethernet frame BPF_PROG_TEST_RUN accepts.
    Ethernet(Vec<u8>),
    /// A packet that cannot be run at all.
    Unrunnable(Unrunnable),
}

/// Why a packet cannot be run; `len` is the frame's length in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unrunnable {
    ShorterThanEthernetHeader { len: usize },
    LongerThanTestRunFrame { len: usize },
}

impl fmt::Display for Unrunnable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ShorterThanEthernetHeader { len } => write!(
                f,
                "{len} bytes, shorter than an Ethernet header ({ETH_HLEN} bytes)"
            ),
            Self::LongerThanTestRunFrame { len } => write!(
                f,
                "{len} bytes, larger than the largest XDP test-run frame ({MAX_TEST_RUN_FRAME} bytes)"
            ),
        }
    }
}

/// Why [`read_capture`] failed.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("{}: cannot read", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{}: {problem}", path.display())]
    Invalid { path: PathBuf, problem: FormatError },
}

/// What is wrong with a file that could be read.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("empty file; expected a pcap or pcapng capture")]
    Empty,
    #[error("not a pcap or pcapng file, or its file header is damaged")]
    NotACapture,
    #[error("the file ends inside its file header")]
    TruncatedHeader,
    #[error(
        "truncated record at offset {offset}: it claims more bytes than the file or its block holds"
    )]
    TruncatedRecord { offset: usize },
    #[error("malformed record at offset {offset}")]
    MalformedRecord { offset: usize },
    #[error("obsolete pcapng Packet Block at offset {offset} is not supported")]
    ObsoletePacketBlock { offset: usize },
    #[error("unsupported link type {0} (expected Ethernet (1) or raw IP (101, 228, 229))")]
    UnsupportedLinkType(u32),
    #[error(
        "packet {packet} is on interface {interface}, whose link type {link_type} is unsupported \
         (expected Ethernet (1) or raw IP (101, 228, 229))"
    )]
    UnsupportedInterface {
        packet: usize,
        interface: u32,
        link_type: u32,
    },
    #[error("packet {packet} is on interface {interface}, which the file does not describe")]
    UnknownInterface { packet: usize, interface: u32 },
}

/// Reads every packet of the pcap or pcapng file at `path`, in order.
pub fn read_capture(path: &Path) -> Result<Vec<CapturedPacket>, CaptureError> {
    let bytes = fs::read(path).map_err(|source| CaptureError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse_capture(&bytes).map_err(|problem| CaptureError::Invalid {
        path: path.to_owned(),
        problem,
    })
}

fn parse_capture(bytes: &[u8]) -> Result<Vec<CapturedPacket>, FormatError> {
    // A buffer larger than the file holds any record that fits in the file,
    // so running out of room can only mean a record that runs past its end.
    let mut reader = create_reader(bytes.len() + 1, bytes).map_err(|error| match error {
        PcapError::Eof => FormatError::Empty,
        PcapError::Incomplete(_) => FormatError::TruncatedHeader,
        _ => FormatError::NotACapture,
    })?;
    let mut capture = Capture::default();
    loop {
        let offset = reader.consumed();
        match reader.next() {
            Ok((len, block)) => {
                capture.add(block, offset)?;
                reader.consume(len);
            }
            Err(PcapError::Eof) => return Ok(capture.packets),
            Err(PcapError::Incomplete(_)) => {
                // Loads the rest of the file; the next call then finds the
                // record complete or reports the file's end.
                if reader.refill().is_err() {
                    return Err(FormatError::TruncatedRecord { offset });
                }
            }
            Err(PcapError::UnexpectedEof | PcapError::BufferTooSmall) => {
                return Err(FormatError::TruncatedRecord { offset });
            }
            Err(_) => return Err(FormatError::MalformedRecord { offset }),
        }
    }
}

/// What has been read so far.
#[derive(Default)]
struct Capture {
    /// The current pcapng section's interfaces, or a pcap file's one.
    interfaces: Vec<Interface>,
    packets: Vec<CapturedPacket>,
}

impl Capture {
    fn add(&mut self, block: PcapBlockOwned<'_>, offset: usize) -> Result<(), FormatError> {
        match block {
            PcapBlockOwned::LegacyHeader(header) => {
                // Cast: the field holds the header's u32 bit for bit.
                let link_type = header.network.0 as u32 & PCAP_LINKTYPE_MASK;
                if LinkType::from_code(link_type).is_none() {
                    return Err(FormatError::UnsupportedLinkType(link_type));
                }
                self.interfaces.push(Interface {
                    link_type,
                    snaplen: header.snaplen,
                    ticks_per_second: Some(if header.is_nanosecond_precision() {
                        TICKS_PER_SECOND_NANOS
                    } else {
                        TICKS_PER_SECOND_MICROS
                    }),
                    offset_seconds: 0,
                });
            }
            PcapBlockOwned::Legacy(record) => {
                let time = (record.ts_sec.into(), record.ts_usec.into());
                self.add_packet(0, Some(time), record.data)?;
            }
            PcapBlockOwned::NG(Block::SectionHeader(_)) => self.interfaces.clear(),
            PcapBlockOwned::NG(Block::InterfaceDescription(description)) => {
                self.interfaces.push(Interface::from(&description));
            }
            PcapBlockOwned::NG(Block::EnhancedPacket(packet)) => {
                let ticks = (u64::from(packet.ts_high) << 32) | u64::from(packet.ts_low);
                self.add_packet(packet.if_id, Some((0, ticks)), packet.packet_data())?;
            }
            PcapBlockOwned::NG(Block::SimplePacket(packet)) => {
                // A Simple Packet Block is on the section's first interface
                // and says only its original length: what was captured is cut
                // to the snapshot length, and the rest of the block is padding.
                let data = packet.packet_data();
                let captured = match self.interfaces.first().map(|first| first.snaplen) {
                    None | Some(0) => data,
                    Some(snaplen) => data.get(..snaplen as usize).unwrap_or(data),
                };
                self.add_packet(0, None, captured)?;
            }
            PcapBlockOwned::NG(Block::Unknown(unknown))
                if [unknown.block_type, unknown.block_type.swap_bytes()]
                    .contains(&OBSOLETE_PACKET_BLOCK) =>
            {
                // Skipping it would silently drop packets from the replay.
                return Err(FormatError::ObsoletePacketBlock { offset });
            }
            // Statistics, name resolution, secrets and the like: nothing to run.
            PcapBlockOwned::NG(_) => {}
        }
        Ok(())
    }

    /// `time` is whole seconds and ticks of the interface's resolution on
    /// top of them, as the block gives it.
    fn add_packet(
        &mut self,
        interface: u32,
        time: Option<(u64, u64)>,
        data: &[u8],
    ) -> Result<(), FormatError> {
        let number = self.packets.len() + 1;
        let described = usize::try_from(interface)
            .ok()
            .and_then(|index| self.interfaces.get(index))
            .ok_or(FormatError::UnknownInterface {
                packet: number,
                interface,
            })?;
        let link =
            LinkType::from_code(described.link_type).ok_or(FormatError::UnsupportedInterface {
                packet: number,
                interface,
                link_type: described.link_type,
            })?;
        self.packets.push(CapturedPacket {
            number,
            timestamp: time.and_then(|(seconds, ticks)| described.timestamp(seconds, ticks)),
            frame: link.frame(data),
        });
        Ok(())
    }
}

/// What a packet's bytes and timestamp mean.
struct Interface {
    link_type: u32,
    /// 0 for no limit.
    snaplen: u32,
    /// `None` when the declared resolution does not fit in 64 bits.
    ticks_per_second: Option<u64>,
    offset_seconds: i64,
}

impl From<&InterfaceDescriptionBlock<'_>> for Interface {
    fn from(description: &InterfaceDescriptionBlock<'_>) -> Self {
        Self {
            // Cast: the parser widens pcapng's 16-bit field.
            link_type: description.linktype.0 as u32,
            snaplen: description.snaplen,
            ticks_per_second: ticks_per_second(description.if_tsresol),
            offset_seconds: description.ts_offset(),
        }
    }
}

/// Decodes pcapng's `if_tsresol`: 10^-n seconds per tick, or 2^-n with the
/// top bit set. The parser's own decoding refuses every power of two.
fn ticks_per_second(resolution: u8) -> Option<u64> {
    let exponent = u32::from(resolution & 0x7f);
    if resolution & 0x80 == 0 {
        10_u64.checked_pow(exponent)
    } else {
        1_u64.checked_shl(exponent)
    }
}

impl Interface {
    /// Ticks of a second or more (a pcapng timestamp is all ticks; crafted
    /// pcap files have fractions that are) carry into the seconds.
    fn timestamp(&self, seconds: u64, ticks: u64) -> Option<Duration> {
        let per_second = self.ticks_per_second?;
        let seconds = seconds
            .checked_add(ticks / per_second)?
            .checked_add_signed(self.offset_seconds)?;
        let nanos = u128::from(ticks % per_second) * u128::from(TICKS_PER_SECOND_NANOS)
            / u128::from(per_second);
        Some(Duration::new(seconds, u32::try_from(nanos).ok()?))
    }
}

#[derive(Clone, Copy)]
enum LinkType {
    Ethernet,
    /// IPv4 or IPv6, by the version nibble.
    RawIp,
    Ipv4,
    Ipv6,
}

impl LinkType {
    fn from_code(code: u32) -> Option<Self> {
        match code {
            LINKTYPE_ETHERNET => Some(Self::Ethernet),
            LINKTYPE_RAW => Some(Self::RawIp),
            LINKTYPE_IPV4 => Some(Self::Ipv4),
            LINKTYPE_IPV6 => Some(Self::Ipv6),
            _ => None,
        }
    }

    fn frame(self, packet: &[u8]) -> Frame {
        let ethertype = match self {
            Self::Ethernet => return Frame::checked(packet.to_vec()),
            Self::RawIp if packet.first().is_some_and(|byte| byte >> 4 == 6) => ETHERTYPE_IPV6,
            Self::RawIp | Self::Ipv4 => ETHERTYPE_IPV4,
            Self::Ipv6 => ETHERTYPE_IPV6,
        };
        let mut frame = Vec::with_capacity(ETH_HLEN + packet.len());
        frame.extend_from_slice(&[0; 12]);
        frame.extend_from_slice(&ethertype.to_be_bytes());
        frame.extend_from_slice(packet);
        Frame::checked(frame)
    }
}

impl Frame {
    fn checked(frame: Vec<u8>) -> Self {
        match frame.len() {
            len if len < ETH_HLEN => {
                Self::Unrunnable(Unrunnable::ShorterThanEthernetHeader { len })
            }
            len if len > MAX_TEST_RUN_FRAME => {
                Self::Unrunnable(Unrunnable::LongerThanTestRunFrame { len })
            }
            _ => Self::Ethernet(frame),
        }
    }
}
