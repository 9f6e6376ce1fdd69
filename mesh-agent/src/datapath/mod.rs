//! The kernel side as seen from userspace: loading the embedded programs,
//! attaching them, installing policy entries, and running packets through
//! them with BPF_PROG_TEST_RUN. The layout is described in docs/datapath.md.

mod bindings;
mod entries;
mod events;
mod inspect;
mod install;
mod pin;
mod sizes;
mod sys;
mod test_run;
mod traffic;

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, MapError},
    programs::{
        ProgramError, SchedClassifier, TcAttachType, Xdp, XdpMode, tc, tc::SchedClassifierLinkId,
        xdp::XdpLinkId,
    },
    util::KernelVersion,
};
pub(crate) use bindings::{adopt_link, pin_link, unpin_link};
pub use entries::{BoundHost, Clock, GrantLimits, PolicyEntries, PortBlock, Prefix, Rate};
pub use events::parse_event;
pub use inspect::{Inspection, MapFill, inspect};
use mesh_common::{config, maps, programs};
pub use pin::{Hook, Pins, is_l3, unpin_all};
pub(crate) use pin::{check_layout, remove_pin};
pub use sizes::MapSizes;
pub use sys::bpf as bpf_syscall;
pub use test_run::{Entry, TestVerdict};
pub use traffic::Counters;

/// Below 6.6 there is no tcx: TC programs are filters on a clsact qdisc,
/// which are not links and are named by interface, direction, priority and
/// handle instead.
pub(crate) fn clsact_filters() -> bool {
    KernelVersion::current().is_ok_and(|v| v < KernelVersion::new(6, 6, 0))
}

/// The TC program for a device with (`l3` false) or without an Ethernet
/// header.
fn tc_program(l3: bool) -> &'static str {
    if l3 { programs::TC_L3 } else { programs::TC }
}

/// mesh's clsact filter judges before any other filter on the hook.
const CLSACT_PRIORITY: u16 = 1;

/// A fixed handle ("me" "sh"), so that a later agent finds the filter an
/// earlier one attached without a record of its own.
const CLSACT_HANDLE: tc::TcHandle = tc::TcHandle::new(0x6d65, 0x7368);

/// The object built from mesh-ebpf by the build script.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/mesh"));

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error(
        "this binary was built with AYA_BUILD_SKIP and carries no eBPF programs; \
         run `cargo xtask setup` and build again"
    )]
    NoPrograms,
    #[error(
        "loading the eBPF object failed (root or CAP_BPF + CAP_NET_ADMIN + CAP_PERFMON needed)"
    )]
    Load(#[source] aya::EbpfError),
    #[error("the eBPF object has no program `{0}`")]
    MissingProgram(&'static str),
    #[error("the eBPF object has no map `{0}`")]
    MissingMap(&'static str),
    #[error("program `{name}`")]
    Program {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("attaching to interface `{interface}`")]
    Attach {
        interface: String,
        #[source]
        source: ProgramError,
    },
    #[error("map `{name}`")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("map `{name}` is full ({capacity} entries): the policy does not fit")]
    MapFull { name: &'static str, capacity: u32 },
    #[error("reading the clocks: {0}")]
    Clock(#[source] std::io::Error),
    #[error("pinning the test-run thread to a CPU: {0}")]
    Affinity(#[source] nix::Error),
    #[error("pin `{}`", path.display())]
    Pin {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the pinned map `{name}` ({pinned}) was made by an agent of another map layout \
         (this one needs {needed}); stop the old agent and run `mesh-agent teardown` \
         before starting this one: enforcement pauses in between"
    )]
    IncompatiblePin {
        name: &'static str,
        pinned: String,
        needed: String,
    },
    #[error("reading the eBPF object: {0}")]
    Object(#[source] aya_obj::ParseError),
    #[error("the link pinned for interface `{interface}` is not one of ours")]
    Adopt {
        interface: String,
        #[source]
        source: aya::programs::links::LinkError,
    },
}

/// A program attached to an interface.
#[derive(Debug)]
pub enum Attachment {
    Xdp(XdpLinkId),
    Tc {
        program: &'static str,
        link: SchedClassifierLinkId,
    },
}

/// The loaded programs and their maps. Dropping it detaches everything it
/// attached and frees what nothing else holds.
pub struct Datapath {
    ebpf: Ebpf,
    sizes: MapSizes,
}

impl Datapath {
    /// Loads the embedded object and all its programs into the kernel, with
    /// the default map sizes.
    pub fn load() -> Result<Self, DatapathError> {
        Self::load_with(MapSizes::default())
    }

    /// Loads with the given map sizes.
    pub fn load_with(sizes: MapSizes) -> Result<Self, DatapathError> {
        Self::load_configured(sizes, None)
    }

    /// Loads with the given map sizes, the maps pinned under `pins` if given.
    fn load_configured(sizes: MapSizes, pins: Option<&pin::Pins>) -> Result<Self, DatapathError> {
        if cfg!(mesh_ebpf_stub) || OBJECT.is_empty() {
            return Err(DatapathError::NoPrograms);
        }
        let mut loader = EbpfLoader::new();
        sizes.apply(&mut loader);
        if let Some(pins) = pins {
            pins.check_layout(OBJECT)?;
        }
        let pin_paths = pins.map(pin::Pins::map_paths).unwrap_or_default();
        for (name, path) in &pin_paths {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(OBJECT).map_err(DatapathError::Load)?;
        program::<Xdp>(&mut ebpf, programs::XDP)?
            .load()
            .map_err(program_error(programs::XDP))?;
        for name in [programs::TC, programs::TC_L3] {
            program::<SchedClassifier>(&mut ebpf, name)?
                .load()
                .map_err(program_error(name))?;
        }
        bindings::load_socket_programs(&mut ebpf)?;
        Ok(Self { ebpf, sizes })
    }

    /// Attaches the XDP program to `interface` in the calling thread's
    /// network namespace.
    pub fn attach_xdp(
        &mut self,
        interface: &str,
        mode: XdpMode,
    ) -> Result<Attachment, DatapathError> {
        program::<Xdp>(&mut self.ebpf, programs::XDP)?
            .attach(interface, mode)
            .map(Attachment::Xdp)
            .map_err(attach_error(interface))
    }

    /// Attaches a TC program to `interface` (in the calling thread's network
    /// namespace) in `direction`: through tcx on kernels ≥ 6.6, else as a
    /// clsact filter. `l3` picks the program for devices without an Ethernet
    /// header, such as WireGuard interfaces.
    pub fn attach_tc(
        &mut self,
        interface: &str,
        direction: TcAttachType,
        l3: bool,
    ) -> Result<Attachment, DatapathError> {
        let name = tc_program(l3);
        let link = if clsact_filters() {
            self.attach_clsact(interface, direction, name)?
        } else {
            self.tc(name)?
                .attach(interface, direction)
                .map_err(attach_error(interface))?
        };
        Ok(Attachment::Tc {
            program: name,
            link,
        })
    }

    /// Attaches `name` as mesh's clsact filter, or puts it in place of the
    /// program of the filter an earlier datapath attached: the kernel swaps
    /// a filter's program atomically.
    fn attach_clsact(
        &mut self,
        interface: &str,
        direction: TcAttachType,
        name: &'static str,
    ) -> Result<SchedClassifierLinkId, DatapathError> {
        let exists = |err: &tc::TcError| matches!(err, tc::TcError::NetlinkError(err) if err.raw_os_error() == Some(libc::EEXIST));
        match tc::qdisc_add_clsact(interface) {
            Err(err) if !exists(&err) => return Err(attach_error(interface)(err.into())),
            _ => {}
        }
        let options = tc::NlOptions {
            priority: CLSACT_PRIORITY,
            handle: CLSACT_HANDLE,
            ..Default::default()
        };
        let program = self.tc(name)?;
        let attached = match program.attach_with_options(
            interface,
            direction,
            tc::TcAttachOptions::Netlink(options),
        ) {
            Err(ProgramError::TcError(err)) if exists(&err) => {
                let filter = tc::SchedClassifierLink::attached(
                    interface,
                    direction,
                    CLSACT_PRIORITY,
                    CLSACT_HANDLE,
                    None,
                )
                .map_err(|err| attach_error(interface)(tc::TcError::IoError(err).into()))?;
                program.attach_to_link(filter)
            }
            attached => attached,
        };
        attached.map_err(attach_error(interface))
    }

    fn xdp(&mut self) -> Result<&mut Xdp, DatapathError> {
        program::<Xdp>(&mut self.ebpf, programs::XDP)
    }

    fn tc(&mut self, name: &'static str) -> Result<&mut SchedClassifier, DatapathError> {
        program::<SchedClassifier>(&mut self.ebpf, name)
    }

    /// Detaches what [`Self::attach_xdp`] or [`Self::attach_tc`] attached,
    /// in the network namespace it was attached in: a clsact filter is
    /// named by its interface's index.
    pub fn detach(&mut self, attachment: Attachment) -> Result<(), DatapathError> {
        match attachment {
            Attachment::Xdp(link) => program::<Xdp>(&mut self.ebpf, programs::XDP)?
                .detach(link)
                .map_err(program_error(programs::XDP)),
            Attachment::Tc {
                program: name,
                link,
            } => program::<SchedClassifier>(&mut self.ebpf, name)?
                .detach(link)
                .map_err(program_error(name)),
        }
    }

    /// The live state word: generation bit and epoch.
    pub fn state(&self) -> Result<u64, DatapathError> {
        self.config()?
            .get(&config::STATE, 0)
            .map_err(map_error(maps::CONFIG))
    }

    /// Cuts `tag` off: its new flows are denied as `revoked`, and bumping the
    /// epoch makes its live flows revalidate, and end, on their next packet.
    pub fn revoke(&mut self, tag: u32) -> Result<(), DatapathError> {
        let map = self
            .ebpf
            .map_mut(maps::REVOKED)
            .ok_or(DatapathError::MissingMap(maps::REVOKED))?;
        HashMap::<_, u32, u32>::try_from(map)
            .and_then(|mut revoked| revoked.insert(tag, 0, 0))
            .map_err(map_error(maps::REVOKED))?;
        self.bump_epoch()
    }

    /// Lifts a revocation. Flows ended by it stay ended.
    pub fn unrevoke(&mut self, tag: u32) -> Result<(), DatapathError> {
        let map = self
            .ebpf
            .map_mut(maps::REVOKED)
            .ok_or(DatapathError::MissingMap(maps::REVOKED))?;
        HashMap::<_, u32, u32>::try_from(map)
            .and_then(|mut revoked| traffic::ignore_missing(revoked.remove(&tag)))
            .map_err(map_error(maps::REVOKED))
    }

    /// A new epoch with the same generation: live flows revalidate.
    fn bump_epoch(&mut self) -> Result<(), DatapathError> {
        let state = self.state()?;
        self.set_config(config::STATE, state + 2)
    }

    fn config(&self) -> Result<Array<&MapData, u64>, DatapathError> {
        let map = self
            .ebpf
            .map(maps::CONFIG)
            .ok_or(DatapathError::MissingMap(maps::CONFIG))?;
        Array::try_from(map).map_err(map_error(maps::CONFIG))
    }

    fn set_config(&mut self, index: u32, value: u64) -> Result<(), DatapathError> {
        let map = self
            .ebpf
            .map_mut(maps::CONFIG)
            .ok_or(DatapathError::MissingMap(maps::CONFIG))?;
        Array::<_, u64>::try_from(map)
            .and_then(|mut array| array.set(index, value, 0))
            .map_err(map_error(maps::CONFIG))
    }
}

fn program<'a, P>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut P, DatapathError>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(DatapathError::MissingProgram(name))?
        .try_into()
        .map_err(program_error(name))
}

fn attach_error(interface: &str) -> impl FnOnce(ProgramError) -> DatapathError {
    move |source| DatapathError::Attach {
        interface: interface.to_owned(),
        source,
    }
}

fn program_error(name: &'static str) -> impl FnOnce(ProgramError) -> DatapathError {
    move |source| DatapathError::Program { name, source }
}

fn map_error(name: &'static str) -> impl FnOnce(MapError) -> DatapathError {
    move |source| DatapathError::Map { name, source }
}
