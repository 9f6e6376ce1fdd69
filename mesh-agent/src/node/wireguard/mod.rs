//! The mesh's WireGuard interface: kernel WireGuard over generic netlink
//! where the kernel has it, boringtun over its UAPI otherwise. Peers are
//! changed one at a time, from a plan that compares what the membership
//! wants with what the device has, so a change of membership touches only
//! the peers it concerns.

mod kernel;
mod link;
mod uapi;

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
};

use ipnet::IpNet;

pub use self::link::Links;
use self::{kernel::Kernel, uapi::Userspace};
use super::PublicKey;

/// Which WireGuard implementation runs the mesh interface.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Kernel WireGuard if the kernel has it, else userspace.
    #[default]
    Auto,
    Kernel,
    /// boringtun, started by the agent.
    Userspace,
}

/// Outer IPv6 (40) + UDP (8) + WireGuard's header and tag (32): what a
/// packet grows by in the tunnel, IPv6 underlay assumed so that either fits.
pub const OVERHEAD: u32 = 80;

/// A peer as the membership wants it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerConfig {
    pub public_key: PublicKey,
    pub endpoint: SocketAddr,
    pub allowed_ips: Vec<IpNet>,
    /// Seconds between keepalives; 0 for none.
    pub keepalive: u16,
}

/// A peer as the device has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerState {
    pub public_key: PublicKey,
    pub endpoint: Option<SocketAddr>,
    pub allowed_ips: Vec<IpNet>,
    pub keepalive: u16,
}

/// One step of bringing the device to the membership.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerChange {
    Set(PeerConfig),
    Remove(PublicKey),
}

#[derive(Debug, thiserror::Error)]
pub enum WireGuardError {
    #[error("opening a netlink socket")]
    Netlink(#[source] std::io::Error),
    #[error("{what}: {detail}")]
    Rtnetlink { what: &'static str, detail: String },
    #[error("route {0}")]
    Route(String),
    #[error("configuring kernel WireGuard: {0}")]
    Genetlink(String),
    #[error("starting {}", program.display())]
    Spawn {
        program: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("userspace WireGuard: {0}")]
    Uapi(String),
    #[error("this kernel has no WireGuard (--wireguard kernel); use --wireguard auto or userspace")]
    NoKernelWireGuard,
    #[error("interface {0} already exists and is not one this agent can configure")]
    Exists(String),
}

enum Control {
    Kernel(Kernel),
    /// Boxed: its read buffer dwarfs the netlink handle.
    Userspace(Box<Userspace>),
}

/// The mesh interface.
pub struct Device {
    name: String,
    index: u32,
    links: Links,
    control: Control,
}

impl Device {
    /// Creates interface `name` with the implementation `mode` picks, up,
    /// with `mtu`, and no key and no peers yet.
    pub async fn create(
        name: &str,
        mode: Mode,
        userspace_program: &Path,
        mtu: u32,
    ) -> Result<Self, WireGuardError> {
        let links = Links::new()?;
        if links.index(name).await?.is_some() {
            // A kernel interface an earlier agent left is adopted as it
            // is: its peers keep working while this agent starts.
            if mode == Mode::Userspace {
                return Err(WireGuardError::Exists(name.to_owned()));
            }
            let mut kernel = Kernel::new(name)?;
            kernel
                .peers()
                .await
                .map_err(|_| WireGuardError::Exists(name.to_owned()))?;
            return Self::finish(name, links, Control::Kernel(kernel), mtu).await;
        }
        let kernel = match mode {
            Mode::Userspace => false,
            Mode::Kernel | Mode::Auto => links.add_wireguard(name).await?,
        };
        let control = if kernel {
            Control::Kernel(Kernel::new(name)?)
        } else if mode == Mode::Kernel {
            return Err(WireGuardError::NoKernelWireGuard);
        } else {
            Control::Userspace(Box::new(Userspace::spawn(userspace_program, name).await?))
        };
        Self::finish(name, links, control, mtu).await
    }

    async fn finish(
        name: &str,
        links: Links,
        control: Control,
        mtu: u32,
    ) -> Result<Self, WireGuardError> {
        let index = links
            .index(name)
            .await?
            .ok_or_else(|| WireGuardError::Rtnetlink {
                what: "finding the new interface",
                detail: format!("{name} is missing"),
            })?;
        links.up(index, mtu).await?;
        Ok(Self {
            name: name.to_owned(),
            index,
            links,
            control,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `kernel` or `userspace`.
    pub fn implementation(&self) -> &'static str {
        match self.control {
            Control::Kernel(_) => "kernel",
            Control::Userspace(_) => "userspace",
        }
    }

    /// Sets the private key (a rotation, if it had one) and listen port.
    pub async fn set_key(
        &mut self,
        private_key: &[u8; 32],
        listen_port: u16,
    ) -> Result<(), WireGuardError> {
        match &mut self.control {
            Control::Kernel(kernel) => kernel.set_device(private_key, listen_port).await,
            Control::Userspace(userspace) => {
                let hex = zeroize::Zeroizing::new(hex(private_key));
                let body = zeroize::Zeroizing::new(format!(
                    "private_key={}\nlisten_port={listen_port}\n",
                    hex.as_str()
                ));
                userspace.set(&body).await
            }
        }
    }

    pub async fn add_address(&self, address: IpAddr) -> Result<(), WireGuardError> {
        self.links.add_address(self.index, address).await
    }

    pub async fn sync_routes(&self, mesh: IpNet, prefixes: &[IpNet]) -> Result<(), WireGuardError> {
        self.links.sync_routes(self.index, mesh, prefixes).await
    }

    /// The peers the device has now.
    pub async fn peers(&mut self) -> Result<Vec<PeerState>, WireGuardError> {
        match &mut self.control {
            Control::Kernel(kernel) => kernel.peers().await,
            Control::Userspace(userspace) => Ok(parse_uapi_peers(&userspace.get().await?)),
        }
    }

    pub async fn apply(&mut self, change: &PeerChange) -> Result<(), WireGuardError> {
        match (&mut self.control, change) {
            (Control::Kernel(kernel), PeerChange::Set(peer)) => kernel.set_peer(peer).await,
            (Control::Kernel(kernel), PeerChange::Remove(key)) => kernel.remove_peer(key).await,
            (Control::Userspace(userspace), change) => userspace.set(&uapi_change(change)).await,
        }
    }
}

/// The MTU of the underlay link holding `endpoint`'s address, less the
/// tunnel's overhead; 1500 less it if no local link holds the address.
pub async fn mtu_for(endpoint: IpAddr) -> Result<u32, WireGuardError> {
    let underlay = Links::new()?.mtu_of_address(endpoint).await?;
    Ok(underlay.unwrap_or(1500).saturating_sub(OVERHEAD).max(1280))
}

/// What turns the device's `actual` peers into `desired`: new and changed
/// peers first, so that a node whose key changed gets its new peer (which
/// takes over its allowed IPs) before the old one goes; then removals.
pub fn plan(desired: &[PeerConfig], actual: &[PeerState]) -> Vec<PeerChange> {
    let actual: BTreeMap<_, _> = actual.iter().map(|p| (p.public_key, p)).collect();
    let mut changes: Vec<_> = desired
        .iter()
        .filter(|want| {
            actual.get(&want.public_key).is_none_or(|have| {
                let mut have_ips = have.allowed_ips.clone();
                let mut want_ips = want.allowed_ips.clone();
                have_ips.sort();
                want_ips.sort();
                have.endpoint != Some(want.endpoint)
                    || have.keepalive != want.keepalive
                    || have_ips != want_ips
            })
        })
        .cloned()
        .map(PeerChange::Set)
        .collect();
    let wanted: std::collections::BTreeSet<_> = desired.iter().map(|p| p.public_key).collect();
    changes.extend(
        actual
            .keys()
            .filter(|key| !wanted.contains(key))
            .map(|key| PeerChange::Remove(*key)),
    );
    changes
}

fn uapi_change(change: &PeerChange) -> String {
    match change {
        PeerChange::Set(peer) => {
            let mut body = format!(
                "public_key={}\nendpoint={}\npersistent_keepalive_interval={}\nreplace_allowed_ips=true\n",
                peer.public_key.hex(),
                peer.endpoint,
                peer.keepalive
            );
            for ip in &peer.allowed_ips {
                body.push_str(&format!("allowed_ip={}\n", ip.trunc()));
            }
            body
        }
        PeerChange::Remove(key) => format!("public_key={}\nremove=true\n", key.hex()),
    }
}

/// The peers in a UAPI `get` answer; unknown keys are skipped.
fn parse_uapi_peers(pairs: &[(String, String)]) -> Vec<PeerState> {
    let mut peers = Vec::new();
    for (key, value) in pairs {
        match key.as_str() {
            "public_key" => {
                if let Some(public_key) = unhex(value).map(PublicKey::from_bytes) {
                    peers.push(PeerState {
                        public_key,
                        endpoint: None,
                        allowed_ips: Vec::new(),
                        keepalive: 0,
                    });
                }
            }
            "endpoint" => {
                if let Some(peer) = peers.last_mut() {
                    peer.endpoint = value.parse().ok();
                }
            }
            "persistent_keepalive_interval" => {
                if let Some(peer) = peers.last_mut() {
                    peer.keepalive = value.parse().unwrap_or(0);
                }
            }
            "allowed_ip" => {
                if let (Some(peer), Ok(ip)) = (peers.last_mut(), value.parse()) {
                    peer.allowed_ips.push(ip);
                }
            }
            _ => {}
        }
    }
    peers
}

fn hex(bytes: &[u8; 32]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<[u8; 32]> {
    if text.len() != 64 {
        return None;
    }
    let mut bytes = [0; 32];
    for (i, byte) in bytes.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::NodeKey;

    fn peer(key: PublicKey, endpoint: &str, ip: &str) -> PeerConfig {
        PeerConfig {
            public_key: key,
            endpoint: endpoint.parse().unwrap(),
            allowed_ips: vec![ip.parse().unwrap()],
            keepalive: 25,
        }
    }

    fn state(peer: &PeerConfig) -> PeerState {
        PeerState {
            public_key: peer.public_key,
            endpoint: Some(peer.endpoint),
            allowed_ips: peer.allowed_ips.clone(),
            keepalive: peer.keepalive,
        }
    }

    #[test]
    fn plans_only_what_changed() {
        let [a, b, c, d] = [(); 4].map(|()| NodeKey::generate().unwrap().public());
        let kept = peer(a, "192.0.2.1:51820", "10.1.1.0/24");
        let moved = peer(b, "192.0.2.2:51820", "10.1.2.0/24");
        let gone = peer(c, "192.0.2.3:51820", "10.1.3.0/24");
        let mut moved_now = moved.clone();
        moved_now.endpoint = "192.0.2.22:51820".parse().unwrap();
        // Node c rotated its key to d.
        let rotated = peer(d, "192.0.2.3:51820", "10.1.3.0/24");
        let actual = [state(&kept), state(&moved), state(&gone)];
        let desired = [kept, moved_now.clone(), rotated.clone()];
        assert_eq!(
            plan(&desired, &actual),
            vec![
                PeerChange::Set(moved_now),
                PeerChange::Set(rotated),
                PeerChange::Remove(c)
            ]
        );
        let in_place: Vec<_> = desired.iter().map(state).collect();
        assert_eq!(plan(&desired, &in_place), vec![]);
    }

    #[test]
    fn reads_uapi_answers() {
        let key = NodeKey::generate().unwrap().public();
        let text = format!(
            "own_public_key=00\nlisten_port=51820\npublic_key={}\npersistent_keepalive_interval=25\n\
             endpoint=192.0.2.1:51820\nallowed_ip=10.1.1.0/24\nrx_bytes=0\nerrno=0",
            key.hex()
        );
        let pairs: Vec<_> = text
            .lines()
            .map(|l| {
                let (k, v) = l.split_once('=').unwrap();
                (k.to_owned(), v.to_owned())
            })
            .collect();
        assert_eq!(
            parse_uapi_peers(&pairs),
            vec![state(&peer(key, "192.0.2.1:51820", "10.1.1.0/24"))]
        );
        assert_eq!(
            uapi_change(&PeerChange::Remove(key)),
            format!("public_key={}\nremove=true\n", key.hex())
        );
    }
}
