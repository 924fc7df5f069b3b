//! The one place that touches shared memory: a `MAP_SHARED` mapping owned by
//! [`SharedMap`], accessed only through methods that take an offset and a length and
//! check them against the mapping (the idea of rust-vmm's `vm-memory`). Raw pointers
//! never leave this module, so the ring code above it cannot read or write outside the
//! mapping whatever offsets the kernel (or a bug) hands it.
//!
//! Accesses are volatile (the kernel writes the same memory concurrently); `cmd_head`
//! is read with an acquire load and `cmd_tail` written with a release store, as
//! `docs/tcmu.md` §1.8 requires.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};

/// An access outside the mapping, or misaligned where alignment is required.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("shared memory access of {len} bytes at offset {offset} outside the {map_len}-byte mapping (or misaligned)")]
pub struct OutOfBounds {
    /// Requested offset.
    pub offset: u64,
    /// Requested length.
    pub len: u64,
    /// Size of the mapping.
    pub map_len: usize,
}

/// A shared, read-write mapping of a file descriptor (a UIO device or a memfd).
pub struct SharedMap {
    ptr: NonNull<u8>,
    len: usize,
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
        Ok(SharedMap { ptr, len })
    }

    /// Size of the mapping in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True for an empty mapping (never: `map` refuses those).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn check(&self, offset: u64, len: u64, align: u64) -> Result<usize, OutOfBounds> {
        let err = OutOfBounds {
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
    pub fn read(&self, offset: u64, dst: &mut [u8]) -> Result<(), OutOfBounds> {
        let o = self.check(offset, dst.len() as u64, 1)?;
        // SAFETY: [o, o+len) is inside the mapping (checked); dst is a distinct local
        // buffer, so the ranges do not overlap. The bytes may change concurrently
        // (kernel), which only makes the copied values arbitrary, never unsound for u8.
        unsafe {
            std::ptr::copy_nonoverlapping(self.ptr.as_ptr().add(o), dst.as_mut_ptr(), dst.len())
        };
        Ok(())
    }

    /// Copies `src` into the mapping at `offset`.
    pub fn write(&self, offset: u64, src: &[u8]) -> Result<(), OutOfBounds> {
        let o = self.check(offset, src.len() as u64, 1)?;
        // SAFETY: [o, o+len) is inside the mapping (checked) and writable (PROT_WRITE);
        // src is a distinct buffer.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), self.ptr.as_ptr().add(o), src.len()) };
        Ok(())
    }

    /// Fills `len` bytes at `offset` with `byte`.
    pub fn fill(&self, offset: u64, len: u64, byte: u8) -> Result<(), OutOfBounds> {
        let o = self.check(offset, len, 1)?;
        // SAFETY: the range is inside the writable mapping (checked).
        unsafe { std::ptr::write_bytes(self.ptr.as_ptr().add(o), byte, len as usize) };
        Ok(())
    }

    fn read_array<const N: usize>(&self, offset: u64) -> Result<[u8; N], OutOfBounds> {
        let o = self.check(offset, N as u64, 1)?;
        let mut b = [0u8; N];
        for (i, v) in b.iter_mut().enumerate() {
            // SAFETY: o + i is inside the mapping (checked for the whole array).
            *v = unsafe { std::ptr::read_volatile(self.ptr.as_ptr().add(o + i)) };
        }
        Ok(b)
    }

    fn write_array<const N: usize>(&self, offset: u64, b: [u8; N]) -> Result<(), OutOfBounds> {
        let o = self.check(offset, N as u64, 1)?;
        for (i, v) in b.iter().enumerate() {
            // SAFETY: o + i is inside the writable mapping (checked for the whole array).
            unsafe { std::ptr::write_volatile(self.ptr.as_ptr().add(o + i), *v) };
        }
        Ok(())
    }

    /// Reads a native-endian u8.
    pub fn read_u8(&self, offset: u64) -> Result<u8, OutOfBounds> {
        Ok(self.read_array::<1>(offset)?[0])
    }
    /// Reads a native-endian u16 (any alignment).
    pub fn read_u16(&self, offset: u64) -> Result<u16, OutOfBounds> {
        self.read_array(offset).map(u16::from_ne_bytes)
    }
    /// Reads a native-endian u32 (any alignment).
    pub fn read_u32(&self, offset: u64) -> Result<u32, OutOfBounds> {
        self.read_array(offset).map(u32::from_ne_bytes)
    }
    /// Reads a native-endian u64 (any alignment).
    pub fn read_u64(&self, offset: u64) -> Result<u64, OutOfBounds> {
        self.read_array(offset).map(u64::from_ne_bytes)
    }
    /// Writes a u8.
    pub fn write_u8(&self, offset: u64, v: u8) -> Result<(), OutOfBounds> {
        self.write_array(offset, [v])
    }
    /// Writes a native-endian u16.
    pub fn write_u16(&self, offset: u64, v: u16) -> Result<(), OutOfBounds> {
        self.write_array(offset, v.to_ne_bytes())
    }
    /// Writes a native-endian u32.
    pub fn write_u32(&self, offset: u64, v: u32) -> Result<(), OutOfBounds> {
        self.write_array(offset, v.to_ne_bytes())
    }
    /// Writes a native-endian u64.
    pub fn write_u64(&self, offset: u64, v: u64) -> Result<(), OutOfBounds> {
        self.write_array(offset, v.to_ne_bytes())
    }

    fn atomic_u32(&self, offset: u64) -> Result<&AtomicU32, OutOfBounds> {
        let o = self.check(offset, 4, 4)?;
        // SAFETY: the 4 bytes at o are inside the mapping, 4-aligned (checked; the map
        // start is page-aligned), and live as long as &self. AtomicU32 has the layout of
        // u32, and all concurrent access by us is atomic; the kernel side uses
        // READ_ONCE/WRITE_ONCE-style accesses on these words.
        Ok(unsafe { AtomicU32::from_ptr(self.ptr.as_ptr().add(o) as *mut u32) })
    }

    /// Loads a u32 with acquire ordering (for `cmd_head`).
    pub fn load_acquire_u32(&self, offset: u64) -> Result<u32, OutOfBounds> {
        Ok(self.atomic_u32(offset)?.load(Ordering::Acquire))
    }

    /// Stores a u32 with release ordering (for `cmd_tail`).
    pub fn store_release_u32(&self, offset: u64, v: u32) -> Result<(), OutOfBounds> {
        self.atomic_u32(offset)?.store(v, Ordering::Release);
        Ok(())
    }
}

impl Drop for SharedMap {
    fn drop(&mut self) {
        // SAFETY: ptr/len are exactly what mmap returned; nothing borrows the mapping
        // past &self, so no access can follow the unmap.
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
}
