//! Process bindings in the kernel: the cgroup socket programs, attached to
//! the agent's cgroup root, and the source guard, attached to the root of
//! the cgroup hierarchy, all pinned beside the interface links; and the
//! entries of each binding — its cgroup in `CGROUPS`, its source addresses
//! in `IDENTITY_HOSTS` under the live policy generation and in
//! `SOURCE_OWNERS`. How bindings come and go is in docs/identity.md.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs, io,
    net::IpAddr,
    os::fd::{AsFd as _, BorrowedFd},
    path::{Path, PathBuf},
};

use aya::{
    Ebpf,
    maps::{
        HashMap, MapData,
        lpm_trie::{Key, LpmTrie},
    },
    programs::{CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSockAddr, links::FdLink},
};
use mesh_common::{AddrKey, CgroupBinding, IdentityValue, config, maps, programs};

use super::{
    BoundHost, Clock, Datapath, DatapathError, Pins, Prefix,
    install::{insert, insert_lpm},
    map_error, program, program_error, sys,
    traffic::ignore_missing,
};

/// The socket programs, each pinned as `links/cgroup/<program>`.
const SOCKET_PROGRAMS: [&str; 4] = [
    programs::CONNECT4,
    programs::CONNECT6,
    programs::SENDMSG4,
    programs::SENDMSG6,
];

/// Loads the socket programs of a freshly loaded object.
pub(super) fn load_socket_programs(ebpf: &mut Ebpf) -> Result<(), DatapathError> {
    for name in SOCKET_PROGRAMS {
        program::<CgroupSockAddr>(ebpf, name)?
            .load()
            .map_err(program_error(name))?;
    }
    program::<CgroupSkb>(ebpf, programs::SOURCE_GUARD)?
        .load()
        .map_err(program_error(programs::SOURCE_GUARD))
}

fn links_dir(pins: &Pins) -> PathBuf {
    pins.root().join("links").join("cgroup")
}

impl Datapath {
    /// Attaches the socket programs to the cgroup `root` (cgroup v2), so
    /// that they judge every process below it, and the source guard to
    /// `hierarchy`, the root of the cgroup hierarchy, so that it sees every
    /// socket on the host; pins the links. Where an earlier agent pinned
    /// them, this agent's programs take their place in the same links
    /// atomically.
    pub fn attach_cgroup_pinned(
        &mut self,
        pins: &Pins,
        root: &Path,
        hierarchy: &Path,
    ) -> Result<(), DatapathError> {
        let dir = links_dir(pins);
        fs::create_dir_all(&dir).map_err(pin_error(&dir))?;
        let cgroup = fs::File::open(root).map_err(pin_error(root))?;
        for name in SOCKET_PROGRAMS {
            let path = dir.join(name);
            let program = program::<CgroupSockAddr>(&mut self.ebpf, name)?;
            if adopt_link(&path, program.fd().map_err(program_error(name))?.as_fd())? {
                continue;
            }
            // A link, never a legacy attachment: the kernel allows several
            // programs per cgroup hook with links, whatever the mode says.
            let id = program
                .attach(&cgroup, CgroupAttachMode::Single)
                .map_err(program_error(name))?;
            pin_link(program.take_link(id).map_err(program_error(name))?, &path)?;
        }
        let name = programs::SOURCE_GUARD;
        let path = dir.join(name);
        let program = program::<CgroupSkb>(&mut self.ebpf, name)?;
        if !adopt_link(&path, program.fd().map_err(program_error(name))?.as_fd())? {
            let hierarchy = fs::File::open(hierarchy).map_err(pin_error(hierarchy))?;
            let id = program
                .attach(
                    &hierarchy,
                    CgroupSkbAttachType::Egress,
                    CgroupAttachMode::Single,
                )
                .map_err(program_error(name))?;
            pin_link(program.take_link(id).map_err(program_error(name))?, &path)?;
        }
        Ok(())
    }

    /// Makes `SOURCE_OWNERS` hold exactly `owners`: prefix → the cgroup
    /// whose sockets may send from it, 0 for none.
    pub fn sync_source_owners(
        &mut self,
        owners: &BTreeMap<Prefix, u64>,
    ) -> Result<(), DatapathError> {
        let name = maps::SOURCE_OWNERS;
        let mut map: LpmTrie<&mut MapData, [u8; 16], u64> = self.map(name)?;
        let wanted: BTreeMap<(u32, [u8; 16]), u64> = owners
            .iter()
            .map(|(prefix, owner)| ((u32::from(prefix.len), prefix.addr.octets()), *owner))
            .collect();
        let present: Vec<Key<[u8; 16]>> = map
            .keys()
            .collect::<Result<_, _>>()
            .map_err(map_error(name))?;
        for (&(len, addr), &owner) in &wanted {
            insert_lpm(name, &mut map, &Key::new(len, addr), owner)?;
        }
        for key in present {
            if !wanted.contains_key(&(key.prefix_len(), key.data())) {
                ignore_missing(map.remove(&key)).map_err(map_error(name))?;
            }
        }
        Ok(())
    }

    /// Binds the processes of cgroup `id` as `binding` says, or updates the
    /// binding (a refreshed token).
    pub fn set_cgroup_binding(
        &mut self,
        id: u64,
        binding: &CgroupBinding,
    ) -> Result<(), DatapathError> {
        let mut cgroups: HashMap<_, u64, CgroupBinding> = self.map(maps::CGROUPS)?;
        insert(maps::CGROUPS, &mut cgroups, id, *binding)
    }

    /// Unbinds cgroup `id`: its processes open no more flows.
    pub fn remove_cgroup_binding(&mut self, id: u64) -> Result<(), DatapathError> {
        let mut cgroups: HashMap<_, u64, CgroupBinding> = self.map(maps::CGROUPS)?;
        ignore_missing(cgroups.remove(&id)).map_err(map_error(maps::CGROUPS))
    }

    /// The cgroups with a binding in the kernel.
    pub fn cgroup_bindings(&mut self) -> Result<Vec<(u64, CgroupBinding)>, DatapathError> {
        let cgroups: HashMap<&mut MapData, u64, CgroupBinding> = self.map(maps::CGROUPS)?;
        cgroups
            .iter()
            .collect::<Result<_, _>>()
            .map_err(map_error(maps::CGROUPS))
    }

    /// Packets from `bound.addr` are from identity `bound.tag` until it
    /// expires, under the live policy. A policy installed later must carry
    /// the entry itself.
    pub fn add_identity_host(
        &mut self,
        bound: &BoundHost,
        clock: &Clock,
    ) -> Result<(), DatapathError> {
        let key = self.live_host_key(bound.addr)?;
        let mut hosts: HashMap<_, AddrKey, IdentityValue> = self.map(maps::IDENTITY_HOSTS)?;
        // Live flows from it hold until their old expiry, then are judged
        // again under the new one.
        insert(
            maps::IDENTITY_HOSTS,
            &mut hosts,
            key,
            bound.to_kernel(clock),
        )
    }

    /// Packets from `addr` have no identity any more; live flows from it
    /// revalidate on their next packet, and end.
    pub fn remove_identity_host(&mut self, addr: IpAddr) -> Result<(), DatapathError> {
        let key = self.live_host_key(addr)?;
        let mut hosts: HashMap<_, AddrKey, IdentityValue> = self.map(maps::IDENTITY_HOSTS)?;
        ignore_missing(hosts.remove(&key)).map_err(map_error(maps::IDENTITY_HOSTS))?;
        self.bump_epoch()
    }

    fn live_host_key(&self, addr: IpAddr) -> Result<AddrKey, DatapathError> {
        Ok(AddrKey {
            generation: config::generation(self.state()?),
            addr: Prefix::host(addr).addr.octets(),
        })
    }

    /// The identity tags in `REVOKED`.
    pub fn revoked(&mut self) -> Result<BTreeSet<u32>, DatapathError> {
        let revoked: HashMap<&mut MapData, u32, u32> = self.map(maps::REVOKED)?;
        revoked
            .keys()
            .collect::<Result<_, _>>()
            .map_err(map_error(maps::REVOKED))
    }
}

fn pin_error(path: &Path) -> impl FnOnce(io::Error) -> DatapathError {
    let path = path.to_owned();
    move |source| DatapathError::Pin { path, source }
}

/// Swaps `program` into the link pinned at `path` by an earlier agent;
/// false if there is none to adopt.
pub(crate) fn adopt_link(path: &Path, program: BorrowedFd<'_>) -> Result<bool, DatapathError> {
    match sys::update_pinned_link(path, program) {
        Ok(()) => Ok(true),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(false),
        // A link whose cgroup is gone: replace it.
        Err(err) if err.raw_os_error() == Some(libc::ENOLINK) => {
            fs::remove_file(path).map_err(pin_error(path))?;
            Ok(false)
        }
        Err(err) => Err(pin_error(path)(err)),
    }
}

/// Pins `link` at `path`, so that it outlives this process.
pub(crate) fn pin_link<L>(link: L, path: &Path) -> Result<(), DatapathError>
where
    FdLink: TryFrom<L>,
    <FdLink as TryFrom<L>>::Error: std::error::Error + Send + Sync + 'static,
{
    FdLink::try_from(link)
        .map_err(|err| pin_error(path)(io::Error::other(err)))?
        .pin(path)
        .map_err(|err| pin_error(path)(io::Error::other(err)))?;
    Ok(())
}

/// Detaches the socket programs' links at once and removes their pins;
/// [`super::unpin_all`] does the rest.
pub(super) fn unpin_socket_links(pins: &Pins) -> Result<(), DatapathError> {
    let dir = links_dir(pins);
    let links = match fs::read_dir(&dir) {
        Ok(links) => links,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(err) => return Err(pin_error(&dir)(err)),
    };
    for link in links {
        unpin_link(&link.map_err(pin_error(&dir))?.path())?;
    }
    fs::remove_dir(&dir).map_err(pin_error(&dir))
}

/// Detaches the link pinned at `path` at once and removes the pin; a link
/// already defunct (its cgroup or interface gone) only loses its pin.
pub(crate) fn unpin_link(path: &Path) -> Result<(), DatapathError> {
    match sys::detach_pinned_link(path) {
        Err(err) if err.raw_os_error() != Some(libc::ENOLINK) => Err(pin_error(path)(err)),
        _ => fs::remove_file(path).map_err(pin_error(path)),
    }
}
