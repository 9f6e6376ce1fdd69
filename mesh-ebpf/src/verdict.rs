//! The verdict pipeline of docs/datapath.md, shared by every entry point.

use aya_ebpf::{helpers::bpf_ktime_get_boot_ns, maps::lpm_trie::Key};
use mesh_common::{
    ADDR_BITS, AddrKey, BucketKey, CounterKey, CounterValue, FlowEvent, FlowKey, FlowValue,
    FragmentKey, FragmentValue, GEN_BITS, GRANTS_PER_KEY, GrantInfo, GrantKey, IdentityValue,
    PORT_KEY_FIXED_BITS, PortKey, Reason, Verdict, config, events, flow, identity, proto, service,
    timeouts,
};

use crate::{
    frame::Frame,
    maps::*,
    parse::{IPPROTO_TCP, IPPROTO_UDP, Kind, Packet, Parsed, Tuple, parse, quoted},
};

const TCP_FIN: u8 = 0x01;
const TCP_RST: u8 = 0x04;

pub struct Outcome {
    pub reason: Reason,
    pub identity: u32,
    pub service: u32,
}

/// What the grant check decided, and until when an admitted flow may live.
struct Decision {
    reason: Reason,
    valid_until_ns: u64,
}

impl Decision {
    const DENIED: Decision = Decision {
        reason: Reason::NoGrant,
        valid_until_ns: 0,
    };
}

/// The policy-relevant view of one direction of a flow.
struct Direction<'a> {
    src: &'a [u8; 16],
    dst: &'a [u8; 16],
    /// A [`proto`] code, or 0 where no service can match.
    service_proto: u8,
    dport: u16,
}

/// Judges one frame and accounts for it; returns whether to let it pass.
#[inline(always)]
pub fn run<F: Frame>(frame: &F, l2: bool) -> bool {
    let outcome = judge(frame, l2);
    account(&outcome, frame.len());
    if outcome.reason == Reason::Grant || !outcome.reason.allows() {
        report(&outcome);
    }
    outcome.reason.allows()
}

/// A flow event for a denied packet or a new flow, within the event rate
/// limit; otherwise, or if the ring is full, the loss is counted.
#[inline(never)]
fn report(outcome: &Outcome) {
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_boot_ns() };
    if !take_event_token(now) {
        count_lost_event();
        return;
    }
    // The packet first: a reserved entry must be submitted or discarded on
    // every path, which the verifier checks.
    let Some(packet) = SCRATCH.get_ptr(0) else {
        count_lost_event();
        return;
    };
    let Some(mut entry) = EVENTS.reserve::<FlowEvent>(0) else {
        count_lost_event();
        return;
    };
    // SAFETY: this CPU's own scratch slot, filled by this packet's parse.
    let packet = unsafe { &*packet };
    entry.write(FlowEvent {
        time_ns: now,
        src: packet.src,
        dst: packet.dst,
        identity: outcome.identity,
        service: outcome.service,
        sport: packet.sport,
        dport: packet.dport,
        proto: packet.proto,
        reason: outcome.reason as u8,
        _pad: [0; 2],
    });
    entry.submit(0);
}

/// GCRA over all CPUs (unlocked: a race lets an event or two more through).
#[inline(always)]
fn take_event_token(now: u64) -> bool {
    let setting = |index, default| match config_word(index) {
        0 => default,
        value => value,
    };
    let interval = setting(config::EVENT_INTERVAL, events::DEFAULT_INTERVAL_NS);
    let tolerance = setting(config::EVENT_TOLERANCE, events::DEFAULT_TOLERANCE_NS);
    let Some(tat) = EVENT_BUCKET.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: a map value; concurrent writers only skew the limit.
    let tat = unsafe { &mut *tat };
    if *tat > now.saturating_add(tolerance) {
        return false;
    }
    *tat = if *tat > now { *tat } else { now } + interval;
    true
}

#[inline(always)]
fn count_lost_event() {
    if let Some(lost) = EVENTS_LOST.get_ptr_mut(0) {
        // SAFETY: this CPU's own slot.
        unsafe { *lost += 1 };
    }
}

#[inline(always)]
fn judge<F: Frame>(frame: &F, l2: bool) -> Outcome {
    // The parsed packet lives in a per-CPU scratch slot, not on the 512-byte
    // stack that the later steps need.
    let Some(packet) = SCRATCH.get_ptr_mut(0) else {
        return unattributed(Reason::Malformed);
    };
    // SAFETY: this CPU's own slot; programs do not nest on one CPU.
    let packet = unsafe { &mut *packet };
    *packet = Packet::EMPTY;
    match parse(frame, l2, packet) {
        Parsed::Passthrough => return unattributed(Reason::Passthrough),
        Parsed::Malformed => return unattributed(Reason::Malformed),
        Parsed::Ip => {}
    }
    let state = config_word(config::STATE);
    let now = now();
    // The steps below are BPF functions of their own, which may only return
    // scalars: each fills `outcome`.
    let mut outcome = unattributed(Reason::Malformed);
    match packet.kind {
        Kind::LaterFragment => later_fragment(packet, state, now, &mut outcome),
        Kind::IcmpError => related(frame, packet, state, now, &mut outcome),
        _ => flow_or_new(packet, state, now, &mut outcome),
    }
    if packet.first_fragment && outcome.reason.allows() {
        remember_first_fragment(packet, &outcome, state, now);
    }
    outcome
}

#[inline(always)]
fn unattributed(reason: Reason) -> Outcome {
    Outcome {
        reason,
        identity: identity::UNKNOWN,
        service: service::NONE,
    }
}

#[inline(always)]
fn config_word(index: u32) -> u64 {
    CONFIG.get(index).copied().unwrap_or(0)
}

/// The boot clock, or the fixed instant replay and the tests set.
#[inline(always)]
pub fn now() -> u64 {
    match config_word(config::CLOCK_OVERRIDE) {
        // SAFETY: a helper without arguments.
        0 => unsafe { bpf_ktime_get_boot_ns() },
        fixed => fixed,
    }
}

/// Whether a grant lets the bound identity `source` open a flow to
/// (`dst`, `service_proto`, `dport`), judged as the flow's first packet
/// will be — except that no rate token is taken: that packet takes it.
/// For the socket hooks of bound processes.
#[inline(never)]
pub fn socket_granted(source: u32, dst: &[u8; 16], service_proto: u8, dport: u16) -> bool {
    let state = config_word(config::STATE);
    let generation = config::generation(state);
    let (service, slot) = service_of(generation, dst, service_proto, dport);
    let mut decision = Decision::DENIED;
    let query = Query {
        now: now(),
        source,
        service,
        slot,
        generation,
        new_flow: false,
    };
    decide(&query, &mut decision);
    decision.reason == Reason::Grant
}

/// Not inlined, like the other steps: each gets its own stack frame.
#[inline(never)]
fn flow_or_new(packet: &Packet, state: u64, now: u64, outcome: &mut Outcome) {
    let key = flow_key(
        &packet.src,
        packet.sport,
        &packet.dst,
        packet.dport,
        packet.proto,
    );
    let tcp_flags = if packet.proto == IPPROTO_TCP {
        tcp_flow_flags(packet, &key)
    } else {
        0
    };
    // Only TCP, UDP and ICMP echo have flows.
    if packet.kind != Kind::Other {
        let owner = live_flow(&key, state, now, tcp_flags);
        if owner != 0 {
            *outcome = flow_outcome(Reason::Flow, owner);
            return;
        }
    }
    new_flow(packet, &key, state, now, outcome);
}

/// Judges a packet that starts a flow, and records the flow if admitted.
/// Separate from `flow_or_new` so that its stack frame is not also on the
/// path through `live_flow`.
#[inline(never)]
fn new_flow(packet: &Packet, key: &FlowKey, state: u64, now: u64, outcome: &mut Outcome) {
    let service_proto = service_proto(packet);
    let tuple = Direction {
        src: &packet.src,
        dst: &packet.dst,
        service_proto,
        // An echo request's identifier plays the port of its flow, but
        // services offer `icmp` as port 0.
        dport: if service_proto == proto::ICMP_ECHO {
            0
        } else {
            packet.dport
        },
    };
    let generation = config::generation(state);
    let (identity, service, slot) = classify(generation, &tuple, now);
    let mut decision = Decision::DENIED;
    let query = Query {
        now,
        source: identity,
        service,
        slot,
        generation,
        new_flow: true,
    };
    decide(&query, &mut decision);
    if decision.reason == Reason::Grant {
        record_flow(packet, key, state, &query, &decision);
    }
    *outcome = Outcome {
        reason: decision.reason,
        identity,
        service,
    };
}

/// Records an admitted new flow. Separate from `new_flow` so that the flow
/// value is not on the stack beneath `decide`, the deepest call chain.
#[inline(never)]
fn record_flow(packet: &Packet, key: &FlowKey, state: u64, query: &Query, decision: &Decision) {
    let initiator = if packet.src == key.addr_lo && packet.sport == key.port_lo {
        flow::INITIATOR_LO
    } else {
        0
    };
    let source_until = identity_valid_until(query.generation, &packet.src);
    let value = FlowValue {
        state,
        valid_until_ns: decision.valid_until_ns.min(source_until),
        last_seen_ns: query.now,
        identity: query.source,
        service: query.service,
        flags: initiator | tcp_flow_flags(packet, key),
        _pad: [0; 7],
    };
    // A failed insert only costs the flow its replies: never a hole.
    let _ = FLOWS.insert(key, &value, 0);
}

/// A flow's owner packed into one scalar, as BPF functions return them:
/// `identity << 32 | service`. Services of flows are never `service::NONE`,
/// so 0 means "no live flow".
#[inline(always)]
fn flow_outcome(reason: Reason, owner: u64) -> Outcome {
    Outcome {
        reason,
        identity: (owner >> 32) as u32,
        service: owner as u32,
    }
}

/// If the flow is live — not idle past its timeout, and valid under the
/// current policy (revalidated when the policy or its grant's time changed)
/// — refreshes it, adds `tcp_flags`, and returns its packed owner; else
/// removes it and returns 0.
#[inline(never)]
fn live_flow(key: &FlowKey, state: u64, now: u64, tcp_flags: u8) -> u64 {
    let Some(entry) = FLOWS.get_ptr_mut(key) else {
        return 0;
    };
    // SAFETY: this CPU's view of an LRU entry; concurrent updates of the
    // same flow race benignly (timestamps and flags).
    let value = unsafe { &mut *entry };
    let live = now.saturating_sub(value.last_seen_ns) <= idle_timeout(key.proto, value.flags)
        && (value.state == state && now < value.valid_until_ns
            || revalidate(key, value, state, now));
    if !live {
        let _ = FLOWS.remove(key);
        return 0;
    }
    value.last_seen_ns = now;
    value.flags |= tcp_flags;
    (u64::from(value.identity) << 32) | u64::from(value.service)
}

/// Does some grant still cover the flow's original direction? Takes no rate
/// token: packets of live flows take none.
#[inline(never)]
fn revalidate(key: &FlowKey, value: &mut FlowValue, state: u64, now: u64) -> bool {
    let (src, dst, dport) = if value.flags & flow::INITIATOR_LO != 0 {
        (&key.addr_lo, &key.addr_hi, key.port_hi)
    } else {
        (&key.addr_hi, &key.addr_lo, key.port_lo)
    };
    let tuple = Direction {
        src,
        dst,
        service_proto: match key.proto {
            IPPROTO_TCP => proto::TCP,
            IPPROTO_UDP => proto::UDP,
            _ => proto::ICMP_ECHO,
        },
        dport: if key.proto == IPPROTO_TCP || key.proto == IPPROTO_UDP {
            dport
        } else {
            0
        },
    };
    let generation = config::generation(state);
    let (identity, service, slot) = classify(generation, &tuple, now);
    let mut decision = Decision::DENIED;
    let query = Query {
        now,
        source: identity,
        service,
        slot,
        generation,
        new_flow: false,
    };
    decide(&query, &mut decision);
    if decision.reason != Reason::Grant {
        return false;
    }
    value.state = state;
    value.valid_until_ns = decision
        .valid_until_ns
        .min(identity_valid_until(generation, src));
    value.identity = identity;
    value.service = service;
    true
}

#[inline(always)]
fn idle_timeout(ip_proto: u8, flags: u8) -> u64 {
    match ip_proto {
        IPPROTO_TCP
            if flags & flow::RST != 0
                || flags & (flow::FIN_LO | flow::FIN_HI) == (flow::FIN_LO | flow::FIN_HI) =>
        {
            timeouts::TCP_CLOSING_NS
        }
        IPPROTO_TCP => timeouts::TCP_ESTABLISHED_NS,
        IPPROTO_UDP => timeouts::UDP_NS,
        _ => timeouts::ICMP_NS,
    }
}

#[inline(always)]
fn tcp_flow_flags(packet: &Packet, key: &FlowKey) -> u8 {
    let from_lo = packet.src == key.addr_lo && packet.sport == key.port_lo;
    let mut flags = 0;
    if packet.tcp_flags & TCP_RST != 0 {
        flags |= flow::RST;
    }
    if packet.tcp_flags & TCP_FIN != 0 {
        flags |= if from_lo { flow::FIN_LO } else { flow::FIN_HI };
    }
    flags
}

/// The protocol code a new flow's service is looked up with.
#[inline(always)]
fn service_proto(packet: &Packet) -> u8 {
    match (packet.kind, packet.proto) {
        (Kind::Ports, IPPROTO_TCP) => proto::TCP,
        (Kind::Ports, IPPROTO_UDP) => proto::UDP,
        (Kind::EchoRequest, _) => proto::ICMP_ECHO,
        _ => 0,
    }
}

/// The flow key of the packet an ICMP error quotes; `false` if unreadable.
#[inline(never)]
fn quoted_flow<F: Frame>(frame: &F, error: &Packet, key: &mut FlowKey) -> bool {
    let mut inner = Tuple {
        src: [0; 16],
        dst: [0; 16],
        sport: 0,
        dport: 0,
        proto: 0,
    };
    if !quoted(frame, error, &mut inner) {
        return false;
    }
    *key = flow_key(
        &inner.src,
        inner.sport,
        &inner.dst,
        inner.dport,
        inner.proto,
    );
    true
}

/// Both directions of a flow map to one key: the lower (address, port)
/// endpoint first. Any consistent order will do.
#[inline(always)]
fn flow_key(src: &[u8; 16], sport: u16, dst: &[u8; 16], dport: u16, proto: u8) -> FlowKey {
    let (lo, hi) = if (src, sport) <= (dst, dport) {
        ((src, sport), (dst, dport))
    } else {
        ((dst, dport), (src, sport))
    };
    FlowKey {
        addr_lo: *lo.0,
        addr_hi: *hi.0,
        port_lo: lo.1,
        port_hi: hi.1,
        proto,
        _pad: [0; 3],
    }
}

/// (source identity, service, slot) of one direction.
#[inline(always)]
fn classify(generation: u8, tuple: &Direction, now: u64) -> (u32, u32, u32) {
    let identity = source_identity(generation, tuple.src, now);
    let (service, slot) = service_of(generation, tuple.dst, tuple.service_proto, tuple.dport);
    (identity, service, slot)
}

/// (service, slot) of a destination; `service::NONE` where the protocol
/// code is 0 or no service matches.
#[inline(always)]
fn service_of(generation: u8, dst: &[u8; 16], service_proto: u8, dport: u16) -> (u32, u32) {
    if service_proto == 0 {
        return (service::NONE, 0);
    }
    let found = service_slot(generation, dst, service_proto, dport);
    ((found >> 32) as u32, found as u32)
}

/// The service and slot of (destination, protocol, port), packed as
/// `service << 32 | slot` (BPF functions return one scalar); service 0 is
/// `service::NONE`.
#[inline(never)]
fn service_slot(generation: u8, dst: &[u8; 16], service_proto: u8, dport: u16) -> u64 {
    let dst = AddrKey {
        generation,
        addr: *dst,
    };
    let Some(class) = DESTINATIONS.get(Key::new(GEN_BITS + ADDR_BITS, dst)) else {
        return 0;
    };
    let port = PortKey {
        generation,
        class: class.class.to_be_bytes(),
        proto: service_proto,
        port: dport.to_be_bytes(),
    };
    SERVICE_PORTS
        .get(Key::new(PORT_KEY_FIXED_BITS + 16, port))
        .map_or(0, |found| {
            (u64::from(found.service) << 32) | u64::from(found.slot)
        })
}

/// The identity of a source address at `now`: none once its entry has
/// expired (a process binding's token ran out).
#[inline(never)]
fn source_identity(generation: u8, addr: &[u8; 16], now: u64) -> u32 {
    identity_entry(generation, addr)
        .filter(|entry| now < entry.valid_until_ns)
        .map_or(identity::UNKNOWN, |entry| entry.tag)
}

/// Until when the identity of a source address holds: a flow it opens
/// must be judged again then.
#[inline(never)]
fn identity_valid_until(generation: u8, addr: &[u8; 16]) -> u64 {
    identity_entry(generation, addr).map_or(u64::MAX, |entry| entry.valid_until_ns)
}

#[inline(always)]
fn identity_entry(generation: u8, addr: &[u8; 16]) -> Option<&'static IdentityValue> {
    let key = AddrKey {
        generation,
        addr: *addr,
    };
    // SAFETY: a map value, read only; the agent replaces values whole.
    if let Some(host) = unsafe { IDENTITY_HOSTS.get(&key) } {
        return Some(host);
    }
    IDENTITY_PREFIXES.get(Key::new(GEN_BITS + ADDR_BITS, key))
}

/// What `decide` decides about; passed by reference because BPF functions
/// take at most five arguments.
#[derive(Clone, Copy)]
struct Query {
    now: u64,
    source: u32,
    service: u32,
    slot: u32,
    generation: u8,
    /// A new flow takes a rate token; a revalidated one does not.
    new_flow: bool,
}

/// Step 6 of the pipeline: the grants of (source, service, slot), then of
/// (`*`, service, slot), in policy order. Not inlined: new and revalidated
/// flows share its stack frame.
#[inline(never)]
fn decide(query: &Query, decision: &mut Decision) {
    let Query {
        now,
        source,
        service,
        slot,
        generation,
        new_flow,
    } = *query;
    *decision = Decision::DENIED;
    // SAFETY: presence test only.
    if source != identity::UNKNOWN && unsafe { REVOKED.get(&source) }.is_some() {
        decision.reason = Reason::Revoked;
        return;
    }
    if service == service::NONE {
        decision.reason = Reason::UnknownDestination;
        return;
    }
    let mut saw_expired = false;
    let mut saw_rate_limited = false;
    for grantee in [source, identity::ANY] {
        if grantee == identity::UNKNOWN {
            continue;
        }
        let key = GrantKey {
            generation,
            _pad: [0; 3],
            identity: grantee,
            service,
            slot,
        };
        // Read in place, not copied: this frame is on the deepest call
        // chain, and every byte of stack counts there.
        // SAFETY: a map value, read only.
        let Some(refs) = (unsafe { GRANTS.get(&key) }) else {
            continue;
        };
        for i in 0..GRANTS_PER_KEY {
            if i as u32 >= refs.count {
                break;
            }
            let grant = refs.grants[i];
            let Some(info) = GRANT_INFO.get(grant) else {
                continue;
            };
            if now >= info.expires_ns {
                saw_expired = true;
                continue;
            }
            if new_flow && info.interval_ns != 0 && !take_token(grant, source, info, now) {
                saw_rate_limited = true;
                continue;
            }
            *decision = Decision {
                reason: Reason::Grant,
                valid_until_ns: info.expires_ns,
            };
            return;
        }
    }
    decision.reason = if source == identity::UNKNOWN {
        Reason::UnknownSource
    } else if saw_expired {
        Reason::Expired
    } else if saw_rate_limited {
        Reason::RateLimited
    } else {
        Reason::NoGrant
    };
}

/// GCRA: admit when the theoretical arrival time is within the burst
/// tolerance of now, then push it one interval further.
#[inline(always)]
fn take_token(grant: u32, source: u32, info: &GrantInfo, now: u64) -> bool {
    let key = BucketKey {
        grant,
        identity: source,
    };
    // SAFETY: copied out at once.
    let tat = unsafe { RATE_BUCKETS.get(&key) }.copied().unwrap_or(now);
    if tat > now.saturating_add(info.burst_ns) {
        return false;
    }
    let next = if tat > now { tat } else { now } + info.interval_ns;
    RATE_BUCKETS.insert(&key, &next, 0).is_ok()
}

/// An ICMP error is `related` when the packet it quotes belongs to a live flow.
#[inline(never)]
fn related<F: Frame>(frame: &F, packet: &Packet, state: u64, now: u64, outcome: &mut Outcome) {
    let mut key = FlowKey::default();
    if quoted_flow(frame, packet, &mut key) {
        let owner = live_flow(&key, state, now, 0);
        if owner != 0 {
            *outcome = flow_outcome(Reason::Related, owner);
            return;
        }
    }
    *outcome = Outcome {
        reason: Reason::NoGrant,
        identity: source_identity(config::generation(state), &packet.src, now),
        service: service::NONE,
    };
}

#[inline(always)]
fn fragment_key(packet: &Packet) -> FragmentKey {
    FragmentKey {
        src: packet.src,
        dst: packet.dst,
        id: packet.fragment_id,
        proto: packet.fragment_proto,
        _pad: [0; 3],
    }
}

#[inline(always)]
fn remember_first_fragment(packet: &Packet, outcome: &Outcome, state: u64, now: u64) {
    let value = FragmentValue {
        state,
        seen_ns: now,
        identity: outcome.identity,
        service: outcome.service,
    };
    // Without the entry, later fragments are orphans: closed, not open.
    let _ = FRAGMENTS.insert(&fragment_key(packet), &value, 0);
}

#[inline(never)]
fn later_fragment(packet: &Packet, state: u64, now: u64, outcome: &mut Outcome) {
    // SAFETY: copied out at once.
    *outcome = match unsafe { FRAGMENTS.get(&fragment_key(packet)) }.copied() {
        Some(first)
            if first.state == state
                && now.saturating_sub(first.seen_ns) <= timeouts::FRAGMENT_NS =>
        {
            Outcome {
                reason: Reason::Fragment,
                identity: first.identity,
                service: first.service,
            }
        }
        _ => Outcome {
            reason: Reason::OrphanFragment,
            identity: source_identity(config::generation(state), &packet.src, now),
            service: service::NONE,
        },
    };
}

/// Per-CPU counters by (identity, service, reason), and the last verdict.
#[inline(never)]
fn account(outcome: &Outcome, len: u32) {
    let key = CounterKey {
        identity: outcome.identity,
        service: outcome.service,
        reason: outcome.reason as u8,
        _pad: [0; 3],
    };
    match COUNTERS.get_ptr_mut(&key) {
        Some(counter) => {
            // SAFETY: this CPU's own slot of a per-CPU entry.
            let counter = unsafe { &mut *counter };
            counter.packets += 1;
            counter.bytes += len as u64;
        }
        None => {
            let _ = COUNTERS.insert(
                &key,
                &CounterValue {
                    packets: 1,
                    bytes: len as u64,
                },
                0,
            );
        }
    }
    if let Some(last) = LAST_VERDICT.get_ptr_mut(0) {
        // SAFETY: this CPU's own slot.
        unsafe {
            *last = Verdict {
                identity: outcome.identity,
                service: outcome.service,
                reason: outcome.reason as u8,
                _pad: [0; 7],
            }
        };
    }
}
