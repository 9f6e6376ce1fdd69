#![no_std]
#![no_main]

mod frame;
mod maps;
mod parse;
mod socket;
mod source_guard;
mod verdict;

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT, xdp_action},
    macros::{cgroup_skb, cgroup_sock_addr, classifier, xdp},
    programs::{SkBuffContext, SockAddrContext, TcContext, XdpContext},
};
use socket::Call;

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

#[cgroup_sock_addr(connect4)]
pub fn mesh_connect4(ctx: SockAddrContext) -> i32 {
    socket::judge4(&ctx, Call::Connect)
}

#[cgroup_sock_addr(connect6)]
pub fn mesh_connect6(ctx: SockAddrContext) -> i32 {
    socket::judge6(&ctx, Call::Connect)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn mesh_sendmsg4(ctx: SockAddrContext) -> i32 {
    socket::judge4(&ctx, Call::Sendmsg)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn mesh_sendmsg6(ctx: SockAddrContext) -> i32 {
    socket::judge6(&ctx, Call::Sendmsg)
}

#[cgroup_skb(egress)]
pub fn mesh_source_guard(ctx: SkBuffContext) -> i32 {
    // Cgroup skb programs pass with 1 and drop with 0 (EPERM to the sender).
    i32::from(source_guard::admits(&ctx))
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
