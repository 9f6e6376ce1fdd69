//! `mesh-agent policy check` and `policy show`, run as a user runs them.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Output},
};

use serde_json::json;

const POLICY: &str = r#"version = 1
trust_domain = "acme.internal"

[[identity]]
id = "spiffe://acme.internal/agent/invoice-bot"
addresses = ["100.96.1.10", "fd00:6d65:7368::a/128"]
labels = { team = "finance" }

[[identity]]
id = "spiffe://acme.internal/agent/support-bot"

[[service]]
name = "billing-api"
addresses = ["10.20.0.5/32"]
ports = ["8000-8099/tcp", "443/tcp"]

[[grant]]
from = ["team=finance"]
to = ["billing-api"]
ports = ["443/tcp"]
expires = 2026-12-01T09:00:00+09:00
rate = "20/s"

[[grant]]
from = ["*"]
to = ["billing-api"]
"#;

/// Runs the agent in the repository's root.
fn mesh_agent(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mesh-agent"))
        .args(args)
        .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join(".."))
        .output()
        .unwrap()
}

/// Writes a policy file for one test; `name` must be unique to the test.
fn policy_file(name: &str, contents: impl AsRef<[u8]>) -> PathBuf {
    let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    fs::write(&path, contents).unwrap();
    path
}

fn text(bytes: &[u8]) -> &str {
    std::str::from_utf8(bytes).unwrap()
}

#[test]
fn check_prints_a_summary_of_a_valid_policy() {
    let output = mesh_agent(&["policy", "check", "examples/policy.toml"]);
    assert_eq!(output.status.code(), Some(0));
    assert_eq!(
        text(&output.stdout),
        "examples/policy.toml: valid: 4 identities, 3 services, 4 grants\n"
    );
    assert_eq!(text(&output.stderr), "");

    let path = policy_file(
        "check-one.toml",
        "version = 1\ntrust_domain = \"a\"\n[[identity]]\nid = \"spiffe://a/b\"\n",
    );
    let output = mesh_agent(&["policy", "check", path.to_str().unwrap()]);
    assert_eq!(
        text(&output.stdout),
        format!(
            "{}: valid: 1 identity, 0 services, 0 grants\n",
            path.display()
        )
    );
}

#[test]
fn check_prints_every_error_of_an_invalid_policy() {
    let invalid = POLICY
        .replace("version = 1", "version = 2")
        .replace("ports = [\"443/tcp\"]", "ports = [\"22/tcp\"]")
        .replace("rate = \"20/s\"", "rate = \"20/h\"");
    let path = policy_file("check-invalid.toml", invalid);
    let file = path.to_str().unwrap();
    let output = mesh_agent(&["policy", "check", file]);
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(text(&output.stdout), "");
    assert_eq!(
        text(&output.stderr),
        format!(
            "{file}:1:11: unsupported version 2; expected 1\n\
             {file}:20:9: grant's ports leave nothing to allow on service `billing-api`, \
             which offers 443/tcp, 8000-8099/tcp\n\
             {file}:22:8: invalid rate `20/h`: unknown unit `h`; expected `s` (per second) or \
             `m` (per minute)\n"
        )
    );
}

#[test]
fn check_reports_an_unreadable_file() {
    let output = mesh_agent(&["policy", "check", "no/such/policy.toml"]);
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(text(&output.stdout), "");
    assert_eq!(
        text(&output.stderr),
        "no/such/policy.toml: cannot read: No such file or directory (os error 2)\n"
    );
}

#[test]
fn check_reports_where_a_file_stops_being_utf8() {
    let path = policy_file(
        "check-latin1.toml",
        b"version = 1\ntrust_domain = \"caf\xe9\"\n",
    );
    let file = path.to_str().unwrap();
    let output = mesh_agent(&["policy", "check", file]);
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(
        text(&output.stderr),
        format!("{file}:2:20: the file is not UTF-8; expected UTF-8 text\n")
    );
}

#[test]
fn show_prints_the_resolved_policy() {
    let path = policy_file("show.toml", POLICY);
    let output = mesh_agent(&["policy", "show", path.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(0));
    assert_eq!(
        text(&output.stdout),
        "trust domain: acme.internal

identity spiffe://acme.internal/agent/invoice-bot
  addresses: 100.96.1.10/32, fd00:6d65:7368::a/128
  labels: team=finance

identity spiffe://acme.internal/agent/support-bot
  addresses: none, bound at run time

service billing-api
  addresses: 10.20.0.5/32
  ports: 443/tcp, 8000-8099/tcp

grant 1
  from: team=finance
  sources: spiffe://acme.internal/agent/invoice-bot
  to billing-api: 443/tcp
  expires: 2026-12-01T00:00:00Z
  rate: 20/s new flows per source identity

grant 2
  from: *
  sources: any, known or not
  to billing-api: 443/tcp, 8000-8099/tcp
  expires: never
  rate: unlimited
"
    );
}

#[test]
fn show_json_prints_the_same() {
    let path = policy_file("show-json.toml", POLICY);
    let output = mesh_agent(&["policy", "show", "--json", path.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(0));
    let shown: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(
        shown,
        json!({
            "trust_domain": "acme.internal",
            "identities": [
                {
                    "id": "spiffe://acme.internal/agent/invoice-bot",
                    "addresses": ["100.96.1.10/32", "fd00:6d65:7368::a/128"],
                    "labels": {"team": "finance"},
                },
                {
                    "id": "spiffe://acme.internal/agent/support-bot",
                    "addresses": [],
                    "labels": {},
                },
            ],
            "services": [
                {
                    "name": "billing-api",
                    "addresses": ["10.20.0.5/32"],
                    "ports": ["443/tcp", "8000-8099/tcp"],
                },
            ],
            "grants": [
                {
                    "from": ["team=finance"],
                    "sources": {"identities": ["spiffe://acme.internal/agent/invoice-bot"]},
                    "to": [{"service": "billing-api", "ports": ["443/tcp"]}],
                    "expires": "2026-12-01T00:00:00Z",
                    "rate": "20/s",
                },
                {
                    "from": ["*"],
                    "sources": "any",
                    "to": [{"service": "billing-api", "ports": ["443/tcp", "8000-8099/tcp"]}],
                    "expires": null,
                    "rate": null,
                },
            ],
        })
    );
}

#[test]
fn show_rejects_an_invalid_policy() {
    let path = policy_file("show-invalid.toml", "version = 1\n");
    let file = path.to_str().unwrap();
    let output = mesh_agent(&["policy", "show", "--json", file]);
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(text(&output.stdout), "");
    assert_eq!(
        text(&output.stderr),
        format!("{file}:1:1: missing key `trust_domain` at the top level; expected a string\n")
    );
}
