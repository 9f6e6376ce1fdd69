//! Real TCP, UDP and ICMP traffic through the programs attached to a veth:
//! XDP on ingress and TC on egress of the client's interface, the client
//! reaching a server through a router. Granted flows and their replies work,
//! ungranted ones fail, and a router's "fragmentation needed" for a live
//! flow gets back to the client.

use std::{
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    os::fd::AsRawFd,
    thread,
    time::Duration,
};

use aya::programs::{TcAttachType, XdpMode};
use mesh_agent::datapath::{Clock, Datapath, GrantLimits, PolicyEntries, PortBlock, Prefix};
use mesh_common::proto;
use mesh_tests::{NetNs, VethEnd, require_root, tcp_echo_server, tcp_echo_works, veth_pair};

const CLIENT: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
const ROUTER_A: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 254);
const ROUTER_B: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 254);
const SERVER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);
const NARROW_MTU: u32 = 1280;
const PATIENCE: Duration = Duration::from_secs(1);

/// The client (identity 7) may reach the server (service 1) on 443/tcp,
/// 53/udp and ping; 444/tcp and 54/udp are part of the service but not
/// granted (slot 1).
fn policy() -> PolicyEntries {
    let granted = [(proto::TCP, 443), (proto::UDP, 53)];
    let offered = [(proto::TCP, 444), (proto::UDP, 54)];
    let blocks = |ports: &[(u8, u16)], slot: u32| -> Vec<(u32, PortBlock, u32, u32)> {
        ports
            .iter()
            .flat_map(|&(proto, port)| PortBlock::cover(proto, port, port))
            .map(|block| (1, block, 1, slot))
            .collect()
    };
    let mut service_ports = blocks(&granted, 0);
    service_ports.extend(blocks(&offered, 1));
    service_ports.push((
        1,
        PortBlock {
            proto: proto::ICMP_ECHO,
            port: 0,
            bits: 16,
        },
        1,
        0,
    ));
    PolicyEntries {
        identities: vec![(Prefix::host(CLIENT.into()), 7)],
        destinations: vec![(Prefix::host(SERVER.into()), 1)],
        service_ports,
        grants: vec![((7, 1, 0), vec![0])],
        bound: Vec::new(),
        grant_limits: vec![GrantLimits::default()],
    }
}

struct Topology {
    client: NetNs,
    _router: NetNs,
    server: NetNs,
}

/// client —(1500)— router —(1280)— server
fn topology() -> anyhow::Result<Topology> {
    let client = NetNs::new()?;
    let router = NetNs::new()?;
    let server = NetNs::new()?;
    veth_pair(
        &VethEnd {
            ns: &client,
            name: "c0",
            addr: CLIENT,
        },
        &VethEnd {
            ns: &router,
            name: "r0",
            addr: ROUTER_A,
        },
    )?;
    veth_pair(
        &VethEnd {
            ns: &router,
            name: "r1",
            addr: ROUTER_B,
        },
        &VethEnd {
            ns: &server,
            name: "s0",
            addr: SERVER,
        },
    )?;
    for (ns, dev) in [(&router, "r1"), (&server, "s0")] {
        ns.ip(&["link", "set", dev, "mtu", &NARROW_MTU.to_string()])?;
    }
    router.enable_forwarding()?;
    client.ip(&["route", "add", "default", "via", &ROUTER_A.to_string()])?;
    server.ip(&["route", "add", "default", "via", &ROUTER_B.to_string()])?;
    Ok(Topology {
        client,
        _router: router,
        server,
    })
}

/// Sends one datagram to `port` and waits for the server's answer.
fn udp_round_trip(client: &NetNs, server: &NetNs, port: u16) -> anyhow::Result<bool> {
    let responder = server.enter(|| UdpSocket::bind((SERVER, port)))??;
    responder.set_read_timeout(Some(PATIENCE))?;
    let answering = thread::spawn(move || {
        let mut buf = [0u8; 64];
        if let Ok((n, from)) = responder.recv_from(&mut buf) {
            let _ = responder.send_to(&buf[..n], from);
        }
    });
    let socket = client.enter(|| UdpSocket::bind((CLIENT, 0)))??;
    socket.set_read_timeout(Some(PATIENCE * 2))?;
    socket.send_to(b"query", (SERVER, port))?;
    let mut buf = [0u8; 64];
    let answered = socket.recv(&mut buf).is_ok_and(|n| &buf[..n] == b"query");
    answering.join().expect("responder thread");
    Ok(answered)
}

/// The path MTU the client's kernel has learnt for a connected UDP socket
/// after sending one datagram too big for the narrow link, with DF set.
fn learnt_path_mtu(client: &NetNs) -> anyhow::Result<u32> {
    let socket = client.enter(|| UdpSocket::bind((CLIENT, 0)))??;
    socket.connect((SERVER, 53))?;
    let fd = socket.as_raw_fd();
    let set = |option, value: libc::c_int| {
        // SAFETY: a valid socket and a c_int option value.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                libc::IPPROTO_IP,
                option,
                (&value as *const libc::c_int).cast(),
                4,
            )
        };
        assert_eq!(rc, 0, "setsockopt: {}", std::io::Error::last_os_error());
    };
    set(libc::IP_MTU_DISCOVER, libc::IP_PMTUDISC_DO);
    socket.send(&[0u8; 1400])?;
    thread::sleep(Duration::from_millis(300));
    let mut mtu: libc::c_int = 0;
    let mut len = 4 as libc::socklen_t;
    // SAFETY: a valid socket and a c_int-sized out buffer.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_IP,
            libc::IP_MTU,
            (&mut mtu as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    assert_eq!(rc, 0, "getsockopt: {}", std::io::Error::last_os_error());
    Ok(mtu as u32)
}

#[test]
fn real_traffic_through_xdp_ingress_and_tc_egress() -> anyhow::Result<()> {
    require_root();
    let net = topology()?;
    tcp_echo_server(&net.server, SocketAddr::from((SERVER, 443)))?;
    tcp_echo_server(&net.server, SocketAddr::from((SERVER, 444)))?;
    let ping =
        |client: &NetNs| client.exec_succeeds("ping", &["-c", "1", "-W", "1", &SERVER.to_string()]);

    // Without mesh everything works.
    assert!(tcp_echo_works(
        &net.client,
        CLIENT,
        SocketAddr::from((SERVER, 443)),
        PATIENCE
    )?);
    assert!(tcp_echo_works(
        &net.client,
        CLIENT,
        SocketAddr::from((SERVER, 444)),
        PATIENCE
    )?);
    assert!(udp_round_trip(&net.client, &net.server, 54)?);
    assert!(ping(&net.client)?);

    let mut datapath = Datapath::load()?;
    datapath.install(&policy(), &Clock::now()?)?;
    let attachments = net.client.enter(|| -> anyhow::Result<_> {
        Ok([
            datapath.attach_xdp("c0", XdpMode::default())?,
            datapath.attach_tc("c0", TcAttachType::Egress, false)?,
        ])
    })??;

    assert!(
        tcp_echo_works(
            &net.client,
            CLIENT,
            SocketAddr::from((SERVER, 443)),
            PATIENCE
        )?,
        "granted TCP flow and its replies"
    );
    assert!(
        !tcp_echo_works(
            &net.client,
            CLIENT,
            SocketAddr::from((SERVER, 444)),
            PATIENCE
        )?,
        "ungranted TCP port"
    );
    assert!(
        udp_round_trip(&net.client, &net.server, 53)?,
        "granted UDP and its reply"
    );
    assert!(
        !udp_round_trip(&net.client, &net.server, 54)?,
        "ungranted UDP port"
    );
    assert!(ping(&net.client)?, "granted echo request and its reply");
    assert_eq!(
        learnt_path_mtu(&net.client)?,
        NARROW_MTU,
        "the router's PMTU error reached the client"
    );

    // In the namespace: a clsact filter (kernels < 6.6) is named by ifindex.
    net.client.enter(|| -> anyhow::Result<()> {
        for attachment in attachments {
            datapath.detach(attachment)?;
        }
        Ok(())
    })??;
    assert!(
        tcp_echo_works(
            &net.client,
            CLIENT,
            SocketAddr::from((SERVER, 444)),
            PATIENCE
        )?,
        "detached: everything works again"
    );
    Ok(())
}
