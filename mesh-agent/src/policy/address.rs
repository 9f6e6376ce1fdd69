//! Addresses of identities and services: IPv4 and IPv6 prefixes.

use std::net::IpAddr;

use ipnet::{IpNet, Ipv4Net};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum AddressError {
    #[error(
        "expected an IPv4 or IPv6 address, optionally with a prefix length, \
         like `10.20.0.0/24` or `fd00::5`"
    )]
    Syntax,
    #[error("host bits are set; expected `{0}`")]
    HostBits(IpNet),
    #[error("an IPv4-mapped IPv6 address; expected the IPv4 form `{0}`")]
    Ipv4Mapped(Ipv4Net),
}

/// A prefix in CIDR notation; a bare address is the prefix holding only
/// itself (`/32` or `/128`).
pub(crate) fn parse_prefix(text: &str) -> Result<IpNet, AddressError> {
    let prefix = match text.parse::<IpNet>() {
        Ok(prefix) => prefix,
        Err(_) => text
            .parse::<IpAddr>()
            .map(IpNet::from)
            .map_err(|_| AddressError::Syntax)?,
    };
    // A prefix with host bits set is most likely a typo for another prefix.
    if prefix.trunc() != prefix {
        return Err(AddressError::HostBits(prefix.trunc()));
    }
    // The kernel keeps IPv4 addresses in this form: one written so would
    // alias an IPv4 one.
    if let IpNet::V6(v6) = prefix
        && let Some(v4) = v6.addr().to_ipv4_mapped()
        && let Some(len) = v6.prefix_len().checked_sub(96)
    {
        return Err(AddressError::Ipv4Mapped(Ipv4Net::new_assert(v4, len)));
    }
    Ok(prefix)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes() {
        let prefix = |text: &str| parse_prefix(text).map(|p| p.to_string());
        assert_eq!(prefix("10.20.0.0/16"), Ok("10.20.0.0/16".into()));
        assert_eq!(prefix("10.20.0.5"), Ok("10.20.0.5/32".into()));
        assert_eq!(prefix("fd00::5"), Ok("fd00::5/128".into()));
        assert_eq!(prefix("fd00::/64"), Ok("fd00::/64".into()));
        assert_eq!(prefix("0.0.0.0/0"), Ok("0.0.0.0/0".into()));
        for bad in [
            "10.20.0.256",
            "10.20.0.0/33",
            "fd00::/129",
            "",
            "host",
            "10.0.0.0/",
            "fe80::1%eth0",
        ] {
            assert_eq!(prefix(bad), Err(AddressError::Syntax), "{bad}");
        }
        assert_eq!(
            parse_prefix("10.0.0.1/24"),
            Err(AddressError::HostBits("10.0.0.0/24".parse().unwrap()))
        );
        assert_eq!(
            parse_prefix("fd00::1/64"),
            Err(AddressError::HostBits("fd00::/64".parse().unwrap()))
        );
        assert_eq!(
            parse_prefix("::ffff:10.20.0.0/112"),
            Err(AddressError::Ipv4Mapped("10.20.0.0/16".parse().unwrap()))
        );
        assert_eq!(
            parse_prefix("::ffff:10.20.0.5"),
            Err(AddressError::Ipv4Mapped("10.20.0.5/32".parse().unwrap()))
        );
    }
}
