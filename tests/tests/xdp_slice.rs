//! The first vertical slice: the XDP program from mesh-ebpf, loaded by
//! mesh-agent's datapath, drops packets from a source placed in its map, and
//! traffic flows again once it is detached.

use std::{
    net::{Ipv4Addr, SocketAddr},
    time::Duration,
};

use aya::programs::XdpMode;
use mesh_agent::datapath::Datapath;
use mesh_tests::{NetNs, VethEnd, require_root, udp_delivered, veth_pair};

const CLIENT: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
const SERVER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
const PACKETS: usize = 20;
const PATIENCE: Duration = Duration::from_secs(2);

#[test]
fn xdp_drops_denied_source_until_detached() -> anyhow::Result<()> {
    require_root();
    let client = NetNs::new()?;
    let server = NetNs::new()?;
    veth_pair(
        &VethEnd {
            ns: &client,
            name: "veth-c",
            addr: CLIENT,
        },
        &VethEnd {
            ns: &server,
            name: "veth-s",
            addr: SERVER,
        },
    )?;
    let target = SocketAddr::from((SERVER, 7000));
    let delivered = || udp_delivered(&client, CLIENT, &server, target, PACKETS, PATIENCE);

    assert_eq!(delivered()?, PACKETS, "baseline: no program attached");

    let mut datapath = Datapath::load()?;
    let link = server.enter(|| datapath.attach_xdp("veth-s", XdpMode::default()))??;
    assert_eq!(delivered()?, PACKETS, "attached, nothing denied yet");

    datapath.deny_source(CLIENT)?;
    assert_eq!(
        delivered()?,
        0,
        "attached, client denied: every packet dropped"
    );

    datapath.detach_xdp(link)?;
    assert_eq!(delivered()?, PACKETS, "detached: traffic flows again");
    Ok(())
}
