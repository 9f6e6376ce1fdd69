//! Reading captures for `policy replay`: golden tests on captures built
//! here, and every capture of tcpdump's test suite in the shared folder.

use std::{
    io::Write,
    path::{Path, PathBuf},
    time::Duration,
};

use mesh_agent::capture::{
    CaptureError, CapturedPacket, ETH_HLEN, FormatError, Frame, MAX_TEST_RUN_FRAME, Unrunnable,
    read_capture,
};

/// Captures beside the project, from tcpdump's test suite (see the README there).
const CORPUS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/captures");

/// Every one of the 505 captures there reads; fewer means a regression.
const CORPUS_READABLE: usize = 505;

const ETHERNET: u32 = 1;
const RAW: u32 = 101;
const IPV4: u32 = 228;
const IPV6: u32 = 229;
const LINUX_SLL: u32 = 113;

const PCAP_HEADER_LEN: usize = 24;
const PCAP_RECORD_HEADER_LEN: usize = 16;

/// An Ethernet frame: broadcast, IPv4, and a 20-byte payload.
fn ethernet_frame() -> Vec<u8> {
    let mut frame = vec![0xff; 6];
    frame.extend_from_slice(&[2, 0, 0, 0, 0, 1, 0x08, 0x00]);
    frame.extend_from_slice(&[0x45; 20]);
    frame
}

fn synthetic_ethernet(ethertype: u16, packet: &[u8]) -> Vec<u8> {
    let mut frame = vec![0; 12];
    frame.extend_from_slice(&ethertype.to_be_bytes());
    frame.extend_from_slice(packet);
    frame
}

/// A little-endian, microsecond pcap file; each record is (seconds,
/// microseconds, captured bytes), captured whole.
fn pcap(link_type: u32, records: &[(u32, u32, &[u8])]) -> Vec<u8> {
    pcap_with_magic(0xa1b2_c3d4, link_type, records)
}

fn pcap_with_magic(magic: u32, link_type: u32, records: &[(u32, u32, &[u8])]) -> Vec<u8> {
    let mut file = Vec::new();
    // Magic, version 2.4, time zone, accuracy, snapshot length, link type.
    for field in [magic, 0x0004_0002, 0, 0, 262_144, link_type] {
        file.extend_from_slice(&field.to_le_bytes());
    }
    for &(seconds, fraction, data) in records {
        let len = u32::try_from(data.len()).unwrap();
        for field in [seconds, fraction, len, len] {
            file.extend_from_slice(&field.to_le_bytes());
        }
        file.extend_from_slice(data);
    }
    file
}

/// A pcapng block, little-endian, its body padded to 32 bits.
fn block(block_type: u32, body: &[u8]) -> Vec<u8> {
    let padded = body.len().next_multiple_of(4);
    let total = u32::try_from(12 + padded).unwrap().to_le_bytes();
    let mut block = block_type.to_le_bytes().to_vec();
    block.extend_from_slice(&total);
    block.extend_from_slice(body);
    block.resize(8 + padded, 0);
    block.extend_from_slice(&total);
    block
}

fn section_header() -> Vec<u8> {
    let mut body = 0x1a2b_3c4d_u32.to_le_bytes().to_vec();
    body.extend_from_slice(&[1, 0, 0, 0]);
    body.extend_from_slice(&(-1_i64).to_le_bytes());
    block(0x0a0d_0d0a, &body)
}

fn interface(link_type: u16, snaplen: u32, options: &[u8]) -> Vec<u8> {
    let mut body = link_type.to_le_bytes().to_vec();
    body.extend_from_slice(&[0, 0]);
    body.extend_from_slice(&snaplen.to_le_bytes());
    body.extend_from_slice(options);
    block(1, &body)
}

/// The `if_tsresol` option: 10^-n seconds per tick, or 2^-n with the top bit set.
fn time_resolution(resolution: u8) -> Vec<u8> {
    vec![9, 0, 1, 0, resolution, 0, 0, 0, 0, 0, 0, 0]
}

fn enhanced_packet(interface: u32, ticks: u64, data: &[u8]) -> Vec<u8> {
    let len = u32::try_from(data.len()).unwrap();
    let mut body = Vec::new();
    for field in [interface, (ticks >> 32) as u32, ticks as u32, len, len] {
        body.extend_from_slice(&field.to_le_bytes());
    }
    body.extend_from_slice(data);
    block(6, &body)
}

fn simple_packet(original_len: u32, data: &[u8]) -> Vec<u8> {
    let mut body = original_len.to_le_bytes().to_vec();
    body.extend_from_slice(data);
    block(3, &body)
}

fn read(file: &[u8]) -> Result<Vec<CapturedPacket>, CaptureError> {
    let mut capture = tempfile::NamedTempFile::new().unwrap();
    capture.write_all(file).unwrap();
    read_capture(capture.path())
}

fn frames(file: &[u8]) -> Vec<Frame> {
    read(file)
        .unwrap()
        .into_iter()
        .map(|packet| packet.frame)
        .collect()
}

fn problem(file: &[u8]) -> FormatError {
    match read(file) {
        Err(CaptureError::Invalid { problem, .. }) => problem,
        other => panic!("expected an invalid capture, got {other:?}"),
    }
}

#[test]
fn ethernet_frames_are_run_as_captured() {
    let frame = ethernet_frame();
    let packets = read(&pcap(
        ETHERNET,
        &[
            (1_700_000_000, 250_000, &frame),
            (1_700_000_001, 0, &frame[..20]),
        ],
    ))
    .unwrap();
    assert_eq!(
        packets,
        [
            CapturedPacket {
                number: 1,
                timestamp: Some(Duration::new(1_700_000_000, 250_000_000)),
                frame: Frame::Ethernet(frame.clone()),
            },
            CapturedPacket {
                number: 2,
                timestamp: Some(Duration::from_secs(1_700_000_001)),
                frame: Frame::Ethernet(frame[..20].to_vec()),
            },
        ]
    );
}

#[test]
fn raw_ip_gets_an_ethernet_header_by_link_type_or_version() {
    let ipv4 = [0x45, 0, 0, 20];
    let ipv6 = [0x60, 0, 0, 0];
    let cases: [(u32, &[u8], u16); 7] = [
        (RAW, &ipv4, 0x0800),
        (RAW, &ipv6, 0x86dd),
        // Neither version: called IPv4, for the datapath to judge malformed.
        (RAW, &[0x55, 1, 2], 0x0800),
        (RAW, &[], 0x0800),
        // The link type decides, whatever the packet says.
        (IPV4, &ipv6, 0x0800),
        (IPV6, &ipv4, 0x86dd),
        (IPV6, &[], 0x86dd),
    ];
    for (link_type, packet, ethertype) in cases {
        assert_eq!(
            frames(&pcap(link_type, &[(0, 0, packet)])),
            [Frame::Ethernet(synthetic_ethernet(ethertype, packet))],
            "link type {link_type}, packet {packet:02x?}"
        );
    }
}

#[test]
fn frames_test_run_refuses_are_unrunnable() {
    let frame = ethernet_frame();
    let longest = vec![0; MAX_TEST_RUN_FRAME];
    let too_long = vec![0; MAX_TEST_RUN_FRAME + 1];
    let raw_too_long = vec![0x45; MAX_TEST_RUN_FRAME - ETH_HLEN + 1];
    assert_eq!(
        frames(&pcap(
            ETHERNET,
            &[
                (0, 0, &frame[..ETH_HLEN - 1]),
                (0, 0, &[]),
                (0, 0, &frame[..ETH_HLEN]),
                (0, 0, &longest),
                (0, 0, &too_long)
            ]
        )),
        [
            Frame::Unrunnable(Unrunnable::ShorterThanEthernetHeader { len: 13 }),
            Frame::Unrunnable(Unrunnable::ShorterThanEthernetHeader { len: 0 }),
            Frame::Ethernet(frame[..ETH_HLEN].to_vec()),
            Frame::Ethernet(longest),
            Frame::Unrunnable(Unrunnable::LongerThanTestRunFrame {
                len: MAX_TEST_RUN_FRAME + 1
            }),
        ]
    );
    assert_eq!(
        frames(&pcap(RAW, &[(0, 0, &raw_too_long)])),
        [Frame::Unrunnable(Unrunnable::LongerThanTestRunFrame {
            len: MAX_TEST_RUN_FRAME + 1
        })]
    );
    assert_eq!(
        Unrunnable::ShorterThanEthernetHeader { len: 13 }.to_string(),
        "13 bytes, shorter than an Ethernet header (14 bytes)"
    );
    assert_eq!(
        Unrunnable::LongerThanTestRunFrame { len: 73_153 }.to_string(),
        "73153 bytes, larger than the largest XDP test-run frame (73152 bytes)"
    );
}

#[test]
fn pcap_variants_read_alike() {
    let frame = ethernet_frame();
    // Big-endian: the same header and record fields, byte-swapped.
    let mut big_endian = 0xa1b2_c3d4_u32.to_be_bytes().to_vec();
    for half in [2_u16, 4] {
        big_endian.extend_from_slice(&half.to_be_bytes());
    }
    for field in [0, 0, 65_535, ETHERNET, 7, 8, 34, 60] {
        big_endian.extend_from_slice(&field.to_be_bytes());
    }
    big_endian.extend_from_slice(&frame);
    let packets = read(&big_endian).unwrap();
    assert_eq!(packets[0].timestamp, Some(Duration::new(7, 8_000)));
    assert_eq!(packets[0].frame, Frame::Ethernet(frame.clone()));

    let nanosecond = pcap_with_magic(0xa1b2_3c4d, ETHERNET, &[(7, 8, &frame)]);
    assert_eq!(
        read(&nanosecond).unwrap()[0].timestamp,
        Some(Duration::new(7, 8))
    );

    // Crafted fractions of a second or more carry into the seconds.
    let overfull = pcap(ETHERNET, &[(7, 2_500_000, &frame)]);
    assert_eq!(
        read(&overfull).unwrap()[0].timestamp,
        Some(Duration::new(9, 500_000_000))
    );

    // libpcap keeps FCS information above the low 16 bits; real captures set it.
    assert_eq!(
        frames(&pcap(0x3000_0000 | ETHERNET, &[(0, 0, &frame)])),
        [Frame::Ethernet(frame)]
    );
}

#[test]
fn unsupported_link_types_are_errors() {
    let frame = ethernet_frame();
    assert_eq!(
        problem(&pcap(LINUX_SLL, &[(0, 0, &frame)])),
        FormatError::UnsupportedLinkType(LINUX_SLL)
    );
    // Even without packets: the whole file is of that link type.
    let error = read(&pcap(LINUX_SLL, &[])).unwrap_err();
    assert!(
        error.to_string().ends_with(
            ": unsupported link type 113 (expected Ethernet (1) or raw IP (101, 228, 229))"
        ),
        "{error}"
    );
}

#[test]
fn damaged_files_are_errors_naming_the_file_and_the_problem() {
    let frame = ethernet_frame();
    let whole = pcap(ETHERNET, &[(0, 0, &frame), (0, 0, &frame)]);
    let second = PCAP_HEADER_LEN + PCAP_RECORD_HEADER_LEN + frame.len();
    // Cut inside the second record's data, then inside its header: readable
    // packets before the damage do not make a partial success.
    for cut in [whole.len() - 1, second + 8] {
        assert_eq!(
            problem(&whole[..cut]),
            FormatError::TruncatedRecord { offset: second }
        );
    }
    // A record claiming far more than the file holds.
    let mut oversized = whole.clone();
    oversized[second + 8..second + 12].copy_from_slice(&u32::MAX.to_le_bytes());
    assert_eq!(
        problem(&oversized),
        FormatError::TruncatedRecord { offset: second }
    );

    assert_eq!(problem(&whole[..10]), FormatError::TruncatedHeader);
    assert_eq!(problem(b""), FormatError::Empty);
    assert_eq!(
        problem(b"# a policy, not a capture\n"),
        FormatError::NotACapture
    );

    let mut capture = tempfile::NamedTempFile::new().unwrap();
    capture.write_all(&whole[..whole.len() - 1]).unwrap();
    let message = read_capture(capture.path()).unwrap_err().to_string();
    assert_eq!(
        message,
        format!(
            "{}: truncated record at offset {second}: it claims more bytes than the file or its block holds",
            capture.path().display()
        )
    );

    let missing = capture.path().with_extension("missing");
    match read_capture(&missing) {
        Err(error @ CaptureError::Read { .. }) => {
            assert_eq!(
                error.to_string(),
                format!("{}: cannot read", missing.display())
            );
        }
        other => panic!("expected a read error, got {other:?}"),
    }
}

#[test]
fn pcapng_packets_carry_their_interface_link_type_and_time() {
    let frame = ethernet_frame();
    let ipv6 = [0x60, 0, 0, 0, 0, 0, 0, 0];
    let mut file = section_header();
    // A snapshot length that cuts the frames short.
    file.extend(interface(ETHERNET as u16, 15, &[]));
    // Nanosecond ticks.
    file.extend(interface(IPV6 as u16, 0, &time_resolution(9)));
    // Never used, so its link type does not matter.
    file.extend(interface(LINUX_SLL as u16, 0, &[]));
    file.extend(enhanced_packet(0, 1_700_000_000_123_456, &frame[..15]));
    file.extend(enhanced_packet(1, 1_700_000_000_123_456_789, &ipv6));
    file.extend(simple_packet(60, &frame[..15]));
    let packets = read(&file).unwrap();
    assert_eq!(
        packets,
        [
            CapturedPacket {
                number: 1,
                timestamp: Some(Duration::new(1_700_000_000, 123_456_000)),
                frame: Frame::Ethernet(frame[..15].to_vec()),
            },
            CapturedPacket {
                number: 2,
                timestamp: Some(Duration::new(1_700_000_000, 123_456_789)),
                frame: Frame::Ethernet(synthetic_ethernet(0x86dd, &ipv6)),
            },
            // On the first interface, cut to its snapshot length: the
            // block's padding is not part of the packet.
            CapturedPacket {
                number: 3,
                timestamp: None,
                frame: Frame::Ethernet(frame[..15].to_vec())
            },
        ]
    );
}

#[test]
fn pcapng_time_resolutions() {
    let frame = ethernet_frame();
    let mut file = section_header();
    for resolution in [3, 0x80 | 20, 20] {
        file.extend(interface(ETHERNET as u16, 0, &time_resolution(resolution)));
    }
    file.extend(enhanced_packet(0, 5_500, &frame));
    file.extend(enhanced_packet(1, 5 << 20 | 1 << 19, &frame));
    // 10^20 ticks a second do not fit in 64 bits: no time rather than a wrong one.
    file.extend(enhanced_packet(2, 5, &frame));
    let timestamps: Vec<_> = read(&file)
        .unwrap()
        .into_iter()
        .map(|packet| packet.timestamp)
        .collect();
    assert_eq!(
        timestamps,
        [
            Some(Duration::from_millis(5_500)),
            Some(Duration::from_millis(5_500)),
            None
        ]
    );
}

#[test]
fn pcapng_sections_have_their_own_interfaces() {
    let ipv4 = [0x45, 0, 0, 20];
    let mut file = section_header();
    file.extend(interface(ETHERNET as u16, 0, &[]));
    file.extend(section_header());
    file.extend(interface(RAW as u16, 0, &[]));
    file.extend(enhanced_packet(0, 0, &ipv4));
    assert_eq!(
        frames(&file),
        [Frame::Ethernet(synthetic_ethernet(0x0800, &ipv4))]
    );
}

#[test]
fn pcapng_packets_on_unsupported_or_missing_interfaces_are_errors() {
    let frame = ethernet_frame();
    let mut file = section_header();
    file.extend(interface(ETHERNET as u16, 0, &[]));
    file.extend(interface(LINUX_SLL as u16, 0, &[]));
    file.extend(enhanced_packet(0, 0, &frame));

    let mut on_unsupported = file.clone();
    on_unsupported.extend(enhanced_packet(1, 0, &frame));
    let error = read(&on_unsupported).unwrap_err().to_string();
    assert!(
        error.ends_with(
            ": packet 2 is on interface 1, whose link type 113 is unsupported \
             (expected Ethernet (1) or raw IP (101, 228, 229))"
        ),
        "{error}"
    );

    let mut on_missing = file;
    on_missing.extend(enhanced_packet(2, 0, &frame));
    assert_eq!(
        problem(&on_missing),
        FormatError::UnknownInterface {
            packet: 2,
            interface: 2
        }
    );

    let mut before_any = section_header();
    before_any.extend(simple_packet(60, &frame));
    assert_eq!(
        problem(&before_any),
        FormatError::UnknownInterface {
            packet: 1,
            interface: 0
        }
    );
}

#[test]
fn damaged_pcapng_files_are_errors() {
    let frame = ethernet_frame();
    let mut file = section_header();
    file.extend(interface(ETHERNET as u16, 0, &[]));
    let packet_offset = file.len();
    file.extend(enhanced_packet(0, 0, &frame));

    assert_eq!(
        problem(&file[..file.len() - 1]),
        FormatError::TruncatedRecord {
            offset: packet_offset
        }
    );
    // The trailing copy of the block length disagrees with the leading one.
    let mut mismatched = file.clone();
    let last = mismatched.len() - 4;
    mismatched[last] ^= 4;
    assert_eq!(
        problem(&mismatched),
        FormatError::MalformedRecord {
            offset: packet_offset
        }
    );

    let mut obsolete = file.clone();
    obsolete.extend(block(2, &[0; 20]));
    assert_eq!(
        problem(&obsolete),
        FormatError::ObsoletePacketBlock { offset: file.len() }
    );

    assert_eq!(
        problem(&file[..section_header().len() - 1]),
        FormatError::NotACapture
    );
}

/// The files under `dir` and its subfolders, sorted.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap_or_else(|error| panic!("{}: {error}", dir.display()))
    {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(files_under(&path));
        } else {
            files.push(path);
        }
    }
    files.sort();
    files
}

#[test]
fn every_shared_capture_reads_or_fails_with_a_reason() {
    let (mut readable, mut errors, mut packets, mut unrunnable) = (0, 0, 0, 0);
    for path in files_under(Path::new(CORPUS)) {
        match read_capture(&path) {
            Ok(captured) => {
                readable += 1;
                packets += captured.len();
                for packet in &captured {
                    if let Frame::Unrunnable(reason) = &packet.frame {
                        unrunnable += 1;
                        println!("{} packet {}: {reason}", path.display(), packet.number);
                    }
                }
            }
            Err(error) => {
                errors += 1;
                // The README and the licence are not captures: they say so.
                let message = error.to_string();
                let prefix = format!("{}: ", path.display());
                assert!(
                    message.len() > prefix.len() && message.starts_with(&prefix),
                    "{message}"
                );
                println!("{message}");
            }
        }
    }
    println!(
        "{readable} captures read ({packets} packets, {unrunnable} unrunnable), {errors} files refused"
    );
    assert!(
        readable >= CORPUS_READABLE,
        "only {readable} captures read; expected at least {CORPUS_READABLE}"
    );
}
