#![no_std]
#![no_main]

mod frame;
mod maps;
mod parse;
mod verdict;

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT, xdp_action},
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};

#[xdp]
pub fn mesh_xdp(ctx: XdpContext) -> u32 {
    if verdict::run(&ctx, true) {
        xdp_action::XDP_PASS
    } else {
        xdp_action::XDP_DROP
    }
}

#[classifier]
pub fn mesh_tc(ctx: TcContext) -> i32 {
    tc_action(verdict::run(&ctx, true))
}

#[classifier]
pub fn mesh_tc_l3(ctx: TcContext) -> i32 {
    tc_action(verdict::run(&ctx, false))
}

#[inline(always)]
fn tc_action(allow: bool) -> i32 {
    (if allow { TC_ACT_OK } else { TC_ACT_SHOT }) as i32
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
