//! Debian's cloud kernels: resolved through their meta-packages, downloaded
//! with `apt-get download` into `target/vm/debs/`, unpacked with `dpkg -x`
//! into `target/vm/kernels/`, with a `modules.dep` made by `depmod`.

use std::{
    collections::{BTreeSet, HashMap},
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, ensure};

use crate::cmd::{self, output, step};

/// A kernel the VM matrix boots.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Kernel {
    /// What `--kernel` calls it.
    pub name: &'static str,
    /// The meta-package that always depends on the newest build: versioned
    /// package names change with every ABI bump and old ones vanish.
    meta_package: &'static str,
    /// An apt suite queried through a project-local configuration, or `None`
    /// for the host's own sources.
    suite: Option<&'static str>,
}

pub const KERNELS: &[Kernel] = &[
    Kernel {
        name: "6.1",
        meta_package: "linux-image-cloud-amd64",
        suite: None,
    },
    Kernel {
        name: "6.12",
        meta_package: "linux-image-6.12-cloud-amd64",
        suite: None,
    },
    Kernel {
        name: "7.3",
        meta_package: "linux-image-cloud-amd64",
        suite: Some("trixie-backports"),
    },
];

/// A kernel unpacked on the host, ready to be booted.
pub struct Unpacked {
    /// `uname -r` of the kernel.
    pub release: String,
    pub vmlinuz: PathBuf,
    /// `lib/modules/RELEASE`, with `modules.dep`.
    pub modules: PathBuf,
}

/// The Debian mirror the extra suites come from.
const MIRROR: &str = "http://deb.debian.org/debian";
/// Prefixes of the packages that carry a kernel image or its modules; the
/// meta-package's other dependencies (firmware, initramfs tools) are not
/// needed in a VM.
const KERNEL_PACKAGE_PREFIXES: &[&str] = &["linux-image-", "linux-binary-", "linux-modules-"];

/// Fetches (or finds in the cache) and unpacks `kernel`.
pub fn fetch(kernel: &Kernel, vm_dir: &Path) -> anyhow::Result<Unpacked> {
    let apt = Apt::new(kernel.suite, vm_dir)?;
    let packages = apt.closure(kernel.meta_package)?;
    let debs_dir = vm_dir.join("debs");
    fs::create_dir_all(&debs_dir)?;

    // The meta-package's version names the build.
    let version = &packages[0].version;
    let root = vm_dir
        .join("kernels")
        .join(format!("{}_{version}", kernel.name));
    let complete = root.join(".complete");
    if !complete.exists() {
        step(&format!(
            "fetching kernel {} ({} {version})",
            kernel.name, kernel.meta_package
        ));
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(&root)?;
        for package in &packages {
            let deb = debs_dir.join(&package.file_name);
            if !deb.exists() {
                apt.download(package, &debs_dir)?;
            }
            cmd::run(Command::new("dpkg").arg("-x").arg(&deb).arg(&root))?;
        }
        // depmod reads BASE/lib/modules; newer packages put modules in usr/lib.
        if !root.join("lib").exists() {
            std::os::unix::fs::symlink("usr/lib", root.join("lib"))?;
        }
        let release = locate(&root)?.release;
        cmd::run(Command::new("depmod").arg("-b").arg(&root).arg(release))?;
        fs::write(&complete, "")?;
    }
    locate(&root)
}

/// Finds the image and the modules in an unpacked tree: `boot/vmlinuz-R` and
/// `lib/modules/R` in older packages, `usr/lib/modules/R/vmlinuz` in newer.
fn locate(root: &Path) -> anyhow::Result<Unpacked> {
    let modules_parent = ["usr/lib/modules", "lib/modules"]
        .iter()
        .map(|dir| root.join(dir))
        .find(|dir| dir.is_dir())
        .with_context(|| format!("no lib/modules in {}", root.display()))?;
    let release = fs::read_dir(&modules_parent)?
        .filter_map(Result::ok)
        .find(|entry| entry.path().join("kernel").is_dir())
        .with_context(|| format!("no kernel modules in {}", modules_parent.display()))?
        .file_name()
        .to_string_lossy()
        .into_owned();
    let modules = modules_parent.join(&release);
    let vmlinuz = [
        root.join("boot").join(format!("vmlinuz-{release}")),
        modules.join("vmlinuz"),
    ]
    .into_iter()
    .find(|path| path.is_file())
    .with_context(|| format!("no vmlinuz for {release} in {}", root.display()))?;
    Ok(Unpacked {
        release,
        vmlinuz,
        modules,
    })
}

/// One package as apt would download it.
pub(super) struct Package {
    pub(super) name: String,
    pub(super) version: String,
    /// The .deb's name in the archive, which names it in the cache.
    pub(super) file_name: String,
}

/// apt, with the host's configuration or a project-local one for a suite.
pub(super) struct Apt {
    options: Vec<String>,
}

impl Apt {
    pub(super) fn new(suite: Option<&str>, vm_dir: &Path) -> anyhow::Result<Self> {
        let Some(suite) = suite else {
            return Ok(Self { options: vec![] });
        };
        let dir = vm_dir.join("apt").join(suite);
        let parts = dir.join("sources.list.d");
        fs::create_dir_all(&parts)?;
        fs::create_dir_all(dir.join("lists/partial"))?;
        fs::create_dir_all(dir.join("cache/archives/partial"))?;
        let list = dir.join("sources.list");
        fs::write(&list, format!("deb {MIRROR} {suite} main\n"))?;
        let path = |p: &Path| p.display().to_string();
        let apt = Self {
            options: vec![
                format!("Dir::Etc::SourceList={}", path(&list)),
                format!("Dir::Etc::SourceParts={}", path(&parts)),
                format!("Dir::State::Lists={}", path(&dir.join("lists"))),
                format!("Dir::Cache={}", path(&dir.join("cache"))),
            ],
        };
        // A day-old index is fine: the meta-package moves rarely, and the
        // .debs it names stay cached.
        let release_file = fs::read_dir(dir.join("lists"))?
            .filter_map(Result::ok)
            .find(|entry| entry.file_name().to_string_lossy().ends_with("_InRelease"));
        let fresh = release_file
            .and_then(|entry| entry.metadata().ok()?.modified().ok())
            .and_then(|modified| modified.elapsed().ok())
            .is_some_and(|age| age.as_secs() < 24 * 3600);
        if !fresh {
            step(&format!("updating the package index of {suite}"));
            cmd::run(apt.command("apt-get").args(["update", "-q"]))?;
        }
        Ok(apt)
    }

    fn command(&self, program: &str) -> Command {
        let mut command = Command::new(program);
        // Ride out a mirror's or the resolver's brief failure: apt waits
        // longer before each retry.
        command.args(["-o", "Acquire::Retries=5"]);
        for option in &self.options {
            command.arg("-o").arg(option);
        }
        command
    }

    /// Downloads `package` into `dir` (apt-get download writes to its
    /// working directory, which `cmd::run` would set to the workspace).
    pub(super) fn download(&self, package: &Package, dir: &Path) -> anyhow::Result<()> {
        let spec = format!("{}={}", package.name, package.version);
        eprintln!("+ apt-get download {spec}");
        let status = self
            .command("apt-get")
            .current_dir(dir)
            // The _apt user may not write to the cache: download as ourselves.
            .args(["-o", "APT::Sandbox::User=root", "-q", "download"])
            .arg(&spec)
            .status()
            .context("running apt-get download")?;
        ensure!(status.success(), "apt-get download {spec} failed: {status}");
        Ok(())
    }

    /// `package` and the kernel packages it depends on, transitively, the
    /// first one being `package`.
    fn closure(&self, package: &str) -> anyhow::Result<Vec<Package>> {
        let mut seen = BTreeSet::new();
        let mut packages = Vec::new();
        let mut queue = vec![package.to_owned()];
        while let Some(name) = queue.pop() {
            if !seen.insert(name.clone()) {
                continue;
            }
            let (package, depends) = self.package_and_depends(&name)?;
            queue.extend(
                depends
                    .split(',')
                    .filter_map(|dep| dep.split(['|', '(']).next())
                    .map(str::trim)
                    .filter(|dep| KERNEL_PACKAGE_PREFIXES.iter().any(|p| dep.starts_with(p)))
                    .map(str::to_owned),
            );
            packages.push(package);
        }
        Ok(packages)
    }

    /// The candidate version of `package`.
    pub(super) fn package(&self, name: &str) -> anyhow::Result<Package> {
        Ok(self.package_and_depends(name)?.0)
    }

    /// The candidate version of `name`, and its `Depends` field.
    fn package_and_depends(&self, name: &str) -> anyhow::Result<(Package, String)> {
        let fields = self.show(name)?;
        let field = |key: &str| {
            fields
                .get(key)
                .cloned()
                .with_context(|| format!("apt shows no {key} for {name}"))
        };
        let filename = field("Filename")?;
        let package = Package {
            name: name.to_owned(),
            version: field("Version")?,
            file_name: filename.rsplit('/').next().unwrap_or(&filename).to_owned(),
        };
        Ok((package, fields.get("Depends").cloned().unwrap_or_default()))
    }

    /// The fields of the candidate version of `package`.
    fn show(&self, package: &str) -> anyhow::Result<HashMap<String, String>> {
        let text = output(
            self.command("apt-cache")
                .args(["show", "--no-all-versions"])
                .arg(package),
        )
        .with_context(|| format!("apt knows no package {package} (is the index current?)"))?;
        Ok(text
            .lines()
            .filter_map(|line| line.split_once(": "))
            .map(|(key, value)| (key.to_owned(), value.to_owned()))
            .collect())
    }
}
