//! The maps, sized with defaults the agent overrides at load time.

use crate::parse::Packet;
use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, PerCpuHashMap, RingBuf},
};
use mesh_common::{
    AddrKey, BucketKey, CgroupBinding, CounterKey, CounterValue, DestinationClass, FlowKey,
    FlowValue, FragmentKey, FragmentValue, GrantInfo, GrantKey, GrantRefs, IdentityValue, PortKey,
    ServiceSlot, Verdict, capacity, config, events,
};

#[map]
pub static CONFIG: Array<u64> = Array::with_max_entries(config::LEN, 0);

#[map]
pub static IDENTITY_HOSTS: HashMap<AddrKey, IdentityValue> =
    HashMap::with_max_entries(capacity::IDENTITY_HOSTS, 0);

#[map]
pub static IDENTITY_PREFIXES: LpmTrie<AddrKey, IdentityValue> =
    LpmTrie::with_max_entries(capacity::IDENTITY_PREFIXES, 0);

#[map]
pub static DESTINATIONS: LpmTrie<AddrKey, DestinationClass> =
    LpmTrie::with_max_entries(capacity::DESTINATIONS, 0);

#[map]
pub static SERVICE_PORTS: LpmTrie<PortKey, ServiceSlot> =
    LpmTrie::with_max_entries(capacity::SERVICE_PORTS, 0);

#[map]
pub static GRANTS: HashMap<GrantKey, GrantRefs> = HashMap::with_max_entries(capacity::GRANTS, 0);

#[map]
pub static GRANT_INFO: Array<GrantInfo> =
    Array::with_max_entries(2 * capacity::GRANT_INFO_PER_GENERATION, 0);

#[map]
pub static RATE_BUCKETS: LruHashMap<BucketKey, u64> =
    LruHashMap::with_max_entries(capacity::RATE_BUCKETS, 0);

#[map]
pub static REVOKED: HashMap<u32, u32> = HashMap::with_max_entries(capacity::REVOKED, 0);

#[map]
pub static FLOWS: LruHashMap<FlowKey, FlowValue> = LruHashMap::with_max_entries(capacity::FLOWS, 0);

#[map]
pub static FRAGMENTS: LruHashMap<FragmentKey, FragmentValue> =
    LruHashMap::with_max_entries(capacity::FRAGMENTS, 0);

#[map]
pub static COUNTERS: PerCpuHashMap<CounterKey, CounterValue> =
    PerCpuHashMap::with_max_entries(capacity::COUNTERS, 0);

#[map]
pub static LAST_VERDICT: PerCpuArray<Verdict> = PerCpuArray::with_max_entries(1, 0);

/// Per-CPU scratch space for the parsed packet (internal to the programs).
#[map]
pub static SCRATCH: PerCpuArray<Packet> = PerCpuArray::with_max_entries(1, 0);

#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(events::RING_BYTES, 0);

#[map]
pub static EVENT_BUCKET: Array<u64> = Array::with_max_entries(1, 0);

#[map]
pub static EVENTS_LOST: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

#[map]
pub static CGROUPS: HashMap<u64, CgroupBinding> = HashMap::with_max_entries(capacity::CGROUPS, 0);

#[map]
pub static SOURCE_OWNERS: LpmTrie<[u8; 16], u64> =
    LpmTrie::with_max_entries(capacity::SOURCE_OWNERS, 0);
