//! The VM's root file system: busybox, iproute2's `ip`, the kernel modules
//! the tests need, the test binaries and the programs they run, with their
//! shared libraries, in an uncompressed cpio archive in the "newc" format
//! the kernel unpacks.

use std::{
    collections::{BTreeSet, HashMap},
    fs::{self, File},
    io::{BufWriter, Write as _},
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::cmd::{self, output};

/// Modules the suites need, loaded with their dependencies. Everything else
/// they use (BPF, BTF, XDP, tcx, cgroups) is built into Debian's kernels.
const MODULES: &[&str] = &["veth", "tun", "sch_ingress", "cls_bpf", "wireguard"];
/// Called by path: busybox's `ip` lacks `netns` and `-d`.
const IP: &str = "/usr/sbin/ip";
const BUSYBOX: &str = "/usr/bin/busybox";
const INIT: &str = include_str!("init.sh");

/// A compiled test binary, the suite name it runs under and its libtest
/// arguments.
pub struct Suite {
    pub name: String,
    pub binary: PathBuf,
    pub args: Vec<String>,
}

/// A program the tests run, and where in the VM they expect it.
pub struct Program {
    pub at: String,
    pub binary: PathBuf,
}

/// Writes the initramfs for a kernel whose modules are in `modules` (with
/// `modules.dep`), running `suites` and holding `programs`.
pub fn build(
    path: &Path,
    modules: &Path,
    suites: &[Suite],
    programs: &[Program],
) -> anyhow::Result<()> {
    let mut archive = Newc::create(path)?;
    archive.file("init", 0o755, INIT.as_bytes())?;
    for dir in ["proc", "sys", "dev", "tmp", "run"] {
        archive.dir(dir)?;
    }
    // The kernel opens the console for init before devtmpfs is mounted.
    archive.char_device("dev/console", 5, 1)?;

    archive.file("bin/busybox", 0o755, &read(Path::new(BUSYBOX))?)?;
    let applets = output(Command::new(BUSYBOX).arg("--list")).context("busybox --list")?;
    // Linking busybox onto itself makes the boot fail with ELOOP.
    for applet in applets.lines().filter(|a| !["busybox", "ip"].contains(a)) {
        archive.symlink(&format!("bin/{applet}"), "busybox")?;
    }

    for (index, module) in load_order(modules)?.iter().enumerate() {
        let name = module
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.split('.').next())
            .context("module without a name")?;
        archive.file(
            &format!("vm/modules/{index:02}-{name}.ko"),
            0o644,
            &decompressed(module)?,
        )?;
    }

    let mut binaries = vec![PathBuf::from(IP)];
    archive.file(IP, 0o755, &read(Path::new(IP))?)?;
    let stripped_dir = path.with_file_name("stripped");
    fs::create_dir_all(&stripped_dir)?;
    // Debug info makes a test binary ten times larger, and all of it would
    // sit in the VM's memory.
    let stripped = |name: &str, binary: &Path| -> anyhow::Result<Vec<u8>> {
        let stripped = stripped_dir.join(name);
        cmd::run(
            Command::new("strip")
                .arg("--strip-debug")
                .arg("-o")
                .arg(&stripped)
                .arg(binary),
        )?;
        read(&stripped)
    };
    for suite in suites {
        let binary = stripped(&suite.name, &suite.binary)?;
        archive.file(&format!("vm/tests/{}", suite.name), 0o755, &binary)?;
        let args: Vec<String> = suite.args.iter().map(|arg| shell_quote(arg)).collect();
        let args = format!("set -- {}\n", args.join(" "));
        archive.file(&format!("vm/args/{}", suite.name), 0o644, args.as_bytes())?;
        binaries.push(suite.binary.clone());
    }
    for program in programs {
        let name = program
            .binary
            .file_name()
            .context("a program without a name")?;
        let binary = stripped(&name.to_string_lossy(), &program.binary)?;
        archive.file(&program.at, 0o755, &binary)?;
        binaries.push(program.binary.clone());
    }

    let libraries = shared_libraries(&binaries)?;
    let library_dirs: BTreeSet<_> = libraries
        .iter()
        .filter_map(|lib| lib.parent())
        .map(|dir| dir.display().to_string())
        .collect();
    for library in &libraries {
        archive.file(&library.display().to_string(), 0o755, &read(library)?)?;
    }
    let library_path = library_dirs.into_iter().collect::<Vec<_>>().join(":");
    // MESH_KERNEL_WIREGUARD: the kernel WireGuard tests fail where they
    // would skip on a host without it.
    let env = format!(
        "export PATH=/usr/sbin:/usr/bin:/bin LD_LIBRARY_PATH={} MESH_DIFF_CASES={} \
         MESH_KERNEL_WIREGUARD=required\n",
        shell_quote(&library_path),
        super::DIFFERENTIAL_CASES,
    );
    archive.file("vm/env", 0o644, env.as_bytes())?;
    archive.finish()
}

fn read(path: &Path) -> anyhow::Result<Vec<u8>> {
    fs::read(path).with_context(|| format!("reading {}", path.display()))
}

/// The modules to load, dependencies first, as `modules.dep` orders them:
/// a module's line lists its dependencies, the last to be loaded first.
fn load_order(modules: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let dep_file = modules.join("modules.dep");
    let text =
        fs::read_to_string(&dep_file).with_context(|| format!("reading {}", dep_file.display()))?;
    let deps: HashMap<&str, Vec<&str>> = text
        .lines()
        .filter_map(|line| line.split_once(':'))
        .map(|(module, deps)| (module, deps.split_whitespace().collect()))
        .collect();
    let by_name: HashMap<String, &str> =
        deps.keys().map(|path| (module_name(path), *path)).collect();
    let builtin = fs::read_to_string(modules.join("modules.builtin")).unwrap_or_default();
    let builtin: BTreeSet<String> = builtin.lines().map(module_name).collect();

    let mut order = Vec::new();
    for wanted in MODULES {
        let Some(path) = by_name.get(*wanted) else {
            if builtin.contains(*wanted) {
                continue;
            }
            bail!("the kernel has no module {wanted}, neither loadable nor built in");
        };
        for module in deps[path].iter().rev().chain([path]) {
            let module = modules.join(module);
            if !order.contains(&module) {
                order.push(module);
            }
        }
    }
    Ok(order)
}

/// `kernel/net/sched/sch_ingress.ko.xz` → `sch_ingress`.
fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    file.split('.').next().unwrap_or(file).replace('-', "_")
}

/// busybox's insmod loads plain .ko files only.
fn decompressed(module: &Path) -> anyhow::Result<Vec<u8>> {
    match module.extension().and_then(|e| e.to_str()) {
        Some("ko") => read(module),
        Some("xz") => {
            let out = Command::new("xz")
                .arg("-dc")
                .arg(module)
                .output()
                .context("running xz")?;
            if !out.status.success() {
                bail!("xz -dc {} failed: {}", module.display(), out.status);
            }
            Ok(out.stdout)
        }
        _ => bail!("unknown module compression: {}", module.display()),
    }
}

/// The shared libraries of `binaries`, and the dynamic loader, per `ldd`.
fn shared_libraries(binaries: &[PathBuf]) -> anyhow::Result<BTreeSet<PathBuf>> {
    let mut libraries = BTreeSet::new();
    for binary in binaries {
        let text = output(Command::new("ldd").arg(binary))
            .with_context(|| format!("ldd {}", binary.display()))?;
        libraries.extend(text.lines().filter_map(|line| {
            let path = match line.split_once("=>") {
                Some((_, resolved)) => resolved,
                None => line,
            };
            let path = path.split_whitespace().next()?;
            path.starts_with('/').then(|| PathBuf::from(path))
        }));
    }
    Ok(libraries)
}

fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', "'\\''"))
}

const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFCHR: u32 = 0o020_000;

/// Writes a newc archive; parent folders are added as needed.
struct Newc {
    out: BufWriter<File>,
    written: usize,
    next_inode: u32,
    dirs: BTreeSet<String>,
}

impl Newc {
    pub fn create(path: &Path) -> anyhow::Result<Self> {
        Ok(Self {
            out: BufWriter::new(File::create(path)?),
            written: 0,
            next_inode: 1,
            dirs: BTreeSet::new(),
        })
    }

    pub fn dir(&mut self, path: &str) -> anyhow::Result<()> {
        let path = path.trim_matches('/');
        if path.is_empty() || self.dirs.contains(path) {
            return Ok(());
        }
        self.parents(path)?;
        self.dirs.insert(path.to_owned());
        self.entry(path, S_IFDIR | 0o755, (0, 0), &[])
    }

    pub fn file(&mut self, path: &str, mode: u32, data: &[u8]) -> anyhow::Result<()> {
        self.parents(path)?;
        self.entry(path, S_IFREG | mode, (0, 0), data)
    }

    pub fn symlink(&mut self, path: &str, target: &str) -> anyhow::Result<()> {
        self.parents(path)?;
        self.entry(path, S_IFLNK | 0o777, (0, 0), target.as_bytes())
    }

    pub fn char_device(&mut self, path: &str, major: u32, minor: u32) -> anyhow::Result<()> {
        self.parents(path)?;
        self.entry(path, S_IFCHR | 0o600, (major, minor), &[])
    }

    /// Writes the trailer and flushes.
    pub fn finish(mut self) -> anyhow::Result<()> {
        self.entry("TRAILER!!!", 0, (0, 0), &[])?;
        self.out.flush()?;
        Ok(())
    }

    fn parents(&mut self, path: &str) -> anyhow::Result<()> {
        match path.trim_matches('/').rsplit_once('/') {
            Some((parent, _)) => self.dir(parent),
            None => Ok(()),
        }
    }

    fn entry(
        &mut self,
        path: &str,
        mode: u32,
        (rdev_major, rdev_minor): (u32, u32),
        data: &[u8],
    ) -> anyhow::Result<()> {
        let name = path.trim_start_matches('/');
        let inode = self.next_inode;
        self.next_inode += 1;
        let nlink = if mode & 0o170_000 == S_IFDIR { 2 } else { 1 };
        // ino mode uid gid nlink mtime filesize devmajor devminor rdevmajor
        // rdevminor namesize check, each as 8 hex digits.
        let fields = [
            inode,
            mode,
            0,
            0,
            nlink,
            0,
            u32::try_from(data.len())?,
            0,
            0,
            rdev_major,
            rdev_minor,
            u32::try_from(name.len() + 1)?,
            0,
        ];
        let mut header = String::from("070701");
        for field in fields {
            header.push_str(&format!("{field:08x}"));
        }
        self.write(header.as_bytes())?;
        self.write(name.as_bytes())?;
        self.write(&[0])?;
        self.pad()?;
        self.write(data)?;
        self.pad()
    }

    fn write(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        self.out.write_all(bytes)?;
        self.written += bytes.len();
        Ok(())
    }

    /// Headers and file data start on 4-byte boundaries.
    fn pad(&mut self) -> anyhow::Result<()> {
        let padding = (4 - self.written % 4) % 4;
        self.write(&[0; 3][..padding])
    }
}
