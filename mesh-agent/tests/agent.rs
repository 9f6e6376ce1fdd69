//! `mesh-agent run`, `status` and `teardown` end to end: the real binary in
//! a network namespace, enforcing on a veth, with real UDP traffic from a
//! client namespace. Each test has its own namespaces, bpffs and state.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use mesh_agent::agent::AgentStatus;
use mesh_tests::{BpfFs, CLIENT, ClientServer, NetNs, SERVER, require_root, udp_delivered};

const PACKETS: usize = 10;
const PATIENCE: Duration = Duration::from_millis(500);

fn policy(ports: &[u16]) -> String {
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

/// Two namespaces, a private bpffs and state folder, and a policy file.
struct Node {
    client: NetNs,
    server: NetNs,
    bpffs: BpfFs,
    dir: tempfile::TempDir,
}

impl Node {
    fn new() -> anyhow::Result<Self> {
        require_root();
        let ClientServer { client, server } = ClientServer::new()?;
        let node = Self {
            client,
            server,
            bpffs: BpfFs::mount()?,
            dir: tempfile::tempdir()?,
        };
        node.write_policy(&policy(&[7000]))?;
        Ok(node)
    }

    fn policy_path(&self) -> PathBuf {
        self.dir.path().join("policy.toml")
    }

    fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    fn pin_root(&self) -> PathBuf {
        self.bpffs.path().join("mesh")
    }

    /// Replaces the policy file the way config management does: write
    /// aside, rename into place.
    fn write_policy(&self, text: &str) -> anyhow::Result<()> {
        let aside = self.dir.path().join(".policy.toml.new");
        std::fs::write(&aside, text)?;
        std::fs::rename(&aside, self.policy_path())?;
        Ok(())
    }

    fn mesh_agent(&self, args: &[&str]) -> anyhow::Result<Command> {
        let mut command = self.server.command(env!("CARGO_BIN_EXE_mesh-agent"))?;
        command
            .args(args)
            .args(["--bpffs"])
            .arg(self.pin_root())
            .arg("--state-dir")
            .arg(self.state_dir());
        Ok(command)
    }

    fn run_command(&self) -> anyhow::Result<Command> {
        let mut command = self.mesh_agent(&["run", "--interface", "veth-s"])?;
        command.arg("--policy").arg(self.policy_path());
        Ok(command)
    }

    fn start_agent(&self) -> anyhow::Result<Agent> {
        let child = self
            .run_command()?
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let agent = Agent { child };
        agent.wait_until(&self.state_dir(), |status| {
            status.pid == Some(agent.child.id()) && status.applied.is_some()
        })?;
        Ok(agent)
    }

    fn delivered(&self, port: u16) -> anyhow::Result<usize> {
        udp_delivered(
            &self.client,
            CLIENT,
            &self.server,
            SocketAddr::from((SERVER, port)),
            PACKETS,
            PATIENCE,
        )
    }

    /// Polls until `port` is delivered (or not) as expected, for up to a
    /// second: the time a policy change may take.
    fn becomes(&self, port: u16, delivered: bool) -> anyhow::Result<bool> {
        let deadline = Instant::now() + Duration::from_secs(1);
        loop {
            let now = self.delivered(port)?;
            if (now == PACKETS) == delivered && (now == 0) != delivered {
                return Ok(true);
            }
            if Instant::now() > deadline {
                return Ok(false);
            }
        }
    }
}

/// A running agent, killed (SIGKILL) if the test ends before it does.
struct Agent {
    child: Child,
}

impl Agent {
    fn wait_until(
        &self,
        state_dir: &Path,
        ready: impl Fn(&AgentStatus) -> bool,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if AgentStatus::read(state_dir).is_ok_and(|status| ready(&status)) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        anyhow::bail!("the agent did not get there in time")
    }

    fn signal(&self, signal: nix::sys::signal::Signal) -> anyhow::Result<()> {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), signal)?;
        Ok(())
    }

    fn wait(mut self) -> anyhow::Result<std::process::ExitStatus> {
        Ok(self.child.wait()?)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn enforces_applies_changes_live_and_keeps_out_invalid_policies() -> anyhow::Result<()> {
    let node = Node::new()?;
    let agent = node.start_agent()?;
    assert_eq!(node.delivered(7000)?, PACKETS, "granted");
    assert_eq!(node.delivered(7001)?, 0, "not granted");

    node.write_policy(&policy(&[7000, 7001]))?;
    assert!(
        node.becomes(7001, true)?,
        "a granted port added live takes effect within a second"
    );

    node.write_policy("version = 1\ntrust_domain = \"acme.internal\"\nbogus = 1\n")?;
    agent.wait_until(&node.state_dir(), |status| !status.rejected.is_empty())?;
    let status = AgentStatus::read(&node.state_dir())?;
    assert!(
        status
            .rejected
            .iter()
            .any(|line| line.contains("policy.toml:3:1: unknown key `bogus`")),
        "{status:?}"
    );
    assert_eq!(
        node.delivered(7001)?,
        PACKETS,
        "the previous policy keeps enforcing"
    );
    assert_eq!(node.delivered(7002)?, 0);

    node.write_policy(&policy(&[7002]))?;
    assert!(node.becomes(7002, true)?);
    assert!(
        node.becomes(7001, false)?,
        "a grant removed live takes effect within a second"
    );
    agent.signal(nix::sys::signal::Signal::SIGHUP)?;
    assert_eq!(
        node.delivered(7002)?,
        PACKETS,
        "SIGHUP reapplies the same policy"
    );
    Ok(())
}

#[test]
fn survives_kill_adopts_refuses_a_second_agent_and_tears_down() -> anyhow::Result<()> {
    let node = Node::new()?;
    let first = node.start_agent()?;
    first.signal(nix::sys::signal::Signal::SIGKILL)?;
    first.wait()?;
    assert_eq!(
        node.delivered(7000)?,
        PACKETS,
        "killed agent: still enforcing the grant"
    );
    assert_eq!(node.delivered(7001)?, 0, "killed agent: still denying");

    let second = node.start_agent()?;
    assert_eq!(node.delivered(7000)?, PACKETS, "adopted");
    assert_eq!(node.delivered(7001)?, 0);

    let refused = node.run_command()?.output()?;
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("another mesh-agent is running"), "{stderr}");

    let teardown_refused = node.mesh_agent(&["teardown"])?.output()?;
    assert!(
        !teardown_refused.status.success(),
        "teardown refused while an agent runs"
    );

    let status = node.mesh_agent(&["status"])?.output()?;
    let status = String::from_utf8(status.stdout)?;
    assert!(status.contains("agent: running"), "{status}");
    assert!(status.contains("attached: veth-s xdp"), "{status}");
    assert!(status.contains("attached: veth-s tc-egress"), "{status}");
    assert!(
        status.contains("1 identity, 1 service, 1 grant"),
        "{status}"
    );
    for counted in [
        "spiffe://acme.internal/agent/client -> server: allow grant",
        "spiffe://acme.internal/agent/client -> server: allow flow",
        "spiffe://acme.internal/agent/client -> server: deny no-grant",
    ] {
        assert!(status.contains(counted), "{counted}: {status}");
    }

    second.signal(nix::sys::signal::Signal::SIGTERM)?;
    assert!(second.wait()?.success());
    assert_eq!(
        node.delivered(7001)?,
        0,
        "SIGTERM leaves enforcement in place"
    );

    let teardown = node.mesh_agent(&["teardown"])?.output()?;
    assert!(
        teardown.status.success(),
        "{}",
        String::from_utf8_lossy(&teardown.stderr)
    );
    assert_eq!(
        node.delivered(7001)?,
        PACKETS,
        "after teardown traffic flows as without mesh"
    );
    assert!(!node.pin_root().exists(), "nothing left on the bpffs");
    let links = node.server.ip(&["-d", "link", "show", "veth-s"])?;
    assert!(!links.contains("xdp"), "{links}");
    Ok(())
}

#[test]
fn expiry_and_rate_limits_hold_in_the_live_kernel() -> anyhow::Result<()> {
    let node = Node::new()?;
    let expires = time::OffsetDateTime::now_utc() + time::Duration::seconds(3);
    let expires = expires.format(&time::format_description::well_known::Rfc3339)?;
    let policy = format!(
        "{}\n[[grant]]\nfrom = [\"spiffe://acme.internal/agent/client\"]\nto = [\"server\"]\n\
         ports = [\"7003/udp\"]\nexpires = \"{expires}\"\n\n\
         [[grant]]\nfrom = [\"spiffe://acme.internal/agent/client\"]\nto = [\"server\"]\n\
         ports = [\"7004/udp\"]\nrate = \"2/m\"\n",
        policy(&[7000])
    );
    node.write_policy(&policy)?;
    let _agent = node.start_agent()?;

    // Each delivery opens a new flow: the bucket holds two.
    assert_eq!(node.delivered(7004)?, PACKETS, "first flow");
    assert_eq!(node.delivered(7004)?, PACKETS, "second flow");
    assert_eq!(
        node.delivered(7004)?,
        0,
        "third flow within the minute: rate-limited"
    );

    assert_eq!(node.delivered(7003)?, PACKETS, "before expiry");
    std::thread::sleep(Duration::from_secs(3));
    assert!(node.becomes(7003, false)?, "after expiry, within a second");
    assert_eq!(node.delivered(7000)?, PACKETS, "other grants unaffected");
    Ok(())
}

#[test]
fn startup_errors_say_what_to_do() -> anyhow::Result<()> {
    let node = Node::new()?;
    let mut missing = node.mesh_agent(&["run", "--interface", "nosuch0"])?;
    let out = missing.arg("--policy").arg(node.policy_path()).output()?;
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("interface `nosuch0` not found"));

    let not_bpffs = node.dir.path().join("pins");
    let out = node
        .server
        .command(env!("CARGO_BIN_EXE_mesh-agent"))?
        .args(["run", "--interface", "veth-s", "--policy"])
        .arg(node.policy_path())
        .arg("--bpffs")
        .arg(not_bpffs.join("mesh"))
        .arg("--state-dir")
        .arg(node.state_dir())
        .output()?;
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("is not on a bpffs: mount one there"),
        "{stderr}"
    );

    node.write_policy("version = 1\n")?;
    let out = node.run_command()?.output()?;
    assert_eq!(
        out.status.code(),
        Some(1),
        "a first start with a bad policy fails"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("policy.toml:1:1: missing key `trust_domain`"),
        "{stderr}"
    );
    let links = node.server.ip(&["-d", "link", "show", "veth-s"])?;
    assert!(!links.contains("xdp"), "nothing attached: {links}");
    assert!(!node.pin_root().exists(), "nothing pinned");
    Ok(())
}
