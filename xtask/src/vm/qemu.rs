//! Booting a VM and reading what its init reported on the serial console.

use std::{
    fs,
    path::Path,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

/// Marker lines written by init.sh start with this.
const MARKER: &str = "MESH-VM ";
const PANIC: &str = "Kernel panic - not syncing";

/// Boots `vmlinuz` with `initrd` until it powers off, writing the serial
/// console to `log`; returns the console's text.
pub fn boot(
    vmlinuz: &Path,
    initrd: &Path,
    log: &Path,
    timeout: Duration,
) -> anyhow::Result<String> {
    let mut qemu = Command::new("qemu-system-x86_64");
    qemu.args(accelerator())
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
    let console = String::from_utf8_lossy(&console).into_owned();
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

/// TCG everywhere but under a KVM that can run stock kernels: a nested
/// paravirtual KVM (kvm_pvm) cannot.
fn accelerator() -> [&'static str; 4] {
    let kvm_works = Path::new("/dev/kvm").exists() && !Path::new("/sys/module/kvm_pvm").exists();
    if kvm_works {
        ["-accel", "kvm", "-cpu", "host"]
    } else {
        ["-accel", "tcg", "-cpu", "max"]
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
