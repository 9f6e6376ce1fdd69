//! Port specs (`443/tcp`, `8000-8099/udp`, `icmp`) and normalized sets of
//! them.

use std::{fmt, str::FromStr};

/// An inclusive range of ports, `first..=last`, never containing port 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortRange {
    first: u16,
    last: u16,
}

impl PortRange {
    pub fn new(first: u16, last: u16) -> Result<Self, PortSpecError> {
        if first == 0 || last == 0 {
            Err(PortSpecError::Zero)
        } else if first > last {
            Err(PortSpecError::Reversed { first, last })
        } else {
            Ok(Self { first, last })
        }
    }

    pub fn first(self) -> u16 {
        self.first
    }

    pub fn last(self) -> u16 {
        self.last
    }

    fn intersection(self, other: Self) -> Option<Self> {
        let first = self.first.max(other.first);
        let last = self.last.min(other.last);
        (first <= last).then_some(Self { first, last })
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

/// One entry of a `ports` list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PortSpec {
    Tcp(PortRange),
    Udp(PortRange),
    /// ICMPv4 echo request (type 8) and ICMPv6 echo request (type 128).
    IcmpEcho,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PortSpecError {
    #[error("expected `N/tcp`, `N/udp`, `N-M/tcp`, `N-M/udp` or `icmp`")]
    Syntax,
    #[error("unknown protocol `{0}`; expected `tcp` or `udp`")]
    Protocol(String),
    #[error("`{0}` is not a port number; expected 1 to 65535")]
    NotANumber(String),
    #[error("port {0} is out of range; expected 1 to 65535")]
    OutOfRange(String),
    #[error("port 0 is not allowed; expected 1 to 65535")]
    Zero,
    #[error("reversed range {first}-{last}; expected the lower port first, as in `{last}-{first}`")]
    Reversed { first: u16, last: u16 },
}

impl FromStr for PortSpec {
    type Err = PortSpecError;

    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        if spec == "icmp" {
            return Ok(Self::IcmpEcho);
        }
        let (ports, protocol) = spec.split_once('/').ok_or(PortSpecError::Syntax)?;
        let range = match ports.split_once('-') {
            Some((first, last)) => PortRange::new(port(first)?, port(last)?)?,
            None => {
                let port = port(ports)?;
                PortRange::new(port, port)?
            }
        };
        match protocol {
            "tcp" => Ok(Self::Tcp(range)),
            "udp" => Ok(Self::Udp(range)),
            _ => Err(PortSpecError::Protocol(protocol.to_owned())),
        }
    }
}

fn port(digits: &str) -> Result<u16, PortSpecError> {
    // Only plain digits: `u16::from_str` would also take a leading `+`.
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(PortSpecError::NotANumber(digits.to_owned()));
    }
    // Being all digits, it can only fail by overflowing.
    digits
        .parse()
        .map_err(|_| PortSpecError::OutOfRange(digits.to_owned()))
}

impl fmt::Display for PortSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tcp(range) => write!(f, "{range}/tcp"),
            Self::Udp(range) => write!(f, "{range}/udp"),
            Self::IcmpEcho => f.write_str("icmp"),
        }
    }
}

/// A set of ports per protocol: each list sorted, its ranges disjoint and
/// not adjacent, so equal sets compare equal however they were written.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PortSet {
    tcp: Vec<PortRange>,
    udp: Vec<PortRange>,
    icmp_echo: bool,
}

impl PortSet {
    pub fn tcp(&self) -> &[PortRange] {
        &self.tcp
    }

    pub fn udp(&self) -> &[PortRange] {
        &self.udp
    }

    /// Whether ICMP echo requests are in the set.
    pub fn icmp_echo(&self) -> bool {
        self.icmp_echo
    }

    pub fn is_empty(&self) -> bool {
        self.tcp.is_empty() && self.udp.is_empty() && !self.icmp_echo
    }

    pub fn intersection(&self, other: &Self) -> Self {
        Self {
            tcp: intersect(&self.tcp, &other.tcp),
            udp: intersect(&self.udp, &other.udp),
            icmp_echo: self.icmp_echo && other.icmp_echo,
        }
    }

    /// The set as specs, TCP first, then UDP, then ICMP.
    pub fn specs(&self) -> impl Iterator<Item = PortSpec> + '_ {
        let tcp = self.tcp.iter().copied().map(PortSpec::Tcp);
        let udp = self.udp.iter().copied().map(PortSpec::Udp);
        tcp.chain(udp)
            .chain(self.icmp_echo.then_some(PortSpec::IcmpEcho))
    }
}

impl FromIterator<PortSpec> for PortSet {
    fn from_iter<I: IntoIterator<Item = PortSpec>>(specs: I) -> Self {
        let mut set = Self::default();
        for spec in specs {
            match spec {
                PortSpec::Tcp(range) => set.tcp.push(range),
                PortSpec::Udp(range) => set.udp.push(range),
                PortSpec::IcmpEcho => set.icmp_echo = true,
            }
        }
        normalize(&mut set.tcp);
        normalize(&mut set.udp);
        set
    }
}

impl fmt::Display for PortSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, spec) in self.specs().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{spec}")?;
        }
        Ok(())
    }
}

/// Sorts `ranges` and merges those that overlap or touch.
fn normalize(ranges: &mut Vec<PortRange>) {
    ranges.sort_unstable();
    let mut merged: Vec<PortRange> = Vec::with_capacity(ranges.len());
    for range in ranges.drain(..) {
        match merged.last_mut() {
            Some(last) if u32::from(range.first) <= u32::from(last.last) + 1 => {
                last.last = last.last.max(range.last);
            }
            _ => merged.push(range),
        }
    }
    *ranges = merged;
}

/// The intersection of two normalized lists, itself normalized.
fn intersect(a: &[PortRange], b: &[PortRange]) -> Vec<PortRange> {
    let (mut i, mut j) = (0, 0);
    let mut common = Vec::new();
    while let (Some(&x), Some(&y)) = (a.get(i), b.get(j)) {
        common.extend(x.intersection(y));
        if x.last < y.last {
            i += 1;
        } else {
            j += 1;
        }
    }
    common
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(specs: &[&str]) -> PortSet {
        specs.iter().map(|spec| spec.parse().unwrap()).collect()
    }

    #[test]
    fn parses_and_displays_specs() {
        for spec in ["443/tcp", "1-65535/udp", "8000-8099/tcp", "icmp"] {
            assert_eq!(spec.parse::<PortSpec>().unwrap().to_string(), spec);
        }
        assert_eq!(
            "80-80/tcp".parse::<PortSpec>().unwrap().to_string(),
            "80/tcp"
        );
    }

    #[test]
    fn rejects_bad_specs() {
        use PortSpecError::*;
        let error = |spec: &str| spec.parse::<PortSpec>().unwrap_err();
        assert_eq!(error("443"), Syntax);
        assert_eq!(error("ICMP"), Syntax);
        assert_eq!(error("443/sctp"), Protocol("sctp".into()));
        assert_eq!(error("443/TCP"), Protocol("TCP".into()));
        assert_eq!(error("+443/tcp"), NotANumber("+443".into()));
        assert_eq!(error("/tcp"), NotANumber("".into()));
        assert_eq!(error("80-/tcp"), NotANumber("".into()));
        assert_eq!(error("1-2-3/tcp"), NotANumber("2-3".into()));
        assert_eq!(error("65536/udp"), OutOfRange("65536".into()));
        assert_eq!(
            error("99999999999999999999/udp"),
            OutOfRange("99999999999999999999".into())
        );
        assert_eq!(error("0/tcp"), Zero);
        assert_eq!(error("0-10/tcp"), Zero);
        assert_eq!(
            error("90-80/tcp"),
            Reversed {
                first: 90,
                last: 80
            }
        );
    }

    #[test]
    fn sets_are_normalized() {
        let ports = set(&[
            "90/tcp",
            "80-85/tcp",
            "86-89/tcp",
            "53/udp",
            "icmp",
            "53/udp",
        ]);
        assert_eq!(ports.to_string(), "80-90/tcp, 53/udp, icmp");
        assert_eq!(ports, set(&["icmp", "53/udp", "80-90/tcp"]));
        assert_eq!(
            set(&["65535/tcp", "1-65535/tcp"]).to_string(),
            "1-65535/tcp"
        );
    }

    #[test]
    fn intersects_per_protocol() {
        let service = set(&["443/tcp", "8000-8099/tcp", "53/udp", "icmp"]);
        let grant = set(&["1-500/tcp", "8050-9000/tcp", "53/tcp"]);
        assert_eq!(
            service.intersection(&grant).to_string(),
            "443/tcp, 8050-8099/tcp"
        );
        assert!(service.intersection(&set(&["54/udp"])).is_empty());
        assert!(!PortSet::default().icmp_echo());
        assert!(PortSet::default().is_empty());
    }
}
