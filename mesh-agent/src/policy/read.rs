//! Reading the TOML document into drafts: every key, value type and value is
//! checked, each problem reported at its place. References between parts are
//! left to `resolve`.

use std::{collections::BTreeMap, ops::Range};

use ipnet::IpNet;
use time::{OffsetDateTime, UtcOffset, format_description::well_known::Rfc3339};
use toml::{
    Spanned,
    de::{DeTable, DeValue},
};

use super::{
    address::parse_prefix,
    error::{Diagnostics, Keys, Kind, Problem},
    model::Selector,
    names::{check_key, check_name},
    ports::PortSpec,
    rate::Rate,
    spiffe::{SpiffeId, TrustDomain},
};

const TOP_KEYS: &[&str] = &["version", "trust_domain", "identity", "service", "grant"];
const IDENTITY_KEYS: &[&str] = &["id", "addresses", "labels"];
const SERVICE_KEYS: &[&str] = &["name", "addresses", "ports"];
const GRANT_KEYS: &[&str] = &["from", "to", "ports", "expires", "rate"];

/// A policy as written. Parts with problems are missing or partial, their
/// problems reported.
pub(super) struct Draft {
    pub trust_domain: Option<TrustDomain>,
    pub identities: Vec<DraftIdentity>,
    pub services: Vec<DraftService>,
    pub grants: Vec<DraftGrant>,
}

pub(super) struct DraftIdentity {
    pub id: Option<Spanned<SpiffeId>>,
    pub addresses: Vec<Spanned<IpNet>>,
    pub labels: BTreeMap<String, String>,
}

pub(super) struct DraftService {
    pub name: Option<Spanned<String>>,
    pub addresses: Vec<Spanned<IpNet>>,
    pub ports: List<PortSpec>,
}

pub(super) struct DraftGrant {
    pub from: List<Selector>,
    pub to: List<String>,
    pub ports: Option<List<PortSpec>>,
    pub expires: Option<OffsetDateTime>,
    pub rate: Option<Rate>,
}

/// The entries of an array of strings that parsed.
pub(super) struct List<T> {
    /// Of the whole array.
    pub span: Range<usize>,
    pub items: Vec<Spanned<T>>,
    /// Whether the array is there, each entry parsed, and it is not empty
    /// if it must not be.
    pub valid: bool,
}

/// Parses `text` and reads it, or reports its syntax errors (the document
/// would be too unreliable to check further).
pub(super) fn read(text: &str, diag: &mut Diagnostics) -> Option<Draft> {
    let (document, syntax_errors) = DeTable::parse_recoverable(text);
    if !syntax_errors.is_empty() {
        for error in syntax_errors {
            let problem = Problem::Syntax(error.message().to_owned());
            diag.report(error.span().unwrap_or_default(), problem);
        }
        return None;
    }
    let top = Table::new(
        document.get_ref(),
        document.span(),
        "at the top level",
        TOP_KEYS,
        diag,
    );
    if let Some(version) = top.required("version", Kind::Integer, diag) {
        check_version(version, diag);
    }
    let trust_domain = top
        .required_string("trust_domain", diag, trust_domain)
        .map(Spanned::into_inner);
    let identities = top.tables("identity", "in [[identity]]", IDENTITY_KEYS, diag);
    let services = top.tables("service", "in [[service]]", SERVICE_KEYS, diag);
    let grants = top.tables("grant", "in [[grant]]", GRANT_KEYS, diag);
    Some(Draft {
        trust_domain,
        identities: identities.iter().map(|t| identity(t, diag)).collect(),
        services: services.iter().map(|t| service(t, diag)).collect(),
        grants: grants.iter().map(|t| grant(t, diag)).collect(),
    })
}

fn identity(table: &Table<'_, '_>, diag: &mut Diagnostics) -> DraftIdentity {
    DraftIdentity {
        id: table.required_string("id", diag, spiffe_id),
        addresses: table
            .optional("addresses")
            .map(|value| strings(value, "addresses", diag, address).items)
            .unwrap_or_default(),
        labels: table
            .optional("labels")
            .map(|value| labels(value, diag))
            .unwrap_or_default(),
    }
}

fn service(table: &Table<'_, '_>, diag: &mut Diagnostics) -> DraftService {
    DraftService {
        name: table.required_string("name", diag, service_name),
        addresses: table
            .required_list("addresses", "address", diag, address)
            .items,
        ports: table.required_list("ports", "port spec", diag, port_spec),
    }
}

fn grant(table: &Table<'_, '_>, diag: &mut Diagnostics) -> DraftGrant {
    DraftGrant {
        from: table.required_list("from", "source", diag, selector),
        to: table.required_list("to", "service", diag, |name| Ok(name.to_owned())),
        ports: table
            .optional("ports")
            .map(|value| strings(value, "ports", diag, port_spec)),
        expires: table
            .optional("expires")
            .and_then(|value| expires(value, diag)),
        rate: table
            .optional("rate")
            .and_then(|value| string(value, "`rate`", diag, rate))
            .map(Spanned::into_inner),
    }
}

/// A table whose unknown keys have been reported.
struct Table<'a, 'i> {
    entries: &'a DeTable<'i>,
    span: Range<usize>,
    /// Where it is, for messages: `in [[grant]]`.
    place: &'static str,
}

impl<'a, 'i> Table<'a, 'i> {
    fn new(
        entries: &'a DeTable<'i>,
        span: Range<usize>,
        place: &'static str,
        known: &'static [&'static str],
        diag: &mut Diagnostics,
    ) -> Self {
        for key in entries.keys() {
            if !known.contains(&&**key.get_ref()) {
                let problem = Problem::UnknownKey {
                    key: key.get_ref().to_string(),
                    place,
                    expected: Keys(known),
                };
                diag.report(key.span(), problem);
            }
        }
        Self {
            entries,
            span,
            place,
        }
    }

    fn optional(&self, key: &str) -> Option<&'a Spanned<DeValue<'i>>> {
        self.entries.get(key)
    }

    fn required(
        &self,
        key: &'static str,
        expected: Kind,
        diag: &mut Diagnostics,
    ) -> Option<&'a Spanned<DeValue<'i>>> {
        let value = self.optional(key);
        if value.is_none() {
            let place = self.place;
            diag.report(
                self.span.clone(),
                Problem::MissingKey {
                    key,
                    place,
                    expected,
                },
            );
        }
        value
    }

    /// The string value of `key`, parsed by `parse`.
    fn required_string<T>(
        &self,
        key: &'static str,
        diag: &mut Diagnostics,
        parse: impl FnOnce(&str) -> Result<T, Problem>,
    ) -> Option<Spanned<T>> {
        self.required(key, Kind::String, diag)
            .and_then(|value| string(value, &format!("`{key}`"), diag, parse))
    }

    /// The array of strings under `key`, each parsed by `parse`; it must
    /// have at least one `item`.
    fn required_list<T>(
        &self,
        key: &'static str,
        item: &'static str,
        diag: &mut Diagnostics,
        parse: impl FnMut(&str) -> Result<T, Problem>,
    ) -> List<T> {
        let Some(value) = self.required(key, Kind::Strings, diag) else {
            return List::default();
        };
        let mut list = strings(value, key, diag, parse);
        if list.valid && list.items.is_empty() {
            diag.report(list.span.clone(), Problem::Empty { key, item });
            list.valid = false;
        }
        list
    }

    /// The tables of an array of tables, such as every `[[grant]]`.
    fn tables(
        &self,
        key: &'static str,
        place: &'static str,
        known: &'static [&'static str],
        diag: &mut Diagnostics,
    ) -> Vec<Table<'a, 'i>> {
        let Some(value) = self.optional(key) else {
            return Vec::new();
        };
        let DeValue::Array(array) = value.get_ref() else {
            report_wrong_type(value, &format!("`{key}`"), Kind::Tables(key), diag);
            return Vec::new();
        };
        let mut tables = Vec::new();
        for entry in array.iter() {
            match entry.get_ref() {
                DeValue::Table(table) => {
                    tables.push(Table::new(table, entry.span(), place, known, diag));
                }
                _ => report_wrong_type(entry, &format!("`{key}`"), Kind::Tables(key), diag),
            }
        }
        tables
    }
}

/// A list that is not there, or is not an array.
impl<T> Default for List<T> {
    fn default() -> Self {
        Self {
            span: 0..0,
            items: Vec::new(),
            valid: false,
        }
    }
}

fn report_wrong_type(
    value: &Spanned<DeValue<'_>>,
    what: &str,
    expected: Kind,
    diag: &mut Diagnostics,
) {
    let problem = Problem::WrongType {
        what: what.to_owned(),
        expected,
        found: value.get_ref().type_str(),
    };
    diag.report(value.span(), problem);
}

/// `value`, which should be a string, parsed by `parse`. `what` names it in
/// messages.
fn string<T>(
    value: &Spanned<DeValue<'_>>,
    what: &str,
    diag: &mut Diagnostics,
    parse: impl FnOnce(&str) -> Result<T, Problem>,
) -> Option<Spanned<T>> {
    let DeValue::String(text) = value.get_ref() else {
        report_wrong_type(value, what, Kind::String, diag);
        return None;
    };
    parse(text)
        .map(|parsed| Spanned::new(value.span(), parsed))
        .map_err(|problem| diag.report(value.span(), problem))
        .ok()
}

/// `value`, which should be an array of strings, each parsed by `parse`.
fn strings<T>(
    value: &Spanned<DeValue<'_>>,
    key: &str,
    diag: &mut Diagnostics,
    mut parse: impl FnMut(&str) -> Result<T, Problem>,
) -> List<T> {
    let DeValue::Array(array) = value.get_ref() else {
        report_wrong_type(value, &format!("`{key}`"), Kind::Strings, diag);
        return List::default();
    };
    let what = format!("each entry of `{key}`");
    let items: Vec<_> = array
        .iter()
        .filter_map(|entry| string(entry, &what, diag, &mut parse))
        .collect();
    List {
        span: value.span(),
        valid: items.len() == array.len(),
        items,
    }
}

fn check_version(value: &Spanned<DeValue<'_>>, diag: &mut Diagnostics) {
    match value.get_ref() {
        DeValue::Integer(int) if i64::from_str_radix(int.as_str(), int.radix()) == Ok(1) => {}
        DeValue::Integer(int) => diag.report(value.span(), Problem::Version(int.to_string())),
        _ => report_wrong_type(value, "`version`", Kind::Integer, diag),
    }
}

fn labels(value: &Spanned<DeValue<'_>>, diag: &mut Diagnostics) -> BTreeMap<String, String> {
    let DeValue::Table(entries) = value.get_ref() else {
        report_wrong_type(value, "`labels`", Kind::StringTable, diag);
        return BTreeMap::new();
    };
    let mut labels = BTreeMap::new();
    for (key, value) in entries.iter() {
        let key_is_valid = label_key(key.get_ref())
            .map_err(|problem| diag.report(key.span(), problem))
            .is_ok();
        let value = string(value, &format!("label `{key}`"), diag, |text| {
            label_value(key.get_ref(), text).map(|()| text.to_owned())
        });
        if key_is_valid && let Some(value) = value {
            labels.insert(key.get_ref().to_string(), value.into_inner());
        }
    }
    labels
}

/// The `expires` time, in UTC, from a TOML offset date-time or a string.
fn expires(value: &Spanned<DeValue<'_>>, diag: &mut Diagnostics) -> Option<OffsetDateTime> {
    let text = match value.get_ref() {
        // Displays as RFC 3339, without an offset if it has none.
        DeValue::Datetime(datetime) => datetime.to_string(),
        DeValue::String(text) => text.to_string(),
        _ => {
            report_wrong_type(value, "`expires`", Kind::Datetime, diag);
            return None;
        }
    };
    let utc = OffsetDateTime::parse(&text, &Rfc3339)
        .ok()
        .and_then(|time| time.checked_to_offset(UtcOffset::UTC))
        // So that it can be written in RFC 3339 in UTC.
        .filter(|time| (0..=9999).contains(&time.year()));
    if utc.is_none() {
        diag.report(value.span(), Problem::Expires(text));
    }
    utc
}

fn trust_domain(text: &str) -> Result<TrustDomain, Problem> {
    text.parse().map_err(|error| Problem::TrustDomain {
        value: text.to_owned(),
        error,
    })
}

fn spiffe_id(text: &str) -> Result<SpiffeId, Problem> {
    text.parse().map_err(|error| Problem::SpiffeId {
        value: text.to_owned(),
        error,
    })
}

fn service_name(text: &str) -> Result<String, Problem> {
    check_name(text)
        .map(|()| text.to_owned())
        .map_err(|error| Problem::ServiceName {
            name: text.to_owned(),
            error,
        })
}

fn address(text: &str) -> Result<IpNet, Problem> {
    parse_prefix(text).map_err(|error| Problem::Address {
        value: text.to_owned(),
        error,
    })
}

fn port_spec(text: &str) -> Result<PortSpec, Problem> {
    text.parse().map_err(|error| Problem::PortSpec {
        value: text.to_owned(),
        error,
    })
}

fn rate(text: &str) -> Result<Rate, Problem> {
    text.parse().map_err(|error| Problem::Rate {
        value: text.to_owned(),
        error,
    })
}

/// A `from` entry: `*`, a SPIFFE ID or a label selector `key=value`.
fn selector(text: &str) -> Result<Selector, Problem> {
    if text == "*" {
        return Ok(Selector::Any);
    }
    if text.starts_with("spiffe://") {
        return spiffe_id(text).map(Selector::Id);
    }
    let (key, value) = text
        .split_once('=')
        .ok_or_else(|| Problem::Source(text.to_owned()))?;
    label_key(key)?;
    label_value(key, value)?;
    Ok(Selector::Label {
        key: key.to_owned(),
        value: value.to_owned(),
    })
}

fn label_key(key: &str) -> Result<(), Problem> {
    check_key(key).map_err(|error| Problem::LabelKey {
        key: key.to_owned(),
        error,
    })
}

fn label_value(key: &str, value: &str) -> Result<(), Problem> {
    check_name(value).map_err(|error| Problem::LabelValue {
        key: key.to_owned(),
        value: value.to_owned(),
        error,
    })
}
