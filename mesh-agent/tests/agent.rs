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
use mesh_tests::{
    BpfFs, CLIENT, ClientServer, METRICS, NetNs, SERVER, client_server_policy as policy, http_get,
    require_root, sample, udp_delivered,
};

const PACKETS: usize = 10;
const PATIENCE: Duration = Duration::from_millis(500);

/// A policy with an error on line 3, and the agent's words for it.
const BAD_POLICY: &str = "version = 1\ntrust_domain = \"acme.internal\"\nbogus = 1\n";
const BAD_POLICY_ERROR: &str = "policy.toml:3:1: unknown key `bogus`";

/// Asserts that the agent's status holds [`BAD_POLICY`]'s error.
fn assert_rejected_bad_policy(status: &AgentStatus) {
    assert!(
        status
            .rejected
            .iter()
            .any(|line| line.contains(BAD_POLICY_ERROR)),
        "{status:?}"
    );
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
        self.start_agent_with(&[])
    }

    /// `mesh-agent run`, once it has applied its policy.
    fn start_agent_with(&self, extra: &[&str]) -> anyhow::Result<Agent> {
        let agent = self.spawn_agent(extra)?;
        agent.wait_until(&self.state_dir(), |status| {
            status.pid == Some(agent.child.id()) && status.applied.is_some()
        })?;
        Ok(agent)
    }

    /// `mesh-agent run`, just started.
    fn spawn_agent(&self, extra: &[&str]) -> anyhow::Result<Agent> {
        let child = self
            .run_command()?
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        Ok(Agent { child })
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

    node.write_policy(BAD_POLICY)?;
    agent.wait_until(&node.state_dir(), |status| !status.rejected.is_empty())?;
    assert_rejected_bad_policy(&AgentStatus::read(&node.state_dir())?);
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

/// The status line of `path` from the agent's metrics listener, waiting up
/// to 15 s for the listener to answer.
fn http_status(node: &Node, path: &str) -> anyhow::Result<String> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match http_get(&node.server, METRICS, path) {
            Ok(response) => return Ok(response.lines().next().unwrap_or_default().to_owned()),
            Err(err) if Instant::now() > deadline => return Err(err),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// A restarted agent (an upgrade, a rescheduled pod) whose first policy is
/// rejected keeps the adopted one enforcing and stays unready, which is
/// what halts a rolling update at that node; a good policy makes it ready.
#[test]
fn a_restart_with_a_rejected_policy_keeps_enforcing_and_stays_unready() -> anyhow::Result<()> {
    let node = Node::new()?;
    let first = node.start_agent()?;
    first.signal(nix::sys::signal::Signal::SIGTERM)?;
    assert!(first.wait()?.success());

    node.write_policy(BAD_POLICY)?;
    let second = node.spawn_agent(&[])?;
    second.wait_until(&node.state_dir(), |status| {
        status.pid == Some(second.child.id()) && !status.rejected.is_empty()
    })?;
    let status = AgentStatus::read(&node.state_dir())?;
    assert_rejected_bad_policy(&status);
    assert_eq!(status.applied, None, "this agent applied nothing");
    assert_eq!(
        http_status(&node, "/readyz")?,
        "HTTP/1.1 503 Service Unavailable"
    );
    assert_eq!(http_status(&node, "/healthz")?, "HTTP/1.1 200 OK");
    assert_eq!(
        node.delivered(7000)?,
        PACKETS,
        "the adopted policy keeps granting"
    );
    assert_eq!(node.delivered(7001)?, 0, "and keeps denying");

    node.write_policy(&policy(&[7001]))?;
    assert!(node.becomes(7001, true)?, "a good policy is applied");
    assert!(node.becomes(7000, false)?);
    assert_eq!(http_status(&node, "/readyz")?, "HTTP/1.1 200 OK");
    Ok(())
}

#[test]
fn expiry_and_rate_limits_hold_in_the_live_kernel() -> anyhow::Result<()> {
    let node = Node::new()?;
    let agent = node.start_agent()?;
    // The expiring grant arrives as a live change, so that its clock starts
    // once the agent runs, however slow the machine is today.
    let lifetime = Duration::from_secs(5);
    let expires = time::OffsetDateTime::now_utc() + lifetime;
    let expires = expires.format(&time::format_description::well_known::Rfc3339)?;
    let policy = format!(
        "{}\n[[grant]]\nfrom = [\"spiffe://acme.internal/agent/client\"]\nto = [\"server\"]\n\
         ports = [\"7003/udp\"]\nexpires = \"{expires}\"\n\n\
         [[grant]]\nfrom = [\"spiffe://acme.internal/agent/client\"]\nto = [\"server\"]\n\
         ports = [\"7004/udp\"]\nrate = \"2/m\"\n",
        policy(&[7000])
    );
    let written = Instant::now();
    node.write_policy(&policy)?;
    agent.wait_until(&node.state_dir(), |status| {
        status.applied.as_ref().is_some_and(|a| a.reloads == 1)
    })?;

    assert_eq!(node.delivered(7003)?, PACKETS, "before expiry");
    // Each delivery opens a new flow: the bucket holds two.
    assert_eq!(node.delivered(7004)?, PACKETS, "first flow");
    assert_eq!(node.delivered(7004)?, PACKETS, "second flow");
    assert_eq!(
        node.delivered(7004)?,
        0,
        "third flow within the minute: rate-limited"
    );

    std::thread::sleep(lifetime.saturating_sub(written.elapsed()));
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

const CLIENT_ID: &str = r#"source="spiffe://acme.internal/agent/client""#;

#[test]
fn metrics_count_every_packet_exactly_and_pass_promtool() -> anyhow::Result<()> {
    let node = Node::new()?;
    let _agent = node.start_agent()?;
    assert!(http_get(&node.server, METRICS, "/readyz")?.starts_with("HTTP/1.1 200"));
    assert!(http_get(&node.server, METRICS, "/healthz")?.starts_with("HTTP/1.1 200"));
    assert_eq!(node.delivered(7000)?, PACKETS);
    assert_eq!(node.delivered(7001)?, 0);

    let response = http_get(&node.server, METRICS, "/metrics")?;
    let text = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body)
        .unwrap_or_default();
    let packets = |reason: &str| {
        let reason = format!(r#"reason="{reason}""#);
        sample(
            text,
            "mesh_packets_total",
            &[CLIENT_ID, r#"service="server""#, &reason],
        )
    };
    // One datagram opened the flow, the others rode it; every one to the
    // ungranted port was denied: exactly as sent.
    assert_eq!(packets("grant"), Some(1.0), "{text}");
    assert_eq!(packets("flow"), Some((PACKETS - 1) as f64), "{text}");
    assert_eq!(packets("no-grant"), Some(PACKETS as f64), "{text}");
    assert_eq!(
        sample(text, "mesh_policy_reloads_total", &[r#"result="applied""#]),
        Some(1.0)
    );
    assert!(sample(text, "mesh_map_capacity", &[r#"map="FLOWS""#]).is_some_and(|v| v > 0.0));
    assert!(
        sample(text, "mesh_flows_active", &[]).is_some_and(|v| v >= 1.0),
        "{text}"
    );
    assert_eq!(sample(text, "mesh_build_info", &[]), Some(1.0));

    assert_dashboard_uses_only(text)?;

    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    std::io::Write::write_all(promtool.stdin.as_mut().expect("stdin"), text.as_bytes())?;
    let checked = promtool.wait_with_output()?;
    assert!(
        checked.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
    Ok(())
}

#[test]
fn a_real_prometheus_scrapes_the_agent() -> anyhow::Result<()> {
    let node = Node::new()?;
    let _agent = node.start_agent()?;
    assert_eq!(node.delivered(7000)?, PACKETS);
    let config = node.dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: mesh\n    static_configs:\n      - targets: ['{METRICS}']\n"
        ),
    )?;
    let mut prometheus = node
        .server
        .command("prometheus")?
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            node.dir.path().join("tsdb").display()
        ))
        .arg("--web.listen-address=127.0.0.1:9090")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let query = "/api/v1/query?query=mesh_packets_total%7Breason%3D%22flow%22%7D";
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut answer = String::new();
    while Instant::now() < deadline {
        answer = http_get(&node.server, "127.0.0.1:9090", query).unwrap_or_default();
        if answer.contains(&format!(r#""{}"]"#, PACKETS - 1)) {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let _ = prometheus.kill();
    let _ = prometheus.wait();
    assert!(
        answer.contains("spiffe://acme.internal/agent/client"),
        "{answer}"
    );
    assert!(
        answer.contains(&format!(r#""{}"]"#, PACKETS - 1)),
        "Prometheus saw: {answer}"
    );
    Ok(())
}

/// The flow log's lines `mesh-agent flows` prints with `filter` (flags).
fn flows(node: &Node, filter: &[&str]) -> anyhow::Result<Vec<serde_json::Value>> {
    let out = Command::new(env!("CARGO_BIN_EXE_mesh-agent"))
        .args(["flows", "--state-dir"])
        .arg(node.state_dir())
        .args(filter)
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?)
}

#[test]
fn flow_events_name_denials_and_new_flows_and_a_flood_only_costs_events() -> anyhow::Result<()> {
    let node = Node::new()?;
    let _agent =
        node.start_agent_with(&["--flow-events-rate", "20", "--flow-events-burst", "40"])?;
    assert_eq!(node.delivered(7000)?, PACKETS);
    assert_eq!(node.delivered(7001)?, 0);

    let client = [
        "--source",
        "spiffe://acme.internal/agent/client",
        "--service",
        "server",
    ];
    let deadline = Instant::now() + Duration::from_secs(5);
    let (mut allowed, mut denied) = (Vec::new(), Vec::new());
    while Instant::now() < deadline && (allowed.is_empty() || denied.len() < PACKETS) {
        allowed = flows(&node, &[&client[..], &["--verdict", "allow"]].concat())?;
        denied = flows(&node, &[&client[..], &["--verdict", "deny"]].concat())?;
    }
    assert_eq!(
        allowed.len(),
        1,
        "one event for the new flow, none for its other packets: {allowed:?}"
    );
    assert_eq!(allowed[0]["reason"], "grant");
    assert_eq!(allowed[0]["dport"], 7000);
    assert_eq!(allowed[0]["src"], CLIENT.to_string());
    assert_eq!(
        denied.len(),
        PACKETS,
        "one event per denied packet: {denied:?}"
    );
    assert!(
        denied
            .iter()
            .all(|event| event["reason"] == "no-grant" && event["dport"] == 7001)
    );

    // A flood of denied packets, far over the event limit: the events are
    // lost and counted, the datapath judges on.
    const FLOOD: usize = 2000;
    assert_eq!(
        udp_delivered(
            &node.client,
            CLIENT,
            &node.server,
            SocketAddr::from((SERVER, 7002)),
            FLOOD,
            PATIENCE
        )?,
        0
    );
    assert_eq!(node.delivered(7000)?, PACKETS, "granted traffic unaffected");
    let response = http_get(&node.server, METRICS, "/metrics")?;
    let lost = sample(&response, "mesh_events_lost_total", &[]).unwrap_or_default();
    assert!(lost >= (FLOOD - 100) as f64, "lost events: {lost}");
    Ok(())
}

/// The Grafana dashboard in deploy/ queries only metrics in `exposition`.
fn assert_dashboard_uses_only(exposition: &str) -> anyhow::Result<()> {
    let exported: Vec<&str> = exposition
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.split_whitespace().next())
        .collect();
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/grafana/mesh-dashboard.json");
    let dashboard: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path)?)?;
    let exprs: Vec<&str> = dashboard["panels"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|panel| panel["targets"].as_array().into_iter().flatten())
        .filter_map(|target| target["expr"].as_str())
        .collect();
    assert!(!exprs.is_empty());
    for expr in exprs {
        let used: Vec<&str> = expr
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .filter(|word| word.starts_with("mesh_"))
            .collect();
        assert!(!used.is_empty(), "{expr}");
        for metric in used {
            let base = metric.trim_end_matches("_bucket");
            assert!(
                exported.contains(&base),
                "{metric} in `{expr}` is not exported"
            );
        }
    }
    Ok(())
}

#[test]
fn metrics_series_past_the_cap_fold_into_other() -> anyhow::Result<()> {
    let node = Node::new()?;
    let _agent = node.start_agent_with(&["--metrics-max-series", "2"])?;
    assert_eq!(node.delivered(7000)?, PACKETS);
    assert_eq!(node.delivered(7001)?, 0);
    let response = http_get(&node.server, METRICS, "/metrics")?;
    let named: Vec<&str> = response
        .lines()
        .filter(|line| {
            line.starts_with("mesh_packets_total{") && !line.contains(r#"source="other""#)
        })
        .collect();
    assert!(named.len() <= 2, "{named:?}");
    let folded = response
        .lines()
        .filter(|line| {
            line.starts_with("mesh_packets_total{") && line.contains(r#"source="other""#)
        })
        .count();
    assert!(folded >= 1, "{response}");
    // Nothing is lost by folding: the totals still add up.
    let total: f64 = response
        .lines()
        .filter(|line| line.starts_with("mesh_packets_total{"))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(total >= (2 * PACKETS) as f64, "{response}");
    Ok(())
}
