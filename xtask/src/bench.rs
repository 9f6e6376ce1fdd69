//! `cargo xtask bench`: set up, build the agent and the benchmarks with
//! optimisations, and run them as root. The method is in docs/performance.md.

use std::{path::PathBuf, process::Command};

use crate::{
    cmd::{self, workspace_root},
    setup,
};

#[derive(clap::Args)]
pub struct Options {
    /// Policy sizes up to 100k and shorter throughput windows: about a minute.
    #[arg(long)]
    quick: bool,
}

pub fn run(options: &Options) -> anyhow::Result<()> {
    cmd::require_root("cargo xtask bench")?;
    setup::run()?;
    cmd::run(Command::new("cargo").args([
        "build",
        "--quiet",
        "--release",
        "--package",
        "mesh-agent",
        "--package",
        "mesh-tests",
        "--bin",
        "mesh-agent",
        "--bin",
        "mesh-bench",
    ]))?;
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"));
    let release = target.join("release");
    let mut bench = Command::new(release.join("mesh-bench"));
    bench.env("MESH_AGENT", release.join("mesh-agent"));
    if options.quick {
        bench.arg("--quick");
    }
    cmd::run(bench.arg(target.join("bench/results.json")))
}
