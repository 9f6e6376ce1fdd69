//! Types and constants shared by mesh's eBPF programs and its userspace agent.
//!
//! Everything here crosses the kernel/user boundary, so every type is
//! `#[repr(C)]` with explicit padding and a compile-time size check.
#![no_std]

/// Names of the maps the programs declare; userspace looks them up by these.
pub mod maps {
    /// IPv4 source addresses (network byte order) whose packets are dropped.
    pub const DENY_SOURCES_V4: &str = "DENY_SOURCES_V4";
}

/// Names of the programs in the object file.
pub mod programs {
    /// The XDP entry point.
    pub const XDP_INGRESS: &str = "mesh_xdp";
}

/// Capacity of [`maps::DENY_SOURCES_V4`].
pub const DENY_SOURCES_V4_CAPACITY: u32 = 1024;

/// Value of a [`maps::DENY_SOURCES_V4`] entry: present means drop.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DenyEntry {
    /// Reserved for a reason code; keeps the value a whole word.
    pub flags: u32,
}

const _: () = assert!(core::mem::size_of::<DenyEntry>() == 4);

#[cfg(feature = "user")]
// SAFETY: plain old data, no padding, every bit pattern valid.
unsafe impl aya::Pod for DenyEntry {}
