//! `cargo xtask vm`: the kernel-facing test suites on each supported Debian
//! kernel, in QEMU VMs booted from an initramfs with the test binaries.

mod initramfs;
mod kernels;
mod qemu;
mod tools;

use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{
    cmd::{step, workspace_root},
    setup,
};
use initramfs::Suite;
pub use kernels::{KERNELS, Kernel};
use qemu::{Accelerator, Report};

/// A test binary that runs in every VM.
struct SuiteSpec {
    package: &'static str,
    /// The test target, which names the suite.
    test: &'static str,
    /// Only the tests whose names contain one of these; all if empty.
    only: &'static [&'static str],
}

impl SuiteSpec {
    const fn all(package: &'static str, test: &'static str) -> Self {
        Self {
            package,
            test,
            only: &[],
        }
    }
}

/// The test binaries that run in every VM: those of mesh-tests that need a
/// kernel (the others are the same on any kernel), and the tests of
/// mesh-agent that drive the agent itself against what only a VM has here:
/// kernel WireGuard, and a cgroup v2 of its own for process bindings.
const SUITES: &[SuiteSpec] = &[
    SuiteSpec::all("mesh-tests", "verdicts"),
    SuiteSpec::all("mesh-tests", "differential"),
    SuiteSpec::all("mesh-tests", "xdp_slice"),
    SuiteSpec::all("mesh-tests", "traffic"),
    SuiteSpec::all("mesh-tests", "pinning"),
    SuiteSpec::all("mesh-tests", "l3"),
    // The others need boringtun or etcd, and a node-mesh test loads the
    // datapath twice: the kernel WireGuard test covers the node mesh here.
    SuiteSpec {
        package: "mesh-agent",
        test: "node_mesh",
        only: &["kernel_wireguard"],
    },
    // One agent and two bound processes prove the socket hooks; the other
    // tests' sub-second deadlines are for the host.
    SuiteSpec {
        package: "mesh-agent",
        test: "bindings",
        only: &["bound_processes_reach_their_grants"],
    },
];
/// Differential cases per VM: enough to cross every rule on every kernel,
/// few enough for TCG (the host runs the full count).
const DIFFERENTIAL_CASES: u32 = 200;
/// Twice a VM's run time under TCG on a core of its own; loading the
/// programs (the verifier) dominates it.
const VM_TIMEOUT: Duration = Duration::from_secs(600);

#[derive(clap::Args)]
pub struct Options {
    /// The kernel to boot: 6.1, 6.12, 7.3, or all.
    #[arg(long, default_value = "all")]
    kernel: String,
    /// Passed to every test binary to select tests.
    #[arg(last = true)]
    filter: Vec<String>,
}

/// Sets up first, as `test` and `demo` do: building the test binaries needs
/// bpf-linker, and the VMs need qemu, busybox-static, kmod and xz-utils.
pub fn run(options: &Options) -> anyhow::Result<()> {
    let kernels: Vec<Kernel> = match options.kernel.as_str() {
        "all" => KERNELS.to_vec(),
        name => vec![*KERNELS.iter().find(|k| k.name == name).with_context(|| {
            let names: Vec<_> = KERNELS.iter().map(|k| k.name).collect();
            format!(
                "no kernel {name}: choose one of {} or all",
                names.join(", ")
            )
        })?],
    };
    setup::run()?;
    matrix(&kernels, &options.filter)
}

/// Boots a VM per kernel, prints a table kernel × suite, and fails if
/// anything failed, after saying what and where. `cargo xtask test` runs
/// `matrix(KERNELS, &[])`.
pub fn matrix(kernels: &[Kernel], filter: &[String]) -> anyhow::Result<()> {
    let vm_dir = target_dir().join("vm");
    let built = build_suites()?;
    let suites = select(built.suites, filter)?;
    // The tests run the agent by the absolute path cargo compiled in, which
    // must not be under a folder the VM mounts over.
    let hidden = ["/tmp", "/run", "/proc", "/sys", "/dev"];
    if let Some(dir) = hidden.iter().find(|dir| built.agent.starts_with(dir)) {
        bail!(
            "the VMs mount over {dir}, which would hide {}: use a target folder elsewhere",
            built.agent.display()
        );
    }
    let programs = vec![
        initramfs::Program {
            at: built.agent.display().to_string(),
            binary: built.agent.clone(),
        },
        initramfs::Program {
            at: "/usr/bin/wg".to_owned(),
            binary: tools::wg(&vm_dir)?,
        },
    ];
    let mut results: Vec<(Kernel, anyhow::Result<Report>, Duration)> = Vec::new();
    let mut vms = Vec::new();
    for kernel in kernels {
        match prepare(kernel, &vm_dir, &suites, &programs) {
            Ok(vm) => vms.push((*kernel, vm)),
            Err(err) => results.push((*kernel, Err(err), Duration::ZERO)),
        }
    }
    // All VMs at once: under TCG each keeps a core busy, so more VMs than
    // cores share them, which the timeout allows for.
    let accelerator = Accelerator::detect();
    let cores = thread::available_parallelism().map_or(1, usize::from);
    let timeout = VM_TIMEOUT * u32::try_from(vms.len().div_ceil(cores))?;
    thread::scope(|scope| {
        let running: Vec<_> = vms
            .iter()
            .map(|(kernel, vm)| {
                scope.spawn(move || {
                    let started = Instant::now();
                    (*kernel, vm.boot(accelerator, timeout), started.elapsed())
                })
            })
            .collect();
        results.extend(
            running
                .into_iter()
                .map(|vm| vm.join().expect("a VM's thread panicked")),
        );
    });
    results.sort_by_key(|(kernel, ..)| kernels.iter().position(|k| k == kernel));

    let failures = print_table(&results);
    if failures.is_empty() {
        return Ok(());
    }
    for failure in &failures {
        eprintln!("\n---- {failure}");
    }
    bail!("{} failure(s) in the VM matrix", failures.len())
}

/// Prints the table of `results`; returns what failed, with the details.
fn print_table(results: &[(Kernel, anyhow::Result<Report>, Duration)]) -> Vec<String> {
    let mut failures = Vec::new();
    println!();
    row([
        "kernel", "release", "suite", "passed", "failed", "time", "result",
    ]);
    for (kernel, result, elapsed) in results {
        let elapsed = format!("{:.1}s", elapsed.as_secs_f64());
        let report = match result {
            Ok(report) => report,
            Err(err) => {
                row([kernel.name, "-", "-", "-", "-", &elapsed, "error"]);
                failures.push(format!("kernel {}: {err:#}", kernel.name));
                continue;
            }
        };
        for suite in &report.suites {
            let result = match suite.status {
                None => "did not finish",
                Some(_) if suite.ok() => "ok",
                Some(_) => "FAILED",
            };
            row([
                kernel.name,
                &report.release,
                &suite.name,
                &suite.passed.to_string(),
                &suite.failed.len().to_string(),
                &format!("{:.1}s", suite.seconds),
                result,
            ]);
            if !suite.ok() {
                failures.push(format!(
                    "kernel {} ({}), suite {}, failed tests: {}\n{}",
                    kernel.name,
                    report.release,
                    suite.name,
                    suite.failed.join(", "),
                    suite.output.trim_end()
                ));
            }
        }
        let complete = if report.done { "ok" } else { "incomplete" };
        row([
            kernel.name,
            &report.release,
            "(whole vm)",
            "",
            "",
            &elapsed,
            complete,
        ]);
        if !report.module_failures.is_empty() {
            failures.push(format!(
                "kernel {}: modules failed to load: {}",
                kernel.name,
                report.module_failures.join(", ")
            ));
        }
        if !report.done {
            failures.push(format!(
                "kernel {}: the VM stopped before all suites ran",
                kernel.name
            ));
        }
    }
    failures
}

fn row([kernel, release, suite, passed, failed, time, result]: [&str; 7]) {
    println!("{kernel:<7} {release:<27} {suite:<12} {passed:>6} {failed:>6} {time:>8}  {result}");
}

/// A kernel and the initramfs to boot it with.
struct Vm {
    kernel: kernels::Unpacked,
    initrd: PathBuf,
    console: PathBuf,
}

/// Fetches the kernel and builds its initramfs.
fn prepare(
    kernel: &Kernel,
    vm_dir: &Path,
    suites: &[Suite],
    programs: &[initramfs::Program],
) -> anyhow::Result<Vm> {
    let unpacked = kernels::fetch(kernel, vm_dir)?;
    let run_dir = vm_dir.join("run").join(kernel.name);
    fs::create_dir_all(&run_dir)?;
    let initrd = run_dir.join("initramfs.cpio");
    initramfs::build(&initrd, &unpacked.modules, suites, programs)?;
    Ok(Vm {
        kernel: unpacked,
        initrd,
        console: run_dir.join("console.log"),
    })
}

impl Vm {
    fn boot(&self, accelerator: Accelerator, timeout: Duration) -> anyhow::Result<Report> {
        step(&format!(
            "booting {}; console in {}",
            self.kernel.release,
            self.console.display()
        ));
        let console = qemu::boot(
            accelerator,
            &self.kernel.vmlinuz,
            &self.initrd,
            &self.console,
            timeout,
        )?;
        Ok(qemu::parse(&console))
    }
}

/// The test binaries cargo built, and the agent they run.
struct Built {
    suites: Vec<(&'static SuiteSpec, PathBuf)>,
    agent: PathBuf,
}

/// Builds the suites' test binaries and returns where cargo put them.
fn build_suites() -> anyhow::Result<Built> {
    step("building the test binaries for the VMs");
    let mut cargo = Command::new("cargo");
    cargo
        .current_dir(workspace_root())
        .args(["test", "--no-run"])
        .args(["--message-format", "json-render-diagnostics"]);
    let packages: BTreeSet<&str> = SUITES.iter().map(|suite| suite.package).collect();
    for package in packages {
        cargo.args(["--package", package]);
    }
    for suite in SUITES {
        cargo.args(["--test", suite.test]);
    }
    let out = cargo.output().context("running cargo test --no-run")?;
    if !out.status.success() {
        bail!(
            "building the test binaries failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut suites = Vec::new();
    let mut agent = None;
    let artifacts = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|message| message["reason"] == "compiler-artifact")
        .collect::<Vec<_>>();
    for message in &artifacts {
        let (Some(name), Some(executable)) = (
            message["target"]["name"].as_str(),
            message["executable"].as_str(),
        ) else {
            continue;
        };
        let kind = &message["target"]["kind"][0];
        // The binary itself, not its unit tests.
        if kind == "bin" && name == "mesh-agent" && message["profile"]["test"] == false {
            agent = Some(PathBuf::from(executable));
        } else if kind == "test"
            && let Some(spec) = SUITES.iter().find(|suite| suite.test == name)
        {
            suites.push((spec, PathBuf::from(executable)));
        }
    }
    if suites.len() != SUITES.len() {
        bail!(
            "cargo built {} of the {} test binaries",
            suites.len(),
            SUITES.len()
        );
    }
    let agent = agent.context("cargo built no mesh-agent for the tests")?;
    Ok(Built { suites, agent })
}

/// The suites with the arguments each runs with: the libtest `filter` as
/// given, or, for a suite that runs only some of its tests, the names of
/// those its filter words select too (listed on the host), exactly, and the
/// filter's options. A suite left with no test is dropped.
fn select(
    built: Vec<(&'static SuiteSpec, PathBuf)>,
    filter: &[String],
) -> anyhow::Result<Vec<Suite>> {
    // Options, with the value of those that take one, and filter words.
    let mut options = Vec::new();
    let mut words = Vec::new();
    let mut args = filter.iter();
    while let Some(arg) = args.next() {
        if arg.starts_with('-') {
            options.push(arg.clone());
            if ["--skip", "--format", "--color", "--test-threads"].contains(&arg.as_str()) {
                options.extend(args.next().cloned());
            }
        } else {
            words.push(arg.as_str());
        }
    }
    let mut suites = Vec::new();
    for (spec, binary) in built {
        let args = if spec.only.is_empty() {
            filter.to_vec()
        } else {
            let listed = Command::new(&binary)
                .args(["--list", "--format", "terse"])
                .output()
                .with_context(|| format!("listing the tests of {}", spec.test))?;
            if !listed.status.success() {
                bail!("{} --list failed: {}", binary.display(), listed.status);
            }
            let names: Vec<String> = String::from_utf8_lossy(&listed.stdout)
                .lines()
                .filter_map(|line| line.strip_suffix(": test"))
                .filter(|name| spec.only.iter().any(|only| name.contains(only)))
                .filter(|name| words.is_empty() || words.iter().any(|word| name.contains(word)))
                .map(str::to_owned)
                .collect();
            if names.is_empty() {
                continue;
            }
            let exact = ["--exact".to_owned()].into_iter().chain(names);
            options.iter().cloned().chain(exact).collect()
        };
        suites.push(Suite {
            name: spec.test.to_owned(),
            binary,
            args,
        });
    }
    Ok(suites)
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_reports_each_failure_with_its_kernel_and_what_it_said() {
        let console = "\
MESH-VM kernel 6.1.0-56-cloud-amd64
MESH-VM module-failed 03-cls_bpf.ko
MESH-VM suite-begin verdicts
test granted_flows ... ok
test denied_flows ... FAILED
Verifier output: R1 invalid mem access 'scalar'
MESH-VM suite-end verdicts 101 1.0 2.0
MESH-VM suite-begin traffic
";
        let results = [
            (KERNELS[0], Ok(qemu::parse(console)), Duration::ZERO),
            (
                KERNELS[1],
                Err(anyhow::anyhow!("the kernel panicked")),
                Duration::ZERO,
            ),
        ];
        let failures = print_table(&results);
        assert_eq!(failures.len(), 5, "{failures:#?}");
        let verdicts = &failures[0];
        for said in [
            "kernel 6.1 (6.1.0-56-cloud-amd64)",
            "suite verdicts",
            "failed tests: denied_flows",
            "R1 invalid mem access 'scalar'",
        ] {
            assert!(verdicts.contains(said), "{said} in {verdicts}");
        }
        assert!(failures[1].contains("suite traffic"), "{}", failures[1]);
        assert!(failures[2].contains("03-cls_bpf.ko"), "{}", failures[2]);
        assert!(failures[3].contains("stopped before all suites ran"));
        assert_eq!(failures[4], "kernel 6.12: the kernel panicked");
    }

    #[test]
    fn a_clean_run_reports_no_failure() {
        let console = "\
MESH-VM kernel 7.3.4-cloud-amd64
MESH-VM suite-begin l3
test l3_program_on_tun ... ok
MESH-VM suite-end l3 0 1.0 2.0
MESH-VM done
";
        let results = [(KERNELS[2], Ok(qemu::parse(console)), Duration::ZERO)];
        assert!(print_table(&results).is_empty());
    }
}
