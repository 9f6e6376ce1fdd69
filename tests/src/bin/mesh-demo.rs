//! The demo behind `cargo xtask demo`: `mesh-agent run` enforcing the repo's
//! demo policy on a node in a network namespace, agents in another, real TCP
//! connections, a live policy change, the counters, and teardown. It exits
//! non-zero unless every behaviour it shows actually happened.
//!
//! `MESH_AGENT` names the mesh-agent binary (xtask builds it and sets it).

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use mesh_agent::agent::AgentStatus;
use mesh_tests::{BpfFs, NetNs, VethEnd, tcp_echo_server, tcp_echo_works, veth_pair};

const BILLING: Ipv4Addr = Ipv4Addr::new(10, 20, 0, 5);
const INVOICE_BOT: Ipv4Addr = Ipv4Addr::new(100, 96, 1, 10);
const SUPPORT_BOT: Ipv4Addr = Ipv4Addr::new(100, 96, 1, 11);
const STRANGER: Ipv4Addr = Ipv4Addr::new(100, 96, 1, 99);
const PATIENCE: Duration = Duration::from_millis(700);

struct Demo {
    agents: NetNs,
    node: NetNs,
    bpffs: BpfFs,
    dir: tempfile::TempDir,
    mesh_agent: PathBuf,
}

/// The agent process; killed if the demo fails before stopping it.
struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn main() -> anyhow::Result<()> {
    let mesh_agent = PathBuf::from(
        std::env::var_os("MESH_AGENT")
            .context("MESH_AGENT must name the mesh-agent binary (`cargo xtask demo` sets it)")?,
    );
    let demo = Demo::set_up(mesh_agent)?;
    demo.run()?;
    println!("demo passed: every behaviour shown above happened");
    Ok(())
}

impl Demo {
    fn set_up(mesh_agent: PathBuf) -> anyhow::Result<Self> {
        let agents = NetNs::new()?;
        let node = NetNs::new()?;
        veth_pair(
            &VethEnd {
                ns: &agents,
                name: "agents0",
                addr: INVOICE_BOT,
            },
            &VethEnd {
                ns: &node,
                name: "node0",
                addr: BILLING,
            },
        )?;
        for extra in [SUPPORT_BOT, STRANGER] {
            agents.ip(&["addr", "add", &format!("{extra}/24"), "dev", "agents0"])?;
        }
        agents.ip(&["route", "add", "10.20.0.0/24", "dev", "agents0"])?;
        node.ip(&["route", "add", "100.96.1.0/24", "dev", "node0"])?;
        for port in [443, 8080] {
            tcp_echo_server(&node, SocketAddr::from((BILLING, port)))?;
        }
        Ok(Self {
            agents,
            node,
            bpffs: BpfFs::mount()?,
            dir: tempfile::tempdir()?,
            mesh_agent,
        })
    }

    fn policy(&self) -> PathBuf {
        self.dir.path().join("policy.toml")
    }

    fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    fn mesh_agent(&self, args: &[&str]) -> anyhow::Result<Command> {
        let mut command = self.node.command(&self.mesh_agent)?;
        command
            .args(args)
            .arg("--bpffs")
            .arg(self.bpffs.path().join("mesh"))
            .arg("--state-dir")
            .arg(self.state_dir());
        Ok(command)
    }

    /// Puts a repo policy in place the way config management would.
    fn use_policy(&self, repo_file: &str) -> anyhow::Result<()> {
        let source = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join(repo_file);
        let aside = self.dir.path().join(".policy.toml.new");
        std::fs::copy(&source, &aside).with_context(|| format!("reading {}", source.display()))?;
        std::fs::rename(&aside, self.policy())?;
        Ok(())
    }

    fn connects(&self, from: Ipv4Addr, port: u16) -> anyhow::Result<bool> {
        tcp_echo_works(
            &self.agents,
            from,
            SocketAddr::from((BILLING, port)),
            PATIENCE,
        )
    }

    fn show(&self, who: &str, from: Ipv4Addr, port: u16, expected: bool) -> anyhow::Result<()> {
        let connected = self.connects(from, port)?;
        let outcome = if connected { "connected" } else { "refused" };
        println!(
            "  {} {who:<11} → billing-api:{port:<5} {outcome}",
            mark(connected == expected)
        );
        ensure!(
            connected == expected,
            "{who} → {port}: expected {}",
            if expected {
                "a connection"
            } else {
                "a refusal"
            }
        );
        Ok(())
    }

    fn run(&self) -> anyhow::Result<()> {
        println!("mesh demo: agents reach exactly what they are granted, enforced in the kernel\n");
        println!(
            "  node {BILLING}: billing-api on 443/tcp and 8080/tcp, and mesh-agent (XDP in, TC out)"
        );
        println!(
            "  agents: invoice-bot {INVOICE_BOT} (finance), support-bot {SUPPORT_BOT} (support), stranger {STRANGER}\n"
        );

        self.use_policy("examples/demo/policy.toml")?;
        let agent = self.start_agent()?;
        println!("  policy examples/demo/policy.toml: finance may call billing-api on 443/tcp");
        self.show("invoice-bot", INVOICE_BOT, 443, true)?;
        self.show("invoice-bot", INVOICE_BOT, 8080, false)?;
        self.show("support-bot", SUPPORT_BOT, 443, false)?;
        self.show("stranger", STRANGER, 443, false)?;

        println!(
            "\n  live change to examples/demo/policy-updated.toml: support-bot granted 443/tcp, 30 connections a minute"
        );
        let changed = Instant::now();
        self.use_policy("examples/demo/policy-updated.toml")?;
        self.wait_for_agent(|status| status.applied.as_ref().is_some_and(|a| a.reloads >= 1))?;
        println!(
            "  applied {} ms after the file changed",
            changed.elapsed().as_millis()
        );
        self.show("support-bot", SUPPORT_BOT, 443, true)?;
        self.show("stranger", STRANGER, 443, false)?;

        let status = self.mesh_agent(&["status"])?.output()?;
        ensure!(status.status.success(), "mesh-agent status failed");
        let status = String::from_utf8(status.stdout)?;
        println!("\n  mesh-agent status:");
        for line in status.lines().filter(|line| {
            !line.starts_with("  ") || line.contains("->") || line.contains("attached")
        }) {
            println!("    {line}");
        }
        ensure!(
            status.contains("spiffe://acme.internal/agent/invoice-bot -> billing-api: allow grant"),
            "counters missing from status"
        );

        self.stop(agent)?;
        let teardown = self.mesh_agent(&["teardown"])?.output()?;
        ensure!(
            teardown.status.success(),
            "teardown failed: {}",
            String::from_utf8_lossy(&teardown.stderr)
        );
        let free = self.connects(STRANGER, 8080)?;
        println!(
            "\n  {} teardown: the stranger reaches 8080 again, as without mesh",
            mark(free)
        );
        ensure!(free, "traffic still blocked after teardown");
        Ok(())
    }

    fn start_agent(&self) -> anyhow::Result<Agent> {
        let policy = self.policy();
        let mut command = self.mesh_agent(&[
            "run",
            "--interface",
            "node0",
            "--policy",
            &policy.to_string_lossy(),
        ])?;
        command.stdout(Stdio::null()).stderr(Stdio::null());
        let agent = Agent(command.spawn().context("starting mesh-agent")?);
        self.wait_for_agent(|status| status.pid == Some(agent.0.id()) && status.applied.is_some())?;
        Ok(agent)
    }

    /// Waits for the agent's status file to say `ready`.
    fn wait_for_agent(&self, ready: impl Fn(&AgentStatus) -> bool) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if AgentStatus::read(&self.state_dir()).is_ok_and(|status| ready(&status)) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        bail!("mesh-agent did not get there within 15 seconds")
    }

    fn stop(&self, mut agent: Agent) -> anyhow::Result<()> {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(agent.0.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )?;
        ensure!(agent.0.wait()?.success(), "mesh-agent did not stop cleanly");
        Ok(())
    }
}

fn mark(ok: bool) -> &'static str {
    if ok { "✓" } else { "✗" }
}
