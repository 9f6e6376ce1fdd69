//! Every classification rule and every reason of the spec, through the real
//! programs in the running kernel (BPF_PROG_TEST_RUN), via the XDP and the
//! TC entry, IPv4 and IPv6. The clock is fixed per packet, so expiry, rate
//! limits and timeouts are exact.

use std::{
    net::IpAddr,
    time::{Duration, SystemTime},
};

use mesh_agent::datapath::{
    BoundHost, Clock, Datapath, DatapathError, Entry, GrantLimits, MapSizes, PolicyEntries,
    PortBlock, Prefix, Rate,
};
use mesh_common::{Reason, identity, proto, service};
use mesh_tests::{
    packet::{Ext, Packet, TCP_ACK, TCP_RST, TCP_SYN},
    require_root,
};

const AGENT: u32 = 7;
const OTHER_AGENT: u32 = 8;
const API: u32 = 1;
const OLD_API: u32 = 2;
const BUSY_API: u32 = 3;
const PUBLIC: u32 = 4;

/// The boot-clock instant the tests start at.
const T0: u64 = 1_000_000_000_000;
const SECOND: u64 = 1_000_000_000;

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

/// Hand-compiled entries (the policy compiler has its own tests):
/// - agent 7 at 10.0.0.1 and fd00::1, agent 8 at 10.1.0.0/16;
/// - API (1) at 10.0.0.100 and fd00::100: 443/tcp, 53/udp, icmp — granted to 7;
/// - OLD_API (2) at 10.0.0.200: 80/tcp — granted to 7 until T0 + 10 s;
/// - BUSY_API (3) at 10.0.0.201: 81/tcp — granted to 7 at 2 new flows a second;
/// - PUBLIC (4) at 10.0.0.202: 82/tcp — granted to `*`.
fn entries(clock: &Clock, api_granted: bool) -> PolicyEntries {
    let host = |text: &str| Prefix::host(ip(text));
    let ports = |class: u32, proto: u8, port: u16| {
        PortBlock::cover(proto, port, port)
            .into_iter()
            .map(move |block| (class, block, class, 0))
    };
    let mut grants = vec![
        ((AGENT, OLD_API, 0), vec![1]),
        ((AGENT, BUSY_API, 0), vec![2]),
        ((identity::ANY, PUBLIC, 0), vec![3]),
    ];
    if api_granted {
        grants.push(((AGENT, API, 0), vec![0]));
    }
    PolicyEntries {
        identities: vec![
            (host("10.0.0.1"), AGENT),
            (host("fd00::1"), AGENT),
            (Prefix::new(ip("10.1.0.0"), 16), OTHER_AGENT),
        ],
        destinations: vec![
            (host("10.0.0.100"), API),
            (host("fd00::100"), API),
            (host("10.0.0.200"), OLD_API),
            (host("10.0.0.201"), BUSY_API),
            (host("10.0.0.202"), PUBLIC),
        ],
        service_ports: ports(API, proto::TCP, 443)
            .chain(ports(API, proto::UDP, 53))
            .chain([(
                API,
                PortBlock {
                    proto: proto::ICMP_ECHO,
                    port: 0,
                    bits: 16,
                },
                API,
                0,
            )])
            .chain(ports(OLD_API, proto::TCP, 80))
            .chain(ports(BUSY_API, proto::TCP, 81))
            .chain(ports(PUBLIC, proto::TCP, 82))
            .collect(),
        grants,
        bound: Vec::new(),
        grant_limits: vec![
            GrantLimits::default(),
            GrantLimits {
                expires: Some(clock.wall + Duration::from_secs(10)),
                rate: None,
            },
            GrantLimits {
                expires: None,
                rate: Some(Rate {
                    count: 2,
                    period: Duration::from_secs(1),
                }),
            },
            GrantLimits::default(),
        ],
    }
}

/// A fresh datapath with the test policy, its clock fixed at T0.
struct Harness {
    datapath: Datapath,
    entry: Entry,
    clock: Clock,
}

impl Harness {
    fn new(entry: Entry) -> Self {
        Self::with_sizes(entry, MapSizes::default())
    }

    fn with_sizes(entry: Entry, sizes: MapSizes) -> Self {
        require_root();
        let mut datapath = Datapath::load_with(sizes).expect("loading the programs");
        let clock = Clock {
            wall: SystemTime::now(),
            boot_ns: T0,
        };
        datapath
            .install(&entries(&clock, true), &clock)
            .expect("installing");
        Self {
            datapath,
            entry,
            clock,
        }
    }

    /// Runs `packet` at T0 + `at_ns` and checks the reason and, for
    /// attributed outcomes, the identity and service.
    fn expect(&mut self, packet: &Packet, at_ns: u64, reason: Reason, owner: Option<(u32, u32)>) {
        let context = format!("{packet:?}");
        self.expect_frame(&packet.bytes(), &context, at_ns, reason, owner);
    }

    fn expect_frame(
        &mut self,
        frame: &[u8],
        context: &str,
        at_ns: u64,
        reason: Reason,
        owner: Option<(u32, u32)>,
    ) {
        self.datapath.set_clock(T0 + at_ns).unwrap();
        let verdict = self.datapath.test_run(self.entry, frame).unwrap();
        let context = format!("{:?}: {context} at +{at_ns} ns", self.entry);
        assert_eq!(verdict.reason, reason, "{context}");
        assert_eq!(verdict.pass, reason.allows(), "{context}: action");
        if let Some((identity, service)) = owner {
            assert_eq!(
                (verdict.identity, verdict.service),
                (identity, service),
                "{context}: owner"
            );
        }
    }

    fn reinstall(&mut self, api_granted: bool) {
        self.datapath
            .install(&entries(&self.clock, api_granted), &self.clock)
            .unwrap();
    }
}

/// Runs a scenario through a fresh XDP and a fresh TC datapath.
fn on_both_entries(scenario: impl Fn(&mut Harness)) {
    for entry in [Entry::Xdp, Entry::Tc] {
        scenario(&mut Harness::new(entry));
    }
}

fn syn(src: &str, sport: u16, dst: &str, dport: u16) -> Packet {
    Packet::tcp(ip(src), sport, ip(dst), dport, TCP_SYN)
}

#[test]
fn passthrough_for_non_ip_and_neighbour_discovery() {
    on_both_entries(|h| {
        let mut arp = syn("10.0.0.1", 1, "10.0.0.100", 443).bytes();
        arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
        h.expect_frame(
            &arp,
            "ARP",
            0,
            Reason::Passthrough,
            Some((identity::UNKNOWN, service::NONE)),
        );
        let solicitation = Packet::raw(
            ip("fe80::1"),
            ip("ff02::1:ff00:1"),
            58,
            vec![135, 0, 0, 0, 0, 0, 0, 0],
        );
        h.expect(
            &solicitation,
            0,
            Reason::Passthrough,
            Some((identity::UNKNOWN, service::NONE)),
        );
    });
}

#[test]
fn granted_flows_and_their_replies() {
    on_both_entries(|h| {
        for (agent, api) in [("10.0.0.1", "10.0.0.100"), ("fd00::1", "fd00::100")] {
            let open = syn(agent, 40000, api, 443);
            h.expect(&open, 0, Reason::Grant, Some((AGENT, API)));
            h.expect(&open.reply(), 1, Reason::Flow, Some((AGENT, API)));
            let udp = Packet::udp(ip(agent), 5353, ip(api), 53);
            h.expect(&udp, 2, Reason::Grant, Some((AGENT, API)));
            h.expect(&udp.reply(), 3, Reason::Flow, Some((AGENT, API)));
            let ping = Packet::echo(ip(agent), ip(api), 77, true);
            h.expect(&ping, 4, Reason::Grant, Some((AGENT, API)));
            h.expect(&ping.reply(), 5, Reason::Flow, Some((AGENT, API)));
        }
    });
}

#[test]
fn vlan_tags_options_and_extension_headers() {
    on_both_entries(|h| {
        let tagged = syn("10.0.0.1", 40001, "10.0.0.100", 443).with_vlans(&[0x88a8, 0x8100]);
        h.expect(&tagged, 0, Reason::Grant, Some((AGENT, API)));
        let three_tags =
            syn("10.0.0.1", 40002, "10.0.0.100", 443).with_vlans(&[0x88a8, 0x8100, 0x8100]);
        h.expect(&three_tags, 0, Reason::Malformed, None);
        let options =
            syn("10.0.0.1", 40003, "10.0.0.100", 443).with_ipv4_options(&[1, 1, 1, 1, 1, 1, 1, 0]);
        h.expect(&options, 0, Reason::Grant, Some((AGENT, API)));
        let six = [
            Ext::HopByHop,
            Ext::DestinationOptions,
            Ext::Routing,
            Ext::DestinationOptions,
            Ext::Routing,
            Ext::DestinationOptions,
        ];
        let v6 = syn("fd00::1", 40004, "fd00::100", 443).with_ext(&six);
        h.expect(&v6, 0, Reason::Grant, Some((AGENT, API)));
        let mut seven = six.to_vec();
        seven.push(Ext::DestinationOptions);
        let v6 = syn("fd00::1", 40005, "fd00::100", 443).with_ext(&seven);
        h.expect(&v6, 0, Reason::Malformed, None);
    });
}

#[test]
fn malformed_truncations() {
    on_both_entries(|h| {
        let whole = syn("10.0.0.1", 40000, "10.0.0.100", 443).bytes();
        // Cut inside the IPv4 header and inside the TCP header. TC's test
        // run refuses frames whose IPv4 header is cut (EINVAL), so only XDP
        // gets those.
        let cuts: &[usize] = match h.entry {
            Entry::Xdp => &[15, 20, 33, 40, 44],
            Entry::Tc => &[40, 44],
        };
        for &len in cuts {
            h.expect_frame(
                &whole[..len],
                &format!("SYN cut at {len}"),
                0,
                Reason::Malformed,
                None,
            );
        }
        // An IPv6 packet posing as the IPv4 agent through a mapped address.
        let mapped = syn("::ffff:10.0.0.1", 40006, "fd00::100", 443);
        h.expect(&mapped, 0, Reason::Malformed, None);
        let short_udp = Packet::raw(ip("10.0.0.1"), ip("10.0.0.100"), 17, vec![0; 4]);
        h.expect(&short_udp, 0, Reason::Malformed, None);
    });
}

#[test]
fn deny_reasons_in_order() {
    on_both_entries(|h| {
        h.expect(
            &syn("10.0.0.1", 1000, "10.0.0.100", 444),
            0,
            Reason::UnknownDestination,
            Some((AGENT, service::NONE)),
        );
        h.expect(
            &syn("10.0.0.1", 1000, "10.0.0.99", 443),
            0,
            Reason::UnknownDestination,
            None,
        );
        h.expect(
            &syn("10.9.9.9", 1000, "10.0.0.100", 443),
            0,
            Reason::UnknownSource,
            Some((identity::UNKNOWN, API)),
        );
        h.expect(
            &syn("10.1.2.3", 1000, "10.0.0.100", 443),
            0,
            Reason::NoGrant,
            Some((OTHER_AGENT, API)),
        );
        h.expect(
            &syn("10.0.0.1", 1001, "10.0.0.200", 80),
            0,
            Reason::Grant,
            Some((AGENT, OLD_API)),
        );
        h.expect(
            &syn("10.0.0.1", 1002, "10.0.0.200", 80),
            10 * SECOND,
            Reason::Expired,
            Some((AGENT, OLD_API)),
        );
        // `*` admits unknown sources too.
        h.expect(
            &syn("10.9.9.9", 1003, "10.0.0.202", 82),
            0,
            Reason::Grant,
            Some((identity::UNKNOWN, PUBLIC)),
        );
    });
}

#[test]
fn expiry_ends_live_flows_in_both_directions() {
    on_both_entries(|h| {
        let open = syn("10.0.0.1", 2000, "10.0.0.200", 80);
        h.expect(&open, 0, Reason::Grant, Some((AGENT, OLD_API)));
        h.expect(
            &open.reply(),
            9 * SECOND,
            Reason::Flow,
            Some((AGENT, OLD_API)),
        );
        // The reply is judged as a new flow to the agent, which offers nothing.
        h.expect(&open.reply(), 10 * SECOND, Reason::UnknownDestination, None);
        h.expect(
            &Packet::tcp(ip("10.0.0.1"), 2000, ip("10.0.0.200"), 80, TCP_ACK),
            10 * SECOND,
            Reason::Expired,
            Some((AGENT, OLD_API)),
        );
    });
}

/// A process binding's address is its identity's until the token expires;
/// then the kernel itself ends the address's live flows, both ways, and
/// classifies it as nobody — whether the binding was added to the live
/// policy or came with the next one.
#[test]
fn a_bound_address_loses_its_identity_when_its_token_expires() {
    for with_the_policy in [false, true] {
        on_both_entries(|h| {
            let bound = BoundHost {
                addr: ip("10.0.0.77"),
                tag: AGENT,
                expires_at: h.clock.wall + Duration::from_secs(5),
            };
            if with_the_policy {
                let mut next = entries(&h.clock, true);
                next.bound.push(bound);
                h.datapath.install(&next, &h.clock).unwrap();
            } else {
                h.datapath.add_identity_host(&bound, &h.clock).unwrap();
            }
            let open = syn("10.0.0.77", 7000, "10.0.0.100", 443);
            h.expect(&open, 0, Reason::Grant, Some((AGENT, API)));
            h.expect(&open.reply(), 4 * SECOND, Reason::Flow, Some((AGENT, API)));
            h.expect(&open.reply(), 5 * SECOND, Reason::UnknownDestination, None);
            h.expect(
                &Packet::tcp(ip("10.0.0.77"), 7000, ip("10.0.0.100"), 443, TCP_ACK),
                5 * SECOND,
                Reason::UnknownSource,
                Some((identity::UNKNOWN, API)),
            );
            h.expect(
                &syn("10.0.0.77", 7001, "10.0.0.100", 443),
                5 * SECOND,
                Reason::UnknownSource,
                Some((identity::UNKNOWN, API)),
            );
            // The policy's own addresses never expire.
            h.expect(
                &syn("10.0.0.1", 7002, "10.0.0.100", 443),
                5 * SECOND,
                Reason::Grant,
                Some((AGENT, API)),
            );
        });
    }
}

#[test]
fn rate_limit_is_a_token_bucket_per_grant_and_identity() {
    on_both_entries(|h| {
        h.expect(
            &syn("10.0.0.1", 3000, "10.0.0.201", 81),
            0,
            Reason::Grant,
            Some((AGENT, BUSY_API)),
        );
        h.expect(
            &syn("10.0.0.1", 3001, "10.0.0.201", 81),
            0,
            Reason::Grant,
            Some((AGENT, BUSY_API)),
        );
        h.expect(
            &syn("10.0.0.1", 3002, "10.0.0.201", 81),
            0,
            Reason::RateLimited,
            Some((AGENT, BUSY_API)),
        );
        // Live flows take no token.
        h.expect(
            &syn("10.0.0.1", 3000, "10.0.0.201", 81).reply(),
            0,
            Reason::Flow,
            Some((AGENT, BUSY_API)),
        );
        h.expect(
            &syn("10.0.0.1", 3003, "10.0.0.201", 81),
            SECOND / 2 - 1,
            Reason::RateLimited,
            None,
        );
        h.expect(
            &syn("10.0.0.1", 3004, "10.0.0.201", 81),
            SECOND / 2,
            Reason::Grant,
            Some((AGENT, BUSY_API)),
        );
    });
}

#[test]
fn icmp_errors_of_live_flows_are_related() {
    on_both_entries(|h| {
        for (agent, api, router, kind) in [
            ("10.0.0.1", "10.0.0.100", "10.5.5.5", 3),
            ("fd00::1", "fd00::100", "fd00::5", 2),
        ] {
            let open = syn(agent, 4000, api, 443);
            h.expect(&open, 0, Reason::Grant, Some((AGENT, API)));
            // Packet too big / fragmentation needed, sent back to the agent.
            let pmtu = Packet::icmp_error(ip(router), kind, if kind == 3 { 4 } else { 0 }, &open);
            h.expect(&pmtu, 1, Reason::Related, Some((AGENT, API)));
            let stranger = syn(agent, 4001, api, 443);
            let unrelated = Packet::icmp_error(ip(router), kind, 0, &stranger);
            h.expect(&unrelated, 2, Reason::NoGrant, None);
        }
    });
}

#[test]
fn fragments_share_the_first_fragments_verdict() {
    on_both_entries(|h| {
        for (agent, api) in [("10.0.0.1", "10.0.0.100"), ("fd00::1", "fd00::100")] {
            let first = Packet::udp(ip(agent), 6000, ip(api), 53).fragment(99, 0, true);
            h.expect(&first, 0, Reason::Grant, Some((AGENT, API)));
            let later = Packet::udp(ip(agent), 6000, ip(api), 53).fragment(99, 2, false);
            h.expect(&later, 1, Reason::Fragment, Some((AGENT, API)));
            let orphan = Packet::udp(ip(agent), 6000, ip(api), 53).fragment(100, 2, false);
            h.expect(&orphan, 2, Reason::OrphanFragment, None);
            let denied_first =
                Packet::udp(ip("10.1.0.9"), 6001, ip("10.0.0.100"), 53).fragment(101, 0, true);
            h.expect(&denied_first, 3, Reason::NoGrant, None);
            let its_later =
                Packet::udp(ip("10.1.0.9"), 6001, ip("10.0.0.100"), 53).fragment(101, 2, false);
            h.expect(&its_later, 4, Reason::OrphanFragment, None);
        }
    });
}

#[test]
fn removing_a_grant_ends_live_flows_in_both_directions() {
    on_both_entries(|h| {
        let open = syn("10.0.0.1", 5000, "10.0.0.100", 443);
        h.expect(&open, 0, Reason::Grant, Some((AGENT, API)));
        h.expect(&open.reply(), 1, Reason::Flow, Some((AGENT, API)));
        h.reinstall(false);
        h.expect(&open.reply(), 2, Reason::UnknownDestination, None);
        h.expect(
            &Packet::tcp(ip("10.0.0.1"), 5000, ip("10.0.0.100"), 443, TCP_ACK),
            3,
            Reason::NoGrant,
            Some((AGENT, API)),
        );
        // A new policy that keeps the grant keeps the flow.
        h.reinstall(true);
        h.expect(&open, 4, Reason::Grant, Some((AGENT, API)));
        h.reinstall(true);
        h.expect(&open.reply(), 5, Reason::Flow, Some((AGENT, API)));
    });
}

#[test]
fn flows_time_out() {
    on_both_entries(|h| {
        let udp = Packet::udp(ip("10.0.0.1"), 7000, ip("10.0.0.100"), 53);
        h.expect(&udp, 0, Reason::Grant, Some((AGENT, API)));
        h.expect(&udp.reply(), 60 * SECOND, Reason::Flow, None);
        h.expect(
            &udp.reply(),
            120 * SECOND + 1,
            Reason::UnknownDestination,
            None,
        );
        let open = syn("10.0.0.1", 7001, "10.0.0.100", 443);
        h.expect(&open, 0, Reason::Grant, Some((AGENT, API)));
        let rst = Packet::tcp(ip("10.0.0.100"), 443, ip("10.0.0.1"), 7001, TCP_RST);
        h.expect(&rst, SECOND, Reason::Flow, Some((AGENT, API)));
        h.expect(
            &open.reply(),
            11 * SECOND + 1,
            Reason::UnknownDestination,
            None,
        );
    });
}

#[test]
fn revocation_ends_new_and_live_flows() {
    on_both_entries(|h| {
        let open = syn("10.0.0.1", 8000, "10.0.0.100", 443);
        h.expect(&open, 0, Reason::Grant, Some((AGENT, API)));
        h.expect(&open.reply(), 1, Reason::Flow, Some((AGENT, API)));
        h.datapath.revoke(AGENT).unwrap();
        h.expect(&open.reply(), 2, Reason::UnknownDestination, None);
        h.expect(
            &Packet::tcp(ip("10.0.0.1"), 8000, ip("10.0.0.100"), 443, TCP_ACK),
            3,
            Reason::Revoked,
            Some((AGENT, API)),
        );
        // Revoked beats every grant, `*` included.
        h.expect(
            &syn("10.0.0.1", 8001, "10.0.0.202", 82),
            4,
            Reason::Revoked,
            Some((AGENT, PUBLIC)),
        );
        h.datapath.unrevoke(AGENT).unwrap();
        h.expect(
            &syn("10.0.0.1", 8002, "10.0.0.100", 443),
            5,
            Reason::Grant,
            Some((AGENT, API)),
        );
    });
}

#[test]
fn a_policy_that_does_not_fit_leaves_the_live_one_enforcing() {
    // Room for 7 grant entries: the live policy's 4 and a next one's 3, but
    // not another 4 beside the live ones.
    let sizes = MapSizes {
        grants: 7,
        ..MapSizes::default()
    };
    for entry in [Entry::Xdp, Entry::Tc] {
        let mut h = Harness::with_sizes(entry, sizes);
        let state = h.datapath.state().unwrap();
        let err = h
            .datapath
            .install(&entries(&h.clock, true), &h.clock)
            .unwrap_err();
        assert!(
            matches!(
                err,
                DatapathError::MapFull {
                    name: "GRANTS",
                    capacity: 7
                }
            ),
            "{err:?}"
        );
        assert_eq!(
            h.datapath.state().unwrap(),
            state,
            "no flip after a failed install"
        );
        h.expect(
            &syn("10.0.0.1", 9000, "10.0.0.100", 443),
            0,
            Reason::Grant,
            Some((AGENT, API)),
        );
        // The failed attempt left nothing behind: a policy that fits beside
        // the live one installs.
        h.reinstall(false);
        h.expect(
            &syn("10.0.0.1", 9001, "10.0.0.100", 443),
            1,
            Reason::NoGrant,
            Some((AGENT, API)),
        );
    }
}

#[test]
fn counters_count_every_packet_and_forgetting_clears_them() {
    on_both_entries(|h| {
        let open = syn("10.0.0.1", 9100, "10.0.0.100", 443);
        let len = open.bytes().len() as u64;
        h.expect(&open, 0, Reason::Grant, Some((AGENT, API)));
        h.expect(&open, 1, Reason::Flow, Some((AGENT, API)));
        h.expect(&open, 2, Reason::Flow, Some((AGENT, API)));
        h.expect(
            &syn("10.9.9.9", 1, "10.0.0.100", 443),
            3,
            Reason::UnknownSource,
            None,
        );
        let counters = h.datapath.counters().unwrap();
        assert_eq!(counters.get(&(AGENT, API, Reason::Grant)), Some(&(1, len)));
        assert_eq!(
            counters.get(&(AGENT, API, Reason::Flow)),
            Some(&(2, 2 * len))
        );
        assert_eq!(
            counters.get(&(identity::UNKNOWN, API, Reason::UnknownSource)),
            Some(&(1, len))
        );
        assert_eq!(counters.len(), 3, "{counters:?}");

        h.datapath.forget_traffic().unwrap();
        assert!(h.datapath.counters().unwrap().is_empty());
        h.expect(&open.reply(), 4, Reason::UnknownDestination, None);
    });
}
