//! Programs from Debian packages that the tests run in a VM, fetched like
//! the kernels: `apt-get download` into `target/vm/debs/`, `dpkg -x` into
//! `target/vm/tools/`. The host's own sources: the VMs' user space is the
//! host's (busybox, `ip`, the shared libraries).

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::ensure;

use super::kernels::Apt;
use crate::cmd::{self, step};

/// `wg`, from wireguard-tools: the tests check kernel WireGuard with `wg
/// show`.
pub fn wg(vm_dir: &Path) -> anyhow::Result<PathBuf> {
    let root = unpacked("wireguard-tools", vm_dir)?;
    let wg = root.join("usr/bin/wg");
    ensure!(wg.is_file(), "wireguard-tools has no {}", wg.display());
    Ok(wg)
}

/// The candidate version of `package`, unpacked: downloaded once, unpacked
/// once per version.
fn unpacked(package: &str, vm_dir: &Path) -> anyhow::Result<PathBuf> {
    let apt = Apt::new(None, vm_dir)?;
    let package = apt.package(package)?;
    let root = vm_dir
        .join("tools")
        .join(format!("{}_{}", package.name, package.version));
    let complete = root.join(".complete");
    if complete.exists() {
        return Ok(root);
    }
    step(&format!("fetching {} {}", package.name, package.version));
    let debs_dir = vm_dir.join("debs");
    fs::create_dir_all(&debs_dir)?;
    let deb = debs_dir.join(&package.file_name);
    if !deb.exists() {
        apt.download(&package, &debs_dir)?;
    }
    let _ = fs::remove_dir_all(&root);
    fs::create_dir_all(&root)?;
    cmd::run(Command::new("dpkg").arg("-x").arg(&deb).arg(&root))?;
    fs::write(&complete, "")?;
    Ok(root)
}
