//! Golden tests: each kind of mistake in a policy file, and the exact
//! `LINE:COLUMN: message` it is reported with.

use mesh_agent::policy::{self, Sources};
use time::format_description::well_known::Rfc3339;

/// The errors `text` is rejected with, as `LINE:COLUMN: message`.
fn errors(text: &str) -> Vec<String> {
    policy::parse("policy.toml", text)
        .expect_err("the policy should be rejected")
        .iter()
        .map(ToString::to_string)
        .collect()
}

#[track_caller]
fn assert_errors(text: &str, expected: &[&str]) {
    assert_eq!(errors(text), expected);
}

#[test]
fn errors_display_one_per_line_with_the_file_name() {
    let text = "version = 2\ntrust_domain = \"acme.internal\"\nextra = 1\n";
    let errors = policy::parse("dir/p.toml", text).unwrap_err();
    assert_eq!(
        errors.to_string(),
        "dir/p.toml:1:11: unsupported version 2; expected 1\n\
         dir/p.toml:3:1: unknown key `extra` at the top level; expected one of \
         `version`, `trust_domain`, `identity`, `service`, `grant`"
    );
    let first = errors.iter().next().unwrap();
    assert_eq!((first.line(), first.column()), (1, 11));
    assert_eq!(first.message(), "unsupported version 2; expected 1");
}

#[test]
fn toml_syntax() {
    assert_errors(
        r#"version = 1
version = 1
trust_domain = "acme.internal
[[grant]
"#,
        &[
            "2:1: invalid TOML: duplicate key",
            "3:30: invalid TOML: invalid basic string, expected `\"`",
            "4:9: invalid TOML: unclosed array table, expected `]`",
        ],
    );
}

#[test]
fn unknown_keys_at_every_level() {
    assert_errors(
        r#"version = 1
trust_domain = "acme.internal"
colour = "blue"

[[identity]]
id = "spiffe://acme.internal/agent/a"
adresses = ["10.0.0.1"]

[[service]]
name = "api"
addresses = ["10.20.0.5"]
ports = ["443/tcp"]
protocol = "tcp"

[[grant]]
from = ["*"]
to = ["api"]
expiry = "2026-12-01T00:00:00Z"
"#,
        &[
            "3:1: unknown key `colour` at the top level; expected one of `version`, \
             `trust_domain`, `identity`, `service`, `grant`",
            "7:1: unknown key `adresses` in [[identity]]; expected one of `id`, `addresses`, \
             `labels`",
            "13:1: unknown key `protocol` in [[service]]; expected one of `name`, `addresses`, \
             `ports`",
            "18:1: unknown key `expiry` in [[grant]]; expected one of `from`, `to`, `ports`, \
             `expires`, `rate`",
        ],
    );
}

#[test]
fn missing_keys_point_at_their_table() {
    assert_errors(
        r#"[[identity]]
labels = { team = "finance" }

[[service]]
name = "api"

[[grant]]
ports = ["443/tcp"]
"#,
        &[
            "1:1: missing key `version` at the top level; expected an integer",
            "1:1: missing key `trust_domain` at the top level; expected a string",
            "1:1: missing key `id` in [[identity]]; expected a string",
            "4:1: missing key `addresses` in [[service]]; expected an array of strings",
            "4:1: missing key `ports` in [[service]]; expected an array of strings",
            "7:1: missing key `from` in [[grant]]; expected an array of strings",
            "7:1: missing key `to` in [[grant]]; expected an array of strings",
        ],
    );
}

#[test]
fn wrong_types() {
    assert_errors(
        r#"version = "1"
trust_domain = 7

[identity]
id = "spiffe://acme.internal/agent/a"

[[service]]
name = "api"
addresses = "10.20.0.5"
ports = ["443/tcp", 80]

[[grant]]
from = ["*"]
to = ["api"]
expires = 1700000000
rate = 20
"#,
        &[
            "1:11: `version` must be an integer, found string",
            "2:16: `trust_domain` must be a string, found integer",
            "4:1: `identity` must be an array of tables, written `[[identity]]`, found table",
            "9:13: `addresses` must be an array of strings, found string",
            "10:21: each entry of `ports` must be a string, found integer",
            "15:11: `expires` must be a date-time with a UTC offset (a TOML offset date-time or \
             an RFC 3339 string), found integer",
            "16:8: `rate` must be a string, found integer",
        ],
    );
}

#[test]
fn labels_must_be_a_table_of_strings() {
    assert_errors(
        r#"version = 1
trust_domain = "acme.internal"

[[identity]]
id = "spiffe://acme.internal/agent/a"
labels = "team=finance"

[[identity]]
id = "spiffe://acme.internal/agent/b"
labels = { team = "finance", tier = 2, nested = { a = "b" } }
"#,
        &[
            "6:10: `labels` must be a table of strings, found string",
            "10:37: label `tier` must be a string, found integer",
            "10:49: label `nested` must be a string, found table",
        ],
    );
}

#[test]
fn version_other_than_1() {
    assert_errors(
        "version = 2\ntrust_domain = \"acme.internal\"\n",
        &["1:11: unsupported version 2; expected 1"],
    );
    assert_errors(
        "version = 0x10\ntrust_domain = \"acme.internal\"\n",
        &["1:11: unsupported version 0x10; expected 1"],
    );
    assert!(policy::parse("p", "version = 0x1\ntrust_domain = \"a\"\n").is_ok());
}

#[test]
fn bad_trust_domain() {
    let expected_chars = "expected lowercase letters, digits, `.`, `-` and `_`";
    assert_errors(
        "version = 1\ntrust_domain = \"Acme.internal\"\n",
        &[&format!(
            "2:16: invalid trust_domain `Acme.internal`: `A` is not allowed; {expected_chars}"
        )],
    );
    assert_errors(
        "version = 1\ntrust_domain = \"spiffe://acme.internal\"\n",
        &[&format!(
            "2:16: invalid trust_domain `spiffe://acme.internal`: `:` is not allowed; \
             {expected_chars}"
        )],
    );
    assert_errors(
        "version = 1\ntrust_domain = \"\"\n",
        &["2:16: invalid trust_domain ``: empty; expected a name like `acme.internal`"],
    );
}

#[test]
fn bad_spiffe_ids() {
    let cases = [
        (
            "acme.internal/agent/a",
            "expected it to start with `spiffe://`",
        ),
        (
            "spiffe://acme.internal",
            "no path; expected a workload path after the trust domain, like `/agent/name`",
        ),
        (
            "spiffe://acme.internal/agent/",
            "a trailing `/` is not allowed",
        ),
        (
            "spiffe://acme.internal/agent//a",
            "an empty path segment (`//`) is not allowed",
        ),
        (
            "spiffe://acme.internal/agent/../a",
            "the path segment `..` is not allowed",
        ),
        (
            "spiffe://acme.internal/agent/./a",
            "the path segment `.` is not allowed",
        ),
        (
            "spiffe://acme.internal/agent/a b",
            "` ` is not allowed in the path; expected letters, digits, `.`, `-` and `_`",
        ),
        (
            "spiffe://acme.internal/agent/a?x=1",
            "a query (`?`) is not allowed",
        ),
        (
            "spiffe://acme.internal/agent/a#x",
            "a fragment (`#`) is not allowed",
        ),
        (
            "spiffe://acme.internal:8443/agent/a",
            "a port (`:`) is not allowed",
        ),
        (
            "spiffe://bot@acme.internal/agent/a",
            "user info (`@`) is not allowed",
        ),
        (
            "spiffe://ACME.internal/agent/a",
            "bad trust domain: `A` is not allowed; expected lowercase letters, digits, `.`, `-` and `_`",
        ),
    ];
    for (id, reason) in cases {
        let text =
            format!("version = 1\ntrust_domain = \"acme.internal\"\n[[identity]]\nid = \"{id}\"\n");
        assert_eq!(
            errors(&text),
            [format!("4:6: invalid SPIFFE ID `{id}`: {reason}")],
            "{id}"
        );
    }
}

#[test]
fn identity_outside_the_trust_domain() {
    assert_errors(
        r#"version = 1
trust_domain = "acme.internal"

[[identity]]
id = "spiffe://acme.example/agent/a"
"#,
        &[
            "5:6: identity `spiffe://acme.example/agent/a` is outside the trust domain \
           `acme.internal`; expected an ID starting with `spiffe://acme.internal/`",
        ],
    );
}

#[test]
fn duplicate_identity() {
    assert_errors(
        r#"version = 1
trust_domain = "acme.internal"

[[identity]]
id = "spiffe://acme.internal/agent/a"

[[identity]]
id = "spiffe://acme.internal/agent/a"
"#,
        &[
            "8:6: duplicate identity `spiffe://acme.internal/agent/a`; it is first declared on \
           line 5",
        ],
    );
}

#[test]
fn duplicate_service() {
    assert_errors(
        r#"version = 1
trust_domain = "acme.internal"

[[service]]
name = "api"
addresses = ["10.20.0.5"]
ports = ["443/tcp"]

[[service]]
name = "api"
addresses = ["10.20.0.6"]
ports = ["443/tcp"]
"#,
        &["10:8: duplicate service `api`; it is first declared on line 5"],
    );
}

#[test]
fn bad_service_name() {
    assert_errors(
        r#"version = 1
trust_domain = "acme.internal"

[[service]]
name = "billing api"
addresses = ["10.20.0.5"]
ports = ["443/tcp"]
"#,
        &[
            "5:8: invalid service name `billing api`: ` ` is not allowed; expected letters, \
           digits, `.`, `-` and `_`",
        ],
    );
}

#[test]
fn bad_addresses() {
    let syntax = "expected an IPv4 or IPv6 address, optionally with a prefix length, like \
                  `10.20.0.0/24` or `fd00::5`";
    assert_errors(
        r#"version = 1
trust_domain = "acme.internal"

[[identity]]
id = "spiffe://acme.internal/agent/a"
addresses = ["100.96.1.300", "100.96.1.0/33", "fd00::/129", "db.acme.internal"]
"#,
        &[
            &format!("6:14: invalid address `100.96.1.300`: {syntax}"),
            &format!("6:30: invalid address `100.96.1.0/33`: {syntax}"),
            &format!("6:47: invalid address `fd00::/129`: {syntax}"),
            &format!("6:61: invalid address `db.acme.internal`: {syntax}"),
        ],
    );
}

#[test]
fn host_bits_set() {
    assert_errors(
        r#"version = 1
trust_domain = "acme.internal"

[[service]]
name = "db"
addresses = ["10.0.0.1/24", "fd00:6d65::1/64"]
ports = ["5432/tcp"]
"#,
        &[
            "6:14: invalid address `10.0.0.1/24`: host bits are set; expected `10.0.0.0/24`",
            "6:29: invalid address `fd00:6d65::1/64`: host bits are set; expected \
             `fd00:6d65::/64`",
        ],
    );
}

#[test]
fn ipv4_mapped_addresses() {
    assert_errors(
        r#"version = 1
trust_domain = "acme.internal"

[[service]]
name = "db"
addresses = ["::ffff:10.20.1.0/124"]
ports = ["5432/tcp"]
"#,
        &[
            "6:14: invalid address `::ffff:10.20.1.0/124`: an IPv4-mapped IPv6 address; expected \
           the IPv4 form `10.20.1.0/28`",
        ],
    );
}

#[test]
fn bad_port_specs() {
    assert_errors(
        r#"version = 1
trust_domain = "acme.internal"

[[service]]
name = "api"
addresses = ["10.20.0.5"]
ports = ["443", "https/tcp", "443/sctp", "65536/tcp", "0/udp", "8099-8000/tcp"]
"#,
        &[
            "7:10: invalid port spec `443`: expected `N/tcp`, `N/udp`, `N-M/tcp`, `N-M/udp` or \
             `icmp`",
            "7:17: invalid port spec `https/tcp`: `https` is not a port number; expected 1 to \
             65535",
            "7:30: invalid port spec `443/sctp`: unknown protocol `sctp`; expected `tcp` or `udp`",
            "7:42: invalid port spec `65536/tcp`: port 65536 is out of range; expected 1 to 65535",
            "7:55: invalid port spec `0/udp`: port 0 is not allowed; expected 1 to 65535",
            "7:64: invalid port spec `8099-8000/tcp`: reversed range 8099-8000; expected the \
             lower port first, as in `8000-8099`",
        ],
    );
}

#[test]
fn overlapping_service_claims() {
    assert_errors(
        r#"version = 1
trust_domain = "acme.internal"

[[service]]
name = "api"
addresses = ["10.20.0.5/32", "fd00::5"]
ports = ["443/tcp", "8000-8099/tcp", "icmp"]

[[service]]
name = "admin"
addresses = ["10.20.0.5", "fd00::5/128"]
ports = ["8080-9000/tcp", "53/udp"]

[[service]]
name = "ping"
addresses = ["10.20.0.5"]
ports = ["icmp"]
"#,
        &[
            "11:14: service `admin` claims 8080-8099/tcp on 10.20.0.5/32, as does service `api` \
             on line 5; expected each address, protocol and port to belong to one service",
            "11:27: service `admin` claims 8080-8099/tcp on fd00::5/128, as does service `api` \
             on line 5; expected each address, protocol and port to belong to one service",
            "16:14: service `ping` claims icmp on 10.20.0.5/32, as does service `api` on line 5; \
             expected each address, protocol and port to belong to one service",
        ],
    );
}

#[test]
fn nested_prefixes_and_disjoint_ports_may_share_addresses() {
    let policy = policy::parse(
        "policy.toml",
        r#"version = 1
trust_domain = "acme.internal"

[[service]]
name = "api"
addresses = ["10.20.0.5/32"]
ports = ["443/tcp"]

[[service]]
name = "subnet"
addresses = ["10.20.0.0/24"]
ports = ["443/tcp"]

[[service]]
name = "metrics"
addresses = ["10.20.0.5/32"]
ports = ["443/udp", "9100/tcp"]
"#,
    );
    assert_eq!(policy.unwrap().services.len(), 3);
}

#[test]
fn identities_may_not_bind_the_same_prefix() {
    assert_errors(
        r#"version = 1
trust_domain = "acme.internal"

[[identity]]
id = "spiffe://acme.internal/agent/a"
addresses = ["100.96.1.0/24"]

[[identity]]
id = "spiffe://acme.internal/agent/b"
addresses = ["100.96.1.10", "100.96.1.0/24"]
"#,
        &["10:29: address 100.96.1.0/24 is already bound to identity \
           `spiffe://acme.internal/agent/a` on line 6; expected each prefix to belong to one \
           identity"],
    );
}

const SERVICES: &str = r#"version = 1
trust_domain = "acme.internal"

[[identity]]
id = "spiffe://acme.internal/agent/a"
labels = { team = "finance" }

[[service]]
name = "api"
addresses = ["10.20.0.5"]
ports = ["443/tcp", "8000-8099/tcp"]

[[service]]
name = "dns"
addresses = ["10.0.0.53"]
ports = ["53/udp"]
"#;

/// Errors of a grant appended to [`SERVICES`], which has 16 lines.
fn grant_errors(grant: &str) -> Vec<String> {
    errors(&format!("{SERVICES}\n[[grant]]\n{grant}"))
}

#[test]
fn grant_sources_must_be_declared() {
    assert_eq!(
        grant_errors(
            r#"from = ["spiffe://acme.internal/agent/b", "team=ops", "tema=finance", "finance", "spiffe:/x"]
to = ["api"]
"#
        ),
        [
            "19:9: `spiffe://acme.internal/agent/b` is not a declared identity",
            "19:43: label selector `team=ops` selects no identity; expected a label some \
             identity carries",
            "19:55: label selector `tema=finance` selects no identity; expected a label some \
             identity carries",
            "19:71: invalid source `finance`; expected a SPIFFE ID, a label selector \
             `key=value`, or `*`",
            "19:82: invalid source `spiffe:/x`; expected a SPIFFE ID, a label selector \
             `key=value`, or `*`",
        ]
    );
}

#[test]
fn grant_source_label_selectors_must_be_valid_labels() {
    assert_eq!(
        grant_errors("from = [\"team = finance\", \"team=-x\"]\nto = [\"api\"]\n"),
        [
            "19:9: invalid label key `team `: ` ` is not allowed; expected letters, digits, \
             `.`, `-` and `_`",
            "19:27: invalid value `-x` for label `team`: it must begin and end with a letter \
             or digit",
        ]
    );
}

#[test]
fn grant_targets_must_be_declared() {
    assert_eq!(
        grant_errors("from = [\"*\"]\nto = [\"api\", \"billing\"]\n"),
        ["20:14: `billing` is not a declared service"]
    );
}

#[test]
fn grant_from_and_to_must_not_be_empty() {
    assert_eq!(
        grant_errors("from = []\nto = []\n"),
        [
            "19:8: `from` is empty; expected at least one source",
            "20:6: `to` is empty; expected at least one service",
        ]
    );
}

#[test]
fn service_addresses_and_ports_must_not_be_empty() {
    assert_errors(
        r#"version = 1
trust_domain = "acme.internal"

[[service]]
name = "api"
addresses = []
ports = []
"#,
        &[
            "6:13: `addresses` is empty; expected at least one address",
            "7:9: `ports` is empty; expected at least one port spec",
        ],
    );
}

#[test]
fn grant_ports_must_leave_something_to_allow() {
    assert_eq!(
        grant_errors("from = [\"*\"]\nto = [\"api\", \"dns\"]\nports = [\"22/tcp\"]\n"),
        [
            "21:9: grant's ports leave nothing to allow on service `api`, which offers \
             443/tcp, 8000-8099/tcp",
            "21:9: grant's ports leave nothing to allow on service `dns`, which offers 53/udp",
        ]
    );
    assert_eq!(
        grant_errors("from = [\"*\"]\nto = [\"api\"]\nports = []\n"),
        [
            "21:9: grant's ports leave nothing to allow on service `api`, which offers 443/tcp, \
          8000-8099/tcp"
        ]
    );
}

#[test]
fn grant_ports_must_each_match_a_service_port() {
    assert_eq!(
        grant_errors(
            "from = [\"*\"]\nto = [\"api\", \"dns\"]\nports = [\"443/tcp\", \"53/udp\", \"53/tcp\"]\n"
        ),
        ["21:31: port spec `53/tcp` is not offered by any service in `to`"]
    );
}

#[test]
fn bad_expires() {
    let expected = "expected an RFC 3339 date-time with a UTC offset, like `2026-12-01T00:00:00Z`";
    for (value, shown) in [
        ("2026-12-01T00:00:00", "2026-12-01T00:00:00"),
        ("2026-12-01", "2026-12-01"),
        ("\"2026-12-01 00:00:00\"", "2026-12-01 00:00:00"),
        ("\"next tuesday\"", "next tuesday"),
        ("\"2026-02-30T00:00:00Z\"", "2026-02-30T00:00:00Z"),
        // Not a year from 0 to 9999 in UTC.
        ("9999-12-31T23:00:00-05:00", "9999-12-31T23:00:00-05:00"),
        ("0000-01-01T00:00:00+01:00", "0000-01-01T00:00:00+01:00"),
    ] {
        assert_eq!(
            grant_errors(&format!(
                "from = [\"*\"]\nto = [\"api\"]\nexpires = {value}\n"
            )),
            [format!("21:11: invalid expires `{shown}`: {expected}")],
            "{value}"
        );
    }
}

#[test]
fn bad_rates() {
    for (rate, reason) in [
        (
            "20",
            "expected `N/s` or `N/m` with N at least 1, like `20/s`",
        ),
        (
            "fast/s",
            "expected `N/s` or `N/m` with N at least 1, like `20/s`",
        ),
        (
            "20/h",
            "unknown unit `h`; expected `s` (per second) or `m` (per minute)",
        ),
        ("0/s", "a rate of 0 allows no flow; expected at least 1"),
        (
            "4294967296/m",
            "the count is too large; expected at most 4294967295",
        ),
    ] {
        assert_eq!(
            grant_errors(&format!(
                "from = [\"*\"]\nto = [\"api\"]\nrate = \"{rate}\"\n"
            )),
            [format!("21:8: invalid rate `{rate}`: {reason}")],
            "{rate}"
        );
    }
}

#[test]
fn bad_labels() {
    assert_errors(
        r#"version = 1
trust_domain = "acme.internal"

[[identity]]
id = "spiffe://acme.internal/agent/a"
labels = { "team name" = "finance", "Acme.io/tier" = "x", kind = "", env = "prod!" }
"#,
        &[
            "6:12: invalid label key `team name`: ` ` is not allowed; expected letters, digits, \
             `.`, `-` and `_`",
            "6:37: invalid label key `Acme.io/tier`: the prefix before `/` must be a DNS name: \
             lowercase letters, digits, `.` and `-`, at most 253 characters",
            "6:66: invalid value `` for label `kind`: empty; expected 1 to 63 characters",
            "6:76: invalid value `prod!` for label `env`: `!` is not allowed; expected letters, \
             digits, `.`, `-` and `_`",
        ],
    );
}

#[test]
fn every_error_is_reported_in_one_run() {
    let errors = errors(
        r#"version = 3
trust_domain = "acme.internal"
owner = "finance"

[[identity]]
id = "spiffe://other.internal/agent/a"
addresses = ["100.96.1.1/24"]

[[service]]
name = "api"
addresses = ["10.20.0.5"]
ports = ["443/tcp", "0/tcp"]

[[service]]
name = "api"
addresses = ["10.20.0.6"]
ports = ["443/tcp"]

[[grant]]
from = ["team=finance"]
to = ["db"]
expires = "soon"
rate = "1/d"
"#,
    );
    let places: Vec<_> = errors
        .iter()
        .map(|error| error.split(": ").next().unwrap())
        .collect();
    assert_eq!(
        places,
        [
            "1:11", "3:1", "6:6", "7:14", "12:21", "15:8", "20:9", "21:7", "22:11", "23:8"
        ]
    );
}

#[test]
fn bare_addresses_are_host_prefixes() {
    let policy = policy::parse(
        "policy.toml",
        r#"version = 1
trust_domain = "acme.internal"

[[identity]]
id = "spiffe://acme.internal/agent/a"
addresses = ["100.96.1.10", "fd00::a", "100.96.1.10/32"]
"#,
    )
    .unwrap();
    let addresses: Vec<_> = policy.identities[0]
        .addresses
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(addresses, ["100.96.1.10/32", "fd00::a/128"]);
}

#[test]
fn grants_are_resolved() {
    let policy = policy::parse(
        "policy.toml",
        r#"version = 1
trust_domain = "acme.internal"

[[identity]]
id = "spiffe://acme.internal/agent/a"
labels = { team = "finance" }

[[identity]]
id = "spiffe://acme.internal/agent/b"

[[identity]]
id = "spiffe://acme.internal/agent/c"
labels = { team = "finance" }

[[service]]
name = "api"
addresses = ["10.20.0.5"]
ports = ["443/tcp", "8000-8099/tcp", "icmp"]

[[service]]
name = "dns"
addresses = ["10.0.0.53"]
ports = ["53/udp", "53/tcp"]

[[grant]]
from = ["team=finance", "spiffe://acme.internal/agent/b", "spiffe://acme.internal/agent/a"]
to = ["api", "dns", "api"]
ports = ["53/tcp", "8080-9000/tcp", "icmp"]
expires = "2026-12-01T09:30:00+09:00"
rate = "30/m"

[[grant]]
from = ["spiffe://acme.internal/agent/b", "*"]
to = ["dns"]
"#,
    )
    .unwrap();
    let [narrow, any] = &policy.grants[..] else {
        panic!("two grants expected")
    };
    assert_eq!(narrow.sources, Sources::Identities(vec![0, 1, 2]));
    let targets: Vec<_> = narrow
        .targets
        .iter()
        .map(|target| (target.service, target.ports.to_string()))
        .collect();
    assert_eq!(
        targets,
        [
            (0, "8080-8099/tcp, icmp".to_owned()),
            (1, "53/tcp".to_owned())
        ]
    );
    let expires = narrow.expires.unwrap().format(&Rfc3339).unwrap();
    assert_eq!(expires, "2026-12-01T00:30:00Z");
    assert_eq!(narrow.rate.unwrap().to_string(), "30/m");
    assert_eq!(any.sources, Sources::Any);
    assert_eq!(any.ports, None);
    assert_eq!(any.targets[0].ports.to_string(), "53/tcp, 53/udp");
}
