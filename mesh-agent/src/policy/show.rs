//! A readable view of a policy, as text or JSON, with every reference
//! resolved to names.

use std::{collections::BTreeMap, fmt};

use serde::Serialize;
use time::format_description::well_known::Rfc3339;

use super::{
    model::{Grant, Identity, Policy, Service, Sources},
    ports::PortSet,
};

/// What `mesh-agent policy show` prints: [`fmt::Display`] for people,
/// [`Serialize`] for programs.
#[derive(Debug, Serialize)]
pub struct PolicyView {
    trust_domain: String,
    identities: Vec<IdentityView>,
    services: Vec<ServiceView>,
    grants: Vec<GrantView>,
}

#[derive(Debug, Serialize)]
struct IdentityView {
    id: String,
    addresses: Vec<String>,
    labels: BTreeMap<String, String>,
}

#[derive(Debug, Serialize)]
struct ServiceView {
    name: String,
    addresses: Vec<String>,
    ports: Vec<String>,
}

#[derive(Debug, Serialize)]
struct GrantView {
    from: Vec<String>,
    sources: SourcesView,
    to: Vec<TargetView>,
    expires: Option<String>,
    rate: Option<String>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "lowercase")]
enum SourcesView {
    Any,
    Identities(Vec<String>),
}

#[derive(Debug, Serialize)]
struct TargetView {
    service: String,
    ports: Vec<String>,
}

impl Policy {
    pub fn view(&self) -> PolicyView {
        PolicyView {
            trust_domain: self.trust_domain.to_string(),
            identities: self.identities.iter().map(identity).collect(),
            services: self.services.iter().map(service).collect(),
            grants: self.grants.iter().map(|g| grant(self, g)).collect(),
        }
    }
}

fn identity(identity: &Identity) -> IdentityView {
    IdentityView {
        id: identity.id.to_string(),
        addresses: strings(&identity.addresses),
        labels: identity.labels.clone(),
    }
}

fn service(service: &Service) -> ServiceView {
    ServiceView {
        name: service.name.clone(),
        addresses: strings(&service.addresses),
        ports: specs(&service.ports),
    }
}

fn grant(policy: &Policy, grant: &Grant) -> GrantView {
    let sources = match &grant.sources {
        Sources::Any => SourcesView::Any,
        Sources::Identities(indices) => SourcesView::Identities(
            indices
                .iter()
                .map(|&index| policy.identities[index].id.to_string())
                .collect(),
        ),
    };
    let to = grant
        .targets
        .iter()
        .map(|target| TargetView {
            service: policy.services[target.service].name.clone(),
            ports: specs(&target.ports),
        })
        .collect();
    GrantView {
        from: strings(&grant.from),
        sources,
        to,
        expires: grant.expires.map(|time| {
            time.format(&Rfc3339)
                .expect("`Grant::expires` is a UTC time RFC 3339 can express")
        }),
        rate: grant.rate.map(|rate| rate.to_string()),
    }
}

fn strings<T: ToString>(items: &[T]) -> Vec<String> {
    items.iter().map(T::to_string).collect()
}

fn specs(ports: &PortSet) -> Vec<String> {
    ports.specs().map(|spec| spec.to_string()).collect()
}

impl fmt::Display for PolicyView {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "trust domain: {}", self.trust_domain)?;
        for identity in &self.identities {
            writeln!(f, "\nidentity {}", identity.id)?;
            if identity.addresses.is_empty() {
                writeln!(f, "  addresses: none, bound at run time")?;
            } else {
                writeln!(f, "  addresses: {}", identity.addresses.join(", "))?;
            }
            if !identity.labels.is_empty() {
                let labels: Vec<_> = identity
                    .labels
                    .iter()
                    .map(|(key, value)| format!("{key}={value}"))
                    .collect();
                writeln!(f, "  labels: {}", labels.join(", "))?;
            }
        }
        for service in &self.services {
            writeln!(f, "\nservice {}", service.name)?;
            writeln!(f, "  addresses: {}", service.addresses.join(", "))?;
            writeln!(f, "  ports: {}", service.ports.join(", "))?;
        }
        for (number, grant) in (1..).zip(&self.grants) {
            writeln!(f, "\ngrant {number}")?;
            writeln!(f, "  from: {}", grant.from.join(", "))?;
            match &grant.sources {
                SourcesView::Any => writeln!(f, "  sources: any, known or not")?,
                SourcesView::Identities(ids) => writeln!(f, "  sources: {}", ids.join(", "))?,
            }
            for target in &grant.to {
                writeln!(f, "  to {}: {}", target.service, target.ports.join(", "))?;
            }
            let expires = grant.expires.as_deref().unwrap_or("never");
            writeln!(f, "  expires: {expires}")?;
            match &grant.rate {
                Some(rate) => writeln!(f, "  rate: {rate} new flows per source identity")?,
                None => writeln!(f, "  rate: unlimited")?,
            }
        }
        Ok(())
    }
}
