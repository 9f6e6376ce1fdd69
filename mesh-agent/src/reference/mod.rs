//! A reference model of the enforcement datapath: the policy spec's verdict
//! order, as docs/datapath.md implements it over compiled [`PolicyEntries`],
//! in plain Rust.
//!
//! It is the oracle the kernel programs are compared against: fed the same
//! entries, clock and frames, both must give the same verdicts, reasons,
//! identities, services and counters. It is written from the spec and
//! docs/datapath.md, not from the kernel code, and shares no code with it.
//! Details the documents leave open follow the kernel: for instance, an
//! error quoting IPv6 extension headers names no flow, and a related error
//! keeps its flow from going idle.
//!
//! Not modelled: map capacities (a full LRU map evicts the least recently
//! used flows, fragment verdicts and rate buckets) and races between CPUs.

#[cfg(test)]
mod frames;
mod parse;
mod pipeline;
mod tables;

use std::collections::{BTreeSet, HashMap};

use mesh_common::{Reason, identity, service};

use self::{
    parse::{Datagram, Parsed, parse},
    pipeline::{FirstFragment, Flow, FlowKey},
    tables::Tables,
};
use crate::datapath::{Clock, Counters, PolicyEntries};

/// What the model decided about one frame: what the kernel's program returns
/// (`allow`) and what it leaves in `LAST_VERDICT`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModelVerdict {
    pub allow: bool,
    pub reason: Reason,
    /// The source identity tag, or `identity::UNKNOWN`.
    pub identity: u32,
    /// The service id, or `service::NONE`.
    pub service: u32,
}

impl ModelVerdict {
    fn new(reason: Reason, identity: u32, service: u32) -> Self {
        Self {
            allow: reason.allows(),
            reason,
            identity,
            service,
        }
    }
}

/// The datapath's state: the installed policy, revocations, flows, first
/// fragments, rate buckets and counters.
pub struct Model {
    tables: Tables,
    /// Stands in for the kernel's state word, which only ever moves on to a
    /// new value: every install and revocation bumps it, and flows and first
    /// fragments remember the one they were judged under.
    epoch: u64,
    revoked: BTreeSet<u32>,
    /// (grant index, source identity) → the bucket's theoretical arrival time.
    buckets: HashMap<(usize, u32), u64>,
    flows: HashMap<FlowKey, Flow>,
    fragments: HashMap<Datagram, FirstFragment>,
    counters: Counters,
}

impl Model {
    /// A fresh datapath with `entries` installed, as after `Datapath::load`
    /// and `Datapath::install`.
    pub fn new(entries: &PolicyEntries, clock: &Clock) -> Self {
        Self {
            tables: Tables::new(entries, clock),
            // A fresh kernel's state word, moved on by the install.
            epoch: 1,
            revoked: BTreeSet::new(),
            buckets: HashMap::new(),
            flows: HashMap::new(),
            fragments: HashMap::new(),
            counters: Counters::new(),
        }
    }

    /// Replaces the policy, as `Datapath::install` does: live flows are
    /// revalidated on their next packet, first-fragment verdicts no longer
    /// hold, and every rate bucket starts full (the installer deletes the
    /// buckets of both generations' grants).
    pub fn install(&mut self, entries: &PolicyEntries, clock: &Clock) {
        self.tables = Tables::new(entries, clock);
        self.epoch += 1;
        self.buckets.clear();
    }

    /// Revokes an identity: its new flows are denied and its live flows end
    /// on their next packet.
    pub fn revoke(&mut self, tag: u32) {
        self.revoked.insert(tag);
        self.epoch += 1;
    }

    /// Lifts a revocation, as `Datapath::unrevoke` does: flows it ended stay
    /// ended. Lifting takes nothing away, so the epoch stays: what was judged
    /// before still holds.
    pub fn unrevoke(&mut self, tag: u32) {
        self.revoked.remove(&tag);
    }

    /// Judges one frame at `now_ns` on the boot clock and counts it. `l2`:
    /// the frame starts with an Ethernet header, else with the IP header.
    pub fn judge(&mut self, frame: &[u8], l2: bool, now_ns: u64) -> ModelVerdict {
        let verdict = match parse(frame, l2) {
            Parsed::Passthrough => unattributed(Reason::Passthrough),
            Parsed::Malformed => unattributed(Reason::Malformed),
            Parsed::Ip(packet) => self.judge_packet(&packet, now_ns),
        };
        let counter = self
            .counters
            .entry((verdict.identity, verdict.service, verdict.reason))
            .or_default();
        counter.0 += 1;
        counter.1 += frame.len() as u64;
        verdict
    }

    /// Packets and bytes (whole frames) by (identity, service, reason), as
    /// `Datapath::counters` sums them.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }
}

fn unattributed(reason: Reason) -> ModelVerdict {
    ModelVerdict::new(reason, identity::UNKNOWN, service::NONE)
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use mesh_common::proto;
    use proptest::prelude::*;

    use super::{frames::*, *};
    use crate::datapath::{GrantLimits, PortBlock, Prefix, Rate};

    const SECOND: u64 = 1_000_000_000;
    const CLIENT: [u8; 4] = [10, 0, 0, 1];
    const OTHER: [u8; 4] = [10, 0, 0, 9];
    const SERVER: [u8; 4] = [10, 0, 0, 2];

    fn clock() -> Clock {
        Clock {
            wall: SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000),
            boot_ns: 1000 * SECOND,
        }
    }

    /// Identity 1 at CLIENT; service 1 at SERVER with 443/tcp (slot 0),
    /// 53/udp (slot 1) and echo (slot 2); identity 1 may use all of it, two
    /// new flows a second, and anyone may use 53/udp for a minute.
    fn entries() -> PolicyEntries {
        let ports = [
            (proto::TCP, 443, 0),
            (proto::UDP, 53, 1),
            (proto::ICMP_ECHO, 0, 2),
        ];
        PolicyEntries {
            identities: vec![(Prefix::host(CLIENT.into()), 1)],
            destinations: vec![(Prefix::host(SERVER.into()), 1)],
            service_ports: ports
                .into_iter()
                .flat_map(|(proto, port, slot)| {
                    PortBlock::cover(proto, port, port)
                        .into_iter()
                        .map(move |block| (1, block, 1, slot))
                })
                .collect(),
            grants: vec![
                ((1, 1, 0), vec![0]),
                ((1, 1, 1), vec![0]),
                ((1, 1, 2), vec![0]),
                ((identity::ANY, 1, 1), vec![1]),
            ],
            bound: Vec::new(),
            grant_limits: vec![
                GrantLimits {
                    expires: None,
                    rate: Some(Rate {
                        count: 2,
                        period: Duration::from_secs(1),
                    }),
                },
                GrantLimits {
                    expires: Some(clock().wall + Duration::from_secs(60)),
                    rate: None,
                },
            ],
        }
    }

    #[test]
    fn counters_count_frames_by_identity_service_and_reason() {
        let mut model = Model::new(&entries(), &clock());
        let now = clock().boot_ns;
        let syn = ipv4(CLIENT, SERVER, 6, &tcp(40000, 443, 0x02));
        let arp = ethernet(0x0806, &[], &[0; 28]);
        assert_eq!(model.judge(&syn, false, now).reason, Reason::Grant);
        assert_eq!(model.judge(&syn, false, now).reason, Reason::Flow);
        assert_eq!(model.judge(&arp, true, now).reason, Reason::Passthrough);
        let counted: Vec<_> = model
            .counters()
            .iter()
            .map(|(key, (packets, bytes))| (*key, *packets, *bytes))
            .collect();
        assert_eq!(
            counted,
            [
                ((0, 0, Reason::Passthrough), 1, arp.len() as u64),
                ((1, 1, Reason::Flow), 1, syn.len() as u64),
                ((1, 1, Reason::Grant), 1, syn.len() as u64),
            ]
        );
    }

    #[derive(Clone, Debug)]
    enum Step {
        Frame {
            bytes: Vec<u8>,
            l2: bool,
            after_ns: u64,
        },
        Install,
        Revoke(u32),
        Unrevoke(u32),
    }

    fn address() -> impl Strategy<Value = [u8; 4]> {
        prop::sample::select(vec![CLIENT, OTHER, SERVER])
    }

    /// Frames around the policy of [`entries`]: flows both ways, fragments,
    /// ICMP errors quoting them, and noise.
    fn frame() -> impl Strategy<Value = (Vec<u8>, bool)> {
        let port = prop::sample::select(vec![53u16, 443, 40000]);
        let ip_frame = (
            address(),
            address(),
            port.clone(),
            port,
            any::<u8>(),
            0..6u8,
        )
            .prop_map(|(src, dst, sport, dport, flags, shape)| {
                let tcp_frame = ipv4(src, dst, 6, &tcp(sport, dport, flags & 0x17));
                match shape {
                    0 => tcp_frame,
                    1 => ipv4(src, dst, 17, &udp(sport, dport)),
                    2 => ipv4(src, dst, 1, &icmp(8 * (flags & 1), [0, 7, 0, 1], &[])),
                    3 => ipv4(src, dst, 1, &icmp(3, [0; 4], &tcp_frame[..28])),
                    4 => ipv4_fragment(src, dst, 17, 7, 0, true, &udp(sport, dport)),
                    _ => ipv4_fragment(src, dst, 17, 7, 1, false, &[0; 8]),
                }
            });
        prop_oneof![
            4 => ip_frame.prop_map(|bytes| (bytes, false)),
            1 => prop::collection::vec(any::<u8>(), 0..80).prop_map(|bytes| (bytes, false)),
            1 => prop::collection::vec(any::<u8>(), 0..80).prop_map(|bytes| (bytes, true)),
        ]
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            20 => (frame(), 0..20 * SECOND).prop_map(|((bytes, l2), after_ns)| Step::Frame {
                bytes,
                l2,
                after_ns
            }),
            1 => Just(Step::Install),
            1 => (0..3u32).prop_map(Step::Revoke),
            1 => (0..3u32).prop_map(Step::Unrevoke),
        ]
    }

    fn run(steps: &[Step]) -> (Vec<ModelVerdict>, Counters) {
        let mut model = Model::new(&entries(), &clock());
        let mut now = clock().boot_ns;
        let mut verdicts = Vec::new();
        for step in steps {
            match step {
                Step::Frame {
                    bytes,
                    l2,
                    after_ns,
                } => {
                    now += after_ns;
                    verdicts.push(model.judge(bytes, *l2, now));
                }
                Step::Install => model.install(&entries(), &clock()),
                Step::Revoke(tag) => model.revoke(*tag),
                Step::Unrevoke(tag) => model.unrevoke(*tag),
            }
        }
        (verdicts, model.counters().clone())
    }

    proptest! {
        #[test]
        fn the_same_steps_give_the_same_verdicts(steps in prop::collection::vec(step(), 1..80)) {
            let first = run(&steps);
            prop_assert_eq!(&first, &run(&steps));
            let judged = first.0.len() as u64;
            prop_assert_eq!(first.1.values().map(|c| c.0).sum::<u64>(), judged);
        }
    }
}
