//! Checks before anything is loaded, each failing with what to do about it.

use std::{ffi::CString, io, path::Path};

use nix::{
    mount::{MsFlags, mount},
    sys::statfs::{BPF_FS_MAGIC, statfs},
};

/// Where distributions mount the bpffs, and where the agent mounts one if
/// nobody has.
const DEFAULT_BPFFS: &str = "/sys/fs/bpf";

#[derive(Debug, thiserror::Error)]
pub enum PreflightError {
    #[error(
        "this kernel has no BTF (/sys/kernel/btf/vmlinux is missing): mesh needs Linux ≥ 6.1 \
         built with CONFIG_DEBUG_INFO_BTF"
    )]
    NoBtf,
    #[error("interface `{0}` not found")]
    NoInterface(String),
    #[error(
        "{0} is not on a bpffs: mount one there (`mount -t bpf bpf {0}`) or choose another \
         --bpffs"
    )]
    NotBpffs(String),
    #[error("mounting a bpffs on {path}: {source} (root or CAP_SYS_ADMIN needed)")]
    Mount { path: String, source: io::Error },
}

pub fn check_btf() -> Result<(), PreflightError> {
    Path::new("/sys/kernel/btf/vmlinux")
        .exists()
        .then_some(())
        .ok_or(PreflightError::NoBtf)
}

pub fn check_interfaces(interfaces: &[String]) -> Result<(), PreflightError> {
    for name in interfaces {
        let c_name =
            CString::new(name.as_str()).map_err(|_| PreflightError::NoInterface(name.clone()))?;
        // SAFETY: a valid C string; the call only reads it.
        if unsafe { libc::if_nametoindex(c_name.as_ptr()) } == 0 {
            return Err(PreflightError::NoInterface(name.clone()));
        }
    }
    Ok(())
}

/// The folder holding the pin root must be on a bpffs. The usual one is
/// mounted if it is not yet.
pub fn ensure_bpffs(pin_root: &Path) -> Result<(), PreflightError> {
    let parent = pin_root.parent().unwrap_or(pin_root);
    if is_bpffs(parent) {
        return Ok(());
    }
    let shown = parent.display().to_string();
    if parent != Path::new(DEFAULT_BPFFS) {
        return Err(PreflightError::NotBpffs(shown));
    }
    tracing::info!(path = %shown, "mounting a bpffs");
    mount(
        Some("bpf"),
        parent,
        Some("bpf"),
        MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|errno| PreflightError::Mount {
        path: shown,
        source: io::Error::from(errno),
    })
}

fn is_bpffs(path: &Path) -> bool {
    statfs(path).is_ok_and(|fs| fs.filesystem_type() == BPF_FS_MAGIC)
}
