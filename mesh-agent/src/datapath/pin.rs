//! Pinning under one bpffs folder, so that enforcement outlives the agent:
//! maps under `maps/`, links under `links/`. A restarted agent adopts the
//! pinned maps with their contents (policy, flows, counters) and swaps its
//! freshly loaded programs into the pinned links atomically, so there is
//! neither a gap nor a flush.

use std::{
    fs, io, mem,
    path::{Path, PathBuf},
};

use aya::{
    maps::MapData,
    programs::{
        Link as _, ProgramError, TcAttachType,
        links::{FdLink, LinkError, PinnedLink},
        tc::SchedClassifierLink,
        xdp::XdpLink,
    },
};
use mesh_common::maps;

use super::{Attachment, Datapath, DatapathError};

/// Every map the programs declare, in the order they are pinned.
pub(super) const ALL_MAPS: [&str; 19] = [
    maps::CONFIG,
    maps::IDENTITY_HOSTS,
    maps::IDENTITY_PREFIXES,
    maps::DESTINATIONS,
    maps::SERVICE_PORTS,
    maps::GRANTS,
    maps::GRANT_INFO,
    maps::RATE_BUCKETS,
    maps::REVOKED,
    maps::FLOWS,
    maps::FRAGMENTS,
    maps::COUNTERS,
    maps::LAST_VERDICT,
    maps::SCRATCH,
    maps::EVENTS,
    maps::EVENT_BUCKET,
    maps::EVENTS_LOST,
    maps::CGROUPS,
    maps::SOURCE_OWNERS,
];

/// Where an attachment hooks in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Hook {
    Xdp,
    TcIngress,
    TcEgress,
}

impl Hook {
    pub const ALL: [Hook; 3] = [Hook::Xdp, Hook::TcIngress, Hook::TcEgress];

    pub fn name(self) -> &'static str {
        match self {
            Hook::Xdp => "xdp",
            Hook::TcIngress => "tc-ingress",
            Hook::TcEgress => "tc-egress",
        }
    }

    fn tc_direction(self) -> Option<TcAttachType> {
        match self {
            Hook::Xdp => None,
            Hook::TcIngress => Some(TcAttachType::Ingress),
            Hook::TcEgress => Some(TcAttachType::Egress),
        }
    }
}

/// The layout of one agent's pins.
#[derive(Clone, Debug)]
pub struct Pins {
    root: PathBuf,
}

impl Pins {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub(super) fn map_path(&self, name: &str) -> PathBuf {
        self.root.join("maps").join(name)
    }

    /// Every map's pin path.
    pub(super) fn map_paths(&self) -> Vec<(&'static str, PathBuf)> {
        ALL_MAPS
            .iter()
            .map(|&name| (name, self.map_path(name)))
            .collect()
    }

    /// Checks that every map pinned here has the key and value size that
    /// `object` declares: programs given a map of another layout
    /// would be refused by the verifier, or worse, misread it.
    pub(super) fn check_layout(&self, object: &[u8]) -> Result<(), DatapathError> {
        check_layout(object, &self.map_paths())
    }

    /// `links/<hook>/<interface>`. bpffs refuses names with a dot, which
    /// interface names may have (VLANs: `eth0.100`), and interface names
    /// never have a colon: so dots become colons.
    pub fn has_link(&self, interface: &str, hook: Hook) -> bool {
        self.link(interface, hook).exists()
    }

    fn link(&self, interface: &str, hook: Hook) -> PathBuf {
        self.root
            .join("links")
            .join(hook.name())
            .join(interface.replace('.', ":"))
    }

    /// Makes the folders; the root must be on a bpffs mount.
    fn create(&self) -> Result<(), DatapathError> {
        let links = self.root.join("links");
        let hooks = Hook::ALL.map(|hook| links.join(hook.name()));
        for dir in [self.root.join("maps")].into_iter().chain(hooks) {
            fs::create_dir_all(&dir).map_err(|source| DatapathError::Pin { path: dir, source })?;
        }
        Ok(())
    }

    /// The pinned links, as (interface, hook, path).
    pub fn links(&self) -> Result<Vec<(String, Hook, PathBuf)>, DatapathError> {
        let mut links = Vec::new();
        for hook in Hook::ALL {
            let dir = self.root.join("links").join(hook.name());
            let entries = match fs::read_dir(&dir) {
                Ok(entries) => entries,
                Err(err) if err.kind() == io::ErrorKind::NotFound => continue,
                Err(source) => return Err(DatapathError::Pin { path: dir, source }),
            };
            for entry in entries.filter_map(Result::ok) {
                let interface = entry.file_name().to_string_lossy().replace(':', ".");
                links.push((interface, hook, entry.path()));
            }
        }
        links.sort_by(|a, b| (&a.0, a.1.name()).cmp(&(&b.0, b.1.name())));
        Ok(links)
    }
}

/// Checks that every map pinned at its path has the key and value size
/// that `object` declares; maps not pinned yet are the loader's to make.
pub(crate) fn check_layout(
    object: &[u8],
    maps: &[(&'static str, PathBuf)],
) -> Result<(), DatapathError> {
    let object = aya_obj::Object::parse(object).map_err(DatapathError::Object)?;
    for &(name, ref path) in maps {
        let Ok(pinned) = MapData::from_pin(path) else {
            // Not pinned yet: the loader makes it.
            continue;
        };
        let info = pinned
            .info()
            .map_err(|source| DatapathError::Map { name, source })?;
        let declared = object
            .maps
            .get(name)
            .ok_or(DatapathError::MissingMap(name))?;
        let describe = |key: u32, value: u32| format!("keys of {key} B, values of {value} B");
        let pinned = describe(info.key_size(), info.value_size());
        let needed = describe(declared.key_size(), declared.value_size());
        if pinned != needed {
            return Err(DatapathError::IncompatiblePin {
                name,
                pinned,
                needed,
            });
        }
    }
    Ok(())
}

impl Datapath {
    /// Loads the programs with every map pinned under `pins`: maps an
    /// earlier agent pinned there are adopted, contents and all.
    pub fn load_pinned(pins: &Pins, sizes: super::MapSizes) -> Result<Self, DatapathError> {
        pins.create()?;
        Self::load_configured(sizes, Some(pins))
    }

    /// Attaches to `interface` at `hook` (XDP in native mode only: callers
    /// fall back to TC where a driver lacks it) and pins the link. If an earlier
    /// agent pinned a link there, this agent's program replaces its program
    /// in that link atomically: packets never meet an unattached interface.
    pub fn attach_pinned(
        &mut self,
        pins: &Pins,
        interface: &str,
        hook: Hook,
    ) -> Result<(), DatapathError> {
        let path = pins.link(interface, hook);
        if let Some(direction) = hook.tc_direction().filter(|_| super::clsact_filters()) {
            return self.attach_pinned_filter(&path, interface, direction);
        }
        let pin_error = |source: io::Error| DatapathError::Pin {
            path: path.clone(),
            source,
        };
        match PinnedLink::from_pin(&path) {
            Ok(pinned) => match self.take_over(FdLink::from(pinned), hook, interface) {
                Ok(attachment) => {
                    // The pin already names this very link; only release
                    // our hold on it, so that dropping the datapath leaves
                    // it be.
                    drop(self.release(attachment)?);
                    Ok(())
                }
                // The interface the link was on is gone (a userspace
                // WireGuard device ends with its agent), and this one of
                // the same name is new: attach afresh in the link's place.
                Err(err) if severed(&err) => {
                    fs::remove_file(&path).map_err(pin_error)?;
                    self.attach_pinned(pins, interface, hook)
                }
                Err(err) => Err(err),
            },
            Err(LinkError::SyscallError(call))
                if call.io_error.kind() == io::ErrorKind::NotFound =>
            {
                let attachment = match hook {
                    Hook::Xdp => self.attach_xdp(interface, aya::programs::XdpMode::Driver)?,
                    Hook::TcIngress => {
                        self.attach_tc(interface, TcAttachType::Ingress, is_l3(interface))?
                    }
                    Hook::TcEgress => {
                        self.attach_tc(interface, TcAttachType::Egress, is_l3(interface))?
                    }
                };
                self.release(attachment)?
                    .pin(&path)
                    .map(drop)
                    .map_err(|err| pin_error(io::Error::other(err)))
            }
            Err(err) => Err(pin_error(io::Error::other(err))),
        }
    }

    /// Below 6.6 a TC attachment is a clsact filter, which is no link and
    /// cannot be pinned, but outlives the agent all the same. Attaching
    /// swaps this datapath's program into the filter an earlier agent left;
    /// the program is pinned in the link's place, so that `status` and
    /// `teardown` find the filter.
    fn attach_pinned_filter(
        &mut self,
        path: &Path,
        interface: &str,
        direction: TcAttachType,
    ) -> Result<(), DatapathError> {
        let name = super::tc_program(is_l3(interface));
        let link = self.attach_clsact(interface, direction, name)?;
        let program = self.tc(name)?;
        // Dropping our hold on the filter would detach it.
        mem::forget(
            program
                .take_link(link)
                .map_err(super::program_error(name))?,
        );
        // Pinned beside the old pin and moved over it, so that at every
        // moment a pin names the filter.
        let mut fresh = path.as_os_str().to_owned();
        fresh.push("~");
        let fresh = PathBuf::from(fresh);
        let pin_error = |path: &Path| {
            let path = path.to_owned();
            move |source| DatapathError::Pin { path, source }
        };
        remove_pin(&fresh, |p| fs::remove_file(p))?;
        program
            .pin(&fresh)
            .map_err(|err| pin_error(&fresh)(io::Error::other(err)))?;
        fs::rename(&fresh, path).map_err(pin_error(path))
    }

    /// Moves a pinned link to this datapath's program of the same hook.
    fn take_over(
        &mut self,
        link: FdLink,
        hook: Hook,
        interface: &str,
    ) -> Result<Attachment, DatapathError> {
        let invalid = |err: LinkError| DatapathError::Adopt {
            interface: interface.to_owned(),
            source: err,
        };
        match hook {
            Hook::Xdp => {
                let link = XdpLink::try_from(link).map_err(invalid)?;
                self.xdp()?
                    .attach_to_link(link)
                    .map(Attachment::Xdp)
                    .map_err(super::attach_error(interface))
            }
            Hook::TcIngress | Hook::TcEgress => {
                let link = SchedClassifierLink::try_from(link).map_err(invalid)?;
                let program = super::tc_program(is_l3(interface));
                self.tc(program)?
                    .attach_to_link(link)
                    .map(|link| Attachment::Tc { program, link })
                    .map_err(super::attach_error(interface))
            }
        }
    }

    /// The kernel link behind an attachment, taken out of the program's
    /// keeping so that it outlives this datapath once pinned.
    fn release(&mut self, attachment: Attachment) -> Result<FdLink, DatapathError> {
        let link_error = |err: LinkError| DatapathError::Pin {
            path: PathBuf::from("links"),
            source: io::Error::other(err),
        };
        match attachment {
            Attachment::Xdp(id) => {
                let program = mesh_common::programs::XDP;
                let link = self
                    .xdp()?
                    .take_link(id)
                    .map_err(super::program_error(program))?;
                FdLink::try_from(link).map_err(link_error)
            }
            Attachment::Tc { program, link } => {
                let link = self
                    .tc(program)?
                    .take_link(link)
                    .map_err(super::program_error(program))?;
                FdLink::try_from(link).map_err(link_error)
            }
        }
    }
}

/// Whether attaching failed because the link's interface is gone.
fn severed(err: &DatapathError) -> bool {
    matches!(
        err,
        DatapathError::Attach {
            source: ProgramError::SyscallError(call),
            ..
        } if call.io_error.raw_os_error() == Some(libc::ENOLINK)
    )
}

/// Removes every pin under `pins` — links first, each detached at once
/// rather than whenever the kernel frees it, so interfaces are released when
/// this returns — and the folders. Programs and maps not held by any process
/// then leave the kernel.
pub fn unpin_all(pins: &Pins) -> Result<(), DatapathError> {
    super::bindings::unpin_socket_links(pins)?;
    for (interface, hook, path) in pins.links()? {
        match hook.tc_direction().filter(|_| super::clsact_filters()) {
            Some(direction) => detach_filter(&interface, direction),
            None => super::sys::detach_pinned_link(&path),
        }
        .map_err(|source| DatapathError::Pin {
            path: path.clone(),
            source,
        })?;
        fs::remove_file(&path).map_err(|source| DatapathError::Pin { path, source })?;
    }
    let links = pins.root.join("links");
    let hook_dirs = Hook::ALL.map(|hook| links.join(hook.name()));
    for name in ALL_MAPS {
        remove_pin(&pins.map_path(name), |p| fs::remove_file(p))?;
    }
    for dir in hook_dirs
        .iter()
        .chain([&links, &pins.root.join("maps"), &pins.root])
    {
        remove_pin(dir, |p| fs::remove_dir(p))?;
    }
    Ok(())
}

/// Detaches mesh's clsact filter from `interface`, in the calling thread's
/// network namespace. A filter or interface already gone is fine.
fn detach_filter(interface: &str, direction: TcAttachType) -> io::Result<()> {
    let filter = match SchedClassifierLink::attached(
        interface,
        direction,
        super::CLSACT_PRIORITY,
        super::CLSACT_HANDLE,
        None,
    ) {
        Err(err) if err.raw_os_error() == Some(libc::ENODEV) => return Ok(()),
        filter => filter?,
    };
    match filter.detach() {
        Err(ProgramError::NetlinkError(err)) if err.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        detached => detached.map_err(io::Error::other),
    }
}

/// Whether `interface` (in the calling thread's network namespace, which
/// /sys may not show) carries bare IP packets, as WireGuard and TUN devices
/// do: such devices need the L3 program, and have no XDP of their own.
pub fn is_l3(interface: &str) -> bool {
    // SAFETY: a zeroed ifreq with a NUL-terminated name is what
    // SIOCGIFHWADDR reads; the socket is closed by OwnedFd.
    unsafe {
        let socket = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if socket < 0 {
            return false;
        }
        let _socket = <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(socket);
        let mut request: libc::ifreq = std::mem::zeroed();
        for (dst, src) in request.ifr_name.iter_mut().zip(interface.bytes().take(15)) {
            *dst = src as libc::c_char;
        }
        libc::ioctl(socket, libc::SIOCGIFHWADDR, &mut request) == 0
            && request.ifr_ifru.ifru_hwaddr.sa_family == libc::ARPHRD_NONE
    }
}

/// Removes a pin or folder; one already gone is fine.
/// Removes the pin or folder at `path` with `how`; one already gone is fine.
pub(crate) fn remove_pin(
    path: &Path,
    how: fn(&Path) -> io::Result<()>,
) -> Result<(), DatapathError> {
    match how(path) {
        Err(err) if err.kind() != io::ErrorKind::NotFound => Err(DatapathError::Pin {
            path: path.to_owned(),
            source: err,
        }),
        _ => Ok(()),
    }
}
