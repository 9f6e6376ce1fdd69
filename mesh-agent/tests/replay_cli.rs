//! `mesh-agent policy replay` as a command: JSON lines on success, exit 1
//! with a clear message and no verdicts for a bad policy or capture.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn replay(policy: &Path, capture: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mesh-agent"))
        .args(["policy", "replay", "--policy"])
        .arg(policy)
        .args(["--now", "2026-06-01T00:00:00Z"])
        .arg(capture)
        .output()
        .expect("running mesh-agent")
}

fn capture(name: &str) -> PathBuf {
    repo().join("../shared/captures/tcpdump").join(name)
}

#[test]
fn prints_one_json_verdict_per_packet() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "replay loads eBPF programs: run as root (cargo xtask test does)"
    );
    let out = replay(
        &repo().join("examples/policy.toml"),
        &capture("dns_udp.pcap"),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert!(!lines.is_empty());
    for (i, line) in lines.iter().enumerate() {
        let object = line.as_object().unwrap();
        let keys: Vec<&str> = object.keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            ["packet", "reason", "service", "source", "verdict"],
            "{line}"
        );
        assert_eq!(line["packet"], i + 1);
        assert!(
            matches!(line["verdict"].as_str(), Some("allow" | "deny")),
            "{line}"
        );
    }
}

#[test]
fn an_unreadable_capture_is_an_error_without_verdicts() {
    let policy = repo().join("examples/policy.toml");
    let out = replay(&policy, &repo().join("README.md"));
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("README.md: not a pcap or pcapng file"),
        "{stderr}"
    );

    let out = replay(&policy, Path::new("/nonexistent.pcap"));
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
}

#[test]
fn an_invalid_policy_is_an_error_without_verdicts() {
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("bad.toml");
    std::fs::write(&policy, "version = 2\ntrust_domain = \"acme.internal\"\n").unwrap();
    let out = replay(&policy, &capture("dns_udp.pcap"));
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("bad.toml:1:11: unsupported version 2; expected 1"),
        "{stderr}"
    );
}
