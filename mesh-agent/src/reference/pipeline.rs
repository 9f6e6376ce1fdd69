//! Steps 2–6 of docs/datapath.md for a parsed packet: live flows, ICMP
//! errors, fragments, classification and the grant decision.

use std::{collections::HashMap, net::Ipv6Addr};

use mesh_common::{GrantInfo, Reason, identity, proto, service, timeouts};

use super::{
    Model, ModelVerdict,
    parse::{
        Datagram, Endpoint, Fragment, IPPROTO_TCP, IPPROTO_UDP, L4, Packet, TCP_FIN, TCP_RST, Tuple,
    },
};

/// Both directions of a flow in one key: the lower endpoint first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) struct FlowKey {
    lo: Endpoint,
    hi: Endpoint,
    proto: u8,
}

impl FlowKey {
    fn of(tuple: &Tuple) -> Self {
        let (lo, hi) = if tuple.src <= tuple.dst {
            (tuple.src, tuple.dst)
        } else {
            (tuple.dst, tuple.src)
        };
        Self {
            lo,
            hi,
            proto: tuple.proto,
        }
    }
}

#[derive(Clone, Copy, Debug)]
pub(super) struct Flow {
    /// The epoch the flow was last validated under.
    epoch: u64,
    /// When the grant that admitted or last revalidated it stops holding.
    valid_until_ns: u64,
    last_seen_ns: u64,
    identity: u32,
    service: u32,
    /// The direction that opened the flow: revalidation judges this one.
    opened: Tuple,
    closing: Closing,
}

impl Flow {
    fn idle_timeout(&self) -> u64 {
        match self.opened.proto {
            IPPROTO_TCP if self.closing.closed() => timeouts::TCP_CLOSING_NS,
            IPPROTO_TCP => timeouts::TCP_ESTABLISHED_NS,
            IPPROTO_UDP => timeouts::UDP_NS,
            _ => timeouts::ICMP_NS,
        }
    }

    fn verdict(&self, reason: Reason) -> ModelVerdict {
        ModelVerdict::new(reason, self.identity, self.service)
    }
}

/// What a TCP flow's packets said about its end, by the end of the key that
/// sent them.
#[derive(Clone, Copy, Debug, Default)]
struct Closing {
    rst: bool,
    fin_lo: bool,
    fin_hi: bool,
}

impl Closing {
    fn of(packet: &Packet, key: &FlowKey) -> Self {
        let L4::Tcp { sport, flags, .. } = packet.l4 else {
            return Self::default();
        };
        let fin = flags & TCP_FIN != 0;
        let from_lo = Endpoint {
            addr: packet.src,
            port: sport,
        } == key.lo;
        Self {
            rst: flags & TCP_RST != 0,
            fin_lo: fin && from_lo,
            fin_hi: fin && !from_lo,
        }
    }

    fn add(&mut self, other: Closing) {
        self.rst |= other.rst;
        self.fin_lo |= other.fin_lo;
        self.fin_hi |= other.fin_hi;
    }

    /// After a RST, or once both ends sent a FIN.
    fn closed(&self) -> bool {
        self.rst || (self.fin_lo && self.fin_hi)
    }
}

/// The verdict of a datagram's first fragment, for the later ones.
#[derive(Clone, Copy, Debug)]
pub(super) struct FirstFragment {
    epoch: u64,
    seen_ns: u64,
    identity: u32,
    service: u32,
}

/// One direction's source identity, and its service and slot.
struct Classified {
    identity: u32,
    /// `service::NONE` when the destination matched none.
    service: u32,
    slot: u32,
}

/// Why grants are checked: revalidating a live flow takes no rate token.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Purpose {
    NewFlow,
    Revalidation,
}

impl Model {
    pub(super) fn judge_packet(&mut self, packet: &Packet, now: u64) -> ModelVerdict {
        let first = match packet.fragment {
            Fragment::Later(datagram) => return self.later_fragment(&datagram, now),
            Fragment::First(datagram) => Some(datagram),
            Fragment::Whole => None,
        };
        let verdict = match packet.l4 {
            L4::Error { quoted } => self.related(quoted, packet.src, now),
            _ => self.flow_or_new(packet, now),
        };
        // Every allowed first fragment, related errors included, passes its
        // verdict on to the later ones.
        if let Some(datagram) = first
            && verdict.allow
        {
            let remembered = FirstFragment {
                epoch: self.epoch,
                seen_ns: now,
                identity: verdict.identity,
                service: verdict.service,
            };
            self.fragments.insert(datagram, remembered);
        }
        verdict
    }

    fn flow_or_new(&mut self, packet: &Packet, now: u64) -> ModelVerdict {
        let tuple = packet.tuple();
        if let Some(tuple) = tuple {
            let key = FlowKey::of(&tuple);
            if let Some(flow) = self.live_flow(&key, now, Closing::of(packet, &key)) {
                return flow.verdict(Reason::Flow);
            }
        }
        self.new_flow(packet, tuple, now)
    }

    /// Judges a packet that starts a flow, and records the flow if admitted.
    fn new_flow(&mut self, packet: &Packet, tuple: Option<Tuple>, now: u64) -> ModelVerdict {
        let service_port = match packet.l4 {
            // Replies belong to the flow their request opened.
            L4::Echo { request: false, .. } => None,
            _ => tuple.as_ref().map(service_port),
        };
        let classified = self.classify(packet.src, packet.dst, service_port);
        let decision = self.decide(&classified, now, Purpose::NewFlow);
        // Only TCP, UDP and echo requests have a service, so only they are
        // admitted, and they have a tuple.
        if let (Ok(valid_until_ns), Some(opened)) = (decision, tuple) {
            let key = FlowKey::of(&opened);
            let flow = Flow {
                epoch: self.epoch,
                valid_until_ns,
                last_seen_ns: now,
                identity: classified.identity,
                service: classified.service,
                opened,
                closing: Closing::of(packet, &key),
            };
            self.flows.insert(key, flow);
        }
        let reason = decision.err().unwrap_or(Reason::Grant);
        ModelVerdict::new(reason, classified.identity, classified.service)
    }

    /// The flow under `key`, refreshed by this packet, if it is live: not
    /// idle past its timeout, and valid under the current epoch before its
    /// grant's expiry, or else revalidated. A flow that is not is removed.
    fn live_flow(&mut self, key: &FlowKey, now: u64, closing: Closing) -> Option<Flow> {
        let mut flow = *self.flows.get(key)?;
        let live = now.saturating_sub(flow.last_seen_ns) <= flow.idle_timeout()
            && ((flow.epoch == self.epoch && now < flow.valid_until_ns)
                || self.revalidate(&mut flow, now));
        if !live {
            self.flows.remove(key);
            return None;
        }
        flow.last_seen_ns = now;
        flow.closing.add(closing);
        self.flows.insert(*key, flow);
        Some(flow)
    }

    /// Whether some grant still covers the direction that opened the flow,
    /// under the current policy; if so the flow takes on its identity,
    /// service and expiry.
    fn revalidate(&mut self, flow: &mut Flow, now: u64) -> bool {
        let opened = flow.opened;
        let classified = self.classify(
            opened.src.addr,
            opened.dst.addr,
            Some(service_port(&opened)),
        );
        let Ok(valid_until_ns) = self.decide(&classified, now, Purpose::Revalidation) else {
            return false;
        };
        flow.epoch = self.epoch;
        flow.valid_until_ns = valid_until_ns;
        flow.identity = classified.identity;
        flow.service = classified.service;
        true
    }

    /// An ICMP error quoting a packet of a live flow is `related`, and counts
    /// as activity of the flow; any other is denied and attributed to its
    /// sender.
    fn related(&mut self, quoted: Option<Tuple>, src: Ipv6Addr, now: u64) -> ModelVerdict {
        if let Some(quoted) = quoted
            && let Some(flow) = self.live_flow(&FlowKey::of(&quoted), now, Closing::default())
        {
            return flow.verdict(Reason::Related);
        }
        ModelVerdict::new(Reason::NoGrant, self.tables.identity(src), service::NONE)
    }

    fn later_fragment(&self, datagram: &Datagram, now: u64) -> ModelVerdict {
        match self.fragments.get(datagram) {
            // A verdict from another epoch may rest on a grant or identity
            // that is gone.
            Some(first)
                if first.epoch == self.epoch
                    && now.saturating_sub(first.seen_ns) <= timeouts::FRAGMENT_NS =>
            {
                ModelVerdict::new(Reason::Fragment, first.identity, first.service)
            }
            _ => ModelVerdict::new(
                Reason::OrphanFragment,
                self.tables.identity(datagram.src),
                service::NONE,
            ),
        }
    }

    fn classify(
        &self,
        src: Ipv6Addr,
        dst: Ipv6Addr,
        service_port: Option<(u8, u16)>,
    ) -> Classified {
        let (service, slot) = service_port
            .and_then(|(proto, port)| self.tables.service(dst, proto, port))
            .unwrap_or((service::NONE, 0));
        Classified {
            identity: self.tables.identity(src),
            service,
            slot,
        }
    }

    /// Step 6: `Ok` with the time the admitting grant stops holding, or the
    /// first deny reason that applies.
    fn decide(
        &mut self,
        classified: &Classified,
        now: u64,
        purpose: Purpose,
    ) -> Result<u64, Reason> {
        let Classified {
            identity: source,
            service,
            slot,
        } = *classified;
        if source != identity::UNKNOWN && self.revoked.contains(&source) {
            return Err(Reason::Revoked);
        }
        if service == service::NONE {
            return Err(Reason::UnknownDestination);
        }
        let (mut saw_expired, mut saw_rate_limited) = (false, false);
        for grantee in [source, identity::ANY] {
            if grantee == identity::UNKNOWN {
                continue;
            }
            for &grant in self.tables.grants(grantee, service, slot) {
                // A missing entry never allows.
                let Some(info) = self.tables.grant_info(grant) else {
                    continue;
                };
                if now >= info.expires_ns {
                    saw_expired = true;
                    continue;
                }
                if purpose == Purpose::NewFlow
                    && info.interval_ns != 0
                    && !take_token(&mut self.buckets, (grant, source), info, now)
                {
                    saw_rate_limited = true;
                    continue;
                }
                return Ok(info.expires_ns);
            }
        }
        Err(if source == identity::UNKNOWN {
            Reason::UnknownSource
        } else if saw_expired {
            Reason::Expired
        } else if saw_rate_limited {
            Reason::RateLimited
        } else {
            Reason::NoGrant
        })
    }
}

/// The (protocol code, port) a direction's service is looked up with. Flows
/// are TCP, UDP or ICMP echo, and echo is keyed at port 0 whatever its
/// identifier.
fn service_port(tuple: &Tuple) -> (u8, u16) {
    match tuple.proto {
        IPPROTO_TCP => (proto::TCP, tuple.dst.port),
        IPPROTO_UDP => (proto::UDP, tuple.dst.port),
        _ => (proto::ICMP_ECHO, 0),
    }
}

/// GCRA as docs/datapath.md states it: a token is there when the bucket's
/// theoretical arrival time is at most the burst tolerance ahead of now, and
/// taking it moves that time one interval past the later of the two.
fn take_token(
    buckets: &mut HashMap<(usize, u32), u64>,
    bucket: (usize, u32),
    info: &GrantInfo,
    now: u64,
) -> bool {
    let tat = buckets.get(&bucket).copied().unwrap_or(now);
    if tat > now.saturating_add(info.burst_ns) {
        return false;
    }
    // Wrapping, as the kernel's u64 arithmetic does.
    buckets.insert(bucket, tat.max(now).wrapping_add(info.interval_ns));
    true
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::datapath::{Clock, GrantLimits, Rate};

    const SECOND: u64 = 1_000_000_000;

    fn rate(count: u32, period: Duration) -> GrantInfo {
        let limits = GrantLimits {
            expires: None,
            rate: Some(Rate { count, period }),
        };
        limits.to_kernel(&Clock {
            wall: std::time::SystemTime::UNIX_EPOCH,
            boot_ns: 0,
        })
    }

    /// How many of `attempts` tokens one bucket hands out at `now`.
    fn taken(
        buckets: &mut HashMap<(usize, u32), u64>,
        info: &GrantInfo,
        now: u64,
        attempts: usize,
    ) -> usize {
        (0..attempts)
            .filter(|_| take_token(buckets, (0, 7), info, now))
            .count()
    }

    #[test]
    fn a_bucket_of_n_refills_one_token_per_nth_of_the_period() {
        let info = rate(4, Duration::from_secs(1));
        let mut buckets = HashMap::new();
        let start = 100 * SECOND;
        assert_eq!(taken(&mut buckets, &info, start, 10), 4);
        assert_eq!(taken(&mut buckets, &info, start + SECOND / 4 - 1, 10), 0);
        assert_eq!(taken(&mut buckets, &info, start + SECOND / 4, 10), 1);
        // Idle for long, the bucket is full again, and no fuller.
        assert_eq!(taken(&mut buckets, &info, start + 60 * SECOND, 10), 4);
        // Other buckets are untouched.
        assert!(take_token(&mut buckets, (1, 7), &info, start + 60 * SECOND));
        assert!(take_token(&mut buckets, (0, 8), &info, start + 60 * SECOND));
    }

    #[test]
    fn a_bucket_per_minute_uses_the_kernel_numbers() {
        // 7 per minute: the interval rounds down to whole nanoseconds.
        let info = rate(7, Duration::from_secs(60));
        assert_eq!(info.interval_ns, 60 * SECOND / 7);
        let mut buckets = HashMap::new();
        assert_eq!(taken(&mut buckets, &info, 0, 10), 7);
        assert_eq!(taken(&mut buckets, &info, info.interval_ns - 1, 1), 0);
        assert_eq!(taken(&mut buckets, &info, info.interval_ns, 1), 1);
    }

    #[test]
    fn flow_keys_do_not_depend_on_the_direction() {
        let a = Endpoint {
            addr: "fd00::1".parse().unwrap(),
            port: 40000,
        };
        let b = Endpoint {
            addr: "fd00::2".parse().unwrap(),
            port: 443,
        };
        let there = Tuple {
            src: a,
            dst: b,
            proto: IPPROTO_TCP,
        };
        let back = Tuple {
            src: b,
            dst: a,
            proto: IPPROTO_TCP,
        };
        assert_eq!(FlowKey::of(&there), FlowKey::of(&back));
        let udp = Tuple {
            proto: IPPROTO_UDP,
            ..there
        };
        assert_ne!(FlowKey::of(&there), FlowKey::of(&udp));
    }
}
