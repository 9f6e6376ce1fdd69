//! The socket hooks of bound processes (docs/identity.md). A process bound
//! to an identity runs in a cgroup below the agent's cgroup root, where
//! these programs are attached. At `connect()`, and at `sendmsg()` with an
//! address, they refuse with EPERM every destination that no grant gives
//! the identity, so an agent gets an error at once rather than a timeout;
//! and they give the socket the binding's own source address, by which the
//! datapath, on this node and on others, knows the identity. A cgroup
//! below the root without a binding, or whose token has expired, opens
//! nothing: fail closed.

use aya_ebpf::{
    bindings::{bpf_sock_addr, sockaddr},
    helpers::{bpf_bind, bpf_get_current_cgroup_id},
    programs::SockAddrContext,
};
use mesh_common::{CgroupBinding, binding, proto};

use crate::{maps::CGROUPS, verdict};

/// What a cgroup socket program returns: go on, or fail the call with EPERM.
const ALLOW: i32 = 1;
const DENY: i32 = 0;

const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;
const IPPROTO_ICMP: u32 = 1;
const IPPROTO_TCP: u32 = 6;
const IPPROTO_UDP: u32 = 17;
const IPPROTO_ICMPV6: u32 = 58;

/// `struct sockaddr_in`, for `bpf_bind`.
#[repr(C)]
struct SockaddrIn {
    family: u16,
    port: u16,
    addr: [u8; 4],
    zero: [u8; 8],
}

/// `struct sockaddr_in6`, for `bpf_bind`.
#[repr(C)]
struct SockaddrIn6 {
    family: u16,
    port: u16,
    flowinfo: u32,
    addr: [u8; 16],
    scope_id: u32,
}

/// Which call the hook runs in.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Call {
    /// `connect()`: the source address is bound to the socket.
    Connect,
    /// `sendmsg()` to an address: the source address is set per datagram.
    Sendmsg,
}

/// An IPv4 socket: the destination is `user_ip4`.
#[inline(always)]
pub fn judge4(ctx: &SockAddrContext, call: Call) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: the kernel's context, readable at these fields in 4 bytes.
    let (ip, port, protocol) = unsafe {
        (
            read(&raw const (*sa).user_ip4),
            read(&raw const (*sa).user_port),
            read(&raw const (*sa).protocol),
        )
    };
    // In network order: the bytes in memory are the address.
    let dst = mapped(ip.to_ne_bytes());
    let Some(bound) = permitted(&dst, port, protocol) else {
        return DENY;
    };
    if bound.families & binding::V4 == 0 {
        return DENY;
    }
    let source = bound.addr4;
    match call {
        Call::Connect => bind4(sa, source),
        Call::Sendmsg => {
            // SAFETY: writable in sendmsg4 programs, in 4 bytes.
            unsafe { write(&raw mut (*sa).msg_src_ip4, u32::from_ne_bytes(source)) };
            ALLOW
        }
    }
}

/// An IPv6 socket: the destination is `user_ip6`, which may be an
/// IPv4-mapped address on a dual-stack socket; the source is then the
/// binding's IPv4 address, mapped.
#[inline(always)]
pub fn judge6(ctx: &SockAddrContext, call: Call) -> i32 {
    let sa = ctx.sock_addr;
    let mut dst = [0u8; 16];
    // SAFETY: the kernel's context, readable at these fields in 4 bytes.
    let (port, protocol) = unsafe {
        for i in 0..4 {
            let word = read(&raw const (*sa).user_ip6[i]);
            dst[i * 4..i * 4 + 4].copy_from_slice(&word.to_ne_bytes());
        }
        (
            read(&raw const (*sa).user_port),
            read(&raw const (*sa).protocol),
        )
    };
    let Some(bound) = permitted(&dst, port, protocol) else {
        return DENY;
    };
    let source = if dst[..12] == MAPPED_PREFIX {
        if bound.families & binding::V4 == 0 {
            return DENY;
        }
        mapped(bound.addr4)
    } else {
        if bound.families & binding::V6 == 0 {
            return DENY;
        }
        bound.addr6
    };
    match call {
        Call::Connect => bind6(sa, source),
        Call::Sendmsg => {
            for i in 0..4 {
                let word = u32::from_ne_bytes([
                    source[i * 4],
                    source[i * 4 + 1],
                    source[i * 4 + 2],
                    source[i * 4 + 3],
                ]);
                // SAFETY: writable in sendmsg6 programs, in 4 bytes.
                unsafe { write(&raw mut (*sa).msg_src_ip6[i], word) };
            }
            ALLOW
        }
    }
}

/// The binding of the calling process's cgroup, if it is valid and a
/// grant lets its identity reach the destination.
#[inline(always)]
fn permitted(dst: &[u8; 16], port: u32, protocol: u32) -> Option<&'static CgroupBinding> {
    // SAFETY: a helper without arguments.
    let cgroup = unsafe { bpf_get_current_cgroup_id() };
    // SAFETY: a map value, read only; the agent replaces values whole.
    let bound = unsafe { CGROUPS.get(&cgroup) }?;
    if verdict::now() >= bound.valid_until_ns {
        return None;
    }
    // `user_port` holds the port in network order in its low 16 bits.
    let port = u16::from_be(port as u16);
    let (service_proto, dport) = match protocol {
        IPPROTO_TCP => (proto::TCP, port),
        IPPROTO_UDP => (proto::UDP, port),
        // Ping sockets: services offer `icmp` as port 0.
        IPPROTO_ICMP | IPPROTO_ICMPV6 => (proto::ICMP_ECHO, 0),
        // No service has other protocols.
        _ => (0, 0),
    };
    verdict::socket_granted(bound.tag, dst, service_proto, dport).then_some(bound)
}

/// Binds the socket to `addr`, the port left to `connect()`. A socket bound
/// before (by `bind()`, or a UDP socket that sent before it connects)
/// cannot be bound again: it is refused rather than opened from an address
/// of no identity.
#[inline(always)]
fn bind4(sa: *mut bpf_sock_addr, addr: [u8; 4]) -> i32 {
    let mut local = SockaddrIn {
        family: AF_INET,
        port: 0,
        addr,
        zero: [0; 8],
    };
    let len = size_of::<SockaddrIn>() as i32;
    // SAFETY: the context and a sockaddr_in on the stack, with its size.
    let bound = unsafe { bpf_bind(sa, (&raw mut local).cast::<sockaddr>(), len) };
    if bound == 0 { ALLOW } else { DENY }
}

#[inline(always)]
fn bind6(sa: *mut bpf_sock_addr, addr: [u8; 16]) -> i32 {
    let mut local = SockaddrIn6 {
        family: AF_INET6,
        port: 0,
        flowinfo: 0,
        addr,
        scope_id: 0,
    };
    let len = size_of::<SockaddrIn6>() as i32;
    // SAFETY: the context and a sockaddr_in6 on the stack, with its size.
    let bound = unsafe { bpf_bind(sa, (&raw mut local).cast::<sockaddr>(), len) };
    if bound == 0 { ALLOW } else { DENY }
}

const MAPPED_PREFIX: [u8; 12] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff];

/// The maps' 16-byte form of an IPv4 address.
#[inline(always)]
fn mapped(v4: [u8; 4]) -> [u8; 16] {
    let mut addr = [0u8; 16];
    addr[..12].copy_from_slice(&MAPPED_PREFIX);
    addr[12..].copy_from_slice(&v4);
    addr
}

/// Context fields are read and written in exactly 4 bytes: the verifier
/// refuses other widths for some of them.
#[inline(always)]
unsafe fn read(field: *const u32) -> u32 {
    // SAFETY: the caller's.
    unsafe { core::ptr::read_volatile(field) }
}

#[inline(always)]
unsafe fn write(field: *mut u32, value: u32) {
    // SAFETY: the caller's.
    unsafe { core::ptr::write_volatile(field, value) }
}
