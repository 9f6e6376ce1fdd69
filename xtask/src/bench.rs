//! `cargo xtask bench`: set up, build the agent and the benchmarks with
//! optimisations, and run them as root. The method is in docs/performance.md.

use std::process::Command;

use crate::{cmd, setup};

#[derive(clap::Args)]
pub struct Options {
    /// Policy sizes up to 100k and shorter throughput windows: about a minute.
    #[arg(long)]
    quick: bool,
}

pub fn run(options: &Options) -> anyhow::Result<()> {
    cmd::require_root("cargo xtask bench")?;
    setup::run()?;
    let release = cmd::build_with_agent("mesh-bench", true)?;
    let results = release.with_file_name("bench").join("results.json");
    let mut bench = Command::new(release.join("mesh-bench"));
    bench.env("MESH_AGENT", release.join("mesh-agent"));
    bench.env("MESH_WIREGUARD_USERSPACE", setup::boringtun_path());
    if options.quick {
        bench.arg("--quick");
    }
    cmd::run(bench.arg(results))
}
