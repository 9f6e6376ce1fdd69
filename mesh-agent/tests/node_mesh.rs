//! The node mesh between network namespaces joined by a veth (or, for
//! three nodes, a bridge): each node runs `mesh-agent run` with a join
//! token, the records meet in a store — a directory, or an etcd cluster the
//! test starts — and boringtun carries the tunnel (this kernel may lack
//! WireGuard). Checked: an agent on node A reaches its granted service on
//! node B through the tunnel; the veth carries only WireGuard, and nothing
//! for a node that is no peer (or for any, once the agent stopped) leaves
//! in clear; B refuses what A's policy wrongly allows; records with
//! forged, expired or overreaching join tokens, records signed by another
//! key than their token's, and replayed older records never become peers;
//! key rotations, asked for and timed, keep a TCP connection alive (the
//! pause is reported); losing the store keeps the peers, but for one whose
//! join token expires meanwhile; a removed node's peer goes, and teardown
//! removes what the agent left; a revocation on A is enforced on B within
//! a second; a process bound with `exec` on A is known to B by its
//! address, through A's signed bindings, until it exits, and bindings
//! claiming another node's addresses are rejected; the underlay shield
//! admits peers and allowed services, rate-limits strangers and drops the
//! rest; and with etcd, losing a member, then the whole cluster, changes
//! nothing, and a dead node ages out.
//!
//! The `kernel_wireguard` test runs the same mesh on kernel WireGuard,
//! checked with `wg show`, through the underlay shield. A kernel without
//! WireGuard skips it and says so, unless `MESH_KERNEL_WIREGUARD=required`
//! (the kernel VMs of `cargo xtask vm` set it, and run it there).

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, ChildStdout, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context as _, Result, bail, ensure};
use mesh_agent::{
    identity::{Algorithm, IssuerKey, cgroup},
    node::{
        BindingSet, Bound, NodeKey, NodeName, NodeRecord, Signed, SignedRecord, SigningKey,
        SigningPublicKey, token,
    },
    policy::SpiffeId,
};
use mesh_tests::{
    BpfFs, METRICS, NetNs, VethEnd, http_get, require_root, tcp_echo_server, tcp_echo_works,
    veth_pair,
};

const MESH: &str = "198.18.0.0/16";
const PORT: u16 = 51820;
const GRANTED: u16 = 7000;
const UNGRANTED: u16 = 7001;
const HOUR: Duration = Duration::from_secs(3600);
const PATIENCE: Duration = Duration::from_secs(2);
/// How long an agent may take to be ready: it loads its programs first,
/// which takes seconds under the verifier in an emulated VM.
const STARTUP: Duration = Duration::from_secs(90);
const AGENT_A: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);
const SERVICE_B: SocketAddr = SocketAddr::V4(std::net::SocketAddrV4::new(
    Ipv4Addr::new(198, 18, 2, 1),
    GRANTED,
));

/// boringtun-cli, installed by `cargo xtask setup`.
fn boringtun() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/tools/bin/boringtun-cli")
}

/// Node A's policy is wrong on purpose: it allows both ports. B's allows
/// only the granted one.
fn policy(ports: &str) -> String {
    format!(
        r#"version = 1
trust_domain = "test.internal"

[[identity]]
id = "spiffe://test.internal/agent/a"
addresses = ["198.18.1.1/32"]

[[service]]
name = "echo"
addresses = ["198.18.2.1/32"]
ports = ["{GRANTED}/tcp", "{UNGRANTED}/tcp"]

[[grant]]
from = ["spiffe://test.internal/agent/a"]
to = ["echo"]
ports = [{ports}]
"#
    )
}

fn granted_only() -> String {
    policy(&format!("\"{GRANTED}/tcp\""))
}

/// A process the test started, killed on drop (and with the test process).
struct Process(Child);

impl Process {
    /// Starts `command`, which dies with the thread that started it.
    fn spawn(mut command: std::process::Command) -> Result<Self> {
        // SAFETY: prctl is async-signal-safe.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut command, || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
        Ok(Self(command.spawn()?))
    }

    /// SIGTERM, then SIGKILL if it has not exited within 5 s.
    fn stop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.0.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }

    /// Whether it has exited (a zombie until it is waited for), read
    /// through /proc so that callers need no `&mut`.
    fn exited(&self) -> bool {
        std::fs::read_to_string(format!("/proc/{}/stat", self.0.id()))
            .is_ok_and(|stat| stat.split_whitespace().nth(2) == Some("Z"))
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.stop();
    }
}

/// What every node shares: the admin key, its bundle, and the store.
struct Mesh {
    admin: IssuerKey,
    dir: tempfile::TempDir,
    /// `--store`.
    store: String,
}

impl Mesh {
    /// A mesh whose store is a directory.
    fn new() -> Result<Self> {
        let admin = IssuerKey::generate(Algorithm::EdDsa, Some("admin".into()))?;
        let dir = tempfile::Builder::new().prefix("mesh-node-").tempdir()?;
        std::fs::write(dir.path().join("bundle.json"), admin.bundle_json())?;
        std::fs::create_dir(dir.path().join("store"))?;
        let store = dir.path().join("store").display().to_string();
        Ok(Self { admin, dir, store })
    }

    fn store_dir(&self) -> PathBuf {
        self.dir.path().join("store")
    }

    /// Writes a record for a node no agent runs, as a forger would: its
    /// token from `admin` grants `granted` for `ttl` from `issued` to a key
    /// of its own, and its record claims `claimed`. Returns the node's key
    /// and record.
    fn plant(
        &self,
        admin: &IssuerKey,
        node: &str,
        granted: &str,
        claimed: &str,
        (issued, ttl): (SystemTime, Duration),
    ) -> Result<(SigningKey, NodeRecord)> {
        let key = SigningKey::generate()?;
        let name: NodeName = node.parse()?;
        let record = NodeRecord {
            name: name.clone(),
            public_key: NodeKey::generate()?.public(),
            endpoint: "192.0.2.99:51820".parse()?,
            prefix: claimed.parse()?,
            sequence: 1,
            join_token: token::issue(admin, &name, granted.parse()?, &key.public(), ttl, issued)?,
        };
        self.write(&key, &record)?;
        Ok((key, record))
    }

    /// Writes `record`, signed with `key`, into the directory store.
    fn write(&self, key: &SigningKey, record: &NodeRecord) -> Result<()> {
        let signed = SignedRecord::sign(record.clone(), key);
        let path = self.store_dir().join(format!("{}.json", record.name));
        std::fs::write(path, signed.encode())?;
        Ok(())
    }
}

/// A node: a namespace on the underlay, and the agent running in it.
/// Fields drop in order: the agent goes before its namespace.
struct Node {
    agent: Option<Process>,
    ns: NetNs,
    name: &'static str,
    /// The mesh's shared folder (bundle) and `--store`.
    shared: PathBuf,
    store: String,
    bpffs: BpfFs,
    state: tempfile::TempDir,
    underlay: Ipv4Addr,
    /// `--wireguard=kernel` rather than boringtun.
    kernel_wireguard: bool,
}

impl Node {
    fn new(ns: NetNs, name: &'static str, underlay: Ipv4Addr, mesh: &Mesh) -> Result<Self> {
        Ok(Self {
            agent: None,
            ns,
            name,
            shared: mesh.dir.path().to_owned(),
            store: mesh.store.clone(),
            bpffs: BpfFs::mount()?,
            state: tempfile::Builder::new().prefix("mesh-state-").tempdir()?,
            underlay,
            kernel_wireguard: false,
        })
    }

    /// The node's signing key, as `mesh-agent node key` prints it (making
    /// it in the state folder).
    fn node_key(&self) -> Result<SigningPublicKey> {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_mesh-agent"))
            .args(["node", "key", "--state-dir"])
            .arg(self.state.path())
            .output()?;
        ensure!(output.status.success(), "node key: {output:?}");
        Ok(String::from_utf8(output.stdout)?.trim().parse()?)
    }

    /// A join token for this node's key and `prefix`.
    fn token(
        &self,
        mesh: &Mesh,
        prefix: &str,
        ttl: Duration,
        issued: SystemTime,
    ) -> Result<String> {
        let name: NodeName = self.name.parse()?;
        Ok(token::issue(
            &mesh.admin,
            &name,
            prefix.parse()?,
            &self.node_key()?,
            ttl,
            issued,
        )?)
    }

    /// `mesh-agent run` joining with `join_token` and enforcing `policy` on
    /// the mesh interface; its log goes to the state folder.
    fn command(&self, join_token: &str, policy: &str) -> Result<std::process::Command> {
        let dir = self.state.path();
        std::fs::write(dir.join("join.token"), join_token)?;
        std::fs::write(dir.join("policy.toml"), policy)?;
        let log = std::fs::File::create(dir.join("agent.log"))?;
        let mut command = self.ns.command(env!("CARGO_BIN_EXE_mesh-agent"))?;
        command
            .arg("run")
            .arg("--policy")
            .arg(dir.join("policy.toml"))
            .arg("--ingress=tc")
            .arg("--join-token")
            .arg(dir.join("join.token"))
            .arg("--store")
            .arg(&self.store)
            .arg("--mesh-bundle")
            .arg(self.shared.join("bundle.json"))
            .arg(format!("--endpoint={}:{PORT}", self.underlay))
            .arg(format!("--mesh-range={MESH}"));
        if self.kernel_wireguard {
            command.arg("--wireguard=kernel");
        } else {
            command
                .arg("--wireguard=userspace")
                .arg("--wireguard-userspace")
                .arg(boringtun());
        }
        command
            .arg("--keepalive=1")
            .arg("--bpffs")
            .arg(self.bpffs.path().join("mesh"))
            .arg("--state-dir")
            .arg(dir)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        Ok(command)
    }

    fn start(&mut self, join_token: &str, policy: &str) -> Result<()> {
        self.start_command(self.command(join_token, policy)?)
    }

    /// Starts the agent as `command` and waits until it is ready.
    fn start_command(&mut self, command: std::process::Command) -> Result<()> {
        self.agent = Some(Process::spawn(command)?);
        self.wait_up_to(STARTUP, "the agent to be ready", || {
            Ok(self.http("/readyz")?.starts_with("HTTP/1.1 200"))
        })
    }

    /// Starts the agent with a token for `prefix`, valid for an hour.
    fn join(&mut self, mesh: &Mesh, prefix: &str, policy: &str) -> Result<()> {
        let token = self.token(mesh, prefix, HOUR, SystemTime::now())?;
        self.start(&token, policy)
    }

    /// `mesh-agent teardown` of this node, which must succeed.
    fn teardown(&self) -> Result<std::process::Output> {
        let output = self
            .ns
            .command(env!("CARGO_BIN_EXE_mesh-agent"))?
            .arg("teardown")
            .arg("--bpffs")
            .arg(self.bpffs.path().join("mesh"))
            .arg("--state-dir")
            .arg(self.state.path())
            .output()?;
        ensure!(output.status.success(), "teardown: {output:?}");
        Ok(output)
    }

    /// The agent's log: plain text, as the agent writes to anything but a
    /// terminal.
    fn log(&self) -> String {
        std::fs::read_to_string(self.state.path().join("agent.log")).unwrap_or_default()
    }

    /// GET `path` from the agent's metrics server, in its namespace.
    fn http(&self, path: &str) -> Result<String> {
        http_get(&self.ns, METRICS, path)
    }

    /// The value of the metric line that starts with `series`.
    fn metric(&self, series: &str) -> Result<f64> {
        let text = self.http("/metrics")?;
        text.lines()
            .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
            .with_context(|| format!("no metric {series}"))
    }

    /// Packets to the echo service that the node's datapath denied.
    fn denied(&self) -> Result<f64> {
        let text = self.http("/metrics")?;
        Ok(text
            .lines()
            .filter(|line| {
                line.starts_with("mesh_packets_total{")
                    && line.contains("service=\"echo\"")
                    && line.contains("verdict=\"deny\"")
            })
            .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
            .sum())
    }

    /// Checks that the agent's log holds no trace of the WireGuard private
    /// key in use: neither as the key file has it (base64) nor as the UAPI
    /// takes it (hex).
    fn key_not_logged(&self) -> Result<()> {
        let file = std::fs::read_to_string(self.state.path().join(mesh_agent::node::KEY_FILE))?;
        let base64 = file.trim();
        let bytes = base64::Engine::decode(&base64::engine::general_purpose::STANDARD, base64)?;
        ensure!(bytes.len() == 32, "the key file holds no key: {base64:?}");
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        let log = self.log();
        ensure!(!log.is_empty(), "no log to check");
        ensure!(
            !log.contains(base64) && !log.to_lowercase().contains(&hex),
            "{}'s log holds its private key",
            self.name
        );
        Ok(())
    }

    /// The MTU of `interface` in the node's namespace.
    fn mtu(&self, interface: &str) -> Result<u32> {
        let link = self.ns.ip(&["link", "show", interface])?;
        let mut words = link.split_whitespace();
        words
            .find(|word| *word == "mtu")
            .and_then(|_| words.next()?.parse().ok())
            .with_context(|| format!("no MTU in {link}"))
    }

    fn rejected(&self, reason: &str) -> Result<f64> {
        self.metric(&format!(
            "mesh_node_records_rejected_total{{reason=\"{reason}\"}}"
        ))
    }

    fn wait_for(&self, what: &str, done: impl FnMut() -> Result<bool>) -> Result<()> {
        self.wait_up_to(Duration::from_secs(15), what, done)
    }

    fn wait_up_to(
        &self,
        patience: Duration,
        what: &str,
        mut done: impl FnMut() -> Result<bool>,
    ) -> Result<()> {
        let deadline = Instant::now() + patience;
        loop {
            if done().unwrap_or(false) {
                return Ok(());
            }
            if self.agent.as_ref().is_some_and(Process::exited) {
                bail!("the agent exited waiting for {what}:\n{}", self.log());
            }
            if Instant::now() > deadline {
                bail!("timed out waiting for {what}; agent log:\n{}", self.log());
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until a new connection from agent A reaches `service`.
    fn reaches(&self, service: SocketAddr) -> Result<()> {
        self.wait_for("agent A to reach the service through the tunnel", || {
            tcp_echo_works(&self.ns, AGENT_A, service, PATIENCE)
        })
    }

    /// Adds `address` (with its prefix length) to `interface` in the
    /// node's namespace.
    fn ip_addr(&self, address: &str, interface: &str) -> Result<()> {
        self.ns.ip(&["addr", "add", address, "dev", interface])?;
        Ok(())
    }

    /// `mesh-agent ARGS --state-dir STATE`, asking the running agent.
    fn control(&self, args: &[&str]) -> Result<()> {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_mesh-agent"))
            .args(args)
            .arg("--state-dir")
            .arg(self.state.path())
            .output()?;
        ensure!(output.status.success(), "{args:?}: {output:?}");
        Ok(())
    }

    /// Waits up to a second for `id` to be revoked here by the mesh on
    /// node A's word (`revoked`), or no longer; how long it took.
    fn mesh_revokes_within_a_second(&self, id: &str, revoked: bool) -> Result<Duration> {
        let start = Instant::now();
        loop {
            let file =
                std::fs::read_to_string(self.state.path().join("revoked.json")).unwrap_or_default();
            if (file.contains(id) && file.contains("revoked on node node-a")) == revoked {
                return Ok(start.elapsed());
            }
            ensure!(
                start.elapsed() < Duration::from_secs(1),
                "{} of {id} took more than a second; log:\n{}",
                if revoked { "revoking" } else { "lifting" },
                self.log()
            );
            thread::sleep(Duration::from_millis(10));
        }
    }

    fn rotate_key(&self) -> Result<()> {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_mesh-agent"))
            .args(["node", "rotate-key", "--state-dir"])
            .arg(self.state.path())
            .output()?;
        ensure!(output.status.success(), "rotate-key: {output:?}");
        Ok(())
    }
}

/// Two nodes, A at 192.0.2.1 and B at 192.0.2.2 on the underlay veth.
fn two_nodes(mesh: &Mesh) -> Result<(Node, Node)> {
    let a = NetNs::new()?;
    let b = NetNs::new()?;
    veth_pair(
        &VethEnd {
            ns: &a,
            name: "under-a",
            addr: Ipv4Addr::new(192, 0, 2, 1),
        },
        &VethEnd {
            ns: &b,
            name: "under-b",
            addr: Ipv4Addr::new(192, 0, 2, 2),
        },
    )?;
    Ok((
        Node::new(a, "node-a", Ipv4Addr::new(192, 0, 2, 1), mesh)?,
        Node::new(b, "node-b", Ipv4Addr::new(192, 0, 2, 2), mesh)?,
    ))
}

/// A and B joined with prefixes 198.18.1.0/24 and 198.18.2.0/24, each
/// with the other as its peer.
fn joined(mesh: &Mesh) -> Result<(Node, Node)> {
    joined_with(mesh, &[])
}

/// [`joined`], with `a_args` added to A's `mesh-agent run`.
fn joined_with(mesh: &Mesh, a_args: &[&str]) -> Result<(Node, Node)> {
    let (mut a, mut b) = two_nodes(mesh)?;
    let token = a.token(mesh, "198.18.1.0/24", HOUR, SystemTime::now())?;
    let mut command = a.command(
        &token,
        &policy(&format!("\"{GRANTED}/tcp\", \"{UNGRANTED}/tcp\"")),
    )?;
    command.args(a_args);
    a.start_command(command)?;
    b.join(mesh, "198.18.2.0/24", &granted_only())?;
    for node in [&a, &b] {
        node.wait_for("one peer", || Ok(node.metric("mesh_node_peers")? == 1.0))?;
    }
    Ok((a, b))
}

/// Three nodes on one underlay segment (a bridge in a namespace of its
/// own): A, B and C at 192.0.2.1, .2 and .3. The bridge's namespace is
/// returned too, to be dropped with them.
fn three_nodes(mesh: &Mesh) -> Result<(NetNs, [Node; 3])> {
    let lan = NetNs::new()?;
    lan.ip(&["link", "add", "br0", "type", "bridge"])?;
    lan.ip(&["link", "set", "br0", "up"])?;
    let mut nodes = Vec::new();
    for (n, name) in [(1u8, "node-a"), (2, "node-b"), (3, "node-c")] {
        let ns = NetNs::new()?;
        let port = format!("lan-{n}");
        ns.ip(&[
            "link",
            "add",
            "under",
            "type",
            "veth",
            "peer",
            "name",
            &port,
            "netns",
            lan.name(),
        ])?;
        lan.ip(&["link", "set", &port, "master", "br0", "up"])?;
        let address = Ipv4Addr::new(192, 0, 2, n);
        ns.ip(&["addr", "add", &format!("{address}/24"), "dev", "under"])?;
        ns.ip(&["link", "set", "under", "up"])?;
        nodes.push(Node::new(ns, name, address, mesh)?);
    }
    let nodes: [Node; 3] = nodes
        .try_into()
        .map_err(|_| anyhow::anyhow!("three nodes"))?;
    Ok((lan, nodes))
}

/// Frames seen on an interface while a capture runs: a raw AF_PACKET
/// socket, opened in the interface's namespace.
struct Capture {
    stop: Arc<AtomicBool>,
    thread: thread::JoinHandle<Vec<Vec<u8>>>,
}

impl Capture {
    fn start(ns: &NetNs, interface: &str) -> Result<Self> {
        let interface = interface.to_owned();
        let socket = ns.enter(move || -> Result<OwnedFd> {
            let protocol = (libc::ETH_P_ALL as u16).to_be() as i32;
            // SAFETY: plain socket calls; the descriptor is owned at once.
            let socket = unsafe {
                let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, protocol);
                ensure!(
                    fd >= 0,
                    "AF_PACKET socket: {}",
                    std::io::Error::last_os_error()
                );
                OwnedFd::from_raw_fd(fd)
            };
            let name = std::ffi::CString::new(interface)?;
            // SAFETY: a valid C string.
            let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
            ensure!(index != 0, "no interface {name:?}");
            // SAFETY: a zeroed sockaddr_ll with family, protocol and index.
            unsafe {
                let mut address: libc::sockaddr_ll = std::mem::zeroed();
                address.sll_family = libc::AF_PACKET as u16;
                address.sll_protocol = protocol as u16;
                address.sll_ifindex = index as i32;
                let bound = libc::bind(
                    socket.as_raw_fd(),
                    std::ptr::from_ref(&address).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                );
                ensure!(bound == 0, "bind: {}", std::io::Error::last_os_error());
                let timeout = libc::timeval {
                    tv_sec: 0,
                    tv_usec: 50_000,
                };
                libc::setsockopt(
                    socket.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_RCVTIMEO,
                    std::ptr::from_ref(&timeout).cast(),
                    std::mem::size_of::<libc::timeval>() as u32,
                );
            }
            Ok(socket)
        })??;
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = thread::spawn(move || {
            let mut frames = Vec::new();
            let mut buf = vec![0u8; 65536];
            // Bounded in time by the caller, in count here.
            while !stopping.load(Ordering::Relaxed) && frames.len() < 100_000 {
                // SAFETY: reads into a buffer of the given length.
                let n = unsafe {
                    libc::recv(socket.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0)
                };
                if n > 0 {
                    frames.push(buf[..n as usize].to_vec());
                }
            }
            frames
        });
        Ok(Self { stop, thread })
    }

    fn finish(self) -> Vec<Vec<u8>> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or_default()
    }
}

/// What a frame on the underlay is, for the capture check: `Ok(true)` for
/// WireGuard (UDP to or from the listen port), `Ok(false)` for ARP and
/// IPv6 neighbour traffic, `Err` with a description for anything else.
fn wireguard_only(frame: &[u8]) -> Result<bool, String> {
    let ethertype = u16::from_be_bytes([frame[12], frame[13]]);
    match ethertype {
        0x0806 | 0x86dd => Ok(false),
        0x0800 => {
            let ip = &frame[14..];
            let header = usize::from(ip[0] & 0x0f) * 4;
            let udp = &ip[header..];
            let ports = [
                u16::from_be_bytes([udp[0], udp[1]]),
                u16::from_be_bytes([udp[2], udp[3]]),
            ];
            if ip[9] == 17 && ports.contains(&PORT) {
                Ok(true)
            } else {
                Err(format!("IPv4 protocol {} ports {ports:?}", ip[9]))
            }
        }
        other => Err(format!("ethertype {other:#06x}")),
    }
}

/// The destination of an IPv4 frame.
fn ipv4_destination(frame: &[u8]) -> Option<Ipv4Addr> {
    let ip = frame.get(14..)?;
    (frame.get(12..14)? == [0x08, 0x00]).then_some(())?;
    let destination: [u8; 4] = ip.get(16..20)?.try_into().ok()?;
    Some(destination.into())
}

/// Encrypt or drop, with traffic: node A, with no peer for `to`'s address
/// in the mesh, sends to it — a TCP connection and a datagram, from `from`
/// (A's agent, which A's policy lets reach `to`; `None` once the agent is
/// gone) — while its underlay is captured. The connection fails and no
/// frame for the mesh leaves in clear, though a default route via B's
/// underlay address would carry it: it carries a datagram to an address
/// outside the mesh, sent to prove that the capture sees clear traffic.
fn nothing_leaves_a_in_clear(a: &Node, from: Option<Ipv4Addr>, to: SocketAddr) -> Result<()> {
    a.ns.ip(&["route", "replace", "default", "via", "192.0.2.2"])?;
    let outside = SocketAddr::from(([203, 0, 113, 1], 9));
    let capture = Capture::start(&a.ns, "under-a")?;
    let sent = a.ns.enter(|| -> Result<std::io::Result<()>> {
        let source = SocketAddr::from((from.unwrap_or(Ipv4Addr::UNSPECIFIED), 0));
        // Into the mesh: dropped, whether it gets an error or not.
        if let Ok(udp) = std::net::UdpSocket::bind(source) {
            let _ = udp.send_to(b"in clear?", to);
        }
        std::net::UdpSocket::bind("0.0.0.0:0")?.send_to(b"in clear", outside)?;
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
        socket.bind(&source.into())?;
        Ok(socket.connect_timeout(&to.into(), PATIENCE))
    })?;
    // The capture reads in 50 ms steps: let it see the last frames.
    thread::sleep(Duration::from_millis(200));
    let frames = capture.finish();
    let connected = sent?;
    ensure!(
        connected.is_err(),
        "A connected to {to} with no peer for it"
    );
    let mesh: ipnet::Ipv4Net = MESH.parse()?;
    let mut outside_seen = false;
    for destination in frames.iter().filter_map(|frame| ipv4_destination(frame)) {
        ensure!(
            !mesh.contains(&destination),
            "a packet for {destination} left A's underlay in clear"
        );
        outside_seen |= IpAddr::V4(destination) == outside.ip();
    }
    ensure!(
        outside_seen,
        "the capture saw no clear datagram, so it proves nothing"
    );
    Ok(())
}

/// A's agent reaches B's granted service and not its ungranted port, B
/// enforcing; meanwhile B's underlay carries WireGuard and nothing else.
fn reaches_b_through_wireguard_only(a: &Node, b: &Node) -> Result<()> {
    let capture = Capture::start(&b.ns, "under-b")?;
    // The first handshake may take a moment.
    let reached = a.reaches(SERVICE_B);
    let ungranted = SocketAddr::from(([198, 18, 2, 1], UNGRANTED));
    let denied = b.denied()?;
    let refused = !tcp_echo_works(&a.ns, AGENT_A, ungranted, PATIENCE)?;
    let frames = capture.finish();
    reached.with_context(|| format!("B's log:\n{}", b.log()))?;
    ensure!(refused, "B let through a port its policy does not grant");
    // What refused it was B's datapath, not something on the way.
    b.wait_for("B's datapath to count the denial", || {
        Ok(b.denied()? > denied)
    })?;
    let mut tunnelled = 0;
    for frame in &frames {
        match wireguard_only(frame) {
            Ok(wireguard) => tunnelled += usize::from(wireguard),
            Err(what) => bail!("the underlay carried something other than WireGuard: {what}"),
        }
    }
    ensure!(tunnelled > 0, "no WireGuard packets on the underlay");
    Ok(())
}

#[test]
fn a_reaches_its_granted_service_on_b_through_wireguard_only() -> Result<()> {
    require_root();
    let mesh = Mesh::new()?;
    let (mut a, mut b) = joined(&mesh)?;
    for port in [GRANTED, UNGRANTED] {
        tcp_echo_server(&b.ns, SocketAddr::from(([198, 18, 2, 1], port)))?;
    }

    reaches_b_through_wireguard_only(&a, &b)?;
    for (node, underlay) in [(&a, "under-a"), (&b, "under-b")] {
        // Room for WireGuard's headers: the underlay's MTU less 80 bytes.
        let (tunnel, under) = (node.mtu("mesh0")?, node.mtu(underlay)?);
        ensure!(
            tunnel + 80 == under,
            "{}: mesh0's MTU {tunnel} is not {underlay}'s {under} less 80",
            node.name
        );
        node.key_not_logged()?;
    }

    // The store goes (its folder moved away): the last good state stays,
    // but for a peer whose join token expires meanwhile. A node with a
    // short-lived token is a peer first.
    let brief = Duration::from_secs(12);
    let issued = SystemTime::now();
    mesh.plant(
        &mesh.admin,
        "brief",
        "198.18.6.0/24",
        "198.18.6.0/24",
        (issued, brief),
    )?;
    let peers = || a.metric("mesh_node_peers");
    a.wait_for("the short-lived node to become a peer", || {
        Ok(peers()? == 2.0)
    })?;
    let store_errors = || a.metric("mesh_node_store_errors_total");
    let errors = store_errors()?;
    let lost = mesh.dir.path().join("store.lost");
    std::fs::rename(mesh.store_dir(), &lost)?;
    a.wait_for("the store to fail", || Ok(store_errors()? > errors))?;
    ensure!(peers()? == 2.0, "losing the store lost a peer");
    a.reaches(SERVICE_B)?;
    let errors = store_errors()?;
    a.wait_up_to(
        brief + Duration::from_secs(10),
        "the expired peer to go",
        || Ok(peers()? == 1.0),
    )?;
    ensure!(
        SystemTime::now() >= issued + brief - Duration::from_secs(1),
        "the short-lived peer went before its token expired"
    );
    ensure!(
        store_errors()? > errors,
        "the store was read again before the expired peer went"
    );
    a.reaches(SERVICE_B)?;
    std::fs::rename(&lost, mesh.store_dir())?;

    // B leaves: its record goes, and A drops the peer.
    b.agent.take();
    std::fs::remove_file(mesh.store_dir().join("node-b.json"))?;
    a.wait_for("the removed node's peer to go", || Ok(peers()? == 0.0))?;
    // With no peer for B's prefix, nothing for it leaves in clear.
    nothing_leaves_a_in_clear(&a, Some(AGENT_A), SERVICE_B)?;

    // A stops: the blackhole under the mesh's range stays until teardown,
    // and still nothing for the mesh leaves in clear.
    a.agent.take();
    let blackhole = |a: &Node| -> Result<bool> {
        Ok(a.ns
            .ip(&["route", "show", "proto", "77"])?
            .contains(&format!("blackhole {MESH}")))
    };
    ensure!(blackhole(&a)?, "no blackhole route after the agent stopped");
    nothing_leaves_a_in_clear(&a, None, SERVICE_B)?;
    let output = a.teardown()?;
    ensure!(
        String::from_utf8_lossy(&output.stdout).contains("mesh interface mesh0"),
        "teardown did not remove the mesh interface: {output:?}"
    );
    ensure!(!blackhole(&a)?, "teardown left the mesh's routes");
    Ok(())
}

#[test]
fn records_with_bad_join_tokens_or_signatures_never_become_peers() -> Result<()> {
    require_root();
    let mesh = Mesh::new()?;
    let (mut a, _b) = two_nodes(&mesh)?;
    let now = SystemTime::now();
    let forger = IssuerKey::generate(Algorithm::EdDsa, Some("admin".into()))?;
    let current = (now, HOUR);
    mesh.plant(&forger, "forged", "198.18.2.0/24", "198.18.2.0/24", current)?;
    let expired = (now - HOUR, Duration::from_secs(1));
    mesh.plant(
        &mesh.admin,
        "expired",
        "198.18.4.0/24",
        "198.18.4.0/24",
        expired,
    )?;
    mesh.plant(
        &mesh.admin,
        "greedy",
        "198.18.5.0/24",
        "198.18.4.0/23",
        current,
    )?;
    let (good_key, mut good) = mesh.plant(
        &mesh.admin,
        "good",
        "198.18.6.0/24",
        "198.18.6.0/24",
        current,
    )?;

    // A node whose own token has expired does not start at all, nor does
    // one whose token names another node key.
    let own_expired = a.token(&mesh, "198.18.1.0/24", Duration::from_secs(1), now - HOUR)?;
    let output = a.command(&own_expired, &granted_only())?.output()?;
    ensure!(
        !output.status.success(),
        "an agent with an expired token ran"
    );
    ensure!(a.log().contains("expired"), "no reason given: {}", a.log());
    let foreign = token::issue(
        &mesh.admin,
        &"node-a".parse()?,
        "198.18.1.0/24".parse()?,
        &SigningKey::generate()?.public(),
        HOUR,
        now,
    )?;
    let output = a.command(&foreign, &granted_only())?.output()?;
    ensure!(
        !output.status.success(),
        "an agent ran with another node's token"
    );
    ensure!(
        a.log().contains("bound to node key"),
        "no reason given: {}",
        a.log()
    );

    // `run --check` checks the token as the start would, and says so.
    let token = a.token(&mesh, "198.18.1.0/24", HOUR, now)?;
    let output = a
        .command(&token, &granted_only())?
        .arg("--check")
        .stdout(Stdio::piped())
        .output()?;
    let said = String::from_utf8_lossy(&output.stdout);
    ensure!(
        output.status.success()
            && said.contains("join as node node-a owning 198.18.1.0/24")
            && said.contains("bound to this node's key"),
        "run --check: {output:?}"
    );
    let output = a
        .command(&foreign, &granted_only())?
        .arg("--check")
        .output()?;
    ensure!(
        !output.status.success(),
        "run --check passed another node's token"
    );

    a.start(&token, &granted_only())?;
    a.wait_for("the good record to become the only peer", || {
        Ok(a.metric("mesh_node_peers")? == 1.0)
    })?;
    for (entry, reason) in [
        ("forged", "bad_signature"),
        ("expired", "expired"),
        ("greedy", "prefix_not_granted"),
    ] {
        ensure!(a.rejected(reason)? == 1.0, "{reason} is not counted once");
        let logged = a.log().lines().any(|line| {
            line.contains("node record rejected")
                && line.contains(&format!("entry=\"{entry}\""))
                && line.contains(&format!("reason=\"{reason}\""))
        });
        ensure!(
            logged,
            "the rejection of {entry} ({reason}) is not logged:\n{}",
            a.log()
        );
    }
    // The forged node claims B's prefix, whose traffic A must not send in
    // clear though no peer takes it.
    nothing_leaves_a_in_clear(&a, Some(AGENT_A), SERVICE_B)?;

    // The good node's token, stolen from the store, with another
    // WireGuard key: not signed by the good node's key, so not believed.
    let newer = |record: &NodeRecord| -> Result<NodeRecord> {
        Ok(NodeRecord {
            public_key: NodeKey::generate()?.public(),
            sequence: record.sequence + 1,
            ..record.clone()
        })
    };
    let stolen = newer(&good)?;
    mesh.write(&SigningKey::generate()?, &stolen)?;
    a.wait_for("the stolen token to be rejected", || {
        Ok(a.rejected("bad_record_signature")? == 1.0)
    })?;
    // The good node rotates its key, then its older record is replayed.
    let old = good.clone();
    good = newer(&good)?;
    mesh.write(&good_key, &good)?;
    thread::sleep(Duration::from_millis(300));
    mesh.write(&good_key, &old)?;
    a.wait_for("the replayed record to be rejected", || {
        Ok(a.rejected("replayed")? == 1.0)
    })?;
    ensure!(
        a.metric("mesh_node_peers")? == 1.0,
        "a rejected record took the good node's peer away"
    );
    Ok(())
}

/// Accepts connections on `addr` in `ns` and echoes everything, on a thread
/// that lives as long as the test process.
fn tcp_stream_echo_server(ns: &NetNs, addr: SocketAddr) -> Result<()> {
    let listener = ns.enter(|| std::net::TcpListener::bind(addr))??;
    thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            thread::spawn(move || {
                let mut buf = [0u8; 256];
                while let Ok(n @ 1..) = stream.read(&mut buf) {
                    if stream.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    Ok(())
}

#[test]
fn a_key_rotation_keeps_a_tcp_connection() -> Result<()> {
    require_root();
    let mesh = Mesh::new()?;
    // B is told to make a new key; A makes one every 20 s on its own.
    let (a, b) = joined_with(&mesh, &["--key-rotation=20s"])?;
    tcp_stream_echo_server(&b.ns, SERVICE_B)?;
    a.reaches(SERVICE_B)?;
    let mut stream = a.ns.enter(|| -> Result<TcpStream> {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
        socket.bind(&SocketAddr::from((AGENT_A, 0)).into())?;
        socket.connect_timeout(&SERVICE_B.into(), PATIENCE)?;
        Ok(socket.into())
    })??;
    // TCP retransmits across the pause; 20 s is far beyond any.
    stream.set_read_timeout(Some(Duration::from_secs(20)))?;
    let echo = |stream: &mut TcpStream, n: u32| -> Result<Duration> {
        let sent = Instant::now();
        stream.write_all(&n.to_be_bytes())?;
        let mut back = [0u8; 4];
        stream.read_exact(&mut back)?;
        ensure!(back == n.to_be_bytes(), "echoed {back:?} for {n}");
        Ok(sent.elapsed())
    };
    echo(&mut stream, 0)?;

    let rotations = |node: &Node| node.metric("mesh_node_key_rotations_total");
    // Echoes on the connection until `rotated`, and 20 times more: the
    // rotation happens while the connection carries traffic, and it
    // survives. The longest round trip.
    let mut n = 0;
    let mut across = |what: &str, patience: Duration, rotated: &dyn Fn() -> Result<bool>| {
        let start = Instant::now();
        let (mut longest, mut after) = (Duration::ZERO, None);
        while after.is_none_or(|echoes| echoes < 20) {
            n += 1;
            let round_trip = echo(&mut stream, n).with_context(|| {
                format!("the connection broke; logs:\n{}\n{}", a.log(), b.log())
            })?;
            longest = longest.max(round_trip);
            after = match after {
                Some(echoes) => Some(echoes + 1),
                None => rotated()?.then_some(0),
            };
            ensure!(
                start.elapsed() < patience,
                "{what} did not happen within {patience:?}; logs:\n{}\n{}",
                a.log(),
                b.log()
            );
            thread::sleep(Duration::from_millis(50));
        }
        Ok::<_, anyhow::Error>(longest)
    };
    b.rotate_key()?;
    let asked = across("B's rotation", Duration::from_secs(15), &|| {
        Ok(rotations(&b)? == 1.0)
    })?;
    // A's timer fires 20 s after its start, after B's rotation.
    let timed = across("A's timed rotation", Duration::from_secs(30), &|| {
        Ok(rotations(&a)? >= 1.0)
    })?;
    // Each follows the other: a new connection goes through to the new
    // keys too.
    a.reaches(SERVICE_B)?;
    ensure!(a.metric("mesh_node_peers")? == 1.0, "A lost its peer");
    for node in [&a, &b] {
        node.key_not_logged()?;
    }
    eprintln!(
        "key rotation: the connection survived; longest round trip {asked:?} \
         across rotate-key, {timed:?} across --key-rotation"
    );
    Ok(())
}

/// An etcd cluster of `count` members in a node's namespace, serving
/// clients on its underlay address and talking among themselves on the
/// namespace's loopback; killed on drop, and its data removed.
struct Etcd {
    host: Ipv4Addr,
    members: Vec<Option<Process>>,
    data: tempfile::TempDir,
}

impl Etcd {
    fn start(ns: &NetNs, host: Ipv4Addr, count: usize) -> Result<Self> {
        let mut etcd = Self {
            host,
            members: (0..count).map(|_| None).collect(),
            data: tempfile::Builder::new().prefix("mesh-etcd-").tempdir()?,
        };
        for member in 0..count {
            etcd.start_member(ns, member)?;
        }
        etcd.wait_healthy(ns)?;
        Ok(etcd)
    }

    fn client_url(&self, member: usize) -> String {
        format!("http://{}:{}", self.host, 23790 + member)
    }

    fn peer_url(member: usize) -> String {
        format!("http://127.0.0.1:{}", 23800 + member)
    }

    /// `--store` for the agents.
    fn store(&self) -> String {
        let endpoints: Vec<String> = (0..self.members.len())
            .map(|m| self.client_url(m).replace("http://", ""))
            .collect();
        format!("etcd://{}/mesh-test", endpoints.join(","))
    }

    /// Starts member `member` (again, with its data, after `stop`).
    fn start_member(&mut self, ns: &NetNs, member: usize) -> Result<()> {
        let cluster: Vec<String> = (0..self.members.len())
            .map(|m| format!("m{m}={}", Self::peer_url(m)))
            .collect();
        let client = self.client_url(member);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.data.path().join(format!("m{member}.log")))?;
        let mut command = ns.command("etcd")?;
        command
            .arg(format!("--name=m{member}"))
            .arg(format!(
                "--data-dir={}",
                self.data.path().join(format!("m{member}")).display()
            ))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={}", Self::peer_url(member)))
            .arg(format!(
                "--initial-advertise-peer-urls={}",
                Self::peer_url(member)
            ))
            .arg(format!("--initial-cluster={}", cluster.join(",")))
            .arg("--initial-cluster-state=new")
            .arg("--initial-cluster-token=mesh-test")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        self.members[member] = Some(Process::spawn(command)?);
        Ok(())
    }

    fn stop(&mut self, member: usize) {
        self.members[member].take();
    }

    /// Waits until every running member answers as healthy.
    fn wait_healthy(&self, ns: &NetNs) -> Result<()> {
        let endpoints: Vec<String> = (0..self.members.len())
            .filter(|m| self.members[*m].is_some())
            .map(|m| self.client_url(m))
            .collect();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let healthy = ns
                .command("etcdctl")?
                .arg(format!("--endpoints={}", endpoints.join(",")))
                .args(["--dial-timeout=1s", "--command-timeout=2s"])
                .args(["endpoint", "health"])
                .env("ETCDCTL_API", "3")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()?
                .success();
            if healthy {
                return Ok(());
            }
            if Instant::now() > deadline {
                let logs: Vec<String> = (0..self.members.len())
                    .map(|m| {
                        std::fs::read_to_string(self.data.path().join(format!("m{m}.log")))
                            .unwrap_or_default()
                    })
                    .collect();
                bail!("etcd did not become healthy:\n{}", logs.join("\n---\n"));
            }
            thread::sleep(Duration::from_millis(200));
        }
    }
}

#[test]
fn an_etcd_store_outlives_its_members_and_ages_out_dead_nodes() -> Result<()> {
    require_root();
    let mesh = Mesh::new()?;
    let (mut a, mut b) = two_nodes(&mesh)?;
    // The cluster serves on A's underlay address, so both nodes reach it.
    let mut etcd = Etcd::start(&a.ns, a.underlay, 3)?;
    for node in [&mut a, &mut b] {
        node.store = etcd.store();
    }
    a.join(
        &mesh,
        "198.18.1.0/24",
        &policy(&format!("\"{GRANTED}/tcp\", \"{UNGRANTED}/tcp\"")),
    )?;
    b.join(&mesh, "198.18.2.0/24", &granted_only())?;
    for node in [&a, &b] {
        node.wait_for("one peer", || Ok(node.metric("mesh_node_peers")? == 1.0))?;
    }
    tcp_stream_echo_server(&b.ns, SERVICE_B)?;
    a.reaches(SERVICE_B)?;
    // Revocations travel through etcd too.
    let id = "spiffe://test.internal/agent/a";
    a.control(&["revoke", id])?;
    b.mesh_revokes_within_a_second(id, true)?;
    a.control(&["unrevoke", id])?;
    b.mesh_revokes_within_a_second(id, false)?;
    a.reaches(SERVICE_B)?;

    // One member goes: the other two still make a quorum, and B's new key
    // reaches A through them.
    etcd.stop(0);
    b.rotate_key()?;
    b.wait_for("B to take the new key", || {
        Ok(b.metric("mesh_node_key_rotations_total")? == 1.0)
    })?;
    a.reaches(SERVICE_B)?;

    // The whole cluster goes: nothing changes, though the store errors.
    etcd.stop(1);
    etcd.stop(2);
    a.wait_for("the store to fail", || {
        Ok(a.metric("mesh_node_store_errors_total")? >= 2.0)
    })?;
    ensure!(
        a.metric("mesh_node_peers")? == 1.0,
        "losing etcd lost a peer"
    );
    a.reaches(SERVICE_B)?;

    // Back, with its data; then B dies without a word, and its record ages
    // out with its lease.
    for member in 0..3 {
        etcd.start_member(&a.ns, member)?;
    }
    etcd.wait_healthy(&a.ns)?;
    thread::sleep(Duration::from_secs(6));
    ensure!(
        a.metric("mesh_node_peers")? == 1.0,
        "etcd's return lost a peer"
    );
    if let Some(agent) = &mut b.agent {
        let _ = agent.0.kill();
        let _ = agent.0.wait();
    }
    a.wait_up_to(
        Duration::from_secs(30),
        "the dead node's record to age out",
        || Ok(a.metric("mesh_node_peers")? == 0.0),
    )?;
    Ok(())
}

#[test]
fn three_nodes_each_peer_with_the_others_and_one_leaves() -> Result<()> {
    require_root();
    let mesh = Mesh::new()?;
    let (_lan, [mut a, mut b, mut c]) = three_nodes(&mesh)?;
    // One policy for all: A's agent may reach the echo services of B and C.
    let policy = format!(
        r#"version = 1
trust_domain = "test.internal"

[[identity]]
id = "spiffe://test.internal/agent/a"
addresses = ["198.18.1.1/32"]

[[service]]
name = "echo"
addresses = ["198.18.2.1/32", "198.18.3.1/32"]
ports = ["{GRANTED}/tcp"]

[[grant]]
from = ["spiffe://test.internal/agent/a"]
to = ["echo"]
ports = ["{GRANTED}/tcp"]
"#
    );
    a.join(&mesh, "198.18.1.0/24", &policy)?;
    b.join(&mesh, "198.18.2.0/24", &policy)?;
    c.join(&mesh, "198.18.3.0/24", &policy)?;
    for node in [&a, &b, &c] {
        node.wait_for("two peers", || Ok(node.metric("mesh_node_peers")? == 2.0))?;
    }
    let service_c = SocketAddr::from(([198, 18, 3, 1], GRANTED));
    tcp_stream_echo_server(&b.ns, SERVICE_B)?;
    tcp_stream_echo_server(&c.ns, service_c)?;
    a.reaches(SERVICE_B)?;
    a.reaches(service_c)?;

    // C leaves; A and B drop it, and keep each other.
    c.agent.take();
    std::fs::remove_file(mesh.store_dir().join("node-c.json"))?;
    for node in [&a, &b] {
        node.wait_for("the removed node's peer to go", || {
            Ok(node.metric("mesh_node_peers")? == 1.0)
        })?;
    }
    a.reaches(SERVICE_B)?;
    ensure!(
        !tcp_echo_works(&a.ns, AGENT_A, service_c, PATIENCE)?,
        "A still reaches the node that left"
    );
    Ok(())
}

#[test]
fn the_underlay_shield_admits_peers_and_services_and_drops_the_rest() -> Result<()> {
    require_root();
    let mesh = Mesh::new()?;
    let (mut a, mut b) = two_nodes(&mesh)?;
    let token = a.token(&mesh, "198.18.1.0/24", HOUR, SystemTime::now())?;
    let start_a = |a: &mut Node| -> Result<()> {
        let mut command = a.command(
            &token,
            &policy(&format!("\"{GRANTED}/tcp\", \"{UNGRANTED}/tcp\"")),
        )?;
        command.args([
            "--underlay=under-a",
            "--underlay-allow=tcp/2222@192.0.2.0/24",
            "--underlay-allow=udp-from/5353@192.0.2.2/32",
            "--handshake-rate=5",
            "--handshake-rate-total=50",
        ]);
        a.agent = Some(Process::spawn(command)?);
        a.wait_for("the agent to be ready", || {
            Ok(a.http("/readyz")?.starts_with("HTTP/1.1 200"))
        })
    };
    start_a(&mut a)?;
    b.join(&mesh, "198.18.2.0/24", &granted_only())?;
    for node in [&a, &b] {
        node.wait_for("one peer", || Ok(node.metric("mesh_node_peers")? == 1.0))?;
    }
    let shield = |a: &Node, verdict: &str, reason: &str| {
        a.metric(&format!(
            "mesh_underlay_packets_total{{reason=\"{reason}\",verdict=\"{verdict}\"}}"
        ))
    };

    // The tunnel works through the shield: B's WireGuard is a peer's.
    tcp_stream_echo_server(&b.ns, SERVICE_B)?;
    a.reaches(SERVICE_B)?;
    ensure!(
        shield(&a, "pass", "peer")? > 0.0,
        "no WireGuard admitted as a peer's"
    );

    // A host service on A is open to B's subnet; another port is not.
    for port in [2222, 2223] {
        tcp_stream_echo_server(&a.ns, SocketAddr::from(([192, 0, 2, 1], port)))?;
    }
    let from_b = Ipv4Addr::new(192, 0, 2, 2);
    let open = |port: u16| {
        tcp_echo_works(
            &b.ns,
            from_b,
            SocketAddr::from(([192, 0, 2, 1], port)),
            PATIENCE,
        )
    };
    ensure!(open(2222)?, "the allowed host service is shut");
    ensure!(
        shield(&a, "pass", "service")? > 0.0,
        "no service packet counted"
    );
    ensure!(!open(2223)?, "a host service that is not allowed is open");
    ensure!(
        shield(&a, "drop", "other")? > 0.0,
        "no dropped packet counted"
    );

    // UDP answers from the server A named (B's port 5353) reach A's
    // socket; from another port of B they do not.
    let answers = a.ns.enter(|| -> Result<std::net::UdpSocket> {
        let socket = std::net::UdpSocket::bind("192.0.2.1:0")?;
        socket.set_read_timeout(Some(PATIENCE))?;
        Ok(socket)
    })??;
    let to_a = answers.local_addr()?;
    let answer_from = |port: u16| -> Result<bool> {
        b.ns.enter(|| std::net::UdpSocket::bind(("192.0.2.2", port))?.send_to(b"answer", to_a))??;
        let mut buf = [0u8; 16];
        Ok(answers.recv(&mut buf).is_ok())
    };
    ensure!(answer_from(5353)?, "the named server's answer was dropped");
    ensure!(!answer_from(5354)?, "an answer from another port passed");

    // A flood at the WireGuard port from a source that is no peer: about
    // a burst's worth (twice the rate) gets through, the rest is dropped.
    b.ip_addr("192.0.2.77/24", "under-b")?;
    let sent = b.ns.enter(|| -> Result<usize> {
        let socket = std::net::UdpSocket::bind("192.0.2.77:0")?;
        let initiation = [1u8; 148];
        for _ in 0..200 {
            socket.send_to(&initiation, ("192.0.2.1", PORT))?;
        }
        Ok(200)
    })??;
    a.wait_for("the flood to be counted", || {
        Ok(
            shield(&a, "pass", "handshake")? + shield(&a, "drop", "handshake_limited")?
                >= sent as f64,
        )
    })?;
    let admitted = shield(&a, "pass", "handshake")?;
    ensure!(
        (10.0..=15.0).contains(&admitted),
        "{admitted} of {sent} handshakes from one subnet admitted; expected a burst of about 10"
    );
    // The peer is unaffected.
    a.reaches(SERVICE_B)?;

    // A's agent dies: the shield stays, pinned, and still drops.
    if let Some(agent) = &mut a.agent {
        let _ = agent.0.kill();
        let _ = agent.0.wait();
    }
    ensure!(
        open(2222)?,
        "without its agent, the shield shut the allowed service"
    );
    ensure!(
        !open(2223)?,
        "without its agent, the shield let through another port"
    );
    // A new agent adopts it, counters and all, and carries on.
    let dropped = shield(&a, "drop", "other").unwrap_or_default();
    start_a(&mut a)?;
    ensure!(
        !open(2223)?,
        "the adopting agent's shield let another port through"
    );
    ensure!(
        shield(&a, "drop", "other")? > dropped,
        "the adopting agent's shield counters started over or stayed still"
    );
    // Teardown takes it off the underlay: the port is open as before mesh.
    a.agent.take();
    a.teardown()?;
    let xdp = a.ns.ip(&["link", "show", "under-a"])?;
    ensure!(!xdp.contains("xdp"), "teardown left the shield: {xdp}");
    ensure!(open(2223)?, "after teardown the underlay is still shielded");
    Ok(())
}

/// `mesh-agent node revoke` with the admin key in `keys`, of node `node`.
fn revoke_node(mesh: &Mesh, keys: &std::path::Path, node: &str) -> Result<()> {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_mesh-agent"))
        .args(["node", "revoke", "--node", node, "--reason", "compromised"])
        .arg("--key")
        .arg(keys.join(mesh_agent::identity::KEY_FILE))
        .arg("--store")
        .arg(&mesh.store)
        .output()?;
    ensure!(output.status.success(), "node revoke: {output:?}");
    Ok(())
}

#[test]
fn a_revoked_node_is_no_peer_until_a_newer_token_admits_it() -> Result<()> {
    require_root();
    let mesh = Mesh::new()?;
    let (mut a, mut b) = joined(&mesh)?;
    tcp_stream_echo_server(&b.ns, SERVICE_B)?;
    a.reaches(SERVICE_B)?;
    let rejected = |node: &Node, reason: &str| {
        node.metric(&format!(
            "mesh_node_records_rejected_total{{reason=\"{reason}\"}}"
        ))
    };

    // A revocation signed with another key than the admin's is no
    // revocation.
    let forger = tempfile::tempdir()?;
    IssuerKey::generate(Algorithm::EdDsa, Some("admin".into()))?.save(forger.path())?;
    revoke_node(&mesh, forger.path(), "node-b")?;
    a.wait_for("the forged revocation to be rejected", || {
        Ok(rejected(&a, "bad_signature")? >= 1.0)
    })?;
    ensure!(a.metric("mesh_node_peers")? == 1.0, "a forgery revoked B");
    a.reaches(SERVICE_B)?;

    // The admin's: A drops B at once, and refuses its record.
    let admin = tempfile::tempdir()?;
    mesh.admin.save(admin.path())?;
    revoke_node(&mesh, admin.path(), "node-b")?;
    a.wait_for("A to drop the revoked node", || {
        Ok(a.metric("mesh_node_peers")? == 0.0)
    })?;
    ensure!(rejected(&a, "revoked")? >= 1.0, "no revoked record counted");
    ensure!(
        !tcp_echo_works(&a.ns, AGENT_A, SERVICE_B, PATIENCE)?,
        "A still reaches the revoked node"
    );

    // Taking the revocation out of the store lifts nothing: A keeps it,
    // also across a restart.
    std::fs::remove_file(mesh.store_dir().join("revoked-nodes/node-b.json"))?;
    a.agent.take();
    a.join(
        &mesh,
        "198.18.1.0/24",
        &policy(&format!("\"{GRANTED}/tcp\", \"{UNGRANTED}/tcp\"")),
    )?;
    // Two rounds of the periodic check.
    thread::sleep(Duration::from_secs(11));
    ensure!(
        a.metric("mesh_node_peers")? == 0.0,
        "A took the revoked node back"
    );

    // A join token issued after the revocation admits B again.
    thread::sleep(Duration::from_millis(1100));
    b.agent.take();
    b.join(&mesh, "198.18.2.0/24", &granted_only())?;
    a.wait_for("A to take B with its new token", || {
        Ok(a.metric("mesh_node_peers")? == 1.0)
    })?;
    a.reaches(SERVICE_B)?;
    Ok(())
}

#[test]
fn a_revocation_on_a_is_enforced_on_b_within_a_second() -> Result<()> {
    require_root();
    let mesh = Mesh::new()?;
    let (mut a, mut b) = two_nodes(&mesh)?;
    a.join(&mesh, "198.18.1.0/24", &granted_only())?;
    // B knows A's agent by an ID of its own, which A's policy does not
    // name: revoking it on A changes nothing in A's datapath, so what stops
    // the traffic is B.
    let on_b = "spiffe://test.internal/agent/a-seen-by-b";
    b.join(
        &mesh,
        "198.18.2.0/24",
        &granted_only().replace("spiffe://test.internal/agent/a", on_b),
    )?;
    for node in [&a, &b] {
        node.wait_for("one peer", || Ok(node.metric("mesh_node_peers")? == 1.0))?;
    }
    tcp_stream_echo_server(&b.ns, SERVICE_B)?;
    a.reaches(SERVICE_B)?;

    a.control(&["revoke", on_b, "--reason", "test"])?;
    let took = b.mesh_revokes_within_a_second(on_b, true)?;
    ensure!(
        !tcp_echo_works(&a.ns, AGENT_A, SERVICE_B, PATIENCE)?,
        "B let a revoked identity through"
    );
    a.control(&["unrevoke", on_b])?;
    let lifted = b.mesh_revokes_within_a_second(on_b, false)?;
    a.reaches(SERVICE_B)?;
    eprintln!("revocation on A in force on B after {took:?}, lifted after {lifted:?}");
    Ok(())
}

/// Whether this kernel has WireGuard: a link of that type can be made (in
/// a namespace of the check's own). Without it, the test `test` fails if
/// `MESH_KERNEL_WIREGUARD=required`, and otherwise says that it skips.
fn kernel_wireguard(test: &str) -> Result<bool> {
    let ns = NetNs::new()?;
    if ns
        .ip(&["link", "add", "wg-probe", "type", "wireguard"])
        .is_ok()
    {
        return Ok(true);
    }
    ensure!(
        std::env::var("MESH_KERNEL_WIREGUARD").as_deref() != Ok("required"),
        "this kernel has no WireGuard, and MESH_KERNEL_WIREGUARD=required"
    );
    eprintln!(
        "SKIPPED {test}: this kernel has no WireGuard (the kernel VMs run it: cargo xtask vm)"
    );
    Ok(false)
}

/// What `wg show IFACE dump` says about an interface: its public key and
/// listen port, and its peers.
#[derive(Debug)]
struct WgShow {
    public_key: String,
    listen_port: u16,
    peers: Vec<WgPeer>,
}

#[derive(Debug)]
struct WgPeer {
    public_key: String,
    endpoint: String,
    allowed_ips: String,
    /// Seconds since the epoch; 0 before the first handshake.
    latest_handshake: u64,
    received: u64,
    sent: u64,
}

impl WgShow {
    /// Runs `wg show mesh0 dump` in the node's namespace.
    fn of(node: &Node) -> Result<Self> {
        let output = node
            .ns
            .command("wg")?
            .args(["show", "mesh0", "dump"])
            .output()
            .context("running wg")?;
        ensure!(output.status.success(), "wg show: {output:?}");
        let text = String::from_utf8(output.stdout)?;
        let mut lines = text
            .lines()
            .map(|line| line.split('\t').collect::<Vec<_>>());
        // private-key public-key listen-port fwmark
        let interface = lines.next().context("wg show printed nothing")?;
        ensure!(interface.len() == 4, "wg show: {text}");
        // public-key preshared-key endpoint allowed-ips latest-handshake
        // transfer-rx transfer-tx persistent-keepalive
        let peers = lines
            .map(|peer| -> Result<WgPeer> {
                ensure!(peer.len() == 8, "wg show: {text}");
                Ok(WgPeer {
                    public_key: peer[0].to_owned(),
                    endpoint: peer[2].to_owned(),
                    allowed_ips: peer[3].to_owned(),
                    latest_handshake: peer[4].parse()?,
                    received: peer[5].parse()?,
                    sent: peer[6].parse()?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            public_key: interface[1].to_owned(),
            listen_port: interface[2].parse()?,
            peers,
        })
    }

    /// Checks that the interface has exactly one peer, `other` — its key,
    /// its endpoint and its prefix — and has shaken hands and exchanged
    /// data with it.
    fn check_peer(&self, other: &WgShow, endpoint: Ipv4Addr, prefix: &str) -> Result<()> {
        ensure!(
            self.listen_port == PORT,
            "listening on {}",
            self.listen_port
        );
        let [peer] = self.peers.as_slice() else {
            bail!("expected one peer: {self:?}");
        };
        ensure!(
            peer.public_key == other.public_key,
            "the peer's key is not the other node's: {self:?} / {other:?}"
        );
        ensure!(
            peer.endpoint == format!("{endpoint}:{PORT}"),
            "peer endpoint {}",
            peer.endpoint
        );
        ensure!(
            peer.allowed_ips.split(',').any(|ip| ip == prefix),
            "the peer's allowed IPs {} lack {prefix}",
            peer.allowed_ips
        );
        ensure!(peer.latest_handshake > 0, "no handshake: {self:?}");
        ensure!(
            peer.received > 0 && peer.sent > 0,
            "no traffic on the tunnel: {self:?}"
        );
        Ok(())
    }
}

#[test]
fn kernel_wireguard_tunnels_granted_traffic_through_the_shield() -> Result<()> {
    require_root();
    if !kernel_wireguard("kernel_wireguard_tunnels_granted_traffic_through_the_shield")? {
        return Ok(());
    }
    let mesh = Mesh::new()?;
    let (mut a, mut b) = two_nodes(&mesh)?;
    a.kernel_wireguard = true;
    b.kernel_wireguard = true;
    // A's policy allows both ports, B's only the granted one; A's underlay
    // is shielded, with one host service open to the underlay's subnet.
    let token = a.token(&mesh, "198.18.1.0/24", HOUR, SystemTime::now())?;
    let mut command = a.command(
        &token,
        &policy(&format!("\"{GRANTED}/tcp\", \"{UNGRANTED}/tcp\"")),
    )?;
    command.args([
        "--underlay=under-a",
        "--underlay-allow=tcp/2222@192.0.2.0/24",
    ]);
    a.start_command(command)?;
    b.join(&mesh, "198.18.2.0/24", &granted_only())?;
    for node in [&a, &b] {
        node.wait_for("one peer", || Ok(node.metric("mesh_node_peers")? == 1.0))?;
        let link = node.ns.ip(&["-d", "link", "show", "mesh0"])?;
        ensure!(
            link.contains("wireguard"),
            "mesh0 is no kernel WireGuard link: {link}"
        );
    }

    for port in [GRANTED, UNGRANTED] {
        tcp_stream_echo_server(&b.ns, SocketAddr::from(([198, 18, 2, 1], port)))?;
    }
    reaches_b_through_wireguard_only(&a, &b)?;

    // The kernel's own view of the tunnel.
    let (show_a, show_b) = (WgShow::of(&a)?, WgShow::of(&b)?);
    show_a.check_peer(&show_b, b.underlay, "198.18.2.0/24")?;
    show_b.check_peer(&show_a, a.underlay, "198.18.1.0/24")?;

    // The shield let B's WireGuard through as a peer's, opens the allowed
    // host service and drops another port.
    let shield = |verdict: &str, reason: &str| {
        a.metric(&format!(
            "mesh_underlay_packets_total{{reason=\"{reason}\",verdict=\"{verdict}\"}}"
        ))
    };
    // Asked until it answers: a scrape may time out on a loaded VM.
    a.wait_for("WireGuard admitted as a peer's", || {
        Ok(shield("pass", "peer")? > 0.0)
    })?;
    for port in [2222, 2223] {
        tcp_stream_echo_server(&a.ns, SocketAddr::from(([192, 0, 2, 1], port)))?;
    }
    let open = |port: u16| {
        tcp_echo_works(
            &b.ns,
            b.underlay,
            SocketAddr::from((a.underlay, port)),
            PATIENCE,
        )
    };
    ensure!(open(2222)?, "the allowed host service is shut");
    ensure!(!open(2223)?, "a host service that is not allowed is open");
    a.wait_for("a dropped packet to be counted", || {
        Ok(shield("drop", "other")? > 0.0)
    })?;

    // A stops and leaves its interface; teardown removes it.
    a.agent.take();
    a.teardown()?;
    ensure!(
        a.ns.ip(&["link", "show", "mesh0"]).is_err(),
        "teardown left the kernel WireGuard interface"
    );
    Ok(())
}

/// Identity X: both nodes' policies declare it with no address, so that
/// only a binding makes an address X's.
const X: &str = "spiffe://test.internal/agent/x";
/// Node A's agent pools, two addresses each, within its prefix: one per
/// test, because the source guard of every agent on this host sees every
/// socket, and would take another test's bound process for a thief.
const POOL_A: &str = "198.18.1.128/30";
const POOL_A_ETCD: &str = "198.18.1.132/30";

/// `policy` with identity X granted the echo service's granted port.
fn with_bound_x(policy: &str) -> String {
    format!(
        r#"{policy}
[[identity]]
id = "{X}"

[[grant]]
from = ["{X}"]
to = ["echo"]
ports = ["{GRANTED}/tcp"]
"#
    )
}

/// A cgroup root of a test's own below the cgroup v2 mount, for the
/// processes an agent binds; removed on drop with the cgroups left in it.
struct CgroupRoot(PathBuf);

impl CgroupRoot {
    /// `mesh-test-PID-NAME`.
    fn new(name: &str) -> Result<Self> {
        let root = cgroup::default_root()?;
        let mount = root
            .parent()
            .context("the default root is below the mount")?;
        let name = format!("mesh-test-{}-{name}", std::process::id());
        Ok(Self(mount.join(name)))
    }
}

impl Drop for CgroupRoot {
    fn drop(&mut self) {
        for child in std::fs::read_dir(&self.0).into_iter().flatten().flatten() {
            // Only the cgroups: the interface files go with the root.
            let _ = std::fs::remove_dir(child.path());
        }
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// A shell run by `mesh-agent exec` on a node: bound to the identity of
/// its token. For each `HOST PORT` line it connects, sends `ping` and
/// answers what comes back, or `refused`.
struct BoundShell {
    process: Process,
    input: Option<ChildStdin>,
    output: BufReader<ChildStdout>,
}

impl BoundShell {
    fn start(node: &Node, token: &Path) -> Result<Self> {
        let script = r#"while read -r host port; do
            timeout 3 bash -c 'exec 3<>"/dev/tcp/$0/$1" && echo ping >&3 && head -n 1 <&3' "$host" "$port" \
                || echo refused
        done"#;
        let mut command = node.ns.command(env!("CARGO_BIN_EXE_mesh-agent"))?;
        command
            .arg("exec")
            .arg("--token")
            .arg(token)
            .arg("--state-dir")
            .arg(node.state.path())
            .args(["--", "bash", "-c", script])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let mut process = Process::spawn(command)?;
        let input = process.0.stdin.take();
        let output = BufReader::new(process.0.stdout.take().context("piped")?);
        Ok(Self {
            process,
            input,
            output,
        })
    }

    /// Whether a new connection from the shell reaches `service`.
    fn reaches(&mut self, service: SocketAddr) -> Result<bool> {
        let input = self.input.as_mut().context("the shell's input is closed")?;
        writeln!(input, "{} {}", service.ip(), service.port())?;
        let mut answer = String::new();
        ensure!(self.output.read_line(&mut answer)? > 0, "the shell ended");
        Ok(answer.trim() == "ping")
    }

    /// Ends the shell: its input closes, and `exec` exits with it.
    fn exit(mut self) -> Result<()> {
        self.input.take();
        let deadline = Instant::now() + PATIENCE;
        while self.process.0.try_wait()?.is_none() {
            ensure!(Instant::now() < deadline, "the bound shell did not exit");
            thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }
}

/// How many entries the node's datapath has in `IDENTITY_HOSTS`.
fn identity_hosts(node: &Node) -> Result<u64> {
    let report = mesh_agent::agent::status(node.state.path(), &node.bpffs.path().join("mesh"));
    report
        .datapath
        .context("no datapath")?
        .maps
        .iter()
        .find(|map| map.name == mesh_common::maps::IDENTITY_HOSTS)
        .and_then(|map| map.entries)
        .context("no IDENTITY_HOSTS")
}

#[test]
fn a_process_bound_on_a_is_known_to_b_by_its_address_until_it_exits() -> Result<()> {
    bound_on_a_known_to_b(None)
}

#[test]
fn bindings_travel_through_etcd_too() -> Result<()> {
    bound_on_a_known_to_b(Some(POOL_A_ETCD))
}

/// A process bound on A reaches B's service as its identity, through a
/// directory store, or through etcd with `etcd_pool` as A's pool.
fn bound_on_a_known_to_b(etcd_pool: Option<&str>) -> Result<()> {
    require_root();
    // Dropped last: after the agents and the bound shell.
    let cgroups = CgroupRoot::new(if etcd_pool.is_some() {
        "bound-on-a-etcd"
    } else {
        "bound-on-a"
    })?;
    let mesh = Mesh::new()?;
    let (mut a, mut b) = two_nodes(&mesh)?;
    let _etcd = match etcd_pool {
        Some(_) => {
            let etcd = Etcd::start(&a.ns, a.underlay, 1)?;
            for node in [&mut a, &mut b] {
                node.store = etcd.store();
            }
            Some(etcd)
        }
        None => None,
    };
    // A knows its unbound agent by its address, and grants it; B does not
    // know that address, so that B alone refuses it. Both know X only by
    // a binding.
    let identities = IssuerKey::generate(Algorithm::EdDsa, None)?;
    let bundle = a.state.path().join("identities.json");
    std::fs::write(&bundle, identities.bundle_json())?;
    let token = a.token(&mesh, "198.18.1.0/24", HOUR, SystemTime::now())?;
    let mut command = a.command(&token, &with_bound_x(&granted_only()))?;
    command
        .args([
            "--agent-pool",
            etcd_pool.unwrap_or(POOL_A),
            "--trust-bundle",
        ])
        .arg(&bundle)
        .arg("--cgroup-root")
        .arg(&cgroups.0);
    a.start_command(command)?;
    let b_policy = granted_only().replace("addresses = [\"198.18.1.1/32\"]\n", "");
    b.join(&mesh, "198.18.2.0/24", &with_bound_x(&b_policy))?;
    for node in [&a, &b] {
        node.wait_for("one peer", || Ok(node.metric("mesh_node_peers")? == 1.0))?;
    }
    tcp_stream_echo_server(&b.ns, SERVICE_B)?;
    ensure!(
        identity_hosts(&b)? == 0,
        "B classifies addresses before any binding"
    );

    let token_x = identities.issue(&X.parse::<SpiffeId>()?, "mesh", HOUR, SystemTime::now())?;
    let token_file = a.state.path().join("x.token");
    std::fs::write(&token_file, token_x)?;
    let mut shell = BoundShell::start(&a, &token_file)?;
    b.wait_for("A's binding to reach B", || {
        Ok(b.metric("mesh_node_peer_bindings")? == 1.0)
    })?;
    ensure!(identity_hosts(&b)? == 1, "B's datapath lacks A's binding");
    // The first handshake may take a moment.
    b.wait_for("the bound process to reach B's service", || {
        shell.reaches(SERVICE_B)
    })?;
    ensure!(
        !tcp_echo_works(&a.ns, AGENT_A, SERVICE_B, PATIENCE)?,
        "B let through an unbound process of A"
    );

    // B's policy is applied again: the binding stays in its datapath.
    let reloads = || b.metric("mesh_policy_reloads_total{result=\"applied\"}");
    let before = reloads()?;
    std::fs::write(
        b.state.path().join("policy.toml"),
        format!("# again\n{}", with_bound_x(&b_policy)),
    )?;
    b.wait_for("B to apply its policy again", || Ok(reloads()? > before))?;
    ensure!(identity_hosts(&b)? == 1, "a policy reload lost A's binding");
    ensure!(
        shell.reaches(SERVICE_B)?,
        "after a reload, B refused the bound process"
    );

    // The process exits: A releases its binding, and B forgets it.
    shell.exit()?;
    b.wait_for("the released binding to leave B", || {
        Ok(b.metric("mesh_node_peer_bindings")? == 0.0)
    })?;
    ensure!(
        identity_hosts(&b)? == 0,
        "B's datapath still classifies the released address"
    );
    Ok(())
}

#[test]
fn bindings_claiming_another_nodes_addresses_are_rejected() -> Result<()> {
    require_root();
    let mesh = Mesh::new()?;
    let (mut a, _b) = two_nodes(&mesh)?;
    a.join(&mesh, "198.18.1.0/24", &with_bound_x(&granted_only()))?;
    // A node no agent runs, with a good token for 198.18.6.0/24.
    let current = (SystemTime::now(), HOUR);
    let (key, _) = mesh.plant(
        &mesh.admin,
        "good",
        "198.18.6.0/24",
        "198.18.6.0/24",
        current,
    )?;
    a.wait_for("the planted node to become a peer", || {
        Ok(a.metric("mesh_node_peers")? == 1.0)
    })?;
    let expires = (SystemTime::now() + HOUR)
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let write = |key: &SigningKey, sequence: u64, address: &str| -> Result<()> {
        let set = BindingSet {
            node: "good".parse()?,
            sequence,
            bindings: vec![Bound {
                identity: X.into(),
                addresses: vec![address.parse()?],
                expires,
            }],
        };
        let path = mesh.store_dir().join("bindings/good.json");
        std::fs::write(path, Signed::sign(set, key).encode())?;
        Ok(())
    };
    let peer_bindings = || a.metric("mesh_node_peer_bindings");

    // An address of A's own prefix: rejected, counted once.
    write(&key, 1, "198.18.1.200")?;
    a.wait_for("the greedy set to be rejected", || {
        Ok(a.rejected("address_outside_prefix")? == 1.0)
    })?;
    ensure!(peer_bindings()? == 0.0, "a rejected set was classified");
    // One of its own: classified.
    write(&key, 2, "198.18.6.7")?;
    a.wait_for("the good set to be classified", || {
        Ok(peer_bindings()? == 1.0)
    })?;
    // A forged one and an older one change nothing; the entry's removal
    // ends the binding.
    write(&SigningKey::generate()?, 3, "198.18.6.8")?;
    a.wait_for("the forged set to be rejected", || {
        Ok(a.rejected("bad_record_signature")? == 1.0)
    })?;
    write(&key, 1, "198.18.6.9")?;
    a.wait_for("the replayed set to be rejected", || {
        Ok(a.rejected("replayed")? == 1.0)
    })?;
    ensure!(
        peer_bindings()? == 1.0,
        "a rejected set took a binding away"
    );
    ensure!(
        a.rejected("address_outside_prefix")? == 1.0,
        "a rejection was counted twice"
    );
    std::fs::remove_file(mesh.store_dir().join("bindings/good.json"))?;
    a.wait_for("the removed set's binding to go", || {
        Ok(peer_bindings()? == 0.0)
    })?;
    Ok(())
}
