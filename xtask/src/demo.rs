//! `cargo xtask demo`: set up, build the agent and the demo, and run the
//! demo as root.

use std::{path::PathBuf, process::Command};

use crate::{
    cmd::{self, workspace_root},
    setup,
};

pub fn run() -> anyhow::Result<()> {
    cmd::require_root("cargo xtask demo")?;
    setup::run()?;
    show()
}

/// Builds and runs the demo; `test` runs it too, so it never rots.
pub fn show() -> anyhow::Result<()> {
    cmd::run(Command::new("cargo").args([
        "build",
        "--quiet",
        "--package",
        "mesh-agent",
        "--package",
        "mesh-tests",
        "--bin",
        "mesh-agent",
        "--bin",
        "mesh-demo",
    ]))?;
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
        .join("debug");
    cmd::run(Command::new(target.join("mesh-demo")).env("MESH_AGENT", target.join("mesh-agent")))
}
