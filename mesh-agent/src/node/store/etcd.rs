//! The etcd v3 store: each node's record under `PREFIX/nodes/NAME`, put on
//! a lease the node keeps alive, so that the record of a node that dies
//! ages out with the lease, and its bindings under `PREFIX/bindings/NAME`
//! on the same lease; its revocations under `PREFIX/revocations/NAME`, on
//! no lease. Changes come through an etcd watch of `PREFIX/`.
//!
//! The store keeps a client per member and fails over itself: a request
//! that fails is tried on the next member, so losing a member of the
//! cluster loses nothing while a quorum stays. (The etcd client's own
//! balancing over all endpoints fails a request whenever it picks a member
//! that is down.) Every request has a deadline: a store that does not
//! answer is a store that cannot be read, and changes nothing.

use std::{future::Future, io, time::Duration};

use etcd_client::{
    Client, ConnectOptions, GetOptions, LeaseKeepAliveStream, LeaseKeeper, PutOptions, WatchOptions,
};
use futures_util::StreamExt as _;

use super::{Entry, MAX_ENTRIES, NodeName, Section, StoreError, StoreWatch};

/// How long a record outlives its node: the lease's time to live. It is
/// kept alive every few seconds (the mesh's recheck), well within it.
pub const LEASE_TTL: Duration = Duration::from_secs(15);

/// The largest answer to a read of a section: a thousand nodes' full
/// binding sets (the client's default, 4 MiB, holds some 60).
const MAX_RESPONSE_LEN: usize = 64 * 1024 * 1024;

/// Longest an etcd request may take, connecting included.
const DEADLINE: Duration = Duration::from_secs(3);

pub struct EtcdStore {
    /// One client per member, each talking to that member alone.
    clients: Vec<Client>,
    /// The member requests go to first.
    current: usize,
    /// `PREFIX/`.
    prefix: String,
    /// For messages: the store as `--store` named it.
    name: String,
    lease: Option<Lease>,
}

/// This node's lease, and the stream that keeps it alive.
struct Lease {
    id: i64,
    keeper: LeaseKeeper,
    responses: LeaseKeepAliveStream,
}

impl EtcdStore {
    pub async fn connect(endpoints: &[String], prefix: &str) -> Result<Self, StoreError> {
        let name = format!("etcd://{}/{prefix}", endpoints.join(","));
        let options = ConnectOptions::new()
            .with_connect_timeout(DEADLINE)
            .with_timeout(DEADLINE)
            // A member that went away is noticed by its silence.
            .with_keep_alive(Duration::from_secs(2), DEADLINE)
            .with_keep_alive_while_idle(true);
        let mut clients = Vec::new();
        for endpoint in endpoints {
            // Connects at the first request: a member that is down now
            // does not stop the start.
            let client = Client::connect([format!("http://{endpoint}")], Some(options.clone()))
                .await
                .map_err(|source| StoreError::Etcd {
                    what: "connect",
                    store: name.clone(),
                    source,
                })?;
            clients.push(client);
        }
        Ok(Self {
            clients,
            current: 0,
            prefix: format!("{prefix}/"),
            name,
            lease: None,
        })
    }

    /// Puts the entry; a node record or bindings on this node's lease,
    /// granting one first if there is none (the first time, or after the
    /// last one expired).
    pub async fn publish(
        &mut self,
        section: Section,
        name: &NodeName,
        bytes: &[u8],
    ) -> Result<(), StoreError> {
        let options = match section {
            Section::Nodes | Section::Bindings => PutOptions::new().with_lease(match &self.lease {
                Some(lease) => lease.id,
                None => self.grant().await?,
            }),
            Section::Revocations | Section::RevokedNodes => PutOptions::new(),
        };
        let key = self.key(section, name.as_str());
        let put = self
            .failover("write the record", |mut client| {
                let (key, options) = (key.clone(), options.clone());
                async move { client.put(key, bytes, Some(options)).await }
            })
            .await;
        if put.is_err() {
            // Perhaps the lease is gone: the next publish takes a new one.
            self.lease = None;
        }
        put.map(drop)
    }

    /// Every entry of `section`.
    pub async fn read(&mut self, section: Section) -> Result<Vec<Entry>, StoreError> {
        let limit = i64::try_from(MAX_ENTRIES).expect("a small number");
        let prefix = self.key(section, "");
        let response = self
            .failover("read the records", |client| {
                let prefix = prefix.clone();
                async move {
                    client
                        .kv_client()
                        .max_decoding_message_size(MAX_RESPONSE_LEN)
                        .get(
                            prefix.as_bytes(),
                            Some(GetOptions::new().with_prefix().with_limit(limit)),
                        )
                        .await
                }
            })
            .await?;
        if response.more() {
            return Err(StoreError::TooMany {
                store: self.name.clone(),
                limit: MAX_ENTRIES,
            });
        }
        let mut entries: Vec<Entry> = response
            .kvs()
            .iter()
            .map(|kv| Entry {
                name: String::from_utf8_lossy(&kv.key()[prefix.len()..]).into_owned(),
                // Too long for the section: rejected, not skipped unseen.
                bytes: kv.value()[..kv.value().len().min(section.max_len() + 1)].to_vec(),
            })
            .collect();
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(entries)
    }

    /// Watches the prefix. A watch the server cancels (its revision was
    /// compacted, say) ends with an error, and is set up again by the
    /// caller.
    pub async fn watch(&mut self) -> Result<StoreWatch, StoreError> {
        let prefix = self.prefix.clone();
        let stream = self
            .failover("watch the records", |mut client| {
                let prefix = prefix.clone();
                async move {
                    client
                        .watch(prefix.as_bytes(), Some(WatchOptions::new().with_prefix()))
                        .await
                }
            })
            .await?;
        Ok(StoreWatch::new(
            stream
                .map(|response| match response {
                    Ok(response) if response.canceled() => Err(io::Error::other(format!(
                        "etcd cancelled the watch: {}",
                        response.cancel_reason()
                    ))),
                    Ok(_) => Ok(()),
                    Err(err) => Err(io::Error::other(err)),
                })
                .boxed(),
        ))
    }

    /// Renews the lease. One that cannot be renewed is dropped: the record
    /// on it ages out, and the next sync publishes it again on a new one.
    pub async fn keep_alive(&mut self) -> Result<(), StoreError> {
        let Some(lease) = &mut self.lease else {
            return Ok(());
        };
        let renewed = async {
            lease.keeper.keep_alive().await?;
            lease.responses.message().await
        };
        let failure = match tokio::time::timeout(DEADLINE, renewed).await {
            Ok(Ok(Some(response))) if response.ttl() > 0 => return Ok(()),
            Ok(Ok(_)) => StoreError::Lease {
                what: "the lease expired; publishing again",
                store: self.name.clone(),
            },
            Ok(Err(source)) => self.error("renew the lease", source),
            Err(_) => StoreError::Lease {
                what: "no answer renewing the lease",
                store: self.name.clone(),
            },
        };
        self.lease = None;
        Err(failure)
    }

    async fn grant(&mut self) -> Result<i64, StoreError> {
        let ttl = i64::try_from(LEASE_TTL.as_secs()).expect("a small number");
        // Granted and kept alive through the same member.
        let (id, (keeper, responses)) = self
            .failover("grant a lease", |mut client| async move {
                let id = client.lease_grant(ttl, None).await?.id();
                Ok((id, client.lease_keep_alive(id).await?))
            })
            .await?;
        self.lease = Some(Lease {
            id,
            keeper,
            responses,
        });
        Ok(id)
    }

    /// `request` through the current member's client, and through each
    /// other member's in turn while it fails; the member that answered is
    /// the current one from then on.
    async fn failover<T, F, R>(&mut self, what: &'static str, request: F) -> Result<T, StoreError>
    where
        F: Fn(Client) -> R,
        R: Future<Output = Result<T, etcd_client::Error>>,
    {
        let mut failure = None;
        for _ in 0..self.clients.len() {
            match request(self.clients[self.current].clone()).await {
                Ok(answer) => return Ok(answer),
                Err(source) => {
                    failure = Some(source);
                    self.current = (self.current + 1) % self.clients.len();
                }
            }
        }
        Err(self.error(what, failure.expect("a store has at least one member")))
    }

    /// `PREFIX/SECTION/NAME`.
    fn key(&self, section: Section, name: &str) -> String {
        format!("{}{}/{name}", self.prefix, section.name())
    }

    fn error(&self, what: &'static str, source: etcd_client::Error) -> StoreError {
        StoreError::Etcd {
            what,
            store: self.name.clone(),
            source,
        }
    }
}
