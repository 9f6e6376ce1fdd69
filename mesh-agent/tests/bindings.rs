//! Process bindings end to end: the real `mesh-agent run` in a node
//! namespace with an agent pool, processes bound with `mesh-agent exec`,
//! and real TCP to a server namespace. Each test has its own namespaces,
//! bpffs, state folder and cgroup root, all removed however it ends.
//!
//! The bound process is this test binary itself, run as `probe`: it reads
//! commands on stdin and answers on stdout, so the test can make it open
//! connections and use them while the binding changes.

use std::{
    collections::HashMap,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::unix::{fs::PermissionsExt as _, process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use mesh_agent::{
    agent::{Binding, read_bindings},
    identity::{
        Algorithm, IssuerKey,
        audit::{AUDIT_FILE, AuditEvent, AuditKind},
        cgroup,
    },
    policy::SpiffeId,
};
use mesh_tests::{BpfFs, METRICS, NetNs, VethEnd, http_get, require_root, sample, veth_pair};
use socket2::{Domain, Socket, Type};

const NODE: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
const SERVER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
const NODE6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
const SERVER6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 2);
/// Each test's agent pools are its own: the source guard of one test's
/// agent sees the sockets of every other test on the host.
fn pool(test: u8) -> String {
    format!("100.96.{}.0/24", 30 + test)
}

fn pool6(test: u8) -> String {
    format!("fd00:6d65:{}::/64", 30 + test)
}
const ALICE: &str = "spiffe://acme.internal/agent/alice";
const BOB: &str = "spiffe://acme.internal/agent/bob";
/// Alice may reach 7000, Bob 7001; nobody 7002. Over UDP, Alice may send
/// to 7053 and nobody to 7054.
const ALICE_PORT: u16 = 7000;
const BOB_PORT: u16 = 7001;
const NOBODY_PORT: u16 = 7002;
const ALICE_UDP_PORT: u16 = 7053;
const NOBODY_UDP_PORT: u16 = 7054;

const POLICY: &str = r#"version = 1
trust_domain = "acme.internal"

[[identity]]
id = "spiffe://acme.internal/agent/alice"

[[identity]]
id = "spiffe://acme.internal/agent/bob"

[[service]]
name = "server"
addresses = ["192.0.2.2/32", "2001:db8::2/128"]
ports = ["7000-7002/tcp", "7053-7054/udp"]

[[grant]]
from = ["spiffe://acme.internal/agent/alice"]
to = ["server"]
ports = ["7000/tcp", "7053/udp"]

[[grant]]
from = ["spiffe://acme.internal/agent/bob"]
to = ["server"]
ports = ["7001/tcp"]
"#;

/// The probe: this binary, as a bound process. A no-op as a test.
#[test]
fn probe() {
    if std::env::var_os("MESH_PROBE").is_none() {
        return;
    }
    let mut live: Option<TcpStream> = None;
    for line in std::io::stdin().lock().lines() {
        let line = line.unwrap();
        let (command, arg) = line.split_once(' ').unwrap_or((&line, ""));
        let answer = match command {
            // Connect, send a line, read it back, close.
            "echo" => match connect(arg) {
                Ok(mut stream) => match round_trip(&mut stream) {
                    Ok(()) => format!("ok {}", stream.local_addr().unwrap().ip()),
                    Err(err) => format!("err {}", describe(&err)),
                },
                Err(err) => format!("err {}", describe(&err)),
            },
            // One datagram from an unbound, unconnected socket (the
            // sendmsg hooks judge it and pick its source); the answer is
            // the source address the server saw.
            "udp" => match udp_round_trip(arg) {
                Ok(seen) => format!("ok {seen}"),
                Err(err) => format!("err {}", describe(&err)),
            },
            // Connect and keep the connection.
            "open" => match connect(arg) {
                Ok(stream) => {
                    let local = stream.local_addr().unwrap().ip();
                    live = Some(stream);
                    format!("ok {local}")
                }
                Err(err) => format!("err {}", describe(&err)),
            },
            // The command runs: the binding is made.
            "ready" => "ok".to_owned(),
            // One round trip on the kept connection.
            "ping" => match live.as_mut().map(round_trip) {
                Some(Ok(())) => "ok".to_owned(),
                Some(Err(err)) => format!("err {}", describe(&err)),
                None => "err no connection".to_owned(),
            },
            _ => return,
        };
        println!("PROBE {answer}");
    }
}

fn connect(addr: &str) -> std::io::Result<TcpStream> {
    let addr: SocketAddr = addr.parse().unwrap();
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
    stream.set_read_timeout(Some(Duration::from_millis(300)))?;
    Ok(stream)
}

fn udp_round_trip(addr: &str) -> std::io::Result<String> {
    let addr: SocketAddr = addr.parse().unwrap();
    let any: IpAddr = if addr.is_ipv4() {
        Ipv4Addr::UNSPECIFIED.into()
    } else {
        Ipv6Addr::UNSPECIFIED.into()
    };
    let socket = UdpSocket::bind((any, 0))?;
    socket.set_read_timeout(Some(Duration::from_millis(300)))?;
    socket.send_to(b"x", addr)?;
    let mut buf = [0u8; 64];
    let n = socket.recv(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

fn round_trip(stream: &mut TcpStream) -> std::io::Result<()> {
    stream.write_all(b"x")?;
    let mut buf = [0u8; 1];
    stream.read_exact(&mut buf)
}

fn describe(err: &std::io::Error) -> String {
    match err.raw_os_error() {
        Some(libc::EPERM) => "EPERM".to_owned(),
        _ => err.kind().to_string(),
    }
}

/// A bound process: `mesh-agent exec … -- probe`, killed on drop.
struct Probe {
    child: Child,
    input: ChildStdin,
    output: BufReader<ChildStdout>,
}

impl Probe {
    fn ask(&mut self, line: &str) -> String {
        writeln!(self.input, "{line}").unwrap();
        let mut answer = String::new();
        loop {
            answer.clear();
            assert!(
                self.output.read_line(&mut answer).unwrap() > 0,
                "the probe ended"
            );
            // The test harness may start the line: `test probe ... `.
            if let Some((_, rest)) = answer.trim_end().split_once("PROBE ") {
                return rest.to_owned();
            }
        }
    }

    fn echo(&mut self, port: u16) -> String {
        self.ask(&format!("echo {SERVER}:{port}"))
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A cgroup root of the test's own below the cgroup v2 mount; on drop its
/// processes are killed and it is removed with every cgroup in it.
struct CgroupRoot(PathBuf);

impl CgroupRoot {
    fn new(name: &str) -> anyhow::Result<Self> {
        let mount = cgroup::default_root()?
            .parent()
            .map(Path::to_owned)
            .expect("the default root is below the mount");
        Ok(Self(mount.join(name)))
    }

    fn children(&self) -> Vec<PathBuf> {
        std::fs::read_dir(&self.0)
            .map(|entries| {
                entries
                    .filter_map(Result::ok)
                    .map(|e| e.path())
                    .filter(|p| p.is_dir())
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for CgroupRoot {
    fn drop(&mut self) {
        for child in self.children() {
            kill_all_in(&child);
            let _ = std::fs::remove_dir(&child);
        }
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// A TCP echo server in the server namespace on every TCP port the tests
/// use, which records where connections come from, and a UDP server on
/// every UDP port, which answers a datagram with its source address.
fn echo_servers(ns: &NetNs) -> anyhow::Result<Arc<Mutex<Vec<SocketAddr>>>> {
    let peers = Arc::new(Mutex::new(Vec::new()));
    let addresses = [IpAddr::V4(SERVER), IpAddr::V6(SERVER6)];
    for (addr, port) in addresses
        .into_iter()
        .flat_map(|addr| [ALICE_UDP_PORT, NOBODY_UDP_PORT].map(|port| (addr, port)))
    {
        let socket = ns.enter(move || UdpSocket::bind((addr, port)))??;
        thread::spawn(move || {
            let mut buf = [0u8; 64];
            while let Ok((_, from)) = socket.recv_from(&mut buf) {
                let _ = socket.send_to(from.ip().to_string().as_bytes(), from);
            }
        });
    }
    for (addr, port) in addresses
        .into_iter()
        .flat_map(|addr| [ALICE_PORT, BOB_PORT, NOBODY_PORT].map(|port| (addr, port)))
    {
        let listener = ns.enter(move || TcpListener::bind((addr, port)))??;
        let peers = peers.clone();
        thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                if let Ok(peer) = stream.peer_addr() {
                    peers.lock().unwrap().push(peer);
                }
                thread::spawn(move || {
                    let mut stream = stream;
                    let mut buf = [0u8; 64];
                    while let Ok(n) = stream.read(&mut buf) {
                        if n == 0 || stream.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                });
            }
        });
    }
    Ok(peers)
}

/// The node (agent and bound processes) and the server, joined by a veth
/// pair; the server routes the agent pool to the node.
struct Setup {
    node: NetNs,
    _server: NetNs,
    bpffs: BpfFs,
    dir: tempfile::TempDir,
    cgroups: CgroupRoot,
    key: IssuerKey,
    peers: Arc<Mutex<Vec<SocketAddr>>>,
    pool: String,
    pool6: String,
}

impl Setup {
    fn new(test: u8) -> anyhow::Result<Self> {
        require_root();
        let pool = pool(test);
        let node = NetNs::new()?;
        let server = NetNs::new()?;
        veth_pair(
            &VethEnd {
                ns: &node,
                name: "veth-n",
                addr: NODE,
            },
            &VethEnd {
                ns: &server,
                name: "veth-s",
                addr: SERVER,
            },
        )?;
        server.ip(&["route", "add", &pool, "via", &NODE.to_string()])?;
        for (ns, addr, dev) in [(&node, NODE6, "veth-n"), (&server, SERVER6, "veth-s")] {
            ns.ip(&["addr", "add", &format!("{addr}/64"), "dev", dev, "nodad"])?;
        }
        server.ip(&[
            "-6",
            "route",
            "add",
            &pool6(test),
            "via",
            &NODE6.to_string(),
        ])?;
        let peers = echo_servers(&server)?;
        let dir = tempfile::tempdir()?;
        // Traversable, so that the socket's own mode is what keeps other
        // users out.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
        std::fs::write(dir.path().join("policy.toml"), POLICY)?;
        let key = IssuerKey::generate(Algorithm::EdDsa, None)?;
        std::fs::write(dir.path().join("bundle.json"), key.bundle_json())?;
        let cgroups = CgroupRoot::new(&node.name().replace("mesh-t-", "mesh-test-"))?;
        Ok(Self {
            node,
            _server: server,
            bpffs: BpfFs::mount()?,
            dir,
            cgroups,
            key,
            peers,
            pool,
            pool6: pool6(test),
        })
    }

    /// Whether a probe's answer is `ok` with an address of a pool.
    fn ok_from_pool(&self, answer: &str) -> bool {
        let prefixes = [
            self.pool.trim_end_matches("0/24"),
            self.pool6.trim_end_matches(":/64"),
        ];
        answer
            .strip_prefix("ok ")
            .is_some_and(|addr| prefixes.iter().any(|p| addr.starts_with(p)))
    }

    fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    fn socket(&self) -> PathBuf {
        self.state_dir().join("agent.sock")
    }

    fn mesh_agent(&self) -> anyhow::Result<Command> {
        let mut command = self.node.command(env!("CARGO_BIN_EXE_mesh-agent"))?;
        command.stdin(Stdio::null());
        Ok(command)
    }

    fn start_agent(&self) -> anyhow::Result<Agent> {
        let child = self
            .mesh_agent()?
            .args(["run", "--interface", "veth-n"])
            .args(["--agent-pool", &self.pool, "--agent-pool", &self.pool6])
            .arg("--policy")
            .arg(self.dir.path().join("policy.toml"))
            .arg("--trust-bundle")
            .arg(self.dir.path().join("bundle.json"))
            .arg("--cgroup-root")
            .arg(&self.cgroups.0)
            .arg("--bpffs")
            .arg(self.bpffs.path().join("mesh"))
            .arg("--state-dir")
            .arg(self.state_dir())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let agent = Agent(child);
        // Generous: the agent loads its programs first, which takes seconds
        // under the verifier in an emulated VM (cargo xtask vm).
        let deadline = Instant::now() + Duration::from_secs(90);
        while !self.socket().exists() {
            anyhow::ensure!(Instant::now() < deadline, "the agent did not start");
            thread::sleep(Duration::from_millis(50));
        }
        Ok(agent)
    }

    /// A token file for `id`, valid for `ttl`.
    fn token(&self, id: &str, ttl: Duration) -> anyhow::Result<PathBuf> {
        let token = self
            .key
            .issue(&id.parse::<SpiffeId>()?, "mesh", ttl, SystemTime::now())?;
        let path = self.dir.path().join(format!("token-{}", rand_suffix()));
        std::fs::write(&path, token)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644))?;
        Ok(path)
    }

    /// `mesh-agent exec --token FILE -- probe`, once the probe runs.
    fn bind(&self, token: &Path) -> anyhow::Result<Probe> {
        let mut child = self
            .exec(token)?
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            // The probe's test harness complains when killed mid-run.
            .stderr(Stdio::null())
            .spawn()?;
        let input = child.stdin.take().expect("piped");
        let output = BufReader::new(child.stdout.take().expect("piped"));
        let mut probe = Probe {
            child,
            input,
            output,
        };
        assert_eq!(probe.ask("ready"), "ok");
        Ok(probe)
    }

    /// `mesh-agent exec` with a token the agent should refuse.
    fn bind_refused(&self, token: &Path) -> anyhow::Result<std::process::Output> {
        let output = self.exec(token)?.stdin(Stdio::null()).output()?;
        anyhow::ensure!(!output.status.success(), "bound: {output:?}");
        Ok(output)
    }

    fn exec(&self, token: &Path) -> anyhow::Result<Command> {
        let mut command = self.mesh_agent()?;
        command
            .arg("exec")
            .arg("--token")
            .arg(token)
            .arg("--socket")
            .arg(self.socket())
            .arg("--")
            .arg(std::env::current_exe()?)
            .args(["--exact", "probe", "--nocapture", "--test-threads=1"])
            .env("MESH_PROBE", "1");
        Ok(command)
    }

    fn control(&self, args: &[&str]) -> anyhow::Result<std::process::Output> {
        Ok(self
            .mesh_agent()?
            .args(args)
            .arg("--socket")
            .arg(self.socket())
            .output()?)
    }

    fn bindings(&self) -> Vec<Binding> {
        read_bindings(&self.state_dir()).unwrap()
    }

    fn audit(&self) -> Vec<AuditEvent> {
        std::fs::read_to_string(self.state_dir().join(AUDIT_FILE))
            .unwrap_or_default()
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect()
    }

    /// Whether a process of the node outside any binding gets a TCP
    /// connection to the server.
    fn unbound_connects(&self, server: IpAddr, port: u16) -> anyhow::Result<bool> {
        Ok(self
            .node
            .enter(move || {
                TcpStream::connect_timeout(&(server, port).into(), Duration::from_secs(1))
            })?
            .is_ok())
    }
}

fn rand_suffix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

/// A running agent, killed if the test ends before it stops.
struct Agent(Child);

impl Agent {
    fn stop(mut self) -> anyhow::Result<()> {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.0.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )?;
        anyhow::ensure!(self.0.wait()?.success(), "the agent did not stop cleanly");
        Ok(())
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Pings on the probe's live connection every 100 ms until one fails or
/// `patience` passes; when the failing ping started.
fn first_failure(probe: &mut Probe, patience: Duration) -> Option<SystemTime> {
    let deadline = Instant::now() + patience;
    while Instant::now() < deadline {
        let started = SystemTime::now();
        if probe.ask("ping") != "ok" {
            return Some(started);
        }
        thread::sleep(Duration::from_millis(100));
    }
    None
}

#[test]
fn bound_processes_reach_their_grants_from_their_own_address_and_nothing_else() -> anyhow::Result<()>
{
    let setup = Setup::new(1)?;
    let _agent = setup.start_agent()?;

    let mut alice = setup.bind(&setup.token(ALICE, Duration::from_secs(600))?)?;
    let mut bob = setup.bind(&setup.token(BOB, Duration::from_secs(600))?)?;
    let alice_addr = alice.echo(ALICE_PORT);
    let bob_addr = bob.echo(BOB_PORT);
    assert!(setup.ok_from_pool(&alice_addr), "alice: {alice_addr}");
    assert!(setup.ok_from_pool(&bob_addr), "bob: {bob_addr}");
    assert_ne!(alice_addr, bob_addr, "each binding has its own address");

    // Refused at connect(), at once, not after a timeout.
    let refused_at_once = |probe: &mut Probe, port: u16| {
        let started = Instant::now();
        assert_eq!(probe.echo(port), "err EPERM", "port {port}");
        assert!(started.elapsed() < Duration::from_millis(500));
    };
    refused_at_once(&mut alice, BOB_PORT);
    refused_at_once(&mut alice, NOBODY_PORT);
    refused_at_once(&mut bob, ALICE_PORT);
    // Not a service at all: refused too.
    assert_eq!(alice.ask("echo 198.51.100.1:80"), "err EPERM");

    // The same over IPv6, from each binding's address of the IPv6 pool.
    let echo6 = |probe: &mut Probe, port: u16| probe.ask(&format!("echo [{SERVER6}]:{port}"));
    let alice_addr6 = echo6(&mut alice, ALICE_PORT);
    assert!(
        setup.ok_from_pool(&alice_addr6) && alice_addr6.contains(':'),
        "alice over IPv6: {alice_addr6}"
    );
    assert_eq!(echo6(&mut alice, BOB_PORT), "err EPERM");
    assert_eq!(echo6(&mut bob, ALICE_PORT), "err EPERM");
    let bob_addr6 = echo6(&mut bob, BOB_PORT);
    assert!(setup.ok_from_pool(&bob_addr6), "bob over IPv6: {bob_addr6}");
    assert_ne!(alice_addr6, bob_addr6);

    // The server saw each identity's own pool address.
    let seen: Vec<IpAddr> = setup.peers.lock().unwrap().iter().map(|p| p.ip()).collect();
    for addr in [&alice_addr, &bob_addr, &alice_addr6, &bob_addr6] {
        let addr: IpAddr = addr.trim_start_matches("ok ").parse()?;
        assert!(seen.contains(&addr), "{addr} not among {seen:?}");
    }

    // UDP: judged at sendmsg(), sent from the binding's own address.
    let alice_udp = alice.ask(&format!("udp {SERVER}:{ALICE_UDP_PORT}"));
    assert!(
        setup.ok_from_pool(&alice_udp),
        "alice over UDP: {alice_udp}"
    );
    assert_eq!(alice_udp, alice_addr, "the server saw alice's address");
    let alice_udp6 = alice.ask(&format!("udp [{SERVER6}]:{ALICE_UDP_PORT}"));
    assert_eq!(alice_udp6, alice_addr6, "alice over UDP and IPv6");
    let udp_refused_at_once = |probe: &mut Probe, to: String| {
        let started = Instant::now();
        assert_eq!(probe.ask(&format!("udp {to}")), "err EPERM", "to {to}");
        assert!(started.elapsed() < Duration::from_millis(500));
    };
    udp_refused_at_once(&mut alice, format!("{SERVER}:{NOBODY_UDP_PORT}"));
    udp_refused_at_once(&mut alice, format!("[{SERVER6}]:{NOBODY_UDP_PORT}"));
    udp_refused_at_once(&mut bob, format!("{SERVER}:{ALICE_UDP_PORT}"));

    // A process of the same node that is bound to nothing is denied by the
    // datapath, granted port or not, over either family.
    assert!(!setup.unbound_connects(SERVER.into(), ALICE_PORT)?);
    assert!(!setup.unbound_connects(SERVER6.into(), ALICE_PORT)?);

    let bindings = setup.bindings();
    assert_eq!(bindings.len(), 2);
    assert!(bindings.iter().all(|b| b.ended.is_none()));
    let by_identity: HashMap<&str, &Binding> =
        bindings.iter().map(|b| (b.identity.as_str(), b)).collect();
    let alice_cgroup = by_identity[ALICE].cgroup.clone();
    assert!(alice_cgroup.starts_with(&setup.cgroups.0));

    // The process tree exits: the binding is released, its cgroup removed.
    drop(alice);
    let deadline = Instant::now() + Duration::from_secs(3);
    while setup.bindings().len() != 1 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        setup.bindings().len(),
        1,
        "alice's binding was not released"
    );
    assert!(!alice_cgroup.exists());
    let audit = setup.audit();
    let kinds: Vec<(AuditKind, Option<&str>)> = audit
        .iter()
        .map(|e| (e.event, e.identity.as_deref()))
        .collect();
    assert!(kinds.contains(&(AuditKind::Bind, Some(ALICE))));
    assert!(kinds.contains(&(AuditKind::Bind, Some(BOB))));
    let bind = audit.iter().find(|e| e.event == AuditKind::Bind).unwrap();
    assert!(bind.pid.is_some() && bind.cgroup.is_some() && !bind.addresses.is_empty());
    assert_audited(&audit, AuditKind::Release, &alice_cgroup, "exited");
    Ok(())
}

#[test]
fn token_expiry_cuts_a_live_connection_within_a_second() -> anyhow::Result<()> {
    let setup = Setup::new(2)?;
    let _agent = setup.start_agent()?;
    let mut alice = setup.bind(&setup.token(ALICE, Duration::from_secs(3))?)?;
    let expires = UNIX_EPOCH + Duration::from_secs(setup.bindings()[0].expires);
    let opened = alice.ask(&format!("open {SERVER}:{ALICE_PORT}"));
    assert!(setup.ok_from_pool(&opened), "{opened}");

    let failed = first_failure(&mut alice, Duration::from_secs(6)).expect("never cut");
    let late = failed.duration_since(expires).unwrap_or_default();
    let early = expires.duration_since(failed).unwrap_or_default();
    assert!(
        early < Duration::from_millis(500),
        "cut {early:?} before the token expired"
    );
    assert!(late < Duration::from_secs(1), "cut {late:?} after expiry");
    assert_ne!(alice.ask("ping"), "ok", "the connection stays cut");
    assert_eq!(alice.echo(ALICE_PORT), "err EPERM", "no new flows");
    let binding = &setup.bindings()[0];
    assert_eq!(binding.ended.as_deref(), Some("expired"));
    assert_audited(
        &setup.audit(),
        AuditKind::Expire,
        &binding.cgroup,
        "expired",
    );
    Ok(())
}

#[test]
fn a_refreshed_token_keeps_the_binding() -> anyhow::Result<()> {
    let setup = Setup::new(3)?;
    let _agent = setup.start_agent()?;
    let token = setup.token(ALICE, Duration::from_secs(3))?;
    let mut alice = setup.bind(&token)?;
    let first = setup.bindings()[0].expires;
    let fresh = setup.key.issue(
        &ALICE.parse()?,
        "mesh",
        Duration::from_secs(600),
        SystemTime::now(),
    )?;
    std::fs::write(&token, fresh)?;
    thread::sleep(Duration::from_secs(4));
    let binding = &setup.bindings()[0];
    assert!(binding.expires > first + 100, "not refreshed");
    assert!(binding.ended.is_none());
    assert!(alice.echo(ALICE_PORT).starts_with("ok "));
    Ok(())
}

#[test]
fn revocation_cuts_within_a_second_and_survives_a_restart() -> anyhow::Result<()> {
    let setup = Setup::new(4)?;
    let agent = setup.start_agent()?;
    let mut alice = setup.bind(&setup.token(ALICE, Duration::from_secs(600))?)?;
    assert!(
        alice
            .ask(&format!("open {SERVER}:{ALICE_PORT}"))
            .starts_with("ok ")
    );
    assert_eq!(alice.ask("ping"), "ok");
    let cgroup = setup.bindings()[0].cgroup.clone();

    // From the moment the command is given.
    let at = SystemTime::now();
    let revoked = setup.control(&["revoke", ALICE, "--reason", "compromised"])?;
    assert!(revoked.status.success(), "{revoked:?}");
    let failed = first_failure(&mut alice, Duration::from_secs(3)).expect("never cut");
    let took = failed.duration_since(at).unwrap_or_default();
    assert!(took < Duration::from_secs(1), "cut {took:?} after revoke");
    assert_eq!(alice.echo(ALICE_PORT), "err EPERM");
    assert_audited(&setup.audit(), AuditKind::Revoke, &cgroup, "compromised");
    let revoked_metric = || -> anyhow::Result<Option<f64>> {
        let metrics = http_get(&setup.node, METRICS, "/metrics")?;
        let label = format!("identity=\"{ALICE}\"");
        Ok(sample(&metrics, "mesh_identity_revoked", &[&label]))
    };
    assert_eq!(revoked_metric()?, Some(1.0));
    // A revoked identity binds no more.
    let refused = setup.bind_refused(&setup.token(ALICE, Duration::from_secs(600))?)?;
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("(revoked)"),
        "{refused:?}"
    );

    // The restarted agent knows the revocation from its state folder, not
    // only from the kernel's pinned maps: it refuses to bind the identity
    // and reports it.
    agent.stop()?;
    let _agent = setup.start_agent()?;
    assert_eq!(
        alice.echo(ALICE_PORT),
        "err EPERM",
        "revoked after a restart"
    );
    let refused = setup.bind_refused(&setup.token(ALICE, Duration::from_secs(600))?)?;
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("(revoked)"),
        "after a restart: {refused:?}"
    );
    assert_eq!(revoked_metric()?, Some(1.0), "after a restart");
    let status = setup
        .mesh_agent()?
        .args(["status", "--state-dir"])
        .arg(setup.state_dir())
        .arg("--bpffs")
        .arg(setup.bpffs.path().join("mesh"))
        .output()?;
    let status = String::from_utf8_lossy(&status.stdout);
    assert!(status.contains(&format!("revoked: {ALICE}")), "{status}");
    assert!(status.contains("compromised"), "{status}");

    let lifted = setup.control(&["unrevoke", ALICE])?;
    assert!(lifted.status.success(), "{lifted:?}");
    assert!(setup.ok_from_pool(&alice.echo(ALICE_PORT)));
    assert_eq!(
        revoked_metric()?,
        None,
        "the series goes with the revocation"
    );
    let kinds: Vec<AuditKind> = setup.audit().iter().map(|e| e.event).collect();
    assert!(kinds.contains(&AuditKind::Revoke) && kinds.contains(&AuditKind::Unrevoke));
    assert!(kinds.contains(&AuditKind::Reject));
    Ok(())
}

/// No socket but the bound process's may send from its address: neither
/// an unbound process that binds it, nor one that took it before the pool
/// handed it out (IP_FREEBIND), nor one that sets it per datagram
/// (IP_PKTINFO). Their packets never leave, or the datapath would take
/// them for the bound identity's.
#[test]
fn only_the_bound_process_sends_from_its_address() -> anyhow::Result<()> {
    let setup = Setup::new(6)?;
    let _agent = setup.start_agent()?;
    let mut alice = setup.bind(&setup.token(ALICE, Duration::from_secs(600))?)?;
    let answer = alice.echo(ALICE_PORT);
    assert!(setup.ok_from_pool(&answer), "{answer}");
    let alice_addr: Ipv4Addr = answer.trim_start_matches("ok ").parse()?;
    let server = SocketAddr::from((SERVER, ALICE_PORT));
    let refused = |sent: &std::io::Result<usize>| {
        sent.as_ref().map_err(|err| err.raw_os_error()) == Err(Some(libc::EPERM))
    };

    let socket_from = |from: IpAddr| -> anyhow::Result<Socket> {
        Ok(setup.node.enter(move || -> std::io::Result<Socket> {
            let socket = Socket::new(Domain::for_address((from, 0).into()), Type::DGRAM, None)?;
            if from.is_ipv4() {
                socket.set_freebind_v4(true)?;
            } else {
                socket.set_freebind_v6(true)?;
            }
            socket.bind(&SocketAddr::from((from, 0)).into())?;
            Ok(socket)
        })??)
    };
    let sent = socket_from(alice_addr.into())?.send_to(b"x", &server.into());
    assert!(refused(&sent), "a datagram from {alice_addr}: {sent:?}");
    // The guard leaves other addresses alone.
    socket_from(NODE.into())?.send_to(b"x", &server.into())?;

    // Alice's IPv6 address is hers alone as well.
    let answer = alice.ask(&format!("echo [{SERVER6}]:{ALICE_PORT}"));
    assert!(setup.ok_from_pool(&answer), "{answer}");
    let alice_addr6: Ipv6Addr = answer.trim_start_matches("ok ").parse()?;
    let server6 = SocketAddr::from((SERVER6, ALICE_PORT));
    let sent = socket_from(alice_addr6.into())?.send_to(b"x", &server6.into());
    assert!(refused(&sent), "a datagram from {alice_addr6}: {sent:?}");
    socket_from(NODE6.into())?.send_to(b"x", &server6.into())?;

    // Taken while nobody had it: the pool's next address, which becomes
    // local when Bob is bound.
    let next = Ipv4Addr::from(u32::from(alice_addr) + 1);
    let early = socket_from(next.into())?;
    let mut bob = setup.bind(&setup.token(BOB, Duration::from_secs(600))?)?;
    assert_eq!(bob.echo(BOB_PORT), format!("ok {next}"));
    let sent = early.send_to(b"x", &SocketAddr::from((SERVER, BOB_PORT)).into());
    assert!(refused(&sent), "a datagram from {next}: {sent:?}");

    // IP_PKTINFO: the socket is bound to nothing, the datagram's source set
    // by a control message.
    let with_pktinfo = setup.node.enter(move || -> std::io::Result<usize> {
        let socket = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
        let info = libc::in_pktinfo {
            ipi_ifindex: 0,
            ipi_spec_dst: libc::in_addr {
                s_addr: u32::from_ne_bytes(alice_addr.octets()),
            },
            ipi_addr: libc::in_addr { s_addr: 0 },
        };
        send_with_pktinfo(&socket, server, &info)
    })?;
    assert!(
        refused(&with_pktinfo),
        "IP_PKTINFO from {alice_addr}: {with_pktinfo:?}"
    );

    // A TCP connection from Alice's address gets nowhere either.
    let connected = setup.node.enter(move || -> std::io::Result<()> {
        let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
        socket.bind(&SocketAddr::from((alice_addr, 0)).into())?;
        socket.connect_timeout(&server.into(), Duration::from_secs(1))
    })?;
    assert!(connected.is_err(), "connected from {alice_addr}");

    // Alice herself still gets through.
    assert!(setup.ok_from_pool(&alice.echo(ALICE_PORT)));
    Ok(())
}

/// `teardown` takes the bindings' addresses off the loopback interface and
/// removes their cgroups and the cgroup root; a cgroup whose processes
/// still run is left, said, and removed by a later teardown.
#[test]
fn teardown_leaves_no_binding_behind() -> anyhow::Result<()> {
    let setup = Setup::new(7)?;
    let agent = setup.start_agent()?;
    let mut alice = setup.bind(&setup.token(ALICE, Duration::from_secs(600))?)?;
    let answer = alice.echo(ALICE_PORT);
    assert!(setup.ok_from_pool(&answer), "{answer}");
    let alice_addr = answer.trim_start_matches("ok ").to_owned();
    let cgroup = setup.bindings()[0].cgroup.clone();
    agent.stop()?;
    let on_loopback = || -> anyhow::Result<bool> {
        let shown = setup.node.ip(&["-o", "addr", "show", "dev", "lo"])?;
        Ok(shown.contains(&format!("{alice_addr}/")))
    };
    assert!(on_loopback()?, "the address is on lo while bound");

    let teardown = || -> anyhow::Result<String> {
        let output = setup
            .mesh_agent()?
            .arg("teardown")
            .arg("--bpffs")
            .arg(setup.bpffs.path().join("mesh"))
            .arg("--state-dir")
            .arg(setup.state_dir())
            .arg("--cgroup-root")
            .arg(&setup.cgroups.0)
            .output()?;
        anyhow::ensure!(output.status.success(), "teardown: {output:?}");
        Ok(String::from_utf8(output.stdout)?)
    };
    let said = teardown()?;
    assert!(
        said.contains(&format!("{} left in place", cgroup.display())),
        "{said}"
    );
    assert!(!on_loopback()?, "the address stayed on lo");
    assert!(cgroup.exists());

    drop(alice);
    kill_all_in(&cgroup);
    let said = teardown()?;
    assert!(!said.contains("left in place"), "{said}");
    assert!(!cgroup.exists() && !setup.cgroups.0.exists());
    assert!(setup.bindings().is_empty());
    Ok(())
}

/// Asserts that the audit log has a `kind` event of the binding in
/// `cgroup`, with its identity, process, reason and an RFC 3339 time.
fn assert_audited(audit: &[AuditEvent], kind: AuditKind, cgroup: &Path, reason: &str) {
    let event = audit
        .iter()
        .find(|e| e.event == kind && e.cgroup.as_deref() == Some(cgroup))
        .unwrap_or_else(|| panic!("no {kind:?} event of {} in {audit:?}", cgroup.display()));
    assert_eq!(event.identity.as_deref(), Some(ALICE), "{event:?}");
    assert!(event.pid.is_some_and(|pid| pid > 0), "{event:?}");
    assert_eq!(event.reason.as_deref(), Some(reason), "{event:?}");
    let time =
        time::OffsetDateTime::parse(&event.time, &time::format_description::well_known::Rfc3339);
    assert!(time.is_ok(), "{event:?}");
}

/// Kills the processes in `cgroup` and waits until it is empty.
fn kill_all_in(cgroup: &Path) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let procs = std::fs::read_to_string(cgroup.join("cgroup.procs")).unwrap_or_default();
        if procs.trim().is_empty() || Instant::now() > deadline {
            return;
        }
        for pid in procs.lines().filter_map(|p| p.parse::<i32>().ok()) {
            // SAFETY: kill(2) on processes the test bound.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// `sendmsg()` of one byte to `to` with an `IP_PKTINFO` control message.
fn send_with_pktinfo(
    socket: &std::net::UdpSocket,
    to: SocketAddr,
    info: &libc::in_pktinfo,
) -> std::io::Result<usize> {
    use std::os::fd::AsRawFd as _;
    let SocketAddr::V4(to) = to else {
        unreachable!("IPv4 only");
    };
    let mut name = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: to.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(to.ip().octets()),
        },
        sin_zero: [0; 8],
    };
    let mut byte = [b'x'];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    // u64s: aligned for a cmsghdr.
    let mut control = [0u64; 8];
    // SAFETY: msghdr is plain data; the fields are set below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = (&raw mut name).cast();
    msg.msg_namelen = size_of::<libc::sockaddr_in>() as u32;
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE computes a size.
    msg.msg_controllen = unsafe { libc::CMSG_SPACE(size_of::<libc::in_pktinfo>() as u32) } as usize;
    // SAFETY: the control buffer holds one cmsghdr with an in_pktinfo, as
    // CMSG_SPACE says, and msg points at it.
    let sent = unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::IPPROTO_IP;
        (*cmsg).cmsg_type = libc::IP_PKTINFO;
        (*cmsg).cmsg_len = libc::CMSG_LEN(size_of::<libc::in_pktinfo>() as u32) as usize;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast(), *info);
        libc::sendmsg(socket.as_raw_fd(), &msg, 0)
    };
    if sent < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(sent as usize)
    }
}

#[test]
fn the_socket_refuses_other_users_and_bad_tokens() -> anyhow::Result<()> {
    let setup = Setup::new(5)?;
    let _agent = setup.start_agent()?;
    let token = setup.token(ALICE, Duration::from_secs(600))?;
    // Outside the node's namespace: entering it needs root, and the
    // socket is a file, the same from every namespace.
    let as_nobody = || -> anyhow::Result<std::process::Output> {
        let mut command = Command::new(env!("CARGO_BIN_EXE_mesh-agent"));
        command
            .arg("exec")
            .arg("--token")
            .arg(&token)
            .arg("--socket")
            .arg(setup.socket())
            .args(["--", "true"])
            .uid(65534)
            .gid(65534);
        Ok(command.output()?)
    };
    let denied = as_nobody()?;
    assert!(!denied.status.success());
    assert!(
        String::from_utf8_lossy(&denied.stderr).contains("denied"),
        "{denied:?}"
    );
    // Past the file mode, the agent itself checks who is asking.
    std::fs::set_permissions(setup.socket(), std::fs::Permissions::from_mode(0o666))?;
    let refused = as_nobody()?;
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("(permission)"),
        "{refused:?}"
    );
    assert!(setup.bindings().is_empty());

    // A token signed by another key under the same key ID is refused, and
    // audited.
    let other = IssuerKey::generate(Algorithm::EdDsa, Some(setup.key.kid().to_owned()))?;
    let forged = setup.dir.path().join("forged");
    std::fs::write(
        &forged,
        other.issue(
            &ALICE.parse()?,
            "mesh",
            Duration::from_secs(60),
            SystemTime::now(),
        )?,
    )?;
    let output = setup.bind_refused(&forged)?;
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("bad_signature"),
        "{output:?}"
    );
    assert!(setup.bindings().is_empty());
    assert!(setup.audit().iter().any(|e| e.event == AuditKind::Reject
        && e.identity.as_deref() == Some(ALICE)
        && e.pid.is_some()
        && e.reason.as_deref().is_some_and(|r| r.contains("signature"))));
    Ok(())
}
