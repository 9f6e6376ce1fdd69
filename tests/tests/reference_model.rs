//! The reference model of the verdict pipeline, reason by reason of the
//! spec, on frames built as they appear on the wire. No kernel needed.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::{Duration, SystemTime},
};

use mesh_agent::{
    datapath::{Clock, GrantLimits, PolicyEntries, PortBlock, Prefix, Rate},
    reference::{Model, ModelVerdict},
};
use mesh_common::{
    Reason::{self, *},
    identity::{ANY, UNKNOWN},
    proto,
    service::NONE,
    timeouts,
};
use mesh_tests::packet::{Ext, L4, Packet, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN};

const SECOND: u64 = 1_000_000_000;
const BOOT: u64 = 5_000 * SECOND;

// Identity tags.
const BOT: u32 = 1;
const TEAM: u32 = 2;
const LEAD: u32 = 3;
const GATEWAY: u32 = 4;

// Service ids, and (service, slot) pairs.
const BILLING: u32 = 1;
const SUBNET: u32 = 2;
const HTTPS: (u32, u32) = (BILLING, 0);
const ALT_HTTP: (u32, u32) = (BILLING, 1);
const DNS: (u32, u32) = (BILLING, 2);
const PING: (u32, u32) = (BILLING, 3);
const SSH: (u32, u32) = (SUBNET, 0);

const fn v4(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(a, b, c, d))
}

const fn v6(last: u16, net: u16) -> IpAddr {
    IpAddr::V6(Ipv6Addr::new(0xfd00, net, 0, 0, 0, 0, 0, last))
}

const BOT_IP: IpAddr = v4(100, 96, 1, 10);
const BOT_IP6: IpAddr = v6(0xa, 0x6d65);
/// In TEAM's /24.
const TEAMMATE_IP: IpAddr = v4(100, 96, 2, 20);
/// A host of its own inside TEAM's /24.
const LEAD_IP: IpAddr = v4(100, 96, 2, 7);
const GATEWAY_IP: IpAddr = v4(10, 20, 0, 1);
const GATEWAY_IP6: IpAddr = v6(1, 0x20);
const STRANGER_IP: IpAddr = v4(192, 0, 2, 99);
const STRANGER_IP6: IpAddr = v6(0x99, 0xdead);
/// BILLING's host, inside SUBNET's /24.
const API_IP: IpAddr = v4(10, 20, 0, 5);
const API_IP6: IpAddr = v6(5, 0x20);
const SUBNET_IP: IpAddr = v4(10, 20, 0, 9);
const NOWHERE_IP: IpAddr = v4(10, 99, 0, 1);

/// A grant as the policy compiler resolves it: source tags (or `ANY`),
/// (service, slot) pairs, limits.
struct Grant {
    from: Vec<u32>,
    to: Vec<(u32, u32)>,
    limits: GrantLimits,
}

fn grant(from: &[u32], to: &[(u32, u32)]) -> Grant {
    Grant {
        from: from.to_vec(),
        to: to.to_vec(),
        limits: GrantLimits::default(),
    }
}

impl Grant {
    /// Expiring `after` the start of the test's clock.
    fn expiring(mut self, after: Duration) -> Self {
        self.limits.expires = Some(clock_at(BOOT).wall + after);
        self
    }

    fn expired(mut self) -> Self {
        self.limits.expires = Some(clock_at(BOOT).wall - Duration::from_secs(1));
        self
    }

    fn rate(mut self, count: u32, period: Duration) -> Self {
        self.limits.rate = Some(Rate { count, period });
        self
    }
}

/// The two clocks, `boot_ns` into the test.
fn clock_at(boot_ns: u64) -> Clock {
    Clock {
        wall: SystemTime::UNIX_EPOCH
            + Duration::from_secs(1_780_000_000)
            + Duration::from_nanos(boot_ns - BOOT),
        boot_ns,
    }
}

/// The compiled entries of the test network with `grants`: identities BOT
/// (a host in each family), TEAM (a /24), LEAD (a host inside TEAM's /24)
/// and GATEWAY; BILLING on API (443/tcp, 8000-8099/tcp, 53/udp, icmp), and
/// SUBNET (22/tcp) on the /24 around it.
fn entries(grants: &[Grant]) -> PolicyEntries {
    let host = Prefix::host;
    // (class, protocol, ports, service, slot); class 1 is API's address,
    // class 2 the rest of the subnet.
    let claims = [
        (1, proto::TCP, 443, 443, HTTPS),
        (1, proto::TCP, 8000, 8099, ALT_HTTP),
        (1, proto::UDP, 53, 53, DNS),
        (1, proto::ICMP_ECHO, 0, 0, PING),
        // API's address does not claim 22: the subnet's claim holds there.
        (1, proto::TCP, 22, 22, SSH),
        (2, proto::TCP, 22, 22, SSH),
    ];
    let mut keyed: BTreeMap<(u32, u32, u32), Vec<u32>> = BTreeMap::new();
    for (index, grant) in grants.iter().enumerate() {
        for &from in &grant.from {
            for &(service, slot) in &grant.to {
                keyed
                    .entry((from, service, slot))
                    .or_default()
                    .push(index as u32);
            }
        }
    }
    PolicyEntries {
        identities: vec![
            (host(BOT_IP), BOT),
            (host(BOT_IP6), BOT),
            (Prefix::new(v4(100, 96, 2, 0), 24), TEAM),
            (host(LEAD_IP), LEAD),
            (host(GATEWAY_IP), GATEWAY),
            (host(GATEWAY_IP6), GATEWAY),
        ],
        destinations: vec![
            (host(API_IP), 1),
            (host(API_IP6), 1),
            (Prefix::new(v4(10, 20, 0, 0), 24), 2),
        ],
        service_ports: claims
            .into_iter()
            .flat_map(|(class, proto, first, last, (service, slot))| {
                PortBlock::cover(proto, first, last)
                    .into_iter()
                    .map(move |block| (class, block, service, slot))
            })
            .collect(),
        grants: keyed.into_iter().collect(),
        bound: Vec::new(),
        grant_limits: grants.iter().map(|grant| grant.limits).collect(),
    }
}

/// The model under test and the boot clock it judges at.
struct Node {
    model: Model,
    now: u64,
}

impl Node {
    fn new(grants: &[Grant]) -> Self {
        Self {
            model: Model::new(&entries(grants), &clock_at(BOOT)),
            now: BOOT,
        }
    }

    fn install(&mut self, grants: &[Grant]) {
        self.model.install(&entries(grants), &clock_at(self.now));
    }

    fn judge(&mut self, packet: &Packet) -> ModelVerdict {
        self.model.judge(&packet.bytes(), !packet.bare, self.now)
    }

    fn judge_frame(&mut self, frame: &[u8]) -> ModelVerdict {
        self.model.judge(frame, true, self.now)
    }

    fn wait(&mut self, ns: u64) {
        self.now += ns;
    }
}

fn verdict(reason: Reason, identity: u32, service: u32) -> ModelVerdict {
    ModelVerdict {
        allow: reason.allows(),
        reason,
        identity,
        service,
    }
}

fn billing(reason: Reason) -> ModelVerdict {
    verdict(reason, BOT, BILLING)
}

fn icmp(src: IpAddr, dst: IpAddr, kind: u8, rest: [u8; 4]) -> Packet {
    let mut packet = Packet::echo(src, dst, 0, true);
    packet.l4 = L4::Icmp {
        kind,
        code: 0,
        rest,
        body: vec![0; 16],
    };
    packet
}

#[test]
fn non_ip_frames_and_neighbour_discovery_pass_through() {
    let mut node = Node::new(&[]);
    let passthrough = verdict(Passthrough, UNKNOWN, NONE);
    let arp = [&[0xff; 6][..], &[2, 0, 0, 0, 0, 1], &[0x08, 0x06], &[0; 28]].concat();
    assert_eq!(node.judge_frame(&arp), passthrough);
    let tagged_arp = [&arp[..12], &[0x81, 0x00, 0, 7], &arp[12..]].concat();
    assert_eq!(node.judge_frame(&tagged_arp), passthrough);
    let all_nodes = "ff02::1".parse().unwrap();
    for kind in 133..=137 {
        let nd = icmp(STRANGER_IP6, all_nodes, kind, [0; 4]);
        assert_eq!(node.judge(&nd), passthrough, "type {kind}");
        assert_eq!(node.judge(&nd.bare()), passthrough, "type {kind}, bare");
    }
    // Other ICMPv6 is policed.
    let mld = icmp(STRANGER_IP6, all_nodes, 130, [0; 4]);
    assert_eq!(node.judge(&mld), verdict(UnknownDestination, UNKNOWN, NONE));
}

#[test]
fn truncated_or_inconsistent_headers_are_malformed() {
    let mut node = Node::new(&[grant(&[BOT], &[HTTPS, DNS])]);
    let malformed = verdict(Malformed, UNKNOWN, NONE);
    let syn = Packet::tcp(BOT_IP, 40000, API_IP, 443, TCP_SYN).bytes();
    // Cut in the Ethernet header, in the IPv4 header, short of its length.
    for len in [0, 13, 14 + 19, syn.len() - 1] {
        assert_eq!(node.judge_frame(&syn[..len]), malformed, "{len} bytes");
    }
    let mut short_ihl = syn.clone();
    short_ihl[14] = 0x44;
    assert_eq!(node.judge_frame(&short_ihl), malformed);
    let frame6 = Packet::udp(BOT_IP6, 5353, API_IP6, 53).bytes();
    assert_eq!(node.judge_frame(&frame6[..frame6.len() - 1]), malformed);
    // L4 headers cut short inside a consistent IP packet.
    for (src, dst, proto, len) in [
        (BOT_IP, API_IP, 6, 19),
        (BOT_IP, API_IP, 17, 7),
        (BOT_IP, API_IP, 1, 7),
        (BOT_IP6, API_IP6, 58, 7),
    ] {
        let cut = Packet::raw(src, dst, proto, vec![0; len]);
        assert_eq!(node.judge(&cut), malformed, "protocol {proto}");
    }
    // Six extension headers at most, a Fragment header counted.
    let five = [
        Ext::HopByHop,
        Ext::Routing,
        Ext::Routing,
        Ext::Routing,
        Ext::DestinationOptions,
    ];
    let six = [&five[..], &[Ext::DestinationOptions]].concat();
    let seven = [&six[..], &[Ext::Routing]].concat();
    let query6 = Packet::udp(BOT_IP6, 5353, API_IP6, 53);
    let first = query6.clone().with_ext(&five).fragment(1, 0, true);
    assert_eq!(node.judge(&first), billing(Grant));
    assert_eq!(node.judge(&query6.clone().with_ext(&six)), billing(Flow));
    let first = query6.clone().with_ext(&six).fragment(2, 0, true);
    assert_eq!(node.judge(&first), malformed);
    assert_eq!(node.judge(&query6.with_ext(&seven)), malformed);
    // A third VLAN tag, and a bare frame of no IP version.
    let tagged = Packet::tcp(BOT_IP, 40000, API_IP, 443, TCP_SYN);
    let three_tags = tagged.clone().with_vlans(&[0x88a8, 0x8100, 0x8100]);
    assert_eq!(node.judge(&three_tags), malformed);
    let mut bare = tagged.bare().bytes();
    bare[0] = 0x55;
    assert_eq!(node.model.judge(&bare, false, node.now), malformed);
    let (count, _) = node.model.counters()[&(UNKNOWN, NONE, Malformed)];
    assert_eq!(count, 14);
}

#[test]
fn replies_and_later_packets_of_a_flow_are_flow() {
    let mut node = Node::new(&[grant(&[BOT], &[HTTPS, DNS, PING])]);
    for (client, api) in [(BOT_IP, API_IP), (BOT_IP6, API_IP6)] {
        let syn = Packet::tcp(client, 40000, api, 443, TCP_SYN);
        assert_eq!(node.judge(&syn), billing(Grant));
        assert_eq!(node.judge(&syn.reply()), billing(Flow));
        let ack = Packet::tcp(client, 40000, api, 443, TCP_ACK);
        assert_eq!(node.judge(&ack), billing(Flow));
        let query = Packet::udp(client, 5353, api, 53);
        assert_eq!(node.judge(&query), billing(Grant));
        assert_eq!(node.judge(&query.reply()), billing(Flow));
        assert_eq!(node.judge(&query), billing(Flow));
        let ping = Packet::echo(client, api, 0x4d2, true);
        assert_eq!(node.judge(&ping), billing(Grant));
        assert_eq!(node.judge(&ping.reply()), billing(Flow));
        assert_eq!(node.judge(&ping), billing(Flow));
    }
}

#[test]
fn echo_requests_open_flows_whatever_their_identifier() {
    let mut node = Node::new(&[grant(&[BOT], &[PING])]);
    for id in [0, 1, 0x4d2, u16::MAX] {
        let ping = Packet::echo(BOT_IP, API_IP, id, true);
        assert_eq!(node.judge(&ping), billing(Grant), "identifier {id}");
        assert_eq!(node.judge(&ping.reply()), billing(Flow), "identifier {id}");
    }
    // A reply alone opens nothing.
    let reply = Packet::echo(API_IP, BOT_IP, 7, false);
    assert_eq!(
        node.judge(&reply),
        verdict(UnknownDestination, UNKNOWN, NONE)
    );
}

#[test]
fn icmp_other_than_echo_belongs_to_no_flow() {
    let mut node = Node::new(&[grant(&[BOT], &[PING])]);
    let ping = Packet::echo(BOT_IP, API_IP, 0, true);
    assert_eq!(node.judge(&ping), billing(Grant));
    // Timestamp request and reply, identifier 0 like the echo flow's.
    let timestamp = icmp(BOT_IP, API_IP, 13, [0; 4]);
    assert_eq!(
        node.judge(&timestamp),
        verdict(UnknownDestination, BOT, NONE)
    );
    let answer = icmp(API_IP, BOT_IP, 14, [0; 4]);
    assert_eq!(
        node.judge(&answer),
        verdict(UnknownDestination, UNKNOWN, NONE)
    );
}

#[test]
fn errors_quoting_a_live_flow_are_related() {
    let mut node = Node::new(&[grant(&[BOT], &[HTTPS, DNS, PING])]);
    let syn = Packet::tcp(BOT_IP, 40000, API_IP, 443, TCP_SYN);
    assert_eq!(node.judge(&syn), billing(Grant));
    // Fragmentation needed, from a router on the way.
    let too_big = Packet::icmp_error(GATEWAY_IP, 3, 4, &syn);
    assert_eq!(node.judge(&too_big), billing(Related));
    for (kind, code) in [(3, 1), (11, 0), (12, 0)] {
        let error = Packet::icmp_error(GATEWAY_IP, kind, code, &syn);
        assert_eq!(node.judge(&error), billing(Related), "type {kind}");
    }
    // The server's reply quoted, the flow seen from the other end.
    let from_client = Packet::icmp_error(BOT_IP, 3, 3, &syn.reply());
    assert_eq!(node.judge(&from_client), billing(Related));

    let query = Packet::udp(BOT_IP6, 5353, API_IP6, 53);
    assert_eq!(node.judge(&query), billing(Grant));
    for kind in 1..=4 {
        let error = Packet::icmp_error(GATEWAY_IP6, kind, 0, &query);
        assert_eq!(node.judge(&error), billing(Related), "type {kind}");
    }
    let ping = Packet::echo(BOT_IP, API_IP, 9, true);
    assert_eq!(node.judge(&ping), billing(Grant));
    let unreachable = Packet::icmp_error(GATEWAY_IP, 3, 1, &ping);
    assert_eq!(node.judge(&unreachable), billing(Related));
}

#[test]
fn errors_quoting_no_live_flow_are_no_grant_of_their_sender() {
    let mut node = Node::new(&[grant(&[BOT], &[HTTPS, DNS])]);
    let never_sent = Packet::tcp(BOT_IP, 40001, API_IP, 443, TCP_SYN);
    let error = Packet::icmp_error(GATEWAY_IP, 3, 4, &never_sent);
    assert_eq!(node.judge(&error), verdict(NoGrant, GATEWAY, NONE));
    let error = Packet::icmp_error(STRANGER_IP, 3, 4, &never_sent);
    assert_eq!(node.judge(&error), verdict(NoGrant, UNKNOWN, NONE));
    // A flow that went idle.
    let query = Packet::udp(BOT_IP6, 5353, API_IP6, 53);
    assert_eq!(node.judge(&query), billing(Grant));
    node.wait(timeouts::UDP_NS + 1);
    let error = Packet::icmp_error(GATEWAY_IP6, 2, 0, &query);
    assert_eq!(node.judge(&error), verdict(NoGrant, GATEWAY, NONE));
    // A quote too short to name a flow.
    let syn = Packet::tcp(BOT_IP, 40000, API_IP, 443, TCP_SYN);
    assert_eq!(node.judge(&syn), billing(Grant));
    let mut cut = Packet::icmp_error(GATEWAY_IP, 3, 4, &syn);
    if let L4::Icmp { body, .. } = &mut cut.l4 {
        body.truncate(27);
    }
    assert_eq!(node.judge(&cut), verdict(NoGrant, GATEWAY, NONE));
}

#[test]
fn later_fragments_share_the_verdict_of_an_allowed_first() {
    let mut node = Node::new(&[grant(&[BOT], &[DNS])]);
    for (client, api) in [(BOT_IP, API_IP), (BOT_IP6, API_IP6)] {
        let query = Packet::udp(client, 5353, api, 53);
        assert_eq!(
            node.judge(&query.clone().fragment(7, 0, true)),
            billing(Grant)
        );
        assert_eq!(
            node.judge(&query.clone().fragment(7, 1, true)),
            billing(Fragment)
        );
        assert_eq!(
            node.judge(&query.clone().fragment(7, 2, false)),
            billing(Fragment)
        );
        // The flow's next datagram: its first fragment is `flow`.
        assert_eq!(
            node.judge(&query.clone().fragment(8, 0, true)),
            billing(Flow)
        );
        assert_eq!(
            node.judge(&query.clone().fragment(8, 1, false)),
            billing(Fragment)
        );
        let orphan = verdict(OrphanFragment, BOT, NONE);
        assert_eq!(node.judge(&query.clone().fragment(9, 1, false)), orphan);
        node.wait(timeouts::FRAGMENT_NS);
        assert_eq!(
            node.judge(&query.clone().fragment(8, 2, false)),
            billing(Fragment)
        );
        node.wait(1);
        assert_eq!(node.judge(&query.clone().fragment(8, 3, false)), orphan);
    }
}

#[test]
fn later_fragments_of_a_denied_unseen_or_outdated_first_are_orphans() {
    let mut node = Node::new(&[grant(&[BOT], &[DNS])]);
    let stranger = Packet::udp(STRANGER_IP, 5353, API_IP, 53);
    let first = stranger.clone().fragment(3, 0, true);
    assert_eq!(node.judge(&first), verdict(UnknownSource, UNKNOWN, BILLING));
    let orphan = verdict(OrphanFragment, UNKNOWN, NONE);
    assert_eq!(node.judge(&stranger.fragment(3, 1, false)), orphan);
    // Judged under a policy that has since been replaced.
    let query = Packet::udp(BOT_IP, 5353, API_IP, 53);
    assert_eq!(
        node.judge(&query.clone().fragment(4, 0, true)),
        billing(Grant)
    );
    node.install(&[grant(&[BOT], &[DNS])]);
    let orphan = verdict(OrphanFragment, BOT, NONE);
    assert_eq!(node.judge(&query.clone().fragment(4, 1, false)), orphan);
    // Or before any revocation; lifting one takes nothing away.
    assert_eq!(
        node.judge(&query.clone().fragment(5, 0, true)),
        billing(Flow)
    );
    node.model.revoke(TEAM);
    assert_eq!(node.judge(&query.clone().fragment(5, 1, false)), orphan);
    assert_eq!(
        node.judge(&query.clone().fragment(6, 0, true)),
        billing(Flow)
    );
    node.model.unrevoke(TEAM);
    assert_eq!(node.judge(&query.fragment(6, 1, false)), billing(Fragment));
}

#[test]
fn later_fragments_of_a_related_error_are_fragments() {
    let mut node = Node::new(&[grant(&[BOT], &[HTTPS])]);
    let syn = Packet::tcp(BOT_IP, 40000, API_IP, 443, TCP_SYN);
    assert_eq!(node.judge(&syn), billing(Grant));
    let error = Packet::icmp_error(GATEWAY_IP, 11, 0, &syn);
    assert_eq!(
        node.judge(&error.clone().fragment(5, 0, true)),
        billing(Related)
    );
    assert_eq!(node.judge(&error.fragment(5, 1, false)), billing(Fragment));
}

#[test]
fn a_grant_for_source_service_and_port_admits_new_flows() {
    let mut node = Node::new(&[grant(&[BOT, TEAM], &[HTTPS, ALT_HTTP])]);
    for port in [443, 8000, 8042, 8099] {
        let syn = Packet::tcp(BOT_IP, 40000, API_IP, port, TCP_SYN);
        assert_eq!(node.judge(&syn), billing(Grant), "port {port}");
    }
    let teammate = Packet::tcp(TEAMMATE_IP, 40000, API_IP, 443, TCP_SYN);
    assert_eq!(node.judge(&teammate), verdict(Grant, TEAM, BILLING));
}

#[test]
fn sources_and_services_are_found_by_the_most_specific_prefix() {
    let mut node = Node::new(&[grant(&[TEAM, LEAD], &[HTTPS, SSH])]);
    let from_lead = |dst, port| Packet::tcp(LEAD_IP, 40000, dst, port, TCP_SYN);
    assert_eq!(
        node.judge(&from_lead(API_IP, 443)),
        verdict(Grant, LEAD, BILLING)
    );
    // API's address claims no 22/tcp: the subnet's service does.
    assert_eq!(
        node.judge(&from_lead(API_IP, 22)),
        verdict(Grant, LEAD, SUBNET)
    );
    assert_eq!(
        node.judge(&from_lead(SUBNET_IP, 22)),
        verdict(Grant, LEAD, SUBNET)
    );
    let wrong_port = from_lead(SUBNET_IP, 443);
    assert_eq!(
        node.judge(&wrong_port),
        verdict(UnknownDestination, LEAD, NONE)
    );
}

#[test]
fn revoked_sources_are_denied_before_anything_else() {
    let mut node = Node::new(&[grant(&[BOT], &[HTTPS])]);
    node.model.revoke(BOT);
    let syn = Packet::tcp(BOT_IP, 40000, API_IP, 443, TCP_SYN);
    assert_eq!(node.judge(&syn), billing(Revoked));
    let nowhere = Packet::tcp(BOT_IP, 40000, NOWHERE_IP, 443, TCP_SYN);
    assert_eq!(node.judge(&nowhere), verdict(Revoked, BOT, NONE));
    node.model.unrevoke(BOT);
    assert_eq!(node.judge(&syn), billing(Grant));
}

#[test]
fn destinations_without_a_service_on_the_port_are_unknown() {
    let mut node = Node::new(&[grant(&[BOT, ANY], &[HTTPS, DNS])]);
    let unknown = verdict(UnknownDestination, BOT, NONE);
    for packet in [
        Packet::tcp(BOT_IP, 40000, API_IP, 9999, TCP_SYN),
        Packet::udp(BOT_IP, 40000, API_IP, 443),
        Packet::tcp(BOT_IP, 40000, NOWHERE_IP, 443, TCP_SYN),
        Packet::raw(BOT_IP, API_IP, 47, vec![0; 8]),
    ] {
        assert_eq!(node.judge(&packet), unknown, "{packet:?}");
    }
    // Before the source is considered.
    let stranger = Packet::tcp(STRANGER_IP, 40000, NOWHERE_IP, 443, TCP_SYN);
    assert_eq!(
        node.judge(&stranger),
        verdict(UnknownDestination, UNKNOWN, NONE)
    );
}

#[test]
fn unknown_sources_without_a_star_grant_are_unknown_source() {
    let mut node = Node::new(&[grant(&[BOT], &[HTTPS]), grant(&[ANY], &[HTTPS]).expired()]);
    let stranger = Packet::tcp(STRANGER_IP, 40000, API_IP, 443, TCP_SYN);
    assert_eq!(
        node.judge(&stranger),
        verdict(UnknownSource, UNKNOWN, BILLING)
    );
    let stranger6 = Packet::tcp(STRANGER_IP6, 40000, API_IP6, 443, TCP_SYN);
    assert_eq!(
        node.judge(&stranger6),
        verdict(UnknownSource, UNKNOWN, BILLING)
    );
}

#[test]
fn star_grants_admit_any_source_known_or_not() {
    let mut node = Node::new(&[grant(&[ANY], &[DNS]).rate(1, Duration::from_secs(1))]);
    let query = Packet::udp(STRANGER_IP, 5353, API_IP, 53);
    assert_eq!(node.judge(&query), verdict(Grant, UNKNOWN, BILLING));
    assert_eq!(node.judge(&query.reply()), verdict(Flow, UNKNOWN, BILLING));
    // Known sources have their own buckets; unknown ones share one.
    let teammate = Packet::udp(TEAMMATE_IP, 5353, API_IP, 53);
    assert_eq!(node.judge(&teammate), verdict(Grant, TEAM, BILLING));
    let another = Packet::udp(STRANGER_IP6, 5353, API_IP6, 53);
    assert_eq!(
        node.judge(&another),
        verdict(UnknownSource, UNKNOWN, BILLING)
    );
    node.wait(SECOND);
    assert_eq!(node.judge(&another), verdict(Grant, UNKNOWN, BILLING));
}

#[test]
fn grants_past_their_expiry_are_expired() {
    let mut node = Node::new(&[grant(&[BOT], &[HTTPS]).expiring(Duration::from_secs(10))]);
    node.wait(10 * SECOND - 1);
    let syn = |port| Packet::tcp(BOT_IP, port, API_IP, 443, TCP_SYN);
    assert_eq!(node.judge(&syn(40000)), billing(Grant));
    node.wait(1);
    assert_eq!(node.judge(&syn(40001)), billing(Expired));
    // Already past when installed.
    node.install(&[grant(&[BOT], &[HTTPS]).expired()]);
    assert_eq!(node.judge(&syn(40002)), billing(Expired));
    // Another grant still admits.
    node.install(&[grant(&[BOT], &[HTTPS]).expired(), grant(&[ANY], &[HTTPS])]);
    assert_eq!(node.judge(&syn(40003)), billing(Grant));
}

#[test]
fn a_rate_admits_a_bucket_of_new_flows_then_one_per_interval() {
    let mut node = Node::new(&[grant(&[BOT, TEAM], &[HTTPS]).rate(4, Duration::from_secs(1))]);
    let syn = |port| Packet::tcp(BOT_IP, port, API_IP, 443, TCP_SYN);
    for port in 40000..40004 {
        assert_eq!(node.judge(&syn(port)), billing(Grant));
    }
    assert_eq!(node.judge(&syn(40004)), billing(RateLimited));
    // Packets of live flows take no token.
    assert_eq!(node.judge(&syn(40000).reply()), billing(Flow));
    // A bucket per source identity.
    let teammate = Packet::tcp(TEAMMATE_IP, 40000, API_IP, 443, TCP_SYN);
    assert_eq!(node.judge(&teammate), verdict(Grant, TEAM, BILLING));
    node.wait(SECOND / 4 - 1);
    assert_eq!(node.judge(&syn(40004)), billing(RateLimited));
    node.wait(1);
    assert_eq!(node.judge(&syn(40004)), billing(Grant));
    assert_eq!(node.judge(&syn(40005)), billing(RateLimited));
    // Idle, the bucket fills up to 4 again, no more.
    node.wait(60 * SECOND);
    let admitted = (40010..40020)
        .filter(|&port| node.judge(&syn(port)).reason == Grant)
        .count();
    assert_eq!(admitted, 4);
}

#[test]
fn deny_reasons_come_in_the_spec_order() {
    let mut node = Node::new(&[
        grant(&[BOT], &[HTTPS]).expired(),
        grant(&[BOT], &[HTTPS]).rate(1, Duration::from_secs(60)),
    ]);
    let syn = |port| Packet::tcp(BOT_IP, port, API_IP, 443, TCP_SYN);
    assert_eq!(node.judge(&syn(40000)), billing(Grant));
    // Both an expired and a rate-limited grant would have matched.
    assert_eq!(node.judge(&syn(40001)), billing(Expired));
    // A source's rate-limited grant, then a grant to `*` that admits.
    node.install(&[
        grant(&[BOT], &[HTTPS]).rate(1, Duration::from_secs(60)),
        grant(&[ANY], &[HTTPS]),
    ]);
    for port in 40002..40005 {
        assert_eq!(node.judge(&syn(port)), billing(Grant));
    }
}

#[test]
fn sources_without_a_grant_for_the_port_are_no_grant() {
    let mut node = Node::new(&[grant(&[BOT], &[HTTPS])]);
    let teammate = Packet::tcp(TEAMMATE_IP, 40000, API_IP, 443, TCP_SYN);
    assert_eq!(node.judge(&teammate), verdict(NoGrant, TEAM, BILLING));
    let other_slot = Packet::tcp(BOT_IP, 40000, API_IP, 8080, TCP_SYN);
    assert_eq!(node.judge(&other_slot), billing(NoGrant));
}

#[test]
fn vlan_tagged_and_bare_frames_are_judged_alike() {
    let mut node = Node::new(&[grant(&[BOT], &[HTTPS])]);
    let shapes: [fn(Packet) -> Packet; 4] = [
        |packet| packet,
        |packet| packet.with_vlans(&[0x8100]),
        |packet| packet.with_vlans(&[0x88a8, 0x8100]),
        Packet::bare,
    ];
    for (port, shape) in (40000..).zip(shapes) {
        for (client, api) in [(BOT_IP, API_IP), (BOT_IP6, API_IP6)] {
            let syn = shape(Packet::tcp(client, port, api, 443, TCP_SYN));
            assert_eq!(node.judge(&syn), billing(Grant), "{syn:?}");
            assert_eq!(node.judge(&syn.reply()), billing(Flow), "{syn:?}");
        }
    }
    let with_options = Packet::tcp(BOT_IP, 50000, API_IP, 443, TCP_SYN).with_ipv4_options(&[1; 6]);
    assert_eq!(node.judge(&with_options), billing(Grant));
}

#[test]
fn tcp_flows_close_ten_seconds_after_a_rst() {
    let mut node = Node::new(&[grant(&[BOT], &[HTTPS])]);
    let syn = Packet::tcp(BOT_IP, 40000, API_IP, 443, TCP_SYN);
    assert_eq!(node.judge(&syn), billing(Grant));
    let rst = Packet::tcp(API_IP, 443, BOT_IP, 40000, TCP_RST);
    assert_eq!(node.judge(&rst), billing(Flow));
    node.wait(timeouts::TCP_CLOSING_NS);
    assert_eq!(node.judge(&syn), billing(Flow));
    node.wait(timeouts::TCP_CLOSING_NS + 1);
    assert_eq!(
        node.judge(&syn.reply()),
        verdict(UnknownDestination, UNKNOWN, NONE)
    );
    assert_eq!(node.judge(&syn), billing(Grant));
}

#[test]
fn tcp_flows_close_ten_seconds_after_fins_from_both_ends() {
    let mut node = Node::new(&[grant(&[BOT], &[HTTPS])]);
    let syn = Packet::tcp(BOT_IP, 40000, API_IP, 443, TCP_SYN);
    assert_eq!(node.judge(&syn), billing(Grant));
    let fin = Packet::tcp(BOT_IP, 40000, API_IP, 443, TCP_FIN | TCP_ACK);
    assert_eq!(node.judge(&fin), billing(Flow));
    // One end's FIN closes nothing.
    node.wait(timeouts::TCP_CLOSING_NS + 1);
    let fin_back = Packet::tcp(API_IP, 443, BOT_IP, 40000, TCP_FIN | TCP_ACK);
    assert_eq!(node.judge(&fin_back), billing(Flow));
    node.wait(timeouts::TCP_CLOSING_NS + 1);
    assert_eq!(node.judge(&syn), billing(Grant));
}

#[test]
fn idle_flows_time_out() {
    let mut node = Node::new(&[grant(&[BOT], &[HTTPS, DNS, PING])]);
    for (opening, timeout) in [
        (
            Packet::tcp(BOT_IP, 40000, API_IP, 443, TCP_SYN),
            timeouts::TCP_ESTABLISHED_NS,
        ),
        (Packet::udp(BOT_IP6, 5353, API_IP6, 53), timeouts::UDP_NS),
        (Packet::echo(BOT_IP, API_IP, 77, true), timeouts::ICMP_NS),
    ] {
        assert_eq!(node.judge(&opening), billing(Grant));
        node.wait(timeout);
        assert_eq!(node.judge(&opening.reply()), billing(Flow));
        node.wait(timeout + 1);
        let unknown = verdict(UnknownDestination, UNKNOWN, NONE);
        assert_eq!(node.judge(&opening.reply()), unknown, "{opening:?}");
        assert_eq!(node.judge(&opening), billing(Grant));
    }
}

#[test]
fn a_policy_without_the_grant_ends_its_flows_both_ways() {
    let mut node = Node::new(&[grant(&[BOT], &[HTTPS, DNS])]);
    let syn = Packet::tcp(BOT_IP, 40000, API_IP, 443, TCP_SYN);
    let query = Packet::udp(BOT_IP6, 5353, API_IP6, 53);
    assert_eq!(node.judge(&syn), billing(Grant));
    assert_eq!(node.judge(&query), billing(Grant));
    node.install(&[grant(&[BOT], &[DNS])]);
    assert_eq!(
        node.judge(&syn.reply()),
        verdict(UnknownDestination, UNKNOWN, NONE)
    );
    assert_eq!(node.judge(&syn), billing(NoGrant));
    // A grant the new policy keeps keeps its flows.
    assert_eq!(node.judge(&query.reply()), billing(Flow));
    assert_eq!(node.judge(&query), billing(Flow));
}

#[test]
fn revalidated_flows_take_no_rate_token_and_follow_the_new_policy() {
    let limited = || grant(&[BOT], &[HTTPS]).rate(1, Duration::from_secs(60));
    let mut node = Node::new(&[limited()]);
    let syn = |port| Packet::tcp(BOT_IP, port, API_IP, 443, TCP_SYN);
    assert_eq!(node.judge(&syn(40000)), billing(Grant));
    assert_eq!(node.judge(&syn(40001)), billing(RateLimited));
    // Revoking someone else moves the epoch on: revalidated, bucket empty.
    node.model.revoke(TEAM);
    assert_eq!(node.judge(&syn(40000).reply()), billing(Flow));
    // A new policy with the grant elsewhere; its buckets start full.
    node.install(&[grant(&[TEAM], &[SSH]), limited()]);
    assert_eq!(node.judge(&syn(40000)), billing(Flow));
    assert_eq!(node.judge(&syn(40002)), billing(Grant));
}

#[test]
fn flows_end_when_their_grant_expires_unless_another_covers_them() {
    let expiring = || grant(&[BOT], &[HTTPS]).expiring(Duration::from_secs(10));
    let mut node = Node::new(&[expiring()]);
    let syn = Packet::tcp(BOT_IP, 40000, API_IP, 443, TCP_SYN);
    assert_eq!(node.judge(&syn), billing(Grant));
    node.wait(10 * SECOND - 1);
    assert_eq!(node.judge(&syn.reply()), billing(Flow));
    node.wait(1);
    assert_eq!(
        node.judge(&syn.reply()),
        verdict(UnknownDestination, UNKNOWN, NONE)
    );
    assert_eq!(node.judge(&syn), billing(Expired));

    let mut node = Node::new(&[expiring(), grant(&[ANY], &[HTTPS])]);
    assert_eq!(node.judge(&syn), billing(Grant));
    node.wait(3600 * SECOND);
    assert_eq!(node.judge(&syn.reply()), billing(Flow));
}

#[test]
fn revoking_an_identity_ends_its_flows_both_ways() {
    let mut node = Node::new(&[grant(&[BOT], &[HTTPS])]);
    let syn = Packet::tcp(BOT_IP, 40000, API_IP, 443, TCP_SYN);
    assert_eq!(node.judge(&syn), billing(Grant));
    node.model.revoke(BOT);
    let error = Packet::icmp_error(GATEWAY_IP, 3, 4, &syn);
    assert_eq!(node.judge(&error), verdict(NoGrant, GATEWAY, NONE));
    assert_eq!(
        node.judge(&syn.reply()),
        verdict(UnknownDestination, UNKNOWN, NONE)
    );
    assert_eq!(node.judge(&syn), billing(Revoked));
    node.model.unrevoke(BOT);
    assert_eq!(node.judge(&syn), billing(Grant));
}

#[test]
fn counters_add_up_frames_by_identity_service_and_reason() {
    let mut node = Node::new(&[grant(&[BOT], &[HTTPS])]);
    let syn = Packet::tcp(BOT_IP, 40000, API_IP, 443, TCP_SYN);
    let reply = syn.reply().with_vlans(&[0x8100]);
    let stranger = Packet::tcp(STRANGER_IP6, 40000, API_IP6, 443, TCP_SYN).bare();
    for packet in [&syn, &reply, &reply, &stranger] {
        node.judge(packet);
    }
    let len = |packet: &Packet| packet.bytes().len() as u64;
    let counted: Vec<_> = node
        .model
        .counters()
        .iter()
        .map(|(key, (packets, bytes))| (*key, *packets, *bytes))
        .collect();
    assert_eq!(
        counted,
        [
            ((UNKNOWN, BILLING, UnknownSource), 1, len(&stranger)),
            ((BOT, BILLING, Flow), 2, 2 * len(&reply)),
            ((BOT, BILLING, Grant), 1, len(&syn)),
        ]
    );
}
