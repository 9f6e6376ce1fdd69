//! `cargo xtask test`: the whole gate, ending with the test runner's summary.

use std::process::Command;

use crate::{
    cmd::{self, output, step},
    setup,
};

/// Prefix of the network namespaces the test harness creates.
const TEST_NETNS_PREFIX: &str = "mesh-t-";

#[derive(clap::Args)]
pub struct Options {
    /// Passed to the test runner to select tests.
    filter: Vec<String>,
}

pub fn run(options: &Options) -> anyhow::Result<()> {
    cmd::require_root("cargo xtask test")?;
    setup::run()?;

    remove_stale_namespaces()?;
    step("formatting");
    cmd::run(Command::new("cargo").args(["fmt", "--all", "--", "--check"]))?;
    step("clippy (userspace crates, warnings are errors)");
    cmd::run(Command::new("cargo").args(["clippy", "--all-targets", "--", "-D", "warnings"]))?;
    step("unit, kernel and integration tests");
    cmd::run(
        Command::new("cargo")
            .args(["nextest", "run", "--no-fail-fast"])
            .args(&options.filter),
    )
}

/// Namespaces left by a test process that was killed before its guards ran.
fn remove_stale_namespaces() -> anyhow::Result<()> {
    let list = output(Command::new("ip").args(["netns", "list"])).unwrap_or_default();
    for name in list
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .filter(|name| name.starts_with(TEST_NETNS_PREFIX))
    {
        step(&format!("removing stale test namespace {name}"));
        cmd::run(Command::new("ip").args(["netns", "del", name]))?;
    }
    Ok(())
}
