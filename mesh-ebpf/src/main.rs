#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action,
    macros::{map, xdp},
    maps::HashMap,
    programs::XdpContext,
};
use mesh_common::{DENY_SOURCES_V4_CAPACITY, DenyEntry};

const ETH_HDR_LEN: usize = 14;
const ETH_P_IPV4: u16 = 0x0800;
const IPV4_SRC_OFFSET: usize = 12;

#[map]
static DENY_SOURCES_V4: HashMap<u32, DenyEntry> =
    HashMap::with_max_entries(DENY_SOURCES_V4_CAPACITY, 0);

#[xdp]
pub fn mesh_xdp(ctx: XdpContext) -> u32 {
    match ipv4_source(&ctx) {
        // SAFETY: the value is only tested for presence, never read.
        Some(src) if unsafe { DENY_SOURCES_V4.get(&src) }.is_some() => xdp_action::XDP_DROP,
        _ => xdp_action::XDP_PASS,
    }
}

/// The IPv4 source address of an untagged Ethernet frame, in network byte order.
#[inline(always)]
fn ipv4_source(ctx: &XdpContext) -> Option<u32> {
    let ethertype: u16 = u16::from_be(read(ctx, 12)?);
    if ethertype != ETH_P_IPV4 {
        return None;
    }
    read(ctx, ETH_HDR_LEN + IPV4_SRC_OFFSET)
}

/// A bounds-checked read of a `T` at `offset` into the packet.
#[inline(always)]
fn read<T: Copy>(ctx: &XdpContext, offset: usize) -> Option<T> {
    let start = ctx.data() + offset;
    if start + core::mem::size_of::<T>() > ctx.data_end() {
        return None;
    }
    // SAFETY: bounds checked against data_end just above.
    Some(unsafe { core::ptr::read_unaligned(start as *const T) })
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
