//! The programs from mesh-ebpf, loaded by mesh-agent's datapath and attached
//! to a veth in a network namespace, enforce a policy on real traffic: a
//! granted flow passes, it stops when a new policy drops the grant, and
//! traffic flows again once the program is detached.

use std::{net::SocketAddr, time::Duration};

use aya::programs::XdpMode;
use mesh_agent::datapath::{Clock, Datapath};
use mesh_tests::{CLIENT, ClientServer, SERVER, one_udp_grant, require_root};

const PORT: u16 = 7000;
const PACKETS: usize = 20;
const PATIENCE: Duration = Duration::from_secs(2);

#[test]
fn xdp_enforces_policy_until_detached() -> anyhow::Result<()> {
    require_root();
    let net = ClientServer::new()?;
    let target = SocketAddr::from((SERVER, PORT));
    let delivered = || net.udp_delivered(PORT, PACKETS, PATIENCE);

    assert_eq!(delivered()?, PACKETS, "baseline: no program attached");

    let mut datapath = Datapath::load()?;
    datapath.install(&one_udp_grant(CLIENT, target, true), &Clock::now()?)?;
    let link = net
        .server
        .enter(|| datapath.attach_xdp("veth-s", XdpMode::default()))??;
    assert_eq!(delivered()?, PACKETS, "attached, flow granted");

    datapath.install(&one_udp_grant(CLIENT, target, false), &Clock::now()?)?;
    assert_eq!(
        delivered()?,
        0,
        "grant removed: the live flow ends, every packet dropped"
    );

    datapath.detach(link)?;
    assert_eq!(delivered()?, PACKETS, "detached: traffic flows again");
    Ok(())
}
