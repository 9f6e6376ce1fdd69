//! Property tests: a generated policy, written as TOML, reads back as the
//! model it describes; and a damaged one never makes the reader panic or
//! point outside the file.

use std::{collections::BTreeMap, net::IpAddr, sync::Arc};

use ipnet::IpNet;
use mesh_agent::policy::{
    self, Grant, Identity, Per, Policy, PortRange, PortSet, PortSpec, Rate, Selector, Service,
    Sources, Target,
};
use proptest::{
    collection::vec, option, prelude::*, sample::Index, test_runner::FileFailurePersistence,
};
use time::{OffsetDateTime, UtcOffset, format_description::well_known::Rfc3339};
use toml::{Table, Value};

/// A policy as someone might write it: repeated addresses and port specs,
/// bare addresses, offsets other than UTC.
#[derive(Debug, Clone)]
struct Written {
    trust_domain: String,
    identities: Arc<Vec<WrittenIdentity>>,
    services: Arc<Vec<WrittenService>>,
    grants: Vec<WrittenGrant>,
}

#[derive(Debug, Clone)]
struct WrittenIdentity {
    path: Vec<String>,
    addresses: Vec<Address>,
    labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone)]
struct WrittenService {
    name: String,
    addresses: Vec<Address>,
    ports: Vec<PortSpec>,
}

#[derive(Debug, Clone)]
struct WrittenGrant {
    from: Vec<Pick>,
    /// Indices into the services.
    to: Vec<usize>,
    ports: Option<Vec<PortSpec>>,
    expires: Option<Expiry>,
    rate: Option<Rate>,
}

#[derive(Debug, Clone)]
struct Address {
    prefix: IpNet,
    /// Written without a prefix length (only for a single address).
    bare: bool,
}

#[derive(Debug, Clone, PartialEq)]
enum Pick {
    Any,
    Identity(usize),
    Label(String, String),
}

#[derive(Debug, Clone)]
struct Expiry {
    utc: OffsetDateTime,
    /// The offset it is written in.
    offset: UtcOffset,
    /// Written as a string rather than a TOML date-time.
    quoted: bool,
}

/// Identity `index`'s prefixes are in 100.(64+index).0.0/16 and
/// fd00:index::/32, so no two identities bind the same one.
fn identity(index: usize) -> impl Strategy<Value = WrittenIdentity> {
    let label_key = prop_oneof![
        Just("team".to_owned()),
        Just("kind".to_owned()),
        Just("app.acme.io/tier".to_owned()),
    ];
    let label_value = "[a-z0-9]([a-zA-Z0-9._-]{0,6}[a-z0-9])?";
    (
        vec("[a-zA-Z0-9_-][a-zA-Z0-9._-]{0,7}", 0..3),
        vec(address(100, 64 + index as u8, 0xfd00, index as u16), 0..4),
        proptest::collection::btree_map(label_key, label_value, 0..3),
    )
        .prop_map(move |(mut path, addresses, labels)| {
            path.insert(0, format!("w{index}"));
            WrittenIdentity {
                path,
                addresses,
                labels,
            }
        })
}

/// Service `index`'s prefixes are in 10.index.0.0/16 and fd10:index::/32, so
/// no two services claim the same one.
fn service(index: usize) -> impl Strategy<Value = WrittenService> {
    (
        "[a-z0-9._-]{0,6}",
        vec(address(10, index as u8, 0xfd10, index as u16), 1..4),
        vec(port_spec(), 1..4),
    )
        .prop_map(move |(infix, addresses, ports)| WrittenService {
            name: format!("s{infix}{index}"),
            addresses,
            ports,
        })
}

/// An IPv4 prefix in `a.b.0.0/16` or an IPv6 one in `c:d::/32`.
fn address(a: u8, b: u8, c: u16, d: u16) -> impl Strategy<Value = Address> {
    let v4 = (any::<[u8; 2]>(), 16u8..=32).prop_map(move |([x, y], len)| {
        IpNet::new(IpAddr::from([a, b, x, y]), len).unwrap().trunc()
    });
    let v6 = (any::<[u16; 6]>(), 32u8..=128).prop_map(move |(rest, len)| {
        let [e, f, g, h, i, j] = rest;
        IpNet::new(IpAddr::from([c, d, e, f, g, h, i, j]), len)
            .unwrap()
            .trunc()
    });
    (prop_oneof![v4, v6], any::<bool>()).prop_map(|(prefix, bare)| Address {
        bare: bare && prefix.prefix_len() == prefix.max_prefix_len(),
        prefix,
    })
}

fn port_spec() -> impl Strategy<Value = PortSpec> {
    let ports = (1u16..=65535, 0u16..2000, any::<bool>()).prop_map(|(first, span, tcp)| {
        let range = PortRange::new(first, first.saturating_add(span)).unwrap();
        if tcp {
            PortSpec::Tcp(range)
        } else {
            PortSpec::Udp(range)
        }
    });
    prop_oneof![1 => Just(PortSpec::IcmpEcho), 4 => ports]
}

fn expiry() -> impl Strategy<Value = Expiry> {
    // Far enough from years 0 and 9999 for any offset.
    let seconds = 86_400i64..253_402_300_799 - 86_400;
    (seconds, 0u32..1_000_000_000, -1439i32..=1439, any::<bool>()).prop_map(
        |(seconds, nanos, minutes, quoted)| Expiry {
            utc: OffsetDateTime::from_unix_timestamp(seconds)
                .unwrap()
                .replace_nanosecond(nanos)
                .unwrap(),
            offset: UtcOffset::from_whole_seconds(minutes * 60).unwrap(),
            quoted,
        },
    )
}

fn rate() -> impl Strategy<Value = Rate> {
    (1..=u32::MAX, any::<bool>()).prop_map(|(count, per_second)| Rate {
        count: count.try_into().unwrap(),
        per: if per_second { Per::Second } else { Per::Minute },
    })
}

/// A grant that is valid for these identities and services: its selectors
/// select someone, and its `ports`, if any, keep a port of each service.
fn grant(
    identities: Arc<Vec<WrittenIdentity>>,
    services: Arc<Vec<WrittenService>>,
) -> impl Strategy<Value = WrittenGrant> {
    (
        vec((0u8..3, any::<Index>(), any::<Index>()), 1..4),
        vec(any::<Index>(), 1..4),
        option::of(vec((any::<Index>(), any::<u16>(), any::<u16>()), 4)),
        option::of(expiry()),
        option::of(rate()),
    )
        .prop_map(move |(picks, to, narrowing, expires, rate)| {
            let from = picks
                .into_iter()
                .map(|(kind, identity, label)| pick(&identities, kind, identity, label))
                .collect();
            let to: Vec<usize> = to.iter().map(|index| index.index(services.len())).collect();
            let ports = narrowing.map(|choices| {
                unique(to.clone())
                    .into_iter()
                    .zip(choices)
                    .map(|(service, (spec, a, b))| {
                        narrow(*spec.get(&services[service].ports), a, b)
                    })
                    .collect()
            });
            WrittenGrant {
                from,
                to,
                ports,
                expires,
                rate,
            }
        })
}

fn pick(identities: &[WrittenIdentity], kind: u8, identity: Index, label: Index) -> Pick {
    if identities.is_empty() || kind == 0 {
        return Pick::Any;
    }
    let identity = identity.index(identities.len());
    let labels = &identities[identity].labels;
    if kind == 1 || labels.is_empty() {
        return Pick::Identity(identity);
    }
    let (key, value) = labels.iter().nth(label.index(labels.len())).unwrap();
    Pick::Label(key.clone(), value.clone())
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

fn written() -> impl Strategy<Value = Written> {
    let trust_domain = "[a-z0-9][a-z0-9._-]{0,15}";
    let identities =
        (0usize..5).prop_flat_map(|count| (0..count).map(identity).collect::<Vec<_>>());
    let services = (1usize..4).prop_flat_map(|count| (0..count).map(service).collect::<Vec<_>>());
    (trust_domain, identities, services)
        .prop_flat_map(|(trust_domain, identities, services)| {
            let identities = Arc::new(identities);
            let services = Arc::new(services);
            let grants = vec(grant(identities.clone(), services.clone()), 0..5);
            (Just(trust_domain), Just(identities), Just(services), grants)
        })
        .prop_map(|(trust_domain, identities, services, grants)| Written {
            trust_domain,
            identities,
            services,
            grants,
        })
}

fn spiffe_id(written: &Written, identity: &WrittenIdentity) -> String {
    format!(
        "spiffe://{}/{}",
        written.trust_domain,
        identity.path.join("/")
    )
}

fn render(written: &Written) -> String {
    let addresses = |addresses: &[Address]| -> Value {
        let address = |a: &Address| match a.bare {
            true => a.prefix.addr().to_string(),
            false => a.prefix.to_string(),
        };
        Value::Array(addresses.iter().map(address).map(Value::from).collect())
    };
    let specs = |specs: &[PortSpec]| -> Value {
        Value::Array(specs.iter().map(|spec| spec.to_string().into()).collect())
    };
    let identities = written.identities.iter().map(|identity| {
        let mut table = Table::new();
        table.insert("id".into(), spiffe_id(written, identity).into());
        if !identity.addresses.is_empty() {
            table.insert("addresses".into(), addresses(&identity.addresses));
        }
        if !identity.labels.is_empty() {
            let labels = identity
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone().into()));
            table.insert("labels".into(), Value::Table(labels.collect()));
        }
        Value::Table(table)
    });
    let services = written.services.iter().map(|service| {
        let mut table = Table::new();
        table.insert("name".into(), service.name.clone().into());
        table.insert("addresses".into(), addresses(&service.addresses));
        table.insert("ports".into(), specs(&service.ports));
        Value::Table(table)
    });
    let grants = written.grants.iter().map(|grant| {
        let mut table = Table::new();
        let from = grant.from.iter().map(|pick| match pick {
            Pick::Any => "*".to_owned(),
            Pick::Identity(index) => spiffe_id(written, &written.identities[*index]),
            Pick::Label(key, value) => format!("{key}={value}"),
        });
        table.insert("from".into(), Value::Array(from.map(Value::from).collect()));
        let to = grant
            .to
            .iter()
            .map(|&index| written.services[index].name.clone());
        table.insert("to".into(), Value::Array(to.map(Value::from).collect()));
        if let Some(ports) = &grant.ports {
            table.insert("ports".into(), specs(ports));
        }
        if let Some(expiry) = &grant.expires {
            let text = expiry
                .utc
                .to_offset(expiry.offset)
                .format(&Rfc3339)
                .unwrap();
            let value = match expiry.quoted {
                true => Value::from(text),
                false => Value::Datetime(text.parse().unwrap()),
            };
            table.insert("expires".into(), value);
        }
        if let Some(rate) = grant.rate {
            table.insert("rate".into(), rate.to_string().into());
        }
        Value::Table(table)
    });
    let mut document = Table::new();
    document.insert("version".into(), 1.into());
    document.insert("trust_domain".into(), written.trust_domain.clone().into());
    document.insert("identity".into(), Value::Array(identities.collect()));
    document.insert("service".into(), Value::Array(services.collect()));
    document.insert("grant".into(), Value::Array(grants.collect()));
    toml::to_string(&document).unwrap()
}

/// The model `written` describes, worked out independently of the reader.
fn model(written: &Written) -> Policy {
    let prefixes = |addresses: &[Address]| unique(addresses.iter().map(|a| a.prefix).collect());
    let identities: Vec<Identity> = written
        .identities
        .iter()
        .map(|identity| Identity {
            id: spiffe_id(written, identity).parse().unwrap(),
            addresses: prefixes(&identity.addresses),
            labels: identity.labels.clone(),
        })
        .collect();
    let services: Vec<Service> = written
        .services
        .iter()
        .map(|service| Service {
            name: service.name.clone(),
            addresses: prefixes(&service.addresses),
            ports: service.ports.iter().copied().collect(),
        })
        .collect();
    let grants = written
        .grants
        .iter()
        .map(|grant| {
            let selected = |pick: &Pick| -> Vec<usize> {
                match pick {
                    Pick::Any => Vec::new(),
                    Pick::Identity(index) => vec![*index],
                    Pick::Label(key, value) => (0..identities.len())
                        .filter(|&i| identities[i].labels.get(key) == Some(value))
                        .collect(),
                }
            };
            let sources = if grant.from.contains(&Pick::Any) {
                Sources::Any
            } else {
                let mut indices: Vec<usize> = grant.from.iter().flat_map(selected).collect();
                indices.sort_unstable();
                indices.dedup();
                Sources::Identities(indices)
            };
            let narrowing: Option<PortSet> = grant
                .ports
                .as_ref()
                .map(|ports| ports.iter().copied().collect());
            let targets = unique(grant.to.clone())
                .into_iter()
                .map(|service| Target {
                    service,
                    ports: match &narrowing {
                        Some(narrowing) => services[service].ports.intersection(narrowing),
                        None => services[service].ports.clone(),
                    },
                })
                .collect();
            let from = grant.from.iter().map(|pick| match pick {
                Pick::Any => Selector::Any,
                Pick::Identity(index) => Selector::Id(identities[*index].id.clone()),
                Pick::Label(key, value) => Selector::Label {
                    key: key.clone(),
                    value: value.clone(),
                },
            });
            Grant {
                from: unique(from.collect()),
                sources,
                ports: narrowing,
                targets,
                expires: grant.expires.as_ref().map(|expiry| expiry.utc),
                rate: grant.rate,
            }
        })
        .collect();
    Policy {
        trust_domain: written.trust_domain.parse().unwrap(),
        identities,
        services,
        grants,
    }
}

/// The values, each once, in the order first seen.
fn unique<T: PartialEq>(values: Vec<T>) -> Vec<T> {
    let mut kept = Vec::with_capacity(values.len());
    for value in values {
        if !kept.contains(&value) {
            kept.push(value);
        }
    }
    kept
}

proptest! {
    // Failures are kept beside this file: an integration test has no lib.rs
    // for the default place to be found from.
    #![proptest_config(ProptestConfig {
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource("regressions"))),
        ..ProptestConfig::default()
    })]

    #[test]
    fn written_policies_read_back_as_their_model(written in written()) {
        let text = render(&written);
        let parsed = policy::parse("policy.toml", &text)
            .map_err(|errors| TestCaseError::fail(format!("{errors}\n{text}")))?;
        prop_assert_eq!(parsed, model(&written));
    }

    #[test]
    fn damaged_policies_are_reported_within_the_file(
        written in written(),
        cut in any::<Index>(),
        length in 0usize..40,
        junk in "[\\[\\]{}=\",.:/#*a-z0-9 \n\u{e9}-]{0,8}",
    ) {
        let mut text = render(&written);
        let start = text.floor_char_boundary(cut.index(text.len() + 1));
        let end = text.floor_char_boundary((start + length).min(text.len()));
        text.replace_range(start..end, &junk);
        if let Err(errors) = policy::parse("policy.toml", &text) {
            let lines = text.split('\n').count();
            for error in errors.iter() {
                prop_assert!((1..=lines).contains(&error.line()), "{error}\n{text}");
                let line = text.split('\n').nth(error.line() - 1).unwrap();
                prop_assert!((1..=line.chars().count() + 1).contains(&error.column()), "{error}\n{text}");
            }
        }
    }
}
