//! Reading packet bytes through the kernel's load helpers rather than direct
//! packet pointers: the offsets here are variable (VLAN tags, IPv4 options,
//! IPv6 extension headers), and the helpers check them at run time, which
//! keeps the verifier's job small on every kernel we support.

use core::mem::MaybeUninit;

use aya_ebpf::{
    helpers::{bpf_xdp_get_buff_len, bpf_xdp_load_bytes},
    programs::{TcContext, XdpContext},
};

pub trait Frame {
    /// Copies a `T` from `offset`; `None` when the frame is too short.
    fn load<T: Copy>(&self, offset: u32) -> Option<T>;
    /// Length of the whole frame in bytes.
    fn len(&self) -> u32;
}

impl Frame for XdpContext {
    #[inline(always)]
    fn load<T: Copy>(&self, offset: u32) -> Option<T> {
        let mut out = MaybeUninit::<T>::uninit();
        // SAFETY: the helper writes exactly size_of::<T>() bytes or fails.
        let ret = unsafe {
            bpf_xdp_load_bytes(
                self.ctx,
                offset,
                out.as_mut_ptr().cast(),
                core::mem::size_of::<T>() as u32,
            )
        };
        // SAFETY: initialised by the successful helper call.
        (ret == 0).then(|| unsafe { out.assume_init() })
    }

    #[inline(always)]
    fn len(&self) -> u32 {
        // SAFETY: ctx is the program's own context.
        unsafe { bpf_xdp_get_buff_len(self.ctx) as u32 }
    }
}

impl Frame for TcContext {
    #[inline(always)]
    fn load<T: Copy>(&self, offset: u32) -> Option<T> {
        TcContext::load(self, offset as usize).ok()
    }

    #[inline(always)]
    fn len(&self) -> u32 {
        TcContext::len(self)
    }
}
