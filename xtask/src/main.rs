//! Project automation: `cargo xtask setup | test | demo | bench | vm`.

mod bench;
mod cmd;
mod demo;
mod setup;
mod test;
mod vm;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "mesh project automation")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install what building and testing need: apt packages, the nightly's
    /// rust-src, and bpf-linker built against the nightly's LLVM.
    Setup,
    /// Setup, then formatting, clippy, and every test (needs root).
    Test(test::Options),
    /// Setup, then show mesh at work in network namespaces (needs root).
    Demo,
    /// Setup, then measure per-packet cost, drop throughput, policy apply
    /// times and memory (needs root).
    Bench(bench::Options),
    /// Run the kernel-facing suites in QEMU VMs on Debian's 6.1, 6.12 and
    /// 7.3 kernels.
    Vm(vm::Options),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Setup => setup::run(),
        Command::Test(options) => test::run(&options),
        Command::Demo => demo::run(),
        Command::Bench(options) => bench::run(&options),
        Command::Vm(options) => vm::run(&options),
    }
}
