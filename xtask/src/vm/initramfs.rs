//! The VM's root file system: busybox, iproute2's `ip`, the kernel modules
//! the tests need, the test binaries and the programs they run, with their
//! shared libraries, in an uncompressed cpio archive in the "newc" format
//! the kernel unpacks.

use std::{
    collections::{BTreeSet, HashMap},
    fs::{self, File},
    io::{BufWriter, Write},
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
    archive.finish().map(drop)
}

fn read(path: &Path) -> anyhow::Result<Vec<u8>> {
    fs::read(path).with_context(|| format!("reading {}", path.display()))
}

/// The modules to load, dependencies first, as `modules.dep` orders them.
fn load_order(modules: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let dep_file = modules.join("modules.dep");
    let dep =
        fs::read_to_string(&dep_file).with_context(|| format!("reading {}", dep_file.display()))?;
    let builtin = fs::read_to_string(modules.join("modules.builtin")).unwrap_or_default();
    Ok(order(&dep, &builtin, MODULES)?
        .into_iter()
        .map(|module| modules.join(module))
        .collect())
}

/// The paths (relative, as in `modules.dep`) of the `wanted` modules and
/// their dependencies, each once, dependencies first: a module's line lists
/// its dependencies, the last to be loaded first. A module built in is
/// skipped.
fn order<'a>(dep: &'a str, builtin: &str, wanted: &[&str]) -> anyhow::Result<Vec<&'a str>> {
    let deps: HashMap<&str, Vec<&str>> = dep
        .lines()
        .filter_map(|line| line.split_once(':'))
        .map(|(module, deps)| (module, deps.split_whitespace().collect()))
        .collect();
    let by_name: HashMap<String, &str> =
        deps.keys().map(|path| (module_name(path), *path)).collect();
    let builtin: BTreeSet<String> = builtin.lines().map(module_name).collect();

    let mut order = Vec::new();
    for wanted in wanted {
        let Some(path) = by_name.get(*wanted) else {
            if builtin.contains(*wanted) {
                continue;
            }
            bail!("the kernel has no module {wanted}, neither loadable nor built in");
        };
        for module in deps[path].iter().rev().chain([path]) {
            if !order.contains(module) {
                order.push(*module);
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
struct Newc<W: Write> {
    out: W,
    written: usize,
    next_inode: u32,
    dirs: BTreeSet<String>,
}

impl Newc<BufWriter<File>> {
    pub fn create(path: &Path) -> anyhow::Result<Self> {
        Ok(Self::new(BufWriter::new(File::create(path)?)))
    }
}

impl<W: Write> Newc<W> {
    pub fn new(out: W) -> Self {
        Self {
            out,
            written: 0,
            next_inode: 1,
            dirs: BTreeSet::new(),
        }
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

    /// Writes the trailer and flushes; returns the writer.
    pub fn finish(mut self) -> anyhow::Result<W> {
        self.entry("TRAILER!!!", 0, (0, 0), &[])?;
        self.out.flush()?;
        Ok(self.out)
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

#[cfg(test)]
mod tests {
    use super::*;

    /// As `depmod` writes it for 6.1: wireguard's dependencies, the last
    /// to be loaded first; tun is a dependency of another module too.
    const MODULES_DEP: &str = "\
kernel/drivers/net/wireguard/wireguard.ko: kernel/lib/crypto/libchacha20poly1305.ko kernel/arch/x86/crypto/chacha-x86_64.ko kernel/net/ipv4/udp_tunnel.ko kernel/lib/crypto/libchacha.ko
kernel/drivers/net/tun.ko:
kernel/drivers/net/veth.ko:
kernel/drivers/vhost/vhost_net.ko: kernel/drivers/net/tun.ko kernel/drivers/vhost/vhost.ko
kernel/lib/crypto/libchacha.ko:
kernel/net/ipv4/udp_tunnel.ko:
kernel/arch/x86/crypto/chacha-x86_64.ko: kernel/lib/crypto/libchacha.ko
kernel/lib/crypto/libchacha20poly1305.ko: kernel/arch/x86/crypto/chacha-x86_64.ko kernel/lib/crypto/libchacha.ko
kernel/net/sched/sch_ingress.ko.xz:
kernel/net/sched/cls_bpf.ko.xz:
";

    #[test]
    fn modules_load_after_their_dependencies_each_once() {
        let order = order(MODULES_DEP, "", MODULES).unwrap();
        assert_eq!(
            order,
            [
                "kernel/drivers/net/veth.ko",
                "kernel/drivers/net/tun.ko",
                "kernel/net/sched/sch_ingress.ko.xz",
                "kernel/net/sched/cls_bpf.ko.xz",
                "kernel/lib/crypto/libchacha.ko",
                "kernel/net/ipv4/udp_tunnel.ko",
                "kernel/arch/x86/crypto/chacha-x86_64.ko",
                "kernel/lib/crypto/libchacha20poly1305.ko",
                "kernel/drivers/net/wireguard/wireguard.ko",
            ]
        );
        // Every module after each of its dependencies.
        let deps: HashMap<&str, Vec<&str>> = MODULES_DEP
            .lines()
            .filter_map(|line| line.split_once(':'))
            .map(|(module, deps)| (module, deps.split_whitespace().collect()))
            .collect();
        for (at, module) in order.iter().enumerate() {
            for dep in &deps[module] {
                let dep_at = order.iter().position(|m| m == dep);
                assert!(dep_at.is_some_and(|d| d < at), "{dep} before {module}");
            }
        }
    }

    #[test]
    fn modules_built_in_are_skipped_and_missing_ones_refused() {
        let dep: String = MODULES_DEP
            .lines()
            .filter(|line| !line.contains("sch_ingress") && !line.contains("cls_bpf"))
            .map(|line| format!("{line}\n"))
            .collect();
        let builtin = "kernel/net/sched/sch_ingress.ko\nkernel/net/sched/cls_bpf.ko\n";
        let loaded = order(&dep, builtin, MODULES).unwrap();
        assert!(!loaded.iter().any(|m| m.contains("sch_ingress")));
        assert_eq!(loaded.len(), 7);

        let err = order(&dep, "kernel/net/sched/sch_ingress.ko\n", MODULES).unwrap_err();
        assert!(err.to_string().contains("no module cls_bpf"), "{err}");
    }

    #[test]
    fn load_order_reads_the_modules_folder() {
        let dir = std::env::temp_dir().join(format!("xtask-modules-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("modules.dep"), MODULES_DEP).unwrap();
        let order = load_order(&dir);
        fs::remove_dir_all(&dir).unwrap();
        let order = order.unwrap();
        assert_eq!(order[0], dir.join("kernel/drivers/net/veth.ko"));
        assert_eq!(order.len(), 9);
    }

    /// One entry of a newc archive, read back by the format's rules.
    #[derive(Debug)]
    struct Entry {
        name: String,
        inode: u32,
        mode: u32,
        nlink: u32,
        rdev: (u32, u32),
        data: Vec<u8>,
    }

    /// Reads a newc archive: a header of "070701" and 13 fields of 8 hex
    /// digits, the name and its NUL, padding to 4 bytes, the data, padding
    /// to 4 bytes; up to and with the trailer, which must end the archive.
    fn read_newc(archive: &[u8]) -> Vec<Entry> {
        let pad = |at: usize| at.next_multiple_of(4);
        let mut entries = Vec::new();
        let mut at = 0;
        loop {
            assert_eq!(at % 4, 0, "a header at {at}, not 4-byte aligned");
            assert_eq!(&archive[at..at + 6], b"070701", "magic at {at}");
            let field = |index: usize| {
                let start = at + 6 + index * 8;
                let hex = std::str::from_utf8(&archive[start..start + 8]).unwrap();
                u32::from_str_radix(hex, 16).unwrap()
            };
            let (size, name_size) = (field(6) as usize, field(11) as usize);
            let name_at = at + 110;
            assert_eq!(archive[name_at + name_size - 1], 0, "a NUL ends the name");
            let name = std::str::from_utf8(&archive[name_at..name_at + name_size - 1]).unwrap();
            let data_at = pad(name_at + name_size);
            assert!(
                archive[name_at + name_size..data_at]
                    .iter()
                    .all(|&b| b == 0),
                "padding is zeros"
            );
            entries.push(Entry {
                name: name.to_owned(),
                inode: field(0),
                mode: field(1),
                nlink: field(4),
                rdev: (field(9), field(10)),
                data: archive[data_at..data_at + size].to_vec(),
            });
            at = pad(data_at + size);
            if name == "TRAILER!!!" {
                assert_eq!(at, archive.len(), "nothing after the trailer");
                return entries;
            }
        }
    }

    #[test]
    fn newc_archive_reads_back() {
        let mut archive = Newc::new(Vec::new());
        // Sizes 5 and 7 and names of every length modulo 4 exercise the
        // padding.
        archive.file("/vm/tests/verdicts", 0o755, b"hello").unwrap();
        archive.dir("proc").unwrap();
        archive.dir("vm").unwrap();
        archive.symlink("bin/sh", "busybox").unwrap();
        archive.char_device("dev/console", 5, 1).unwrap();
        archive.file("vm/env", 0o644, b"PATH=/\n").unwrap();
        let bytes = archive.finish().unwrap();
        assert_eq!(bytes.len() % 4, 0);

        let entries = read_newc(&bytes);
        let listed: Vec<(&str, u32, &[u8])> = entries
            .iter()
            .map(|e| (e.name.as_str(), e.mode, e.data.as_slice()))
            .collect();
        assert_eq!(
            listed,
            [
                ("vm", 0o040_755, &b""[..]),
                ("vm/tests", 0o040_755, b""),
                ("vm/tests/verdicts", 0o100_755, b"hello"),
                ("proc", 0o040_755, b""),
                ("bin", 0o040_755, b""),
                ("bin/sh", 0o120_777, b"busybox"),
                ("dev", 0o040_755, b""),
                ("dev/console", 0o020_600, b""),
                ("vm/env", 0o100_644, b"PATH=/\n"),
                ("TRAILER!!!", 0, b""),
            ]
        );
        let console = &entries[7];
        assert_eq!(console.rdev, (5, 1));
        for entry in &entries[..entries.len() - 1] {
            let is_dir = entry.mode & 0o170_000 == S_IFDIR;
            assert_eq!(entry.nlink, if is_dir { 2 } else { 1 }, "{}", entry.name);
        }
        let inodes: BTreeSet<u32> = entries.iter().map(|e| e.inode).collect();
        assert_eq!(inodes.len(), entries.len(), "every entry its own inode");
    }
}
