//! Running commands with their invocation echoed, failing on a non-zero exit.

use std::{path::PathBuf, process::Command};

use anyhow::{Context as _, bail};

/// The workspace root (xtask lives one level below it).
pub fn workspace_root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest
        .parent()
        .expect("xtask has a parent folder")
        .to_path_buf()
}

/// Prints a progress line that stands out from the commands' own output.
pub fn step(message: &str) {
    eprintln!("==> {message}");
}

/// Runs `cmd` in the workspace root, inheriting stdio.
pub fn run(cmd: &mut Command) -> anyhow::Result<()> {
    cmd.current_dir(workspace_root());
    eprintln!("+ {}", display(cmd));
    let status = cmd
        .status()
        .with_context(|| format!("spawning {}", display(cmd)))?;
    if !status.success() {
        bail!("`{}` failed: {status}", display(cmd));
    }
    Ok(())
}

/// Runs `cmd` and returns its stdout, or `None` if it cannot run or fails.
pub fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn display(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|s| s.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Fails unless running as root: the kernel-facing work needs it.
pub fn require_root(what: &str) -> anyhow::Result<()> {
    let uid = output(Command::new("id").arg("-u")).context("running `id -u`")?;
    if uid.trim() != "0" {
        bail!(
            "{what} loads eBPF programs and creates network namespaces: run it as root \
             (or with CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN)"
        );
    }
    Ok(())
}

/// Builds mesh-agent and the mesh-tests binary `companion` (the demo, the
/// benchmark) and returns the folder holding both: such programs run the
/// agent, and find it through `MESH_AGENT`.
pub fn build_with_agent(companion: &str, release: bool) -> anyhow::Result<PathBuf> {
    let mut build = Command::new("cargo");
    build.args(["build", "--quiet"]);
    if release {
        build.arg("--release");
    }
    build.args([
        "--package",
        "mesh-agent",
        "--package",
        "mesh-tests",
        "--bin",
        "mesh-agent",
        "--bin",
    ]);
    run(build.arg(companion))?;
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"));
    Ok(target.join(if release { "release" } else { "debug" }))
}
