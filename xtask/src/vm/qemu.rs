//! Booting a VM and reading what its init reported on the serial console.

use std::{
    fs::{self, OpenOptions},
    path::Path,
    process::{Command, ExitStatus, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

/// Marker lines written by init.sh start with this.
const MARKER: &str = "MESH-VM ";
const PANIC: &str = "Kernel panic - not syncing";

/// Boots `vmlinuz` with `initrd` under `accelerator` until it powers off,
/// writing the serial console to `log`; returns the console's text.
pub fn boot(
    accelerator: Accelerator,
    vmlinuz: &Path,
    initrd: &Path,
    log: &Path,
    timeout: Duration,
) -> anyhow::Result<String> {
    let mut qemu = Command::new("qemu-system-x86_64");
    qemu.args(accelerator.args())
        .args([
            "-m", "1024", "-smp", "1", "-display", "none", "-monitor", "none",
        ])
        .args(["-no-reboot", "-nodefaults", "-serial"])
        .arg(format!("file:{}", log.display()))
        .arg("-kernel")
        .arg(vmlinuz)
        .arg("-initrd")
        .arg(initrd)
        // panic=-1 reboots at once on a panic, and -no-reboot turns that
        // into an exit: a panicking kernel never waits for the timeout.
        .args(["-append", "console=ttyS0 quiet loglevel=3 panic=-1"])
        .stdin(Stdio::null());
    let mut child = qemu.spawn().context("starting qemu-system-x86_64")?;
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break Some(status);
        }
        if started.elapsed() > timeout {
            child.kill()?;
            child.wait()?;
            break None;
        }
        thread::sleep(Duration::from_millis(100));
    };
    let console = fs::read(log).with_context(|| format!("reading {}", log.display()))?;
    judge(
        status,
        String::from_utf8_lossy(&console).into_owned(),
        timeout,
    )
}

/// The console of a VM that exited with `status` (`None`: killed at the
/// timeout), or why the VM failed as a whole, with the console's last lines.
fn judge(status: Option<ExitStatus>, console: String, timeout: Duration) -> anyhow::Result<String> {
    match status {
        None => bail!(
            "timed out after {timeout:?}; the console said:\n{}",
            tail(&console)
        ),
        Some(status) if !status.success() => {
            bail!(
                "qemu failed ({status}); the console said:\n{}",
                tail(&console)
            )
        }
        Some(_) if console.contains(PANIC) => {
            bail!("the kernel panicked:\n{}", tail(&console))
        }
        Some(_) => Ok(console),
    }
}

/// How QEMU runs the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accelerator {
    Kvm,
    Tcg,
}

impl Accelerator {
    /// KVM where this process can use it and it runs stock kernels (a
    /// nested paravirtual KVM, kvm_pvm, cannot), else TCG, saying why in
    /// one line: a /dev/kvm that exists may still be closed to this user.
    pub fn detect() -> Self {
        if Path::new("/sys/module/kvm_pvm").exists() {
            eprintln!("kvm_pvm cannot run stock kernels: the VMs run under TCG");
            return Self::Tcg;
        }
        match OpenOptions::new().read(true).write(true).open("/dev/kvm") {
            Ok(_) => Self::Kvm,
            Err(err) => {
                eprintln!("cannot open /dev/kvm ({err}): the VMs run under TCG");
                Self::Tcg
            }
        }
    }

    fn args(self) -> [&'static str; 4] {
        match self {
            Self::Kvm => ["-accel", "kvm", "-cpu", "host"],
            Self::Tcg => ["-accel", "tcg", "-cpu", "max"],
        }
    }
}

fn tail(console: &str) -> String {
    let lines: Vec<&str> = console.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// What one suite reported.
#[derive(Debug)]
pub struct SuiteRun {
    pub name: String,
    pub passed: usize,
    pub failed: Vec<String>,
    /// The binary's exit status; `None` if it never finished.
    pub status: Option<i32>,
    pub seconds: f64,
    /// Everything the suite printed, for the report of a failure.
    pub output: String,
}

impl SuiteRun {
    pub fn ok(&self) -> bool {
        self.status == Some(0) && self.failed.is_empty()
    }
}

/// What a VM reported: its kernel release, modules that failed to load and
/// one entry per suite.
#[derive(Debug, Default)]
pub struct Report {
    pub release: String,
    pub module_failures: Vec<String>,
    pub suites: Vec<SuiteRun>,
    pub done: bool,
}

/// Parses init.sh's markers and the libtest lines between them. Kernel
/// messages may interleave; they are kept in a suite's output.
pub fn parse(console: &str) -> Report {
    let mut report = Report::default();
    for line in console.lines() {
        let line = line.trim_end_matches('\r');
        if let Some(marker) = line.strip_prefix(MARKER) {
            let words: Vec<&str> = marker.split_whitespace().collect();
            match words.as_slice() {
                ["kernel", release] => report.release = (*release).to_owned(),
                ["module-failed", module] => report.module_failures.push((*module).to_owned()),
                ["suite-begin", name] => report.suites.push(SuiteRun {
                    name: (*name).to_owned(),
                    passed: 0,
                    failed: vec![],
                    status: None,
                    seconds: 0.0,
                    output: String::new(),
                }),
                ["suite-end", _, status, start, end] => {
                    if let Some(suite) = report.suites.last_mut() {
                        suite.status = status.parse().ok();
                        suite.seconds =
                            end.parse::<f64>().unwrap_or(0.0) - start.parse::<f64>().unwrap_or(0.0);
                    }
                }
                ["done"] => report.done = true,
                _ => {}
            }
            continue;
        }
        let Some(suite) = report.suites.last_mut().filter(|s| s.status.is_none()) else {
            continue;
        };
        suite.output.push_str(line);
        suite.output.push('\n');
        if let Some((test, result)) = line
            .strip_prefix("test ")
            .and_then(|rest| rest.rsplit_once(" ... "))
        {
            match result {
                "ok" => suite.passed += 1,
                "FAILED" => suite.failed.push(test.to_owned()),
                _ => {}
            }
        }
    }
    report
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::ExitStatusExt as _;

    use super::*;

    /// A console as the serial port writes it: CRLF line ends, kernel
    /// messages between the suites' lines.
    fn console(lines: &[&str]) -> String {
        lines.iter().map(|line| format!("{line}\r\n")).collect()
    }

    const PASSING: &[&str] = &[
        "MESH-VM kernel 6.1.0-56-cloud-amd64",
        "MESH-VM suite-begin verdicts",
        "running 2 tests",
        "test granted_flows ... ok",
        "[   12.345678] random: crng init done",
        "test denied_flows ... ok",
        "test result: ok. 2 passed; 0 failed",
        "MESH-VM suite-end verdicts 0 10.50 20.75",
        "MESH-VM suite-begin traffic",
        "test real_traffic_through_xdp_ingress_and_tc_egress ... ok",
        "MESH-VM suite-end traffic 0 20.75 31.00",
        "MESH-VM done",
    ];

    #[test]
    fn all_passed() {
        let report = parse(&console(PASSING));
        assert_eq!(report.release, "6.1.0-56-cloud-amd64");
        assert!(report.done);
        assert!(report.module_failures.is_empty());
        let summary: Vec<_> = report
            .suites
            .iter()
            .map(|s| (s.name.as_str(), s.passed, s.ok(), s.seconds))
            .collect();
        assert_eq!(
            summary,
            [("verdicts", 2, true, 10.25), ("traffic", 1, true, 10.25)]
        );
        assert!(
            report.suites[0].output.contains("random: crng init done"),
            "kernel messages stay in the suite's output"
        );
        assert!(!report.suites[0].output.contains('\r'));
    }

    #[test]
    fn a_failed_test_fails_its_suite_with_its_output() {
        let report = parse(&console(&[
            "MESH-VM kernel 6.1.0-56-cloud-amd64",
            "MESH-VM suite-begin verdicts",
            "test granted_flows ... ok",
            "test denied_flows ... FAILED",
            "failures:",
            "---- denied_flows stdout ----",
            "Error: program `mesh_tc`: the BPF_PROG_LOAD syscall failed. Verifier output:",
            "R1 invalid mem access 'scalar'",
            "test result: FAILED. 1 passed; 1 failed",
            "MESH-VM suite-end verdicts 101 10.00 12.00",
            "MESH-VM done",
        ]));
        let suite = &report.suites[0];
        assert_eq!(suite.passed, 1);
        assert_eq!(suite.failed, ["denied_flows"]);
        assert_eq!(suite.status, Some(101));
        assert!(!suite.ok());
        assert!(suite.output.contains("R1 invalid mem access 'scalar'"));
        assert!(report.done);
    }

    #[test]
    fn a_suite_that_exits_non_zero_without_a_failed_test_fails() {
        let report = parse(&console(&[
            "MESH-VM suite-begin l3",
            "error: test binary aborted",
            "MESH-VM suite-end l3 134 1.0 2.0",
            "MESH-VM done",
        ]));
        assert!(report.suites[0].failed.is_empty());
        assert!(!report.suites[0].ok());
    }

    #[test]
    fn a_console_cut_short_leaves_the_suite_unfinished_and_the_vm_not_done() {
        // The first half of PASSING: the VM stopped in its second suite.
        let report = parse(&console(&PASSING[..9]));
        assert!(!report.done);
        assert!(report.suites[0].ok());
        let traffic = &report.suites[1];
        assert_eq!(traffic.name, "traffic");
        assert_eq!(traffic.status, None);
        assert!(!traffic.ok());
    }

    #[test]
    fn module_failures_are_collected() {
        let report = parse(&console(&[
            "MESH-VM kernel 6.12.118-cloud-amd64",
            "insmod: can't insert '/vm/modules/03-cls_bpf.ko': unknown symbol in module",
            "MESH-VM module-failed 03-cls_bpf.ko",
            "MESH-VM module-failed 04-wireguard.ko",
            "MESH-VM done",
        ]));
        assert_eq!(report.module_failures, ["03-cls_bpf.ko", "04-wireguard.ko"]);
        assert!(report.suites.is_empty());
    }

    #[test]
    fn a_vm_that_powered_off_gives_its_console() {
        let text = console(PASSING);
        let judged = judge(Some(ExitStatus::from_raw(0)), text.clone(), Duration::ZERO);
        assert_eq!(judged.unwrap(), text);
    }

    #[test]
    fn a_kernel_panic_fails_the_vm_with_the_panic() {
        // panic=-1 and -no-reboot: QEMU exits with 0 after a panic.
        let text = console(&[
            "MESH-VM kernel 6.1.0-56-cloud-amd64",
            "MESH-VM suite-begin verdicts",
            "BUG: kernel NULL pointer dereference, address: 0000000000000000",
            "Kernel panic - not syncing: Fatal exception in interrupt",
        ]);
        let err = judge(Some(ExitStatus::from_raw(0)), text, Duration::ZERO).unwrap_err();
        let said = format!("{err:#}");
        assert!(said.starts_with("the kernel panicked"), "{said}");
        assert!(said.contains("Fatal exception in interrupt"), "{said}");
    }

    #[test]
    fn a_timeout_fails_the_vm_with_the_console_tail() {
        let mut lines: Vec<String> = (0..100).map(|n| format!("line {n}")).collect();
        lines.push("MESH-VM suite-begin differential".to_owned());
        let lines: Vec<&str> = lines.iter().map(String::as_str).collect();
        let err = judge(None, console(&lines), Duration::from_secs(600)).unwrap_err();
        let said = format!("{err:#}");
        assert!(said.starts_with("timed out after 600s"), "{said}");
        assert!(said.contains("MESH-VM suite-begin differential"), "{said}");
        assert!(!said.contains("line 10\n"), "only the last lines: {said}");
    }

    #[test]
    fn a_failing_qemu_fails_the_vm() {
        // Exit status 1, as QEMU exits when it cannot start the guest.
        let err = judge(
            Some(ExitStatus::from_raw(1 << 8)),
            String::new(),
            Duration::ZERO,
        )
        .unwrap_err();
        assert!(format!("{err:#}").starts_with("qemu failed"), "{err:#}");
    }
}
