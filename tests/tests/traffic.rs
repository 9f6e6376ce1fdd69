//! Real TCP, UDP and ICMP traffic through the programs attached to a veth:
//! XDP on ingress and TC on egress of the client's interface, the client
//! reaching a server through a router. Granted flows and their replies work,
//! ungranted ones fail, and a router's "fragmentation needed" for a live
//! flow gets back to the client. The kernel says how TC is attached: by a
//! tcx link from 6.6 on, as a clsact filter before.

use std::{
    fs,
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    os::fd::{AsRawFd, FromRawFd as _, OwnedFd},
    thread,
    time::Duration,
};

use anyhow::{bail, ensure};
use aya::programs::{SchedClassifier, TcAttachType, XdpMode, links::LinkType, loaded_links};
use mesh_agent::datapath::{Clock, Datapath, GrantLimits, PolicyEntries, PortBlock, Prefix};
use mesh_common::{programs, proto};
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

    let tcx = kernel_has_tcx()?;
    let (by_tcx, by_clsact) = net.client.enter(tc_egress)??;
    if tcx {
        assert_eq!(by_tcx?, [programs::TC], "a tcx link from 6.6 on");
        assert_eq!(by_clsact, [], "no clsact filter where tcx is");
    } else {
        assert!(by_tcx.is_err(), "a kernel before 6.6 knows no tcx");
        assert_eq!(
            by_clsact,
            [Filter {
                kind: "bpf".to_owned(),
                priority: 1,
                handle: 0x6d65_7368,
                program: programs::TC.to_owned(),
            }],
            "mesh's clsact filter before 6.6"
        );
    }

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
    let (by_tcx, by_clsact) = net.client.enter(tc_egress)??;
    if tcx {
        assert_eq!(by_tcx?, Vec::<String>::new(), "detached: no tcx link left");
    }
    assert_eq!(by_clsact, [], "detached: no clsact filter left");
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

/// Whether the running kernel has tcx: 6.6 and later, by its release
/// ("6.1.0-56-cloud-amd64").
fn kernel_has_tcx() -> anyhow::Result<bool> {
    let release = fs::read_to_string("/proc/sys/kernel/osrelease")?;
    let mut numbers = release.trim().split(['.', '-']).map(str::parse::<u32>);
    let (Some(Ok(major)), Some(Ok(minor))) = (numbers.next(), numbers.next()) else {
        bail!("a kernel release without a version: {release}");
    };
    Ok((major, minor) >= (6, 6))
}

/// The programs on the client's egress, in its namespace: by tcx, each
/// named and checked to be held by a tcx link (an error where the kernel
/// has no tcx), and by clsact filters.
fn tc_egress() -> anyhow::Result<(anyhow::Result<Vec<String>>, Vec<Filter>)> {
    let by_tcx = SchedClassifier::query_tcx("c0", TcAttachType::Egress)
        .map_err(anyhow::Error::from)
        .and_then(|(_, attached)| {
            // Other tests' links may vanish while listed: skip what fails.
            let tcx_links: Vec<u32> = loaded_links()
                .filter_map(Result::ok)
                .filter(|link| matches!(link.link_type(), Ok(LinkType::Tcx)))
                .map(|link| link.program_id())
                .collect();
            attached
                .iter()
                .map(|program| {
                    let name = program.name_as_str().unwrap_or_default().to_owned();
                    ensure!(tcx_links.contains(&program.id()), "{name}: no tcx link");
                    Ok(name)
                })
                .collect()
        });
    Ok((by_tcx, clsact_egress_filters("c0")?))
}

/// A filter on a clsact hook, as the kernel lists it.
#[derive(Debug, PartialEq)]
struct Filter {
    kind: String,
    priority: u16,
    handle: u32,
    /// The BPF program's name (`TCA_BPF_NAME`) for a bpf filter.
    program: String,
}

/// The filters on `interface`'s clsact egress hook, in the calling thread's
/// namespace, through an RTM_GETTFILTER dump: busybox in the test VMs has no
/// `tc`. None where there is no clsact qdisc.
fn clsact_egress_filters(interface: &str) -> anyhow::Result<Vec<Filter>> {
    // TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_EGRESS).
    const CLSACT_EGRESS: u32 = 0xffff_fff3;
    const TCA_KIND: u16 = 1;
    const TCA_OPTIONS: u16 = 2;
    const TCA_BPF_NAME: u16 = 7;
    const NLMSG_HDRLEN: usize = 16;
    const TCMSG_LEN: usize = 20;
    const NLMSG_ERROR: u16 = libc::NLMSG_ERROR as u16;
    const NLMSG_DONE: u16 = libc::NLMSG_DONE as u16;

    let ifindex = nix::net::if_::if_nametoindex(interface)?;
    // SAFETY: socket(2) with constant arguments; the fd is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    ensure!(
        fd >= 0,
        "netlink socket: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: a new fd, owned by nothing else.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };

    // struct nlmsghdr, then struct tcmsg: family, padding, ifindex, handle,
    // parent, info.
    let mut request = Vec::new();
    request.extend(((NLMSG_HDRLEN + TCMSG_LEN) as u32).to_ne_bytes());
    request.extend(libc::RTM_GETTFILTER.to_ne_bytes());
    request.extend(((libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16).to_ne_bytes());
    request.extend([1u32, 0].map(u32::to_ne_bytes).concat());
    request.extend([libc::AF_UNSPEC as u8, 0, 0, 0]);
    request.extend(
        [ifindex, 0, CLSACT_EGRESS, 0]
            .map(u32::to_ne_bytes)
            .concat(),
    );
    // SAFETY: the request's bytes, to the kernel (the socket's default peer).
    let sent = unsafe {
        libc::send(
            socket.as_raw_fd(),
            request.as_ptr().cast(),
            request.len(),
            0,
        )
    };
    ensure!(
        sent >= 0,
        "netlink send: {}",
        std::io::Error::last_os_error()
    );

    let u32_at = |b: &[u8], at: usize| u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
    let text =
        |b: &[u8]| String::from_utf8_lossy(b.split(|&c| c == 0).next().unwrap_or(b)).into_owned();

    let mut filters = Vec::new();
    let mut buf = vec![0u8; 65536];
    loop {
        // SAFETY: receives into a buffer of the length passed.
        let n = unsafe { libc::recv(socket.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        ensure!(n > 0, "netlink recv: {}", std::io::Error::last_os_error());
        let mut messages = &buf[..n as usize];
        while messages.len() >= NLMSG_HDRLEN {
            let len = u32_at(messages, 0) as usize;
            ensure!(
                len >= NLMSG_HDRLEN && len <= messages.len(),
                "a torn netlink message"
            );
            let message = &messages[..len];
            match u16_at(message, 4) {
                NLMSG_DONE => return Ok(filters),
                NLMSG_ERROR => {
                    let code = i32::from_ne_bytes(message[16..20].try_into()?);
                    bail!(
                        "listing filters: {}",
                        std::io::Error::from_raw_os_error(-code)
                    );
                }
                libc::RTM_NEWTFILTER => {
                    let handle = u32_at(message, NLMSG_HDRLEN + 8);
                    let info = u32_at(message, NLMSG_HDRLEN + 16);
                    let mut filter = Filter {
                        kind: String::new(),
                        priority: (info >> 16) as u16,
                        handle,
                        program: String::new(),
                    };
                    for (kind, value) in attributes(&message[NLMSG_HDRLEN + TCMSG_LEN..]) {
                        match kind {
                            TCA_KIND => filter.kind = text(value),
                            TCA_OPTIONS => {
                                if let Some((_, name)) = attributes(value)
                                    .into_iter()
                                    .find(|(kind, _)| *kind == TCA_BPF_NAME)
                                {
                                    filter.program = text(name);
                                }
                            }
                            _ => {}
                        }
                    }
                    // Each priority's first message names its classifier,
                    // with no handle: not a filter.
                    if handle != 0 {
                        filters.push(filter);
                    }
                }
                _ => {}
            }
            messages = &messages[len.next_multiple_of(4).min(messages.len())..];
        }
    }
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_ne_bytes([b[at], b[at + 1]])
}

/// The netlink attributes in `b`: type (without the nested and byte-order
/// flags) and value.
fn attributes(mut b: &[u8]) -> Vec<(u16, &[u8])> {
    let mut found = Vec::new();
    while b.len() >= 4 && usize::from(u16_at(b, 0)) >= 4 {
        let len = usize::from(u16_at(b, 0)).min(b.len());
        found.push((u16_at(b, 2) & 0x3fff, &b[4..len]));
        b = &b[len.next_multiple_of(4).min(b.len())..];
    }
    found
}
