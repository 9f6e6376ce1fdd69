use std::{io::Write as _, path::PathBuf, process::ExitCode, time::SystemTime};

use clap::{Parser, Subcommand};
use mesh_agent::{policy, replay};
use time::{OffsetDateTime, format_description::well_known::Rfc3339};

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
    /// Run every packet of a capture through the enforcement programs in the
    /// running kernel and print one JSON verdict per packet.
    Replay {
        /// The policy file (TOML).
        #[arg(long)]
        policy: PathBuf,
        /// Wall-clock time of the first packet, for grant expiry (RFC 3339;
        /// default: now).
        #[arg(long, value_parser = parse_rfc3339)]
        now: Option<SystemTime>,
        /// A pcap or pcapng capture, Ethernet or raw IP.
        capture: PathBuf,
    },
}

fn parse_rfc3339(text: &str) -> Result<SystemTime, String> {
    OffsetDateTime::parse(text, &Rfc3339)
        .map(SystemTime::from)
        .map_err(|err| format!("expected an RFC 3339 time such as 2026-12-01T00:00:00Z: {err}"))
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
        Command::Policy(PolicyCommand::Replay {
            policy,
            now,
            capture,
        }) => {
            let verdicts = replay::replay(&policy, &capture, now.unwrap_or_else(SystemTime::now))?;
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            for verdict in &verdicts {
                serde_json::to_writer(&mut out, verdict)?;
                writeln!(out)?;
            }
            out.flush()?;
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
