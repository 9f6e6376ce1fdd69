//! The enforcement maps: keys, values, reason codes and constants.
//!
//! Addresses are stored in one 16-byte form for both families: IPv4 as an
//! IPv4-mapped IPv6 address (`::ffff:a.b.c.d`), so one map and one code path
//! serve both. Prefix lengths of IPv4 prefixes are shifted by 96 accordingly.
//!
//! Policy-derived entries carry a generation bit (`gen`). The agent writes the
//! next generation beside the live one, flips [`config::STATE`] in one 8-byte
//! write, then deletes the old generation: every packet sees one whole policy.

/// Names of the maps the programs declare; userspace looks them up by these.
pub mod maps {
    /// `Array<u64>`: the state word and the clock override, see [`super::config`].
    pub const CONFIG: &str = "CONFIG";
    /// `HashMap<AddrKey, IdentityValue>`: exact (/32, /128) address → identity.
    pub const IDENTITY_HOSTS: &str = "IDENTITY_HOSTS";
    /// `LpmTrie<AddrKey, IdentityValue>`: prefix → identity, longest first.
    pub const IDENTITY_PREFIXES: &str = "IDENTITY_PREFIXES";
    /// `LpmTrie<AddrKey, DestinationClass>`: destination prefix → class.
    pub const DESTINATIONS: &str = "DESTINATIONS";
    /// `LpmTrie<PortKey, ServiceSlot>`: (class, protocol, port range) → service.
    pub const SERVICE_PORTS: &str = "SERVICE_PORTS";
    /// `HashMap<GrantKey, GrantRefs>`: (identity, service, slot) → grants.
    pub const GRANTS: &str = "GRANTS";
    /// `Array<GrantInfo>`: grant index → expiry and rate.
    pub const GRANT_INFO: &str = "GRANT_INFO";
    /// `LruHashMap<BucketKey, u64>`: (grant, identity) → rate-limit state.
    pub const RATE_BUCKETS: &str = "RATE_BUCKETS";
    /// `HashMap<u32, u32>`: revoked identity tag → flags.
    pub const REVOKED: &str = "REVOKED";
    /// `LruHashMap<FlowKey, FlowValue>`: live flows, both directions in one entry.
    pub const FLOWS: &str = "FLOWS";
    /// `LruHashMap<FragmentKey, FragmentValue>`: verdicts of first fragments.
    pub const FRAGMENTS: &str = "FRAGMENTS";
    /// `PerCpuHashMap<CounterKey, CounterValue>`: packets and bytes by
    /// (identity, service, reason).
    pub const COUNTERS: &str = "COUNTERS";
    /// `PerCpuArray<Verdict>`: the last verdict on this CPU, for replay.
    pub const LAST_VERDICT: &str = "LAST_VERDICT";
    /// Per-CPU scratch space of the programs (the parsed packet).
    pub const SCRATCH: &str = "SCRATCH";
    /// `RingBuf` of [`FlowEvent`]s: denied packets and admitted flows.
    pub const EVENTS: &str = "EVENTS";
    /// `Array<u64>`: the event rate limit's theoretical arrival time (GCRA).
    pub const EVENT_BUCKET: &str = "EVENT_BUCKET";
    /// `PerCpuArray<u64>`: events lost to the rate limit or a full ring.
    pub const EVENTS_LOST: &str = "EVENTS_LOST";
    /// `HashMap<u64, CgroupBinding>`: cgroup id → the identity bound to
    /// the processes in it.
    pub const CGROUPS: &str = "CGROUPS";
    /// `LpmTrie<[u8; 16], u64>`: agent pool prefix or bound address → the
    /// cgroup id whose sockets may send from it (0: none may). LPM prefix
    /// lengths count the 16-byte address only.
    pub const SOURCE_OWNERS: &str = "SOURCE_OWNERS";
}

/// Names of the programs in the object file.
pub mod programs {
    /// XDP on Ethernet devices.
    pub const XDP: &str = "mesh_xdp";
    /// TC (tcx or clsact) on Ethernet devices, ingress and egress.
    pub const TC: &str = "mesh_tc";
    /// TC on L3 devices without an Ethernet header (WireGuard interfaces).
    pub const TC_L3: &str = "mesh_tc_l3";
    /// Cgroup socket hooks of bound processes: `connect()` on IPv4 and IPv6
    /// sockets, and `sendmsg()` with an address on UDP sockets.
    pub const CONNECT4: &str = "mesh_connect4";
    pub const CONNECT6: &str = "mesh_connect6";
    pub const SENDMSG4: &str = "mesh_sendmsg4";
    pub const SENDMSG6: &str = "mesh_sendmsg6";
    /// Cgroup egress hook at the root of the cgroup hierarchy: packets of
    /// every socket on the host whose source is an agent pool address of
    /// another cgroup than the socket's are dropped.
    pub const SOURCE_GUARD: &str = "mesh_source_guard";
}

/// Indexes into the [`maps::CONFIG`] array.
pub mod config {
    /// `(epoch << 1) | generation`: the generation selects the live policy
    /// entries; the epoch changes with every policy swap and revocation, and
    /// flows admitted under an older epoch are revalidated.
    pub const STATE: u32 = 0;
    /// Nanoseconds on the boot clock to use instead of the real clock, or 0.
    /// Only replay and tests set it, on their own private copy of the maps.
    pub const CLOCK_OVERRIDE: u32 = 1;
    /// Nanoseconds between flow events at the sustained rate, or 0 for the
    /// default ([`super::events::DEFAULT_INTERVAL_NS`]).
    pub const EVENT_INTERVAL: u32 = 2;
    /// How far ahead of now the event bucket may run, in nanoseconds:
    /// (burst − 1) × interval; 0 for the default.
    pub const EVENT_TOLERANCE: u32 = 3;
    /// Entries in the array.
    pub const LEN: u32 = 4;

    /// The generation bit of a state word.
    #[inline(always)]
    pub const fn generation(state: u64) -> u8 {
        (state & 1) as u8
    }
}

/// Reserved identity tags.
pub mod identity {
    /// No identity: the source matched no address binding.
    pub const UNKNOWN: u32 = 0;
    /// Grant entries keyed with this tag were granted to `*`.
    pub const ANY: u32 = u32::MAX;
}

/// Reserved service ids.
pub mod service {
    /// The destination matched no service.
    pub const NONE: u32 = 0;
}

/// Protocol codes in [`PortKey`]: TCP and UDP by their IP protocol numbers,
/// and one code for ICMP and ICMPv6 echo requests, whose "port" is 0.
pub mod proto {
    pub const ICMP_ECHO: u8 = 1;
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
}

/// Why a packet got its verdict. The order of the deny reasons after
/// `Grant` is the spec's order of precedence.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Reason {
    Passthrough = 0,
    Malformed = 1,
    Flow = 2,
    Related = 3,
    Fragment = 4,
    OrphanFragment = 5,
    Grant = 6,
    Revoked = 7,
    UnknownDestination = 8,
    UnknownSource = 9,
    Expired = 10,
    RateLimited = 11,
    NoGrant = 12,
}

impl Reason {
    pub const COUNT: usize = 13;
    pub const ALL: [Reason; Self::COUNT] = [
        Reason::Passthrough,
        Reason::Malformed,
        Reason::Flow,
        Reason::Related,
        Reason::Fragment,
        Reason::OrphanFragment,
        Reason::Grant,
        Reason::Revoked,
        Reason::UnknownDestination,
        Reason::UnknownSource,
        Reason::Expired,
        Reason::RateLimited,
        Reason::NoGrant,
    ];

    pub const fn allows(self) -> bool {
        matches!(
            self,
            Reason::Passthrough | Reason::Flow | Reason::Related | Reason::Fragment | Reason::Grant
        )
    }

    /// The spec's name for the reason.
    pub const fn name(self) -> &'static str {
        match self {
            Reason::Passthrough => "passthrough",
            Reason::Malformed => "malformed",
            Reason::Flow => "flow",
            Reason::Related => "related",
            Reason::Fragment => "fragment",
            Reason::OrphanFragment => "orphan-fragment",
            Reason::Grant => "grant",
            Reason::Revoked => "revoked",
            Reason::UnknownDestination => "unknown-destination",
            Reason::UnknownSource => "unknown-source",
            Reason::Expired => "expired",
            Reason::RateLimited => "rate-limited",
            Reason::NoGrant => "no-grant",
        }
    }

    pub const fn from_u8(code: u8) -> Option<Reason> {
        if (code as usize) < Self::COUNT {
            Some(Self::ALL[code as usize])
        } else {
            None
        }
    }
}

/// Bits of the address part of an [`AddrKey`], and the prefix-length offset
/// of IPv4 prefixes inside it.
pub const ADDR_BITS: u32 = 128;
pub const IPV4_MAPPED_PREFIX: u32 = 96;
/// Bits of [`AddrKey::gen`] in front of the address.
pub const GEN_BITS: u32 = 8;

/// A generation-tagged address: the data of the LPM keys and the exact key
/// of [`maps::IDENTITY_HOSTS`]. LPM prefix lengths count `GEN_BITS` first.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AddrKey {
    pub generation: u8,
    pub addr: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<AddrKey>() == 17);

/// The identity of a source address or prefix, until `valid_until_ns` on
/// the boot clock: [`NEVER`] for the policy's own, a token's expiry for a
/// process binding's, so that the kernel ends it on time by itself.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IdentityValue {
    pub tag: u32,
    pub _pad: [u8; 4],
    pub valid_until_ns: u64,
}
const _: () = assert!(core::mem::size_of::<IdentityValue>() == 16);

impl IdentityValue {
    /// An identity that holds as long as the policy does.
    pub const fn lasting(tag: u32) -> Self {
        Self {
            tag,
            _pad: [0; 4],
            valid_until_ns: NEVER,
        }
    }
}

/// A destination prefix's class: the set of (protocol, port) → service
/// mappings that hold for addresses in it, nested prefixes resolved.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DestinationClass {
    pub class: u32,
}
const _: () = assert!(core::mem::size_of::<DestinationClass>() == 4);

/// LPM data for [`maps::SERVICE_PORTS`]: generation, class and protocol match
/// exactly; the big-endian port matches by prefix, so a port range is a few
/// aligned blocks. Prefix length = [`PORT_KEY_FIXED_BITS`] + port bits.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PortKey {
    pub generation: u8,
    pub class: [u8; 4],
    pub proto: u8,
    pub port: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<PortKey>() == 8);
pub const PORT_KEY_FIXED_BITS: u32 = 48;

/// A service and the slot of the port range within it. Slots split a
/// service's ports where grants narrow them, so a grant covers whole slots.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceSlot {
    pub service: u32,
    pub slot: u32,
}
const _: () = assert!(core::mem::size_of::<ServiceSlot>() == 8);

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct GrantKey {
    pub generation: u8,
    pub _pad: [u8; 3],
    /// A source identity tag, or [`identity::ANY`].
    pub identity: u32,
    pub service: u32,
    pub slot: u32,
}
const _: () = assert!(core::mem::size_of::<GrantKey>() == 16);

/// The most grants one (identity, service, slot) can be covered by.
pub const GRANTS_PER_KEY: usize = 4;

/// The grants covering one (identity, service, slot), in policy order;
/// indexes into [`maps::GRANT_INFO`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GrantRefs {
    pub count: u32,
    pub grants: [u32; GRANTS_PER_KEY],
}
const _: () = assert!(core::mem::size_of::<GrantRefs>() == 20);

/// A grant's limits. Expiry is on the boot clock (`bpf_ktime_get_boot_ns`);
/// the agent converts wall-clock times when it writes the entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GrantInfo {
    /// Boot-clock nanoseconds at which the grant stops, or [`NEVER`].
    pub expires_ns: u64,
    /// Nanoseconds per token of the rate limit, or 0 without a limit.
    pub interval_ns: u64,
    /// How far the bucket's theoretical arrival time may run ahead of now:
    /// `(N - 1) * interval_ns` for a bucket of N tokens.
    pub burst_ns: u64,
}
const _: () = assert!(core::mem::size_of::<GrantInfo>() == 24);
pub const NEVER: u64 = u64::MAX;

/// Key of [`maps::RATE_BUCKETS`]; the value is the bucket's theoretical
/// arrival time in boot-clock nanoseconds (GCRA).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct BucketKey {
    pub grant: u32,
    pub identity: u32,
}
const _: () = assert!(core::mem::size_of::<BucketKey>() == 8);

/// Both directions of a flow in one key: the (address, port) pair that
/// compares lower comes first. ICMP echo uses the identifier as both ports.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub addr_lo: [u8; 16],
    pub addr_hi: [u8; 16],
    pub port_lo: u16,
    pub port_hi: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<FlowKey>() == 40);

/// Flow state bits in [`FlowValue::flags`].
pub mod flow {
    /// The lower endpoint of the key opened the flow.
    pub const INITIATOR_LO: u8 = 1 << 0;
    /// A FIN was seen from the lower / higher endpoint.
    pub const FIN_LO: u8 = 1 << 1;
    pub const FIN_HI: u8 = 1 << 2;
    /// A RST was seen.
    pub const RST: u8 = 1 << 3;
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowValue {
    /// The state word under which the flow was last validated.
    pub state: u64,
    /// Boot-clock time after which the admitting grant no longer holds.
    pub valid_until_ns: u64,
    pub last_seen_ns: u64,
    pub identity: u32,
    pub service: u32,
    pub flags: u8,
    pub _pad: [u8; 7],
}
const _: () = assert!(core::mem::size_of::<FlowValue>() == 40);

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragmentKey {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub id: u32,
    pub proto: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<FragmentKey>() == 40);

/// The verdict of a datagram's first fragment, shared by the later ones.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FragmentValue {
    /// The state word the first fragment was judged under.
    pub state: u64,
    pub seen_ns: u64,
    pub identity: u32,
    pub service: u32,
}
const _: () = assert!(core::mem::size_of::<FragmentValue>() == 24);

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CounterKey {
    pub identity: u32,
    pub service: u32,
    pub reason: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<CounterKey>() == 12);

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CounterValue {
    pub packets: u64,
    pub bytes: u64,
}
const _: () = assert!(core::mem::size_of::<CounterValue>() == 16);

/// What the pipeline decided about the last packet on a CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Verdict {
    pub identity: u32,
    pub service: u32,
    pub reason: u8,
    pub _pad: [u8; 7],
}
const _: () = assert!(core::mem::size_of::<Verdict>() == 16);

/// The identity of the processes in one cgroup, bound at run time with a
/// token, and the source addresses their sockets get. Addresses in network
/// order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CgroupBinding {
    /// Boot-clock nanoseconds at which the token expires: from then on the
    /// processes open no flows.
    pub valid_until_ns: u64,
    pub tag: u32,
    /// The IPv4 source address, if `families` has [`binding::V4`].
    pub addr4: [u8; 4],
    /// The IPv6 source address, if `families` has [`binding::V6`].
    pub addr6: [u8; 16],
    pub families: u8,
    pub _pad: [u8; 7],
}
const _: () = assert!(core::mem::size_of::<CgroupBinding>() == 40);

/// Bits of [`CgroupBinding::families`].
pub mod binding {
    pub const V4: u8 = 1 << 0;
    pub const V6: u8 = 1 << 1;
}

/// One flow event: a denied packet or a newly admitted flow, as the kernel
/// saw it. Addresses in the 16-byte form; ports as on the wire, in host order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowEvent {
    /// Boot-clock nanoseconds.
    pub time_ns: u64,
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub identity: u32,
    pub service: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub reason: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<FlowEvent>() == 56);

/// Flow event limits: a token bucket in the kernel, so that a flood of
/// denied packets cannot flood userspace.
pub mod events {
    /// 10,000 events a second...
    pub const DEFAULT_INTERVAL_NS: u64 = 100_000;
    /// ...and up to 1,000 at once.
    pub const DEFAULT_TOLERANCE_NS: u64 = 999 * DEFAULT_INTERVAL_NS;
    /// Bytes of the ring buffer (a power of two).
    pub const RING_BYTES: u32 = 1 << 20;
}

/// Idle timeouts of live flows, in nanoseconds.
pub mod timeouts {
    const SECOND: u64 = 1_000_000_000;
    pub const TCP_ESTABLISHED_NS: u64 = 3600 * SECOND;
    /// After a RST, or once both sides sent a FIN.
    pub const TCP_CLOSING_NS: u64 = 10 * SECOND;
    pub const UDP_NS: u64 = 60 * SECOND;
    pub const ICMP_NS: u64 = 30 * SECOND;
    /// First-fragment verdicts, as the kernel's reassembly timeout.
    pub const FRAGMENT_NS: u64 = 30 * SECOND;
}

/// Default capacities; the agent may override each at load time.
pub mod capacity {
    pub const IDENTITY_HOSTS: u32 = 2 * 131_072;
    pub const IDENTITY_PREFIXES: u32 = 2 * 16_384;
    pub const DESTINATIONS: u32 = 2 * 16_384;
    pub const SERVICE_PORTS: u32 = 2 * 65_536;
    pub const GRANTS: u32 = 2 * 262_144;
    /// Per generation; the array holds two halves.
    pub const GRANT_INFO_PER_GENERATION: u32 = 131_072;
    pub const RATE_BUCKETS: u32 = 65_536;
    pub const REVOKED: u32 = 16_384;
    pub const FLOWS: u32 = 262_144;
    pub const FRAGMENTS: u32 = 8_192;
    pub const COUNTERS: u32 = 16_384;
    pub const CGROUPS: u32 = 4_096;
    /// Two addresses per binding, and the pools.
    pub const SOURCE_OWNERS: u32 = 2 * CGROUPS + 256;
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all of these are #[repr(C)] plain old data whose padding is
    // spelled out as fields, so every byte is initialised.
    unsafe impl aya::Pod for AddrKey {}
    unsafe impl aya::Pod for IdentityValue {}
    unsafe impl aya::Pod for DestinationClass {}
    unsafe impl aya::Pod for PortKey {}
    unsafe impl aya::Pod for ServiceSlot {}
    unsafe impl aya::Pod for GrantKey {}
    unsafe impl aya::Pod for GrantRefs {}
    unsafe impl aya::Pod for GrantInfo {}
    unsafe impl aya::Pod for BucketKey {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for FlowValue {}
    unsafe impl aya::Pod for FragmentKey {}
    unsafe impl aya::Pod for FragmentValue {}
    unsafe impl aya::Pod for CounterKey {}
    unsafe impl aya::Pod for CounterValue {}
    unsafe impl aya::Pod for Verdict {}
    unsafe impl aya::Pod for FlowEvent {}
    unsafe impl aya::Pod for CgroupBinding {}
}
