//! What traffic leaves in the maps: counters, and the flow, fragment and
//! rate-limit state that a fresh start forgets.

use std::collections::BTreeMap;

use aya::maps::{HashMap, MapData, MapError, PerCpuHashMap};
use mesh_common::{
    BucketKey, CounterKey, CounterValue, FlowKey, FlowValue, FragmentKey, FragmentValue, Reason,
    maps,
};

use super::{Datapath, DatapathError, map_error};

/// Packets and bytes by (identity tag, service id, reason), summed over CPUs.
pub type Counters = BTreeMap<(u32, u32, Reason), (u64, u64)>;

impl Datapath {
    /// The per-CPU counters, summed.
    pub fn counters(&self) -> Result<Counters, DatapathError> {
        let map = self
            .ebpf
            .map(maps::COUNTERS)
            .ok_or(DatapathError::MissingMap(maps::COUNTERS))?;
        sum_counters(PerCpuHashMap::try_from(map).map_err(map_error(maps::COUNTERS))?)
    }

    /// Forgets flows, first-fragment verdicts, rate-limit buckets and
    /// counters, as if no packet had been seen. The policy stays.
    pub fn forget_traffic(&mut self) -> Result<(), DatapathError> {
        clear::<FlowKey, FlowValue>(self.map_data(maps::FLOWS)?, maps::FLOWS)?;
        clear::<FragmentKey, FragmentValue>(self.map_data(maps::FRAGMENTS)?, maps::FRAGMENTS)?;
        clear::<BucketKey, u64>(self.map_data(maps::RATE_BUCKETS)?, maps::RATE_BUCKETS)?;
        let map = self.map_data(maps::COUNTERS)?;
        let mut counters: PerCpuHashMap<_, CounterKey, CounterValue> =
            PerCpuHashMap::try_from(map).map_err(map_error(maps::COUNTERS))?;
        let keys: Vec<CounterKey> = counters.keys().filter_map(Result::ok).collect();
        for key in keys {
            ignore_missing(counters.remove(&key)).map_err(map_error(maps::COUNTERS))?;
        }
        Ok(())
    }

    fn map_data(&mut self, name: &'static str) -> Result<&mut aya::maps::Map, DatapathError> {
        self.ebpf
            .map_mut(name)
            .ok_or(DatapathError::MissingMap(name))
    }
}

/// Sums a counters map over the CPUs.
pub(super) fn sum_counters<T: std::borrow::Borrow<MapData>>(
    counters: PerCpuHashMap<T, CounterKey, CounterValue>,
) -> Result<Counters, DatapathError> {
    let mut sums = Counters::new();
    for entry in counters.iter() {
        let (key, values) = entry.map_err(map_error(maps::COUNTERS))?;
        let Some(reason) = Reason::from_u8(key.reason) else {
            continue;
        };
        let sum = sums.entry((key.identity, key.service, reason)).or_default();
        for value in values.iter() {
            sum.0 += value.packets;
            sum.1 += value.bytes;
        }
    }
    Ok(sums)
}

fn clear<K: aya::Pod, V: aya::Pod>(
    map: &mut aya::maps::Map,
    name: &'static str,
) -> Result<(), DatapathError> {
    remove_where::<K, V>(
        HashMap::try_from(map).map_err(map_error(name))?,
        name,
        |_| true,
    )
}

/// Removes the entries of a hash map whose keys are `doomed`.
pub(super) fn remove_where<K: aya::Pod, V: aya::Pod>(
    mut map: HashMap<&mut MapData, K, V>,
    name: &'static str,
    doomed: impl Fn(&K) -> bool,
) -> Result<(), DatapathError> {
    let keys: Vec<K> = map
        .keys()
        .filter_map(Result::ok)
        .filter(|k| doomed(k))
        .collect();
    for key in keys {
        ignore_missing(map.remove(&key)).map_err(map_error(name))?;
    }
    Ok(())
}

/// An entry may vanish between listing and removal (LRU eviction, the
/// programs): that is what removal wanted anyway.
pub(super) fn ignore_missing(result: Result<(), MapError>) -> Result<(), MapError> {
    match result {
        Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(call)) if call.io_error.raw_os_error() == Some(libc::ENOENT) => {
            Ok(())
        }
        other => other,
    }
}
