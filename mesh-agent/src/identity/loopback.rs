//! Binding addresses on the loopback interface: local addresses, so that
//! sockets can be bound to them and replies are delivered to them.

use std::net::IpAddr;

use futures_util::TryStreamExt as _;
use rtnetlink::Handle;

#[derive(Debug, thiserror::Error)]
#[error("{what}: {detail}")]
pub struct LoopbackError {
    what: &'static str,
    detail: String,
}

fn netlink_error(what: &'static str) -> impl FnOnce(rtnetlink::Error) -> LoopbackError {
    move |err| LoopbackError {
        what,
        detail: err.to_string(),
    }
}

fn errno(err: &rtnetlink::Error) -> Option<i32> {
    match err {
        rtnetlink::Error::NetlinkError(message) => message.to_io().raw_os_error(),
        _ => None,
    }
}

pub struct Loopback {
    handle: Handle,
    index: u32,
}

impl Loopback {
    /// The loopback interface of the agent's network namespace.
    pub async fn new() -> Result<Self, LoopbackError> {
        let (connection, handle, _) = rtnetlink::new_connection().map_err(|err| LoopbackError {
            what: "opening rtnetlink",
            detail: err.to_string(),
        })?;
        tokio::spawn(connection);
        let link = handle
            .link()
            .get()
            .match_name("lo".to_owned())
            .execute()
            .try_next()
            .await
            .map_err(netlink_error("finding the loopback interface"))?
            .ok_or_else(|| LoopbackError {
                what: "finding the loopback interface",
                detail: "there is none".to_owned(),
            })?;
        Ok(Self {
            handle,
            index: link.header.index,
        })
    }

    /// Puts `addr` on the loopback interface, as a host address.
    pub async fn add(&self, addr: IpAddr) -> Result<(), LoopbackError> {
        let host = if addr.is_ipv4() { 32 } else { 128 };
        match self
            .handle
            .address()
            .add(self.index, addr, host)
            .execute()
            .await
        {
            Err(err) if errno(&err) != Some(libc::EEXIST) => {
                Err(netlink_error("adding a binding address")(err))
            }
            _ => Ok(()),
        }
    }

    /// Takes `addr` off the loopback interface; one not there is fine.
    pub async fn remove(&self, addr: IpAddr) -> Result<(), LoopbackError> {
        let mut found = self
            .handle
            .address()
            .get()
            .set_link_index_filter(self.index)
            .set_address_filter(addr)
            .execute();
        while let Some(message) = found
            .try_next()
            .await
            .map_err(netlink_error("finding a binding address"))?
        {
            match self.handle.address().del(message).execute().await {
                Err(err) if errno(&err) != Some(libc::EADDRNOTAVAIL) => {
                    return Err(netlink_error("removing a binding address")(err));
                }
                _ => {}
            }
        }
        Ok(())
    }
}
