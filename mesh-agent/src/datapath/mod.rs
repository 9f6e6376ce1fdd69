//! The kernel side as seen from userspace: loading the embedded programs,
//! attaching them, installing policy entries, and running packets through
//! them with BPF_PROG_TEST_RUN. The layout is described in docs/datapath.md.

mod entries;
mod install;
mod test_run;

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, MapData, MapError},
    programs::{ProgramError, SchedClassifier, Xdp, XdpMode, xdp::XdpLinkId},
};
pub use entries::{Clock, GrantLimits, PolicyEntries, PortBlock, Prefix, Rate};
use mesh_common::{config, maps, programs};
pub use test_run::{Entry, TestVerdict};

/// The object built from mesh-ebpf by the build script.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/mesh"));

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error(
        "this binary was built with AYA_BUILD_SKIP and carries no eBPF programs; \
         run `cargo xtask setup` and build again"
    )]
    NoPrograms,
    #[error("loading the eBPF object failed (root or CAP_BPF + CAP_NET_ADMIN needed)")]
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
    #[error("attaching XDP to interface `{interface}`")]
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
}

/// The loaded programs and their maps. Dropping it detaches everything it
/// attached and frees what nothing else holds.
pub struct Datapath {
    ebpf: Ebpf,
}

impl Datapath {
    /// Loads the embedded object and all its programs into the kernel.
    pub fn load() -> Result<Self, DatapathError> {
        if cfg!(mesh_ebpf_stub) || OBJECT.is_empty() {
            return Err(DatapathError::NoPrograms);
        }
        let mut ebpf = EbpfLoader::new()
            .load(OBJECT)
            .map_err(DatapathError::Load)?;
        program::<Xdp>(&mut ebpf, programs::XDP)?
            .load()
            .map_err(program_error(programs::XDP))?;
        for name in [programs::TC, programs::TC_L3] {
            program::<SchedClassifier>(&mut ebpf, name)?
                .load()
                .map_err(program_error(name))?;
        }
        Ok(Self { ebpf })
    }

    /// Attaches the XDP program to `interface` in the calling thread's
    /// network namespace.
    pub fn attach_xdp(
        &mut self,
        interface: &str,
        mode: XdpMode,
    ) -> Result<XdpLinkId, DatapathError> {
        program::<Xdp>(&mut self.ebpf, programs::XDP)?
            .attach(interface, mode)
            .map_err(|source| DatapathError::Attach {
                interface: interface.to_owned(),
                source,
            })
    }

    /// Detaches a link made by [`Self::attach_xdp`].
    pub fn detach_xdp(&mut self, link: XdpLinkId) -> Result<(), DatapathError> {
        program::<Xdp>(&mut self.ebpf, programs::XDP)?
            .detach(link)
            .map_err(program_error(programs::XDP))
    }

    /// The live state word: generation bit and epoch.
    pub fn state(&self) -> Result<u64, DatapathError> {
        self.config()?
            .get(&config::STATE, 0)
            .map_err(map_error(maps::CONFIG))
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

fn program_error(name: &'static str) -> impl FnOnce(ProgramError) -> DatapathError {
    move |source| DatapathError::Program { name, source }
}

fn map_error(name: &'static str) -> impl FnOnce(MapError) -> DatapathError {
    move |source| DatapathError::Map { name, source }
}
