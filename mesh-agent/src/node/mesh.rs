//! The node in the mesh at run time: it joins with its token, publishes its
//! record, its revocations and its bindings, and keeps its WireGuard peers
//! equal to the valid records of the store, its revocations to its peers'
//! and the peers' bindings it hands the agent to theirs — on every change
//! of the store, and every few seconds, so that a token that expires takes
//! its node out without a change, or while the store cannot be read.
//!
//! Encrypt or drop: the mesh's whole range is routed into the mesh
//! interface from the start, where WireGuard sends a packet to the peer
//! that owns its destination or drops it, and a blackhole under that route
//! drops packets for the mesh if the interface goes. No packet for another
//! node leaves in clear, whether or not its peer is configured yet.

use std::{
    collections::BTreeSet,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use ipnet::IpNet;
use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts};
use tokio::sync::watch;

use super::{
    Checker, Entry, Join, JoinVerifier, Local, NodeKey, NodeKeyError, NodeName, NodeRecord,
    RevokedNodes, RevokedNodesError, Sequences, SequencesError, ShieldError, ShieldOptions, Signed,
    SignedRecord, SigningKey, SigningPublicKey, Store, StoreError, StoreSpec, StoreWatch,
    bindings::{self, BindingSet, Bound, PeerBindings},
    keys::KEY_FILE,
    membership::describe_revocation,
    published::FromPeers,
    revocations::{self, Remote, RevocationList},
    shield::Shield,
    signed::Document,
    store::{Section, watch_dirs},
    teardown,
    wireguard::{self, Device, Mode, PeerConfig, WireGuardError},
};
use crate::{
    control::{Request, Response},
    identity::{BundleError, TokenError, TrustBundle, revocations::Revoked},
    metrics::Metrics,
};

/// How often records are checked again without a change in the store:
/// expired tokens drop out, and a lost watch is set up again.
const RECHECK: Duration = Duration::from_secs(5);

/// Changes to the store closer together than this are read once.
const SETTLE: Duration = Duration::from_millis(50);

pub struct MeshOptions {
    /// This node's join token.
    pub join_token: PathBuf,
    /// The admin trust bundle that signs join tokens.
    pub bundle: PathBuf,
    pub store: StoreSpec,
    /// Where peers reach this node's WireGuard; it listens on its port.
    pub endpoint: SocketAddr,
    /// The mesh's address range: every node's prefix lies in it.
    pub mesh_range: IpNet,
    pub interface: String,
    pub wireguard: Mode,
    /// The userspace WireGuard program (boringtun-cli).
    pub userspace_program: PathBuf,
    /// Seconds between keepalives to each peer.
    pub keepalive: u16,
    /// Make a new key pair this often.
    pub key_rotation: Option<Duration>,
    /// Holds the node's key.
    pub state_dir: PathBuf,
    /// Shield the underlay interface.
    pub shield: Option<ShieldOptions>,
    /// The agent's control socket, through which the peers' revocations
    /// are applied.
    pub control_socket: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    #[error(transparent)]
    Bundle(#[from] BundleError),
    #[error("{}: cannot read the join token", path.display())]
    ReadToken {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("this node's join token is not valid ({}): {source}", source.reason())]
    Join {
        #[source]
        source: TokenError,
    },
    #[error("the join token grants {prefix}, which is not within the mesh's {mesh}")]
    OutsideMesh { prefix: IpNet, mesh: IpNet },
    #[error(
        "the join token is bound to node key {token}, but this node's is {own} \
         (`mesh-agent node key` prints it; issue the token with --node-key {own})"
    )]
    ForeignNodeKey {
        token: SigningPublicKey,
        own: SigningPublicKey,
    },
    #[error(transparent)]
    Key(#[from] NodeKeyError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("this node's join token is revoked ({0}): the admin must issue a new one")]
    Revoked(String),
    #[error(transparent)]
    RevokedNodes(#[from] RevokedNodesError),
    #[error(transparent)]
    Sequences(#[from] SequencesError),
    #[error(transparent)]
    State(#[from] teardown::StateError),
    #[error("WireGuard interface")]
    WireGuard(#[from] WireGuardError),
    #[error(transparent)]
    Shield(#[from] ShieldError),
    #[error("setting up mesh metrics")]
    Metrics(#[from] prometheus::Error),
}

struct Counters {
    rejected: IntCounterVec,
    peers: IntGauge,
    store_errors: IntCounter,
    rotations: IntCounter,
}

impl Counters {
    fn register(metrics: &Metrics) -> prometheus::Result<Self> {
        let counters = Self {
            rejected: IntCounterVec::new(
                Opts::new(
                    "mesh_node_records_rejected_total",
                    "Node records of the store rejected, by reason; each counted when first seen.",
                ),
                &["reason"],
            )?,
            peers: IntGauge::new("mesh_node_peers", "Nodes configured as WireGuard peers.")?,
            store_errors: IntCounter::new(
                "mesh_node_store_errors_total",
                "Failed reads, writes and lease renewals of the node store; the last good peers stay.",
            )?,
            rotations: IntCounter::new(
                "mesh_node_key_rotations_total",
                "WireGuard keys this node has taken into use after the first.",
            )?,
        };
        metrics.register(Box::new(counters.rejected.clone()))?;
        metrics.register(Box::new(counters.peers.clone()))?;
        metrics.register(Box::new(counters.store_errors.clone()))?;
        metrics.register(Box::new(counters.rotations.clone()))?;
        Ok(counters)
    }
}

pub struct Mesh {
    options: MeshOptions,
    checker: Checker,
    token: String,
    join: Join,
    key: NodeKey,
    /// Signs this node's records; the join token names its public half.
    signing: SigningKey,
    /// The sequence of the last record signed.
    sequence: u64,
    /// The record last published, to tell if the store still has it.
    published: Option<Vec<u8>>,
    /// This node's own revocations as last published, and the list.
    revocations_published: Option<(Revoked, Vec<u8>)>,
    /// The peers' revocation lists.
    remote: Remote,
    /// This node's bindings as last published, and the set.
    bindings_published: Option<(Vec<Bound>, Vec<u8>)>,
    /// The peers' binding sets, and what the agent is told of them.
    peer_sets: FromPeers<BindingSet>,
    peer_bindings: watch::Sender<PeerBindings>,
    device: Device,
    /// On the underlay, if asked for.
    shield: Option<Shield>,
    store: Store,
    counters: Counters,
    /// Rejections already logged and counted, so each is reported once.
    rejected: BTreeSet<(String, &'static str)>,
    /// The store's last good read, checked again while it cannot be read.
    last_read: Option<StoreRead>,
}

/// What a read of the store found: the node records, the revocation lists
/// and binding sets of the other nodes, and the admin's revocations.
struct StoreRead {
    entries: Vec<Entry>,
    lists: Vec<Entry>,
    sets: Vec<Entry>,
    revoked: Vec<Entry>,
}

impl Mesh {
    /// Checks this node's join token, takes its key (making one on the
    /// first start), and creates the mesh interface with the key, the
    /// node's address and the mesh's routes, but no peers yet. Fails on an
    /// invalid token: a node that may not join configures nothing.
    pub async fn start(options: MeshOptions, metrics: &Arc<Metrics>) -> Result<Self, MeshError> {
        let (checker, token, join) = own_join(&options)?;
        let mesh = options.mesh_range;
        let counters = Counters::register(metrics)?;
        std::fs::create_dir_all(&options.state_dir).map_err(|source| NodeKeyError::Io {
            what: "create",
            path: options.state_dir.clone(),
            source,
        })?;
        let (signing, _) = SigningKey::load_or_create(&options.state_dir)?;
        bound_to(&join, &signing)?;
        let (key, created) = NodeKey::load_or_create(&options.state_dir)?;
        tracing::info!(
            node = %join.node,
            prefix = %join.prefix,
            public_key = %key.public(),
            new_key = created,
            store = %options.store,
            "joining the mesh"
        );
        let store = Store::open(&options.store).await?;
        let mtu = wireguard::mtu_for(options.endpoint.ip()).await?;
        teardown::remember(&options.state_dir, &options.interface)?;
        let mut device = Device::create(
            &options.interface,
            options.wireguard,
            &options.userspace_program,
            mtu,
        )
        .await?;
        device
            .set_key(key.private(), options.endpoint.port())
            .await?;
        device.add_address(node_address(join.prefix)).await?;
        device.sync_routes(mesh, &[mesh]).await?;
        tracing::info!(
            interface = device.name(),
            implementation = device.implementation(),
            mtu,
            "mesh interface up"
        );
        let shield = match &options.shield {
            Some(shield_options) => {
                let shield = Shield::start(shield_options, options.endpoint.port(), metrics)?;
                tracing::info!(
                    interface = shield_options.interface,
                    services = shield_options.services.len(),
                    "underlay shield up"
                );
                Some(shield)
            }
            None => None,
        };
        // Older documents than an earlier agent saw stay refused.
        let revocation_sequences = Sequences::load(&options.state_dir, Section::Revocations)?;
        let binding_sequences = Sequences::load(&options.state_dir, Section::Bindings)?;
        Ok(Self {
            options,
            checker,
            token,
            join,
            key,
            signing,
            sequence: 0,
            published: None,
            revocations_published: None,
            remote: Remote::new(revocation_sequences),
            bindings_published: None,
            peer_sets: FromPeers::new(binding_sequences),
            peer_bindings: watch::Sender::new(PeerBindings::new()),
            device,
            shield,
            store,
            counters,
            rejected: BTreeSet::new(),
            last_read: None,
        })
    }

    pub fn interface(&self) -> &str {
        self.device.name()
    }

    /// The peers' bindings in force, whenever they change: for the agent
    /// to classify their addresses by.
    pub fn peer_bindings(&self) -> watch::Receiver<PeerBindings> {
        self.peer_bindings.subscribe()
    }

    /// Publishes this node's record and keeps the peers in step with the
    /// store until the agent stops.
    pub async fn run(mut self) {
        self.publish().await;
        self.publish_revocations(true).await;
        self.publish_bindings(true).await;
        let mut store_watch = self.watch_store().await;
        // `mesh-agent node rotate-key` replaces the key file, `revoke` the
        // revocations' and the agent the bindings'.
        let mut state_watch = watch_dirs(std::slice::from_ref(&self.options.state_dir))
            .inspect_err(|err| tracing::warn!(error = %err, "cannot watch the state folder"))
            .ok();
        let mut recheck = tokio::time::interval(RECHECK);
        let rotation = self.options.key_rotation;
        let mut rotate = tokio::time::interval(rotation.unwrap_or(Duration::MAX / 4));
        // Both intervals fire at once on creation.
        rotate.tick().await;
        loop {
            tokio::select! {
                changed = changes(&mut store_watch) => {
                    if let Err(err) = changed {
                        tracing::warn!(error = %err, "lost the store watch; checking every 5 s");
                        store_watch = None;
                    }
                    tokio::time::sleep(SETTLE).await;
                    if let Some(watch) = &mut store_watch {
                        watch.drain();
                    }
                    self.sync().await;
                }
                _ = recheck.tick() => {
                    if let Err(err) = self.store.keep_alive().await {
                        self.counters.store_errors.inc();
                        tracing::warn!(error = %err, "cannot keep this node's record alive");
                        // Its lease is given up: publish it on a new one.
                        self.published = None;
                    }
                    if store_watch.is_none() {
                        store_watch = self.watch_store().await;
                    }
                    self.sync().await;
                }
                _ = changes(&mut state_watch) => {
                    tokio::time::sleep(SETTLE).await;
                    if let Some(watch) = &mut state_watch {
                        watch.drain();
                    }
                    self.reload_key().await;
                    self.publish_revocations(false).await;
                    self.publish_bindings(false).await;
                }
                _ = rotate.tick(), if rotation.is_some() => self.rotate().await,
            }
        }
    }

    async fn watch_store(&mut self) -> Option<StoreWatch> {
        self.store
            .watch()
            .await
            .inspect_err(|err| tracing::warn!(error = %err, "cannot watch the store"))
            .ok()
    }

    /// A sequence past the last this node signed: the time in
    /// microseconds, so that it grows across restarts too.
    fn next_sequence(&mut self) -> u64 {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |since| {
                u64::try_from(since.as_micros()).unwrap_or(u64::MAX)
            });
        self.sequence = now.max(self.sequence + 1);
        self.sequence
    }

    /// A new record of this node, signed.
    fn record(&mut self) -> SignedRecord {
        let record = NodeRecord {
            name: self.join.node.clone(),
            public_key: self.key.public(),
            endpoint: self.options.endpoint,
            prefix: self.join.prefix,
            sequence: self.next_sequence(),
            join_token: self.token.clone(),
        };
        SignedRecord::sign(record, &self.signing)
    }

    fn local(&self) -> Local {
        Local {
            name: self.join.node.clone(),
            prefix: self.join.prefix,
            public_key: self.key.public(),
        }
    }

    async fn publish(&mut self) {
        let bytes = self.record().encode();
        match self
            .store
            .publish(Section::Nodes, &self.join.node, &bytes)
            .await
        {
            Ok(()) => {
                tracing::info!(public_key = %self.key.public(), sequence = self.sequence, "record published");
                self.published = Some(bytes);
            }
            Err(err) => {
                self.counters.store_errors.inc();
                tracing::error!(error = %err, "cannot publish this node's record; trying again");
                // Whatever the store has is not this record: the next sync
                // publishes again.
                self.published = None;
            }
        }
    }

    /// Signs `document` and writes it as this node's entry in `section`;
    /// its bytes, or `None` if the store failed.
    async fn publish_document<T: Document>(
        &mut self,
        section: Section,
        document: T,
    ) -> Option<Vec<u8>> {
        let bytes = Signed::sign(document, &self.signing).encode();
        match self.store.publish(section, &self.join.node, &bytes).await {
            Ok(()) => Some(bytes),
            Err(err) => {
                self.counters.store_errors.inc();
                tracing::error!(error = %err, section = section.name(), "cannot publish; trying again");
                None
            }
        }
    }

    /// Publishes this node's own revocations, signed: if they changed
    /// since they were last published, or always with `again`.
    async fn publish_revocations(&mut self, again: bool) {
        let revoked = match revocations::local(&self.options.state_dir) {
            Ok(revoked) => revoked,
            Err(err) => {
                tracing::error!(error = %err, "cannot read this node's revocations");
                return;
            }
        };
        if !again
            && self
                .revocations_published
                .as_ref()
                .is_some_and(|(published, _)| *published == revoked)
        {
            return;
        }
        let list = RevocationList {
            node: self.join.node.clone(),
            sequence: self.next_sequence(),
            revoked: revoked.clone(),
        };
        let published = self.publish_document(Section::Revocations, list).await;
        if published.is_some() {
            tracing::info!(revoked = revoked.len(), "revocations published");
        }
        self.revocations_published = published.map(|bytes| (revoked, bytes));
    }

    /// Publishes this node's bindings in force, signed: if they changed
    /// since they were last published, or always with `again`. Those that
    /// do not fit in a set are left out: a binding not published is one
    /// the peers do not know, never one they keep.
    async fn publish_bindings(&mut self, again: bool) {
        let (bound, outside) =
            match bindings::local(&self.options.state_dir, self.join.prefix, SystemTime::now()) {
                Ok(local) => local,
                Err(err) => {
                    tracing::error!(error = %err, "cannot read this node's bindings");
                    return;
                }
            };
        if !again
            && self
                .bindings_published
                .as_ref()
                .is_some_and(|(published, _)| *published == bound)
        {
            return;
        }
        if outside > 0 {
            tracing::warn!(
                addresses = outside,
                prefix = %self.join.prefix,
                "bound addresses outside this node's prefix are not published: the agent pool belongs in it"
            );
        }
        let mut set = BindingSet {
            node: self.join.node.clone(),
            sequence: self.next_sequence(),
            bindings: bound.clone(),
        };
        loop {
            let len = Signed::sign(set.clone(), &self.signing).encode().len();
            if len <= BindingSet::MAX_LEN {
                break;
            }
            let keep = set.bindings.len() * BindingSet::MAX_LEN / len * 9 / 10;
            set.bindings.truncate(keep);
        }
        let count = set.bindings.len();
        if count < bound.len() {
            tracing::error!(
                bindings = bound.len(),
                published = count,
                "too many bindings for one set; the rest are not published"
            );
        }
        let published = self.publish_document(Section::Bindings, set).await;
        if published.is_some() {
            tracing::info!(bindings = count, "bindings published");
        }
        self.bindings_published = published.map(|bytes| (bound, bytes));
    }

    /// Applies the peers' revocations here, through the agent's control
    /// socket, as `mesh-agent revoke` and `unrevoke` would.
    async fn apply_revocations(&mut self) {
        let here = match crate::identity::revocations::read(&self.options.state_dir) {
            Ok(here) => here,
            Err(err) => {
                tracing::error!(error = %err, "cannot read the revocations in force");
                return;
            }
        };
        let plan = self.remote.plan(&here);
        let requests = plan
            .revoke
            .into_iter()
            .map(|(id, reason)| Request::Revoke {
                id,
                reason: Some(reason),
            })
            .chain(plan.lift.into_iter().map(|id| Request::Unrevoke { id }));
        for request in requests {
            let socket = self.options.control_socket.clone();
            let asked = request.clone();
            // The control client blocks; the agent answers on this runtime.
            let answer =
                tokio::task::spawn_blocking(move || crate::control::request(&socket, &asked)).await;
            match answer {
                Ok(Ok(Response::Done { message })) => {
                    tracing::info!(?request, message, "revocation from the mesh applied");
                }
                Ok(Ok(other)) => {
                    tracing::error!(?request, answer = ?other, "the agent refused a revocation from the mesh");
                }
                Ok(Err(err)) => {
                    tracing::error!(?request, error = %err, "cannot ask the agent to apply a revocation");
                }
                Err(err) => tracing::error!(error = %err, "asking the agent failed"),
            }
        }
    }

    /// Reads the store, checks every record and brings the peers to the
    /// valid ones, the revocations to theirs, and what the agent knows of
    /// their bindings to their sets. A store that cannot be read changes
    /// nothing but what time changes: its last good read is checked again,
    /// so that a peer whose join token expires meanwhile still goes.
    async fn sync(&mut self) {
        let (entries, lists, sets, revoked) = match (
            self.store.read(Section::Nodes).await,
            self.store.read(Section::Revocations).await,
            self.store.read(Section::Bindings).await,
            self.store.read(Section::RevokedNodes).await,
        ) {
            (Ok(entries), Ok(lists), Ok(sets), Ok(revoked)) => (entries, lists, sets, revoked),
            (Err(err), ..) | (_, Err(err), ..) | (_, _, Err(err), _) | (.., Err(err)) => {
                self.counters.store_errors.inc();
                tracing::warn!(error = %err, "cannot read the store; the last good state stays");
                if let Some(last) = self.last_read.take() {
                    self.apply(&last).await;
                    self.last_read = Some(last);
                }
                return;
            }
        };
        // Someone else's write under this node's name is undone, and an
        // entry that aged out is published again.
        let own = self.join.node.clone();
        let revocations = self.revocations_published.as_ref();
        if stale(&lists, &own, revocations.map(|(_, bytes)| bytes)) {
            self.publish_revocations(true).await;
        }
        let bindings = self.bindings_published.as_ref();
        if stale(&sets, &own, bindings.map(|(_, bytes)| bytes)) {
            self.publish_bindings(true).await;
        }
        if stale(&entries, &own, self.published.as_ref()) {
            self.publish().await;
        }
        let others = |entries: Vec<Entry>| -> Vec<Entry> {
            entries
                .into_iter()
                .filter(|e| e.name != own.as_str())
                .collect()
        };
        let read = StoreRead {
            entries,
            lists: others(lists),
            sets: others(sets),
            revoked,
        };
        self.apply(&read).await;
        self.last_read = Some(read);
    }

    /// Checks what the store held, as of now, and brings the peers, the
    /// revocations and the peers' bindings to it.
    async fn apply(&mut self, read: &StoreRead) {
        let local = self.local();
        let now = SystemTime::now();
        let revoked_rejected = self.checker.update_revoked(&read.revoked, now);
        let mut membership = self.checker.check(&read.entries, &local, now);
        membership.rejected.extend(revoked_rejected);
        membership
            .rejected
            .extend(self.remote.update(&read.lists, &membership.peers));
        membership
            .rejected
            .extend(self.peer_sets.update(&read.sets, &membership.peers));
        let peer_sets = &self.peer_sets;
        self.peer_bindings.send_if_modified(|current| {
            let now = bindings::peer_bindings(peer_sets);
            let changed = *current != now;
            *current = now;
            changed
        });
        let rejected: BTreeSet<_> = membership
            .rejected
            .iter()
            .map(|r| (r.entry.clone(), r.reason))
            .collect();
        for rejection in &membership.rejected {
            if !self
                .rejected
                .contains(&(rejection.entry.clone(), rejection.reason))
            {
                self.counters
                    .rejected
                    .with_label_values(&[rejection.reason])
                    .inc();
                tracing::warn!(
                    entry = rejection.entry,
                    reason = rejection.reason,
                    detail = rejection.detail,
                    "node record rejected"
                );
            }
        }
        self.rejected = rejected;
        self.apply_revocations().await;
        let desired: Vec<PeerConfig> = membership
            .peers
            .values()
            .map(|peer| PeerConfig {
                public_key: peer.public_key,
                endpoint: peer.endpoint,
                allowed_ips: vec![peer.prefix],
                keepalive: self.options.keepalive,
            })
            .collect();
        let actual = match self.device.peers().await {
            Ok(actual) => actual,
            Err(err) => {
                tracing::error!(error = %err, "cannot read the WireGuard peers");
                return;
            }
        };
        for change in wireguard::plan(&desired, &actual) {
            match self.device.apply(&change).await {
                Ok(()) => tracing::info!(?change, "peer changed"),
                Err(err) => tracing::error!(error = %err, ?change, "cannot change a peer"),
            }
        }
        self.counters.peers.set(membership.peers.len() as i64);
        if let Some(shield) = &mut self.shield {
            let endpoints = membership.peers.values().map(|p| p.endpoint.ip()).collect();
            if let Err(err) = shield.sync_peers(&endpoints) {
                tracing::error!(error = %err, "cannot update the underlay shield's peers");
            }
        }
    }

    /// A new key pair: saved, put in use, published. Peers follow when they
    /// read the record; until then the tunnel to them pauses.
    async fn rotate(&mut self) {
        let key = match NodeKey::generate() {
            Ok(key) => key,
            Err(err) => {
                tracing::error!(error = %err, "cannot make a new key");
                return;
            }
        };
        if let Err(err) = key.save(&self.options.state_dir) {
            tracing::error!(error = %err, "cannot save a new key; the old one stays");
            return;
        }
        self.use_key(key).await;
    }

    /// Takes a key written into the state folder (`mesh-agent node
    /// rotate-key`) into use. A key that cannot be read leaves the one in
    /// use.
    async fn reload_key(&mut self) {
        match NodeKey::load(&self.options.state_dir.join(KEY_FILE)) {
            Ok(key) if key.public() != self.key.public() => self.use_key(key).await,
            Ok(_) => {}
            Err(err) => tracing::error!(error = %err, "cannot read the new key; the old one stays"),
        }
    }

    async fn use_key(&mut self, key: NodeKey) {
        if let Err(err) = self
            .device
            .set_key(key.private(), self.options.endpoint.port())
            .await
        {
            tracing::error!(error = %err, "cannot put the new key in use");
            return;
        }
        self.key = key;
        self.counters.rotations.inc();
        self.publish().await;
    }
}

/// This node's join token, read and checked against the admin bundle and
/// the mesh's range, and the checker that checks the other nodes.
fn own_join(options: &MeshOptions) -> Result<(Checker, String, Join), MeshError> {
    let bundle = TrustBundle::load(&options.bundle)?;
    let verifier = JoinVerifier::new(bundle);
    let revoked = RevokedNodes::load(&options.state_dir, &verifier, SystemTime::now())?;
    let sequences = Sequences::load(&options.state_dir, Section::Nodes)?;
    let checker = Checker::new(verifier, options.mesh_range, revoked, sequences);
    let token = std::fs::read_to_string(&options.join_token)
        .map_err(|source| MeshError::ReadToken {
            path: options.join_token.clone(),
            source,
        })?
        .trim()
        .to_owned();
    let join = checker
        .check_own(&token, SystemTime::now())
        .map_err(|source| MeshError::Join { source })?;
    if let Some(revocation) = checker.revoking(&join) {
        return Err(MeshError::Revoked(describe_revocation(revocation)));
    }
    let mesh = options.mesh_range;
    if !(mesh.prefix_len() <= join.prefix.prefix_len() && mesh.contains(&join.prefix.network())) {
        return Err(MeshError::OutsideMesh {
            prefix: join.prefix,
            mesh,
        });
    }
    Ok((checker, token, join))
}

/// Whether the join token names this node's signing key.
fn bound_to(join: &Join, signing: &SigningKey) -> Result<(), MeshError> {
    if join.node_key == signing.public() {
        Ok(())
    } else {
        Err(MeshError::ForeignNodeKey {
            token: join.node_key,
            own: signing.public(),
        })
    }
}

/// What `run --check` tells of joining the mesh, one line each: the join
/// token and node key checked as the start checks them, and the rest of
/// the options. Reads, and makes or writes nothing.
pub fn check(options: &MeshOptions) -> Result<Vec<String>, MeshError> {
    let (_, _, join) = own_join(options)?;
    bound_to(&join, &SigningKey::load(&options.state_dir)?)?;
    let expires = time::OffsetDateTime::from(join.expires_at)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| "?".into());
    let implementation = match options.wireguard {
        Mode::Auto => format!(
            "kernel WireGuard if the kernel has it, else {}",
            options.userspace_program.display()
        ),
        Mode::Kernel => "kernel WireGuard".into(),
        Mode::Userspace => options.userspace_program.display().to_string(),
    };
    let rotation = options
        .key_rotation
        .map_or("on demand (node rotate-key)".into(), |every| {
            format!("every {} s", every.as_secs())
        });
    Ok(vec![
        format!(
            "mesh: join as node {} owning {} (join token valid until {expires}, bound to this node's key)",
            join.node, join.prefix
        ),
        format!(
            "mesh: records in {}; WireGuard at {}; all of {} routed into the tunnel",
            options.store, options.endpoint, options.mesh_range
        ),
        format!(
            "mesh: interface {} by {implementation}; keepalive {} s; key rotation {rotation}",
            options.interface, options.keepalive
        ),
        match &options.shield {
            Some(shield) => format!(
                "mesh: underlay {} shielded: WireGuard from peers, {} handshakes/s per subnet \
                 and {}/s overall from others, {} host services",
                shield.interface,
                shield.rates.per_subnet,
                shield.rates.overall,
                shield.services.len()
            ),
            None => "mesh: no underlay shield".into(),
        },
    ])
}

/// The node's own address on the mesh interface: the first host of its
/// prefix.
fn node_address(prefix: IpNet) -> IpAddr {
    prefix.hosts().next().unwrap_or(prefix.addr())
}

/// Whether `entries` lack this node's own, or hold another than the one
/// last published.
fn stale(entries: &[Entry], own: &NodeName, published: Option<&Vec<u8>>) -> bool {
    entries
        .iter()
        .find(|e| e.name == own.as_str())
        .is_none_or(|entry| Some(&entry.bytes) != published)
}

/// Waits for the next change a watch reports; without one, forever.
async fn changes(watch: &mut Option<StoreWatch>) -> std::io::Result<()> {
    match watch {
        Some(watch) => watch.changed().await,
        None => std::future::pending().await,
    }
}
