//! `cargo xtask test`: the whole gate, ending with the test runner's summary.

use std::process::Command;

use anyhow::Context as _;

use crate::{
    cmd::{self, output, step},
    demo, setup, vm,
};

/// Prefix of the network namespaces the test harness creates.
const TEST_NETNS_PREFIX: &str = "mesh-t-";
/// Prefix of the cgroup roots the binding tests create.
const TEST_CGROUP_PREFIX: &str = "mesh-test-";

#[derive(clap::Args)]
pub struct Options {
    /// Passed to the test runner to select tests.
    filter: Vec<String>,
}

pub fn run(options: &Options) -> anyhow::Result<()> {
    cmd::require_root("cargo xtask test")?;
    setup::run()?;

    remove_stale_namespaces()?;
    unmount_stale_bpffs()?;
    remove_stale_cgroups()?;
    step("formatting");
    cmd::run(Command::new("cargo").args(["fmt", "--all", "--", "--check"]))?;
    step("clippy (userspace crates, warnings are errors)");
    cmd::run(Command::new("cargo").args(["clippy", "--all-targets", "--", "-D", "warnings"]))?;
    step("the demo");
    demo::show()?;
    // The VMs go before the host's tests, so that the test runner's summary
    // ends the output; a VM failure still fails the gate afterwards.
    step("the kernel-facing suites on every supported kernel (docs/vm.md)");
    let vms = vm::matrix(vm::KERNELS, &[]);
    if let Err(err) = &vms {
        eprintln!("{err:#}");
    }
    step("unit, kernel and integration tests");
    cmd::run(
        Command::new("cargo")
            .args(["nextest", "run", "--no-fail-fast"])
            .args(&options.filter),
    )?;
    vms.context("the kernel VMs failed (see above)")
}

/// Private bpffs mounts (`mesh-bpffs-*`) left by a killed test process.
fn unmount_stale_bpffs() -> anyhow::Result<()> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    for mountpoint in mounts
        .lines()
        .filter_map(|line| line.split_whitespace().nth(1))
        .filter(|path| path.contains("/mesh-bpffs-"))
    {
        step(&format!("unmounting stale test bpffs {mountpoint}"));
        cmd::run(Command::new("umount").arg(mountpoint))?;
        let _ = std::fs::remove_dir(mountpoint);
    }
    Ok(())
}

/// Cgroup roots of binding tests (`mesh-test-*` below the cgroup v2 mount)
/// left by a killed test process: their processes are killed first.
fn remove_stale_cgroups() -> anyhow::Result<()> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let Some(mount) = mounts
        .lines()
        .map(|line| line.split_whitespace().collect::<Vec<_>>())
        .find(|fields| fields.get(2) == Some(&"cgroup2"))
        .and_then(|fields| fields.get(1).map(|m| std::path::PathBuf::from(*m)))
    else {
        return Ok(());
    };
    let dirs = |path: &std::path::Path| -> Vec<std::path::PathBuf> {
        std::fs::read_dir(path)
            .map(|entries| {
                entries
                    .filter_map(Result::ok)
                    .map(|e| e.path())
                    .filter(|p| p.is_dir())
                    .collect()
            })
            .unwrap_or_default()
    };
    for root in dirs(&mount).into_iter().filter(|p| {
        p.file_name()
            .is_some_and(|name| name.to_string_lossy().starts_with(TEST_CGROUP_PREFIX))
    }) {
        step(&format!("removing stale test cgroup {}", root.display()));
        for child in dirs(&root) {
            // Killing every process empties the cgroup.
            std::fs::write(child.join("cgroup.kill"), "1")
                .with_context(|| format!("emptying {}", child.display()))?;
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            while std::fs::remove_dir(&child).is_err() && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        }
        std::fs::remove_dir(&root).with_context(|| format!("removing {}", root.display()))?;
    }
    Ok(())
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
