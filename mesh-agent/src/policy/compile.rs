//! The policy compiler: from a checked [`Policy`] to the entries of the
//! kernel maps, laid out as docs/datapath.md describes.

mod slots;
mod tags;

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, Ipv4Addr},
    time::{Duration, SystemTime},
};

use ipnet::IpNet;
use mesh_common::{GRANTS_PER_KEY, identity, maps, service};

use super::{Grant, Per, Policy, Sources, SpiffeId};
use crate::datapath::{self, GrantLimits, MapSizes, PolicyEntries, PortBlock, Prefix};
use slots::{Slots, Span, spans};

/// A policy compiled for the kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Compiled {
    pub entries: PolicyEntries,
    /// Identity tag → SPIFFE ID and service id → name, to name what the
    /// kernel reports: replay output, counters, status.
    pub identities: BTreeMap<u32, SpiffeId>,
    pub services: BTreeMap<u32, String>,
}

/// How many entries of each map one policy may use. The maps hold two
/// generations, the live policy and the next, so a policy gets half of each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacities {
    pub identity_hosts: u32,
    pub identity_prefixes: u32,
    pub destinations: u32,
    pub service_ports: u32,
    pub grants: u32,
    /// Grants in the policy: entries of its half of `GRANT_INFO`.
    pub grant_info: u32,
}

impl From<&MapSizes> for Capacities {
    /// A generation's share of maps of these sizes.
    fn from(sizes: &MapSizes) -> Self {
        Self {
            identity_hosts: sizes.identity_hosts / 2,
            identity_prefixes: sizes.identity_prefixes / 2,
            destinations: sizes.destinations / 2,
            service_ports: sizes.service_ports / 2,
            grants: sizes.grants / 2,
            grant_info: sizes.grants_per_generation(),
        }
    }
}

impl Default for Capacities {
    /// A generation's share of the maps at their default sizes.
    fn default() -> Self {
        Self::from(&MapSizes::default())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CompileError {
    /// The kernel tries at most [`GRANTS_PER_KEY`] grants for a source,
    /// service and port slot.
    #[error(
        "more than {GRANTS_PER_KEY} grants cover {from} → {service} {ports} (grants {}); \
         merge them",
        numbered(.grants)
    )]
    CrowdedSlot {
        /// A SPIFFE ID, or `*`.
        from: String,
        service: String,
        ports: String,
        /// The first grants covering it, numbered from 1 in file order.
        grants: Vec<usize>,
    },
    #[error(
        "the policy needs {needed} {map} entries ({per}); capacity is {capacity} per generation"
    )]
    OverCapacity {
        map: &'static str,
        /// What one entry stands for.
        per: &'static str,
        needed: usize,
        capacity: u32,
    },
    /// Checked before the grant entries are built, so that a policy far too
    /// big for the maps fails fast instead of taking the memory to count them.
    #[error(
        "the grants cover {combinations} combinations of source, service and port slot: \
         even at {GRANTS_PER_KEY} grants per entry, more than the capacity of {capacity} {} \
         entries per generation",
        maps::GRANTS
    )]
    TooManyCombinations { combinations: u64, capacity: u32 },
}

fn numbered(grants: &[usize]) -> String {
    let numbers: Vec<String> = grants.iter().map(|number| format!("#{number}")).collect();
    numbers.join(", ")
}

/// In the maps' 16-byte form, IPv4 is `::ffff:0:0/96`: an IPv6 prefix such as
/// `::/0` contains all of it. An entry for this prefix, IPv4 `0.0.0.0/0`,
/// keeps IPv4 addresses from matching such IPv6 prefixes.
const ALL_IPV4: IpNet = IpNet::new_assert(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0);

/// Compiles `policy` into the entries of one generation of the maps, or says
/// why it does not fit them.
pub fn compile(policy: &Policy, capacities: &Capacities) -> Result<Compiled, CompileError> {
    let ids = policy
        .identities
        .iter()
        .map(|identity| identity.id.as_str());
    let tags = tags::assign(ids, &[identity::UNKNOWN, identity::ANY]);
    let names = policy.services.iter().map(|service| service.name.as_str());
    let service_ids = tags::assign(names, &[service::NONE]);
    let slots = slots(policy);
    let (destinations, service_ports) = destinations(policy, &service_ids, &slots);
    let entries = PolicyEntries {
        identities: identities(policy, &tags),
        destinations,
        service_ports,
        grants: grants(policy, &tags, &service_ids, &slots, capacities.grants)?,
        bound: Vec::new(),
        grant_limits: policy.grants.iter().map(limits).collect(),
    };
    check_capacities(&entries, capacities)?;
    let identities = policy.identities.iter().map(|identity| identity.id.clone());
    let services = policy.services.iter().map(|service| service.name.clone());
    Ok(Compiled {
        entries,
        identities: tags.iter().copied().zip(identities).collect(),
        services: service_ids.iter().copied().zip(services).collect(),
    })
}

fn prefix(net: IpNet) -> Prefix {
    Prefix::new(net.addr(), net.prefix_len())
}

/// Whether `prefixes` need [`ALL_IPV4`] added to keep IPv4 out of them.
fn need_ipv4_shield<'a>(prefixes: impl IntoIterator<Item = &'a IpNet>) -> bool {
    let all_ipv4 = Ipv4Addr::UNSPECIFIED.to_ipv6_mapped();
    let (mut captured, mut shielded) = (false, false);
    for net in prefixes {
        captured |= matches!(net, IpNet::V6(v6) if v6.contains(&all_ipv4));
        shielded |= *net == ALL_IPV4;
    }
    captured && !shielded
}

/// Source prefix → identity tag, sorted.
fn identities(policy: &Policy, tags: &[u32]) -> Vec<(Prefix, u32)> {
    let mut entries: Vec<(Prefix, u32)> = policy
        .identities
        .iter()
        .zip(tags)
        .flat_map(|(identity, &tag)| {
            identity
                .addresses
                .iter()
                .map(move |&net| (prefix(net), tag))
        })
        .collect();
    if need_ipv4_shield(
        policy
            .identities
            .iter()
            .flat_map(|identity| &identity.addresses),
    ) {
        entries.push((prefix(ALL_IPV4), identity::UNKNOWN));
    }
    entries.sort_unstable();
    entries
}

/// Each service's slots, cut by the grants that narrow its ports.
fn slots(policy: &Policy) -> Vec<Slots> {
    let mut narrowings: Vec<Vec<(usize, Vec<Span>)>> = vec![Vec::new(); policy.services.len()];
    for (index, grant) in policy.grants.iter().enumerate() {
        for target in &grant.targets {
            if target.ports != policy.services[target.service].ports {
                narrowings[target.service].push((index, spans(&target.ports)));
            }
        }
    }
    policy
        .services
        .iter()
        .zip(&narrowings)
        .map(|(service, narrowings)| Slots::new(&spans(&service.ports), narrowings))
        .collect()
}

/// Ports of a destination class and the service (by index) they reach.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Claim {
    ports: Span,
    service: usize,
}

/// (class, port block) → (service id, slot).
type ServicePorts = Vec<(u32, PortBlock, u32, u32)>;

/// The destination classes: `DESTINATIONS` (prefix → class) and
/// `SERVICE_PORTS`. A prefix's class holds, for each port, the service of the
/// most specific prefix containing it that claims the port, so the kernel's
/// longest-prefix match on the address finds it. Identical classes share an
/// id; ids count from 1 in prefix order.
fn destinations(
    policy: &Policy,
    service_ids: &[u32],
    slots: &[Slots],
) -> (Vec<(Prefix, u32)>, ServicePorts) {
    // Ordered by family, then address, then length: a prefix comes right
    // before those it contains, and IPv4 never sits inside IPv6.
    let mut claimed: BTreeMap<IpNet, Vec<Claim>> = BTreeMap::new();
    for (index, service) in policy.services.iter().enumerate() {
        let ports = spans(&service.ports);
        for &net in &service.addresses {
            let claims = ports.iter().map(|&ports| Claim {
                ports,
                service: index,
            });
            claimed.entry(net).or_default().extend(claims);
        }
    }
    if need_ipv4_shield(claimed.keys()) {
        claimed.insert(ALL_IPV4, Vec::new());
    }
    let mut classes: Vec<Vec<Claim>> = Vec::new();
    let mut class_ids: HashMap<Vec<Claim>, u32> = HashMap::new();
    let mut destinations = Vec::with_capacity(claimed.len());
    // The prefixes containing the current one, innermost last, with classes.
    let mut enclosing: Vec<(IpNet, u32)> = Vec::new();
    for (net, mut own) in claimed {
        while let Some((outer, _)) = enclosing.last()
            && !outer.contains(&net)
        {
            enclosing.pop();
        }
        own.sort_unstable_by_key(|claim| claim.ports.first);
        let inherited = enclosing
            .last()
            .map_or(&[][..], |&(_, class)| &classes[class as usize - 1]);
        let class = overlay(inherited, &own);
        let id = *class_ids.entry(class).or_insert_with_key(|class| {
            classes.push(class.clone());
            classes.len() as u32
        });
        destinations.push((prefix(net), id));
        enclosing.push((net, id));
    }
    let service_ports = classes
        .iter()
        .zip(1..)
        .flat_map(|(class, id)| {
            class.iter().flat_map(move |claim| {
                let service = service_ids[claim.service];
                slots[claim.service]
                    .split(claim.ports)
                    .flat_map(move |(ports, slot)| {
                        ports
                            .blocks()
                            .into_iter()
                            .map(move |block| (id, block, service, slot))
                    })
            })
        })
        .collect();
    (destinations, service_ports)
}

/// A prefix's class: its own claims, and the enclosing prefix's class for the
/// ports it does not claim itself. All three are sorted and disjoint.
fn overlay(inherited: &[Claim], own: &[Claim]) -> Vec<Claim> {
    let mut class = Vec::with_capacity(inherited.len() + own.len());
    let mut own = own.iter().copied().peekable();
    // Ports below this one are decided.
    let mut next = 0;
    for &outer in inherited {
        while let Some(mine) = own.next_if(|mine| mine.ports.first <= outer.ports.last) {
            let first = next.max(outer.ports.first);
            if first < mine.ports.first {
                let ports = Span {
                    first,
                    last: mine.ports.first - 1,
                };
                class.push(Claim { ports, ..outer });
            }
            class.push(mine);
            next = mine.ports.last + 1;
        }
        let first = next.max(outer.ports.first);
        if first <= outer.ports.last {
            let ports = Span {
                first,
                last: outer.ports.last,
            };
            class.push(Claim { ports, ..outer });
        }
    }
    class.extend(own);
    class
}

/// (source tag or `ANY`, service id, slot) → the grants covering it, in
/// policy order; sorted by key.
type GrantEntries = Vec<((u32, u32, u32), Vec<u32>)>;

fn grants(
    policy: &Policy,
    tags: &[u32],
    service_ids: &[u32],
    slots: &[Slots],
    capacity: u32,
) -> Result<GrantEntries, CompileError> {
    let combinations: u64 = policy
        .grants
        .iter()
        .enumerate()
        .map(|(index, grant)| {
            let sources = match &grant.sources {
                Sources::Any => 1,
                Sources::Identities(identities) => identities.len(),
            };
            let covered: usize = grant
                .targets
                .iter()
                .map(|target| slots[target.service].of_grant(index).count())
                .sum();
            sources as u64 * covered as u64
        })
        .sum();
    // Each entry holds at most GRANTS_PER_KEY of the combinations.
    if combinations > GRANTS_PER_KEY as u64 * u64::from(capacity) {
        return Err(CompileError::TooManyCombinations {
            combinations,
            capacity,
        });
    }
    let mut covered: Vec<((u32, u32, u32), u32)> = Vec::with_capacity(combinations as usize);
    for (index, grant) in (0..).zip(&policy.grants) {
        // `*` is keyed once, for the kernel to try after the source's own.
        let sources: Vec<u32> = match &grant.sources {
            Sources::Any => vec![identity::ANY],
            Sources::Identities(identities) => identities.iter().map(|&i| tags[i]).collect(),
        };
        for target in &grant.targets {
            let service = service_ids[target.service];
            for slot in slots[target.service].of_grant(index as usize) {
                covered.extend(
                    sources
                        .iter()
                        .map(|&source| ((source, service, slot), index)),
                );
            }
        }
    }
    // Each key's grants together, in policy order.
    covered.sort_unstable();
    let mut entries = GrantEntries::new();
    for same_key in covered.chunk_by(|a, b| a.0 == b.0) {
        let key = same_key[0].0;
        let grants = same_key.iter().map(|&(_, grant)| grant);
        if same_key.len() > GRANTS_PER_KEY {
            let grants = grants.take(GRANTS_PER_KEY + 1).collect::<Vec<_>>();
            return Err(crowded(policy, tags, service_ids, slots, key, &grants));
        }
        entries.push((key, grants.collect()));
    }
    Ok(entries)
}

/// The error for a key more than [`GRANTS_PER_KEY`] `grants` cover.
fn crowded(
    policy: &Policy,
    tags: &[u32],
    service_ids: &[u32],
    slots: &[Slots],
    (source, service, slot): (u32, u32, u32),
    grants: &[u32],
) -> CompileError {
    let from = match source {
        identity::ANY => "*".to_owned(),
        tag => {
            let identity = tags
                .iter()
                .position(|&t| t == tag)
                .expect("a tag of the policy");
            policy.identities[identity].id.to_string()
        }
    };
    let service = service_ids
        .iter()
        .position(|&id| id == service)
        .expect("an id of the policy");
    CompileError::CrowdedSlot {
        from,
        service: policy.services[service].name.clone(),
        ports: slots[service].ports(slot).to_string(),
        grants: grants.iter().map(|&grant| grant as usize + 1).collect(),
    }
}

fn limits(grant: &Grant) -> GrantLimits {
    GrantLimits {
        expires: grant.expires.map(SystemTime::from),
        rate: grant.rate.map(|rate| datapath::Rate {
            count: rate.count.get(),
            period: match rate.per {
                Per::Second => Duration::from_secs(1),
                Per::Minute => Duration::from_secs(60),
            },
        }),
    }
}

fn check_capacities(entries: &PolicyEntries, capacities: &Capacities) -> Result<(), CompileError> {
    let hosts = entries
        .identities
        .iter()
        .filter(|(p, _)| p.is_host())
        .count();
    let needs = [
        (
            maps::IDENTITY_HOSTS,
            "one per identity address that is a single host",
            hosts,
            capacities.identity_hosts,
        ),
        (
            maps::IDENTITY_PREFIXES,
            "one per identity prefix wider than a host",
            entries.identities.len() - hosts,
            capacities.identity_prefixes,
        ),
        (
            maps::DESTINATIONS,
            "one per service prefix",
            entries.destinations.len(),
            capacities.destinations,
        ),
        (
            maps::SERVICE_PORTS,
            "one per aligned block of ports in each destination class",
            entries.service_ports.len(),
            capacities.service_ports,
        ),
        (
            maps::GRANTS,
            "one per source, service and port slot that grants cover",
            entries.grants.len(),
            capacities.grants,
        ),
        (
            maps::GRANT_INFO,
            "one per grant",
            entries.grant_limits.len(),
            capacities.grant_info,
        ),
    ];
    match needs
        .into_iter()
        .find(|&(.., needed, capacity)| needed > capacity as usize)
    {
        Some((map, per, needed, capacity)) => Err(CompileError::OverCapacity {
            map,
            per,
            needed,
            capacity,
        }),
        None => Ok(()),
    }
}
