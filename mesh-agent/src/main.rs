use std::{
    io::{IsTerminal as _, Read as _, Write as _},
    path::PathBuf,
    process::ExitCode,
    time::{Duration, SystemTime},
};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use mesh_agent::{
    agent, control,
    datapath::MapSizes,
    identity::{self, IssuerKey, TrustBundle, Verifier},
    node,
    policy::{self, SpiffeId, TrustDomain},
    replay,
};
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
    /// Identity tokens: make an issuer key, issue tokens, check them.
    #[command(subcommand)]
    Token(TokenCommand),
    /// The node mesh: join tokens, and the node's WireGuard key.
    #[command(subcommand)]
    Node(NodeCommand),
    /// Run the node agent: enforce the policy on the interfaces and keep it
    /// in step with the file.
    Run(Box<RunArgs>),
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
        /// The cgroup below which the agent bound processes (as given to
        /// `run`) [default: `mesh` below the cgroup v2 mount].
        #[arg(long)]
        cgroup_root: Option<PathBuf>,
    },
    /// Run a command bound to the identity a token proves: its sockets
    /// reach what that identity is granted, from the identity's own address.
    ///
    /// Asks the running agent to check the token; exits 1 if it refuses.
    /// Writing a new token to FILE hands it to the agent, before the old
    /// one expires. Exits as the command does.
    Exec {
        /// The token file.
        #[arg(long, value_name = "FILE")]
        token: PathBuf,
        #[command(flatten)]
        control: ControlArgs,
        /// The command and its arguments, after `--`.
        #[arg(required = true, last = true, value_name = "CMD")]
        command: Vec<std::ffi::OsString>,
    },
    /// Revoke an identity: every flow of it on this node stops within a
    /// second, live ones included, and it binds no more, until `unrevoke`.
    /// Kept across agent restarts.
    Revoke {
        /// The identity (a SPIFFE ID).
        id: SpiffeId,
        /// Why, for the audit log and `status`.
        #[arg(long, value_name = "TEXT")]
        reason: Option<String>,
        #[command(flatten)]
        control: ControlArgs,
    },
    /// Lift a revocation. Flows it ended stay ended.
    Unrevoke {
        /// The identity (a SPIFFE ID).
        id: SpiffeId,
        #[command(flatten)]
        control: ControlArgs,
    },
}

/// How to reach the running agent.
#[derive(clap::Args)]
struct ControlArgs {
    /// The agent's control socket [default: STATE_DIR/agent.sock].
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// The agent's state folder.
    #[arg(long, default_value = "/var/lib/mesh")]
    state_dir: PathBuf,
}

impl ControlArgs {
    fn socket(&self) -> PathBuf {
        self.socket
            .clone()
            .unwrap_or_else(|| self.state_dir.join(control::SOCKET_FILE))
    }
}

/// Binding processes to identities, and the control socket.
#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("pools").multiple(false).args(["agent_pools", "agent_pool_file"])))]
struct BindingArgs {
    /// The trust bundle (JWKS) identity tokens are checked against.
    #[arg(long, value_name = "FILE", requires = "pools")]
    trust_bundle: Option<PathBuf>,
    /// The agent pool: source addresses for bound processes, one IPv4
    /// and/or one IPv6 prefix. With a pool the agent binds processes.
    #[arg(long = "agent-pool", value_name = "CIDR", requires = "trust_bundle")]
    agent_pools: Vec<ipnet::IpNet>,
    /// The agent pool from a file instead: its prefixes one per line, `#`
    /// starting a comment. On Kubernetes, a ConfigMap's key named after the
    /// node gives each node of one DaemonSet its own pool.
    #[arg(long, value_name = "FILE", requires = "trust_bundle")]
    agent_pool_file: Option<PathBuf>,
    /// The cgroup v2 folder below which bound processes run [default:
    /// mesh below the cgroup v2 mount].
    #[arg(long, value_name = "DIR")]
    cgroup_root: Option<PathBuf>,
    /// The control socket for exec, revoke and unrevoke [default:
    /// STATE_DIR/agent.sock].
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
}

impl BindingArgs {
    fn options(&self, state_dir: &std::path::Path) -> anyhow::Result<agent::BindingOptions> {
        let pools = match &self.agent_pool_file {
            Some(file) => read_pool_file(file)?,
            None => self.agent_pools.clone(),
        };
        Ok(agent::BindingOptions {
            trust_bundle: self.trust_bundle.clone(),
            pools,
            cgroup_root: self.cgroup_root.clone(),
            socket: self
                .socket
                .clone()
                .unwrap_or_else(|| state_dir.join(control::SOCKET_FILE)),
        })
    }
}

/// The prefixes of an agent pool file, every bad line named.
fn read_pool_file(file: &std::path::Path) -> anyhow::Result<Vec<ipnet::IpNet>> {
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("reading the agent pool file {}", file.display()))?;
    let mut pools = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let entry = line.split('#').next().unwrap_or_default().trim();
        if entry.is_empty() {
            continue;
        }
        let pool = entry.parse().map_err(|err| {
            anyhow::anyhow!(
                "{}:{}: invalid prefix `{entry}`: {err}",
                file.display(),
                index + 1
            )
        })?;
        pools.push(pool);
    }
    anyhow::ensure!(
        !pools.is_empty(),
        "the agent pool file {} lists no prefix",
        file.display()
    );
    Ok(pools)
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
    #[arg(long = "interface", required_unless_present = "join_token")]
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
    #[command(flatten)]
    mesh: MeshArgs,
    #[command(flatten)]
    binding: BindingArgs,
    /// Check the options and the policy, print what would be done, and exit
    /// without touching the kernel.
    #[arg(long)]
    check: bool,
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

/// Joining the node mesh.
#[derive(clap::Args)]
struct MeshArgs {
    /// This node's join token (made by `node token issue`): join the mesh.
    #[arg(
        long,
        value_name = "FILE",
        requires_all = ["store", "mesh_bundle", "endpoint", "mesh_range"]
    )]
    join_token: Option<PathBuf>,
    /// Where node records are shared: dir:PATH, a path, or
    /// etcd://HOST:PORT[,HOST:PORT…]/PREFIX.
    #[arg(long, value_name = "STORE")]
    store: Option<node::StoreSpec>,
    /// The trust bundle of the admin keys that sign join tokens.
    #[arg(long, value_name = "FILE")]
    mesh_bundle: Option<PathBuf>,
    /// Where other nodes reach this node's WireGuard; it listens on the
    /// port.
    #[arg(long, value_name = "ADDRESS:PORT")]
    endpoint: Option<std::net::SocketAddr>,
    /// The mesh's address range: every node's prefix lies in it, and all of
    /// it is routed into the tunnel.
    #[arg(long, value_name = "CIDR")]
    mesh_range: Option<ipnet::IpNet>,
    /// The mesh interface's name (at most 15 characters).
    #[arg(long, value_name = "NAME", default_value = "mesh0")]
    mesh_interface: String,
    /// The WireGuard implementation.
    #[arg(long, value_enum, default_value_t)]
    wireguard: node::WireGuardMode,
    /// The userspace WireGuard program (boringtun-cli), for --wireguard
    /// userspace and auto without kernel WireGuard.
    #[arg(long, value_name = "PROGRAM", default_value = "boringtun-cli")]
    wireguard_userspace: PathBuf,
    /// Seconds between keepalives to each peer; 0 for none.
    #[arg(long, value_name = "SECONDS", default_value_t = 25)]
    keepalive: u16,
    /// Make a new WireGuard key this often (90s, 1h, 7d).
    #[arg(long, value_name = "DURATION", value_parser = identity::parse_ttl)]
    key_rotation: Option<Duration>,
    /// Shield this underlay interface (XDP): WireGuard from peers,
    /// rate-limited handshakes from others, the --underlay-allow services;
    /// everything else is dropped.
    #[arg(long, value_name = "IFACE")]
    underlay: Option<String>,
    /// What else the shield admits (repeat): a host service, tcp/PORT,
    /// udp/PORT or icmp, or the answers of a UDP server the host asks,
    /// udp-from/PORT; with @CIDR for the sources (tcp/22@10.0.0.0/8,
    /// udp-from/53@10.0.0.2/32).
    #[arg(long = "underlay-allow", value_name = "SERVICE", requires = "underlay")]
    underlay_allow: Vec<node::ShieldService>,
    /// Packets to the WireGuard port the shield admits per second from
    /// each source /24 (/48) that is no peer; bursts of twice as many.
    #[arg(long, value_name = "N", default_value_t = 10)]
    handshake_rate: u32,
    /// The same, from all such sources together.
    #[arg(long, value_name = "N", default_value_t = 100)]
    handshake_rate_total: u32,
}

impl MeshArgs {
    /// `None` without `--join-token`; clap makes sure the rest is there.
    fn options(
        &self,
        places: &Places,
        control_socket: PathBuf,
    ) -> anyhow::Result<Option<node::MeshOptions>> {
        let state_dir = &places.state_dir;
        let Some(join_token) = self.join_token.clone() else {
            return Ok(None);
        };
        Ok(Some(node::MeshOptions {
            join_token,
            bundle: self
                .mesh_bundle
                .clone()
                .context("--mesh-bundle is required")?,
            store: self.store.clone().context("--store is required")?,
            endpoint: self.endpoint.context("--endpoint is required")?,
            mesh_range: self.mesh_range.context("--mesh-range is required")?,
            interface: self.mesh_interface.clone(),
            wireguard: self.wireguard,
            userspace_program: self.wireguard_userspace.clone(),
            keepalive: self.keepalive,
            key_rotation: self.key_rotation,
            state_dir: state_dir.to_owned(),
            shield: self.underlay.clone().map(|interface| node::ShieldOptions {
                interface,
                bpffs: places.bpffs.clone(),
                services: self.underlay_allow.clone(),
                rates: node::HandshakeRates {
                    per_subnet: self.handshake_rate,
                    overall: self.handshake_rate_total,
                },
            }),
            control_socket,
        }))
    }
}

#[derive(Subcommand)]
enum NodeCommand {
    /// Join tokens: the admin's grant to a node of its name and prefix.
    #[command(subcommand)]
    Token(NodeTokenCommand),
    /// Print this node's signing key, for `node token issue --node-key`
    /// (made on first use, like `run` makes it).
    Key {
        /// The agent's state folder, which holds the key.
        #[arg(long, default_value = "/var/lib/mesh")]
        state_dir: PathBuf,
    },
    /// Make a new WireGuard key for this node. A running agent takes it
    /// into use and publishes it; peers follow.
    RotateKey {
        /// The agent's state folder, which holds the key.
        #[arg(long, default_value = "/var/lib/mesh")]
        state_dir: PathBuf,
    },
    /// Revoke a node: sign, with an admin key, that no join token of NODE
    /// issued until now admits it, and write that to the store. Every node
    /// drops it as a peer at its next read of the store and keeps the
    /// revocation; a join token issued later admits the node again.
    Revoke {
        /// The admin key, as `token keygen` writes it.
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
        /// The node's name.
        #[arg(long, value_name = "NAME")]
        node: node::NodeName,
        /// Why, for the nodes' logs.
        #[arg(long, value_name = "TEXT")]
        reason: Option<String>,
        /// The mesh's store, as `run --store` names it.
        #[arg(long, value_name = "STORE")]
        store: node::StoreSpec,
    },
}

#[derive(Subcommand)]
enum NodeTokenCommand {
    /// Issue a join token and print it.
    Issue {
        /// The admin key, as `token keygen` writes it.
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
        /// The node's name.
        #[arg(long, value_name = "NAME")]
        node: node::NodeName,
        /// The prefix the node owns: its agents' addresses come from it.
        #[arg(long, value_name = "CIDR")]
        prefix: ipnet::IpNet,
        /// The node's signing key, as `mesh-agent node key` prints it on
        /// the node: only records it signs are the node's.
        #[arg(long, value_name = "KEY")]
        node_key: node::SigningPublicKey,
        /// How long the token is valid (90s, 15m, 1h, 7d; at most 365d).
        #[arg(long, value_name = "DURATION", value_parser = identity::parse_ttl)]
        ttl: Duration,
    },
}

fn node(command: NodeCommand) -> anyhow::Result<()> {
    match command {
        NodeCommand::Token(NodeTokenCommand::Issue {
            key,
            node,
            prefix,
            node_key,
            ttl,
        }) => {
            if prefix != prefix.trunc() {
                anyhow::bail!(
                    "--prefix {prefix}: host bits are set; did you mean {}?",
                    prefix.trunc()
                );
            }
            let key = IssuerKey::load(&key)?;
            println!(
                "{}",
                node::token::issue(&key, &node, prefix, &node_key, ttl, SystemTime::now())?
            );
        }
        NodeCommand::Key { state_dir } => {
            std::fs::create_dir_all(&state_dir)
                .with_context(|| format!("creating {}", state_dir.display()))?;
            let (key, _) = node::SigningKey::load_or_create(&state_dir)?;
            println!("{}", key.public());
        }
        NodeCommand::Revoke {
            key,
            node,
            reason,
            store,
        } => {
            let key = IssuerKey::load(&key)?;
            let now = SystemTime::now();
            let revocation = node::token::revoke(&key, &node, reason.as_deref(), now)?;
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(async {
                    node::Store::open(&store)
                        .await?
                        .publish(node::Section::RevokedNodes, &node, revocation.as_bytes())
                        .await
                })?;
            println!(
                "node {node} revoked in {store}: its join tokens issued until {} admit it no more",
                OffsetDateTime::from(now).format(&Rfc3339)?
            );
        }
        NodeCommand::RotateKey { state_dir } => {
            let key = node::NodeKey::generate()?;
            key.save(&state_dir)?;
            println!("new public key: {}", key.public());
        }
    }
    Ok(())
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Make an issuer key and a trust bundle with its public key.
    ///
    /// Writes the private key to DIR/issuer.jwk (mode 0600) and the bundle
    /// to DIR/bundle.json; never replaces either file.
    Keygen {
        /// The folder to write to; made (mode 0700) if missing.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// The signature algorithm.
        #[arg(long, value_enum, default_value_t = identity::Algorithm::EdDsa)]
        alg: identity::Algorithm,
        /// The key ID, named in each token's header [default: the key's
        /// RFC 7638 thumbprint].
        #[arg(long, value_name = "ID")]
        kid: Option<String>,
    },
    /// Issue a token and print it.
    Issue {
        /// The issuer key, as `token keygen` writes it.
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
        /// The identity the token proves (a SPIFFE ID).
        #[arg(long, value_name = "SPIFFE_ID")]
        id: SpiffeId,
        /// How long the token is valid: a whole number and s, m, h or d
        /// (90s, 15m, 1h, 7d); at most 365d.
        #[arg(long, value_name = "DURATION", value_parser = identity::parse_ttl)]
        ttl: Duration,
        /// Who the token is for.
        #[arg(long, value_name = "AUDIENCE", default_value = identity::DEFAULT_AUDIENCE)]
        aud: String,
    },
    /// Verify a token; exit 1 if it is not valid.
    ///
    /// Prints the token's header and claims, then whether it is valid and
    /// why.
    Inspect {
        /// The token; @FILE to read it from a file, - from stdin.
        token: String,
        /// The trust bundle (JWKS) whose keys may sign tokens.
        #[arg(long, value_name = "FILE")]
        bundle: PathBuf,
        /// The trust domain the token's identity must be in.
        #[arg(long, value_name = "NAME", required_unless_present = "policy")]
        trust_domain: Option<TrustDomain>,
        /// Take the trust domain from this policy file instead.
        #[arg(long, value_name = "FILE", conflicts_with = "trust_domain")]
        policy: Option<PathBuf>,
        /// The audience the token must be for.
        #[arg(long, value_name = "AUDIENCE", default_value = identity::DEFAULT_AUDIENCE)]
        aud: String,
    },
}

/// Sends a revocation request to the running agent and prints its answer.
fn ask_agent(args: &ControlArgs, request: control::Request) -> anyhow::Result<()> {
    let socket = args.socket();
    let answer = control::request(&socket, &request).with_context(|| {
        format!(
            "is an agent running with the control socket {}?",
            socket.display()
        )
    })?;
    match answer {
        control::Response::Done { message } => println!("{message}"),
        control::Response::Refused { reason, message } => {
            anyhow::bail!("the agent refused ({reason}): {message}")
        }
        other => anyhow::bail!("unexpected answer from the agent: {other:?}"),
    }
    Ok(())
}

/// The flow log's name in the state folder.
const FLOW_LOG: &str = "flows.jsonl";

fn parse_rfc3339(text: &str) -> Result<SystemTime, String> {
    OffsetDateTime::parse(text, &Rfc3339)
        .map(SystemTime::from)
        .map_err(|err| format!("expected an RFC 3339 time such as 2026-12-01T00:00:00Z: {err}"))
}

fn rfc3339(time: SystemTime) -> String {
    OffsetDateTime::from(time)
        .format(&Rfc3339)
        .unwrap_or_else(|_| format!("{time:?}"))
}

/// The token argument of `token inspect`: the token itself, `@FILE`, or `-`
/// for stdin. Files and stdin keep tokens out of shell history and `ps`.
fn read_token(arg: &str) -> anyhow::Result<String> {
    let text = if arg == "-" {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .context("cannot read the token from stdin")?;
        text
    } else if let Some(path) = arg.strip_prefix('@') {
        std::fs::read_to_string(path).with_context(|| format!("{path}: cannot read"))?
    } else {
        arg.to_owned()
    };
    Ok(text.trim().to_owned())
}

fn token(command: TokenCommand) -> anyhow::Result<()> {
    match command {
        TokenCommand::Keygen { out, alg, kid } => {
            let key = IssuerKey::generate(alg, kid)?;
            let saved = key.save(&out)?;
            println!(
                "private key: {} (mode 0600; keep it secret)",
                saved.key.display()
            );
            println!("trust bundle: {}", saved.bundle.display());
            println!("key ID: {} ({})", key.kid(), key.algorithm());
        }
        TokenCommand::Issue { key, id, ttl, aud } => {
            let key = IssuerKey::load(&key)?;
            println!("{}", key.issue(&id, &aud, ttl, SystemTime::now())?);
        }
        TokenCommand::Inspect {
            token,
            bundle,
            trust_domain,
            policy,
            aud,
        } => {
            let trust_domain = match (trust_domain, policy) {
                (Some(trust_domain), _) => trust_domain,
                (None, Some(path)) => policy::load(&path)?.trust_domain,
                (None, None) => unreachable!("clap requires --trust-domain or --policy"),
            };
            let verifier = Verifier::new(TrustBundle::load(&bundle)?, trust_domain, aud);
            let token = read_token(&token)?;
            if let Ok(parts) = identity::decode_unverified(&token) {
                println!("header: {}", serde_json::to_string_pretty(&parts.header)?);
                println!("claims: {}", serde_json::to_string_pretty(&parts.claims)?);
            }
            let now = SystemTime::now();
            match verifier.verify(&token, now) {
                Ok(valid) => {
                    let left = valid.expires_at.duration_since(now).unwrap_or_default();
                    println!("valid: {}", valid.spiffe_id);
                    println!("  audience: {}", valid.audience.join(", "));
                    println!("  issued:   {}", rfc3339(valid.issued_at));
                    println!(
                        "  expires:  {} (in {} s)",
                        rfc3339(valid.expires_at),
                        left.as_secs()
                    );
                    println!("  key:      {} ({})", valid.kid, valid.algorithm);
                    if let Some(jti) = valid.jti {
                        println!("  token ID: {jti}");
                    }
                }
                Err(error) => anyhow::bail!("invalid token ({}): {error}", error.reason()),
            }
        }
    }
    Ok(())
}

/// `run --check`: what `run` would do with these options. Loads nothing,
/// attaches nothing, mounts nothing and writes nothing, so it can run off the
/// node too: an interface this host lacks is reported, not an error.
fn check_run(args: &RunArgs) -> anyhow::Result<()> {
    let checked = policy::load(&args.policy)?;
    policy::compile(&checked, &policy::Capacities::from(&MapSizes::default()))
        .map_err(|err| anyhow::anyhow!("{}: {err}", args.policy.display()))?;
    let shown = args.policy.display();
    println!("policy {shown}: valid: {}", checked.summary());
    let ingress = match args.ingress {
        agent::Ingress::Auto => "XDP if the driver has native XDP, else TC",
        agent::Ingress::Xdp => "XDP",
        agent::Ingress::Tc => "TC",
    };
    for name in &args.interfaces {
        // The kernel's rule for interface names (dev_valid_name).
        if name.is_empty()
            || name.len() > 15
            || name == "."
            || name == ".."
            || name.contains(|c: char| c == '/' || c == ':' || c.is_whitespace())
        {
            anyhow::bail!("--interface {name:?}: not a valid interface name");
        }
        let missing = !std::path::Path::new("/sys/class/net").join(name).exists();
        let note = if missing {
            " (not present on this host)"
        } else {
            ""
        };
        println!("interface {name}{note}: ingress by {ingress}; egress by TC");
    }
    let bpffs = args.places.bpffs.display();
    if args.places.bpffs.join("maps").is_dir() {
        println!("pins: adopt the datapath pinned under {bpffs}");
    } else {
        println!("pins: load a new datapath and pin it under {bpffs}");
    }
    println!("state: {}", args.places.state_dir.display());
    let flow_log = match &args.flow_log {
        Some(path) if path.as_os_str() == "-" => "stdout".to_owned(),
        Some(path) => path.display().to_string(),
        None => args.places.state_dir.join(FLOW_LOG).display().to_string(),
    };
    println!(
        "flow log: {flow_log} (at most {} events/s, bursts of {})",
        args.flow_events_rate, args.flow_events_burst
    );
    println!(
        "metrics: http://{}/metrics, /healthz and /readyz (at most {} series)",
        args.metrics_listen, args.metrics_max_series
    );
    let binding = args.binding.options(&args.places.state_dir)?;
    if let Some(bundle) = &binding.trust_bundle {
        let pool = identity::pool::AddressPool::new(&binding.pools)?;
        let pools: Vec<String> = pool.nets().iter().map(ToString::to_string).collect();
        let keys = TrustBundle::load(bundle)?.keys().count();
        // Off the node there may be no cgroup v2 to find the default in.
        let root = match binding
            .cgroup_root
            .clone()
            .map(Ok)
            .unwrap_or_else(identity::cgroup::default_root)
        {
            Ok(root) => root.display().to_string(),
            Err(_) => "mesh below the cgroup v2 mount".to_owned(),
        };
        println!(
            "binding: addresses from {}, cgroups below {root}",
            pools.join(" and ")
        );
        println!(
            "  tokens checked against {} ({keys} keys)",
            bundle.display()
        );
        println!("  control socket {}", binding.socket.display());
    }
    if let Some(mesh) = args.mesh.options(&args.places, binding.socket)? {
        for line in node::check(&mesh)? {
            println!("{line}");
        }
    }
    println!("checked only: nothing was loaded, attached, pinned or written");
    Ok(())
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
        Command::Run(args) if args.check => check_run(&args)?,
        Command::Run(args) => {
            tracing_subscriber::fmt()
                .with_env_filter(
                    EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
                )
                .with_writer(std::io::stderr)
                // Colours for a terminal only: a journal, `kubectl logs`
                // or a file gets plain text.
                .with_ansi(std::io::stderr().is_terminal())
                .init();
            let bindings = args.binding.options(&args.places.state_dir)?;
            let mesh = args.mesh.options(&args.places, bindings.socket.clone())?;
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
                mesh,
                bindings,
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
        Command::Teardown {
            places,
            cgroup_root,
        } => {
            agent::teardown(&places.state_dir, &places.bpffs)?;
            println!("mesh removed from {}", places.bpffs.display());
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let left = runtime.block_on(agent::teardown_bindings(
                &places.state_dir,
                cgroup_root.as_deref(),
            ))?;
            for cgroup in left {
                println!("{} left in place: it is not empty", cgroup.display());
            }
            if let Some(interface) = runtime.block_on(node::teardown(&places.state_dir))? {
                println!("mesh interface {interface} and its routes removed");
            }
        }
        Command::Exec {
            token,
            control,
            command,
        } => {
            let code = mesh_agent::exec::exec(&control.socket(), &token, &command)?;
            std::process::exit(code);
        }
        Command::Revoke {
            id,
            reason,
            control,
        } => ask_agent(
            &control,
            control::Request::Revoke {
                id: id.to_string(),
                reason,
            },
        )?,
        Command::Unrevoke { id, control } => {
            ask_agent(&control, control::Request::Unrevoke { id: id.to_string() })?
        }
        Command::Token(command) => token(command)?,
        Command::Node(command) => node(command)?,
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
