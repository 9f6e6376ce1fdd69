//! Checks across the parts of a draft (uniqueness, trust domain, claims,
//! references) and the policy built from it, with grants resolved.

use std::collections::HashMap;

use ipnet::IpNet;
use toml::Spanned;

use super::{
    error::{Diagnostics, Problem},
    model::{Grant, Identity, Policy, Selector, Service, Sources, Target},
    ports::{PortSet, PortSpec},
    read::{Draft, DraftGrant, DraftIdentity, DraftService, List},
    spiffe::{SpiffeId, TrustDomain},
};

/// The policy, if the draft has a trust domain. It is valid only if no
/// problem was reported, reading or resolving.
pub(super) fn resolve(draft: Draft, diag: &mut Diagnostics) -> Option<Policy> {
    let identities = identities(draft.identities, draft.trust_domain.as_ref(), diag);
    let services = services(draft.services, diag);
    let index = Index::new(&identities, &services);
    let grants = draft
        .grants
        .into_iter()
        .map(|grant| resolve_grant(grant, &index, &services, diag))
        .collect();
    Some(Policy {
        trust_domain: draft.trust_domain?,
        identities,
        services: services
            .into_iter()
            .map(|declared| declared.service)
            .collect(),
        grants,
    })
}

/// Identities and services by what grants name them by, so that resolving
/// grants costs time in proportion to the grants, not grants × identities.
struct Index<'p> {
    by_id: HashMap<&'p SpiffeId, usize>,
    by_label: HashMap<(&'p str, &'p str), Vec<usize>>,
    services: HashMap<&'p str, usize>,
}

impl<'p> Index<'p> {
    fn new(identities: &'p [Identity], services: &'p [Declared]) -> Self {
        let mut by_label: HashMap<(&str, &str), Vec<usize>> = HashMap::new();
        for (index, identity) in identities.iter().enumerate() {
            for (key, value) in &identity.labels {
                by_label.entry((key, value)).or_default().push(index);
            }
        }
        Self {
            by_id: identities
                .iter()
                .enumerate()
                .map(|(index, identity)| (&identity.id, index))
                .collect(),
            by_label,
            services: services
                .iter()
                .enumerate()
                .map(|(index, d)| (d.service.name.as_str(), index))
                .collect(),
        }
    }
}

fn identities(
    drafts: Vec<DraftIdentity>,
    trust_domain: Option<&TrustDomain>,
    diag: &mut Diagnostics,
) -> Vec<Identity> {
    let mut first_lines: HashMap<SpiffeId, usize> = HashMap::new();
    // Each prefix bound so far, with its identity and line.
    let mut owners: HashMap<IpNet, (SpiffeId, usize)> = HashMap::new();
    let mut identities = Vec::new();
    for DraftIdentity {
        id,
        addresses,
        labels,
    } in drafts
    {
        let Some(id) = id else { continue };
        let (span, id) = (id.span(), id.into_inner());
        if let Some(trust_domain) = trust_domain
            && id.trust_domain() != trust_domain.as_str()
        {
            let trust_domain = trust_domain.clone();
            let problem = Problem::ForeignIdentity {
                id: id.clone(),
                trust_domain,
            };
            diag.report(span.clone(), problem);
        }
        if let Some(&first) = first_lines.get(&id) {
            diag.report(span, Problem::DuplicateIdentity { id, first });
            continue;
        }
        first_lines.insert(id.clone(), diag.line(span));
        let addresses = unique(addresses);
        for address in &addresses {
            let prefix = *address.get_ref();
            match owners.get(&prefix) {
                Some((owner, line)) => {
                    let (owner, line) = (owner.clone(), *line);
                    diag.report(
                        address.span(),
                        Problem::SharedAddress {
                            prefix,
                            owner,
                            line,
                        },
                    );
                }
                None => {
                    owners.insert(prefix, (id.clone(), diag.line(address.span())));
                }
            }
        }
        identities.push(Identity {
            id,
            addresses: addresses.into_iter().map(Spanned::into_inner).collect(),
            labels,
        });
    }
    identities
}

/// A service as declared.
struct Declared {
    service: Service,
    line: usize,
    /// Whether all its port specs were valid: checking grants against a part
    /// of them would report problems that are not there.
    ports_known: bool,
}

fn services(drafts: Vec<DraftService>, diag: &mut Diagnostics) -> Vec<Declared> {
    // The services claiming each prefix so far, as indices into `services`.
    let mut claims: HashMap<IpNet, Vec<usize>> = HashMap::new();
    let mut first_lines: HashMap<String, usize> = HashMap::new();
    let mut services: Vec<Declared> = Vec::new();
    for DraftService {
        name,
        addresses,
        ports,
    } in drafts
    {
        let Some(name) = name else { continue };
        let (span, name) = (name.span(), name.into_inner());
        if let Some(&first) = first_lines.get(&name) {
            diag.report(span, Problem::DuplicateService { name, first });
            continue;
        }
        let line = diag.line(span);
        first_lines.insert(name.clone(), line);
        let addresses = unique(addresses);
        let port_set: PortSet = ports.items.iter().map(|spec| *spec.get_ref()).collect();
        if ports.valid {
            for address in &addresses {
                let prefix = *address.get_ref();
                let claimants = claims.entry(prefix).or_default();
                for other in claimants.iter().map(|&other| &services[other]) {
                    let common = other.service.ports.intersection(&port_set);
                    if !common.is_empty() {
                        let problem = Problem::OverlappingClaim {
                            service: name.clone(),
                            ports: common.to_string(),
                            prefix,
                            other: other.service.name.clone(),
                            line: other.line,
                        };
                        diag.report(address.span(), problem);
                    }
                }
                claimants.push(services.len());
            }
        }
        services.push(Declared {
            service: Service {
                name,
                addresses: addresses.into_iter().map(Spanned::into_inner).collect(),
                ports: port_set,
            },
            line,
            ports_known: ports.valid,
        });
    }
    services
}

fn resolve_grant(
    draft: DraftGrant,
    index: &Index,
    services: &[Declared],
    diag: &mut Diagnostics,
) -> Grant {
    let from = unique(draft.from.items);
    let sources = sources(&from, index, diag);
    // Checking `ports` against the services takes knowing all of them.
    let mut targets_known = draft.to.valid;
    let mut targets = Vec::new();
    for name in &draft.to.items {
        match index.services.get(name.get_ref().as_str()).copied() {
            Some(index) => {
                targets_known &= services[index].ports_known;
                if !targets.contains(&index) {
                    targets.push(index);
                }
            }
            None => {
                targets_known = false;
                diag.report(
                    name.span(),
                    Problem::UndeclaredService(name.get_ref().clone()),
                );
            }
        }
    }
    let narrowing = draft.ports.as_ref().map(|list| {
        list.items
            .iter()
            .map(|spec| *spec.get_ref())
            .collect::<PortSet>()
    });
    if let (Some(list), Some(narrowing)) = (&draft.ports, &narrowing)
        && list.valid
        && targets_known
    {
        check_narrowing(list, narrowing, &targets, services, diag);
    }
    let targets = targets
        .into_iter()
        .map(|service| {
            let offered = &services[service].service.ports;
            let ports = match &narrowing {
                Some(narrowing) => offered.intersection(narrowing),
                None => offered.clone(),
            };
            Target { service, ports }
        })
        .collect();
    Grant {
        from: from.into_iter().map(Spanned::into_inner).collect(),
        sources,
        ports: narrowing,
        targets,
        expires: draft.expires,
        rate: draft.rate,
    }
}

fn sources(from: &[Spanned<Selector>], index: &Index, diag: &mut Diagnostics) -> Sources {
    let mut any = false;
    let mut selected = Vec::new();
    for selector in from {
        match selector.get_ref() {
            Selector::Any => any = true,
            Selector::Id(id) => match index.by_id.get(id) {
                Some(&identity) => selected.push(identity),
                None => diag.report(selector.span(), Problem::UndeclaredIdentity(id.clone())),
            },
            Selector::Label { key, value } => {
                let before = selected.len();
                if let Some(labelled) = index.by_label.get(&(key.as_str(), value.as_str())) {
                    selected.extend(labelled);
                }
                if selected.len() == before {
                    let problem = Problem::SelectsNothing(selector.get_ref().to_string());
                    diag.report(selector.span(), problem);
                }
            }
        }
    }
    if any {
        return Sources::Any;
    }
    selected.sort_unstable();
    selected.dedup();
    Sources::Identities(selected)
}

/// A grant's `ports` must leave something to allow on each service in `to`,
/// and each of its specs must match a port of one of them.
fn check_narrowing(
    list: &List<PortSpec>,
    narrowing: &PortSet,
    targets: &[usize],
    services: &[Declared],
    diag: &mut Diagnostics,
) {
    let mut starved = false;
    for service in targets.iter().map(|&target| &services[target].service) {
        if service.ports.intersection(narrowing).is_empty() {
            let problem = Problem::NothingToAllow {
                service: service.name.clone(),
                offered: service.ports.to_string(),
            };
            diag.report(list.span.clone(), problem);
            starved = true;
        }
    }
    // Otherwise a spec matching nothing would be reported twice.
    if starved {
        return;
    }
    for spec in &list.items {
        let spec_ports: PortSet = [*spec.get_ref()].into_iter().collect();
        let offered = |&target: &usize| {
            let ports = &services[target].service.ports;
            !ports.intersection(&spec_ports).is_empty()
        };
        if !targets.iter().any(offered) {
            diag.report(spec.span(), Problem::NotOffered(*spec.get_ref()));
        }
    }
}

/// The entries, each value once, in the order first written.
fn unique<T: PartialEq>(entries: Vec<Spanned<T>>) -> Vec<Spanned<T>> {
    let mut kept: Vec<Spanned<T>> = Vec::with_capacity(entries.len());
    for entry in entries {
        if !kept.iter().any(|k| k.get_ref() == entry.get_ref()) {
            kept.push(entry);
        }
    }
    kept
}
