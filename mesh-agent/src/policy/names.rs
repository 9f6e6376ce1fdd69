//! Label keys and values, and service names: short tokens modelled on
//! Kubernetes labels.

const MAX_NAME_LEN: usize = 63;
const MAX_PREFIX_LEN: usize = 253;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum NameError {
    #[error("empty; expected 1 to {MAX_NAME_LEN} characters")]
    Empty,
    #[error("{0} characters long; expected at most {MAX_NAME_LEN}")]
    TooLong(usize),
    #[error("`{0}` is not allowed; expected letters, digits, `.`, `-` and `_`")]
    Char(char),
    #[error("it must begin and end with a letter or digit")]
    Edge,
    #[error(
        "the prefix before `/` must be a DNS name: lowercase letters, digits, `.` and `-`, \
         at most {MAX_PREFIX_LEN} characters"
    )]
    Prefix,
}

/// A label value or service name: 1 to 63 letters, digits, `.`, `-` and `_`,
/// beginning and ending with a letter or digit.
pub(crate) fn check_name(name: &str) -> Result<(), NameError> {
    let len = name.chars().count();
    if len == 0 {
        return Err(NameError::Empty);
    }
    if len > MAX_NAME_LEN {
        return Err(NameError::TooLong(len));
    }
    if let Some(c) = name
        .chars()
        .find(|&c| !(c.is_ascii_alphanumeric() || "._-".contains(c)))
    {
        return Err(NameError::Char(c));
    }
    let alphanumeric = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    if !alphanumeric(name.chars().next()) || !alphanumeric(name.chars().last()) {
        return Err(NameError::Edge);
    }
    Ok(())
}

/// A label key: a name, optionally after a DNS-name prefix and `/`, as in
/// `app.kubernetes.io/name`.
pub(crate) fn check_key(key: &str) -> Result<(), NameError> {
    let Some((prefix, name)) = key.split_once('/') else {
        return check_name(key);
    };
    let dns_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '.' || c == '-';
    if prefix.is_empty() || prefix.len() > MAX_PREFIX_LEN || !prefix.chars().all(dns_char) {
        return Err(NameError::Prefix);
    }
    check_name(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for name in ["a", "finance", "billing-api", "v1.2_x", &"a".repeat(63)] {
            assert_eq!(check_name(name), Ok(()), "{name}");
        }
        assert_eq!(check_name(""), Err(NameError::Empty));
        assert_eq!(check_name(&"a".repeat(64)), Err(NameError::TooLong(64)));
        assert_eq!(check_name("a b"), Err(NameError::Char(' ')));
        assert_eq!(check_name("a=b"), Err(NameError::Char('=')));
        assert_eq!(check_name("-a"), Err(NameError::Edge));
        assert_eq!(check_name("a."), Err(NameError::Edge));
    }

    #[test]
    fn keys() {
        assert_eq!(check_key("team"), Ok(()));
        assert_eq!(check_key("app.kubernetes.io/name"), Ok(()));
        assert_eq!(check_key("/name"), Err(NameError::Prefix));
        assert_eq!(check_key("Example.com/name"), Err(NameError::Prefix));
        assert_eq!(check_key("a/b/c"), Err(NameError::Char('/')));
        assert_eq!(check_key("example.com/"), Err(NameError::Empty));
    }
}
