//! The (protocol, port) space services live in, and how grants split each
//! service's part of it into slots.

use std::collections::{BTreeSet, HashMap};

use mesh_common::proto;

use crate::{
    datapath::PortBlock,
    policy::{PortRange, PortSet, PortSpec},
};

// Spans of one port set are listed ICMP, TCP, UDP: in the order of the codes.
const _: () = assert!(proto::ICMP_ECHO < proto::TCP && proto::TCP < proto::UDP);

/// An inclusive run of ports of one protocol. Ports are points of one line,
/// the protocol code above the port number, so that each protocol is one
/// stretch of it and ICMP echo is the single point (`ICMP_ECHO`, 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) struct Span {
    pub(super) first: u32,
    pub(super) last: u32,
}

impl Span {
    fn new(proto: u8, first: u16, last: u16) -> Self {
        let point = |port| u32::from(proto) << 16 | u32::from(port);
        Self {
            first: point(first),
            last: point(last),
        }
    }

    fn proto(self) -> u8 {
        (self.first >> 16) as u8
    }

    fn ports(self) -> (u16, u16) {
        (self.first as u16, self.last as u16)
    }

    /// The aligned port blocks that cover the span exactly.
    pub(super) fn blocks(self) -> Vec<PortBlock> {
        let (first, last) = self.ports();
        PortBlock::cover(self.proto(), first, last)
    }

    fn spec(self) -> PortSpec {
        let (first, last) = self.ports();
        let range =
            || PortRange::new(first, last).expect("spans of a policy's ports have no port 0");
        match self.proto() {
            proto::TCP => PortSpec::Tcp(range()),
            proto::UDP => PortSpec::Udp(range()),
            _ => PortSpec::IcmpEcho,
        }
    }
}

/// The spans of `ports`, in order.
pub(super) fn spans(ports: &PortSet) -> Vec<Span> {
    let ranges = |proto, ranges: &[PortRange]| {
        ranges
            .iter()
            .map(move |range| Span::new(proto, range.first(), range.last()))
            .collect::<Vec<_>>()
    };
    let icmp = ports
        .icmp_echo()
        .then_some(Span::new(proto::ICMP_ECHO, 0, 0));
    icmp.into_iter()
        .chain(ranges(proto::TCP, ports.tcp()))
        .chain(ranges(proto::UDP, ports.udp()))
        .collect()
}

/// A service's ports split into slots, so that each slot lies wholly inside
/// or wholly outside the ports every grant allows on the service. A slot is
/// the set of ports that exactly the same narrowing grants cover: ports no
/// grant tells apart share one, however far apart they are, which keeps the
/// grant entries few. Slots are numbered from 0 in port order.
pub(super) struct Slots {
    /// The service's ports in pieces, each in one slot, in order.
    pieces: Vec<(Span, u32)>,
    count: u32,
    /// The slots covered by each grant that allows only part of the
    /// service's ports, by grant index.
    narrowed: HashMap<usize, Vec<u32>>,
}

impl Slots {
    /// Slots of a service with the spans `ports`, given the grants that
    /// narrow them: (grant index, the spans it allows, within `ports`).
    pub(super) fn new(ports: &[Span], narrowings: &[(usize, Vec<Span>)]) -> Self {
        // Where a narrowing grant starts or stops covering ports.
        let mut changes: Vec<(u32, usize, bool)> = narrowings
            .iter()
            .flat_map(|(grant, spans)| {
                spans
                    .iter()
                    .flat_map(|span| [(span.first, *grant, true), (span.last + 1, *grant, false)])
            })
            .collect();
        changes.sort_unstable();
        let mut slots = Self {
            pieces: Vec::new(),
            count: 0,
            narrowed: HashMap::new(),
        };
        let mut by_grants: HashMap<Vec<usize>, u32> = HashMap::new();
        let mut covering = BTreeSet::new();
        let mut next = 0;
        for span in ports {
            let mut first = span.first;
            while first <= span.last {
                while let Some(&(at, grant, starts)) = changes.get(next)
                    && at <= first
                {
                    if starts {
                        covering.insert(grant);
                    } else {
                        covering.remove(&grant);
                    }
                    next += 1;
                }
                let last = changes
                    .get(next)
                    .map_or(span.last, |&(at, ..)| span.last.min(at - 1));
                let grants: Vec<usize> = covering.iter().copied().collect();
                let slot = match by_grants.get(&grants) {
                    Some(&slot) => slot,
                    None => {
                        let slot = slots.count;
                        for &grant in &grants {
                            slots.narrowed.entry(grant).or_default().push(slot);
                        }
                        by_grants.insert(grants, slot);
                        slots.count += 1;
                        slot
                    }
                };
                slots.pieces.push((Span { first, last }, slot));
                first = last + 1;
            }
        }
        slots
    }

    /// The slots covered by `grant`, a grant to this service.
    pub(super) fn of_grant(&self, grant: usize) -> impl Iterator<Item = u32> + '_ {
        let (narrowed, all) = match self.narrowed.get(&grant) {
            Some(slots) => (slots.as_slice(), 0..0),
            None => (&[][..], 0..self.count),
        };
        narrowed.iter().copied().chain(all)
    }

    /// The parts of `span`, which lies within the service's ports, by slot.
    pub(super) fn split(&self, span: Span) -> impl Iterator<Item = (Span, u32)> + '_ {
        let start = self
            .pieces
            .partition_point(|(piece, _)| piece.last < span.first);
        self.pieces[start..]
            .iter()
            .take_while(move |(piece, _)| piece.first <= span.last)
            .map(move |&(piece, slot)| {
                let part = Span {
                    first: piece.first.max(span.first),
                    last: piece.last.min(span.last),
                };
                (part, slot)
            })
    }

    /// The ports in `slot`.
    pub(super) fn ports(&self, slot: u32) -> PortSet {
        self.pieces
            .iter()
            .filter(|&&(_, of)| of == slot)
            .map(|(piece, _)| piece.spec())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn port_set(specs: &str) -> PortSet {
        specs
            .split(", ")
            .map(|spec| spec.parse().unwrap())
            .collect()
    }

    fn slots(service: &str, narrowings: &[(usize, &str)]) -> Slots {
        let narrowings: Vec<(usize, Vec<Span>)> = narrowings
            .iter()
            .map(|&(grant, ports)| (grant, spans(&port_set(ports))))
            .collect();
        Slots::new(&spans(&port_set(service)), &narrowings)
    }

    fn slot_ports(slots: &Slots) -> Vec<String> {
        (0..slots.count)
            .map(|slot| slots.ports(slot).to_string())
            .collect()
    }

    #[test]
    fn spans_are_in_order_and_name_their_ports() {
        let ports = port_set("53/udp, icmp, 443/tcp, 8000-8099/tcp");
        let spans = spans(&ports);
        assert!(spans.windows(2).all(|pair| pair[0].last < pair[1].first));
        let specs: PortSet = spans.iter().map(|span| span.spec()).collect();
        assert_eq!(specs, ports);
        assert_eq!(
            spans[0].blocks(),
            [PortBlock {
                proto: proto::ICMP_ECHO,
                port: 0,
                bits: 16
            }]
        );
    }

    #[test]
    fn without_narrowing_a_service_is_one_slot() {
        let slots = slots("443/tcp, 53/udp, icmp", &[]);
        assert_eq!(slot_ports(&slots), ["443/tcp, 53/udp, icmp"]);
        assert_eq!(slots.of_grant(3).collect::<Vec<_>>(), [0]);
    }

    #[test]
    fn narrowing_grants_cut_slots_and_equal_cover_shares_one() {
        let slots = slots(
            "80/tcp, 443/tcp, 8000-8099/tcp, icmp",
            &[(1, "80/tcp, 8000-8049/tcp"), (4, "8040-8059/tcp")],
        );
        assert_eq!(
            slot_ports(&slots),
            [
                "443/tcp, 8060-8099/tcp, icmp",
                "80/tcp, 8000-8039/tcp",
                "8040-8049/tcp",
                "8050-8059/tcp"
            ]
        );
        assert_eq!(slots.of_grant(1).collect::<Vec<_>>(), [1, 2]);
        assert_eq!(slots.of_grant(4).collect::<Vec<_>>(), [2, 3]);
        assert_eq!(slots.of_grant(0).collect::<Vec<_>>(), [0, 1, 2, 3]);
        let tcp = |first, last| Span::new(proto::TCP, first, last);
        assert_eq!(
            slots.split(tcp(8030, 8055)).collect::<Vec<_>>(),
            [
                (tcp(8030, 8039), 1),
                (tcp(8040, 8049), 2),
                (tcp(8050, 8055), 3)
            ]
        );
    }
}
