//! The demo behind `cargo xtask demo`: mesh's XDP program enforcing between
//! two network namespaces, narrated. It exits non-zero unless every behaviour
//! it shows actually happened.

use std::{
    net::{Ipv4Addr, SocketAddr},
    time::Duration,
};

use anyhow::ensure;
use aya::programs::XdpMode;
use mesh_agent::datapath::{Clock, Datapath};
use mesh_tests::{NetNs, VethEnd, one_udp_grant, udp_delivered, veth_pair};

const AGENT: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
const SERVICE: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 20);
const DATAGRAMS: usize = 10;

fn main() -> anyhow::Result<()> {
    println!("mesh demo: enforcement in the kernel with eBPF");
    let agent = NetNs::new()?;
    let service = NetNs::new()?;
    veth_pair(
        &VethEnd {
            ns: &agent,
            name: "agent0",
            addr: AGENT,
        },
        &VethEnd {
            ns: &service,
            name: "svc0",
            addr: SERVICE,
        },
    )?;
    println!("  agent {AGENT} and service {SERVICE}, each in its own network namespace");

    let target = SocketAddr::from((SERVICE, 8443));
    let show = |what: &str, expected: usize| -> anyhow::Result<()> {
        let arrived = udp_delivered(
            &agent,
            AGENT,
            &service,
            target,
            DATAGRAMS,
            Duration::from_secs(1),
        )?;
        println!("  {what}: {arrived}/{DATAGRAMS} datagrams arrived");
        ensure!(
            arrived == expected,
            "expected {expected} to arrive, saw {arrived}"
        );
        Ok(())
    };

    let mut datapath = Datapath::load()?;
    datapath.install(&one_udp_grant(AGENT, target, true), &Clock::now()?)?;
    let link = service.enter(|| datapath.attach_xdp("svc0", XdpMode::default()))??;
    show(
        "XDP attached, agent granted UDP 8443 on the service",
        DATAGRAMS,
    )?;
    datapath.install(&one_udp_grant(AGENT, target, false), &Clock::now()?)?;
    show("policy changed live: grant removed", 0)?;
    datapath.detach(link)?;
    show("program detached", DATAGRAMS)?;
    println!("demo passed: every behaviour shown above happened");
    Ok(())
}
