//! Types and constants shared by mesh's eBPF programs and its userspace agent.
//!
//! Everything here crosses the kernel/user boundary, so every type is
//! `#[repr(C)]` with explicit padding and a compile-time size check. The map
//! layout and the verdict pipeline are described in docs/datapath.md.
#![no_std]

pub mod datapath;
pub mod shield;

pub use datapath::*;
