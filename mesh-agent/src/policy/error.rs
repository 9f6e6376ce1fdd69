//! What can be wrong with a policy file, and where.

use std::{fmt, io, ops::Range, path::PathBuf};

use ipnet::IpNet;

use super::{
    address::AddressError,
    names::NameError,
    ports::{PortSpec, PortSpecError},
    rate::RateError,
    spiffe::{SpiffeId, SpiffeIdError, TrustDomain, TrustDomainError},
};

/// Why [`super::load`] failed.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{}: cannot read", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Invalid(#[from] PolicyErrors),
}

/// Every problem found in one policy file, in the order they appear in it.
/// Never empty. Displays one problem per line, `FILE:LINE:COLUMN: message`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyErrors {
    file: String,
    errors: Vec<PolicyError>,
}

impl PolicyErrors {
    pub fn iter(&self) -> impl Iterator<Item = &PolicyError> {
        self.errors.iter()
    }
}

impl fmt::Display for PolicyErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, error) in self.errors.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{}:{error}", self.file)?;
        }
        Ok(())
    }
}

impl std::error::Error for PolicyErrors {}

/// One problem. Displays as `LINE:COLUMN: message`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyError {
    line: usize,
    column: usize,
    message: String,
}

impl PolicyError {
    /// 1-based.
    pub fn line(&self) -> usize {
        self.line
    }

    /// 1-based, in characters.
    pub fn column(&self) -> usize {
        self.column
    }

    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: {}", self.line, self.column, self.message)
    }
}

/// Collects the problems found in one text, placing each by its byte span.
pub(super) struct Diagnostics<'t> {
    text: &'t str,
    /// Byte offset of the start of every line, so that placing a span is a
    /// binary search rather than a scan of the text before it.
    line_starts: Vec<usize>,
    errors: Vec<PolicyError>,
}

impl<'t> Diagnostics<'t> {
    pub fn new(text: &'t str) -> Self {
        let line_starts = std::iter::once(0)
            .chain(text.match_indices('\n').map(|(newline, _)| newline + 1))
            .collect();
        Self {
            text,
            line_starts,
            errors: Vec::new(),
        }
    }

    pub fn report(&mut self, span: Range<usize>, problem: Problem) {
        let (line, column) = self.position(span.start);
        self.errors.push(PolicyError {
            line,
            column,
            message: problem.to_string(),
        });
    }

    /// The line `span` starts on, for messages that point elsewhere.
    pub fn line(&self, span: Range<usize>) -> usize {
        self.position(span.start).0
    }

    /// The errors, if there are any.
    pub fn finish(self, file: &str) -> Result<(), PolicyErrors> {
        if self.errors.is_empty() {
            Ok(())
        } else {
            Err(self.into_errors(file))
        }
    }

    /// The errors, sorted by place.
    pub fn into_errors(mut self, file: &str) -> PolicyErrors {
        // Stable: problems at one place keep the order they were found in.
        self.errors.sort_by_key(|error| (error.line, error.column));
        PolicyErrors {
            file: file.to_owned(),
            errors: self.errors,
        }
    }

    fn position(&self, offset: usize) -> (usize, usize) {
        let offset = self.text.floor_char_boundary(offset);
        // The last line starting at or before `offset`.
        let line = self.line_starts.partition_point(|&start| start <= offset);
        let line_start = self.line_starts[line - 1];
        (line, self.text[line_start..offset].chars().count() + 1)
    }
}

/// What a TOML value should have been.
#[derive(Debug, Clone, Copy)]
pub(super) enum Kind {
    Integer,
    String,
    Strings,
    StringTable,
    Datetime,
    /// An array of tables under the given key.
    Tables(&'static str),
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Integer => f.write_str("an integer"),
            Self::String => f.write_str("a string"),
            Self::Strings => f.write_str("an array of strings"),
            Self::StringTable => f.write_str("a table of strings"),
            Self::Datetime => f.write_str(
                "a date-time with a UTC offset (a TOML offset date-time or an RFC 3339 string)",
            ),
            Self::Tables(key) => write!(f, "an array of tables, written `[[{key}]]`"),
        }
    }
}

/// A list of keys, displayed as `` `a`, `b`, `c` ``.
#[derive(Debug)]
pub(super) struct Keys(pub &'static [&'static str]);

impl fmt::Display for Keys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, key) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "`{key}`")?;
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub(super) enum Problem {
    #[error("the file is not UTF-8; expected UTF-8 text")]
    NotUtf8,
    #[error("invalid TOML: {0}")]
    Syntax(String),
    #[error("unknown key `{key}` {place}; expected one of {expected}")]
    UnknownKey {
        key: String,
        place: &'static str,
        expected: Keys,
    },
    #[error("missing key `{key}` {place}; expected {expected}")]
    MissingKey {
        key: &'static str,
        place: &'static str,
        expected: Kind,
    },
    #[error("{what} must be {expected}, found {found}")]
    WrongType {
        what: String,
        expected: Kind,
        found: &'static str,
    },
    #[error("unsupported version {0}; expected 1")]
    Version(String),
    #[error("invalid trust_domain `{value}`: {error}")]
    TrustDomain {
        value: String,
        error: TrustDomainError,
    },
    #[error("invalid SPIFFE ID `{value}`: {error}")]
    SpiffeId { value: String, error: SpiffeIdError },
    #[error(
        "identity `{id}` is outside the trust domain `{trust_domain}`; \
         expected an ID starting with `spiffe://{trust_domain}/`"
    )]
    ForeignIdentity {
        id: SpiffeId,
        trust_domain: TrustDomain,
    },
    #[error("duplicate identity `{id}`; it is first declared on line {first}")]
    DuplicateIdentity { id: SpiffeId, first: usize },
    #[error("invalid service name `{name}`: {error}")]
    ServiceName { name: String, error: NameError },
    #[error("duplicate service `{name}`; it is first declared on line {first}")]
    DuplicateService { name: String, first: usize },
    #[error("invalid address `{value}`: {error}")]
    Address { value: String, error: AddressError },
    #[error(
        "address {prefix} is already bound to identity `{owner}` on line {line}; \
         expected each prefix to belong to one identity"
    )]
    SharedAddress {
        prefix: IpNet,
        owner: SpiffeId,
        line: usize,
    },
    #[error("invalid port spec `{value}`: {error}")]
    PortSpec { value: String, error: PortSpecError },
    #[error(
        "service `{service}` claims {ports} on {prefix}, as does service `{other}` on line {line}; \
         expected each address, protocol and port to belong to one service"
    )]
    OverlappingClaim {
        service: String,
        /// The ports both claim, as specs.
        ports: String,
        prefix: IpNet,
        other: String,
        line: usize,
    },
    #[error("invalid label key `{key}`: {error}")]
    LabelKey { key: String, error: NameError },
    #[error("invalid value `{value}` for label `{key}`: {error}")]
    LabelValue {
        key: String,
        value: String,
        error: NameError,
    },
    #[error("invalid source `{0}`; expected a SPIFFE ID, a label selector `key=value`, or `*`")]
    Source(String),
    #[error("`{0}` is not a declared identity")]
    UndeclaredIdentity(SpiffeId),
    #[error("label selector `{0}` selects no identity; expected a label some identity carries")]
    SelectsNothing(String),
    #[error("`{0}` is not a declared service")]
    UndeclaredService(String),
    #[error("`{key}` is empty; expected at least one {item}")]
    Empty {
        key: &'static str,
        item: &'static str,
    },
    #[error("grant's ports leave nothing to allow on service `{service}`, which offers {offered}")]
    NothingToAllow {
        service: String,
        /// The service's ports, as specs.
        offered: String,
    },
    #[error("port spec `{0}` is not offered by any service in `to`")]
    NotOffered(PortSpec),
    #[error(
        "invalid expires `{0}`: expected an RFC 3339 date-time with a UTC offset, \
         like `2026-12-01T00:00:00Z`"
    )]
    Expires(String),
    #[error("invalid rate `{value}`: {error}")]
    Rate { value: String, error: RateError },
}
