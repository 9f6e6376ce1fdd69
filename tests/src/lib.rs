//! Test harness: network namespaces, veth pairs and traffic helpers that
//! always clean up after themselves, also when a test fails.
//!
//! Every namespace is named `mesh-t-<pid>-<n>`, so `cargo xtask test` can
//! remove those left behind by a test process that was killed.

pub mod packet;
pub mod pcap;

use std::{
    fs::File,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use mesh_agent::datapath::{GrantLimits, PolicyEntries, PortBlock, Prefix};
use mesh_common::proto;
use nix::sched::{CloneFlags, setns};

/// Prefix of every namespace the harness creates.
pub const NETNS_PREFIX: &str = "mesh-t-";

/// Fails the test unless it runs as root: privileged tests never skip silently.
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test loads eBPF programs and creates network namespaces: run it as root \
         (cargo xtask test does)"
    );
}

/// Runs a command and fails with its output if it does not succeed.
pub fn run(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("spawning {program}"))?;
    ensure!(
        out.status.success(),
        "{program} {} failed ({}): {}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A network namespace, deleted (with every interface in it) on drop.
pub struct NetNs {
    name: String,
}

impl NetNs {
    pub fn new() -> Result<Self> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "{NETNS_PREFIX}{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        run("ip", &["netns", "add", &name])?;
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        // No duplicate address detection on interfaces made later: until
        // it ends, a link-local address is tentative and IPv6 neighbour
        // discovery sends nothing, so the first packets of a test are lost.
        ns.enter(|| std::fs::write("/proc/sys/net/ipv6/conf/default/accept_dad", "0"))?
            .context("turning off duplicate address detection")?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `ip ARGS` inside the namespace.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// Runs a command inside the namespace; `Ok(true)` if it exits 0.
    pub fn exec_succeeds(&self, program: &str, args: &[&str]) -> Result<bool> {
        let status = Command::new("ip")
            .args(["netns", "exec", &self.name, program])
            .args(args)
            .output()
            .with_context(|| format!("spawning {program} in {}", self.name))?
            .status;
        Ok(status.success())
    }

    /// A command that will run inside the namespace (and nothing else about
    /// it changed, unlike `ip netns exec`, which also remounts /sys).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Result<Command> {
        use std::os::{fd::AsRawFd as _, unix::process::CommandExt as _};
        let ns = File::open(format!("/run/netns/{}", self.name))?;
        let mut command = Command::new(program);
        // SAFETY: setns is async-signal-safe; `ns` stays open in the parent
        // until the command is dropped, because the closure owns it.
        unsafe {
            command.pre_exec(move || {
                if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
        Ok(command)
    }

    /// Lets the namespace route between its interfaces.
    pub fn enable_forwarding(&self) -> Result<()> {
        self.enter(|| std::fs::write("/proc/sys/net/ipv4/ip_forward", "1"))?
            .context("enabling IPv4 forwarding")
    }

    /// Runs `f` on a thread that has entered the namespace, so sockets,
    /// interface lookups and attachments made by `f` happen inside it.
    pub fn enter<R: Send>(&self, f: impl FnOnce() -> R + Send) -> Result<R> {
        let path = format!("/run/netns/{}", self.name);
        let ns = File::open(&path).with_context(|| format!("opening {path}"))?;
        thread::scope(|scope| {
            scope
                .spawn(|| -> Result<R> {
                    setns(&ns, CloneFlags::CLONE_NEWNET)
                        .with_context(|| format!("entering namespace {}", self.name))?;
                    Ok(f())
                })
                .join()
                .map_err(|_| anyhow::anyhow!("thread in namespace {} panicked", self.name))?
        })
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if let Err(err) = run("ip", &["netns", "del", &self.name]) {
            eprintln!("cleanup: {err:#}");
        }
    }
}

/// A private bpffs instance mounted on a temporary folder, unmounted and
/// removed on drop: pins made in one test are invisible to every other.
pub struct BpfFs {
    dir: tempfile::TempDir,
}

impl BpfFs {
    pub fn mount() -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("mesh-bpffs-").tempdir()?;
        nix::mount::mount(
            Some("bpf"),
            dir.path(),
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .context("mounting a bpffs")?;
        Ok(Self { dir })
    }

    pub fn path(&self) -> &std::path::Path {
        self.dir.path()
    }
}

impl Drop for BpfFs {
    fn drop(&mut self) {
        if let Err(err) = nix::mount::umount2(self.dir.path(), nix::mount::MntFlags::MNT_DETACH) {
            eprintln!("cleanup: unmounting {}: {err}", self.dir.path().display());
        }
    }
}

/// One end of a veth pair: its namespace, name and address.
pub struct VethEnd<'a> {
    pub ns: &'a NetNs,
    pub name: &'a str,
    pub addr: Ipv4Addr,
}

/// Joins two namespaces with a veth pair on a /24 and brings both ends up.
/// The pair disappears with its namespaces.
pub fn veth_pair(a: &VethEnd, b: &VethEnd) -> Result<()> {
    a.ns.ip(&[
        "link",
        "add",
        a.name,
        "type",
        "veth",
        "peer",
        "name",
        b.name,
        "netns",
        b.ns.name(),
    ])?;
    for end in [a, b] {
        end.ns
            .ip(&["addr", "add", &format!("{}/24", end.addr), "dev", end.name])?;
        end.ns.ip(&["link", "set", end.name, "up"])?;
    }
    Ok(())
}

/// The client of [`ClientServer`], on `veth-c`.
pub const CLIENT: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
/// The server of [`ClientServer`], on `veth-s`.
pub const SERVER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);

/// The smallest topology: a client and a server namespace joined by a veth
/// pair, `veth-c` at [`CLIENT`] and `veth-s` at [`SERVER`].
pub struct ClientServer {
    pub client: NetNs,
    pub server: NetNs,
}

impl ClientServer {
    pub fn new() -> Result<Self> {
        let client = NetNs::new()?;
        let server = NetNs::new()?;
        veth_pair(
            &VethEnd {
                ns: &client,
                name: "veth-c",
                addr: CLIENT,
            },
            &VethEnd {
                ns: &server,
                name: "veth-s",
                addr: SERVER,
            },
        )?;
        Ok(Self { client, server })
    }

    /// How many of `count` UDP datagrams from the client reach the server's
    /// `port`, waiting at most `patience` after the last.
    pub fn udp_delivered(&self, port: u16, count: usize, patience: Duration) -> Result<usize> {
        udp_delivered(
            &self.client,
            CLIENT,
            &self.server,
            SocketAddr::from((SERVER, port)),
            count,
            patience,
        )
    }
}

/// A policy file for [`ClientServer`]: the client may reach the server's
/// UDP `ports`, of the service's 7000-7009.
pub fn client_server_policy(ports: &[u16]) -> String {
    let ports: Vec<String> = ports.iter().map(|port| format!("\"{port}/udp\"")).collect();
    format!(
        r#"version = 1
trust_domain = "acme.internal"

[[identity]]
id = "spiffe://acme.internal/agent/client"
addresses = ["{CLIENT}/32"]

[[service]]
name = "server"
addresses = ["{SERVER}/32"]
ports = ["7000-7009/udp"]

[[grant]]
from = ["spiffe://acme.internal/agent/client"]
to = ["server"]
ports = [{}]
"#,
        ports.join(", ")
    )
}

/// Sends `count` UDP datagrams from `from` (in namespace `from_ns`) to
/// `to:port` (in `to_ns`) and returns how many arrived. Waits at most
/// `patience` after the last send for stragglers.
pub fn udp_delivered(
    from_ns: &NetNs,
    from: Ipv4Addr,
    to_ns: &NetNs,
    to: SocketAddr,
    count: usize,
    patience: Duration,
) -> Result<usize> {
    let receiver = to_ns.enter(|| UdpSocket::bind(to))??;
    receiver.set_read_timeout(Some(Duration::from_millis(50)))?;
    let sent = from_ns.enter(|| -> Result<()> {
        let sender = UdpSocket::bind((from, 0))?;
        for i in 0..count {
            sender.send_to(&(i as u32).to_be_bytes(), to)?;
        }
        Ok(())
    })?;
    sent?;
    let deadline = Instant::now() + patience;
    let mut received = 0;
    let mut buf = [0u8; 64];
    while received < count && Instant::now() < deadline {
        match receiver.recv(&mut buf) {
            Ok(_) => received += 1,
            Err(err)
                if matches!(
                    err.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(err) => bail!("receiving: {err}"),
        }
    }
    Ok(received)
}

/// Compiled entries for the smallest policy: identity 7 at `client`, service
/// 1 at `service` (one UDP port), and, if `granted`, a grant between them.
pub fn one_udp_grant(client: Ipv4Addr, service: SocketAddr, granted: bool) -> PolicyEntries {
    PolicyEntries {
        identities: vec![(Prefix::host(client.into()), 7)],
        destinations: vec![(Prefix::host(service.ip()), 1)],
        service_ports: PortBlock::cover(proto::UDP, service.port(), service.port())
            .into_iter()
            .map(|block| (1, block, 1, 0))
            .collect(),
        grants: if granted {
            vec![((7, 1, 0), vec![0])]
        } else {
            vec![]
        },
        bound: Vec::new(),
        grant_limits: vec![GrantLimits::default()],
    }
}

/// Accepts connections on `addr` in `ns` and echoes one message on each,
/// on a thread that lives as long as the test process.
pub fn tcp_echo_server(ns: &NetNs, addr: SocketAddr) -> Result<()> {
    let listener = ns.enter(|| std::net::TcpListener::bind(addr))??;
    thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            let mut buf = [0u8; 64];
            if let Ok(n) = stream.read(&mut buf) {
                let _ = stream.write_all(&buf[..n]);
            }
        }
    });
    Ok(())
}

/// Whether a TCP connection from `from` (in `ns`) to `to` opens and echoes
/// a message back, within `patience` for each step.
pub fn tcp_echo_works(
    ns: &NetNs,
    from: Ipv4Addr,
    to: SocketAddr,
    patience: Duration,
) -> Result<bool> {
    let connected = ns.enter(|| -> std::io::Result<std::net::TcpStream> {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
        socket.bind(&SocketAddr::from((from, 0)).into())?;
        socket.connect_timeout(&to.into(), patience)?;
        Ok(socket.into())
    })?;
    let Ok(mut stream) = connected else {
        return Ok(false);
    };
    stream.set_read_timeout(Some(patience))?;
    stream.write_all(b"hello")?;
    let mut buf = [0u8; 5];
    Ok(stream.read_exact(&mut buf).is_ok() && &buf == b"hello")
}

/// Where `mesh-agent run` serves its metrics unless told otherwise.
pub const METRICS: &str = "127.0.0.1:9464";

/// GET `path` from the HTTP server at `addr` (an agent's metrics
/// listener), inside `ns`; the whole response, status line first.
pub fn http_get(ns: &NetNs, addr: &str, path: &str) -> Result<String> {
    let addr = addr.to_owned();
    let request = format!("GET {path} HTTP/1.0\r\n\r\n");
    let response = ns.enter(move || -> std::io::Result<String> {
        let mut stream = std::net::TcpStream::connect(addr)?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        // One write: the server answers the first segment it reads.
        stream.write_all(request.as_bytes())?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        Ok(response)
    })??;
    Ok(response)
}

/// The value of the one sample of `metric` whose labels include all of
/// `labels` (`name="value"` each).
pub fn sample(text: &str, metric: &str, labels: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|line| {
            line.starts_with(&format!("{metric}{{")) || line.starts_with(&format!("{metric} "))
        })
        .find(|line| labels.iter().all(|label| line.contains(label)))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
}
