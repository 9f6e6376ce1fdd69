//! `mesh-agent run`: the node agent. It loads the programs with their maps
//! pinned (adopting whatever an earlier agent left), applies the policy file,
//! attaches to the interfaces, and then keeps the kernel in step with the
//! file: on every change (inotify) and on SIGHUP. A policy with errors is
//! rejected whole and the previous one keeps enforcing. On SIGTERM the agent
//! exits and enforcement stays, pinned, until `mesh-agent teardown`.

mod bindings;
mod flows;
mod lock;
mod peer_bindings;
mod preflight;
mod report;
mod status;
mod watch;

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use time::{OffsetDateTime, format_description::well_known::Rfc3339};
use tokio::signal::unix::{SignalKind, signal};

pub use self::{
    bindings::{
        BINDINGS_FILE, Binding, BindingError, BindingOptions, read_bindings, teardown_bindings,
    },
    flows::{FlowFilter, FlowRecord, show_flows},
    lock::{AgentLock, LockError},
    preflight::PreflightError,
    report::{Report, status, teardown},
    status::{AgentStatus, Applied},
};
use crate::{
    datapath::{self, Clock, Datapath, DatapathError, Hook, MapSizes, Pins},
    metrics::{self, Metrics, Names},
    policy::{self, Capacities, CompileError, LoadError},
};

/// Which hook judges packets arriving on an interface.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Ingress {
    /// Native XDP where the driver has it, TC otherwise.
    #[default]
    Auto,
    Xdp,
    Tc,
}

pub struct Options {
    pub policy: PathBuf,
    pub interfaces: Vec<String>,
    pub ingress: Ingress,
    pub state_dir: PathBuf,
    /// The agent's own folder on a bpffs, holding its pins.
    pub bpffs: PathBuf,
    pub sizes: MapSizes,
    /// Where to serve /metrics, /healthz and /readyz.
    pub metrics_listen: SocketAddr,
    /// Most (source, service, verdict, reason) series exported; the rest
    /// are summed under source and service `other`.
    pub metrics_max_series: usize,
    /// Where flow events go, as JSON lines: a file, or `-` for stdout.
    pub flow_log: PathBuf,
    /// The kernel's flow event limit: sustained per second, and at once.
    pub flow_events_rate: u32,
    pub flow_events_burst: u32,
    /// Join the node mesh: its interface is enforced on like the others.
    pub mesh: Option<crate::node::MeshOptions>,
    /// Binding processes to identities, and the control socket.
    pub bindings: BindingOptions,
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Preflight(#[from] PreflightError),
    #[error(transparent)]
    Lock(#[from] LockError),
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    #[error(transparent)]
    Policy(#[from] LoadError),
    #[error("{}: {source}", path.display())]
    Compile {
        path: PathBuf,
        #[source]
        source: CompileError,
    },
    #[error("{what} {}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("waiting for signals and file changes")]
    Events(#[source] std::io::Error),
    #[error("setting up metrics")]
    Metrics(#[from] prometheus::Error),
    #[error(transparent)]
    MetricsListen(std::io::Error),
    #[error(transparent)]
    Mesh(#[from] crate::node::MeshError),
    #[error(transparent)]
    Bindings(#[from] BindingError),
    #[error(transparent)]
    Control(#[from] crate::control::ControlError),
}

/// Changes to the policy file closer together than this are applied once.
const SETTLE: Duration = Duration::from_millis(100);

pub async fn run(mut options: Options) -> Result<(), AgentError> {
    preflight::check_btf()?;
    preflight::check_interfaces(&options.interfaces)?;
    preflight::ensure_bpffs(&options.bpffs)?;
    for (what, dir) in [
        ("creating", &options.bpffs),
        ("creating", &options.state_dir),
    ] {
        std::fs::create_dir_all(dir).map_err(|source| AgentError::Io {
            what,
            path: dir.clone(),
            source,
        })?;
    }
    let _lock = AgentLock::take(&options.bpffs)?;
    let metrics = Metrics::new(options.bpffs.clone(), options.metrics_max_series)?;
    // The mesh interface is made, without peers, before anything is
    // attached, so that it is enforced on like the others from the start.
    let mesh = match options.mesh.take() {
        Some(mesh) => Some(crate::node::Mesh::start(mesh, &metrics).await?),
        None => None,
    };
    if let Some(mesh) = &mesh {
        options.interfaces.push(mesh.interface().to_owned());
    }
    let listener = metrics::bind(options.metrics_listen)
        .await
        .map_err(AgentError::MetricsListen)?;
    let pins = Pins::new(&options.bpffs);
    let mut datapath = Datapath::load_pinned(&pins, options.sizes)?;
    datapath.set_event_rate(options.flow_events_rate, options.flow_events_burst)?;
    let events = datapath.take_events()?;
    let sink = flows::open_sink(&options.flow_log).map_err(|source| AgentError::Io {
        what: "opening the flow log",
        path: options.flow_log.clone(),
        source,
    })?;
    let adopted = datapath.state()? != 0;
    if adopted {
        tracing::info!(bpffs = %options.bpffs.display(), "adopted the pinned datapath");
    }
    let mut agent = Agent {
        status: AgentStatus {
            pid: Some(std::process::id()),
            policy: options.policy.clone(),
            bpffs: options.bpffs.clone(),
            ..AgentStatus::default()
        },
        bindings: bindings::Bindings::new(&options.bindings, &options.state_dir, &metrics).await?,
        peer_bindings: peer_bindings::PeerBindings::new(
            mesh.as_ref().map(crate::node::Mesh::peer_bindings),
            &metrics,
        )?,
        options,
        datapath,
        pins,
        metrics: metrics.clone(),
    };
    let mut control = crate::control::ControlServer::bind(&agent.options.bindings.socket)?;
    let flow_metrics = metrics.clone();
    // The policy goes in before the interfaces are touched: a first start
    // with a bad policy leaves them alone. An adopted datapath keeps its
    // policy enforcing whatever the file says now.
    if let Err(err) = agent.apply() {
        if !adopted {
            // Leave the node as it was: nothing pinned either.
            drop(agent.datapath);
            datapath::unpin_all(&agent.pins)?;
            return Err(err);
        }
        agent.reject(&err);
    }
    agent.attach()?;
    agent
        .bindings
        .attach(&mut agent.datapath, &agent.pins)
        .await?;
    agent.save_status();

    let _flow_log = AbortOnDrop(tokio::spawn(async move {
        if let Err(err) = flows::write_flow_log(events, flow_metrics, sink).await {
            tracing::error!(error = %err, "flow log stopped");
        }
    }));
    let _serving = AbortOnDrop(tokio::spawn(metrics::serve(listener, metrics)));
    let _mesh = mesh.map(|mesh| AbortOnDrop(tokio::spawn(mesh.run())));
    let events = |source| AgentError::Events(source);
    let mut hangup = signal(SignalKind::hangup()).map_err(events)?;
    let mut terminate = signal(SignalKind::terminate()).map_err(events)?;
    let mut interrupt = signal(SignalKind::interrupt()).map_err(events)?;
    let mut changes = watch::PolicyWatch::new(&agent.options.policy).map_err(events)?;
    tracing::info!("running");
    loop {
        let expiry = agent.bindings.next_expiry();
        let peer_expiry = agent.peer_bindings.next_expiry();
        tokio::select! {
            _ = hangup.recv() => agent.reload("SIGHUP"),
            changed = changes.next() => {
                // A file renamed into place is complete; one written in
                // place may see more writes (editors, `cp`): let them settle.
                if changed.map_err(events)? == watch::Change::Written {
                    tokio::time::sleep(SETTLE).await;
                }
                changes.drain();
                agent.reload("policy file changed");
            }
            Some(pending) = control.next() => {
                agent.bindings.handle(pending, &mut agent.datapath).await;
            }
            _ = bindings::until(expiry) => agent.bindings.expire(&mut agent.datapath),
            () = agent.peer_bindings.changed() => agent.peer_bindings.sync(&mut agent.datapath),
            _ = bindings::until(peer_expiry) => agent.peer_bindings.sync(&mut agent.datapath),
            changed = agent.bindings.cgroup_changed() => {
                changed.map_err(events)?;
                agent.bindings.release_exited(&mut agent.datapath).await;
            }
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
        }
    }
    agent.status.pid = None;
    agent.save_status();
    tracing::info!("stopping; enforcement stays in place (mesh-agent teardown removes it)");
    Ok(())
}

struct Agent {
    bindings: bindings::Bindings,
    peer_bindings: peer_bindings::PeerBindings,
    options: Options,
    datapath: Datapath,
    pins: Pins,
    status: AgentStatus,
    metrics: Arc<Metrics>,
}

/// Stops the metrics server when the agent stops.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Gives the heap's free pages back to the kernel. Parsing a large policy
/// briefly takes far more memory than the result keeps (docs/performance.md,
/// "Parsing"), and glibc would otherwise hold on to those pages for good.
fn release_freed_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: only returns free memory to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
}

impl Agent {
    /// Loads, compiles and installs the policy file, and counts the attempt.
    fn apply(&mut self) -> Result<(), AgentError> {
        let started = Instant::now();
        let result = self.install_policy_file();
        let outcome = if result.is_ok() {
            "applied"
        } else {
            "rejected"
        };
        self.metrics.reloads.with_label_values(&[outcome]).inc();
        if result.is_ok() {
            self.metrics
                .apply_seconds
                .observe(started.elapsed().as_secs_f64());
            self.metrics.ready.store(true, Ordering::Relaxed);
        }
        release_freed_memory();
        result
    }

    fn install_policy_file(&mut self) -> Result<(), AgentError> {
        let path = &self.options.policy;
        let policy = policy::load(path)?;
        let capacities = Capacities::from(&self.options.sizes);
        let mut compiled =
            policy::compile(&policy, &capacities).map_err(|source| AgentError::Compile {
                path: path.clone(),
                source,
            })?;
        // Bound processes' addresses, here and on the mesh's other nodes,
        // are part of every generation.
        compiled.entries.bound = self.bindings.host_entries(&compiled.identities);
        let peers_bound = self.peer_bindings.classify(&compiled.identities);
        compiled
            .entries
            .bound
            .extend(peer_bindings::PeerBindings::host_entries(&peers_bound));
        self.datapath.install(&compiled.entries, &Clock::now()?)?;
        self.bindings.adopt_policy(
            &policy.trust_domain,
            &compiled.identities,
            &mut self.datapath,
        )?;
        self.peer_bindings
            .adopt_policy(&compiled.identities, peers_bound, &mut self.datapath)?;
        *self.metrics.names.lock().unwrap_or_else(|e| e.into_inner()) = Names {
            identities: compiled
                .identities
                .iter()
                .map(|(tag, id)| (*tag, id.to_string()))
                .collect(),
            services: compiled.services.clone(),
        };
        let reloads = self
            .status
            .applied
            .as_ref()
            .map_or(0, |applied| applied.reloads + 1);
        self.status.applied = Some(Applied {
            at: now_rfc3339(),
            summary: policy.summary(),
            reloads,
        });
        self.status.rejected.clear();
        tracing::info!(policy = %path.display(), summary = %policy.summary(), "policy applied");
        Ok(())
    }

    fn reload(&mut self, why: &str) {
        tracing::info!(why, "reloading the policy");
        if let Err(err) = self.apply() {
            self.reject(&err);
        }
        self.save_status();
    }

    /// Logs a rejected policy, one line per error, and keeps the errors for
    /// `status`. The previous policy keeps enforcing.
    fn reject(&mut self, err: &AgentError) {
        let text = format!("{err:#}");
        self.status.rejected = text.lines().map(str::to_owned).collect();
        for line in &self.status.rejected {
            tracing::error!("{line}");
        }
        tracing::warn!("policy rejected; the previous policy keeps enforcing");
    }

    /// Ingress on every interface (adopting what is pinned), then egress.
    fn attach(&mut self) -> Result<(), AgentError> {
        let mut interfaces = Vec::new();
        for interface in self.options.interfaces.clone() {
            let ingress = self.attach_ingress(&interface)?;
            self.datapath
                .attach_pinned(&self.pins, &interface, Hook::TcEgress)?;
            tracing::info!(interface, ingress = ingress.name(), "attached");
            interfaces.push((
                interface,
                vec![ingress.name().to_owned(), Hook::TcEgress.name().to_owned()],
            ));
        }
        self.status.interfaces = interfaces;
        Ok(())
    }

    fn attach_ingress(&mut self, interface: &str) -> Result<Hook, AgentError> {
        // What an earlier agent chose stands, so the swap has no gap.
        for hook in [Hook::Xdp, Hook::TcIngress] {
            if self.pins.has_link(interface, hook) {
                self.datapath.attach_pinned(&self.pins, interface, hook)?;
                return Ok(hook);
            }
        }
        let hook = match self.options.ingress {
            Ingress::Tc => Hook::TcIngress,
            Ingress::Xdp => Hook::Xdp,
            // L3 devices (WireGuard, TUN) have no XDP of their own.
            Ingress::Auto if datapath::is_l3(interface) => Hook::TcIngress,
            Ingress::Auto => match self
                .datapath
                .attach_pinned(&self.pins, interface, Hook::Xdp)
            {
                Ok(()) => return Ok(Hook::Xdp),
                Err(err) => {
                    tracing::info!(interface, error = %err, "no native XDP; judging ingress with TC");
                    Hook::TcIngress
                }
            },
        };
        self.datapath.attach_pinned(&self.pins, interface, hook)?;
        Ok(hook)
    }

    fn save_status(&self) {
        if let Err(err) = self.status.write(&self.options.state_dir) {
            tracing::warn!(error = %err, "writing the status file");
        }
    }
}

fn now_rfc3339() -> String {
    OffsetDateTime::now_utc()
        .format(&Rfc3339)
        .unwrap_or_else(|_| "unknown".to_owned())
}
