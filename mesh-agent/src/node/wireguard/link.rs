//! The mesh interface as routing sees it, over rtnetlink: the link, its
//! MTU and address, and the routes that send the mesh's range into it.

use std::net::IpAddr;

use futures_util::TryStreamExt as _;
use ipnet::IpNet;
use rtnetlink::{
    Handle, LinkUnspec, LinkWireguard, RouteMessageBuilder,
    packet_route::{
        address::AddressAttribute,
        link::LinkAttribute,
        route::{RouteAttribute, RouteMessage, RouteProtocol, RouteType},
    },
};

use super::WireGuardError;

/// Marks the routes mesh makes, so that it replaces and removes its own
/// and nobody else's (an unassigned number in `rtnetlink`'s protocol table).
const PROTOCOL: RouteProtocol = RouteProtocol::Other(77);

/// The blackhole under the mesh's range: it takes over if the interface
/// goes, so that packets for other nodes are dropped, not routed in clear.
const BLACKHOLE_METRIC: u32 = u32::MAX;

pub struct Links {
    handle: Handle,
}

impl Links {
    pub fn new() -> Result<Self, WireGuardError> {
        let (connection, handle, _) =
            rtnetlink::new_connection().map_err(WireGuardError::Netlink)?;
        tokio::spawn(connection);
        Ok(Self { handle })
    }

    /// The index of the link named `name`, if there is one.
    pub async fn index(&self, name: &str) -> Result<Option<u32>, WireGuardError> {
        let mut links = self
            .handle
            .link()
            .get()
            .match_name(name.to_owned())
            .execute();
        match links.try_next().await {
            Ok(link) => Ok(link.map(|link| link.header.index)),
            Err(err) if errno(&err) == Some(libc::ENODEV) => Ok(None),
            Err(err) => Err(route_error("finding the interface", err)),
        }
    }

    /// Creates a kernel WireGuard link; `Ok(false)` if this kernel has no
    /// WireGuard.
    pub async fn add_wireguard(&self, name: &str) -> Result<bool, WireGuardError> {
        match self
            .handle
            .link()
            .add(LinkWireguard::new(name).build())
            .execute()
            .await
        {
            Ok(()) => Ok(true),
            Err(err) if errno(&err) == Some(libc::EOPNOTSUPP) => Ok(false),
            Err(err) => Err(route_error("creating a WireGuard interface", err)),
        }
    }

    /// Sets the MTU and brings the link up.
    pub async fn up(&self, index: u32, mtu: u32) -> Result<(), WireGuardError> {
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(index).mtu(mtu).up().build())
            .execute()
            .await
            .map_err(|err| route_error("bringing the interface up", err))
    }

    /// Puts `address` on the link (a host address: the prefix's routing is
    /// the routes' job).
    pub async fn add_address(&self, index: u32, address: IpAddr) -> Result<(), WireGuardError> {
        let host = if address.is_ipv4() { 32 } else { 128 };
        match self
            .handle
            .address()
            .add(index, address, host)
            .execute()
            .await
        {
            Err(err) if errno(&err) != Some(libc::EEXIST) => {
                Err(route_error("adding the interface's address", err))
            }
            _ => Ok(()),
        }
    }

    /// The MTU of the link that holds `address`, if one does.
    pub async fn mtu_of_address(&self, address: IpAddr) -> Result<Option<u32>, WireGuardError> {
        let mut addresses = self.handle.address().get().execute();
        let mut index = None;
        while let Some(message) = addresses
            .try_next()
            .await
            .map_err(|err| route_error("listing addresses", err))?
        {
            let holds = message.attributes.iter().any(|attr| {
                matches!(attr, AddressAttribute::Address(a) | AddressAttribute::Local(a) if *a == address)
            });
            if holds {
                index = Some(message.header.index);
                break;
            }
        }
        let Some(index) = index else { return Ok(None) };
        let mut links = self.handle.link().get().match_index(index).execute();
        let link = links
            .try_next()
            .await
            .map_err(|err| route_error("reading the underlay interface", err))?;
        Ok(link.and_then(|link| {
            link.attributes.iter().find_map(|attr| match attr {
                LinkAttribute::Mtu(mtu) => Some(*mtu),
                _ => None,
            })
        }))
    }

    /// Makes the routes through link `index` exactly `prefixes` (of the
    /// routes mesh made), and puts a blackhole under `mesh`.
    pub async fn sync_routes(
        &self,
        index: u32,
        mesh: IpNet,
        prefixes: &[IpNet],
    ) -> Result<(), WireGuardError> {
        let ours = self.routes(mesh).await?;
        for prefix in prefixes {
            let route = route(*prefix)?.output_interface(index).build();
            self.handle
                .route()
                .add(route)
                .replace()
                .execute()
                .await
                .map_err(|err| route_error("adding a route", err))?;
        }
        let blackhole = route(mesh)?
            .kind(RouteType::BlackHole)
            .priority(BLACKHOLE_METRIC)
            .build();
        self.handle
            .route()
            .add(blackhole)
            .replace()
            .execute()
            .await
            .map_err(|err| route_error("adding the blackhole route", err))?;
        for stale in ours.into_iter().filter(|(prefix, route)| {
            route.header.kind != RouteType::BlackHole && !prefixes.contains(prefix)
        }) {
            match self.handle.route().del(stale.1).execute().await {
                Err(err) if errno(&err) != Some(libc::ESRCH) => {
                    return Err(route_error("removing a route", err));
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Removes the link named `name`, if there is one, and every route
    /// mesh made, of both address families.
    pub async fn remove(&self, name: &str) -> Result<(), WireGuardError> {
        if let Some(index) = self.index(name).await? {
            match self.handle.link().del(index).execute().await {
                Err(err) if errno(&err) != Some(libc::ENODEV) => {
                    return Err(route_error("removing the interface", err));
                }
                _ => {}
            }
        }
        let families = [IpNet::V4(Default::default()), IpNet::V6(Default::default())];
        for family in families {
            for (_, route) in self.routes(family).await? {
                match self.handle.route().del(route).execute().await {
                    Err(err) if errno(&err) != Some(libc::ESRCH) => {
                        return Err(route_error("removing a route", err));
                    }
                    _ => {}
                }
            }
        }
        Ok(())
    }

    /// mesh's routes of `mesh`'s address family, with their destinations.
    async fn routes(&self, mesh: IpNet) -> Result<Vec<(IpNet, RouteMessage)>, WireGuardError> {
        let query = match mesh {
            IpNet::V4(_) => RouteMessageBuilder::<std::net::Ipv4Addr>::new().build(),
            IpNet::V6(_) => RouteMessageBuilder::<std::net::Ipv6Addr>::new().build(),
        };
        let mut routes = self.handle.route().get(query).execute();
        let mut ours = Vec::new();
        while let Some(route) = routes
            .try_next()
            .await
            .map_err(|err| route_error("listing routes", err))?
        {
            if route.header.protocol != PROTOCOL {
                continue;
            }
            let destination = route.attributes.iter().find_map(|attr| match attr {
                RouteAttribute::Destination(dest) => ip_of(dest),
                _ => None,
            });
            if let Some(prefix) = destination
                .and_then(|ip| IpNet::new(ip, route.header.destination_prefix_length).ok())
            {
                ours.push((prefix, route));
            }
        }
        Ok(ours)
    }
}

fn route(prefix: IpNet) -> Result<RouteMessageBuilder<IpAddr>, WireGuardError> {
    RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(prefix.network(), prefix.prefix_len())
        .map(|builder| builder.protocol(PROTOCOL))
        .map_err(|err| WireGuardError::Route(format!("{prefix}: {err}")))
}

fn ip_of(address: &rtnetlink::packet_route::route::RouteAddress) -> Option<IpAddr> {
    use rtnetlink::packet_route::route::RouteAddress;
    match address {
        RouteAddress::Inet(v4) => Some((*v4).into()),
        RouteAddress::Inet6(v6) => Some((*v6).into()),
        _ => None,
    }
}

fn errno(err: &rtnetlink::Error) -> Option<i32> {
    match err {
        rtnetlink::Error::NetlinkError(message) => message.to_io().raw_os_error(),
        _ => None,
    }
}

fn route_error(what: &'static str, err: rtnetlink::Error) -> WireGuardError {
    WireGuardError::Rtnetlink {
        what,
        detail: err.to_string(),
    }
}
