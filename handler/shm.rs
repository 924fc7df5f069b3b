//! The one place that touches shared memory: a `MAP_SHARED` mapping owned by
//! [`SharedMap`], accessed only through methods that take an offset and a length and
//! check them against the mapping (the idea of rust-vmm's `vm-memory`). Raw pointers
//! never leave this module, so the ring code above it cannot read or write outside the
//! mapping whatever offsets the kernel (or a bug) hands it.
//!
//! Accesses are volatile (the kernel writes the same memory concurrently); `cmd_head`
//! is read with an acquire load and `cmd_tail` written with a release store, as
//! `docs/tcmu.md` §1.8 requires.
//!
//! A mapping can vanish under us: the kernel raises SIGBUS for a data page it does not
//! back (or a file shrunk under a shared mapping). Every mapping is registered in a
//! fixed table that a process-wide SIGBUS handler reads (atomics only, no locks or
//! allocation): a fault inside a registered mapping replaces the whole mapping with
//! anonymous zero pages (`mmap(MAP_FIXED)`), marks it dead and returns, so the faulting
//! load or store completes on the zero page; every accessor checks the dead mark after
//! its access and reports [`ShmError::Gone`]. A fault anywhere else is handed back to
//! the previous SIGBUS disposition (the process dies as it would have).

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{compiler_fence, AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Once, OnceLock};

/// A failed access to shared memory.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ShmError {
    /// An access outside the mapping, or misaligned where alignment is required.
    #[error("shared memory access of {len} bytes at offset {offset} outside the {map_len}-byte mapping (or misaligned)")]
    OutOfBounds {
        /// Requested offset.
        offset: u64,
        /// Requested length.
        len: u64,
        /// Size of the mapping.
        map_len: usize,
    },
    /// The mapping faulted (SIGBUS: the kernel removed or shrank what backs it); it now
    /// holds zero pages and every access fails.
    #[error("shared mapping gone (SIGBUS on access: the device was removed or shrunk)")]
    Gone,
}

/// Number of mappings the SIGBUS handler can watch at once (one per served device,
/// plus emulator mappings in tests); a mapping beyond that is served unguarded.
const GUARD_SLOTS: usize = 1024;
/// `len` of a slot being filled in.
const CLAIMED: usize = usize::MAX;

struct Guard {
    start: AtomicUsize,
    /// 0: free; CLAIMED: being registered; else the mapping's length.
    len: AtomicUsize,
    dead: AtomicBool,
}

static GUARDS: [Guard; GUARD_SLOTS] = [const {
    Guard {
        start: AtomicUsize::new(0),
        len: AtomicUsize::new(0),
        dead: AtomicBool::new(false),
    }
}; GUARD_SLOTS];

static PREVIOUS_SIGBUS: OnceLock<libc::sigaction> = OnceLock::new();
static INSTALL: Once = Once::new();

fn register_guard(start: usize, len: usize) -> Option<usize> {
    for (i, g) in GUARDS.iter().enumerate() {
        if g.len
            .compare_exchange(0, CLAIMED, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            g.dead.store(false, Ordering::Relaxed);
            g.start.store(start, Ordering::Relaxed);
            g.len.store(len, Ordering::Release);
            return Some(i);
        }
    }
    None
}

fn unregister_guard(i: usize) {
    GUARDS[i].len.store(0, Ordering::Release);
}

extern "C" fn on_sigbus(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t for an SA_SIGINFO handler; si_addr is
    // the faulting address for SIGBUS.
    let addr = unsafe { (*info).si_addr() } as usize;
    // SAFETY: __errno_location returns this thread's errno slot; saved and restored so
    // the interrupted code never sees our mmap's errno.
    let errno = unsafe { *libc::__errno_location() };
    for g in GUARDS.iter() {
        let len = g.len.load(Ordering::Acquire);
        if len == 0 || len == CLAIMED {
            continue;
        }
        let start = g.start.load(Ordering::Relaxed);
        if addr < start || addr - start >= len {
            continue;
        }
        // SAFETY: [start, start+len) is a mapping a live SharedMap owns (registered
        // until its Drop, which unregisters before munmap); replacing it with private
        // anonymous memory of the same size keeps every address the SharedMap may touch
        // valid and readable/writable. mmap is a plain system call, safe in a handler.
        let p = unsafe {
            libc::mmap(
                start as *mut libc::c_void,
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        if p != libc::MAP_FAILED {
            g.dead.store(true, Ordering::Release);
            // SAFETY: as above, this thread's errno.
            unsafe { *libc::__errno_location() = errno };
            return; // the faulting access is retried on the zero page
        }
        break;
    }
    // Not ours (or the remap failed): restore the previous disposition and return; the
    // access faults again and gets the previous behaviour (by default, death).
    if let Some(old) = PREVIOUS_SIGBUS.get() {
        // SAFETY: `old` is the sigaction we replaced, a valid disposition.
        unsafe { libc::sigaction(libc::SIGBUS, old, std::ptr::null_mut()) };
    } else {
        // SAFETY: resetting to the default disposition is always valid.
        unsafe { libc::signal(libc::SIGBUS, libc::SIG_DFL) };
    }
}

fn install_sigbus_handler() {
    INSTALL.call_once(|| {
        // SAFETY: zeroed sigaction/sigset_t are valid initial values; sigemptyset and
        // sigaction get valid pointers to locals; the handler only touches atomics and
        // async-signal-safe system calls.
        unsafe {
            let mut old: libc::sigaction = std::mem::zeroed();
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_sigbus as *const () as usize;
            sa.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
            libc::sigemptyset(&mut sa.sa_mask);
            if libc::sigaction(libc::SIGBUS, std::ptr::null(), &mut old) == 0 {
                let _ = PREVIOUS_SIGBUS.set(old);
                libc::sigaction(libc::SIGBUS, &sa, std::ptr::null_mut());
            }
        }
    });
}

/// A shared, read-write mapping of a file descriptor (a UIO device or a memfd).
pub struct SharedMap {
    ptr: NonNull<u8>,
    len: usize,
    /// Its slot in the SIGBUS guard table, if it got one.
    guard: Option<usize>,
}

// SAFETY: the mapping is plain shared memory; every access goes through volatile or
// atomic operations on checked ranges, so using it from several threads is no less
// safe than the kernel writing it concurrently, which the accessors already assume.
unsafe impl Send for SharedMap {}
// SAFETY: as above; methods take `&self` and never hand out references into the map.
unsafe impl Sync for SharedMap {}

impl SharedMap {
    /// Maps exactly `len` bytes of `fd` at file offset 0, read-write and shared.
    pub fn map(fd: BorrowedFd<'_>, len: usize) -> io::Result<Self> {
        if len == 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "empty mapping"));
        }
        // SAFETY: a fresh mapping chosen by the kernel (addr NULL); we own it until
        // Drop unmaps it; the fd stays valid for the duration of the call.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr =
            NonNull::new(p as *mut u8).ok_or_else(|| io::Error::other("mmap returned NULL"))?;
        install_sigbus_handler();
        let guard = register_guard(p as usize, len);
        Ok(SharedMap { ptr, len, guard })
    }

    /// True once an access faulted (SIGBUS) and the mapping was replaced by zero pages.
    pub fn is_gone(&self) -> bool {
        self.guard
            .is_some_and(|i| GUARDS[i].dead.load(Ordering::Acquire))
    }

    /// Called after every access: a SIGBUS during it (handled on this thread) has
    /// marked the mapping dead.
    fn alive(&self) -> Result<(), ShmError> {
        compiler_fence(Ordering::SeqCst);
        if self.is_gone() {
            Err(ShmError::Gone)
        } else {
            Ok(())
        }
    }

    /// Size of the mapping in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True for an empty mapping (never: `map` refuses those).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn check(&self, offset: u64, len: u64, align: u64) -> Result<usize, ShmError> {
        let err = ShmError::OutOfBounds {
            offset,
            len,
            map_len: self.len,
        };
        let end = offset.checked_add(len).ok_or(err.clone())?;
        if end > self.len as u64 || !offset.is_multiple_of(align) {
            return Err(err);
        }
        Ok(offset as usize)
    }

    /// Copies `dst.len()` bytes at `offset` out of the mapping.
    pub fn read(&self, offset: u64, dst: &mut [u8]) -> Result<(), ShmError> {
        let o = self.check(offset, dst.len() as u64, 1)?;
        // SAFETY: [o, o+len) is inside the mapping (checked); dst is a distinct local
        // buffer, so the ranges do not overlap. The bytes may change concurrently
        // (kernel), which only makes the copied values arbitrary, never unsound for u8.
        unsafe {
            std::ptr::copy_nonoverlapping(self.ptr.as_ptr().add(o), dst.as_mut_ptr(), dst.len())
        };
        self.alive()
    }

    /// Copies `src` into the mapping at `offset`.
    pub fn write(&self, offset: u64, src: &[u8]) -> Result<(), ShmError> {
        let o = self.check(offset, src.len() as u64, 1)?;
        // SAFETY: [o, o+len) is inside the mapping (checked) and writable (PROT_WRITE);
        // src is a distinct buffer.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), self.ptr.as_ptr().add(o), src.len()) };
        self.alive()
    }

    /// Fills `len` bytes at `offset` with `byte`.
    pub fn fill(&self, offset: u64, len: u64, byte: u8) -> Result<(), ShmError> {
        let o = self.check(offset, len, 1)?;
        // SAFETY: the range is inside the writable mapping (checked).
        unsafe { std::ptr::write_bytes(self.ptr.as_ptr().add(o), byte, len as usize) };
        self.alive()
    }

    fn read_array<const N: usize>(&self, offset: u64) -> Result<[u8; N], ShmError> {
        let o = self.check(offset, N as u64, 1)?;
        let mut b = [0u8; N];
        for (i, v) in b.iter_mut().enumerate() {
            // SAFETY: o + i is inside the mapping (checked for the whole array).
            *v = unsafe { std::ptr::read_volatile(self.ptr.as_ptr().add(o + i)) };
        }
        self.alive()?;
        Ok(b)
    }

    fn write_array<const N: usize>(&self, offset: u64, b: [u8; N]) -> Result<(), ShmError> {
        let o = self.check(offset, N as u64, 1)?;
        for (i, v) in b.iter().enumerate() {
            // SAFETY: o + i is inside the writable mapping (checked for the whole array).
            unsafe { std::ptr::write_volatile(self.ptr.as_ptr().add(o + i), *v) };
        }
        self.alive()
    }

    /// Reads a native-endian u8.
    pub fn read_u8(&self, offset: u64) -> Result<u8, ShmError> {
        Ok(self.read_array::<1>(offset)?[0])
    }
    /// Reads a native-endian u16 (any alignment).
    pub fn read_u16(&self, offset: u64) -> Result<u16, ShmError> {
        self.read_array(offset).map(u16::from_ne_bytes)
    }
    /// Reads a native-endian u32 (any alignment).
    pub fn read_u32(&self, offset: u64) -> Result<u32, ShmError> {
        self.read_array(offset).map(u32::from_ne_bytes)
    }
    /// Reads a native-endian u64 (any alignment).
    pub fn read_u64(&self, offset: u64) -> Result<u64, ShmError> {
        self.read_array(offset).map(u64::from_ne_bytes)
    }
    /// Writes a u8.
    pub fn write_u8(&self, offset: u64, v: u8) -> Result<(), ShmError> {
        self.write_array(offset, [v])
    }
    /// Writes a native-endian u16.
    pub fn write_u16(&self, offset: u64, v: u16) -> Result<(), ShmError> {
        self.write_array(offset, v.to_ne_bytes())
    }
    /// Writes a native-endian u32.
    pub fn write_u32(&self, offset: u64, v: u32) -> Result<(), ShmError> {
        self.write_array(offset, v.to_ne_bytes())
    }
    /// Writes a native-endian u64.
    pub fn write_u64(&self, offset: u64, v: u64) -> Result<(), ShmError> {
        self.write_array(offset, v.to_ne_bytes())
    }

    fn atomic_u32(&self, offset: u64) -> Result<&AtomicU32, ShmError> {
        let o = self.check(offset, 4, 4)?;
        // SAFETY: the 4 bytes at o are inside the mapping, 4-aligned (checked; the map
        // start is page-aligned), and live as long as &self. AtomicU32 has the layout of
        // u32, and all concurrent access by us is atomic; the kernel side uses
        // READ_ONCE/WRITE_ONCE-style accesses on these words.
        Ok(unsafe { AtomicU32::from_ptr(self.ptr.as_ptr().add(o) as *mut u32) })
    }

    /// Loads a u32 with acquire ordering (for `cmd_head`).
    pub fn load_acquire_u32(&self, offset: u64) -> Result<u32, ShmError> {
        let v = self.atomic_u32(offset)?.load(Ordering::Acquire);
        self.alive()?;
        Ok(v)
    }

    /// Stores a u32 with release ordering (for `cmd_tail`).
    pub fn store_release_u32(&self, offset: u64, v: u32) -> Result<(), ShmError> {
        self.atomic_u32(offset)?.store(v, Ordering::Release);
        self.alive()
    }
}

impl Drop for SharedMap {
    fn drop(&mut self) {
        if let Some(i) = self.guard {
            unregister_guard(i);
        }
        // SAFETY: ptr/len are exactly what mmap returned (or the same range remapped by
        // the SIGBUS handler); nothing borrows the mapping past &self, so no access can
        // follow the unmap.
        unsafe {
            libc::munmap(self.ptr.as_ptr() as *mut libc::c_void, self.len);
        }
    }
}

/// Creates an anonymous memory file of `len` bytes (for the ring emulator in tests).
pub fn memfd(name: &str, len: u64) -> io::Result<OwnedFd> {
    let cname =
        std::ffi::CString::new(name).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: cname is a valid NUL-terminated string for the duration of the call.
    let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: memfd_create returned a new descriptor that nothing else owns.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    std::fs::File::from(owned.try_clone()?).set_len(len)?;
    Ok(owned)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn accesses_are_bounds_checked_and_shared_between_mappings() {
        let fd = memfd("shm-test", 8192).unwrap();
        let a = SharedMap::map(fd.as_fd(), 8192).unwrap();
        let b = SharedMap::map(fd.as_fd(), 8192).unwrap();
        a.write_u32(100, 0xdead_beef).unwrap();
        assert_eq!(b.read_u32(100).unwrap(), 0xdead_beef);
        a.store_release_u32(64, 7).unwrap();
        assert_eq!(b.load_acquire_u32(64).unwrap(), 7);
        assert!(a.load_acquire_u32(65).is_err(), "misaligned atomic");
        assert!(a.read_u64(8190).is_err());
        assert!(a.read(u64::MAX - 2, &mut [0u8; 8]).is_err());
        assert!(a.write(8192, &[1]).is_err());
        assert!(a.fill(0, 8193, 0).is_err());
        let mut buf = [0u8; 4];
        b.read(100, &mut buf).unwrap();
        assert_eq!(u32::from_ne_bytes(buf), 0xdead_beef);
    }

    #[test]
    fn a_truncated_backing_file_makes_the_mapping_gone_not_the_process() {
        let fd = memfd("shm-sigbus", 3 * 4096).unwrap();
        let a = SharedMap::map(fd.as_fd(), 3 * 4096).unwrap();
        let other_fd = memfd("shm-sigbus-other", 4096).unwrap();
        let other = SharedMap::map(other_fd.as_fd(), 4096).unwrap();
        a.write_u32(8192, 5).unwrap();
        other.write_u32(0, 9).unwrap();
        std::fs::File::from(fd.try_clone().unwrap())
            .set_len(4096)
            .unwrap();
        // The first page still has a backing; the third does not any more.
        assert_eq!(a.read_u32(0), Ok(0));
        assert!(!a.is_gone());
        assert_eq!(a.read_u32(8192), Err(ShmError::Gone));
        assert!(a.is_gone());
        assert_eq!(
            a.write_u32(0, 1),
            Err(ShmError::Gone),
            "every access fails now"
        );
        assert_eq!(other.read_u32(0), Ok(9), "other mappings are untouched");
        assert!(!other.is_gone());
    }
}
