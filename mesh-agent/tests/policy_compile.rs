//! The policy compiler: hand-checked policies, its exact errors, a large
//! policy, and properties of generated ones checked against lookups done the
//! kernel's way (longest prefix, then port block, then grant key) on the
//! compiled entries.

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::{Duration, SystemTime},
};

use ipnet::IpNet;
use mesh_agent::{
    datapath::{GrantLimits, PolicyEntries, PortBlock, Prefix, Rate},
    policy::{
        self, Capacities, Compiled, Grant, Identity, Policy, PortRange, PortSet, PortSpec,
        Selector, Service, Sources, SpiffeId, Target,
    },
};
use mesh_common::{GRANTS_PER_KEY, identity, proto};
use proptest::{
    collection::{btree_map, vec},
    option,
    prelude::*,
    sample::{Index, select},
    test_runner::FileFailurePersistence,
};
use time::{OffsetDateTime, format_description::well_known::Rfc3339};

// ---------------------------------------------------------------------------
// Lookups, done the kernel's way on the entries and directly on the policy.

/// A destination port, or an ICMP echo request.
#[derive(Clone, Copy, Debug)]
enum Port {
    Tcp(u16),
    Udp(u16),
    Icmp,
}

impl Port {
    fn code(self) -> (u8, u16) {
        match self {
            Port::Tcp(port) => (proto::TCP, port),
            Port::Udp(port) => (proto::UDP, port),
            Port::Icmp => (proto::ICMP_ECHO, 0),
        }
    }

    fn in_set(self, ports: &PortSet) -> bool {
        let within = |ranges: &[PortRange], port| {
            ranges
                .iter()
                .any(|range| (range.first()..=range.last()).contains(&port))
        };
        match self {
            Port::Tcp(port) => within(ports.tcp(), port),
            Port::Udp(port) => within(ports.udp(), port),
            Port::Icmp => ports.icmp_echo(),
        }
    }

    fn in_block(self, block: &PortBlock) -> bool {
        let (proto, port) = self.code();
        let mask = u16::MAX
            .checked_shl(16 - u32::from(block.bits))
            .unwrap_or(0);
        block.proto == proto && (port ^ block.port) & mask == 0
    }
}

/// The maps' 16-byte form of an address.
fn mapped(addr: IpAddr) -> Ipv6Addr {
    match addr {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

fn contains(prefix: &Prefix, addr: IpAddr) -> bool {
    let mask = u128::MAX
        .checked_shl(128 - u32::from(prefix.len))
        .unwrap_or(0);
    (u128::from(prefix.addr) ^ u128::from(mapped(addr))) & mask == 0
}

/// The value of the longest prefix containing `addr`.
fn longest_match(entries: &[(Prefix, u32)], addr: IpAddr) -> Option<u32> {
    entries
        .iter()
        .filter(|(prefix, _)| contains(prefix, addr))
        .max_by_key(|(prefix, _)| prefix.len)
        .map(|&(_, value)| value)
}

/// The source identity tag the kernel finds, or `identity::UNKNOWN`.
fn source_tag(entries: &PolicyEntries, addr: IpAddr) -> u32 {
    longest_match(&entries.identities, addr).unwrap_or(identity::UNKNOWN)
}

/// The (service id, slot) the kernel finds: the class of the longest
/// destination prefix, then the port block of that class.
fn destination(entries: &PolicyEntries, addr: IpAddr, port: Port) -> Option<(u32, u32)> {
    let class = longest_match(&entries.destinations, addr)?;
    let mut found = entries
        .service_ports
        .iter()
        .filter(|(of, block, ..)| *of == class && port.in_block(block))
        .map(|&(_, _, service, slot)| (service, slot));
    let hit = found.next();
    assert_eq!(found.next(), None, "port blocks of class {class} overlap");
    hit
}

/// The grants the kernel tries for a (source tag or `ANY`, service, slot).
fn grants_of(entries: &PolicyEntries, key: (u32, u32, u32)) -> Vec<u32> {
    entries
        .grants
        .iter()
        .find(|(of, _)| *of == key)
        .map_or_else(Vec::new, |(_, grants)| grants.clone())
}

/// The most specific service prefix containing `addr` that claims `port`.
fn policy_service(policy: &Policy, addr: IpAddr, port: Port) -> Option<usize> {
    policy
        .services
        .iter()
        .enumerate()
        .filter(|(_, service)| port.in_set(&service.ports))
        .flat_map(|(index, service)| {
            let within = service.addresses.iter().filter(|net| net.contains(&addr));
            within.map(move |net| (net.prefix_len(), index))
        })
        .max()
        .map(|(_, index)| index)
}

/// The identity with the most specific prefix containing `addr`.
fn policy_source(policy: &Policy, addr: IpAddr) -> Option<usize> {
    policy
        .identities
        .iter()
        .enumerate()
        .flat_map(|(index, identity)| {
            let within = identity.addresses.iter().filter(|net| net.contains(&addr));
            within.map(move |net| (net.prefix_len(), index))
        })
        .max()
        .map(|(_, index)| index)
}

/// The grants, in order, naming `source` (an identity, or `None` for `*`
/// grants), `service` and `port`.
fn policy_grants(policy: &Policy, source: Option<usize>, service: usize, port: Port) -> Vec<u32> {
    let names = |grant: &Grant| match (&grant.sources, source) {
        (Sources::Any, None) => true,
        (Sources::Identities(identities), Some(identity)) => identities.contains(&identity),
        _ => false,
    };
    let reaches = |target: &Target| target.service == service && port.in_set(&target.ports);
    (0..)
        .zip(&policy.grants)
        .filter(|(_, grant)| names(grant) && grant.targets.iter().any(reaches))
        .map(|(index, _)| index)
        .collect()
}

/// Compares what the kernel would find in `compiled` with what `policy` says.
struct Checker<'a> {
    policy: &'a Policy,
    compiled: &'a Compiled,
    tags: HashMap<&'a SpiffeId, u32>,
}

impl<'a> Checker<'a> {
    fn new(policy: &'a Policy, compiled: &'a Compiled) -> Self {
        let tags = compiled.identities.iter().map(|(&tag, id)| (id, tag));
        Self {
            policy,
            compiled,
            tags: tags.collect(),
        }
    }

    /// The source at `addr`, the service at `addr` and `port`, and there the
    /// grants tried for `*` and for each identity of `sources`.
    fn probe(&self, addr: IpAddr, port: Port, sources: &[usize]) {
        // The maps' form cannot tell an IPv4-mapped IPv6 address from IPv4.
        let addr = addr.to_canonical();
        let (policy, entries) = (self.policy, &self.compiled.entries);
        let source = self.compiled.identities.get(&source_tag(entries, addr));
        let expected = policy_source(policy, addr).map(|index| &policy.identities[index].id);
        assert_eq!(source, expected, "source {addr}");
        let found = destination(entries, addr, port);
        let service = found.map(|(service, _)| self.compiled.services[&service].as_str());
        let expected = policy_service(policy, addr, port);
        let expected_name = expected.map(|index| policy.services[index].name.as_str());
        assert_eq!(service, expected_name, "service at {addr} {port:?}");
        let (Some((service_id, slot)), Some(service)) = (found, expected) else {
            return;
        };
        let key = (identity::ANY, service_id, slot);
        let expected = policy_grants(policy, None, service, port);
        assert_eq!(grants_of(entries, key), expected, "* {port:?}");
        for &index in sources {
            let id = &policy.identities[index].id;
            let key = (self.tags[id], service_id, slot);
            let expected = policy_grants(policy, Some(index), service, port);
            assert_eq!(grants_of(entries, key), expected, "{id} {port:?}");
        }
    }
}

// ---------------------------------------------------------------------------
// Hand-checked policies.

fn parse(text: &str) -> Policy {
    let text = format!("version = 1\ntrust_domain = \"acme.internal\"\n{text}");
    policy::parse("policy.toml", &text).unwrap_or_else(|errors| panic!("{errors}\n{text}"))
}

fn compile(text: &str) -> Compiled {
    policy::compile(&parse(text), &Capacities::default()).unwrap()
}

fn compile_error(text: &str, capacities: Capacities) -> String {
    policy::compile(&parse(text), &capacities)
        .expect_err("the policy should not compile")
        .to_string()
}

fn ip(addr: &str) -> IpAddr {
    addr.parse().unwrap()
}

fn service_at<'a>(compiled: &'a Compiled, addr: &str, port: Port) -> Option<&'a str> {
    let (service, _) = destination(&compiled.entries, ip(addr), port)?;
    Some(&compiled.services[&service])
}

fn source_at<'a>(compiled: &'a Compiled, addr: &str) -> Option<&'a str> {
    let tag = source_tag(&compiled.entries, ip(addr));
    compiled.identities.get(&tag).map(SpiffeId::as_str)
}

fn tag(compiled: &Compiled, id: &str) -> u32 {
    let found = compiled.identities.iter().find(|(_, of)| of.as_str() == id);
    *found.expect("a declared identity").0
}

fn service_id(compiled: &Compiled, name: &str) -> u32 {
    let found = compiled.services.iter().find(|(_, of)| *of == name);
    *found.expect("a declared service").0
}

/// The slot of `port` on `service`, the same in every class.
fn slot(compiled: &Compiled, service: &str, port: Port) -> u32 {
    let id = service_id(compiled, service);
    let mut slots: Vec<u32> = compiled
        .entries
        .service_ports
        .iter()
        .filter(|&&(_, block, of, _)| of == id && port.in_block(&block))
        .map(|&(.., slot)| slot)
        .collect();
    slots.dedup();
    assert_eq!(slots.len(), 1, "{service} {port:?} is in slots {slots:?}");
    slots[0]
}

fn grants_at(compiled: &Compiled, source: &str, service: &str, port: Port) -> Vec<u32> {
    let source = match source {
        "*" => identity::ANY,
        id => tag(compiled, id),
    };
    let key = (
        source,
        service_id(compiled, service),
        slot(compiled, service, port),
    );
    grants_of(&compiled.entries, key)
}

const INVOICE_BOT: &str = "spiffe://acme.internal/agent/invoice-bot";
const A: &str = "spiffe://acme.internal/a";
const B: &str = "spiffe://acme.internal/b";

#[test]
fn a_small_policy_compiles_to_exactly_these_entries() {
    let compiled = compile(&format!(
        r#"
[[identity]]
id = "{INVOICE_BOT}"
addresses = ["100.96.2.0/24", "100.96.1.10"]

[[service]]
name = "billing-api"
addresses = ["10.20.0.5"]
ports = ["443/tcp", "icmp"]

[[grant]]
from = ["{INVOICE_BOT}"]
to = ["billing-api"]
"#
    ));
    // FNV-1a of the SPIFFE ID and of the name.
    let (tag, service) = (0xe30f_55cf, 0x5623_da51);
    let v4 = |addr: &str| ip(addr);
    let block = |proto, port| PortBlock {
        proto,
        port,
        bits: 16,
    };
    assert_eq!(
        compiled.entries,
        PolicyEntries {
            identities: vec![
                (Prefix::host(v4("100.96.1.10")), tag),
                (Prefix::new(v4("100.96.2.0"), 24), tag),
            ],
            destinations: vec![(Prefix::host(v4("10.20.0.5")), 1)],
            service_ports: vec![
                (1, block(proto::ICMP_ECHO, 0), service, 0),
                (1, block(proto::TCP, 443), service, 0),
            ],
            grants: vec![((tag, service, 0), vec![0])],
            bound: Vec::new(),
            grant_limits: vec![GrantLimits::default()],
        }
    );
    assert_eq!(compiled.identities[&tag].as_str(), INVOICE_BOT);
    assert_eq!(compiled.services[&service], "billing-api");
}

#[test]
fn nested_prefixes_resolve_to_the_most_specific_claim_per_port() {
    let compiled = compile(
        r#"
[[service]]
name = "net"
addresses = ["10.0.0.0/8"]
ports = ["1-65535/tcp"]

[[service]]
name = "subnet"
addresses = ["10.20.0.0/16"]
ports = ["22/tcp", "443/tcp"]

[[service]]
name = "api"
addresses = ["10.20.0.5", "10.20.0.7"]
ports = ["443/tcp", "8000-8099/tcp"]

[[service]]
name = "metrics"
addresses = ["10.20.0.5"]
ports = ["9100/tcp"]
"#,
    );
    let at = |addr, port| service_at(&compiled, addr, port);
    assert_eq!(at("10.20.0.5", Port::Tcp(443)), Some("api"));
    assert_eq!(at("10.20.0.5", Port::Tcp(8050)), Some("api"));
    assert_eq!(at("10.20.0.5", Port::Tcp(9100)), Some("metrics"));
    assert_eq!(at("10.20.0.5", Port::Tcp(22)), Some("subnet"));
    assert_eq!(at("10.20.0.5", Port::Tcp(8100)), Some("net"));
    assert_eq!(at("10.20.0.7", Port::Tcp(9100)), Some("net"));
    assert_eq!(at("10.20.0.6", Port::Tcp(443)), Some("subnet"));
    assert_eq!(at("10.20.0.6", Port::Tcp(8050)), Some("net"));
    assert_eq!(at("10.21.0.1", Port::Tcp(22)), Some("net"));
    assert_eq!(at("10.20.0.5", Port::Udp(443)), None);
    assert_eq!(at("10.20.0.5", Port::Icmp), None);
    assert_eq!(at("11.0.0.1", Port::Tcp(443)), None);
    let classes: BTreeMap<String, u32> = compiled
        .entries
        .destinations
        .iter()
        .map(|&(prefix, class)| (prefix.addr.to_ipv4_mapped().unwrap().to_string(), class))
        .collect();
    // Class ids in prefix order; 10.20.0.7 holds what 10.20.0.5 does but
    // for metrics, so the classes differ.
    assert_eq!(
        classes,
        BTreeMap::from([
            ("10.0.0.0".to_owned(), 1),
            ("10.20.0.0".to_owned(), 2),
            ("10.20.0.5".to_owned(), 3),
            ("10.20.0.7".to_owned(), 4),
        ])
    );
}

#[test]
fn prefixes_with_the_same_claims_share_a_class() {
    let compiled = compile(
        r#"
[[service]]
name = "web"
addresses = ["10.30.0.1", "10.30.0.2", "fd00::1"]
ports = ["443/tcp"]
"#,
    );
    let classes: Vec<u32> = compiled
        .entries
        .destinations
        .iter()
        .map(|&(_, class)| class)
        .collect();
    assert_eq!(classes, [1, 1, 1]);
    assert_eq!(compiled.entries.service_ports.len(), 1);
}

#[test]
fn narrowing_grants_split_a_service_into_slots() {
    let compiled = compile(&format!(
        r#"
[[identity]]
id = "{A}"

[[service]]
name = "api"
addresses = ["10.20.0.5"]
ports = ["443/tcp", "8000-8099/tcp", "icmp"]

[[grant]]
from = ["{A}"]
to = ["api"]

[[grant]]
from = ["{A}"]
to = ["api"]
ports = ["8000-8049/tcp"]

[[grant]]
from = ["{A}"]
to = ["api"]
ports = ["8040-8059/tcp", "443/tcp"]
"#
    ));
    let grants = |port| grants_at(&compiled, A, "api", port);
    assert_eq!(grants(Port::Tcp(443)), [0, 2]);
    assert_eq!(grants(Port::Tcp(8000)), [0, 1]);
    assert_eq!(grants(Port::Tcp(8039)), [0, 1]);
    assert_eq!(grants(Port::Tcp(8040)), [0, 1, 2]);
    assert_eq!(grants(Port::Tcp(8049)), [0, 1, 2]);
    assert_eq!(grants(Port::Tcp(8050)), [0, 2]);
    assert_eq!(grants(Port::Tcp(8060)), [0]);
    assert_eq!(grants(Port::Icmp), [0]);
    // Ports that the same grants cover share a slot, however far apart;
    // slots count from 0 in port order (ICMP, then TCP, then UDP).
    let slot = |port| slot(&compiled, "api", port);
    assert_eq!(
        [Port::Icmp, Port::Tcp(443), Port::Tcp(8000), Port::Tcp(8045)].map(slot),
        [0, 1, 2, 3]
    );
    assert_eq!(slot(Port::Tcp(8055)), slot(Port::Tcp(443)));
    assert_eq!(slot(Port::Tcp(8099)), slot(Port::Icmp));
    assert_eq!(compiled.entries.grants.len(), 4);
}

#[test]
fn star_grants_are_keyed_once_for_any_source() {
    let compiled = compile(&format!(
        r#"
[[identity]]
id = "{A}"
addresses = ["100.96.0.1"]

[[identity]]
id = "{B}"

[[service]]
name = "api"
addresses = ["10.20.0.5"]
ports = ["443/tcp"]

[[grant]]
from = ["*", "{A}"]
to = ["api"]

[[grant]]
from = ["{A}"]
to = ["api"]
"#
    ));
    let api = service_id(&compiled, "api");
    assert_eq!(
        compiled.entries.grants,
        vec![
            ((tag(&compiled, A), api, 0), vec![1]),
            ((identity::ANY, api, 0), vec![0]),
        ]
    );
}

#[test]
fn label_selectors_key_every_identity_they_select() {
    let compiled = compile(
        r#"
[[identity]]
id = "spiffe://acme.internal/a"
labels = { team = "finance" }

[[identity]]
id = "spiffe://acme.internal/b"
labels = { team = "finance", kind = "agent" }

[[identity]]
id = "spiffe://acme.internal/c"
labels = { team = "ops" }

[[identity]]
id = "spiffe://acme.internal/d"
labels = { kind = "agent" }

[[service]]
name = "api"
addresses = ["10.20.0.5"]
ports = ["443/tcp"]

[[grant]]
from = ["team=finance", "kind=agent"]
to = ["api"]
"#,
    );
    let api = service_id(&compiled, "api");
    let mut expected: Vec<_> = ["a", "b", "d"]
        .map(|path| {
            let tag = tag(&compiled, &format!("spiffe://acme.internal/{path}"));
            ((tag, api, 0), vec![0])
        })
        .into();
    expected.sort();
    assert_eq!(compiled.entries.grants, expected);
}

#[test]
fn ipv6_prefixes_do_not_capture_ipv4() {
    let compiled = compile(
        r#"
[[identity]]
id = "spiffe://acme.internal/anywhere-v6"
addresses = ["::/0"]

[[identity]]
id = "spiffe://acme.internal/v4-host"
addresses = ["10.0.0.9"]

[[service]]
name = "v6-everything"
addresses = ["::/0"]
ports = ["443/tcp", "80/tcp"]

[[service]]
name = "v4-host"
addresses = ["10.0.0.5"]
ports = ["80/tcp"]
"#,
    );
    let at = |addr, port| service_at(&compiled, addr, port);
    assert_eq!(at("2001:db8::1", Port::Tcp(443)), Some("v6-everything"));
    assert_eq!(at("1.2.3.4", Port::Tcp(443)), None);
    assert_eq!(at("10.0.0.5", Port::Tcp(443)), None);
    assert_eq!(at("10.0.0.5", Port::Tcp(80)), Some("v4-host"));
    let anywhere = Some("spiffe://acme.internal/anywhere-v6");
    assert_eq!(source_at(&compiled, "2001:db8::1"), anywhere);
    assert_eq!(source_at(&compiled, "1.2.3.4"), None);
    assert_eq!(
        source_at(&compiled, "10.0.0.9"),
        Some("spiffe://acme.internal/v4-host")
    );
    // The shield: IPv4 0.0.0.0/0, which is ::ffff:0:0/96.
    let all_ipv4 = Prefix::new(ip("0.0.0.0"), 0);
    assert_eq!(all_ipv4, Prefix::new(ip("::ffff:0:0"), 96));
    assert!(
        compiled
            .entries
            .identities
            .contains(&(all_ipv4, identity::UNKNOWN))
    );
    let (_, class) = *compiled
        .entries
        .destinations
        .iter()
        .find(|(prefix, _)| *prefix == all_ipv4)
        .expect("an entry shielding IPv4");
    assert!(!compiled.entries.service_ports.iter().any(|e| e.0 == class));
}

#[test]
fn an_ipv4_default_route_is_its_own_shield() {
    let compiled = compile(
        r#"
[[identity]]
id = "spiffe://acme.internal/anywhere-v4"
addresses = ["0.0.0.0/0"]

[[identity]]
id = "spiffe://acme.internal/anywhere-v6"
addresses = ["::/0"]

[[service]]
name = "v6-everything"
addresses = ["::/0"]
ports = ["443/tcp"]

[[service]]
name = "v4-everything"
addresses = ["0.0.0.0/0"]
ports = ["80/tcp"]
"#,
    );
    let at = |addr, port| service_at(&compiled, addr, port);
    assert_eq!(at("1.2.3.4", Port::Tcp(80)), Some("v4-everything"));
    assert_eq!(at("1.2.3.4", Port::Tcp(443)), None);
    assert_eq!(at("2001:db8::1", Port::Tcp(80)), None);
    assert_eq!(
        source_at(&compiled, "1.2.3.4"),
        Some("spiffe://acme.internal/anywhere-v4")
    );
    assert_eq!(compiled.entries.destinations.len(), 2);
    assert_eq!(compiled.entries.identities.len(), 2);
}

#[test]
fn expiry_and_rate_become_grant_limits() {
    let compiled = compile(&format!(
        r#"
[[identity]]
id = "{A}"

[[service]]
name = "api"
addresses = ["10.20.0.5"]
ports = ["443/tcp"]

[[grant]]
from = ["{A}"]
to = ["api"]
expires = "2026-12-01T09:00:00+09:00"
rate = "20/s"

[[grant]]
from = ["{A}"]
to = ["api"]
rate = "3/m"

[[grant]]
from = ["{A}"]
to = ["api"]
"#
    ));
    assert_eq!(
        compiled.entries.grant_limits,
        [
            GrantLimits {
                expires: Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1_796_083_200)),
                rate: Some(Rate {
                    count: 20,
                    period: Duration::from_secs(1)
                }),
            },
            GrantLimits {
                expires: None,
                rate: Some(Rate {
                    count: 3,
                    period: Duration::from_secs(60)
                }),
            },
            GrantLimits::default(),
        ]
    );
}

#[test]
fn colliding_ids_are_numbered_by_name_whatever_the_order() {
    // Two IDs with the same FNV-1a hash, 0x37d4d18c.
    let first = "spiffe://acme.internal/agent/a1545705105";
    let second = "spiffe://acme.internal/agent/a3584380974";
    for (x, y) in [(first, second), (second, first)] {
        let compiled = compile(&format!(
            "[[identity]]\nid = \"{x}\"\n[[identity]]\nid = \"{y}\"\n"
        ));
        assert_eq!(tag(&compiled, first), 0x37d4_d18c);
        assert_eq!(tag(&compiled, second), 0x37d4_d18d);
    }
}

// ---------------------------------------------------------------------------
// Errors.

/// `count` grants from `from` to `api` (443/tcp), each written `grant`.
fn repeated_grants(from: &str, count: usize) -> String {
    let grant = format!("[[grant]]\nfrom = [\"{from}\"]\nto = [\"api\"]\n");
    format!(
        "[[identity]]\nid = \"{A}\"\nlabels = {{ team = \"x\" }}\n\
         [[service]]\nname = \"api\"\naddresses = [\"10.0.0.1\"]\nports = [\"443/tcp\", \"8000-8099/tcp\"]\n\
         {}",
        grant.repeat(count)
    )
}

#[test]
fn more_grants_on_one_key_than_the_kernel_tries_are_an_error() {
    let text = repeated_grants(A, GRANTS_PER_KEY);
    assert!(policy::compile(&parse(&text), &Capacities::default()).is_ok());
    let text = format!(
        "{}[[grant]]\nfrom = [\"team=x\"]\nto = [\"api\"]\nports = [\"8000-8009/tcp\"]\n",
        repeated_grants(A, GRANTS_PER_KEY)
    );
    assert_eq!(
        compile_error(&text, Capacities::default()),
        "more than 4 grants cover spiffe://acme.internal/a → api 8000-8009/tcp \
         (grants #1, #2, #3, #4, #5); merge them"
    );
    assert_eq!(
        compile_error(&repeated_grants("*", 5), Capacities::default()),
        "more than 4 grants cover * → api 443/tcp, 8000-8099/tcp \
         (grants #1, #2, #3, #4, #5); merge them"
    );
}

#[test]
fn each_map_over_capacity_is_an_error() {
    let text = r#"
[[identity]]
id = "spiffe://acme.internal/a"
addresses = ["100.96.0.1", "100.96.0.2", "100.97.0.0/16"]

[[identity]]
id = "spiffe://acme.internal/b"

[[service]]
name = "api"
addresses = ["10.0.0.1", "10.0.0.2"]
ports = ["8000-8099/tcp"]

[[grant]]
from = ["spiffe://acme.internal/a", "spiffe://acme.internal/b"]
to = ["api"]
"#;
    let compiled = compile(text);
    let entries = &compiled.entries;
    assert_eq!(
        (entries.identities.len(), entries.destinations.len()),
        (3, 2)
    );
    assert_eq!((entries.service_ports.len(), entries.grants.len()), (3, 2));
    let full = Capacities::default();
    let cases = [
        (
            Capacities {
                identity_hosts: 1,
                ..full
            },
            "the policy needs 2 IDENTITY_HOSTS entries (one per identity address that is a \
             single host); capacity is 1 per generation",
        ),
        (
            Capacities {
                identity_prefixes: 0,
                ..full
            },
            "the policy needs 1 IDENTITY_PREFIXES entries (one per identity prefix wider than \
             a host); capacity is 0 per generation",
        ),
        (
            Capacities {
                destinations: 1,
                ..full
            },
            "the policy needs 2 DESTINATIONS entries (one per service prefix); capacity is 1 \
             per generation",
        ),
        (
            Capacities {
                service_ports: 2,
                ..full
            },
            "the policy needs 3 SERVICE_PORTS entries (one per aligned block of ports in each \
             destination class); capacity is 2 per generation",
        ),
        (
            Capacities { grants: 1, ..full },
            "the policy needs 2 GRANTS entries (one per source, service and port slot that \
             grants cover); capacity is 1 per generation",
        ),
        (
            Capacities {
                grant_info: 0,
                ..full
            },
            "the policy needs 1 GRANT_INFO entries (one per grant); capacity is 0 per \
             generation",
        ),
    ];
    for (capacities, message) in cases {
        assert_eq!(compile_error(text, capacities), message);
    }
}

#[test]
fn grants_far_beyond_capacity_fail_before_their_entries_are_built() {
    let text = repeated_grants("team=x", 9);
    let capacities = Capacities {
        grants: 2,
        ..Capacities::default()
    };
    assert_eq!(
        compile_error(&text, capacities),
        "the grants cover 9 combinations of source, service and port slot: even at 4 grants \
         per entry, more than the capacity of 2 GRANTS entries per generation"
    );
}

// ---------------------------------------------------------------------------
// A large policy, built directly rather than parsed.

/// `identities` identities at one address each, labelled with one of 1000
/// teams; `services` services at a /32 each, every 4th also at a /128, every
/// 256th also at the /16 holding the next 255; `grants` grants, most from one identity to
/// one or two services, every 1000th from a team, every 1000th from `*`, a
/// third narrowed to 443/tcp.
fn large_policy(identities: usize, services: usize, grants: usize) -> Policy {
    let id = |i: usize| -> SpiffeId {
        format!("spiffe://acme.internal/agent/a{i}")
            .parse()
            .unwrap()
    };
    let identities: Vec<Identity> = (0..identities)
        .map(|i| Identity {
            id: id(i),
            addresses: vec![IpNet::from(IpAddr::from(Ipv4Addr::from(
                0x6440_0000 + i as u32,
            )))],
            labels: BTreeMap::from([("team".to_owned(), format!("t{}", i % 1000))]),
        })
        .collect();
    let ports: PortSet = ["443/tcp", "8000-8099/tcp", "icmp"]
        .map(|spec| spec.parse::<PortSpec>().unwrap())
        .into_iter()
        .collect();
    let services: Vec<Service> = (0..services)
        .map(|j| {
            let [_, _, high, low] = (j as u32).to_be_bytes();
            let mut addresses = vec![IpNet::from(IpAddr::from([10, high, low, 1]))];
            if j % 4 == 0 {
                addresses.push(IpNet::from(IpAddr::from([
                    0xfd10, 0, 0, 0, 0, 0, 0, j as u16,
                ])));
            }
            if low == 0 {
                addresses.push(IpNet::new(IpAddr::from([10, high, 0, 0]), 16).unwrap());
            }
            Service {
                name: format!("svc-{j}"),
                addresses,
                ports: ports.clone(),
            }
        })
        .collect();
    let narrowing: PortSet = ["443/tcp".parse::<PortSpec>().unwrap()]
        .into_iter()
        .collect();
    let grants = (0..grants)
        .map(|g| {
            let (from, sources, to) = match g % 1000 {
                999 => (Selector::Any, Sources::Any, vec![g / 1000 % services.len()]),
                500 => {
                    let team = g / 1000 % 1000;
                    let from = Selector::Label {
                        key: "team".to_owned(),
                        value: format!("t{team}"),
                    };
                    let selected = (team..identities.len()).step_by(1000).collect();
                    (
                        from,
                        Sources::Identities(selected),
                        vec![g % services.len()],
                    )
                }
                _ => {
                    let identity = g % identities.len();
                    let mut to = vec![g % services.len()];
                    if g % 10 == 1 {
                        to.push((g + 1) % services.len());
                    }
                    let from = Selector::Id(identities[identity].id.clone());
                    (from, Sources::Identities(vec![identity]), to)
                }
            };
            let narrowed = g % 3 == 0;
            let targets = to
                .into_iter()
                .map(|service| Target {
                    service,
                    ports: match narrowed {
                        true => services[service].ports.intersection(&narrowing),
                        false => services[service].ports.clone(),
                    },
                })
                .collect();
            Grant {
                from: vec![from],
                sources,
                ports: narrowed.then(|| narrowing.clone()),
                targets,
                expires: (g % 7 == 0).then(|| {
                    OffsetDateTime::from_unix_timestamp(1_796_083_200 + g as i64).unwrap()
                }),
                rate: (g % 5 == 0).then(|| "10/s".parse().unwrap()),
            }
        })
        .collect();
    Policy {
        trust_domain: "acme.internal".parse().unwrap(),
        identities,
        services,
        grants,
    }
}

#[test]
fn a_large_policy_compiles_and_its_lookups_agree_with_it() {
    let policy = large_policy(100_000, 10_000, 100_000);
    let compiled = policy::compile(&policy, &Capacities::default()).unwrap();
    assert_eq!(compiled.identities.len(), 100_000);
    assert_eq!(compiled.services.len(), 10_000);
    assert_eq!(compiled.entries.identities.len(), 100_000);
    assert_eq!(compiled.entries.grant_limits.len(), 100_000);
    // A sample of addresses and ports, by a fixed stride through them, and
    // identities granted some service there.
    let checker = Checker::new(&policy, &compiled);
    let ports = [Port::Tcp(443), Port::Tcp(8050), Port::Icmp, Port::Tcp(22)];
    for k in 0..12usize {
        let j = k * 7919 % 10_000;
        let [_, _, high, low] = (j as u32).to_be_bytes();
        let port = ports[k % ports.len()];
        let sources = [j, j + 10_000, j + 1];
        checker.probe(IpAddr::from([10, high, low, 1]), port, &sources);
        checker.probe(IpAddr::from([10, high, low, 2]), port, &sources);
        let i = k * 104_729 % 100_000;
        checker.probe(
            IpAddr::from(Ipv4Addr::from(0x6440_0000 + i as u32)),
            port,
            &[],
        );
    }
}

// ---------------------------------------------------------------------------
// Generated policies.

/// A valid policy, by construction: addresses no two identities bind and no
/// two services claim with overlapping ports, selectors that select someone,
/// narrowings within the services' ports, and at most `GRANTS_PER_KEY`
/// grants, so that no key can be crowded. Names refer to each other, so the
/// parts can be written in any order.
#[derive(Debug, Clone)]
struct Written {
    identities: Vec<WrittenIdentity>,
    services: Vec<WrittenService>,
    grants: Vec<WrittenGrant>,
}

#[derive(Debug, Clone)]
struct WrittenIdentity {
    id: String,
    addresses: Vec<IpNet>,
    labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone)]
struct WrittenService {
    name: String,
    addresses: Vec<IpNet>,
    ports: Vec<PortSpec>,
}

#[derive(Debug, Clone)]
struct WrittenGrant {
    from: Vec<String>,
    to: Vec<String>,
    ports: Option<Vec<PortSpec>>,
    expires: Option<String>,
    rate: Option<String>,
}

/// Prefixes that nest often: IPv4 around 10.1.1.0/24 and 10.1.2.0/24, IPv6
/// around fd00::1:0/112 and ::1:0/112 (whose short prefixes, like `::/0`,
/// contain the IPv4-mapped range).
fn prefix() -> impl Strategy<Value = IpNet> {
    let v4 = (
        select(vec![0u8, 8, 16, 24, 25, 28, 30, 31, 32]),
        1u8..=2,
        any::<u8>(),
    )
        .prop_map(|(len, c, d)| {
            IpNet::new(IpAddr::from([10, 1, c, d]), len)
                .unwrap()
                .trunc()
        });
    let v6 = (
        select(vec![0u8, 8, 64, 80, 112, 120, 126, 127, 128]),
        select(vec![0u16, 0xfd00]),
        1u16..=2,
        0u16..256,
    )
        .prop_map(|(len, a, g, h)| {
            let addr = IpAddr::from([a, 0, 0, 0, 0, 0, g, h]);
            IpNet::new(addr, len).unwrap().trunc()
        });
    prop_oneof![v4, v6]
}

/// Addresses in and around what [`prefix`] makes.
fn address() -> impl Strategy<Value = IpAddr> {
    prop_oneof![
        (1u8..=3, any::<u8>()).prop_map(|(c, d)| IpAddr::from([10, 1, c, d])),
        any::<[u8; 4]>().prop_map(IpAddr::from),
        (select(vec![0u16, 0xfd00, 0x2001]), 1u16..=3, 0u16..300)
            .prop_map(|(a, g, h)| IpAddr::from([a, 0, 0, 0, 0, 0, g, h])),
    ]
}

fn port_spec() -> impl Strategy<Value = PortSpec> {
    let range = (1u16..=120, 0u16..30)
        .prop_map(|(first, span)| PortRange::new(first, first + span).unwrap());
    prop_oneof![
        1 => Just(PortSpec::IcmpEcho),
        4 => range.clone().prop_map(PortSpec::Tcp),
        2 => range.prop_map(PortSpec::Udp),
        1 => Just(PortSpec::Tcp(PortRange::new(1, 65535).unwrap())),
    ]
}

fn port() -> impl Strategy<Value = Port> {
    prop_oneof![
        1 => Just(Port::Icmp),
        4 => (1u16..=160).prop_map(Port::Tcp),
        2 => (1u16..=160).prop_map(Port::Udp),
        1 => select(vec![443u16, 65535]).prop_map(Port::Tcp),
    ]
}

fn port_set(specs: &[PortSpec]) -> PortSet {
    specs.iter().copied().collect()
}

/// Drops the addresses another identity bound first.
fn identities(drafts: Vec<(Vec<IpNet>, BTreeMap<String, String>)>) -> Vec<WrittenIdentity> {
    let mut bound = Vec::new();
    let mut identities = Vec::new();
    for (index, (addresses, labels)) in drafts.into_iter().enumerate() {
        let mut kept = Vec::new();
        for net in addresses {
            if !bound.contains(&net) {
                bound.push(net);
                kept.push(net);
            }
        }
        identities.push(WrittenIdentity {
            id: format!("spiffe://acme.internal/w{index}"),
            addresses: kept,
            labels,
        });
    }
    identities
}

/// Drops the addresses another service claimed first with overlapping
/// ports; a service left with none gets an address of its own.
fn services(drafts: Vec<(Vec<IpNet>, Vec<PortSpec>)>) -> Vec<WrittenService> {
    let mut claims: Vec<(IpNet, PortSet)> = Vec::new();
    let mut services = Vec::new();
    for (index, (addresses, ports)) in drafts.into_iter().enumerate() {
        let set = port_set(&ports);
        let mut kept = Vec::new();
        for net in addresses {
            let free = claims
                .iter()
                .all(|(other, taken)| *other != net || taken.intersection(&set).is_empty());
            if free && !kept.contains(&net) {
                claims.push((net, set.clone()));
                kept.push(net);
            }
        }
        if kept.is_empty() {
            kept.push(IpNet::from(IpAddr::from([192, 0, 2, index as u8])));
        }
        services.push(WrittenService {
            name: format!("s{index}"),
            addresses: kept,
            ports,
        });
    }
    services
}

/// A spec within `spec`, chosen by `a` and `b`.
fn narrow(spec: PortSpec, a: u16, b: u16) -> PortSpec {
    let within = |range: PortRange| {
        let first = range.first() + a % (range.last() - range.first() + 1);
        let last = first + b % (range.last() - first + 1);
        PortRange::new(first, last).unwrap()
    };
    match spec {
        PortSpec::Tcp(range) => PortSpec::Tcp(within(range)),
        PortSpec::Udp(range) => PortSpec::Udp(within(range)),
        PortSpec::IcmpEcho => PortSpec::IcmpEcho,
    }
}

fn grant(
    identities: Vec<WrittenIdentity>,
    services: Vec<WrittenService>,
) -> impl Strategy<Value = WrittenGrant> {
    (
        vec((0u8..3, any::<Index>(), any::<Index>()), 1..4),
        vec(any::<Index>(), 1..4),
        option::of(vec((any::<Index>(), any::<u16>(), any::<u16>()), 3)),
        option::of(0i64..4_000_000_000),
        option::of((1u32..1000, any::<bool>())),
    )
        .prop_map(move |(picks, to, narrowing, expires, rate)| {
            let from = picks
                .into_iter()
                .map(|(kind, identity, label)| {
                    if identities.is_empty() || kind == 0 {
                        return "*".to_owned();
                    }
                    let identity = &identities[identity.index(identities.len())];
                    match identity
                        .labels
                        .iter()
                        .nth(label.index(identity.labels.len().max(1)))
                    {
                        Some((key, value)) if kind == 2 => format!("{key}={value}"),
                        _ => identity.id.clone(),
                    }
                })
                .collect();
            let mut targets: Vec<&WrittenService> = Vec::new();
            for index in to {
                let service = &services[index.index(services.len())];
                if !targets.iter().any(|t| t.name == service.name) {
                    targets.push(service);
                }
            }
            let ports = narrowing.map(|choices| {
                targets
                    .iter()
                    .zip(choices)
                    .map(|(service, (spec, a, b))| narrow(*spec.get(&service.ports), a, b))
                    .collect()
            });
            let expires = expires.map(|seconds| {
                OffsetDateTime::from_unix_timestamp(seconds)
                    .unwrap()
                    .format(&Rfc3339)
                    .unwrap()
            });
            WrittenGrant {
                from,
                to: targets.iter().map(|service| service.name.clone()).collect(),
                ports,
                expires,
                rate: rate.map(|(count, per_second)| {
                    format!("{count}/{}", if per_second { "s" } else { "m" })
                }),
            }
        })
}

fn written() -> impl Strategy<Value = Written> {
    let labels = btree_map(
        select(vec!["team".to_owned(), "kind".to_owned()]),
        select(vec!["a".to_owned(), "b".to_owned()]),
        0..3,
    );
    let identities = vec((vec(prefix(), 0..3), labels), 0..6).prop_map(identities);
    let services = vec((vec(prefix(), 1..4), vec(port_spec(), 1..4)), 1..6).prop_map(services);
    (identities, services).prop_flat_map(|(identities, services)| {
        let grants = vec(
            grant(identities.clone(), services.clone()),
            0..=GRANTS_PER_KEY,
        );
        (Just(identities), Just(services), grants).prop_map(|(identities, services, grants)| {
            Written {
                identities,
                services,
                grants,
            }
        })
    })
}

fn quoted<T: ToString>(items: &[T]) -> String {
    let items: Vec<String> = items
        .iter()
        .map(|item| format!("\"{}\"", item.to_string()))
        .collect();
    format!("[{}]", items.join(", "))
}

fn render(written: &Written) -> String {
    let mut text = String::new();
    for identity in &written.identities {
        text += &format!("[[identity]]\nid = \"{}\"\n", identity.id);
        if !identity.addresses.is_empty() {
            text += &format!("addresses = {}\n", quoted(&identity.addresses));
        }
        let labels: Vec<String> = identity
            .labels
            .iter()
            .map(|(k, v)| format!("{k} = \"{v}\""))
            .collect();
        text += &format!("labels = {{ {} }}\n", labels.join(", "));
    }
    for service in &written.services {
        text += &format!(
            "[[service]]\nname = \"{}\"\naddresses = {}\nports = {}\n",
            service.name,
            quoted(&service.addresses),
            quoted(&service.ports)
        );
    }
    for grant in &written.grants {
        text += &format!(
            "[[grant]]\nfrom = {}\nto = {}\n",
            quoted(&grant.from),
            quoted(&grant.to)
        );
        if let Some(ports) = &grant.ports {
            text += &format!("ports = {}\n", quoted(ports));
        }
        if let Some(expires) = &grant.expires {
            text += &format!("expires = \"{expires}\"\n");
        }
        if let Some(rate) = &grant.rate {
            text += &format!("rate = \"{rate}\"\n");
        }
    }
    text
}

/// `written` with its parts in the given orders, and the lists in them
/// reversed.
fn reordered(
    written: &Written,
    identities: &[usize],
    services: &[usize],
    grants: &[usize],
) -> Written {
    let mut written = Written {
        identities: identities
            .iter()
            .map(|&i| written.identities[i].clone())
            .collect(),
        services: services
            .iter()
            .map(|&i| written.services[i].clone())
            .collect(),
        grants: grants.iter().map(|&i| written.grants[i].clone()).collect(),
    };
    written
        .identities
        .iter_mut()
        .for_each(|identity| identity.addresses.reverse());
    for service in &mut written.services {
        service.addresses.reverse();
        service.ports.reverse();
    }
    for grant in &mut written.grants {
        grant.from.reverse();
        grant.to.reverse();
    }
    written
}

fn permutation(len: usize) -> impl Strategy<Value = Vec<usize>> {
    Just((0..len).collect::<Vec<_>>()).prop_shuffle()
}

/// Grant lists with each grant renamed by `rename` and sorted.
fn grant_sets(
    entries: &PolicyEntries,
    rename: impl Fn(u32) -> u32,
) -> Vec<((u32, u32, u32), Vec<u32>)> {
    entries
        .grants
        .iter()
        .map(|(key, grants)| {
            let mut grants: Vec<u32> = grants.iter().map(|&grant| rename(grant)).collect();
            grants.sort_unstable();
            (*key, grants)
        })
        .collect()
}

proptest! {
    // Failures are kept beside this file: an integration test has no lib.rs
    // for the default place to be found from.
    #![proptest_config(ProptestConfig {
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource("regressions"))),
        ..ProptestConfig::default()
    })]

    #[test]
    fn compiled_lookups_agree_with_the_policy(
        written in written(),
        probes in vec((address(), port()), 48),
    ) {
        let text = render(&written);
        let policy = parse(&text);
        let compiled = policy::compile(&policy, &Capacities::default())
            .map_err(|error| TestCaseError::fail(format!("{error}\n{text}")))?;
        for prefixes in [&compiled.entries.identities, &compiled.entries.destinations] {
            let mut distinct: Vec<Prefix> = prefixes.iter().map(|&(prefix, _)| prefix).collect();
            distinct.sort_unstable();
            distinct.dedup();
            prop_assert_eq!(distinct.len(), prefixes.len(), "a prefix twice in one map");
        }
        let checker = Checker::new(&policy, &compiled);
        let everyone: Vec<usize> = (0..policy.identities.len()).collect();
        for (addr, port) in probes {
            checker.probe(addr, port, &everyone);
        }
        // Every address the policy names, and the first address after it.
        let named = policy.identities.iter().flat_map(|i| &i.addresses);
        let named = named.chain(policy.services.iter().flat_map(|s| &s.addresses));
        for net in named {
            for addr in [net.network(), net.broadcast()] {
                for port in [Port::Icmp, Port::Tcp(1), Port::Tcp(443), Port::Udp(30)] {
                    checker.probe(addr, port, &everyone);
                }
            }
        }
    }

    #[test]
    fn numbers_do_not_depend_on_the_order_of_the_file(
        (written, identities, services, grants) in written().prop_flat_map(|written| {
            let orders = (
                permutation(written.identities.len()),
                permutation(written.services.len()),
                permutation(written.grants.len()),
            );
            (Just(written), orders).prop_map(|(written, (i, s, g))| (written, i, s, g))
        }),
    ) {
        let compile = |written: &Written| {
            policy::compile(&parse(&render(written)), &Capacities::default()).unwrap()
        };
        let original = compile(&written);
        let shuffled = compile(&reordered(&written, &identities, &services, &grants));
        prop_assert_eq!(&original.identities, &shuffled.identities);
        prop_assert_eq!(&original.services, &shuffled.services);
        let (a, b) = (&original.entries, &shuffled.entries);
        prop_assert_eq!(&a.identities, &b.identities);
        prop_assert_eq!(&a.destinations, &b.destinations);
        prop_assert_eq!(&a.service_ports, &b.service_ports);
        // Grant n of the shuffled file is grant grants[n] of the original.
        prop_assert_eq!(
            grant_sets(a, |grant| grant),
            grant_sets(b, |grant| grants[grant as usize] as u32)
        );
        for (n, limits) in b.grant_limits.iter().enumerate() {
            prop_assert_eq!(limits, &a.grant_limits[grants[n]]);
        }
    }
}
