//! Enforcement outlives the datapath that set it up: with maps and links
//! pinned on a bpffs, dropping the datapath (as a killed agent would) leaves
//! traffic judged as before; a new datapath adopts the maps with their
//! flows and takes over the links without a gap; unpinning everything lets
//! traffic flow as if mesh had never been there.

use std::{net::SocketAddr, time::Duration};

use mesh_agent::datapath::{Clock, Datapath, Hook, MapSizes, Pins, unpin_all};
use mesh_common::maps as mesh_maps;
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

/// Pins of another map layout, as an agent of another version may leave,
/// are refused before anything is loaded, with the map and both layouts
/// named: programs given such a map would misread it.
#[test]
fn pins_of_another_map_layout_are_refused() -> anyhow::Result<()> {
    require_root();
    let bpffs = BpfFs::mount()?;
    let pins = Pins::new(bpffs.path().join("mesh"));
    let maps = pins.root().join("maps");
    std::fs::create_dir_all(&maps)?;
    // IDENTITY_HOSTS as it was with 4-byte values.
    pin_hash_map(&maps.join(mesh_maps::IDENTITY_HOSTS), 17, 4)?;
    let Err(err) = Datapath::load_pinned(&pins, MapSizes::default()) else {
        anyhow::bail!("pins of another layout were adopted");
    };
    let said = err.to_string();
    assert!(
        said.contains("IDENTITY_HOSTS")
            && said.contains("values of 4 B")
            && said.contains("teardown"),
        "{said}"
    );
    Ok(())
}

/// bpf(2) commands and a map type, from the kernel's uapi.
const BPF_MAP_CREATE: u32 = 0;
const BPF_OBJ_PIN: u32 = 6;
const BPF_MAP_TYPE_HASH: u32 = 1;

/// Creates a one-entry hash map with these sizes and pins it at `path`.
fn pin_hash_map(path: &std::path::Path, key_size: u32, value_size: u32) -> anyhow::Result<()> {
    // `union bpf_attr` for BPF_MAP_CREATE: type, key size, value size, max
    // entries; the rest zero.
    let mut create = [0u32; 32];
    create[..4].copy_from_slice(&[BPF_MAP_TYPE_HASH, key_size, value_size, 1]);
    let fd = bpf(BPF_MAP_CREATE, &mut create)?;
    let path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())?;
    // For BPF_OBJ_PIN: the path's address, then the fd.
    let mut pin = [0u32; 32];
    let address = path.as_ptr() as u64;
    pin[0] = address as u32;
    pin[1] = (address >> 32) as u32;
    pin[2] = fd as u32;
    let pinned = bpf(BPF_OBJ_PIN, &mut pin);
    // SAFETY: the map's fd, ours to close; the pin keeps the map.
    unsafe { libc::close(fd) };
    pinned.map(|_| ())
}

fn bpf(command: u32, attr: &mut [u32; 32]) -> anyhow::Result<i32> {
    // SAFETY: bpf(2) with an attribute buffer of the size passed.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            command,
            attr.as_mut_ptr(),
            std::mem::size_of_val(attr),
        )
    };
    anyhow::ensure!(
        ret >= 0,
        "bpf({command}): {}",
        std::io::Error::last_os_error()
    );
    Ok(ret as i32)
}
