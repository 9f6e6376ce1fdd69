use clap::Parser;

/// mesh node agent: per-agent identities, per-service grants, enforced in the
/// kernel with eBPF.
#[derive(Parser)]
#[command(version)]
struct Cli {}

fn main() {
    let Cli {} = Cli::parse();
}
