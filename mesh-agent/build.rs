//! Builds mesh-ebpf for the BPF target and leaves the object in OUT_DIR, where
//! `datapath` embeds it.
//!
//! `AYA_BUILD_SKIP=1` (used for `cargo check`/clippy) embeds an empty stub
//! instead; such a binary refuses to load programs and says why.

use std::{
    env,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, anyhow, bail};
use aya_build::Toolchain;

const EBPF_PACKAGE: &str = "mesh-ebpf";
/// The binary target of mesh-ebpf, i.e. the object's file name in OUT_DIR.
const EBPF_OBJECT: &str = "mesh";
/// The underlay shield's binary target, likewise.
const SHIELD_OBJECT: &str = "shield";

fn main() -> anyhow::Result<()> {
    println!("cargo::rustc-check-cfg=cfg(mesh_ebpf_stub)");
    println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").context("OUT_DIR not set")?);
    if skip_requested() {
        for object in [EBPF_OBJECT, SHIELD_OBJECT] {
            std::fs::write(out_dir.join(object), b"")?;
        }
        println!("cargo:rustc-cfg=mesh_ebpf_stub");
        println!("cargo:warning=AYA_BUILD_SKIP set: embedding no eBPF programs");
        return Ok(());
    }

    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("mesh-agent has no parent folder")?;
    put_bpf_linker_on_path(workspace)?;
    check_rust_src()?;

    let ebpf_root = workspace.join(EBPF_PACKAGE);
    let ebpf_root = ebpf_root
        .to_str()
        .ok_or_else(|| anyhow!("non-UTF-8 path {}", ebpf_root.display()))?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: EBPF_PACKAGE,
            root_dir: ebpf_root,
            ..Default::default()
        }],
        Toolchain::default(),
    )
}

fn skip_requested() -> bool {
    env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"))
}

/// bpf-linker comes from PATH or from the project-local tools folder that
/// `cargo xtask setup` fills.
fn put_bpf_linker_on_path(workspace: &Path) -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=PATH");
    let tools_bin = workspace.join("target/tools/bin");
    let local = tools_bin.join("bpf-linker");
    if local.is_file() {
        println!("cargo:rerun-if-changed={}", local.display());
        let path = env::var_os("PATH").unwrap_or_default();
        let path = env::join_paths(std::iter::once(tools_bin).chain(env::split_paths(&path)))?;
        // SAFETY: build scripts are single-threaded at this point.
        unsafe { env::set_var("PATH", path) };
        return Ok(());
    }
    match which::which("bpf-linker") {
        Ok(found) => {
            println!("cargo:rerun-if-changed={}", found.display());
            Ok(())
        }
        Err(_) => bail!(
            "bpf-linker not found (neither on PATH nor in {}): run `cargo xtask setup`, \
             or set AYA_BUILD_SKIP=1 for a check-only build without eBPF programs",
            tools_bin.display()
        ),
    }
}

/// `-Z build-std=core` needs the nightly's rust-src component.
fn check_rust_src() -> anyhow::Result<()> {
    let out = std::process::Command::new("rustc")
        .args(["+nightly", "--print", "sysroot"])
        .output()
        .context("running `rustc +nightly --print sysroot` (is rustup installed?)")?;
    if !out.status.success() {
        bail!("no nightly toolchain: run `cargo xtask setup`");
    }
    let sysroot = PathBuf::from(String::from_utf8(out.stdout)?.trim());
    let core = sysroot.join("lib/rustlib/src/rust/library/core");
    if !core.is_dir() {
        bail!(
            "the nightly toolchain lacks rust-src ({} missing): run `cargo xtask setup`",
            core.display()
        );
    }
    Ok(())
}
