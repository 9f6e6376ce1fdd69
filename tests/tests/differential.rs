//! Differential test: random compiled policies × random packet sequences
//! (replies, fragments, ICMP errors, VLANs, extension headers, truncations,
//! flipped bits, noise, revocations, policy swaps) through the kernel
//! programs (test_run with a fixed clock) and through the reference model
//! must give the same verdict, source and service for every packet, and the
//! same counters. So no packet, however mangled, is allowed unless the model
//! allows it.
//!
//! `MESH_DIFF_CASES` sets the number of cases (default 2000) and
//! `MESH_DIFF_SEED` the first seed (default: from the clock, printed); a
//! failure prints the seed that reproduces it and the packet.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::{Duration, SystemTime},
};

use mesh_agent::{
    datapath::{Clock, Datapath, Entry, GrantLimits, PolicyEntries, PortBlock, Prefix, Rate},
    reference::Model,
};
use mesh_common::{GRANTS_PER_KEY, identity, proto};
use mesh_tests::{
    packet::{Ext, Packet, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
    require_root,
};

const T0: u64 = 1_000_000_000_000;
const EVENTS_PER_CASE: usize = 40;

/// splitmix64: small, fast, and the same everywhere for a given seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

/// The address space cases draw from: small, so lookups hit often.
struct Space {
    v6: bool,
}

impl Space {
    fn addr(&self, net: u8, host: u8) -> IpAddr {
        if self.v6 {
            IpAddr::V6(Ipv6Addr::new(
                0xfd00,
                u16::from(net),
                0,
                0,
                0,
                0,
                0,
                u16::from(host),
            ))
        } else {
            IpAddr::V4(Ipv4Addr::new(10, net, 0, host))
        }
    }

    /// A prefix of `net` whose host part is `bits` long.
    fn prefix(&self, net: u8, host: u8, host_bits: u8) -> Prefix {
        let len = if self.v6 { 128 } else { 32 } - host_bits;
        let host = host & !((1u16 << host_bits) - 1) as u8;
        Prefix::new(self.addr(net, host), len)
    }
}

/// Disjoint (protocol, first, last) port ranges a destination class may offer.
const PORT_MENU: [(u8, u16, u16); 6] = [
    (proto::TCP, 80, 80),
    (proto::TCP, 440, 443),
    (proto::TCP, 444, 447),
    (proto::UDP, 53, 53),
    (proto::UDP, 1000, 1999),
    (proto::ICMP_ECHO, 0, 0),
];
const TAGS: [u32; 4] = [7, 8, 9, 10];
const SERVICES: u64 = 4;

fn random_entries(rng: &mut Rng, space: &Space, clock: &Clock) -> PolicyEntries {
    let mut entries = PolicyEntries::default();
    // Sources in net 0: hosts 1..=6, and nested prefixes.
    for host in 1..=6u8 {
        if rng.chance(70) {
            entries
                .identities
                .push((space.prefix(0, host, 0), *rng.pick(&TAGS)));
        }
    }
    for host_bits in [2u8, 4] {
        if rng.chance(50) {
            entries
                .identities
                .push((space.prefix(0, 0, host_bits), *rng.pick(&TAGS)));
        }
    }
    // Destinations in net 1: hosts and nested prefixes, each its own class.
    let mut class = 0;
    for (host, host_bits) in [(1u8, 0u8), (2, 0), (3, 0), (0, 2), (0, 4)] {
        if !rng.chance(70) {
            continue;
        }
        class += 1;
        entries
            .destinations
            .push((space.prefix(1, host, host_bits), class));
        for &(proto, first, last) in &PORT_MENU {
            if rng.chance(50) {
                let service = 1 + rng.below(SERVICES) as u32;
                let slot = rng.below(2) as u32;
                let blocks = if proto == proto::ICMP_ECHO {
                    vec![PortBlock {
                        proto,
                        port: 0,
                        bits: 16,
                    }]
                } else {
                    PortBlock::cover(proto, first, last)
                };
                entries.service_ports.extend(
                    blocks
                        .into_iter()
                        .map(|block| (class, block, service, slot)),
                );
            }
        }
    }
    let grants = 1 + rng.below(6) as u32;
    for _ in 0..grants {
        let expires = match rng.below(4) {
            0 => Some(clock.wall - Duration::from_secs(1)),
            1 => Some(clock.wall + Duration::from_millis(500 + rng.below(5000))),
            _ => None,
        };
        let rate = rng.chance(30).then(|| Rate {
            count: 1 + rng.below(3) as u32,
            period: Duration::from_secs(1),
        });
        entries.grant_limits.push(GrantLimits { expires, rate });
    }
    let mut keys = Vec::new();
    for _ in 0..rng.below(12) {
        let who = if rng.chance(20) {
            identity::ANY
        } else {
            *rng.pick(&TAGS)
        };
        let key = (who, 1 + rng.below(SERVICES) as u32, rng.below(2) as u32);
        if keys.contains(&key) {
            continue;
        }
        keys.push(key);
        let count = 1 + rng.below(GRANTS_PER_KEY as u64) as usize;
        let mut indexes: Vec<u32> = (0..count)
            .map(|_| rng.below(u64::from(grants)) as u32)
            .collect();
        indexes.dedup();
        entries.grants.push((key, indexes));
    }
    entries
}

/// A random packet: new, a reply to or a continuation of an earlier one, an
/// ICMP error quoting one, or a fragment; sometimes mangled. Returns the
/// packet (for later replies and errors) and its frame.
fn random_packet(rng: &mut Rng, space: &Space, history: &[Packet]) -> (Packet, Vec<u8>) {
    if let Some(earlier) =
        (!history.is_empty() && rng.chance(40)).then(|| rng.pick(history).clone())
    {
        let packet = match rng.below(4) {
            0 => earlier.reply(),
            1 => Packet::icmp_error(space.addr(2, 1), if space.v6 { 2 } else { 3 }, 4, &earlier),
            2 => Packet::icmp_error(
                space.addr(2, 1),
                if space.v6 { 1 } else { 11 },
                0,
                &earlier.reply(),
            ),
            _ => earlier,
        };
        return mangle(rng, packet);
    }
    let src = space.addr(*rng.pick(&[0, 0, 0, 1, 3]), rng.below(8) as u8);
    let dst = space.addr(*rng.pick(&[1, 1, 1, 0]), rng.below(5) as u8);
    let port = |rng: &mut Rng| *rng.pick(&[53, 80, 443, 444, 1000, 1500, 9999]);
    let mut packet = match rng.below(5) {
        0 | 1 => {
            let flags = *rng.pick(&[TCP_SYN, TCP_SYN, TCP_ACK, TCP_FIN | TCP_ACK, TCP_RST]);
            Packet::tcp(src, 30000 + rng.below(4) as u16, dst, port(rng), flags)
        }
        2 => Packet::udp(src, 30000 + rng.below(4) as u16, dst, port(rng)),
        3 => Packet::echo(src, dst, rng.below(3) as u16, rng.chance(80)),
        _ => Packet::raw(src, dst, *rng.pick(&[47, 132, 1, 58]), vec![0; 8]),
    };
    if rng.chance(15) {
        let id = rng.below(3) as u32;
        packet = if rng.chance(50) {
            packet.fragment(id, 0, true)
        } else {
            packet.fragment(id, 1 + rng.below(3) as u16, rng.chance(50))
        };
    }
    mangle(rng, packet)
}

/// VLAN tags, options, extension headers, truncation.
fn mangle(rng: &mut Rng, mut packet: Packet) -> (Packet, Vec<u8>) {
    if rng.chance(10) {
        let tags = [0x8100, 0x88a8, 0x8100];
        packet = packet.with_vlans(&tags[..1 + rng.below(3) as usize]);
    }
    if packet.src.is_ipv4() && rng.chance(10) {
        packet = packet.with_ipv4_options(&vec![1; 1 + rng.below(12) as usize]);
    }
    if packet.src.is_ipv6() && rng.chance(15) {
        let all = [Ext::HopByHop, Ext::Routing, Ext::DestinationOptions];
        let ext: Vec<Ext> = (0..1 + rng.below(7)).map(|_| *rng.pick(&all)).collect();
        packet = packet.with_ext(&ext);
    }
    let mut bytes = packet.bytes();
    if rng.chance(8) {
        bytes.truncate(14 + rng.below(bytes.len() as u64 - 13) as usize);
    }
    if rng.chance(8) {
        // Flip a few bytes past the Ethernet addresses.
        for _ in 0..1 + rng.below(4) {
            let at = 12 + rng.below(bytes.len() as u64 - 12) as usize;
            bytes[at] ^= 1 << rng.below(8);
        }
    }
    if rng.chance(3) {
        // Noise behind an IPv4 or IPv6 ethertype.
        let ethertype: &[u8] = if rng.chance(50) {
            &[0x08, 0x00]
        } else {
            &[0x86, 0xdd]
        };
        bytes = bytes[..12].to_vec();
        bytes.extend_from_slice(ethertype);
        bytes.extend((0..rng.below(120)).map(|_| rng.next() as u8));
    }
    (packet, bytes)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Runs one case on `datapath` (whose traffic state is forgotten first) and
/// on a fresh model; panics with the seed on the first difference.
fn run_case(datapath: &mut Datapath, entry: Entry, seed: u64) {
    let mut rng = Rng(seed);
    let space = Space { v6: rng.chance(40) };
    let clock = Clock {
        wall: SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000),
        boot_ns: T0,
    };
    let entries = random_entries(&mut rng, &space, &clock);
    datapath.forget_traffic().unwrap();
    // Revocations are state of their own, kept by forget_traffic.
    for tag in TAGS {
        datapath.unrevoke(tag).unwrap();
    }
    datapath.install(&entries, &clock).unwrap();
    let mut model = Model::new(&entries, &clock);
    let mut revoked = Vec::new();
    let mut history = Vec::new();
    let mut now = T0;
    for event in 0..EVENTS_PER_CASE {
        now += rng.below(700_000_000);
        match rng.below(50) {
            0 => {
                let tag = *rng.pick(&TAGS);
                datapath.revoke(tag).unwrap();
                model.revoke(tag);
                revoked.push(tag);
                continue;
            }
            1 if !revoked.is_empty() => {
                let tag = revoked.remove(0);
                datapath.unrevoke(tag).unwrap();
                model.unrevoke(tag);
                continue;
            }
            2 => {
                let entries = random_entries(&mut rng, &space, &clock);
                datapath.install(&entries, &clock).unwrap();
                model.install(&entries, &clock);
                continue;
            }
            _ => {}
        }
        let (packet, frame) = random_packet(&mut rng, &space, &history);
        datapath.set_clock(now).unwrap();
        let Ok(kernel) = datapath.test_run(entry, &frame) else {
            // TC's test run refuses frames whose IP header is cut; such a
            // frame never reaches either side.
            assert_eq!(
                entry,
                Entry::Tc,
                "seed {seed} event {event}: XDP refused {}",
                hex(&frame)
            );
            continue;
        };
        let expected = model.judge(&frame, true, now);
        let context = || {
            format!(
                "seed {seed} ({entry:?}), event {event} at +{} ns, frame {}\nentries: {entries:?}",
                now - T0,
                hex(&frame)
            )
        };
        assert_eq!(
            (kernel.reason, kernel.identity, kernel.service),
            (expected.reason, expected.identity, expected.service),
            "kernel vs model: {}",
            context()
        );
        assert_eq!(kernel.pass, expected.allow, "action: {}", context());
        history.push(packet);
        if history.len() > 8 {
            history.remove(0);
        }
    }
    assert_eq!(
        &datapath.counters().unwrap(),
        model.counters(),
        "counters: seed {seed} ({entry:?})"
    );
}

#[test]
fn kernel_matches_the_reference_model() {
    require_root();
    let cases: u64 = std::env::var("MESH_DIFF_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let first_seed: u64 = std::env::var("MESH_DIFF_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!(
        "differential: {cases} cases from seed {first_seed} (MESH_DIFF_SEED={first_seed} reproduces)"
    );
    let mut datapath = Datapath::load().unwrap();
    for case in 0..cases {
        let seed = first_seed.wrapping_add(case);
        let entry = if case % 2 == 0 { Entry::Xdp } else { Entry::Tc };
        run_case(&mut datapath, entry, seed);
    }
}
