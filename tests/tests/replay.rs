//! `policy replay` through the library: captures written by the test with
//! timestamps, a real policy file, the programs in the running kernel; and
//! every shared capture through the example policy.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use mesh_agent::replay::{ReplayVerdict, Replayer, replay};
use mesh_tests::{
    packet::{Packet, TCP_SYN},
    pcap::{self, LINKTYPE_ETHERNET, LINKTYPE_RAW},
    require_root,
};
use time::{OffsetDateTime, format_description::well_known::Rfc3339};

const POLICY: &str = r#"
version = 1
trust_domain = "acme.internal"

[[identity]]
id = "spiffe://acme.internal/agent/invoice-bot"
addresses = ["100.96.1.10/32"]

[[service]]
name = "billing-api"
addresses = ["10.20.0.5/32"]
ports = ["443/tcp", "8443/tcp"]

[[grant]]
from = ["spiffe://acme.internal/agent/invoice-bot"]
to = ["billing-api"]
ports = ["443/tcp"]
rate = "2/s"

[[grant]]
from = ["spiffe://acme.internal/agent/invoice-bot"]
to = ["billing-api"]
ports = ["8443/tcp"]
expires = "2026-06-01T00:00:01Z"
"#;

const BOT: &str = "spiffe://acme.internal/agent/invoice-bot";
const API: &str = "billing-api";

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

fn syn(src: &str, sport: u16, dport: u16) -> Packet {
    Packet::tcp(ip(src), sport, ip("10.20.0.5"), dport, TCP_SYN)
}

fn at(rfc3339: &str) -> SystemTime {
    OffsetDateTime::parse(rfc3339, &Rfc3339).unwrap().into()
}

fn verdict(
    packet: usize,
    allow: bool,
    reason: &'static str,
    source: Option<&str>,
    service: Option<&str>,
) -> ReplayVerdict {
    ReplayVerdict {
        packet,
        verdict: if allow { "allow" } else { "deny" },
        reason,
        source: source.map(str::to_owned),
        service: service.map(str::to_owned),
    }
}

struct Files {
    _dir: tempfile::TempDir,
    policy: PathBuf,
    capture: PathBuf,
}

fn files(link_type: u32, packets: &[(u64, Packet)]) -> Files {
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.toml");
    std::fs::write(&policy, POLICY).unwrap();
    let capture = dir.path().join("capture.pcap");
    let start = Duration::from_secs(1_780_000_000);
    let records: Vec<(Duration, Vec<u8>)> = packets
        .iter()
        .map(|(ms, packet)| (start + Duration::from_millis(*ms), packet.bytes()))
        .collect();
    pcap::write(&capture, link_type, &records).unwrap();
    Files {
        _dir: dir,
        policy,
        capture,
    }
}

#[test]
fn verdicts_follow_the_capture_timeline() {
    require_root();
    let open = syn("100.96.1.10", 40000, 443);
    let packets = [
        (0, open.clone()),
        (1, open.reply()),
        (2, syn("100.96.1.10", 40001, 443)),
        (3, syn("100.96.1.10", 40002, 443)),
        (600, syn("100.96.1.10", 40003, 443)),
        (700, syn("10.9.9.9", 40004, 443)),
        (800, syn("100.96.1.10", 40005, 8443)),
        (1500, syn("100.96.1.10", 40006, 8443)),
    ];
    let files = files(LINKTYPE_ETHERNET, &packets);
    let verdicts = replay(&files.policy, &files.capture, at("2026-06-01T00:00:00Z")).unwrap();
    assert_eq!(
        verdicts,
        [
            verdict(1, true, "grant", Some(BOT), Some(API)),
            verdict(2, true, "flow", Some(BOT), Some(API)),
            verdict(3, true, "grant", Some(BOT), Some(API)),
            verdict(4, false, "rate-limited", Some(BOT), Some(API)),
            verdict(5, true, "grant", Some(BOT), Some(API)),
            verdict(6, false, "unknown-source", None, Some(API)),
            verdict(7, true, "grant", Some(BOT), Some(API)),
            verdict(8, false, "expired", Some(BOT), Some(API)),
        ]
    );
    let json = serde_json::to_string(&verdicts[5]).unwrap();
    assert_eq!(
        json,
        r#"{"packet":6,"verdict":"deny","reason":"unknown-source","source":null,"service":"billing-api"}"#
    );
}

#[test]
fn raw_ip_captures_run_through_the_same_programs() {
    require_root();
    let packets = [
        (0, syn("100.96.1.10", 40000, 443).bare()),
        (1, syn("100.96.1.10", 40000, 443).reply().bare()),
    ];
    let files = files(LINKTYPE_RAW, &packets);
    let verdicts = replay(&files.policy, &files.capture, at("2026-06-01T00:00:00Z")).unwrap();
    assert_eq!(
        verdicts,
        [
            verdict(1, true, "grant", Some(BOT), Some(API)),
            verdict(2, true, "flow", Some(BOT), Some(API))
        ]
    );
}

/// Every capture of the shared corpus, many crafted to crash parsers, runs
/// to the end with one verdict per packet.
#[test]
fn every_shared_capture_replays() {
    require_root();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let policy = root.join("examples/policy.toml");
    let corpus = root.join("../shared/captures");
    let mut captures: Vec<PathBuf> = walk(&corpus);
    captures.sort();
    let now = at("2026-06-01T00:00:00Z");
    let mut replayer = Replayer::new(&policy).unwrap();
    let (mut replayed, mut packets) = (0, 0);
    for capture in &captures {
        let Ok(expected) = mesh_agent::capture::read_capture(capture) else {
            continue;
        };
        let verdicts = replayer
            .replay(capture, now)
            .unwrap_or_else(|err| panic!("{}: {err:#}", capture.display()));
        assert_eq!(verdicts.len(), expected.len(), "{}", capture.display());
        assert!(verdicts.iter().enumerate().all(|(i, v)| v.packet == i + 1));
        replayed += 1;
        packets += verdicts.len();
    }
    eprintln!("replayed {replayed} captures, {packets} packets");
    assert!(replayed >= 505, "only {replayed} captures replayed");
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap_or_else(|err| panic!("{}: {err}", dir.display())) {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files
}
