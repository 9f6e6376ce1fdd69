//! Loading the embedded eBPF programs, attaching them and writing their maps.

use std::net::Ipv4Addr;

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, MapError},
    programs::{ProgramError, Xdp, XdpMode, xdp::XdpLinkId},
};
use mesh_common::{DenyEntry, maps, programs};

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
}

/// The loaded programs and their maps. Dropping it detaches everything it
/// attached.
pub struct Datapath {
    ebpf: Ebpf,
}

impl Datapath {
    /// Loads the embedded object and its XDP program into the kernel.
    pub fn load() -> Result<Self, DatapathError> {
        if cfg!(mesh_ebpf_stub) || OBJECT.is_empty() {
            return Err(DatapathError::NoPrograms);
        }
        let mut ebpf = EbpfLoader::new()
            .load(OBJECT)
            .map_err(DatapathError::Load)?;
        xdp_program(&mut ebpf)?
            .load()
            .map_err(|source| DatapathError::Program {
                name: programs::XDP_INGRESS,
                source,
            })?;
        Ok(Self { ebpf })
    }

    /// Attaches the XDP program to `interface` in the calling thread's
    /// network namespace.
    pub fn attach_xdp(
        &mut self,
        interface: &str,
        mode: XdpMode,
    ) -> Result<XdpLinkId, DatapathError> {
        xdp_program(&mut self.ebpf)?
            .attach(interface, mode)
            .map_err(|source| DatapathError::Attach {
                interface: interface.to_owned(),
                source,
            })
    }

    /// Detaches a link made by [`Self::attach_xdp`].
    pub fn detach_xdp(&mut self, link: XdpLinkId) -> Result<(), DatapathError> {
        xdp_program(&mut self.ebpf)?
            .detach(link)
            .map_err(|source| DatapathError::Program {
                name: programs::XDP_INGRESS,
                source,
            })
    }

    /// Drops every IPv4 packet from `source` from now on.
    pub fn deny_source(&mut self, source: Ipv4Addr) -> Result<(), DatapathError> {
        self.deny_sources()?
            .insert(u32::from(source).to_be(), DenyEntry::default(), 0)
            .map_err(|source| DatapathError::Map {
                name: maps::DENY_SOURCES_V4,
                source,
            })
    }

    fn deny_sources(
        &mut self,
    ) -> Result<HashMap<&mut aya::maps::MapData, u32, DenyEntry>, DatapathError> {
        let map = self
            .ebpf
            .map_mut(maps::DENY_SOURCES_V4)
            .ok_or(DatapathError::MissingMap(maps::DENY_SOURCES_V4))?;
        HashMap::try_from(map).map_err(|source| DatapathError::Map {
            name: maps::DENY_SOURCES_V4,
            source,
        })
    }
}

fn xdp_program(ebpf: &mut Ebpf) -> Result<&mut Xdp, DatapathError> {
    ebpf.program_mut(programs::XDP_INGRESS)
        .ok_or(DatapathError::MissingProgram(programs::XDP_INGRESS))?
        .try_into()
        .map_err(|source| DatapathError::Program {
            name: programs::XDP_INGRESS,
            source,
        })
}
