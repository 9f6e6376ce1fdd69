//! Enforcement outlives the datapath that set it up: with maps and links
//! pinned on a bpffs, dropping the datapath (as a killed agent would) leaves
//! traffic judged as before; a new datapath adopts the maps with their
//! flows and takes over the links without a gap; unpinning everything lets
//! traffic flow as if mesh had never been there.

use std::{net::SocketAddr, time::Duration};

use mesh_agent::datapath::{Clock, Datapath, Hook, MapSizes, Pins, unpin_all};
use mesh_tests::{BpfFs, CLIENT, ClientServer, SERVER, one_udp_grant, require_root};

const PACKETS: usize = 10;
const PATIENCE: Duration = Duration::from_secs(1);

#[test]
fn enforcement_survives_the_datapath_and_is_adopted() -> anyhow::Result<()> {
    require_root();
    let bpffs = BpfFs::mount()?;
    let pins = Pins::new(bpffs.path().join("mesh"));
    let net = ClientServer::new()?;
    let granted = SocketAddr::from((SERVER, 7000));
    let other = SocketAddr::from((SERVER, 7001));
    let delivered = |to: SocketAddr| net.udp_delivered(to.port(), PACKETS, PATIENCE);
    let attach = |datapath: &mut Datapath| {
        net.server.enter(|| -> anyhow::Result<()> {
            datapath.attach_pinned(&pins, "veth-s", Hook::Xdp)?;
            datapath.attach_pinned(&pins, "veth-s", Hook::TcEgress)?;
            Ok(())
        })
    };

    let mut first = Datapath::load_pinned(&pins, MapSizes::default())?;
    first.install(&one_udp_grant(CLIENT, granted, true), &Clock::now()?)?;
    attach(&mut first)??;
    assert_eq!(delivered(granted)?, PACKETS);
    assert_eq!(delivered(other)?, 0);
    let state = first.state()?;
    drop(first);

    assert_eq!(
        delivered(granted)?,
        PACKETS,
        "enforcing with no datapath around"
    );
    assert_eq!(
        delivered(other)?,
        0,
        "still denying with no datapath around"
    );

    let mut second = Datapath::load_pinned(&pins, MapSizes::default())?;
    assert_eq!(
        second.state()?,
        state,
        "adopted the policy as it was, no flush"
    );
    assert!(
        second
            .counters()?
            .values()
            .map(|(packets, _)| packets)
            .sum::<u64>()
            >= 4 * PACKETS as u64,
        "adopted the counters"
    );
    attach(&mut second)??;
    assert_eq!(delivered(granted)?, PACKETS);
    second.install(&one_udp_grant(CLIENT, granted, false), &Clock::now()?)?;
    assert_eq!(
        delivered(granted)?,
        0,
        "the adopting datapath is the one in charge"
    );

    // Below 6.6 the TC attachments are filters, named by their interface.
    net.server.enter(|| unpin_all(&pins))??;
    assert_eq!(
        delivered(other)?,
        PACKETS,
        "torn down while the datapath still runs"
    );
    drop(second);
    assert_eq!(
        delivered(other)?,
        PACKETS,
        "torn down: traffic flows as before mesh"
    );
    assert!(!pins.root().exists(), "nothing of ours left on the bpffs");
    Ok(())
}
