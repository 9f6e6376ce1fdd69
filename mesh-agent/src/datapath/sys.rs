//! The bpf(2) commands aya does not wrap: getting a pinned link's file
//! descriptor, detaching a link at once whoever else still holds it,
//! putting a program into a pinned link that aya cannot adopt, and
//! walking a map's keys without knowing their type; and waiting for
//! in-flight program runs to finish.

use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::Path,
};

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_LINK_DETACH: libc::c_long = 34;

/// `union bpf_attr` as BPF_OBJ_GET reads it.
#[repr(C)]
struct ObjGet {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

/// `union bpf_attr` as BPF_LINK_DETACH reads it.
#[repr(C)]
struct LinkDetach {
    link_fd: u32,
}

/// bpf(2) with `attr` as the head of `union bpf_attr` (a `#[repr(C)]`
/// struct laid out as the command reads it); the return value or the error.
pub fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a properly laid out prefix of `union bpf_attr`, and
    // its size is passed along; the kernel zero-fills the rest.
    let ret = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut T, size_of::<T>()) };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// A descriptor of the object pinned at `path`.
fn open_pinned(path: &Path) -> io::Result<OwnedFd> {
    let path = CString::new(path.as_os_str().as_bytes())?;
    let mut get = ObjGet {
        pathname: path.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    let fd = bpf(BPF_OBJ_GET, &mut get)?;
    // SAFETY: BPF_OBJ_GET returned a new descriptor that nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Detaches the link pinned at `path` from its hook now. The pin itself
/// stays; the link object lingers, defunct, until its last holder lets go.
pub fn detach_pinned_link(path: &Path) -> io::Result<()> {
    let fd = open_pinned(path)?;
    let mut detach = LinkDetach {
        link_fd: fd.as_raw_fd() as u32,
    };
    bpf(BPF_LINK_DETACH, &mut detach).map(drop)
}

const BPF_LINK_UPDATE: libc::c_long = 29;

/// `union bpf_attr` as BPF_LINK_UPDATE reads it.
#[repr(C)]
struct LinkUpdate {
    link_fd: u32,
    new_prog_fd: u32,
    flags: u32,
    old_prog_fd: u32,
}

/// Puts `program` into the link pinned at `path`, atomically: the hook
/// runs the old program or the new one, never neither.
pub fn update_pinned_link(path: &Path, program: BorrowedFd<'_>) -> io::Result<()> {
    let fd = open_pinned(path)?;
    let mut update = LinkUpdate {
        link_fd: fd.as_raw_fd() as u32,
        new_prog_fd: program.as_raw_fd() as u32,
        flags: 0,
        old_prog_fd: 0,
    };
    bpf(BPF_LINK_UPDATE, &mut update).map(drop)
}

const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;

/// `union bpf_attr` as BPF_MAP_GET_NEXT_KEY reads it.
#[repr(C)]
struct NextKey {
    map_fd: u32,
    _pad: u32,
    key: u64,
    next_key: u64,
}

/// Counts the keys of a hash-like map by walking them; at most `limit`, as
/// entries may come and go during the walk.
pub fn count_keys(map: BorrowedFd<'_>, key_size: u32, limit: u64) -> io::Result<u64> {
    let mut key = vec![0u8; key_size as usize];
    let mut next = vec![0u8; key_size as usize];
    let mut count = 0;
    let mut attr = NextKey {
        map_fd: map.as_raw_fd() as u32,
        _pad: 0,
        // No key: the first one.
        key: 0,
        next_key: next.as_mut_ptr() as u64,
    };
    while count < limit {
        match bpf(BPF_MAP_GET_NEXT_KEY, &mut attr) {
            Ok(_) => {}
            Err(err) if err.raw_os_error() == Some(libc::ENOENT) => break,
            Err(err) => return Err(err),
        }
        count += 1;
        std::mem::swap(&mut key, &mut next);
        attr.key = key.as_ptr() as u64;
        attr.next_key = next.as_mut_ptr() as u64;
    }
    Ok(count)
}

/// Waits for an RCU grace period: every BPF program run that started before
/// the call has finished (they run under the RCU read lock). The membarrier
/// command waits for one; where the kernel refuses it, a pause far longer
/// than any program run stands in.
pub fn rcu_grace_period() {
    const MEMBARRIER_CMD_GLOBAL: libc::c_long = 1;
    // SAFETY: no memory is passed.
    if unsafe { libc::syscall(libc::SYS_membarrier, MEMBARRIER_CMD_GLOBAL, 0, 0) } != 0 {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}
