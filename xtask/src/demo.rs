//! `cargo xtask demo`: set up, then run the demo program as root.

use std::process::Command;

use crate::{cmd, setup};

pub fn run() -> anyhow::Result<()> {
    cmd::require_root("cargo xtask demo")?;
    setup::run()?;
    cmd::run(Command::new("cargo").args([
        "run",
        "--quiet",
        "--package",
        "mesh-tests",
        "--bin",
        "mesh-demo",
    ]))
}
