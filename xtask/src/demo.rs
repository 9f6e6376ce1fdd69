//! `cargo xtask demo`: set up, build the agent and the demo, and run the
//! demo as root.

use std::process::Command;

use crate::{cmd, setup};

pub fn run() -> anyhow::Result<()> {
    cmd::require_root("cargo xtask demo")?;
    setup::run()?;
    show()
}

/// Builds and runs the demo; `test` runs it too, so it never rots.
pub fn show() -> anyhow::Result<()> {
    let bin = cmd::build_with_agent("mesh-demo", false)?;
    cmd::run(Command::new(bin.join("mesh-demo")).env("MESH_AGENT", bin.join("mesh-agent")))
}
