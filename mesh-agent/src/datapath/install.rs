//! Installing a policy: write the next generation beside the live one, flip
//! the state word in one write, then remove the old generation. A failure
//! before the flip removes what was written and leaves the live policy alone.

use std::{borrow::BorrowMut, io, time::SystemTime};

use aya::maps::{
    Array, HashMap, IterableMap, MapData, MapError,
    lpm_trie::{Key, LpmTrie},
};
use mesh_common::{
    AddrKey, BucketKey, DestinationClass, GEN_BITS, GrantInfo, GrantKey, GrantRefs, IdentityValue,
    PORT_KEY_FIXED_BITS, PortKey, ServiceSlot, config, maps,
};
use nix::time::{ClockId, clock_gettime};

use super::{
    Clock, Datapath, DatapathError, PolicyEntries, map_error,
    traffic::{ignore_missing, remove_where},
};

impl Clock {
    /// Now, on both clocks.
    pub fn now() -> Result<Self, DatapathError> {
        let boot = clock_gettime(ClockId::CLOCK_BOOTTIME)
            .map_err(|errno| DatapathError::Clock(io::Error::from(errno)))?;
        Ok(Self {
            wall: SystemTime::now(),
            boot_ns: boot.tv_sec() as u64 * 1_000_000_000 + boot.tv_nsec() as u64,
        })
    }
}

impl Datapath {
    /// Replaces the live policy with `entries`, atomically from a packet's
    /// point of view. On error the live policy is untouched.
    pub fn install(&mut self, entries: &PolicyEntries, clock: &Clock) -> Result<(), DatapathError> {
        let state = self.state()?;
        let live = config::generation(state);
        let next = live ^ 1;
        // Leftovers of an earlier attempt that failed half-way.
        self.remove_generation(next)?;
        if let Err(err) = self.write_generation(next, entries, clock) {
            self.remove_generation(next)?;
            return Err(err);
        }
        let epoch = state >> 1;
        self.set_config(config::STATE, ((epoch + 1) << 1) | u64::from(next))?;
        // A packet that read the old state word may still be looking up old
        // entries: wait until every such program run has finished.
        super::sys::rcu_grace_period();
        self.remove_generation(live)
    }

    fn write_generation(
        &mut self,
        generation: u8,
        entries: &PolicyEntries,
        clock: &Clock,
    ) -> Result<(), DatapathError> {
        let addr_key = |prefix: &super::Prefix| AddrKey {
            generation,
            addr: prefix.addr.octets(),
        };
        {
            let mut hosts: HashMap<_, AddrKey, IdentityValue> = self.map(maps::IDENTITY_HOSTS)?;
            for (prefix, tag) in entries.identities.iter().filter(|(p, _)| p.is_host()) {
                insert(
                    maps::IDENTITY_HOSTS,
                    &mut hosts,
                    addr_key(prefix),
                    IdentityValue::lasting(*tag),
                )?;
            }
            for bound in &entries.bound {
                insert(
                    maps::IDENTITY_HOSTS,
                    &mut hosts,
                    addr_key(&super::Prefix::host(bound.addr)),
                    bound.to_kernel(clock),
                )?;
            }
        }
        {
            let mut prefixes: LpmTrie<_, AddrKey, IdentityValue> =
                self.map(maps::IDENTITY_PREFIXES)?;
            for (prefix, tag) in entries.identities.iter().filter(|(p, _)| !p.is_host()) {
                let key = Key::new(GEN_BITS + u32::from(prefix.len), addr_key(prefix));
                insert_lpm(
                    maps::IDENTITY_PREFIXES,
                    &mut prefixes,
                    &key,
                    IdentityValue::lasting(*tag),
                )?;
            }
        }
        {
            let mut destinations: LpmTrie<_, AddrKey, DestinationClass> =
                self.map(maps::DESTINATIONS)?;
            for (prefix, class) in &entries.destinations {
                let key = Key::new(GEN_BITS + u32::from(prefix.len), addr_key(prefix));
                insert_lpm(
                    maps::DESTINATIONS,
                    &mut destinations,
                    &key,
                    DestinationClass { class: *class },
                )?;
            }
        }
        {
            let mut ports: LpmTrie<_, PortKey, ServiceSlot> = self.map(maps::SERVICE_PORTS)?;
            for (class, block, service, slot) in &entries.service_ports {
                let data = PortKey {
                    generation,
                    class: class.to_be_bytes(),
                    proto: block.proto,
                    port: block.port.to_be_bytes(),
                };
                let key = Key::new(PORT_KEY_FIXED_BITS + u32::from(block.bits), data);
                let value = ServiceSlot {
                    service: *service,
                    slot: *slot,
                };
                insert_lpm(maps::SERVICE_PORTS, &mut ports, &key, value)?;
            }
        }
        let base = self.grant_base(generation);
        let per_generation = self.sizes.grants_per_generation();
        {
            let mut info: Array<_, GrantInfo> = self.map(maps::GRANT_INFO)?;
            if entries.grant_limits.len() > per_generation as usize {
                return Err(DatapathError::MapFull {
                    name: maps::GRANT_INFO,
                    capacity: per_generation,
                });
            }
            for (index, limits) in entries.grant_limits.iter().enumerate() {
                info.set(base + index as u32, limits.to_kernel(clock), 0)
                    .map_err(map_error(maps::GRANT_INFO))?;
            }
        }
        let mut grants: HashMap<_, GrantKey, GrantRefs> = self.map(maps::GRANTS)?;
        for ((identity, service, slot), indexes) in &entries.grants {
            let mut refs = GrantRefs::default();
            for (i, index) in indexes.iter().enumerate().take(refs.grants.len()) {
                refs.grants[i] = base + index;
            }
            refs.count = indexes.len().min(refs.grants.len()) as u32;
            let key = GrantKey {
                generation,
                _pad: [0; 3],
                identity: *identity,
                service: *service,
                slot: *slot,
            };
            insert(maps::GRANTS, &mut grants, key, refs)?;
        }
        Ok(())
    }

    /// Deletes every entry of `generation`, and the rate buckets of its
    /// grant indexes (which the next policy in that generation reuses).
    fn remove_generation(&mut self, generation: u8) -> Result<(), DatapathError> {
        remove_where::<AddrKey, IdentityValue>(
            self.map(maps::IDENTITY_HOSTS)?,
            maps::IDENTITY_HOSTS,
            |k| k.generation == generation,
        )?;
        remove_lpm_where::<AddrKey, IdentityValue>(
            self.map(maps::IDENTITY_PREFIXES)?,
            maps::IDENTITY_PREFIXES,
            |k| k.generation == generation,
        )?;
        remove_lpm_where::<AddrKey, DestinationClass>(
            self.map(maps::DESTINATIONS)?,
            maps::DESTINATIONS,
            |k| k.generation == generation,
        )?;
        remove_lpm_where::<PortKey, ServiceSlot>(
            self.map(maps::SERVICE_PORTS)?,
            maps::SERVICE_PORTS,
            |k| k.generation == generation,
        )?;
        remove_where::<GrantKey, GrantRefs>(self.map(maps::GRANTS)?, maps::GRANTS, |k| {
            k.generation == generation
        })?;
        let base = self.grant_base(generation);
        let range = base..base + self.sizes.grants_per_generation();
        let buckets: HashMap<_, BucketKey, u64> = self.map(maps::RATE_BUCKETS)?;
        let stale: Vec<BucketKey> = buckets
            .keys()
            .filter_map(Result::ok)
            .filter(|k| range.contains(&k.grant))
            .collect();
        let mut buckets = buckets;
        for key in stale {
            ignore_missing(buckets.remove(&key)).map_err(map_error(maps::RATE_BUCKETS))?;
        }
        Ok(())
    }

    /// First GRANT_INFO index of a generation's half.
    fn grant_base(&self, generation: u8) -> u32 {
        u32::from(generation) * self.sizes.grants_per_generation()
    }

    pub(super) fn map<'a, M>(&'a mut self, name: &'static str) -> Result<M, DatapathError>
    where
        M: TryFrom<&'a mut aya::maps::Map, Error = MapError>,
    {
        let map = self
            .ebpf
            .map_mut(name)
            .ok_or(DatapathError::MissingMap(name))?;
        M::try_from(map).map_err(map_error(name))
    }
}

pub(super) fn insert<K: aya::Pod, V: aya::Pod, T: BorrowMut<MapData>>(
    name: &'static str,
    map: &mut HashMap<T, K, V>,
    key: K,
    value: V,
) -> Result<(), DatapathError> {
    map.insert(key, value, 0)
        .map_err(|err| full_or(name, map_capacity(map.map()), err))
}

pub(super) fn insert_lpm<K: aya::Pod, V: aya::Pod, T: BorrowMut<MapData>>(
    name: &'static str,
    map: &mut LpmTrie<T, K, V>,
    key: &Key<K>,
    value: V,
) -> Result<(), DatapathError> {
    map.insert(key, value, 0)
        .map_err(|err| full_or(name, map_capacity(map.map()), err))
}

fn map_capacity(map: &MapData) -> u32 {
    map.info().map(|info| info.max_entries()).unwrap_or(0)
}

/// A full map is its own error: the policy does not fit.
fn full_or(name: &'static str, capacity: u32, err: MapError) -> DatapathError {
    match &err {
        MapError::SyscallError(call)
            if matches!(
                call.io_error.raw_os_error(),
                Some(libc::E2BIG | libc::ENOSPC)
            ) =>
        {
            DatapathError::MapFull { name, capacity }
        }
        _ => DatapathError::Map { name, source: err },
    }
}

fn remove_lpm_where<K: aya::Pod, V: aya::Pod>(
    mut map: LpmTrie<&mut MapData, K, V>,
    name: &'static str,
    doomed: impl Fn(&K) -> bool,
) -> Result<(), DatapathError> {
    let keys: Vec<Key<K>> = map
        .keys()
        .filter_map(Result::ok)
        .filter(|k| doomed(&k.data()))
        .collect();
    for key in keys {
        ignore_missing(map.remove(&key)).map_err(map_error(name))?;
    }
    Ok(())
}
