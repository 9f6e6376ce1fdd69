//! Process bindings (docs/identity.md). `mesh-agent exec` asks over the
//! control socket to bind its process to the identity its token proves;
//! the agent checks the token, gives the binding a cgroup below its cgroup
//! root and a source address from the agent pool, moves the process in,
//! and tells the kernel: the cgroup's identity to the socket programs, the
//! address's identity to the datapath. A binding ends when its token
//! expires, when its processes have all exited, or when its identity leaves
//! the policy; revocation cuts an identity off wherever it is bound. Every
//! step is an audit event.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    io,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use ipnet::IpNet;
use mesh_common::{CgroupBinding, binding};
use prometheus::{IntCounterVec, IntGauge, IntGaugeVec, Opts};
use serde::{Deserialize, Serialize};

use crate::{
    control::{Bound, ControlError, Peer, Pending, Request, Response},
    datapath::{BoundHost, Clock, Datapath, DatapathError, Pins, Prefix},
    identity::{
        DEFAULT_AUDIENCE, TrustBundle, VerifiedToken, Verifier,
        audit::{AUDIT_FILE, AuditEvent, AuditKind, AuditLog},
        cgroup::{self, Cgroup, CgroupError, EmptiedWatch},
        decode_unverified,
        loopback::{Loopback, LoopbackError},
        pool::{AddressPool, PoolError},
        revocations::{Revocation, Revocations},
    },
    metrics::Metrics,
    policy::{SpiffeId, TrustDomain},
};

/// The bindings' file in the state folder.
pub const BINDINGS_FILE: &str = "bindings.json";

/// How `mesh-agent run` binds processes.
#[derive(Clone, Debug, Default)]
pub struct BindingOptions {
    /// The trust bundle (JWKS) tokens are checked against; read again for
    /// every token, so that a rotated bundle takes effect at once.
    pub trust_bundle: Option<PathBuf>,
    /// The agent pool; binding is off without one.
    pub pools: Vec<IpNet>,
    /// The cgroup below which bound processes run [default: `mesh` below
    /// the cgroup v2 mount].
    pub cgroup_root: Option<PathBuf>,
    /// The control socket.
    pub socket: PathBuf,
}

/// One binding, as the agent keeps it (and `status` shows it).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Binding {
    pub identity: String,
    pub cgroup: PathBuf,
    pub cgroup_id: u64,
    /// The process that asked to be bound.
    pub pid: u32,
    pub addresses: Vec<IpAddr>,
    /// When the token expires, in seconds since 1970.
    pub expires: u64,
    pub token_id: Option<String>,
    /// Why the binding is no longer in force (`expired`, …); `None` while
    /// it is. An ended binding keeps its cgroup and address until its
    /// processes exit, and a refresh may bring it back.
    pub ended: Option<String>,
}

impl Binding {
    fn name(&self) -> String {
        self.cgroup
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    fn event(&self, kind: AuditKind) -> AuditEvent {
        AuditEvent {
            pid: Some(self.pid),
            cgroup: Some(self.cgroup.clone()),
            addresses: self.addresses.clone(),
            ..AuditEvent::new(kind, Some(&self.identity))
        }
    }

    fn expires_at(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(self.expires)
    }

    /// Its source addresses as identity `tag` classifies them.
    fn hosts(&self, tag: u32) -> impl Iterator<Item = BoundHost> + '_ {
        self.addresses.iter().map(move |&addr| BoundHost {
            addr,
            tag,
            expires_at: self.expires_at(),
        })
    }

    /// What the socket programs read for this binding.
    fn kernel(&self, tag: u32, clock: &Clock) -> CgroupBinding {
        let mut entry = CgroupBinding {
            valid_until_ns: clock.boot_ns_at(self.expires_at()),
            tag,
            ..CgroupBinding::default()
        };
        for address in &self.addresses {
            match address {
                IpAddr::V4(v4) => {
                    entry.addr4 = v4.octets();
                    entry.families |= binding::V4;
                }
                IpAddr::V6(v6) => {
                    entry.addr6 = v6.octets();
                    entry.families |= binding::V6;
                }
            }
        }
        entry
    }
}

/// The bindings recorded in `state_dir`, for `status`.
pub fn read_bindings(state_dir: &Path) -> io::Result<Vec<Binding>> {
    crate::state_file::read_json(&state_dir.join(BINDINGS_FILE))
}

/// What `teardown` leaves of the bindings an agent recorded in
/// `state_dir`: nothing but the cgroups that still hold processes (or
/// cgroups it does not know), which it returns. Their addresses leave the
/// loopback interface, empty cgroups and then the cgroup root (`root`, or
/// the default) are removed, and the record is forgotten. Run after the
/// socket programs are detached.
pub async fn teardown_bindings(
    state_dir: &Path,
    root: Option<&Path>,
) -> Result<Vec<PathBuf>, BindingError> {
    let record = state_dir.join(BINDINGS_FILE);
    let bindings = read_bindings(state_dir).map_err(|source| BindingError::Io {
        what: "reading",
        path: record.clone(),
        source,
    })?;
    let mut left = Vec::new();
    if !bindings.is_empty() {
        let loopback = Loopback::new().await?;
        for binding in &bindings {
            for address in &binding.addresses {
                loopback.remove(*address).await?;
            }
            match Cgroup::open(&binding.cgroup) {
                Ok(cgroup) if cgroup.id() == binding.cgroup_id => {
                    if cgroup.populated()? {
                        left.push(binding.cgroup.clone());
                    } else {
                        cgroup.remove()?;
                    }
                }
                _ => {}
            }
        }
    }
    // Without cgroup v2 there is no default root, and nothing was bound.
    let root = root
        .map(Path::to_owned)
        .or_else(|| cgroup::default_root().ok());
    // An agent that never bound a process may have made no root.
    if let Some(root) = root
        && left.is_empty()
        && root.exists()
    {
        match std::fs::remove_dir(&root) {
            // Cgroups below it that the record does not know.
            Err(err) if err.raw_os_error() == Some(libc::EBUSY) => left.push(root),
            Err(err) if err.kind() != io::ErrorKind::NotFound => {
                return Err(BindingError::Io {
                    what: "removing",
                    path: root,
                    source: err,
                });
            }
            _ => {}
        }
    }
    // The bindings left are kept on record for a later teardown.
    let kept: Vec<&Binding> = bindings
        .iter()
        .filter(|b| left.contains(&b.cgroup))
        .collect();
    let written = if kept.is_empty() {
        std::fs::remove_file(&record).or_else(|err| match err.kind() {
            io::ErrorKind::NotFound => Ok(()),
            _ => Err(err),
        })
    } else {
        write_bindings(state_dir, &kept)
    };
    written.map_err(|source| BindingError::Io {
        what: "updating",
        path: record,
        source,
    })?;
    Ok(left)
}

/// Records `bindings` in `state_dir`, replacing the record whole.
fn write_bindings(state_dir: &Path, bindings: &[&Binding]) -> io::Result<()> {
    crate::state_file::write_json(&state_dir.join(BINDINGS_FILE), bindings)
}

#[derive(Debug, thiserror::Error)]
pub enum BindingError {
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error(transparent)]
    Pool(#[from] PoolError),
    #[error(transparent)]
    Loopback(#[from] LoopbackError),
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error("binding processes (--agent-pool) needs --trust-bundle")]
    NoTrustBundle,
    #[error("{what} {}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("setting up the binding metrics")]
    Metrics(#[from] prometheus::Error),
}

/// What binding needs once it is on (`--agent-pool`).
struct Enabled {
    root: Cgroup,
    /// The root of the cgroup hierarchy, where the source guard hooks in.
    hierarchy: PathBuf,
    pool: AddressPool,
    bundle: PathBuf,
    loopback: Loopback,
    watch: EmptiedWatch,
}

struct BindingMetrics {
    bindings: IntGauge,
    revoked: IntGaugeVec,
    rejected: IntCounterVec,
}

impl BindingMetrics {
    fn new(metrics: &Metrics) -> prometheus::Result<Self> {
        let bindings = IntGauge::new(
            "mesh_identity_bindings",
            "Process bindings in force on this node.",
        )?;
        let revoked = IntGaugeVec::new(
            Opts::new("mesh_identity_revoked", "1 for each revoked identity."),
            &["identity"],
        )?;
        let rejected = IntCounterVec::new(
            Opts::new(
                "mesh_identity_tokens_rejected_total",
                "Tokens the agent refused to bind, by reason.",
            ),
            &["reason"],
        )?;
        metrics.register(Box::new(bindings.clone()))?;
        metrics.register(Box::new(revoked.clone()))?;
        metrics.register(Box::new(rejected.clone()))?;
        Ok(Self {
            bindings,
            revoked,
            rejected,
        })
    }
}

pub(super) struct Bindings {
    enabled: Option<Enabled>,
    /// By cgroup name.
    table: BTreeMap<String, Binding>,
    revocations: Revocations,
    audit: AuditLog,
    state_dir: PathBuf,
    /// SPIFFE ID → tag under the applied policy, and its trust domain.
    tags: HashMap<String, u32>,
    trust_domain: Option<TrustDomain>,
    metrics: BindingMetrics,
}

impl Bindings {
    /// Reads what an earlier agent recorded; sets up the cgroup root and
    /// the pool if binding is on. Touches no kernel state.
    pub async fn new(
        options: &BindingOptions,
        state_dir: &Path,
        metrics: &Arc<Metrics>,
    ) -> Result<Self, BindingError> {
        let io_error = |what, path: PathBuf| move |source| BindingError::Io { what, path, source };
        let enabled = if options.pools.is_empty() {
            None
        } else {
            let bundle = options
                .trust_bundle
                .clone()
                .ok_or(BindingError::NoTrustBundle)?;
            let root = match &options.cgroup_root {
                Some(root) => root.clone(),
                None => cgroup::default_root()?,
            };
            let watch =
                EmptiedWatch::new().map_err(io_error("watching cgroups under", root.clone()))?;
            let root = Cgroup::ensure(&root)?;
            Some(Enabled {
                hierarchy: root.hierarchy_root()?,
                root,
                pool: AddressPool::new(&options.pools)?,
                bundle,
                loopback: Loopback::new().await?,
                watch,
            })
        };
        let table = read_bindings(state_dir)
            .map_err(io_error("reading", state_dir.join(BINDINGS_FILE)))?
            .into_iter()
            .map(|binding| (binding.name(), binding))
            .collect();
        let audit_path = state_dir.join(AUDIT_FILE);
        Ok(Self {
            enabled,
            table,
            revocations: Revocations::load(state_dir)
                .map_err(io_error("reading revocations in", state_dir.to_owned()))?,
            audit: AuditLog::open(&audit_path).map_err(io_error("opening", audit_path))?,
            state_dir: state_dir.to_owned(),
            tags: HashMap::new(),
            trust_domain: None,
            metrics: BindingMetrics::new(metrics)?,
        })
    }

    /// The source addresses of the bindings in force whose identity the
    /// policy about to be installed declares, with its tags: every policy
    /// generation carries them.
    pub fn host_entries(&self, identities: &BTreeMap<u32, SpiffeId>) -> Vec<BoundHost> {
        let tags: HashMap<&str, u32> = identities
            .iter()
            .map(|(tag, id)| (id.as_str(), *tag))
            .collect();
        self.table
            .values()
            .filter(|b| b.ended.is_none())
            .filter_map(|b| tags.get(b.identity.as_str()).map(|tag| (b, *tag)))
            .flat_map(|(b, tag)| b.hosts(tag))
            .collect()
    }

    /// After a policy is installed: its tags for the bindings' cgroups,
    /// bindings of identities it no longer declares ended, and `REVOKED`
    /// made to hold exactly the revoked identities it declares.
    pub fn adopt_policy(
        &mut self,
        trust_domain: &TrustDomain,
        identities: &BTreeMap<u32, SpiffeId>,
        datapath: &mut Datapath,
    ) -> Result<(), DatapathError> {
        self.trust_domain = Some(trust_domain.clone());
        self.tags = identities
            .iter()
            .map(|(tag, id)| (id.to_string(), *tag))
            .collect();
        let clock = Clock::now()?;
        let names: Vec<String> = self.table.keys().cloned().collect();
        for name in names {
            let binding = &self.table[&name];
            if binding.ended.is_some() {
                continue;
            }
            match self.tags.get(&binding.identity) {
                Some(&tag) => {
                    datapath.set_cgroup_binding(binding.cgroup_id, &binding.kernel(tag, &clock))?
                }
                // Its addresses were left out of the new generation.
                None => self.end(
                    &name,
                    AuditKind::Unbind,
                    "identity not in the policy",
                    datapath,
                )?,
            }
        }
        self.sync_revoked(datapath)?;
        self.save();
        Ok(())
    }

    fn sync_revoked(&mut self, datapath: &mut Datapath) -> Result<(), DatapathError> {
        let wanted: BTreeSet<u32> = self
            .revocations
            .revoked()
            .keys()
            .filter_map(|id| self.tags.get(id).copied())
            .collect();
        let present = datapath.revoked()?;
        for tag in present.difference(&wanted) {
            datapath.unrevoke(*tag)?;
        }
        for tag in wanted.difference(&present) {
            datapath.revoke(*tag)?;
        }
        Ok(())
    }

    /// Attaches the socket programs to the cgroup root, and settles what
    /// an earlier agent left: bindings whose cgroup is gone or empty are
    /// released, kernel entries of no binding removed.
    pub async fn attach(
        &mut self,
        datapath: &mut Datapath,
        pins: &Pins,
    ) -> Result<(), BindingError> {
        let Some(enabled) = &self.enabled else {
            // Binding is off: nothing of an earlier agent's stays bound.
            let names: Vec<String> = self.table.keys().cloned().collect();
            for name in names {
                self.end(&name, AuditKind::Unbind, "binding is off", datapath)?;
                self.table.remove(&name);
            }
            for (id, _) in datapath.cgroup_bindings()? {
                datapath.remove_cgroup_binding(id)?;
            }
            datapath.sync_source_owners(&BTreeMap::new())?;
            self.save();
            return Ok(());
        };
        datapath.attach_cgroup_pinned(pins, enabled.root.path(), &enabled.hierarchy)?;
        datapath.sync_source_owners(&self.source_owners())?;
        let ids: HashSet<u64> = self.table.values().map(|b| b.cgroup_id).collect();
        for (id, _) in datapath.cgroup_bindings()? {
            if !ids.contains(&id) {
                datapath.remove_cgroup_binding(id)?;
            }
        }
        for binding in self.table.values() {
            if let Ok(cgroup) = Cgroup::open(&binding.cgroup)
                && cgroup.id() == binding.cgroup_id
            {
                // A cgroup that cannot be watched is checked at the next
                // change of another; it is released then.
                let _ = enabled.watch.watch(&cgroup);
            }
        }
        self.release_exited(datapath).await;
        Ok(())
    }

    /// Who may send from which address of the pool: each binding's
    /// cgroup from its own addresses, ended ones too until released, and
    /// nobody from the rest.
    fn source_owners(&self) -> BTreeMap<Prefix, u64> {
        let Some(enabled) = &self.enabled else {
            return BTreeMap::new();
        };
        let pools = enabled
            .pool
            .nets()
            .into_iter()
            .map(|net| (Prefix::new(net.addr(), net.prefix_len()), 0));
        let bound = self.table.values().flat_map(|b| {
            b.addresses
                .iter()
                .map(|address| (Prefix::host(*address), b.cgroup_id))
        });
        pools.chain(bound).collect()
    }

    /// When the next binding in force expires, if one is in force.
    pub fn next_expiry(&self) -> Option<SystemTime> {
        self.table
            .values()
            .filter(|b| b.ended.is_none())
            .map(Binding::expires_at)
            .min()
    }

    /// Ends the bindings whose token has expired.
    pub fn expire(&mut self, datapath: &mut Datapath) {
        let now = SystemTime::now();
        let due: Vec<String> = self
            .table
            .iter()
            .filter(|(_, b)| b.ended.is_none() && b.expires_at() <= now)
            .map(|(name, _)| name.clone())
            .collect();
        for name in due {
            if let Err(err) = self.end(&name, AuditKind::Expire, "expired", datapath) {
                tracing::error!(binding = name, error = %err, "ending an expired binding");
            }
        }
        self.save();
    }

    /// Waits until a watched cgroup may have emptied; never, with binding off.
    pub async fn cgroup_changed(&mut self) -> io::Result<()> {
        match &mut self.enabled {
            Some(enabled) => enabled.watch.changed().await,
            None => std::future::pending().await,
        }
    }

    /// Releases the bindings whose processes have all exited.
    pub async fn release_exited(&mut self, datapath: &mut Datapath) {
        let exited: Vec<String> = self
            .table
            .iter()
            .filter(|(_, b)| {
                Cgroup::open(&b.cgroup)
                    .and_then(|c| c.populated())
                    .map_or(true, |populated| !populated)
            })
            .map(|(name, _)| name.clone())
            .collect();
        for name in exited {
            if let Err(err) = self.release(&name, datapath).await {
                tracing::error!(binding = name, error = %err, "releasing a binding");
            }
        }
        self.save();
    }

    /// Answers one request from the control socket.
    pub async fn handle(&mut self, pending: Pending, datapath: &mut Datapath) {
        let peer = pending.peer;
        let response = match &pending.request {
            Request::Bind { token } => self.bind(token, peer, datapath).await,
            Request::Refresh { cgroup, token } => self.refresh(cgroup, token, peer, datapath),
            Request::Revoke { id, reason } => self.revoke(id, reason.clone(), datapath),
            Request::Unrevoke { id } => self.unrevoke(id, datapath),
        };
        self.save();
        pending.answer(response);
    }

    async fn bind(&mut self, token: &str, peer: Peer, datapath: &mut Datapath) -> Response {
        if self.enabled.is_none() {
            return Response::refused(
                "binding_off",
                "this agent binds no processes: it runs without --agent-pool",
            );
        }
        let (verified, tag) = match self.check(token, peer.pid) {
            Ok(checked) => checked,
            Err(response) => return response,
        };
        match self.create(&verified, tag, peer.pid, datapath).await {
            Ok(name) => {
                let binding = &self.table[&name];
                self.audit.record(&binding.event(AuditKind::Bind));
                bound(binding)
            }
            Err(err) => {
                tracing::error!(error = %err, "binding a process");
                Response::refused("failed", format!("{err:#}"))
            }
        }
    }

    /// Checks a token against the trust bundle, the policy's trust domain
    /// and identities, and the revocations; a refusal is audited with the
    /// `pid` that presented the token.
    fn check(&mut self, token: &str, pid: u32) -> Result<(VerifiedToken, u32), Response> {
        let claimed = decode_unverified(token)
            .ok()
            .and_then(|parts| parts.claims.get("sub")?.as_str().map(str::to_owned));
        let verified = match (&self.enabled, &self.trust_domain) {
            (Some(enabled), Some(trust_domain)) => TrustBundle::load(&enabled.bundle)
                .map_err(|err| ("bundle", format!("{err:#}")))
                .and_then(|bundle| {
                    Verifier::new(bundle, trust_domain.clone(), DEFAULT_AUDIENCE.to_owned())
                        .verify(token, SystemTime::now())
                        .map_err(|err| (err.reason(), err.to_string()))
                }),
            _ => Err(("no_policy", "no policy is applied yet".to_owned())),
        };
        let verified = verified
            .map_err(|(reason, message)| self.reject(claimed.as_deref(), pid, reason, message))?;
        let id = verified.spiffe_id.to_string();
        if self.revocations.contains(&id) {
            return Err(self.reject(Some(&id), pid, "revoked", format!("{id} is revoked")));
        }
        match self.tags.get(&id) {
            Some(&tag) => Ok((verified, tag)),
            None => Err(self.reject(
                Some(&id),
                pid,
                "unknown_identity",
                format!("{id} is not an identity of the policy"),
            )),
        }
    }

    fn reject(
        &mut self,
        identity: Option<&str>,
        pid: u32,
        reason: &str,
        message: String,
    ) -> Response {
        self.metrics.rejected.with_label_values(&[reason]).inc();
        self.audit.record(&AuditEvent {
            pid: Some(pid),
            ..AuditEvent::new(AuditKind::Reject, identity).reason(message.clone())
        });
        Response::refused(reason, message)
    }

    /// A new binding for process `pid`: cgroup, addresses, kernel entries,
    /// and the process moved in last. A failure undoes what was done.
    async fn create(
        &mut self,
        verified: &VerifiedToken,
        tag: u32,
        pid: u32,
        datapath: &mut Datapath,
    ) -> Result<String, BindingError> {
        let Some(enabled) = &mut self.enabled else {
            unreachable!("bind checks that binding is on");
        };
        let in_use: HashSet<IpAddr> = self
            .table
            .values()
            .flat_map(|b| b.addresses.iter().copied())
            .collect();
        let addresses = enabled.pool.allocate(&in_use)?;
        let cgroup = new_cgroup(&enabled.root, verified.spiffe_id.as_str())?;
        let binding = Binding {
            identity: verified.spiffe_id.to_string(),
            cgroup: cgroup.path().to_owned(),
            cgroup_id: cgroup.id(),
            pid,
            addresses,
            expires: verified
                .expires_at
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            token_id: verified.jti.clone(),
            ended: None,
        };
        let name = binding.name();
        self.table.insert(name.clone(), binding);
        let Some(enabled) = &self.enabled else {
            unreachable!("checked above");
        };
        let binding = &self.table[&name];
        let made: Result<(), BindingError> = async {
            enabled.watch.watch(&cgroup)?;
            for address in &binding.addresses {
                enabled.loopback.add(*address).await?;
            }
            let clock = Clock::now()?;
            datapath.set_cgroup_binding(cgroup.id(), &binding.kernel(tag, &clock))?;
            datapath.sync_source_owners(&self.source_owners())?;
            for host in binding.hosts(tag) {
                datapath.add_identity_host(&host, &clock)?;
            }
            cgroup.add_process(pid)?;
            Ok(())
        }
        .await;
        if let Err(err) = made {
            if let Err(undo) = self.release_quietly(&name, datapath).await {
                tracing::error!(error = %undo, "undoing a failed binding");
            }
            return Err(err);
        }
        Ok(name)
    }

    fn refresh(
        &mut self,
        name: &str,
        token: &str,
        peer: Peer,
        datapath: &mut Datapath,
    ) -> Response {
        let Some(binding) = self.table.get(name) else {
            return Response::refused("unknown_binding", format!("no binding has cgroup {name}"));
        };
        if !Cgroup::open(&binding.cgroup).is_ok_and(|cgroup| cgroup.holds(peer.pid)) {
            return Response::refused(
                "permission",
                format!("the caller is not in the cgroup of binding {name}"),
            );
        }
        let identity = binding.identity.clone();
        let (verified, tag) = match self.check(token, peer.pid) {
            Ok(checked) => checked,
            Err(response) => return response,
        };
        if verified.spiffe_id.as_str() != identity {
            return self.reject(
                Some(verified.spiffe_id.as_str()),
                peer.pid,
                "other_identity",
                format!("binding {name} is {identity}, not {}", verified.spiffe_id),
            );
        }
        let refreshed: Result<(), DatapathError> = (|| {
            let binding = self.table.get_mut(name).expect("looked up above");
            binding.expires = verified
                .expires_at
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            binding.token_id = verified.jti.clone();
            let clock = Clock::now()?;
            datapath.set_cgroup_binding(binding.cgroup_id, &binding.kernel(tag, &clock))?;
            // The addresses' identity runs to the new expiry, or is back.
            for host in binding.hosts(tag) {
                datapath.add_identity_host(&host, &clock)?;
            }
            binding.ended = None;
            Ok(())
        })();
        if let Err(err) = refreshed {
            tracing::error!(error = %err, "refreshing a binding");
            return Response::refused("failed", format!("{err:#}"));
        }
        let binding = &self.table[name];
        self.audit.record(&binding.event(AuditKind::Refresh));
        bound(binding)
    }

    fn revoke(&mut self, id: &str, reason: Option<String>, datapath: &mut Datapath) -> Response {
        let id = match id.parse::<SpiffeId>() {
            Ok(id) => id.to_string(),
            Err(err) => return Response::refused("invalid", format!("{id}: {err}")),
        };
        let revocation = Revocation {
            at: super::now_rfc3339(),
            reason: reason.clone(),
        };
        if let Err(err) = self.revocations.insert(&id, revocation) {
            return Response::refused("failed", format!("recording the revocation: {err}"));
        }
        if let Some(&tag) = self.tags.get(&id)
            && let Err(err) = datapath.revoke(tag)
        {
            return Response::refused("failed", format!("{err:#}"));
        }
        let reason = reason.unwrap_or_else(|| "revoked".to_owned());
        let mut events: Vec<AuditEvent> = self
            .table
            .values()
            .filter(|b| b.identity == id)
            .map(|b| b.event(AuditKind::Revoke).reason(reason.clone()))
            .collect();
        if events.is_empty() {
            events.push(AuditEvent::new(AuditKind::Revoke, Some(&id)).reason(reason));
        }
        for event in &events {
            self.audit.record(event);
        }
        Response::Done {
            message: format!("{id} is revoked"),
        }
    }

    fn unrevoke(&mut self, id: &str, datapath: &mut Datapath) -> Response {
        match self.revocations.remove(id) {
            Ok(true) => {}
            Ok(false) => return Response::refused("not_revoked", format!("{id} is not revoked")),
            Err(err) => return Response::refused("failed", format!("recording: {err}")),
        }
        if let Some(&tag) = self.tags.get(id)
            && let Err(err) = datapath.unrevoke(tag)
        {
            return Response::refused("failed", format!("{err:#}"));
        }
        self.audit
            .record(&AuditEvent::new(AuditKind::Unrevoke, Some(id)));
        Response::Done {
            message: format!("{id} is no longer revoked"),
        }
    }

    /// Takes a binding out of force: the kernel forgets its cgroup (whose
    /// processes then open nothing) and its addresses (whose live flows
    /// end on their next packet). Its cgroup and addresses stay reserved.
    fn end(
        &mut self,
        name: &str,
        kind: AuditKind,
        reason: &str,
        datapath: &mut Datapath,
    ) -> Result<(), DatapathError> {
        let Some(binding) = self.table.get_mut(name) else {
            return Ok(());
        };
        if binding.ended.is_some() {
            return Ok(());
        }
        binding.ended = Some(reason.to_owned());
        datapath.remove_cgroup_binding(binding.cgroup_id)?;
        for address in &binding.addresses {
            datapath.remove_identity_host(*address)?;
        }
        let event = binding.event(kind).reason(reason);
        self.audit.record(&event);
        Ok(())
    }

    /// Ends a binding whose processes have exited and frees its cgroup and
    /// addresses.
    async fn release(&mut self, name: &str, datapath: &mut Datapath) -> Result<(), BindingError> {
        let Some(binding) = self.table.get(name) else {
            return Ok(());
        };
        let event = binding.event(AuditKind::Release).reason("exited");
        self.release_quietly(name, datapath).await?;
        self.audit.record(&event);
        Ok(())
    }

    async fn release_quietly(
        &mut self,
        name: &str,
        datapath: &mut Datapath,
    ) -> Result<(), BindingError> {
        let Some(binding) = self.table.get(name).cloned() else {
            return Ok(());
        };
        datapath.remove_cgroup_binding(binding.cgroup_id)?;
        if binding.ended.is_none() {
            for address in &binding.addresses {
                datapath.remove_identity_host(*address)?;
            }
        }
        if let Some(enabled) = &self.enabled {
            for address in &binding.addresses {
                enabled.loopback.remove(*address).await?;
            }
        }
        match Cgroup::open(&binding.cgroup) {
            Ok(cgroup) if cgroup.id() == binding.cgroup_id => cgroup.remove()?,
            _ => {}
        }
        self.table.remove(name);
        datapath.sync_source_owners(&self.source_owners())?;
        Ok(())
    }

    /// Records the bindings for `status` and a restarted agent, and
    /// updates the metrics.
    fn save(&self) {
        let bindings: Vec<&Binding> = self.table.values().collect();
        if let Err(err) = write_bindings(&self.state_dir, &bindings) {
            let path = self.state_dir.join(BINDINGS_FILE);
            tracing::error!(path = %path.display(), error = %err, "recording the bindings");
        }
        let in_force = self.table.values().filter(|b| b.ended.is_none()).count();
        self.metrics.bindings.set(in_force as i64);
        self.metrics.revoked.reset();
        for id in self.revocations.revoked().keys() {
            self.metrics.revoked.with_label_values(&[id]).set(1);
        }
    }
}

/// Waits until `at`; forever if `None`.
pub async fn until(at: Option<SystemTime>) {
    match at {
        Some(at) => {
            let wait = at.duration_since(SystemTime::now()).unwrap_or_default();
            tokio::time::sleep(wait).await;
        }
        None => std::future::pending().await,
    }
}

fn bound(binding: &Binding) -> Response {
    Response::Bound(Bound {
        identity: binding.identity.clone(),
        cgroup: binding.name(),
        path: binding.cgroup.clone(),
        addresses: binding.addresses.clone(),
        expires: binding.expires,
    })
}

/// A fresh cgroup below `root` for a binding of `id`, named after the
/// identity's path: `agent-invoice-bot-3`.
fn new_cgroup(root: &Cgroup, id: &str) -> Result<Cgroup, CgroupError> {
    let path = id.splitn(4, '/').nth(3).unwrap_or_default();
    let mut slug: String = path
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '-'
            }
        })
        .take(64)
        .collect();
    if slug.is_empty() {
        slug.push_str("identity");
    }
    let mut serial = std::fs::read_dir(root.path())
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter(|entry| entry.file_type().is_ok_and(|t| t.is_dir()))
                .count()
        })
        .unwrap_or(0);
    loop {
        serial += 1;
        match root.create_child(&format!("{slug}-{serial}")) {
            Err(CgroupError::Io { source, .. })
                if source.kind() == io::ErrorKind::AlreadyExists => {}
            made => return made,
        }
    }
}
