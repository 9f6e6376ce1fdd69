use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use mesh_agent::policy;

/// mesh node agent: per-agent identities, per-service grants, enforced in the
/// kernel with eBPF.
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check and inspect policy files.
    #[command(subcommand)]
    Policy(PolicyCommand),
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Check a policy file: print a one-line summary, or every error as
    /// FILE:LINE:COLUMN: message.
    Check {
        /// The policy file (TOML).
        file: PathBuf,
    },
    /// Print a checked policy, with each grant's sources, services and ports
    /// resolved.
    Show {
        /// The policy file (TOML).
        file: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // Not `main() -> anyhow::Result`: policy errors go out as they
            // are, one `FILE:LINE:COLUMN: message` a line, with no prefix.
            eprintln!("{error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Policy(PolicyCommand::Check { file }) => {
            let policy = policy::load(&file)?;
            println!("{}: valid: {}", file.display(), policy.summary());
        }
        Command::Policy(PolicyCommand::Show { file, json }) => {
            let view = policy::load(&file)?.view();
            if json {
                println!("{}", serde_json::to_string_pretty(&view)?);
            } else {
                print!("{view}");
            }
        }
    }
    Ok(())
}
