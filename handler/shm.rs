//! The one place that touches shared memory: a `MAP_SHARED` mapping owned by
//! [`SharedMap`], accessed only through methods that take an offset and a length and
//! check them against the mapping (the idea of rust-vmm's `vm-memory`). Raw pointers
//! never leave this module, so the ring code above it cannot read or write outside the
//! mapping whatever offsets the kernel (or a bug) hands it. The same handle can stand
//! over a heap buffer instead ([`SharedMap::heap`]), with the same bounds and loans, so
//! the ring runs unchanged over memory nothing maps: in the kernel emulator's tests, the
//! fuzzers, Miri.
//!
//! Accesses are volatile (the kernel writes the same memory concurrently); `cmd_head`
//! is read with an acquire load and `cmd_tail` written with a release store, as
//! `docs/TCMU.md` §1.8 requires.
//!
//! A mapping can vanish under us: the kernel raises SIGBUS for a data page it does not
//! back (or a file shrunk under a shared mapping). Every mapping is registered in a
//! fixed table that a process-wide SIGBUS handler reads (atomics only, no locks or
//! allocation): a fault inside a registered mapping replaces the whole mapping with
//! anonymous zero pages (`mmap(MAP_FIXED)`), marks it dead and returns, so the faulting
//! load or store completes on the zero page; every accessor checks the dead mark after
//! its access and reports [`ShmError::Gone`]. A fault anywhere else is handed back to
//! the previous SIGBUS disposition (the process dies as it would have).
//!
//! The one exception to "no references into the mapping": a TCMU command's data
//! (`docs/TCMU.md` §1.11) is *lent* as slices ([`Lent`]) so the cache engine copies a
//! write's Data-Out straight into its segment buffer and reads straight into the
//! Data-In, with no staging copy. What makes that sound is written at
//! [`SharedMap::lend`]: the part of the mapping that can be lent (the data area) is out
//! of reach of every other accessor, no two loans overlap, and the kernel neither
//! writes nor reads a command's data blocks between queueing it and its completion.

use std::alloc::Layout;
use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;
use std::sync::atomic::{compiler_fence, AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Once, OnceLock};

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
    /// A loan of bytes outside the lendable part of the mapping, or a plain access
    /// inside it.
    #[error("{len} bytes at offset {offset} are not in the lendable part of the mapping (from {lend_from}), or a plain access inside it")]
    NotLendable {
        /// Requested offset.
        offset: u64,
        /// Requested length.
        len: u64,
        /// Where the lendable part starts.
        lend_from: u64,
    },
    /// A loan of bytes already lent (to another command, or twice in one loan).
    #[error("{len} bytes at offset {offset} overlap bytes already lent")]
    InUse {
        /// Requested offset.
        offset: u64,
        /// Requested length.
        len: u64,
    },
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

/// The memory behind one or more [`SharedMap`] handles: a shared mapping of a file, or
/// a heap buffer standing in for one. Unmapped or freed when the last handle (or loan)
/// is dropped.
struct Region {
    ptr: NonNull<u8>,
    len: usize,
    kind: Kind,
}

enum Kind {
    /// `mmap(MAP_SHARED)` of a descriptor, with its slot in the SIGBUS guard table if it
    /// got one.
    Mapped { guard: Option<usize> },
    /// `alloc_zeroed` with this layout (page-aligned, as a mapping is).
    Heap { layout: Layout },
}

// SAFETY: the region is plain memory; every access goes through volatile or atomic
// operations on checked ranges (or the slices of a loan, which no other access reaches),
// so using it from several threads is no less safe than the kernel writing it
// concurrently, which the accessors already assume.
unsafe impl Send for Region {}
// SAFETY: as above.
unsafe impl Sync for Region {}

impl Drop for Region {
    fn drop(&mut self) {
        match self.kind {
            Kind::Mapped { guard } => {
                if let Some(i) = guard {
                    unregister_guard(i);
                }
                // SAFETY: ptr/len are exactly what mmap returned (or the same range
                // remapped by the SIGBUS handler); the last handle and loan are gone, so
                // no access can follow the unmap.
                unsafe {
                    libc::munmap(self.ptr.as_ptr() as *mut libc::c_void, self.len);
                }
            }
            Kind::Heap { layout } => {
                // SAFETY: ptr was returned by `alloc_zeroed(layout)` and is freed once,
                // here, after the last handle and loan are gone.
                unsafe { std::alloc::dealloc(self.ptr.as_ptr(), layout) }
            }
        }
    }
}

/// A handle on memory shared with the kernel: a read-write `MAP_SHARED` mapping of a
/// file descriptor (a UIO device or a memfd), or a heap buffer with the same layout
/// rules ([`SharedMap::heap`]: for tests, the fuzzers and Miri, where nothing is
/// mapped). The ring code cannot tell them apart.
pub struct SharedMap {
    region: Arc<Region>,
    /// `[lend_from, len)` can only be lent ([`SharedMap::lend`]); the plain accessors
    /// stay below it. `len` until [`SharedMap::set_lendable`].
    lend_from: usize,
    /// Ranges lent now: start -> end.
    lent: Mutex<BTreeMap<u64, u64>>,
}

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
        Ok(Self::over(Region {
            ptr,
            len,
            kind: Kind::Mapped { guard },
        }))
    }

    /// `len` zeroed bytes on the heap, page-aligned like a mapping: the same accessors,
    /// loans and bounds, with nothing mapped (no SIGBUS, never [`ShmError::Gone`]).
    pub fn heap(len: usize) -> io::Result<Self> {
        let layout = Layout::from_size_align(len, 4096)
            .ok()
            .filter(|_| len > 0)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "bad heap size"))?;
        // SAFETY: the layout has a non-zero size (checked above).
        let p = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(p).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        Ok(Self::over(Region {
            ptr,
            len,
            kind: Kind::Heap { layout },
        }))
    }

    fn over(region: Region) -> Self {
        let len = region.len;
        SharedMap {
            region: Arc::new(region),
            lend_from: len,
            lent: Mutex::new(BTreeMap::new()),
        }
    }

    /// Another handle on the same memory, with nothing lendable and no loans: the other
    /// side's view (the kernel emulator's, `crate::emulator`). Like a second mapping of
    /// the same file, it reaches every byte, so it must keep to the protocol the kernel
    /// keeps (`SharedMap::lend`): leave a command's data blocks alone between
    /// publishing the command and reaping its completion.
    #[cfg(any(test, feature = "test-utils"))]
    pub fn alias(&self) -> SharedMap {
        SharedMap {
            region: self.region.clone(),
            lend_from: self.region.len,
            lent: Mutex::new(BTreeMap::new()),
        }
    }

    fn ptr(&self) -> *mut u8 {
        self.region.ptr.as_ptr()
    }

    /// Makes `[from, len)` (a TCMU data area) the lendable part: from now on it is
    /// reached only through [`SharedMap::lend`], and the plain accessors refuse it.
    pub fn set_lendable(&mut self, from: u64) -> Result<(), ShmError> {
        if from > self.region.len as u64 {
            return Err(ShmError::OutOfBounds {
                offset: from,
                len: 0,
                map_len: self.region.len,
            });
        }
        self.lend_from = from as usize;
        Ok(())
    }

    /// Lends `ranges` (offset, length), in order, as one [`Lent`]: each must lie in the
    /// lendable part and overlap neither another range of this loan nor one lent
    /// before and not yet given back. Empty ranges are dropped.
    ///
    /// Why handing out slices of shared memory is sound here:
    /// - The memory stays mapped as long as any loan: a [`Lent`] holds an `Arc` of the
    ///   map, and `munmap` happens only when the last one is dropped. The SIGBUS
    ///   handler replaces pages in place (same addresses, still mapped).
    /// - No other access of this process reaches lent bytes: the plain accessors are
    ///   confined below the lendable part ([`SharedMap::set_lendable`]), and loans are
    ///   disjoint (checked here, under `lent`), so a `&mut [u8]` of one loan never
    ///   aliases another loan's slices. Within a loan, `&`/`&mut` follow its borrow.
    /// - The kernel writes a command's data blocks (Data-Out) before it publishes the
    ///   entry (`cmd_head`, read with acquire ordering), and touches them again only
    ///   after the command's completion (reading Data-In), nor does it reuse or unmap
    ///   them before (`docs/TCMU.md` §1.2, §1.11). The ring lends a command's iovecs
    ///   only between fetching and completing it, and the loan is given back (dropped)
    ///   before the completion is written.
    /// - What remains is the kernel taking the pages away (device removal): the SIGBUS
    ///   handler maps zero pages over the mapping, so lent bytes may read as zeros from
    ///   then on; [`Lent::is_gone`] tells the holder, who must not trust what it read.
    pub fn lend(self: &Arc<Self>, ranges: &[(u64, u64)]) -> Result<Lent, ShmError> {
        let mut taken: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
        let mut lent = self.lent.lock().unwrap_or_else(|e| e.into_inner());
        let refuse = |lent: &mut BTreeMap<u64, u64>, taken: &[(u64, u64)], e: ShmError| {
            for (o, _) in taken {
                lent.remove(o);
            }
            Err(e)
        };
        for &(offset, len) in ranges.iter().filter(|r| r.1 > 0) {
            if let Err(e) = self.check(offset, len, 1) {
                return refuse(&mut lent, &taken, e);
            }
            let end = offset + len;
            if offset < self.lend_from as u64 {
                let e = ShmError::NotLendable {
                    offset,
                    len,
                    lend_from: self.lend_from as u64,
                };
                return refuse(&mut lent, &taken, e);
            }
            // The range starting last before `end` is the only one that can overlap.
            if lent
                .range(..end)
                .next_back()
                .is_some_and(|(_, &e)| e > offset)
            {
                return refuse(&mut lent, &taken, ShmError::InUse { offset, len });
            }
            lent.insert(offset, end);
            taken.push((offset, len));
        }
        drop(lent);
        Ok(Lent {
            map: self.clone(),
            ranges: taken,
        })
    }

    /// True once an access faulted (SIGBUS) and the mapping was replaced by zero pages.
    pub fn is_gone(&self) -> bool {
        match self.region.kind {
            Kind::Mapped { guard } => guard.is_some_and(|i| GUARDS[i].dead.load(Ordering::Acquire)),
            Kind::Heap { .. } => false,
        }
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
        self.region.len
    }

    /// True for an empty mapping (never: `map` refuses those).
    pub fn is_empty(&self) -> bool {
        self.region.len == 0
    }

    fn check(&self, offset: u64, len: u64, align: u64) -> Result<usize, ShmError> {
        let err = ShmError::OutOfBounds {
            offset,
            len,
            map_len: self.region.len,
        };
        let end = offset.checked_add(len).ok_or(err.clone())?;
        if end > self.region.len as u64 || !offset.is_multiple_of(align) {
            return Err(err);
        }
        Ok(offset as usize)
    }

    /// [`SharedMap::check`] for the plain accessors: also below the lendable part.
    fn check_plain(&self, offset: u64, len: u64, align: u64) -> Result<usize, ShmError> {
        let o = self.check(offset, len, align)?;
        if offset + len > self.lend_from as u64 {
            return Err(ShmError::NotLendable {
                offset,
                len,
                lend_from: self.lend_from as u64,
            });
        }
        Ok(o)
    }

    /// Copies `dst.len()` bytes at `offset` out of the mapping.
    pub fn read(&self, offset: u64, dst: &mut [u8]) -> Result<(), ShmError> {
        let o = self.check_plain(offset, dst.len() as u64, 1)?;
        // SAFETY: [o, o+len) is inside the mapping (checked); dst is a distinct local
        // buffer, so the ranges do not overlap. The bytes may change concurrently
        // (kernel), which only makes the copied values arbitrary, never unsound for u8.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr().add(o), dst.as_mut_ptr(), dst.len()) };
        self.alive()
    }

    /// Copies `src` into the mapping at `offset`.
    pub fn write(&self, offset: u64, src: &[u8]) -> Result<(), ShmError> {
        let o = self.check_plain(offset, src.len() as u64, 1)?;
        // SAFETY: [o, o+len) is inside the mapping (checked) and writable (PROT_WRITE);
        // src is a distinct buffer.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), self.ptr().add(o), src.len()) };
        self.alive()
    }

    /// Fills `len` bytes at `offset` with `byte`.
    pub fn fill(&self, offset: u64, len: u64, byte: u8) -> Result<(), ShmError> {
        let o = self.check_plain(offset, len, 1)?;
        // SAFETY: the range is inside the writable mapping (checked).
        unsafe { std::ptr::write_bytes(self.ptr().add(o), byte, len as usize) };
        self.alive()
    }

    fn read_array<const N: usize>(&self, offset: u64) -> Result<[u8; N], ShmError> {
        let o = self.check_plain(offset, N as u64, 1)?;
        let mut b = [0u8; N];
        for (i, v) in b.iter_mut().enumerate() {
            // SAFETY: o + i is inside the mapping (checked for the whole array).
            *v = unsafe { std::ptr::read_volatile(self.ptr().add(o + i)) };
        }
        self.alive()?;
        Ok(b)
    }

    fn write_array<const N: usize>(&self, offset: u64, b: [u8; N]) -> Result<(), ShmError> {
        let o = self.check_plain(offset, N as u64, 1)?;
        for (i, v) in b.iter().enumerate() {
            // SAFETY: o + i is inside the writable mapping (checked for the whole array).
            unsafe { std::ptr::write_volatile(self.ptr().add(o + i), *v) };
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
        let o = self.check_plain(offset, 4, 4)?;
        // SAFETY: the 4 bytes at o are inside the mapping, 4-aligned (checked; the map
        // start is page-aligned), and live as long as &self. AtomicU32 has the layout of
        // u32, and all concurrent access by us is atomic; the kernel side uses
        // READ_ONCE/WRITE_ONCE-style accesses on these words.
        Ok(unsafe { AtomicU32::from_ptr(self.ptr().add(o) as *mut u32) })
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

/// Bytes of a [`SharedMap`] lent as slices (a TCMU command's iovecs), in order; given
/// back when dropped. [`SharedMap::lend`] says why the slices are sound.
pub struct Lent {
    map: Arc<SharedMap>,
    /// (offset, length), each non-empty, disjoint, inside the lendable part.
    ranges: Vec<(u64, u64)>,
}

impl Lent {
    /// Total bytes.
    pub fn len(&self) -> u64 {
        self.ranges.iter().map(|r| r.1).sum()
    }

    /// True when nothing is lent.
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// The lent bytes, one slice per range.
    pub fn slices(&self) -> Vec<&[u8]> {
        self.ranges
            .iter()
            .map(|&(o, n)| {
                // SAFETY: [o, o+n) is inside the mapping (checked by `lend`), which
                // stays mapped while `self.map` is held (this borrow of `self` outlives
                // the slice). Nothing writes those bytes meanwhile: no other loan covers
                // them, the plain accessors cannot reach them, `&mut` slices of this
                // loan need `&mut self`, and the kernel leaves a command's data blocks
                // alone until it is completed (`SharedMap::lend`).
                unsafe { std::slice::from_raw_parts(self.map.ptr().add(o as usize), n as usize) }
            })
            .collect()
    }

    /// The lent bytes, one mutable slice per range.
    pub fn slices_mut(&mut self) -> Vec<&mut [u8]> {
        self.ranges
            .iter()
            .map(|&(o, n)| {
                // SAFETY: as in `slices`; in addition the ranges of a loan are disjoint
                // (checked by `lend`), so these slices do not alias each other, and
                // `&mut self` excludes every other slice of this loan.
                unsafe {
                    std::slice::from_raw_parts_mut(self.map.ptr().add(o as usize), n as usize)
                }
            })
            .collect()
    }

    /// A contiguous copy of the lent bytes (for small parameter lists that are parsed
    /// as one buffer).
    pub fn gather(&self) -> Result<Vec<u8>, ShmError> {
        let v = self.slices().concat();
        self.map.alive()?;
        Ok(v)
    }

    /// Copies `data` into the lent bytes (at most their length) and zeroes the rest, so
    /// no stale data reaches the initiator.
    pub fn scatter(&mut self, data: &[u8]) -> Result<(), ShmError> {
        let mut pos = 0;
        for s in self.slices_mut() {
            let n = s.len().min(data.len().saturating_sub(pos));
            s[..n].copy_from_slice(&data[pos..pos + n]);
            s[n..].fill(0);
            pos += n;
        }
        self.map.alive()
    }

    /// Zeroes the lent bytes from byte `from` on.
    pub fn zero_from(&mut self, from: u64) -> Result<(), ShmError> {
        let mut pos = 0u64;
        for s in self.slices_mut() {
            let skip = from.saturating_sub(pos).min(s.len() as u64) as usize;
            pos += s.len() as u64;
            s[skip..].fill(0);
        }
        self.map.alive()
    }

    /// True once the mapping faulted (SIGBUS) and was replaced by zero pages: what was
    /// read from the slices since may be zeros, what was written is lost.
    pub fn is_gone(&self) -> bool {
        self.map.is_gone()
    }
}

impl Drop for Lent {
    fn drop(&mut self) {
        let mut lent = self.map.lent.lock().unwrap_or_else(|e| e.into_inner());
        for (o, _) in &self.ranges {
            lent.remove(o);
        }
    }
}

/// A finished [`LoanReads`] read: the loan back, whether every piece of it was read
/// whole, and the caller's tag.
pub struct LoanRead<T> {
    /// The loan, filled where `ok`.
    pub lent: Lent,
    /// Every read of it returned all its bytes.
    pub ok: bool,
    /// What the caller queued it with.
    pub tag: T,
}

/// Reads from files straight into loans ([`Lent`]), many at once, through one
/// io_uring (the event loop's: a TCMU READ of cached data is read from the cache device
/// into its Data-In with no thread in between). A loan stays here, held, from the
/// moment its reads are queued until the kernel has completed every one of them, so
/// the memory the kernel writes stays lent to nobody else and mapped.
pub struct LoanReads<T> {
    ring: io_uring::IoUring,
    /// In-flight loans, by slot (the reads' `user_data`).
    flights: Vec<Option<Flight<T>>>,
    free: Vec<usize>,
    /// Reads queued or running: kept at most the completion queue's size, so no
    /// completion can overflow it.
    reads: usize,
    /// Reads queued since the last submit.
    queued: bool,
}

struct Flight<T> {
    lent: Lent,
    left: usize,
    ok: bool,
    tag: T,
}

impl<T> LoanReads<T> {
    /// How long dropping the ring waits for reads still in flight.
    pub const DROP_BOUND: std::time::Duration = std::time::Duration::from_secs(30);

    /// A ring for up to `entries` reads at once (rounded up to a power of two by the
    /// kernel). Fails where io_uring is not available (an old kernel, a seccomp filter,
    /// `kernel.io_uring_disabled`).
    pub fn new(entries: u32) -> io::Result<LoanReads<T>> {
        let ring = io_uring::IoUring::new(entries)?;
        Ok(LoanReads {
            ring,
            flights: Vec::new(),
            free: Vec::new(),
            reads: 0,
            queued: false,
        })
    }

    /// The ring's descriptor: readable while completions wait.
    pub fn fd(&self) -> RawFd {
        self.ring.as_raw_fd()
    }

    /// Loans whose reads are not all complete.
    pub fn in_flight(&self) -> usize {
        self.flights.len() - self.free.len()
    }

    /// Queues reads into `lent`: for each `(offset, pos, len)` of `reads`, `len` bytes
    /// at byte `offset` of `fd` into the loan's bytes at `pos` (counted through its
    /// ranges in order), a read per range it crosses. `align`: the address and length
    /// alignment each piece needs (`O_DIRECT`), checked here. All or nothing: the loan
    /// and the tag come back (nothing queued) when there is nothing to read, a read lies
    /// outside the loan, a piece is not aligned, or the ring has no room now. `fd` must stay open until
    /// [`LoanReads::submit`] (the kernel takes its own reference then).
    pub fn read(
        &mut self,
        lent: Lent,
        fd: RawFd,
        align: usize,
        reads: &[(u64, usize, usize)],
        tag: T,
    ) -> Result<(), (Lent, T)> {
        // Cut the reads at the loan's ranges: (file offset, offset in the map, length).
        let mut pieces: Vec<(u64, u64, usize)> = Vec::new();
        for &(off, pos, len) in reads {
            let (mut off, mut pos, mut len) = (off, pos as u64, len as u64);
            let mut at = 0u64;
            for &(ro, rl) in &lent.ranges {
                if len == 0 {
                    break;
                }
                if pos < at + rl {
                    let n = len.min(at + rl - pos);
                    pieces.push((off, ro + pos - at, n as usize));
                    off += n;
                    pos += n;
                    len -= n;
                }
                at += rl;
            }
            if len > 0 {
                return Err((lent, tag));
            }
        }
        if pieces.is_empty() {
            // Nothing to read (a completion would never come): the caller serves it.
            return Err((lent, tag));
        }
        let base = lent.map.ptr() as usize;
        let aligned = |&(off, at, n): &(u64, u64, usize)| {
            (base + at as usize).is_multiple_of(align)
                && n.is_multiple_of(align.min(512))
                && off.is_multiple_of(align.min(512) as u64)
                && n <= i32::MAX as usize
        };
        let cq = self.ring.params().cq_entries() as usize;
        if !pieces.iter().all(aligned) || self.reads + pieces.len() > cq {
            return Err((lent, tag));
        }
        if self.room() < pieces.len() {
            // Make room: what is queued goes to the kernel now.
            if self.submit().is_err() || self.room() < pieces.len() {
                return Err((lent, tag));
            }
        }
        // Slots fit the 32 bits `user_data` gives them: there are never more flights
        // than reads in flight, which the completion queue's size bounds (above).
        let slot = self.free.pop().unwrap_or_else(|| {
            self.flights.push(None);
            self.flights.len() - 1
        });
        let mut sq = self.ring.submission();
        for &(off, at, n) in &pieces {
            // SAFETY: [at, at + n) lies inside the loan's ranges (cut above from them),
            // so inside the mapping, which stays mapped while the loan's `Arc` is held;
            // the loan is held in `flights[slot]` until the kernel has completed every
            // read queued here (`reap` gives it back only when `left` reaches 0, and
            // `Drop` waits for them), so no other access of this process reaches those
            // bytes while the kernel writes them (`SharedMap::lend`).
            let ptr = unsafe { lent.map.ptr().add(at as usize) };
            let e = io_uring::opcode::Read::new(io_uring::types::Fd(fd), ptr, n as u32)
                .offset(off)
                .build()
                .user_data((n as u64) << 32 | slot as u64);
            // SAFETY: the entry's buffer is valid for writes of `n` bytes until its
            // completion (above); room for every piece was checked above.
            let pushed = unsafe { sq.push(&e) };
            debug_assert!(pushed.is_ok(), "room was checked");
        }
        drop(sq);
        self.reads += pieces.len();
        self.queued = true;
        self.flights[slot] = Some(Flight {
            lent,
            left: pieces.len(),
            ok: true,
            tag,
        });
        Ok(())
    }

    /// Free entries in the submission queue.
    fn room(&mut self) -> usize {
        let sq = self.ring.submission();
        sq.capacity() - sq.len()
    }

    /// Hands the queued reads to the kernel.
    pub fn submit(&mut self) -> io::Result<()> {
        if self.queued {
            self.ring.submit()?;
            self.queued = false;
        }
        Ok(())
    }

    /// Whether completions wait (a shared-memory load, no system call).
    pub fn ready(&mut self) -> bool {
        !self.ring.completion().is_empty()
    }

    /// The loans whose reads have all completed.
    pub fn reap(&mut self) -> Vec<LoanRead<T>> {
        let mut done = Vec::new();
        let mut ended: Vec<(usize, bool)> = Vec::new();
        for cqe in self.ring.completion() {
            // `user_data`: the piece's length above the slot; a short read (or an
            // error) fails the flight.
            let (len, slot) = (cqe.user_data() >> 32, cqe.user_data() as u32 as usize);
            ended.push((slot, cqe.result() >= 0 && cqe.result() as u64 == len));
        }
        for (slot, ok) in ended {
            self.reads -= 1;
            let Some(f) = self.flights.get_mut(slot).and_then(|f| f.as_mut()) else {
                continue;
            };
            f.ok &= ok;
            f.left -= 1;
            if f.left == 0 {
                let f = self.flights[slot].take().expect("in flight");
                self.free.push(slot);
                done.push(LoanRead {
                    lent: f.lent,
                    ok: f.ok,
                    tag: f.tag,
                });
            }
        }
        done
    }
}

impl<T> Drop for LoanReads<T> {
    fn drop(&mut self) {
        // The kernel may still write into loans held here: wait for every read (up to
        // [`LoanReads::DROP_BOUND`]: a hung device) before the loans, and maybe the
        // mappings, go.
        let deadline = std::time::Instant::now() + Self::DROP_BOUND;
        let second = io_uring::types::Timespec::new().sec(1);
        while self.reads > 0 && std::time::Instant::now() < deadline {
            let args = io_uring::types::SubmitArgs::new().timespec(&second);
            match self.ring.submitter().submit_with_args(1, &args) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::ETIME) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
            let _ = self.reap();
        }
        if self.reads > 0 {
            // Reads that never completed: keep their loans (and so their mappings)
            // for the life of the process rather than free memory the kernel may still
            // write.
            for f in self.flights.drain(..).flatten() {
                std::mem::forget(f.lent);
            }
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
    use std::os::unix::fs::FileExt;

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
    fn loans_are_disjoint_inside_the_lendable_part_and_plain_accesses_stay_out_of_it() {
        let fd = memfd("shm-lend", 4 * 4096).unwrap();
        let other = SharedMap::map(fd.as_fd(), 4 * 4096).unwrap();
        let mut m = SharedMap::map(fd.as_fd(), 4 * 4096).unwrap();
        m.set_lendable(4096).unwrap();
        let m = Arc::new(m);
        other.write(4096, &[1, 2, 3, 4]).unwrap();
        // Plain accessors: below the lendable part only.
        assert!(m.read_u32(4092).is_ok());
        assert!(matches!(
            m.read_u32(4094),
            Err(ShmError::NotLendable { .. })
        ));
        assert!(matches!(
            m.fill(8192, 1, 0),
            Err(ShmError::NotLendable { .. })
        ));
        assert!(matches!(
            m.lend(&[(0, 512)]),
            Err(ShmError::NotLendable { .. })
        ));
        assert!(matches!(
            m.lend(&[(16000, 512)]),
            Err(ShmError::OutOfBounds { .. })
        ));
        // Two ranges, empty ones dropped, read in order.
        let mut a = m.lend(&[(8192, 100), (4096, 4), (12288, 0)]).unwrap();
        assert_eq!(a.len(), 104);
        assert_eq!(a.slices()[1], &[1, 2, 3, 4]);
        // Overlapping a loan (or itself) is refused, and the refused loan holds nothing.
        assert_eq!(
            m.lend(&[(9000, 10), (8100, 100)]).err(),
            Some(ShmError::InUse {
                offset: 8100,
                len: 100
            })
        );
        assert!(m.lend(&[(9000, 10), (9005, 10)]).is_err());
        let b = m.lend(&[(9000, 10)]).unwrap();
        a.slices_mut()[0][..3].copy_from_slice(&[7, 8, 9]);
        let mut got = [0u8; 3];
        other.read(8192, &mut got).unwrap();
        assert_eq!(got, [7, 8, 9], "slices are the shared memory");
        a.scatter(&[5; 50]).unwrap();
        assert_eq!(a.gather().unwrap()[48..54], [5, 5, 0, 0, 0, 0]);
        a.zero_from(10).unwrap();
        let g = a.gather().unwrap();
        assert!(g[..10].iter().all(|&x| x == 5) && g[10..].iter().all(|&x| x == 0));
        // Given back when dropped.
        drop(a);
        drop(b);
        assert!(m.lend(&[(8100, 2000)]).is_ok());
    }

    #[test]
    fn heap_memory_has_the_bounds_loans_and_aliases_of_a_mapping() {
        let mut m = SharedMap::heap(4 * 4096).unwrap();
        let kernel = m.alias();
        m.set_lendable(4096).unwrap();
        let m = Arc::new(m);
        kernel.write_u32(100, 0xdead_beef).unwrap();
        assert_eq!(m.read_u32(100).unwrap(), 0xdead_beef);
        kernel.store_release_u32(64, 7).unwrap();
        assert_eq!(m.load_acquire_u32(64).unwrap(), 7);
        assert!(m.load_acquire_u32(66).is_err(), "misaligned atomic");
        assert!(m.read_u32(4094).is_err(), "the data area is lent only");
        assert!(kernel.read_u64(4 * 4096 - 4).is_err());
        kernel.write(8192, &[1, 2, 3]).unwrap();
        let mut loan = m.lend(&[(8192, 3)]).unwrap();
        assert_eq!(loan.slices()[0], &[1, 2, 3]);
        assert!(m.lend(&[(8193, 1)]).is_err());
        loan.scatter(&[9]).unwrap();
        drop(loan);
        assert_eq!(kernel.read_u32(8192).unwrap(), 9);
        assert!(!m.is_gone());
        assert!(SharedMap::heap(0).is_err());
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
    #[test]
    fn loan_reads_fill_a_loan_across_its_ranges_and_refuse_what_they_cannot_take() {
        let mut reads: LoanReads<u32> = match LoanReads::new(8) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("io_uring refused by this kernel ({e}): nothing to test");
                return;
            }
        };
        // A file of 16 KiB whose byte i is i * 7 (mod 256).
        let file = memfd("loan-src", 16384).unwrap();
        let data: Vec<u8> = (0..16384u32).map(|i| (i * 7) as u8).collect();
        std::fs::File::from(file.try_clone().unwrap())
            .write_all_at(&data, 0)
            .unwrap();
        let fd = memfd("shm-loanreads", 8 * 4096).unwrap();
        let mut m = SharedMap::map(fd.as_fd(), 8 * 4096).unwrap();
        m.set_lendable(4096).unwrap();
        let m = Arc::new(m);
        // Two ranges out of order in the map: 4 KiB at 16 KiB, then 8 KiB at 4 KiB.
        let lent = m.lend(&[(16384, 4096), (4096, 8192)]).unwrap();
        // 6 KiB from file offset 1024 into loan bytes 2048.. (crossing the ranges),
        // and 512 bytes from 12288 into its last 512.
        let plan = [(1024u64, 2048usize, 6144usize), (12288, 11776, 512)];
        assert!(reads.read(lent, file.as_raw_fd(), 512, &plan, 7).is_ok());
        assert_eq!(reads.in_flight(), 1);
        reads.submit().unwrap();
        let mut done = Vec::new();
        while done.is_empty() {
            done = reads.reap();
        }
        let d = done.pop().unwrap();
        assert!(d.ok && d.tag == 7 && reads.in_flight() == 0);
        let got = d.lent.slices().concat();
        assert_eq!(&got[2048..8192], &data[1024..7168]);
        assert_eq!(&got[11776..], &data[12288..12800]);
        // Refused, with the loan back: nothing to read, a read past the loan, a piece
        // not aligned as asked.
        let lent = d.lent;
        let (lent, tag) = reads.read(lent, file.as_raw_fd(), 1, &[], 1).unwrap_err();
        assert_eq!(tag, 1);
        let past = [(0u64, 12000usize, 1000usize)];
        let (lent, _) = reads.read(lent, file.as_raw_fd(), 1, &past, 2).unwrap_err();
        let odd = [(0u64, 100usize, 512usize)];
        let (lent, _) = reads
            .read(lent, file.as_raw_fd(), 512, &odd, 3)
            .unwrap_err();
        // A read past the end of the file is short: the flight fails.
        let short = [(16000u64, 0usize, 1024usize)];
        assert!(reads.read(lent, file.as_raw_fd(), 1, &short, 4).is_ok());
        reads.submit().unwrap();
        let mut done = Vec::new();
        while done.is_empty() {
            done = reads.reap();
        }
        assert!(!done[0].ok, "a short read fails its flight");
    }
}
