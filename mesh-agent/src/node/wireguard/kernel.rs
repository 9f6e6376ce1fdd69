//! Kernel WireGuard, configured over generic netlink (the "wireguard"
//! family), as `wg` does it.

use futures_util::StreamExt as _;
use genetlink::GenetlinkHandle;
use netlink_packet_core::{
    NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_generic::GenlMessage;
use netlink_packet_wireguard::{
    WireguardAddressFamily, WireguardAllowedIp, WireguardAllowedIpAttr, WireguardAttribute,
    WireguardCmd, WireguardMessage, WireguardPeer, WireguardPeerAttribute, WireguardPeerFlags,
};

use super::{PeerConfig, PeerState, WireGuardError};
use crate::node::PublicKey;

pub struct Kernel {
    handle: GenetlinkHandle,
    name: String,
}

impl Kernel {
    pub fn new(name: &str) -> Result<Self, WireGuardError> {
        let (connection, handle, _) =
            genetlink::new_connection().map_err(WireGuardError::Netlink)?;
        tokio::spawn(connection);
        Ok(Self {
            handle,
            name: name.to_owned(),
        })
    }

    pub async fn set_device(
        &mut self,
        private_key: &[u8; 32],
        listen_port: u16,
    ) -> Result<(), WireGuardError> {
        self.set(vec![
            WireguardAttribute::PrivateKey(*private_key),
            WireguardAttribute::ListenPort(listen_port),
        ])
        .await
    }

    /// Adds or updates a peer; its allowed IPs become exactly the given.
    pub async fn set_peer(&mut self, peer: &PeerConfig) -> Result<(), WireGuardError> {
        let allowed = peer
            .allowed_ips
            .iter()
            .map(|net| {
                WireguardAllowedIp(vec![
                    WireguardAllowedIpAttr::Family(if net.addr().is_ipv4() {
                        WireguardAddressFamily::Ipv4
                    } else {
                        WireguardAddressFamily::Ipv6
                    }),
                    WireguardAllowedIpAttr::IpAddr(net.network()),
                    WireguardAllowedIpAttr::Cidr(net.prefix_len()),
                ])
            })
            .collect();
        self.set_peers(WireguardPeer(vec![
            WireguardPeerAttribute::PublicKey(*peer.public_key.as_bytes()),
            WireguardPeerAttribute::Flags(WireguardPeerFlags::ReplaceAllowedIps),
            WireguardPeerAttribute::Endpoint(peer.endpoint),
            WireguardPeerAttribute::PersistentKeepalive(peer.keepalive),
            WireguardPeerAttribute::AllowedIps(allowed),
        ]))
        .await
    }

    pub async fn remove_peer(&mut self, key: &PublicKey) -> Result<(), WireGuardError> {
        self.set_peers(WireguardPeer(vec![
            WireguardPeerAttribute::PublicKey(*key.as_bytes()),
            WireguardPeerAttribute::Flags(WireguardPeerFlags::RemoveMe),
        ]))
        .await
    }

    pub async fn peers(&mut self) -> Result<Vec<PeerState>, WireGuardError> {
        let message = WireguardMessage {
            cmd: WireguardCmd::GetDevice,
            attributes: vec![WireguardAttribute::IfName(self.name.clone())],
        };
        let mut peers = Vec::new();
        // A device with many peers comes in several messages.
        for answer in self.request(message, NLM_F_REQUEST | NLM_F_DUMP).await? {
            for attribute in answer.attributes {
                if let WireguardAttribute::Peers(list) = attribute {
                    peers.extend(list.into_iter().filter_map(peer_state));
                }
            }
        }
        Ok(peers)
    }

    async fn set_peers(&mut self, peer: WireguardPeer) -> Result<(), WireGuardError> {
        self.set(vec![WireguardAttribute::Peers(vec![peer])]).await
    }

    async fn set(&mut self, mut attributes: Vec<WireguardAttribute>) -> Result<(), WireGuardError> {
        attributes.insert(0, WireguardAttribute::IfName(self.name.clone()));
        let message = WireguardMessage {
            cmd: WireguardCmd::SetDevice,
            attributes,
        };
        self.request(message, NLM_F_REQUEST | NLM_F_ACK)
            .await
            .map(drop)
    }

    async fn request(
        &mut self,
        message: WireguardMessage,
        flags: u16,
    ) -> Result<Vec<WireguardMessage>, WireGuardError> {
        let mut header = NetlinkHeader::default();
        header.flags = flags;
        let request = NetlinkMessage::new(header, GenlMessage::from_payload(message).into());
        let failed = |detail: String| WireGuardError::Genetlink(detail);
        let mut responses = self
            .handle
            .request(request)
            .await
            .map_err(|err| failed(err.to_string()))?;
        let mut answers = Vec::new();
        while let Some(response) = responses.next().await {
            match response.map_err(|err| failed(err.to_string()))?.payload {
                NetlinkPayload::InnerMessage(genl) => answers.push(genl.payload),
                NetlinkPayload::Error(err) if err.code.is_some() => {
                    return Err(failed(err.to_io().to_string()));
                }
                _ => {}
            }
        }
        Ok(answers)
    }
}

fn peer_state(peer: WireguardPeer) -> Option<PeerState> {
    let mut key = None;
    let mut endpoint = None;
    let mut keepalive = 0;
    let mut allowed_ips = Vec::new();
    for attribute in peer.0 {
        match attribute {
            WireguardPeerAttribute::PublicKey(bytes) => key = Some(PublicKey::from_bytes(bytes)),
            WireguardPeerAttribute::Endpoint(address) => endpoint = Some(address),
            WireguardPeerAttribute::PersistentKeepalive(seconds) => keepalive = seconds,
            WireguardPeerAttribute::AllowedIps(list) => {
                allowed_ips.extend(list.into_iter().filter_map(|ip| {
                    let mut address = None;
                    let mut cidr = None;
                    for attr in ip.0 {
                        match attr {
                            WireguardAllowedIpAttr::IpAddr(a) => address = Some(a),
                            WireguardAllowedIpAttr::Cidr(c) => cidr = Some(c),
                            _ => {}
                        }
                    }
                    ipnet::IpNet::new(address?, cidr?).ok()
                }));
            }
            _ => {}
        }
    }
    Some(PeerState {
        public_key: key?,
        endpoint,
        allowed_ips,
        keepalive,
    })
}
