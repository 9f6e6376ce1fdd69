//! The benchmarks behind `cargo xtask bench`: per-packet cost with
//! BPF_PROG_TEST_RUN, drop throughput on a veth pair against nftables, policy
//! apply times, memory, and the traffic pause of a key rotation between two
//! nodes. docs/performance.md describes the method.
//!
//! `mesh-bench [--quick] RESULTS_JSON` prints a table on stdout, progress on
//! stderr, and writes the figures to RESULTS_JSON. `MESH_AGENT` names the
//! mesh-agent binary (xtask builds it and sets it); `MESH_WIREGUARD_USERSPACE`,
//! if set, the userspace WireGuard the nodes use where the kernel has none
//! (xtask sets it to the boringtun-cli that setup installs). Needs root.

use std::{
    collections::HashSet,
    fmt::Write as _,
    fs, iter,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket},
    os::fd::AsFd as _,
    path::{Path, PathBuf},
    process::{Child, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow, bail, ensure};
use aya::programs::{ProgramFd, XdpMode};
use ipnet::Ipv4Net;
use mesh_agent::{
    agent::AgentStatus,
    datapath::{Clock, Datapath, Entry, MapSizes, PolicyEntries},
    policy::{self, Capacities, Grant, Identity, Policy, Selector, Sources, SpiffeId},
};
use mesh_common::programs;
use mesh_tests::{
    BpfFs, METRICS, NetNs, VethEnd, http_get,
    packet::{Packet, TCP_ACK, TCP_SYN},
    sample, tcp_echo_server, tcp_echo_works, veth_pair,
};
use serde_json::json;

/// Runs per BPF_PROG_TEST_RUN call; the kernel reports the mean.
const REPEAT: u32 = 1_000_000;
/// Test runs per figure; the median is kept.
const ROUNDS: usize = 5;
/// The one service: `api` on 443/tcp (granted) and 8443/tcp (never granted).
const SERVICE: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const GRANTED_PORT: u16 = 443;
const UNGRANTED_PORT: u16 = 8443;
/// The other end of the veth pairs.
const PEER: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
/// Identity `i` sends from this address plus `i`: 100.64.0.0/10 holds 4M.
const FIRST_IDENTITY: u32 = u32::from_be_bytes([100, 64, 0, 0]);
/// An identity that the one-grant change grants.
const NEWCOMER: Ipv4Addr = Ipv4Addr::new(100, 127, 0, 1);
/// A source that is no identity: what the throughput runs send.
const STRANGER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// The packet builder's destination MAC: the receiving veth takes it, so the
/// stack accepts the frames as its own and netfilter sees them.
const RECEIVER_MAC: &str = "02:00:00:00:00:02";
/// Source ports a new flow may use; with the identity, they make flows distinct.
const PORTS: std::ops::Range<u32> = 1024..65535;
/// The established and denied packets' source port, outside [`PORTS`].
const MEMBER_PORT: u16 = 1000;
const THROUGHPUT_IDENTITIES: u32 = 10_000;
/// The one-grant change runs at this size; the agent's memory is measured
/// at `MEMORY_GRANTS`.
const AGENT_GRANTS: u32 = 1_000;
const MEMORY_GRANTS: u32 = 100_000;

/// What one run measures, and for how long.
struct Plan {
    cost_grants: &'static [u32],
    apply_grants: &'static [u32],
    /// Distinct new flows timed for `new_flow` (fewer where the policy has
    /// too few identities for that many distinct flows).
    new_flows: u32,
    /// Counting time per throughput figure, after a warm-up.
    window: Duration,
}

const QUICK: Plan = Plan {
    cost_grants: &[10, 10_000, 100_000],
    apply_grants: &[1_000, 100_000],
    new_flows: 200_000,
    window: Duration::from_secs(2),
};

const FULL: Plan = Plan {
    cost_grants: &[10, 10_000, 100_000, 1_000_000],
    apply_grants: &[1_000, 100_000, 1_000_000],
    new_flows: 1_000_000,
    window: Duration::from_secs(5),
};

struct Record {
    metric: String,
    value: f64,
    unit: &'static str,
    grants: Option<u32>,
}

#[derive(Default)]
struct Results(Vec<Record>);

impl Results {
    fn add(
        &mut self,
        metric: impl Into<String>,
        value: f64,
        unit: &'static str,
        grants: Option<u32>,
    ) {
        let record = Record {
            metric: metric.into(),
            value,
            unit,
            grants,
        };
        eprintln!("    {}", row(&record));
        self.0.push(record);
    }

    fn get(&self, metric: &str, grants: Option<u32>) -> Option<f64> {
        self.0
            .iter()
            .find(|r| r.metric == metric && r.grants == grants)
            .map(|r| r.value)
    }
}

fn main() -> anyhow::Result<()> {
    let mut quick = false;
    let mut out = None;
    for arg in std::env::args().skip(1) {
        match arg.as_str() {
            "--quick" => quick = true,
            _ => out = Some(PathBuf::from(arg)),
        }
    }
    let out = out.context("usage: mesh-bench [--quick] RESULTS_JSON")?;
    let mesh_agent = PathBuf::from(
        std::env::var_os("MESH_AGENT")
            .context("MESH_AGENT must name the mesh-agent binary (`cargo xtask bench` sets it)")?,
    );
    let wireguard = std::env::var_os("MESH_WIREGUARD_USERSPACE").map(PathBuf::from);
    let plan = if quick { &QUICK } else { &FULL };
    let machine = machine();
    step(&format!("machine: {machine}"));

    let mut results = Results::default();
    memory(&mut results)?;
    cost(plan, &mut results)?;
    apply(plan, &mut results)?;
    throughput(plan, &mut results)?;
    agent(&mesh_agent, &mut results)?;
    rotation(&mesh_agent, wireguard.as_deref(), &mut results)?;

    print_table(&machine, &results);
    print_goals(plan, &results);
    let json = json!({
        "machine": machine,
        "results": results.0.iter().map(|r| {
            let mut record = json!({"metric": r.metric, "value": r.value, "unit": r.unit});
            if let Some(grants) = r.grants {
                record["grants"] = json!(grants);
            }
            record
        }).collect::<Vec<_>>(),
    });
    if let Some(dir) = out.parent() {
        fs::create_dir_all(dir)?;
    }
    fs::write(&out, serde_json::to_string_pretty(&json)? + "\n")
        .with_context(|| format!("writing {}", out.display()))?;
    step(&format!("results written to {}", out.display()));
    Ok(())
}

fn step(message: &str) {
    eprintln!("==> {message}");
}

// ---------------------------------------------------------------- policies

fn identity_addr(index: u32) -> Ipv4Addr {
    Ipv4Addr::from(FIRST_IDENTITY + index)
}

/// `grants` identities, each granted `api` on 443/tcp, and the newcomer,
/// granted too if `newcomer_granted`.
fn policy_text(grants: u32, newcomer_granted: bool) -> String {
    let mut text = String::from(
        "version = 1\ntrust_domain = \"bench\"\n\n\
         [[service]]\nname = \"api\"\naddresses = [\"10.0.0.1/32\"]\nports = [\"443/tcp\", \"8443/tcp\"]\n\n\
         [[identity]]\nid = \"spiffe://bench/newcomer\"\naddresses = [\"100.127.0.1/32\"]\n\n",
    );
    for i in 0..grants {
        let addr = identity_addr(i);
        write!(
            text,
            "[[identity]]\nid = \"spiffe://bench/a{i}\"\naddresses = [\"{addr}/32\"]\n\n\
             [[grant]]\nfrom = [\"spiffe://bench/a{i}\"]\nto = [\"api\"]\nports = [\"443/tcp\"]\n\n"
        )
        .expect("writing to a String");
    }
    if newcomer_granted {
        text.push_str(
            "[[grant]]\nfrom = [\"spiffe://bench/newcomer\"]\nto = [\"api\"]\nports = [\"443/tcp\"]\n",
        );
    }
    text
}

/// The policy of [`policy_text`], built in memory: parsing a file of a
/// million grants takes about 18 s and 6 GB (docs/performance.md,
/// "Parsing"), and the apply figures are about compiling and installing, so
/// large policies copy the identity and the grant of a parsed one-grant
/// policy.
fn bench_policy(grants: u32, newcomer_granted: bool) -> anyhow::Result<Policy> {
    let mut policy = policy::parse("bench.toml", &policy_text(1, newcomer_granted))
        .map_err(|errors| anyhow!("{errors}"))?;
    let (member, member_grant) = (policy.identities.pop(), policy.grants.remove(0));
    let (member, newcomer_grant) = (member.context("no member")?, policy.grants.pop());
    for i in 0..grants {
        let id: SpiffeId = format!("spiffe://bench/a{i}").parse()?;
        let index = policy.identities.len();
        policy.identities.push(Identity {
            id: id.clone(),
            addresses: vec![Ipv4Net::new(identity_addr(i), 32)?.into()],
            ..member.clone()
        });
        policy.grants.push(Grant {
            from: vec![Selector::Id(id)],
            sources: Sources::Identities(vec![index]),
            ..member_grant.clone()
        });
    }
    policy.grants.extend(newcomer_grant);
    Ok(policy)
}

fn compile(policy: &Policy, sizes: &MapSizes) -> anyhow::Result<PolicyEntries> {
    Ok(policy::compile(policy, &Capacities::from(sizes))?.entries)
}

/// Maps big enough for two generations of `grants` grants and `flows` flows.
fn sizes_for(grants: u32, flows: u32) -> MapSizes {
    let defaults = MapSizes::default();
    let twice = 2 * (grants + 1);
    MapSizes {
        identity_hosts: defaults.identity_hosts.max(twice),
        grants: defaults.grants.max(twice),
        grant_info: defaults.grant_info.max(twice),
        flows: defaults.flows.max(flows),
        ..defaults
    }
}

// ----------------------------------------------------- per-packet cost

fn tcp(from: Ipv4Addr, sport: u16, port: u16, flags: u8) -> Vec<u8> {
    Packet::tcp(from.into(), sport, SERVICE.into(), port, flags).bytes()
}

fn cost(plan: &Plan, results: &mut Results) -> anyhow::Result<()> {
    let empty_xdp = bpf::load_constant(bpf::PROG_TYPE_XDP, XDP_PASS, "bench_empty_xdp")?;
    let empty_tc = bpf::load_constant(bpf::PROG_TYPE_SCHED_CLS, TC_ACT_OK, "bench_empty_tc")?;
    for &grants in plan.cost_grants {
        let new_flows = plan.new_flows.min(grants * PORTS.len() as u32);
        step(&format!("per-packet cost at {grants} grants"));
        let sizes = sizes_for(grants, new_flows);
        let mut datapath = Datapath::load_with(sizes)?;
        let clock = Clock::now()?;
        // One fixed instant: no flow idles out while the runs repeat it.
        datapath.set_clock(clock.boot_ns)?;
        datapath.install(&compile(&bench_policy(grants, false)?, &sizes)?, &clock)?;

        let member = identity_addr(grants / 2);
        let opening = tcp(member, MEMBER_PORT, GRANTED_PORT, TCP_SYN);
        let established = tcp(member, MEMBER_PORT, GRANTED_PORT, TCP_ACK);
        let denied = tcp(member, MEMBER_PORT, UNGRANTED_PORT, TCP_SYN);
        // Distinct flows of every identity in turn, source ports counting up.
        let new_flows_frames = || {
            (0..new_flows).map(|n| {
                let sport = PORTS.start + n / grants;
                tcp(
                    identity_addr(n % grants),
                    sport as u16,
                    GRANTED_PORT,
                    TCP_SYN,
                )
            })
        };
        for (entry, name, empty, program, (pass, drop)) in [
            (
                Entry::Xdp,
                "xdp",
                &empty_xdp,
                programs::XDP,
                (XDP_PASS, XDP_DROP),
            ),
            (
                Entry::Tc,
                "tc",
                &empty_tc,
                programs::TC,
                (TC_ACT_OK, TC_ACT_SHOT),
            ),
        ] {
            let mesh = own_program(program)?;
            let metric = |case: &str| format!("cost.{name}.{case}.ns");
            let opened = datapath.test_run(entry, &opening)?;
            ensure!(opened.pass, "the granted flow was refused: {opened:?}");

            let empty_ns = median_ns(empty.as_fd(), &established, None)?;
            results.add(metric("empty"), empty_ns, "ns", Some(grants));
            let established_ns = median_ns(mesh.as_fd(), &established, Some(pass))?;
            results.add(metric("established"), established_ns, "ns", Some(grants));
            // A repeated frame is a new flow only once, so each new flow is
            // one run of its own. The kernel then times a single run, which
            // adds the cost of reading its clock: measured on the empty
            // program, and taken off.
            let timer_ns =
                single_runs_ns(empty.as_fd(), new_flows_frames().take(100_000), None)? - empty_ns;
            let new_flow_ns = single_runs_ns(mesh.as_fd(), new_flows_frames(), Some(pass))?;
            results.add(
                metric("new_flow"),
                new_flow_ns - timer_ns,
                "ns",
                Some(grants),
            );
            let denied_ns = median_ns(mesh.as_fd(), &denied, Some(drop))?;
            results.add(metric("denied"), denied_ns, "ns", Some(grants));
            // The next entry point meets the same flows as new again.
            datapath.forget_traffic()?;
        }
    }
    Ok(())
}

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;

/// The median over [`ROUNDS`] of the mean time of [`REPEAT`] runs of `frame`,
/// checking the program's return code if `expect` says one.
fn median_ns(
    program: std::os::fd::BorrowedFd,
    frame: &[u8],
    expect: Option<u32>,
) -> anyhow::Result<f64> {
    let mut means = Vec::with_capacity(ROUNDS);
    for _ in 0..ROUNDS {
        let run = bpf::test_run(program, frame, REPEAT)?;
        if let Some(expected) = expect {
            ensure!(
                run.retval == expected,
                "returned {} rather than {expected}",
                run.retval
            );
        }
        means.push(run.duration_ns);
    }
    means.sort_unstable();
    Ok(f64::from(means[ROUNDS / 2]))
}

/// The mean kernel-timed duration of one run each of `frames`.
fn single_runs_ns(
    program: std::os::fd::BorrowedFd,
    frames: impl Iterator<Item = Vec<u8>>,
    expect: Option<u32>,
) -> anyhow::Result<f64> {
    let (mut total, mut runs) = (0u64, 0u64);
    for frame in frames {
        let run = bpf::test_run(program, &frame, 1)?;
        if let Some(expected) = expect {
            ensure!(
                run.retval == expected,
                "a new flow returned {} rather than {expected}",
                run.retval
            );
        }
        total += u64::from(run.duration_ns);
        runs += 1;
    }
    Ok(total as f64 / runs as f64)
}

/// This process's program `name`: the one the live `Datapath` loaded, not
/// another process's of the same name.
fn own_program(name: &str) -> anyhow::Result<ProgramFd> {
    let ours: HashSet<u64> = bpf_fdinfo("self", "prog")?
        .iter()
        .filter_map(|info| fdinfo_field(info, "prog_id"))
        .collect();
    for info in aya::programs::loaded_programs() {
        let info = info?;
        if ours.contains(&u64::from(info.id())) && info.name_as_str() == Some(name) {
            return Ok(info.fd()?);
        }
    }
    bail!("program {name} is not loaded by this process")
}

/// The fdinfo of each `anon_inode:bpf-KIND` descriptor of process `pid`.
fn bpf_fdinfo(pid: &str, kind: &str) -> anyhow::Result<Vec<String>> {
    let target = format!("anon_inode:bpf-{kind}");
    let mut infos = Vec::new();
    for entry in fs::read_dir(format!("/proc/{pid}/fd"))? {
        let entry = entry?;
        if fs::read_link(entry.path()).is_ok_and(|link| link.as_os_str() == target.as_str()) {
            let fd = entry.file_name();
            // The descriptor may be closed meanwhile: skip it.
            if let Ok(info) = fs::read_to_string(format!("/proc/{pid}/fdinfo/{}", fd.display())) {
                infos.push(info);
            }
        }
    }
    Ok(infos)
}

fn fdinfo_field(info: &str, key: &str) -> Option<u64> {
    info.lines().find_map(|line| {
        line.strip_prefix(key)?
            .strip_prefix(':')?
            .trim()
            .parse()
            .ok()
    })
}

/// BPF_PROG_LOAD and BPF_PROG_TEST_RUN by hand: aya loads programs only from
/// an object file, and reports no test-run duration for the programs that
/// `Datapath` owns.
mod bpf {
    use std::{
        io,
        os::fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
    };

    use mesh_agent::datapath::bpf_syscall;

    pub const PROG_TYPE_SCHED_CLS: u32 = 3;
    pub const PROG_TYPE_XDP: u32 = 6;
    const BPF_PROG_LOAD: libc::c_long = 5;
    const BPF_PROG_TEST_RUN: libc::c_long = 10;

    /// The head of `union bpf_attr` for BPF_PROG_LOAD; the kernel zero-fills
    /// the rest.
    #[repr(C)]
    struct ProgLoad {
        prog_type: u32,
        insn_cnt: u32,
        insns: u64,
        license: u64,
        log_level: u32,
        log_size: u32,
        log_buf: u64,
        kern_version: u32,
        prog_flags: u32,
        prog_name: [u8; 16],
    }

    /// The head of `union bpf_attr` for BPF_PROG_TEST_RUN.
    #[repr(C)]
    struct TestRun {
        prog_fd: u32,
        retval: u32,
        data_size_in: u32,
        data_size_out: u32,
        data_in: u64,
        data_out: u64,
        repeat: u32,
        duration: u32,
    }

    /// A program that returns `value` and touches nothing: the baseline.
    pub fn load_constant(prog_type: u32, value: u32, name: &str) -> io::Result<OwnedFd> {
        // `mov64 r0, value; exit`, each instruction one little-endian u64.
        let insns = [0xb7 | (u64::from(value) << 32), 0x95u64];
        let license = c"GPL";
        let mut prog_name = [0u8; 16];
        prog_name[..name.len()].copy_from_slice(name.as_bytes());
        let mut attr = ProgLoad {
            prog_type,
            insn_cnt: insns.len() as u32,
            insns: insns.as_ptr() as u64,
            license: license.as_ptr() as u64,
            log_level: 0,
            log_size: 0,
            log_buf: 0,
            kern_version: 0,
            prog_flags: 0,
            prog_name,
        };
        let fd = bpf_syscall(BPF_PROG_LOAD, &mut attr)?;
        // SAFETY: BPF_PROG_LOAD returned a new descriptor that we own.
        Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
    }

    pub struct Run {
        pub retval: u32,
        /// Mean over the repeats, as the kernel timed them.
        pub duration_ns: u32,
    }

    pub fn test_run(program: BorrowedFd, frame: &[u8], repeat: u32) -> io::Result<Run> {
        let mut attr = TestRun {
            prog_fd: program.as_raw_fd() as u32,
            retval: 0,
            data_size_in: frame.len() as u32,
            data_size_out: 0,
            data_in: frame.as_ptr() as u64,
            data_out: 0,
            repeat,
            duration: 0,
        };
        bpf_syscall(BPF_PROG_TEST_RUN, &mut attr)?;
        Ok(Run {
            retval: attr.retval,
            duration_ns: attr.duration,
        })
    }
}

// ------------------------------------------------------------ policy apply

fn apply(plan: &Plan, results: &mut Results) -> anyhow::Result<()> {
    for &grants in plan.apply_grants {
        step(&format!("applying a policy of {grants} grants"));
        let policy = bench_policy(grants, false)?;
        let sizes = sizes_for(grants, 0);
        let mut datapath = Datapath::load_with(sizes)?;
        let started = Instant::now();
        let entries = compile(&policy, &sizes)?;
        datapath.install(&entries, &Clock::now()?)?;
        results.add(
            "apply.full.seconds",
            started.elapsed().as_secs_f64(),
            "s",
            Some(grants),
        );
    }
    Ok(())
}

// -------------------------------------------------------------- throughput

/// A child process, killed and reaped however the benchmark ends.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

const SENDER_VETH: &str = "bench-tx";
const RECEIVER_VETH: &str = "bench-rx";
const NFT_TABLE: &str = "mesh_bench";

fn throughput(plan: &Plan, results: &mut Results) -> anyhow::Result<()> {
    step(&format!(
        "drop throughput, {THROUGHPUT_IDENTITIES} identities, trafgen on one CPU, {} s per figure",
        plan.window.as_secs()
    ));
    let sender = NetNs::new()?;
    let receiver = NetNs::new()?;
    veth_pair(
        &VethEnd {
            ns: &sender,
            name: SENDER_VETH,
            addr: PEER,
        },
        &VethEnd {
            ns: &receiver,
            name: RECEIVER_VETH,
            addr: SERVICE,
        },
    )?;
    receiver.ip(&["link", "set", RECEIVER_VETH, "address", RECEIVER_MAC])?;
    // A stranger's SYN to the granted port: every filter drops it after
    // looking at all it has.
    let frame = tcp(STRANGER, 40_000, GRANTED_PORT, TCP_SYN);
    let frame = format!(
        "{{ {} }}",
        frame
            .iter()
            .map(|b| format!("{b:#04x}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let measure = |count: &dyn Fn() -> anyhow::Result<u64>| -> anyhow::Result<f64> {
        let mut trafgen = sender.command("trafgen")?;
        // No tuning of socket memory or IRQ affinity: those are the host's.
        trafgen
            .args([
                "--dev",
                SENDER_VETH,
                "--cpus",
                "1",
                "--no-sock-mem",
                "--notouch-irq",
            ])
            .arg(&frame)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let _trafgen = Running(trafgen.spawn().context("starting trafgen")?);
        thread::sleep(Duration::from_millis(500));
        let (before, started) = (count()?, Instant::now());
        thread::sleep(plan.window);
        let counted = count()? - before;
        ensure!(counted > 0, "no packet was counted: is trafgen sending?");
        Ok(counted as f64 / started.elapsed().as_secs_f64())
    };

    let received = || rx_packets(&receiver);
    results.add("throughput.drop.none.pps", measure(&received)?, "pps", None);

    let sizes = MapSizes::default();
    let entries = compile(&bench_policy(THROUGHPUT_IDENTITIES, false)?, &sizes)?;
    {
        let mut datapath = Datapath::load_with(sizes)?;
        datapath.install(&entries, &Clock::now()?)?;
        receiver.enter(|| datapath.attach_xdp(RECEIVER_VETH, XdpMode::default()))??;
        let dropped = || -> anyhow::Result<u64> {
            Ok(datapath
                .counters()?
                .values()
                .map(|(packets, _)| packets)
                .sum())
        };
        let pps = measure(&dropped)?;
        results.add(
            "throughput.drop.mesh_xdp.pps",
            pps,
            "pps",
            Some(THROUGHPUT_IDENTITIES),
        );
    }

    for (kind, ruleset) in [
        ("nftables_set", nft_set_ruleset()),
        ("nftables_linear", nft_linear_ruleset()),
    ] {
        let file = tempfile::NamedTempFile::new()?;
        fs::write(file.path(), ruleset)?;
        nft(&receiver, &["-f", &file.path().to_string_lossy()])?;
        let dropped = || nft_dropped(&receiver);
        let pps = measure(&dropped);
        nft(&receiver, &["delete", "table", "ip", NFT_TABLE])?;
        results.add(
            format!("throughput.drop.{kind}.pps"),
            pps?,
            "pps",
            Some(THROUGHPUT_IDENTITIES),
        );
    }
    Ok(())
}

/// A table whose prerouting chain, ahead of everything else, accepts what
/// `rules` accept and counts and drops the rest.
fn nft_table(declarations: &str, rules: &str) -> String {
    format!(
        "table ip {NFT_TABLE} {{\n  counter dropped {{}}\n{declarations}\n  chain judge {{\n    \
         type filter hook prerouting priority raw; policy accept;\n{rules}\n    \
         counter name \"dropped\" drop\n  }}\n}}\n"
    )
}

/// The policy as one set of (source, destination, port) and one rule.
fn nft_set_ruleset() -> String {
    let elements: Vec<String> = (0..THROUGHPUT_IDENTITIES)
        .map(|i| format!("{} . {SERVICE} . {GRANTED_PORT}", identity_addr(i)))
        .collect();
    let set = format!(
        "  set granted {{\n    type ipv4_addr . ipv4_addr . inet_service\n    elements = {{ {} }}\n  }}",
        elements.join(", ")
    );
    nft_table(&set, "    ip saddr . ip daddr . tcp dport @granted accept")
}

/// The policy as one rule per grant, tried in turn.
fn nft_linear_ruleset() -> String {
    let mut rules = String::new();
    for i in 0..THROUGHPUT_IDENTITIES {
        writeln!(
            rules,
            "    ip saddr {} ip daddr {SERVICE} tcp dport {GRANTED_PORT} accept",
            identity_addr(i)
        )
        .expect("writing to a String");
    }
    nft_table("", &rules)
}

fn nft(ns: &NetNs, args: &[&str]) -> anyhow::Result<String> {
    let out = ns
        .command("nft")?
        .args(args)
        .output()
        .context("running nft")?;
    ensure!(
        out.status.success(),
        "nft {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8(out.stdout)?)
}

fn nft_dropped(ns: &NetNs) -> anyhow::Result<u64> {
    let listing: serde_json::Value = serde_json::from_str(&nft(
        ns,
        &["-j", "list", "counter", "ip", NFT_TABLE, "dropped"],
    )?)?;
    listing["nftables"]
        .as_array()
        .and_then(|items| {
            items
                .iter()
                .find_map(|item| item["counter"]["packets"].as_u64())
        })
        .context("no packet count in nft's listing of the counter")
}

fn rx_packets(ns: &NetNs) -> anyhow::Result<u64> {
    let links: serde_json::Value =
        serde_json::from_str(&ns.ip(&["-s", "-j", "link", "show", RECEIVER_VETH])?)?;
    links[0]["stats64"]["rx"]["packets"]
        .as_u64()
        .context("no rx packet count in `ip -s -j link`")
}

// ------------------------------------------------------- the agent at 100k

/// `mesh-agent run` enforcing `AGENT_GRANTS` grants on a veth: its memory,
/// how long a one-grant change takes to reach a real connection, and its
/// memory once the file grows to `MEMORY_GRANTS` grants.
fn agent(mesh_agent: &Path, results: &mut Results) -> anyhow::Result<()> {
    step(&format!(
        "mesh-agent run with {AGENT_GRANTS} grants, then {MEMORY_GRANTS}: memory and a one-grant change"
    ));
    let agents = NetNs::new()?;
    let node = NetNs::new()?;
    veth_pair(
        &VethEnd {
            ns: &agents,
            name: "agents0",
            addr: PEER,
        },
        &VethEnd {
            ns: &node,
            name: "node0",
            addr: SERVICE,
        },
    )?;
    agents.ip(&["addr", "add", &format!("{NEWCOMER}/32"), "dev", "agents0"])?;
    node.ip(&["route", "add", &format!("{NEWCOMER}/32"), "dev", "node0"])?;
    let api = SocketAddr::from((SERVICE, GRANTED_PORT));
    tcp_echo_server(&node, api)?;

    let bpffs = BpfFs::mount()?;
    let dir = tempfile::tempdir()?;
    let policy = dir.path().join("policy.toml");
    let state = dir.path().join("state");
    let put_policy = |text: String| -> anyhow::Result<()> {
        // Renamed into place, as config management does.
        let aside = dir.path().join(".policy.toml.new");
        fs::write(&aside, text)?;
        Ok(fs::rename(&aside, &policy)?)
    };
    put_policy(policy_text(AGENT_GRANTS, false))?;
    let mut command = node.command(mesh_agent)?;
    command
        .arg("run")
        .args(["--interface", "node0", "--policy"])
        .arg(&policy)
        .arg("--bpffs")
        .arg(bpffs.path().join("mesh"))
        .arg("--state-dir")
        .arg(&state)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let agent = Running(command.spawn().context("starting mesh-agent")?);
    let pid = agent.0.id();
    wait_for_agent(&state, |status| {
        status.pid == Some(pid) && status.applied.is_some()
    })?;

    let agent_rss = |results: &mut Results, grants| -> anyhow::Result<()> {
        let rss = rss_bytes(&pid.to_string())?;
        results.add("memory.agent.rss_bytes", rss as f64, "bytes", Some(grants));
        Ok(())
    };
    agent_rss(results, AGENT_GRANTS)?;
    let patience = Duration::from_millis(5);
    ensure!(
        !tcp_echo_works(&agents, NEWCOMER, api, patience)?,
        "the newcomer connects before it is granted"
    );
    let changed = Instant::now();
    put_policy(policy_text(AGENT_GRANTS, true))?;
    while !tcp_echo_works(&agents, NEWCOMER, api, patience)? {
        ensure!(
            changed.elapsed() < Duration::from_secs(30),
            "the new grant never took effect"
        );
    }
    results.add(
        "apply.change.seconds",
        changed.elapsed().as_secs_f64(),
        "s",
        None,
    );

    put_policy(policy_text(MEMORY_GRANTS, false))?;
    let grown = format!(", {MEMORY_GRANTS} grants");
    wait_for_agent(&state, |status| {
        status
            .applied
            .as_ref()
            .is_some_and(|applied| applied.summary.ends_with(&grown))
    })?;
    agent_rss(results, MEMORY_GRANTS)?;
    Ok(())
}

fn rss_bytes(pid: &str) -> anyhow::Result<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|line| kib_field(line, "VmRSS:"))
        .map(|kib| kib * 1024)
        .context("no VmRSS in /proc/PID/status")
}

/// `KEY  N kB` as N.
fn kib_field(line: &str, key: &str) -> Option<u64> {
    line.strip_prefix(key)?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse()
        .ok()
}

// ------------------------------------------------------------------ memory

/// Kernel map memory at the default map sizes holding `MEMORY_GRANTS`
/// grants.
fn memory(results: &mut Results) -> anyhow::Result<()> {
    step(&format!("kernel map memory at {MEMORY_GRANTS} grants"));
    let policy = bench_policy(MEMORY_GRANTS, false)?;
    let sizes = MapSizes::default();
    let compiled = policy::compile(&policy, &Capacities::from(&sizes))?;
    let mut datapath = Datapath::load_with(sizes)?;
    datapath.install(&compiled.entries, &Clock::now()?)?;
    let map_bytes: u64 = bpf_fdinfo("self", "map")?
        .iter()
        .filter_map(|info| fdinfo_field(info, "memlock"))
        .sum();
    results.add(
        "memory.kernel.bytes",
        map_bytes as f64,
        "bytes",
        Some(MEMORY_GRANTS),
    );
    Ok(())
}

fn wait_for_agent(state: &Path, ready: impl Fn(&AgentStatus) -> bool) -> anyhow::Result<()> {
    wait_until("mesh-agent to apply its policy", || {
        Ok(AgentStatus::read(state).is_ok_and(|status| ready(&status)))
    })
}

/// Polls `done` every 10 ms until it holds, for at most a minute; an error
/// from it ends the wait.
fn wait_until(what: &str, mut done: impl FnMut() -> anyhow::Result<bool>) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if done()? {
            return Ok(());
        }
        thread::sleep(Duration::from_millis(10));
    }
    bail!("timed out after 60 seconds waiting for {what}")
}

// ------------------------------------------------------------ key rotation

/// The nodes' underlay addresses, on a veth pair, and WireGuard's port.
const UNDERLAY_A: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
const UNDERLAY_B: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
const WIREGUARD_PORT: u16 = 51820;
const MESH_RANGE: &str = "198.18.0.0/16";
const PREFIX_A: &str = "198.18.1.0/24";
const PREFIX_B: &str = "198.18.2.0/24";
/// A node's mesh interface gets the first address of its prefix: the
/// prober sends from node A's, the echo answers on node B's.
const PROBER: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);
const ECHO: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(198, 18, 2, 1), 7000));
/// One probe this often: the resolution of the rotation figures.
const PROBE_INTERVAL: Duration = Duration::from_millis(2);
/// The length of the baseline's window and of the rotation's, which starts
/// `ROTATION_AT` into its window.
const PROBE_WINDOW: Duration = Duration::from_secs(3);
const ROTATION_AT: Duration = Duration::from_secs(1);
/// An answer up to this long after its window's end still counts as one
/// (though not in the window's gaps).
const PROBE_GRACE: Duration = Duration::from_millis(200);

/// Two nodes joined by `mesh-agent run` over a veth pair; node A's agent
/// address sends a numbered UDP probe to an echo on node B every
/// `PROBE_INTERVAL`. The longest time without an answer and the probes
/// lost, over a window without a rotation and an equal one across
/// `mesh-agent node rotate-key` on node B.
fn rotation(
    mesh_agent: &Path,
    wireguard: Option<&Path>,
    results: &mut Results,
) -> anyhow::Result<()> {
    step("a WireGuard key rotation between two nodes: the pause in a stream of UDP echoes");
    let mesh = Mesh::new(mesh_agent, wireguard)?;
    let (ns_a, ns_b) = (NetNs::new()?, NetNs::new()?);
    veth_pair(
        &VethEnd {
            ns: &ns_a,
            name: "under-a",
            addr: UNDERLAY_A,
        },
        &VethEnd {
            ns: &ns_b,
            name: "under-b",
            addr: UNDERLAY_B,
        },
    )?;
    let mut a = mesh.join(ns_a, "node-a", PREFIX_A, UNDERLAY_A)?;
    let mut b = mesh.join(ns_b, "node-b", PREFIX_B, UNDERLAY_B)?;
    for node in [&mut a, &mut b] {
        node.wait_until("the other node to be a peer", |ns| {
            metric(ns, "mesh_node_peers") == Some(1.0)
        })?;
    }
    let tunnel = if a
        .ns
        .ip(&["-d", "link", "show", "mesh0"])?
        .contains("wireguard")
    {
        "kernel WireGuard"
    } else {
        "userspace WireGuard"
    };
    step(&format!(
        "probing through {tunnel} every {PROBE_INTERVAL:?}: {PROBE_WINDOW:?} without a rotation, then {PROBE_WINDOW:?} across one"
    ));

    let echo = b.ns.enter(|| UdpSocket::bind(ECHO))??;
    echo.set_read_timeout(Some(Duration::from_millis(20)))?;
    let mut prober = Prober::new(&a.ns)?;
    let stop = AtomicBool::new(false);
    let (baseline, rotated) = thread::scope(|scope| {
        scope.spawn(|| serve_echo(&echo, &stop));
        let measured = probe_rotation(&mesh, &mut a, &mut b, &mut prober);
        stop.store(true, Ordering::Relaxed);
        measured
    })?;

    let ms = |gap: Duration| gap.as_secs_f64() * 1000.0;
    let (gap, pause) = (baseline.longest_gap(), rotated.longest_gap());
    results.add("rotation.baseline.gap.ms", ms(gap), "ms", None);
    let lost = f64::from(baseline.lost());
    results.add("rotation.baseline.lost.probes", lost, "probes", None);
    results.add("rotation.pause.ms", ms(pause), "ms", None);
    let lost = f64::from(rotated.lost());
    results.add("rotation.lost.probes", lost, "probes", None);
    let ratio = pause.as_secs_f64() / gap.as_secs_f64();
    results.add("rotation.pause.ratio", ratio, "×", None);
    Ok(())
}

/// The baseline window, then the window across node B's rotation, which B
/// must count and A follow within it.
fn probe_rotation(
    mesh: &Mesh,
    a: &mut MeshNode,
    b: &mut MeshNode,
    prober: &mut Prober,
) -> anyhow::Result<(Window, Window)> {
    // The first probes bring about the first handshake.
    a.wait_until("an answer through the tunnel", |_| {
        prober
            .window(Duration::from_millis(100))
            .is_ok_and(|window| window.answered > 0)
    })?;
    let baseline = prober.window(PROBE_WINDOW)?;
    let (rotated, counted) = thread::scope(|scope| -> anyhow::Result<_> {
        let probing = scope.spawn(|| prober.window(PROBE_WINDOW));
        thread::sleep(ROTATION_AT);
        let state = b.state.path().to_string_lossy().into_owned();
        mesh.cli(&["node", "rotate-key", "--state-dir", &state])?;
        b.wait_until("node B to count the rotation", |ns| {
            metric(ns, "mesh_node_key_rotations_total") == Some(1.0)
        })?;
        let counted = Instant::now();
        let rotated = probing
            .join()
            .map_err(|_| anyhow!("the prober panicked"))??;
        Ok((rotated, counted))
    })?;
    // B's new key ends the old sessions: answers after it took the key
    // come through a handshake with A, which needs A to have followed.
    ensure!(
        rotated.arrivals.last().is_some_and(|&last| last > counted),
        "no answer within the window after node B rotated its key; node A's log:\n{}",
        a.log()
    );
    ensure!(
        metric(&a.ns, "mesh_node_peers") == Some(1.0),
        "node A lost its peer"
    );
    Ok((baseline, rotated))
}

/// Both nodes' policy: the prober may reach the echo.
fn rotation_policy() -> String {
    let (echo, port) = (ECHO.ip(), ECHO.port());
    format!(
        "version = 1\ntrust_domain = \"bench\"\n\n\
         [[identity]]\nid = \"spiffe://bench/prober\"\naddresses = [\"{PROBER}/32\"]\n\n\
         [[service]]\nname = \"echo\"\naddresses = [\"{echo}/32\"]\nports = [\"{port}/udp\"]\n\n\
         [[grant]]\nfrom = [\"spiffe://bench/prober\"]\nto = [\"echo\"]\nports = [\"{port}/udp\"]\n"
    )
}

/// What the nodes share: the programs, and a folder with the admin key and
/// its bundle, the policy and the directory store.
struct Mesh<'a> {
    mesh_agent: &'a Path,
    /// `--wireguard-userspace`, if not the agent's default.
    wireguard: Option<&'a Path>,
    dir: tempfile::TempDir,
}

impl<'a> Mesh<'a> {
    fn new(mesh_agent: &'a Path, wireguard: Option<&'a Path>) -> anyhow::Result<Self> {
        let mesh = Self {
            mesh_agent,
            wireguard,
            dir: tempfile::Builder::new().prefix("mesh-bench-").tempdir()?,
        };
        let admin = mesh.dir.path().join("admin");
        mesh.cli(&["token", "keygen", "--out", &admin.to_string_lossy()])?;
        fs::create_dir(mesh.dir.path().join("store"))?;
        fs::write(mesh.dir.path().join("policy.toml"), rotation_policy())?;
        Ok(mesh)
    }

    /// `mesh-agent ARGS`, which must succeed; what it prints.
    fn cli(&self, args: &[&str]) -> anyhow::Result<String> {
        mesh_tests::run(&self.mesh_agent.to_string_lossy(), args)
    }

    /// `mesh-agent run` in `ns`, joining as `name` with a join token for
    /// `prefix`, its WireGuard on `underlay`; its log goes to its state
    /// folder.
    fn join(
        &self,
        ns: NetNs,
        name: &str,
        prefix: &str,
        underlay: Ipv4Addr,
    ) -> anyhow::Result<MeshNode> {
        let state = tempfile::Builder::new().prefix("mesh-bench-").tempdir()?;
        let state_dir = state.path().to_string_lossy().into_owned();
        let node_key = self.cli(&["node", "key", "--state-dir", &state_dir])?;
        let admin_key = self.dir.path().join("admin/issuer.jwk");
        let token = self.cli(&[
            "node",
            "token",
            "issue",
            "--key",
            &admin_key.to_string_lossy(),
            "--node",
            name,
            "--prefix",
            prefix,
            "--node-key",
            node_key.trim(),
            "--ttl",
            "1h",
        ])?;
        let token_file = state.path().join("join.token");
        fs::write(&token_file, token)?;
        let bpffs = BpfFs::mount()?;
        let mut command = ns.command(self.mesh_agent)?;
        command
            .arg("run")
            .arg("--policy")
            .arg(self.dir.path().join("policy.toml"))
            .arg("--join-token")
            .arg(&token_file)
            .arg("--store")
            .arg(self.dir.path().join("store"))
            .arg("--mesh-bundle")
            .arg(self.dir.path().join("admin/bundle.json"))
            .arg(format!("--endpoint={underlay}:{WIREGUARD_PORT}"))
            .arg(format!("--mesh-range={MESH_RANGE}"))
            .arg("--bpffs")
            .arg(bpffs.path().join("mesh"))
            .arg("--state-dir")
            .arg(state.path())
            .stdout(Stdio::null())
            .stderr(fs::File::create(state.path().join("agent.log"))?);
        if let Some(program) = self.wireguard {
            command.arg("--wireguard-userspace").arg(program);
        }
        let agent = Running(command.spawn().context("starting mesh-agent")?);
        Ok(MeshNode {
            agent,
            ns,
            state,
            _bpffs: bpffs,
        })
    }
}

/// A node of the mesh: `mesh-agent run` in its namespace, and its folders.
/// Fields drop in order: the agent goes before its namespace.
struct MeshNode {
    agent: Running,
    ns: NetNs,
    state: tempfile::TempDir,
    _bpffs: BpfFs,
}

impl MeshNode {
    fn log(&self) -> String {
        fs::read_to_string(self.state.path().join("agent.log")).unwrap_or_default()
    }

    /// Waits until `done` holds, given the node's namespace; fails with the
    /// agent's log if the agent exits first.
    fn wait_until(
        &mut self,
        what: &str,
        mut done: impl FnMut(&NetNs) -> bool,
    ) -> anyhow::Result<()> {
        let Self { agent, ns, .. } = self;
        wait_until(what, || {
            if let Some(status) = agent.0.try_wait()? {
                bail!("mesh-agent exited ({status})");
            }
            Ok(done(ns))
        })
        .with_context(|| format!("mesh-agent's log:\n{}", self.log()))
    }
}

/// The value of the unlabelled metric `name` of the agent in `ns`, if it
/// answers.
fn metric(ns: &NetNs, name: &str) -> Option<f64> {
    sample(&http_get(ns, METRICS, "/metrics").ok()?, name, &[])
}

/// Sends every datagram back where it came from, until `stop`.
fn serve_echo(socket: &UdpSocket, stop: &AtomicBool) {
    let mut buf = [0u8; 64];
    while !stop.load(Ordering::Relaxed) {
        if let Ok((n, from)) = socket.recv_from(&mut buf) {
            // An echo that cannot be sent is a probe lost.
            let _ = socket.send_to(&buf[..n], from);
        }
    }
}

/// Numbered probes to the echo. Each window's numbers follow the last
/// window's, so a late answer counts for its own window only.
struct Prober {
    socket: UdpSocket,
    next: u32,
}

/// What one window of probes saw.
struct Window {
    start: Instant,
    end: Instant,
    sent: u32,
    answered: u32,
    /// When answers arrived within the window, in order.
    arrivals: Vec<Instant>,
}

impl Prober {
    fn new(ns: &NetNs) -> anyhow::Result<Self> {
        // Unconnected: on a connected socket, an ICMP error about one probe
        // would fail a later call.
        let socket = ns.enter(|| UdpSocket::bind((PROBER, 0)))??;
        Ok(Self { socket, next: 0 })
    }

    /// Sends a probe every `PROBE_INTERVAL` for `length`, and takes answers
    /// until `PROBE_GRACE` after.
    fn window(&mut self, length: Duration) -> anyhow::Result<Window> {
        let first = self.next;
        let start = Instant::now();
        let (end, last_call) = (start + length, start + length + PROBE_GRACE);
        let mut window = Window {
            start,
            end,
            sent: 0,
            answered: 0,
            arrivals: Vec::new(),
        };
        let mut buf = [0u8; 4];
        loop {
            let now = Instant::now();
            let due = start + PROBE_INTERVAL * window.sent;
            if now < end && now >= due {
                self.socket.send_to(&self.next.to_be_bytes(), ECHO)?;
                self.next += 1;
                window.sent += 1;
                continue;
            }
            if now >= last_call {
                return Ok(window);
            }
            let wake = if now < end { due } else { last_call };
            // A zero timeout would mean none at all.
            let timeout = (wake - now).max(Duration::from_micros(10));
            self.socket.set_read_timeout(Some(timeout))?;
            match self.socket.recv_from(&mut buf) {
                Ok((4, from)) if from == ECHO => {
                    if (first..self.next).contains(&u32::from_be_bytes(buf)) {
                        window.answered += 1;
                        let arrived = Instant::now();
                        if arrived < end {
                            window.arrivals.push(arrived);
                        }
                    }
                }
                Ok(_) => {}
                Err(err)
                    if matches!(
                        err.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(err) => return Err(err.into()),
            }
        }
    }
}

impl Window {
    /// The longest time without an answer, from the window's start to its
    /// end.
    fn longest_gap(&self) -> Duration {
        let edges: Vec<Instant> = iter::once(self.start)
            .chain(self.arrivals.iter().copied())
            .chain(iter::once(self.end))
            .collect();
        edges
            .windows(2)
            .map(|pair| pair[1] - pair[0])
            .max()
            .unwrap_or_default()
    }

    fn lost(&self) -> u32 {
        self.sent - self.answered
    }
}

// ------------------------------------------------------------------ output

fn machine() -> String {
    let cpus = thread::available_parallelism().map_or(0, usize::from);
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|line| line.strip_prefix("model name")?.split_once(':'))
        .map_or("unknown CPU", |(_, model)| model.trim());
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let meminfo = fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let memory_gib = meminfo
        .lines()
        .find_map(|line| kib_field(line, "MemTotal:"))
        .map_or(0, |kib| kib.div_ceil(1024 * 1024));
    format!(
        "{cpus} × {model}, {memory_gib} GiB, Linux {}",
        kernel.trim()
    )
}

fn row(record: &Record) -> String {
    let grants = record.grants.map(|g| g.to_string()).unwrap_or_default();
    let value = if record.value >= 1000.0 || record.value.fract() == 0.0 {
        format!("{:.0}", record.value)
    } else {
        format!("{:.3}", record.value)
    };
    format!(
        "{:<36} {grants:>9} {value:>14} {}",
        record.metric, record.unit
    )
}

fn print_table(machine: &str, results: &Results) {
    println!("\nmesh benchmarks on {machine}\n");
    println!("{:<36} {:>9} {:>14} unit", "metric", "grants", "value");
    for record in &results.0 {
        println!("{}", row(record));
    }
}

/// The goals, each with the figures that decide it.
fn print_goals(plan: &Plan, results: &Results) {
    println!("\ngoals");
    let goal = |what: String, met: Option<bool>| {
        let verdict = match met {
            Some(true) => "met",
            Some(false) => "MISSED",
            None => "not measured",
        };
        println!("  {verdict:<12} {what}");
    };
    let cost = |entry: &str, case: &str, grants: u32| {
        results.get(&format!("cost.{entry}.{case}.ns"), Some(grants))
    };
    let (smallest, largest) = (
        plan.cost_grants[0],
        plan.cost_grants[plan.cost_grants.len() - 1],
    );
    for entry in ["xdp", "tc"] {
        for (case, limit) in [("established", 3.0), ("new_flow", 8.0)] {
            let ratio = cost(entry, case, largest)
                .zip(cost(entry, "empty", largest))
                .map(|(cost, empty)| cost / empty);
            goal(
                format!(
                    "{entry} {case} ≤ {limit}× empty at {largest} grants: {:.1}×",
                    ratio.unwrap_or(f64::NAN)
                ),
                ratio.map(|r| r <= limit),
            );
        }
        for case in ["established", "new_flow", "denied"] {
            let ratio = cost(entry, case, largest)
                .zip(cost(entry, case, smallest))
                .map(|(large, small)| large / small);
            goal(
                format!(
                    "{entry} {case} at {largest} grants ≤ 1.5× at {smallest}: {:.2}×",
                    ratio.unwrap_or(f64::NAN)
                ),
                ratio.map(|r| r <= 1.5),
            );
        }
    }
    let pps = |kind: &str| {
        let grants = (kind != "none").then_some(THROUGHPUT_IDENTITIES);
        results.get(&format!("throughput.drop.{kind}.pps"), grants)
    };
    let mesh = pps("mesh_xdp");
    goal(
        "mesh XDP drops ≥ nftables with sets".to_owned(),
        mesh.zip(pps("nftables_set")).map(|(m, s)| m >= s),
    );
    goal(
        "mesh XDP drops ≥ 50× a 10k-rule linear chain".to_owned(),
        mesh.zip(pps("nftables_linear")).map(|(m, l)| m >= 50.0 * l),
    );
    let full = results.get("apply.full.seconds", Some(100_000));
    goal(
        "100k grants applied in < 1 s".to_owned(),
        full.map(|s| s < 1.0),
    );
    let change = results.get("apply.change.seconds", None);
    goal(
        "a one-grant change enforced in < 100 ms".to_owned(),
        change.map(|s| s < 0.1),
    );
    // On a veth pair the sender bounds every figure: show each filter next
    // to the rate without one, so no ratio above reads better than it is.
    if let Some(unfiltered) = pps("none") {
        println!(
            "\nrelative to no filter ({unfiltered:.0} pps, the sender's rate into the stack):"
        );
        for kind in ["mesh_xdp", "nftables_set", "nftables_linear"] {
            if let Some(rate) = pps(kind) {
                println!("  {kind:<16} {:>5.1}%", 100.0 * rate / unfiltered);
            }
        }
    }
}
