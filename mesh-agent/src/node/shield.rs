//! The underlay shield (`--underlay IFACE`): an XDP program of its own on
//! the interface that carries the tunnel. It admits WireGuard to the listen
//! port from the peers' endpoints, rate-limits what anyone else sends there
//! (per source /24 — /48 for IPv6 — and overall: handshakes from nodes that
//! roam, and floods), admits the host services named with
//! `--underlay-allow`, ARP, neighbour discovery, ICMP errors and TCP
//! segments of open connections, and drops everything else at line rate.
//! Counters by reason are in `mesh_underlay_packets_total`.
//!
//! Like the datapath, the shield outlives the agent: its maps are pinned
//! under `BPFFS/shield/maps/` and its link under `BPFFS/shield/links/`, a
//! restarted agent adopts both (peers, buckets and counters included) and
//! swaps its program into the link atomically, and `mesh-agent teardown`
//! removes them. A crashed agent leaves the underlay shielded.

use std::{
    collections::BTreeSet,
    fs, io,
    net::{IpAddr, Ipv6Addr},
    os::fd::AsFd as _,
    path::{Path, PathBuf},
    str::FromStr,
    sync::{Arc, Mutex},
};

use aya::{
    Ebpf, EbpfError, EbpfLoader,
    maps::{Array, HashMap, MapData, MapError, PerCpuArray, lpm_trie::Key, lpm_trie::LpmTrie},
    programs::{ProgramError, Xdp, XdpMode},
};
use ipnet::IpNet;
use mesh_common::shield::{
    PROGRAM, Rate, SERVICE_KEY_FIXED_BITS, ServiceKey, ShieldAddr, ShieldConfig, mapped_v4, maps,
    reason, side,
};
use prometheus::{
    IntCounterVec, Opts,
    core::{Collector, Desc},
    proto::MetricFamily,
};

use crate::{
    datapath::{self, DatapathError},
    metrics::Metrics,
};

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/shield"));

/// What the shield admits besides WireGuard: a host service,
/// `PROTO/PORT[@CIDR]` or `icmp[@CIDR]` (echo requests), or the answers of
/// UDP servers the host asks, `udp-from/PORT[@CIDR]` (DNS, NTP); from
/// anywhere without `@CIDR`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShieldService {
    protocol: u8,
    /// [`side::HOST`] or [`side::SERVER`]: whose port `port` is.
    side: u8,
    port: u16,
    source: IpNet,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "`{0}` is not a service: expected tcp/PORT, udp/PORT, icmp or udp-from/PORT (a server's \
     answers), then @CIDR for the sources (tcp/22@10.0.0.0/8, udp-from/53@10.0.0.2/32)"
)]
pub struct InvalidService(String);

impl FromStr for ShieldService {
    type Err = InvalidService;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let invalid = || InvalidService(text.to_owned());
        let (service, source) = match text.split_once('@') {
            Some((service, source)) => (service, source.parse().map_err(|_| invalid())?),
            None => (text, IpNet::V6(Default::default())),
        };
        let (protocol, side, port) = match service.split_once('/') {
            Some(("tcp", port)) => (6, side::HOST, port.parse().map_err(|_| invalid())?),
            Some(("udp", port)) => (17, side::HOST, port.parse().map_err(|_| invalid())?),
            Some(("udp-from", port)) => (17, side::SERVER, port.parse().map_err(|_| invalid())?),
            None if service == "icmp" => (1, side::HOST, 0),
            _ => return Err(invalid()),
        };
        if port == 0 && protocol != 1 {
            return Err(invalid());
        }
        Ok(Self {
            protocol,
            side,
            port,
            source,
        })
    }
}

impl ShieldService {
    /// The service's LPM keys: IPv4 sources as mapped addresses; a source
    /// of `::/0` (no `@CIDR`) stands for both families, and ICMP for ICMPv6
    /// too.
    fn keys(&self) -> Vec<Key<ServiceKey>> {
        let sources: Vec<(ShieldAddr, u32)> = match self.source {
            IpNet::V4(net) => vec![(
                mapped_v4(net.network().octets()),
                96 + u32::from(net.prefix_len()),
            )],
            IpNet::V6(net) if net.prefix_len() == 0 => {
                vec![(mapped_v4([0; 4]), 96), (net.network().octets(), 0)]
            }
            IpNet::V6(net) => vec![(net.network().octets(), u32::from(net.prefix_len()))],
        };
        let protocols: &[u8] = if self.protocol == 1 {
            &[1, 58]
        } else {
            std::slice::from_ref(&self.protocol)
        };
        let mut keys = Vec::new();
        for &protocol in protocols {
            for &(source, bits) in &sources {
                keys.push(Key::new(
                    SERVICE_KEY_FIXED_BITS + bits,
                    ServiceKey {
                        protocol,
                        side: self.side,
                        port_be: self.port.to_be(),
                        source,
                    },
                ));
            }
        }
        keys
    }
}

/// Handshakes (any packet to the WireGuard port from a source that is no
/// peer) admitted per second, sustained; bursts of twice as many pass.
#[derive(Debug, Clone, Copy)]
pub struct HandshakeRates {
    pub per_subnet: u32,
    pub overall: u32,
}

pub struct ShieldOptions {
    pub interface: String,
    /// The agent's bpffs folder: the shield is pinned below it.
    pub bpffs: PathBuf,
    pub services: Vec<ShieldService>,
    pub rates: HandshakeRates,
}

#[derive(Debug, thiserror::Error)]
pub enum ShieldError {
    #[error("this agent was built without eBPF programs (AYA_BUILD_SKIP)")]
    NoProgram,
    #[error("loading the underlay shield")]
    Load(#[source] EbpfError),
    #[error("the underlay shield has no {0}")]
    Missing(&'static str),
    #[error("the underlay shield's program")]
    Program(#[source] ProgramError),
    #[error("attaching the underlay shield to {interface}")]
    Attach {
        interface: String,
        #[source]
        source: ProgramError,
    },
    #[error("the underlay shield's map {name}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("more than {0} host services for the underlay shield")]
    TooManyServices(u32),
    #[error("registering the underlay shield's metrics")]
    Metrics(#[from] prometheus::Error),
    #[error("pinning the underlay shield")]
    Pins(#[source] DatapathError),
    #[error("the underlay shield's pins in {}", path.display())]
    PinFolder {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Every map of the shield, each pinned as `maps/<name>`.
const MAPS: [&str; 6] = [
    maps::CONFIG,
    maps::PEERS,
    maps::SERVICES,
    maps::SUBNETS,
    maps::OVERALL,
    maps::COUNTERS,
];

/// The shield's pins below the agent's bpffs folder.
struct ShieldPins {
    root: PathBuf,
}

impl ShieldPins {
    fn new(bpffs: &Path) -> Self {
        Self {
            root: bpffs.join("shield"),
        }
    }

    fn maps(&self) -> Vec<(&'static str, PathBuf)> {
        MAPS.iter()
            .map(|&name| (name, self.root.join("maps").join(name)))
            .collect()
    }

    fn links(&self) -> PathBuf {
        self.root.join("links")
    }

    /// `links/<interface>`, dots as colons as the datapath's links have.
    fn link(&self, interface: &str) -> PathBuf {
        self.links().join(interface.replace('.', ":"))
    }

    /// The pinned links, of whichever interface.
    fn pinned_links(&self) -> Result<Vec<PathBuf>, ShieldError> {
        let dir = self.links();
        match fs::read_dir(&dir) {
            Ok(entries) => Ok(entries.filter_map(Result::ok).map(|e| e.path()).collect()),
            Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(source) => Err(ShieldError::PinFolder { path: dir, source }),
        }
    }
}

/// Removes the shield's pins under the agent's bpffs folder `bpffs`, its
/// links detached at once: the underlay is as it was before mesh. Nothing
/// pinned is fine.
pub fn unpin_shield(bpffs: &Path) -> Result<(), ShieldError> {
    let pins = ShieldPins::new(bpffs);
    for link in pins.pinned_links()? {
        datapath::unpin_link(&link).map_err(ShieldError::Pins)?;
    }
    for (_, path) in pins.maps() {
        datapath::remove_pin(&path, |p| fs::remove_file(p)).map_err(ShieldError::Pins)?;
    }
    for dir in [pins.links(), pins.root.join("maps"), pins.root.clone()] {
        datapath::remove_pin(&dir, |p| fs::remove_dir(p)).map_err(ShieldError::Pins)?;
    }
    Ok(())
}

/// The shield, attached and pinned. Dropping it leaves it in place.
pub struct Shield {
    ebpf: Ebpf,
    /// The addresses admitted as peers' endpoints.
    peers: BTreeSet<IpAddr>,
}

impl Shield {
    /// Loads the shield with its maps pinned below the agent's bpffs folder (an earlier
    /// agent's adopted), configures it for WireGuard on `listen_port`, and
    /// attaches it to the underlay, or swaps it into the link an earlier
    /// agent pinned there. The peers an earlier agent admitted stay until
    /// [`Shield::sync_peers`]; a fresh shield knows none, so only
    /// rate-limited handshakes reach WireGuard until then.
    pub fn start(
        options: &ShieldOptions,
        listen_port: u16,
        metrics: &Metrics,
    ) -> Result<Self, ShieldError> {
        if OBJECT.is_empty() {
            return Err(ShieldError::NoProgram);
        }
        let pins = ShieldPins::new(&options.bpffs);
        for dir in [pins.root.join("maps"), pins.links()] {
            fs::create_dir_all(&dir)
                .map_err(|source| ShieldError::PinFolder { path: dir, source })?;
        }
        let map_pins = pins.maps();
        datapath::check_layout(OBJECT, &map_pins).map_err(ShieldError::Pins)?;
        let mut loader = EbpfLoader::new();
        for (name, path) in &map_pins {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(OBJECT).map_err(ShieldError::Load)?;
        let config = ShieldConfig {
            listen_port,
            _pad: [0; 6],
            per_subnet: rate(options.rates.per_subnet),
            overall: rate(options.rates.overall),
        };
        map::<Array<_, ShieldConfig>>(&mut ebpf, maps::CONFIG)?
            .set(0, config, 0)
            .map_err(map_error(maps::CONFIG))?;
        let mut services = map::<LpmTrie<_, ServiceKey, u8>>(&mut ebpf, maps::SERVICES)?;
        let keys: Vec<_> = options
            .services
            .iter()
            .flat_map(ShieldService::keys)
            .collect();
        let capacity = mesh_common::shield::capacity::SERVICES;
        if keys.len() > capacity as usize {
            return Err(ShieldError::TooManyServices(capacity));
        }
        for key in &keys {
            services
                .insert(key, 1, 0)
                .map_err(map_error(maps::SERVICES))?;
        }
        // An earlier agent's services that this one does not name.
        let wanted: Vec<(u32, ServiceKey)> = keys
            .iter()
            .map(|key| (key.prefix_len(), key.data()))
            .collect();
        let present: Vec<Key<ServiceKey>> = services
            .keys()
            .collect::<Result<_, _>>()
            .map_err(map_error(maps::SERVICES))?;
        for key in present {
            if !wanted.contains(&(key.prefix_len(), key.data())) {
                services.remove(&key).map_err(map_error(maps::SERVICES))?;
            }
        }
        let peers: BTreeSet<IpAddr> = map::<HashMap<_, ShieldAddr, u8>>(&mut ebpf, maps::PEERS)?
            .keys()
            .map(|key| key.map(from_shield_addr))
            .collect::<Result<_, _>>()
            .map_err(map_error(maps::PEERS))?;
        let counters: PerCpuArray<MapData, u64> = PerCpuArray::try_from(
            ebpf.take_map(maps::COUNTERS)
                .ok_or(ShieldError::Missing(maps::COUNTERS))?,
        )
        .map_err(map_error(maps::COUNTERS))?;
        metrics
            .register(Box::new(Counters::new(counters)?))
            .map_err(ShieldError::Metrics)?;
        let program: &mut Xdp = ebpf
            .program_mut(PROGRAM)
            .ok_or(ShieldError::Missing(PROGRAM))?
            .try_into()
            .map_err(ShieldError::Program)?;
        program.load().map_err(ShieldError::Program)?;
        let path = pins.link(&options.interface);
        // A shield an earlier agent left on another interface goes.
        for other in pins.pinned_links()? {
            if other != path {
                datapath::unpin_link(&other).map_err(ShieldError::Pins)?;
            }
        }
        let fd = program.fd().map_err(ShieldError::Program)?;
        if !datapath::adopt_link(&path, fd.as_fd()).map_err(ShieldError::Pins)? {
            let id = program
                .attach(&options.interface, XdpMode::Default)
                .map_err(|source| ShieldError::Attach {
                    interface: options.interface.clone(),
                    source,
                })?;
            let link = program.take_link(id).map_err(ShieldError::Program)?;
            datapath::pin_link(link, &path).map_err(ShieldError::Pins)?;
        }
        Ok(Self { ebpf, peers })
    }

    /// Makes the admitted peer addresses exactly `peers`: new ones first,
    /// then the ones that went.
    pub fn sync_peers(&mut self, peers: &BTreeSet<IpAddr>) -> Result<(), ShieldError> {
        let mut map = map::<HashMap<_, ShieldAddr, u8>>(&mut self.ebpf, maps::PEERS)?;
        for address in peers.difference(&self.peers) {
            map.insert(shield_addr(*address), 1, 0)
                .map_err(map_error(maps::PEERS))?;
        }
        for address in self.peers.difference(peers) {
            match map.remove(&shield_addr(*address)) {
                Err(MapError::KeyNotFound) | Ok(()) => {}
                Err(source) => return Err(map_error(maps::PEERS)(source)),
            }
        }
        self.peers = peers.clone();
        Ok(())
    }
}

/// GCRA parameters for `per_second`, with bursts of twice as many.
fn rate(per_second: u32) -> Rate {
    let interval_ns = 1_000_000_000 / u64::from(per_second.max(1));
    Rate {
        interval_ns,
        tolerance_ns: interval_ns * (2 * u64::from(per_second.max(1)) - 1),
    }
}

fn shield_addr(address: IpAddr) -> ShieldAddr {
    match address {
        IpAddr::V4(v4) => mapped_v4(v4.octets()),
        IpAddr::V6(v6) => v6.octets(),
    }
}

fn from_shield_addr(address: ShieldAddr) -> IpAddr {
    Ipv6Addr::from(address).to_canonical()
}

/// A map of the shield as `T`.
fn map<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<T, ShieldError>
where
    T: TryFrom<&'a mut aya::maps::Map, Error = MapError>,
{
    T::try_from(ebpf.map_mut(name).ok_or(ShieldError::Missing(name))?).map_err(map_error(name))
}

fn map_error(name: &'static str) -> impl FnOnce(MapError) -> ShieldError {
    move |source| ShieldError::Map { name, source }
}

/// `mesh_underlay_packets_total{verdict, reason}`, read from the shield's
/// per-CPU counters at each scrape.
struct Counters {
    map: Arc<Mutex<PerCpuArray<MapData, u64>>>,
    desc: Vec<Desc>,
}

impl Counters {
    fn new(map: PerCpuArray<MapData, u64>) -> prometheus::Result<Self> {
        let desc = Self::vec()?.desc().into_iter().cloned().collect();
        Ok(Self {
            map: Arc::new(Mutex::new(map)),
            desc,
        })
    }

    fn vec() -> prometheus::Result<IntCounterVec> {
        IntCounterVec::new(
            Opts::new(
                "mesh_underlay_packets_total",
                "Packets the underlay shield passed or dropped, by reason.",
            ),
            &["verdict", "reason"],
        )
    }
}

impl Collector for Counters {
    fn desc(&self) -> Vec<&Desc> {
        self.desc.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let Ok(vec) = Self::vec() else {
            return Vec::new();
        };
        let Ok(map) = self.map.lock() else {
            return Vec::new();
        };
        for (index, name) in reason::NAMES.iter().enumerate() {
            let index = index as u32;
            let verdict = match index {
                reason::HANDSHAKE_LIMITED | reason::DROPPED => "drop",
                _ => "pass",
            };
            let total = map
                .get(&index, 0)
                .map(|values| values.iter().sum::<u64>())
                .unwrap_or(0);
            vec.with_label_values(&[verdict, name]).inc_by(total);
        }
        vec.collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_services() {
        let ssh: ShieldService = "tcp/22@10.0.0.0/8".parse().unwrap();
        assert_eq!(
            (ssh.protocol, ssh.port, ssh.source),
            (6, 22, "10.0.0.0/8".parse().unwrap())
        );
        let key = &ssh.keys()[0];
        assert_eq!(key.prefix_len(), 32 + 96 + 8);
        assert_eq!(key.data().port_be, 22u16.to_be());
        // Anywhere: both families; ICMP: ICMPv6 too.
        assert_eq!("udp/53".parse::<ShieldService>().unwrap().keys().len(), 2);
        // A server's answers: its port, the source's.
        let dns: ShieldService = "udp-from/53@10.0.0.2/32".parse().unwrap();
        let key = dns.keys()[0].data();
        assert_eq!(
            (key.protocol, key.side, key.port_be),
            (17, side::SERVER, 53u16.to_be())
        );
        assert_eq!(ssh.keys()[0].data().side, side::HOST);
        assert_eq!("icmp".parse::<ShieldService>().unwrap().keys().len(), 4);
        for bad in [
            "tcp",
            "tcp/0",
            "sctp/1",
            "tcp/22@",
            "tcp/22@10.0.0.1",
            "icmp/1",
            "udp-from/0",
            "tcp-from/53",
        ] {
            assert!(bad.parse::<ShieldService>().is_err(), "{bad}");
        }
    }

    #[test]
    fn rates_allow_bursts_of_twice_the_rate() {
        let rate = rate(10);
        assert_eq!(rate.interval_ns, 100_000_000);
        // 20 at once: the 20th finds the bucket 19 intervals ahead.
        assert_eq!(rate.tolerance_ns, 19 * 100_000_000);
    }
}
