use std::{io::Write as _, path::PathBuf, process::ExitCode, time::SystemTime};

use clap::{Parser, Subcommand};
use mesh_agent::{agent, datapath::MapSizes, policy, replay};
use time::{OffsetDateTime, format_description::well_known::Rfc3339};
use tracing_subscriber::EnvFilter;

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
    /// Run the node agent: enforce the policy on the interfaces and keep it
    /// in step with the file.
    Run(RunArgs),
    /// Show what the agent runs or left behind: policy, attachments, maps.
    Status {
        #[command(flatten)]
        places: Places,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Print flow events (denied packets and new flows) from the flow log.
    Flows {
        /// Keep printing new events as they come.
        #[arg(long)]
        follow: bool,
        /// Only this verdict.
        #[arg(long, value_parser = ["allow", "deny"])]
        verdict: Option<String>,
        /// Only this source identity (a SPIFFE ID).
        #[arg(long)]
        source: Option<String>,
        /// Only this service.
        #[arg(long)]
        service: Option<String>,
        /// The flow log [default: STATE_DIR/flows.jsonl].
        #[arg(long)]
        flow_log: Option<PathBuf>,
        /// The agent's state folder.
        #[arg(long, default_value = "/var/lib/mesh")]
        state_dir: PathBuf,
    },
    /// Detach and unpin everything the agent made; traffic then flows as if
    /// mesh had never been there. Refused while an agent runs.
    Teardown {
        #[command(flatten)]
        places: Places,
    },
}

/// Where an agent keeps its state.
#[derive(clap::Args)]
struct Places {
    /// The agent's folder on a bpffs, for its pinned maps and links.
    #[arg(long, default_value = "/sys/fs/bpf/mesh")]
    bpffs: PathBuf,
    /// The agent's state folder (status file).
    #[arg(long, default_value = "/var/lib/mesh")]
    state_dir: PathBuf,
}

#[derive(clap::Args)]
struct RunArgs {
    /// The policy file (TOML); changes to it are applied at once.
    #[arg(long)]
    policy: PathBuf,
    /// An interface to enforce on (ingress and egress); repeat for more.
    #[arg(long = "interface", required = true)]
    interfaces: Vec<String>,
    /// The hook for arriving packets.
    #[arg(long, value_enum, default_value_t)]
    ingress: agent::Ingress,
    /// Where to serve Prometheus metrics (/metrics) and health (/healthz,
    /// /readyz).
    #[arg(long, default_value = "127.0.0.1:9464")]
    metrics_listen: std::net::SocketAddr,
    /// Most (source, service, verdict, reason) series in the metrics; the
    /// rest are summed under source and service "other".
    #[arg(long, default_value_t = 10_000)]
    metrics_max_series: usize,
    /// Where flow events (denied packets, new flows) go as JSON lines: a
    /// file, or - for stdout [default: STATE_DIR/flows.jsonl].
    #[arg(long)]
    flow_log: Option<PathBuf>,
    /// Flow events the kernel passes on per second, sustained; the rest are
    /// counted in mesh_events_lost_total.
    #[arg(long, default_value_t = 10_000)]
    flow_events_rate: u32,
    /// Flow events the kernel passes on at once.
    #[arg(long, default_value_t = 1_000)]
    flow_events_burst: u32,
    #[command(flatten)]
    places: Places,
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

/// The flow log's name in the state folder.
const FLOW_LOG: &str = "flows.jsonl";

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
        Command::Run(args) => {
            tracing_subscriber::fmt()
                .with_env_filter(
                    EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
                )
                .with_writer(std::io::stderr)
                .init();
            let options = agent::Options {
                policy: args.policy,
                interfaces: args.interfaces,
                ingress: args.ingress,
                state_dir: args.places.state_dir.clone(),
                bpffs: args.places.bpffs,
                sizes: MapSizes::default(),
                metrics_listen: args.metrics_listen,
                metrics_max_series: args.metrics_max_series,
                flow_log: args
                    .flow_log
                    .unwrap_or_else(|| args.places.state_dir.join(FLOW_LOG)),
                flow_events_rate: args.flow_events_rate,
                flow_events_burst: args.flow_events_burst,
            };
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(agent::run(options))?;
        }
        Command::Status { places, json } => {
            let report = agent::status(&places.state_dir, &places.bpffs);
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{report}");
            }
        }
        Command::Flows {
            follow,
            verdict,
            source,
            service,
            flow_log,
            state_dir,
        } => {
            let path = flow_log.unwrap_or_else(|| state_dir.join(FLOW_LOG));
            let filter = agent::FlowFilter {
                verdict,
                source,
                service,
            };
            agent::show_flows(&path, &filter, follow, &mut std::io::stdout().lock())?;
        }
        Command::Teardown { places } => {
            agent::teardown(&places.state_dir, &places.bpffs)?;
            println!("mesh removed from {}", places.bpffs.display());
        }
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
