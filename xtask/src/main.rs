//! Project automation: `cargo xtask setup | test | demo`.

mod cmd;
mod demo;
mod setup;
mod test;

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
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Setup => setup::run(),
        Command::Test(options) => test::run(&options),
        Command::Demo => demo::run(),
    }
}
