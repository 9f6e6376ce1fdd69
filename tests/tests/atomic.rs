//! Policy swaps are atomic from a packet's point of view: while one datapath
//! installs two policies in turn thousands of times, another, sharing the
//! same pinned maps, runs packets through the programs; every verdict is one
//! that the old or the new policy alone would give.
//!
//! The two policies map the same packet to different identities and
//! services, so any mixture (one policy's identity with the other's service
//! or grants) shows as a third outcome.

use std::{
    net::IpAddr,
    sync::atomic::{AtomicBool, Ordering},
    thread,
};

use mesh_agent::datapath::{
    Clock, Datapath, Entry, GrantLimits, MapSizes, Pins, PolicyEntries, PortBlock, Prefix,
};
use mesh_common::{Reason, proto};
use mesh_tests::{
    BpfFs,
    packet::{Packet, TCP_SYN},
    require_root,
};

const RELOADS: usize = 2000;

/// Identity `tag` at 10.0.0.1 may reach service `service` at 10.0.0.100:443.
fn policy(tag: u32, service: u32) -> PolicyEntries {
    let ip = |text: &str| text.parse::<IpAddr>().unwrap();
    PolicyEntries {
        identities: vec![(Prefix::host(ip("10.0.0.1")), tag)],
        destinations: vec![(Prefix::host(ip("10.0.0.100")), service)],
        service_ports: PortBlock::cover(proto::TCP, 443, 443)
            .into_iter()
            .map(|block| (service, block, service, 0))
            .collect(),
        grants: vec![((tag, service, 0), vec![0])],
        bound: Vec::new(),
        grant_limits: vec![GrantLimits::default()],
    }
}

#[test]
fn every_verdict_during_reloads_is_the_old_or_the_new_policys() -> anyhow::Result<()> {
    require_root();
    let bpffs = BpfFs::mount()?;
    let pins = Pins::new(bpffs.path().join("mesh"));
    let (old, new) = (policy(7, 1), policy(8, 2));
    let clock = Clock::now()?;
    let mut installer = Datapath::load_pinned(&pins, MapSizes::default())?;
    installer.install(&old, &clock)?;
    let mut runner = Datapath::load_pinned(&pins, MapSizes::default())?;

    let done = AtomicBool::new(false);
    let (judged, under_new) = thread::scope(|scope| -> anyhow::Result<(usize, usize)> {
        let reloading = scope.spawn(|| -> anyhow::Result<()> {
            for i in 0..RELOADS {
                installer.install(if i % 2 == 0 { &new } else { &old }, &clock)?;
            }
            done.store(true, Ordering::Relaxed);
            Ok(())
        });
        let mut judged = 0;
        let mut under_new = 0;
        let mut sport = 1024u16;
        while !done.load(Ordering::Relaxed) {
            // A new flow every time, so every packet is classified afresh.
            sport = sport.checked_add(1).unwrap_or(1024);
            let syn = Packet::tcp(
                "10.0.0.1".parse()?,
                sport,
                "10.0.0.100".parse()?,
                443,
                TCP_SYN,
            );
            let verdict = runner.test_run(Entry::Xdp, &syn.bytes())?;
            let outcome = (verdict.reason, verdict.identity, verdict.service);
            assert!(
                outcome == (Reason::Grant, 7, 1) || outcome == (Reason::Grant, 8, 2),
                "packet {judged} saw a mixture of policies: {outcome:?}"
            );
            judged += 1;
            under_new += usize::from(verdict.identity == 8);
            if judged % 4096 == 0 {
                runner.forget_traffic()?;
            }
        }
        reloading.join().expect("installer thread")?;
        Ok((judged, under_new))
    })?;
    eprintln!(
        "{judged} packets judged during {RELOADS} policy swaps, {under_new} under the new policy"
    );
    assert!(
        judged >= RELOADS,
        "too few packets ({judged}) ran during the swaps"
    );
    assert!(
        under_new > 0 && under_new < judged,
        "packets saw only one of the policies"
    );
    drop(runner);
    drop(installer);
    mesh_agent::datapath::unpin_all(&pins)?;
    Ok(())
}
