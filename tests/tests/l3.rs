//! The TC program for L3 devices (no Ethernet header, as on WireGuard
//! interfaces) on a real one: a TUN device in a network namespace. Packets
//! written into the TUN arrive as ingress on the device; the local stack's
//! replies leave through its egress and are read back from the TUN.

use std::{
    fs::{File, OpenOptions},
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    os::fd::AsRawFd,
    time::Duration,
};

use aya::programs::TcAttachType;
use mesh_agent::datapath::{Clock, Datapath};
use mesh_tests::{NetNs, one_udp_grant, packet::Packet, require_root};

const LOCAL: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const PEER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const STRANGER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 3);
const TUN: &str = "tun0";

/// Opens a TUN device named `TUN` in the calling thread's namespace;
/// the device lives as long as the file.
fn open_tun() -> std::io::Result<File> {
    let tun = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")?;
    let mut request = [0u8; 40];
    request[..TUN.len()].copy_from_slice(TUN.as_bytes());
    let flags = (libc::IFF_TUN | libc::IFF_NO_PI) as u16;
    request[16..18].copy_from_slice(&flags.to_ne_bytes());
    // SAFETY: TUNSETIFF reads a struct ifreq, which `request` is laid out as.
    if unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF, request.as_mut_ptr()) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(tun)
}

/// Whether a datagram written into the TUN as if from `from` reaches the
/// socket.
fn arrives(tun: &mut File, socket: &UdpSocket, from: Ipv4Addr, port: u16) -> anyhow::Result<bool> {
    let packet = Packet::udp(from.into(), 4000, LOCAL.into(), port).bare();
    tun.write_all(&packet.bytes())?;
    let mut buf = [0u8; 64];
    Ok(socket.recv_from(&mut buf).is_ok())
}

/// The next IPv4 packet the stack sends out of the TUN, skipping the IPv6
/// chatter of a new interface; `None` after a second of silence.
fn next_ipv4(tun: &mut File) -> anyhow::Result<Option<Vec<u8>>> {
    let mut poll = libc::pollfd {
        fd: tun.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    for _ in 0..20 {
        // SAFETY: one valid pollfd.
        if unsafe { libc::poll(&mut poll, 1, 1000) } <= 0 {
            return Ok(None);
        }
        let mut buf = vec![0u8; 2048];
        let n = tun.read(&mut buf)?;
        if n > 0 && buf[0] >> 4 == 4 {
            buf.truncate(n);
            return Ok(Some(buf));
        }
    }
    Ok(None)
}

#[test]
fn tc_judges_bare_ip_on_l3_devices_both_ways() -> anyhow::Result<()> {
    require_root();
    let ns = NetNs::new()?;
    let mut tun = ns.enter(open_tun)??;
    ns.ip(&["addr", "add", &format!("{LOCAL}/24"), "dev", TUN])?;
    ns.ip(&["link", "set", TUN, "up"])?;
    let service = SocketAddr::from((LOCAL, 5000));
    let granted = ns.enter(|| UdpSocket::bind(service))??;
    let other = ns.enter(|| UdpSocket::bind((LOCAL, 5001)))??;
    for socket in [&granted, &other] {
        socket.set_read_timeout(Some(Duration::from_millis(300)))?;
    }

    let mut datapath = Datapath::load()?;
    datapath.install(&one_udp_grant(PEER, service, true), &Clock::now()?)?;
    ns.enter(|| -> anyhow::Result<()> {
        datapath.attach_tc(TUN, TcAttachType::Ingress, true)?;
        datapath.attach_tc(TUN, TcAttachType::Egress, true)?;
        Ok(())
    })??;

    assert!(arrives(&mut tun, &granted, PEER, 5000)?, "granted datagram");
    assert!(
        !arrives(&mut tun, &other, PEER, 5001)?,
        "a port no service offers"
    );
    assert!(
        !arrives(&mut tun, &granted, STRANGER, 5000)?,
        "an unknown source"
    );

    // The reply leaves through the egress program as part of the flow.
    granted.send_to(b"reply", (PEER, 4000))?;
    let reply = next_ipv4(&mut tun)?.expect("the reply left through the TUN");
    assert_eq!(&reply[16..20], &PEER.octets(), "to the peer");
    assert!(reply.ends_with(b"reply"));

    // Nothing the policy does not cover leaves either.
    other.send_to(b"leak", (STRANGER, 4000))?;
    assert_eq!(next_ipv4(&mut tun)?, None, "an ungranted datagram left");
    let counters = datapath.counters()?;
    let denied_out = counters
        .iter()
        .filter(|((_, _, reason), _)| !reason.allows())
        .map(|(_, (packets, _))| packets)
        .sum::<u64>();
    assert!(denied_out >= 3, "{counters:?}");
    Ok(())
}
