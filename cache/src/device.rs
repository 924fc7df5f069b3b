//! Block devices the engine runs on: the [`BlockDevice`] trait and its implementations
//! for regular files and block devices ([`FileDevice`], optionally `O_DIRECT`) and RAM
//! ([`MemDevice`]). Test wrappers (crash recording, fault injection) live in
//! [`crate::testing`].
//!
//! All offsets and lengths are bytes. The engine only issues requests that are multiples
//! of 512 bytes at 512-byte aligned offsets.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::RwLock;

/// Alignment of buffers handed to `O_DIRECT` devices.
pub const DIRECT_ALIGN: usize = 4096;

/// A block device: random-access reads and writes at byte offsets, flush, discard.
pub trait BlockDevice: Send + Sync {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Reads exactly `buf.len()` bytes at `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes all of `data` at `offset` (volatile until [`BlockDevice::flush`]).
    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()>;
    /// Writes the concatenation of `bufs` at `offset`, as [`BlockDevice::write_at`] of
    /// it would; a device that can takes it as one request (one system call), so the
    /// kernel has all of it in flight at once. The default writes the pieces in turn.
    fn write_vectored_at(&self, bufs: &[&[u8]], offset: u64) -> io::Result<()> {
        let mut off = offset;
        for b in bufs {
            self.write_at(b, off)?;
            off += b.len() as u64;
        }
        Ok(())
    }
    /// Makes every completed write durable.
    fn flush(&self) -> io::Result<()>;
    /// Discards a range; afterwards it reads as zeros.
    fn discard(&self, offset: u64, len: u64) -> io::Result<()>;
    /// A short name for messages (a path, "mem", ...).
    fn describe(&self) -> String;
    /// [`BlockDevice::write_at`], bypassing any cache of this process's kernel on the
    /// way (the write has reached the device when it returns; still volatile until
    /// [`BlockDevice::flush`]). The default is `write_at`.
    fn write_through(&self, data: &[u8], offset: u64) -> io::Result<()> {
        self.write_at(data, offset)
    }
    /// [`BlockDevice::read_at`] only if it needs no waiting for the device (for a file
    /// or block device: the range is in the page cache); `None` otherwise, and nothing
    /// was read. The default never reads.
    fn try_read_at(&self, _buf: &mut [u8], _offset: u64) -> Option<io::Result<()>> {
        None
    }
    /// The file descriptor a caller may read this device through itself (e.g. with
    /// io_uring), and the alignment of the buffers such reads need (the `O_DIRECT`
    /// alignment, or 1); `None` when there is none. The default has none.
    fn read_fd(&self) -> Option<(RawFd, usize)> {
        None
    }
    /// A hint, best effort: `true` while the caller reads in its own order and sizes
    /// (recovery: large reads ahead of its walk, single headers far apart), so a file or
    /// block device turns the kernel's read-ahead off; `false` turns it back on. The
    /// default ignores it.
    fn advise_random(&self, _random: bool) {}
}

/// Pieces per `pwritev` (Linux's `IOV_MAX`).
const IOV_MAX: usize = 1024;

/// A heap buffer whose data starts at a [`DIRECT_ALIGN`]-aligned address, as `O_DIRECT`
/// needs, built in safe code by over-allocating and starting at the aligned offset.
pub struct AlignedBuf {
    storage: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes.
    pub fn new(len: usize) -> Self {
        let storage = vec![0u8; len + DIRECT_ALIGN];
        let misalign = storage.as_ptr() as usize % DIRECT_ALIGN;
        let start = if misalign == 0 {
            0
        } else {
            DIRECT_ALIGN - misalign
        };
        AlignedBuf {
            storage,
            start,
            len,
        }
    }

    /// Makes the buffer `len` bytes long within its allocation, keeping the bytes
    /// there (a reused buffer: no allocation, no zeroing); false, and no change, when
    /// the allocation has no room for `len`.
    pub fn reuse(&mut self, len: usize) -> bool {
        if self.start + len > self.storage.len() {
            return false;
        }
        self.len = len;
        true
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when the buffer holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.storage[self.start..self.start + self.len]
    }
}

impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..self.start + self.len]
    }
}

/// A regular file or a block device node.
pub struct FileDevice {
    file: File,
    path: PathBuf,
    size: u64,
    direct: bool,
    is_block: bool,
    /// The same device opened with `O_DIRECT`, for [`BlockDevice::write_through`] when
    /// `file` is not (opened on first use; `None` when that failed).
    through: std::sync::OnceLock<Option<File>>,
}

impl FileDevice {
    /// Opens `path` read-write; with `direct`, I/O bypasses the page cache (`O_DIRECT`).
    pub fn open(path: &Path, direct: bool) -> io::Result<Self> {
        Self::open_with(path, direct, false)
    }

    /// Opens `path` read-write for exclusive use, as the daemon and `lc format` do: a
    /// block device with `O_EXCL` (the kernel refuses it while it is mounted, part of a
    /// device-mapper table or opened so by another process), a regular file under an
    /// exclusive advisory lock. A device in use fails with
    /// [`io::ErrorKind::ResourceBusy`].
    pub fn open_exclusive(path: &Path, direct: bool) -> io::Result<Self> {
        Self::open_with(path, direct, true)
    }

    fn open_with(path: &Path, direct: bool, exclusive: bool) -> io::Result<Self> {
        let busy = || {
            io::Error::new(
                io::ErrorKind::ResourceBusy,
                format!(
                    "{}: in use (mounted, claimed by device-mapper, or opened by another lc)",
                    path.display()
                ),
            )
        };
        let mut opts = OpenOptions::new();
        opts.read(true).write(true);
        let mut flags = if direct { libc::O_DIRECT } else { 0 };
        // Linux gives O_EXCL without O_CREAT a meaning only for block devices.
        if exclusive {
            flags |= libc::O_EXCL;
        }
        opts.custom_flags(flags);
        let mut direct = direct;
        let mut opened = opts.open(path);
        // A file system without O_DIRECT (tmpfs) refuses the flag with EINVAL: such a
        // file is served through the page cache ([`FileDevice::is_direct`] says so).
        if direct
            && opened
                .as_ref()
                .is_err_and(|e| e.raw_os_error() == Some(libc::EINVAL))
        {
            direct = false;
            opts.custom_flags(flags & !libc::O_DIRECT);
            opened = opts.open(path);
        }
        let mut file = opened.map_err(|e| match e.raw_os_error() {
            Some(libc::EBUSY) => busy(),
            _ => annotate(path, e),
        })?;
        let meta = file.metadata()?;
        let is_block = meta.file_type().is_block_device();
        if exclusive && meta.is_file() {
            file.try_lock().map_err(|e| match e {
                std::fs::TryLockError::WouldBlock => busy(),
                std::fs::TryLockError::Error(e) => annotate(path, e),
            })?;
        }
        let size = if is_block {
            file.seek(SeekFrom::End(0))?
        } else if meta.is_file() {
            meta.len()
        } else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{}: not a regular file or block device", path.display()),
            ));
        };
        Ok(FileDevice {
            file,
            path: path.to_path_buf(),
            size,
            direct,
            is_block,
            through: std::sync::OnceLock::new(),
        })
    }

    /// Whether I/O bypasses the page cache: `O_DIRECT` was asked for and the file
    /// system accepted it.
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    fn needs_bounce(&self, ptr: *const u8, len: usize, offset: u64) -> bool {
        self.direct && self.needs_bounce_direct(ptr, len, offset)
    }

    fn needs_bounce_direct(&self, ptr: *const u8, len: usize, offset: u64) -> bool {
        !(ptr as usize).is_multiple_of(DIRECT_ALIGN)
            || !len.is_multiple_of(512)
            || !offset.is_multiple_of(512)
    }

    fn check_range(&self, offset: u64, len: usize) -> io::Result<()> {
        match offset.checked_add(len as u64) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{}: request {}+{} beyond device end {}",
                    self.path.display(),
                    offset,
                    len,
                    self.size
                ),
            )),
        }
    }
}

fn annotate(path: &Path, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {}", path.display(), e))
}

impl BlockDevice for FileDevice {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.check_range(offset, buf.len())?;
        if self.needs_bounce(buf.as_ptr(), buf.len(), offset) {
            let mut bounce = AlignedBuf::new(buf.len());
            self.file.read_exact_at(&mut bounce, offset)?;
            buf.copy_from_slice(&bounce);
            return Ok(());
        }
        self.file.read_exact_at(buf, offset)
    }

    fn read_fd(&self) -> Option<(RawFd, usize)> {
        let align = if self.direct { DIRECT_ALIGN } else { 1 };
        Some((self.file.as_raw_fd(), align))
    }

    fn try_read_at(&self, buf: &mut [u8], offset: u64) -> Option<io::Result<()>> {
        // O_DIRECT reads always wait for the device.
        if self.direct {
            return None;
        }
        if let Err(e) = self.check_range(offset, buf.len()) {
            return Some(Err(e));
        }
        let len = buf.len();
        let r = rustix::io::preadv2(
            &self.file,
            &mut [io::IoSliceMut::new(buf)],
            offset,
            rustix::io::ReadWriteFlags::NOWAIT,
        );
        match r {
            Ok(n) if n == len => Some(Ok(())),
            // Partly cached, not cached (EAGAIN), or no RWF_NOWAIT here: the caller
            // reads with waiting.
            Ok(_) => None,
            Err(e) if e == rustix::io::Errno::AGAIN || e == rustix::io::Errno::OPNOTSUPP => None,
            Err(e) => Some(Err(e.into())),
        }
    }

    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        self.check_range(offset, data.len())?;
        if self.needs_bounce(data.as_ptr(), data.len(), offset) {
            let mut bounce = AlignedBuf::new(data.len());
            bounce.copy_from_slice(data);
            return self.file.write_all_at(&bounce, offset);
        }
        self.file.write_all_at(data, offset)
    }

    fn write_vectored_at(&self, bufs: &[&[u8]], offset: u64) -> io::Result<()> {
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        self.check_range(offset, total)?;
        // Pieces O_DIRECT cannot take as they are go one by one (each bounced).
        let mut off = offset;
        let aligned = bufs.iter().all(|b| {
            let ok = !self.needs_bounce(b.as_ptr(), b.len(), off);
            off += b.len() as u64;
            ok
        });
        if !aligned || bufs.len() == 1 {
            let mut off = offset;
            for b in bufs {
                self.write_at(b, off)?;
                off += b.len() as u64;
            }
            return Ok(());
        }
        let mut slices: Vec<io::IoSlice<'_>> = bufs.iter().map(|b| io::IoSlice::new(b)).collect();
        let mut rest = &mut slices[..];
        let mut off = offset;
        while !rest.is_empty() {
            let k = rest.len().min(IOV_MAX);
            let n = rustix::io::pwritev(&self.file, &rest[..k], off)?;
            if n == 0 {
                return Err(io::Error::from(io::ErrorKind::WriteZero));
            }
            off += n as u64;
            io::IoSlice::advance_slices(&mut rest, n);
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        if self.is_block {
            // fdatasync on a block device flushes its volatile write cache.
            self.file.sync_data()
        } else {
            self.file.sync_data()
        }
    }

    fn advise_random(&self, random: bool) {
        let advice = if random {
            rustix::fs::Advice::Random
        } else {
            rustix::fs::Advice::Normal
        };
        // A hint: a file system without it reads as before.
        let _ = rustix::fs::fadvise(&self.file, 0, None, advice);
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check_range(offset, len as usize)?;
        let flags = rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE;
        match rustix::fs::fallocate(&self.file, flags, offset, len) {
            Ok(()) => Ok(()),
            Err(e) if e == rustix::io::Errno::OPNOTSUPP || e == rustix::io::Errno::NOSYS => {
                // No hole punching here: write zeros so the range still reads as zeros.
                let chunk = AlignedBuf::new(1 << 20);
                let mut done = 0u64;
                while done < len {
                    let n = (len - done).min(chunk.len() as u64) as usize;
                    self.file.write_all_at(&chunk[..n], offset + done)?;
                    done += n as u64;
                }
                Ok(())
            }
            Err(e) => Err(io::Error::from(e)),
        }
    }

    fn describe(&self) -> String {
        self.path.display().to_string()
    }

    fn write_through(&self, data: &[u8], offset: u64) -> io::Result<()> {
        let through = self.through.get_or_init(|| {
            if self.direct {
                return None;
            }
            // The open file itself, again (not the path, which could name another
            // device by now), with O_DIRECT.
            let mut opts = OpenOptions::new();
            opts.write(true).custom_flags(libc::O_DIRECT);
            opts.open(format!("/proc/self/fd/{}", self.file.as_raw_fd()))
                .ok()
        });
        match through {
            Some(f) if !self.needs_bounce_direct(data.as_ptr(), data.len(), offset) => {
                self.check_range(offset, data.len())?;
                f.write_all_at(data, offset)
            }
            _ => self.write_at(data, offset),
        }
    }
}

/// Creates (or truncates) a regular file of `size` bytes, for tests, demos and benchmarks.
pub fn create_file(path: &Path, size: u64) -> io::Result<()> {
    let mut f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(path)
        .map_err(|e| annotate(path, e))?;
    f.set_len(size)?;
    f.flush()
}

/// A device in RAM. Writes are immediately "durable"; use
/// [`crate::testing::CrashDevice`] to model a volatile write cache.
pub struct MemDevice {
    data: RwLock<Vec<u8>>,
    name: String,
}

impl MemDevice {
    /// A zeroed device of `size` bytes.
    pub fn new(size: u64) -> Self {
        Self::from_bytes(vec![0; size as usize], "mem")
    }

    /// A device holding `data`.
    pub fn from_bytes(data: Vec<u8>, name: &str) -> Self {
        MemDevice {
            data: RwLock::new(data),
            name: name.to_string(),
        }
    }

    /// A copy of the whole content.
    pub fn snapshot(&self) -> Vec<u8> {
        self.data.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn range(&self, offset: u64, len: usize, size: usize) -> io::Result<std::ops::Range<usize>> {
        let start = usize::try_from(offset).map_err(|_| out_of_range(&self.name))?;
        match start.checked_add(len) {
            Some(end) if end <= size => Ok(start..end),
            _ => Err(out_of_range(&self.name)),
        }
    }
}

fn out_of_range(name: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("{name}: request beyond device end"),
    )
}

impl BlockDevice for MemDevice {
    fn size(&self) -> u64 {
        self.data.read().unwrap_or_else(|e| e.into_inner()).len() as u64
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let data = self.data.read().unwrap_or_else(|e| e.into_inner());
        let r = self.range(offset, buf.len(), data.len())?;
        buf.copy_from_slice(&data[r]);
        Ok(())
    }

    /// Memory never waits: every read is served.
    fn try_read_at(&self, buf: &mut [u8], offset: u64) -> Option<io::Result<()>> {
        Some(self.read_at(buf, offset))
    }

    fn write_at(&self, src: &[u8], offset: u64) -> io::Result<()> {
        let mut data = self.data.write().unwrap_or_else(|e| e.into_inner());
        let len = data.len();
        let r = self.range(offset, src.len(), len)?;
        data[r].copy_from_slice(src);
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut data = self.data.write().unwrap_or_else(|e| e.into_inner());
        let size = data.len();
        let r = self.range(offset, len as usize, size)?;
        data[r].fill(0);
        Ok(())
    }

    fn describe(&self) -> String {
        self.name.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh 1 MiB file `dev.img` in a directory of its own (removed by the test).
    fn scratch_file(tag: &str) -> (PathBuf, PathBuf) {
        let dir = std::env::temp_dir().join(format!("lc-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("dev.img");
        create_file(&p, 1 << 20).unwrap();
        (dir, p)
    }

    #[test]
    fn exclusive_opens_exclude_each_other_but_not_plain_opens() {
        let (dir, p) = scratch_file("excl");
        let a = FileDevice::open_exclusive(&p, false).unwrap();
        let e = FileDevice::open_exclusive(&p, false)
            .err()
            .expect("second exclusive open");
        assert_eq!(e.kind(), io::ErrorKind::ResourceBusy);
        assert!(e.to_string().contains("in use"), "{e}");
        FileDevice::open(&p, false).expect("plain open (size checks) still works");
        drop(a);
        FileDevice::open_exclusive(&p, false).expect("free again after close");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn try_read_at_serves_cached_pages_only_and_never_direct() {
        let (dir, p) = scratch_file("nowait");
        let d = FileDevice::open(&p, false).unwrap();
        let data: Vec<u8> = (0..16384u32).map(|i| (i * 7 % 251) as u8).collect();
        d.write_at(&data, 8192).unwrap();
        // Just written, so cached: served, with the right bytes.
        let mut b = vec![0u8; 8192];
        d.try_read_at(&mut b, 12288)
            .expect("freshly written pages are cached")
            .unwrap();
        assert_eq!(b, data[4096..12288]);
        // Out of range is an error, not "would block".
        assert!(d.try_read_at(&mut b, (1 << 20) - 4096).unwrap().is_err());
        // O_DIRECT always waits for the device.
        if let Ok(direct) = FileDevice::open(&p, true) {
            assert!(direct.try_read_at(&mut b, 0).is_none());
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn write_through_and_buffered_io_see_each_other() {
        let (dir, p) = scratch_file("through");
        let d = FileDevice::open(&p, false).unwrap();
        // A cached page, then written through: reads see the new bytes.
        d.write_at(&[1u8; 8192], 65536).unwrap();
        let mut b = vec![0u8; 8192];
        d.read_at(&mut b, 65536).unwrap();
        let mut data = AlignedBuf::new(8192);
        data.fill(2);
        d.write_through(&data, 65536).unwrap();
        d.read_at(&mut b, 65536).unwrap();
        assert!(b.iter().all(|&x| x == 2));
        // Unaligned data falls back to a plain write; the range is checked.
        d.write_through(&[3u8; 100], 65536).unwrap();
        d.read_at(&mut b[..100], 65536).unwrap();
        assert!(b[..100].iter().all(|&x| x == 3));
        assert!(d.write_through(&data, (1 << 20) - 4096).is_err());
        // After a flush the bytes are in the file.
        d.flush().unwrap();
        let f = std::fs::read(&p).unwrap();
        assert!(f[65536 + 100..65536 + 8192].iter().all(|&x| x == 2));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn o_direct_files_round_trip_on_tmpfs_too() {
        // tmpfs before Linux 6.6 refuses O_DIRECT (EINVAL): the device then opens
        // without it and `is_direct` says so; newer tmpfs takes it. Either way the
        // device works.
        let shm = Path::new("/dev/shm");
        if !shm.is_dir() {
            return;
        }
        let p = shm.join(format!("lc-direct-{}.img", std::process::id()));
        create_file(&p, 1 << 20).unwrap();
        let d = FileDevice::open(&p, true).unwrap();
        let mut b = AlignedBuf::new(4096);
        let mut w = AlignedBuf::new(4096);
        w.fill(7);
        d.write_at(&w, 8192).unwrap();
        d.read_at(&mut b, 8192).unwrap();
        std::fs::remove_file(&p).unwrap();
        assert!(b.iter().all(|&x| x == 7));
    }

    #[test]
    fn vectored_writes_land_in_order_direct_or_not_aligned_or_not() {
        let (dir, p) = scratch_file("vectored");
        for direct in [true, false] {
            let d = FileDevice::open(&p, direct).unwrap();
            let mut a = AlignedBuf::new(8192);
            a.fill(1);
            let mut b = AlignedBuf::new(4096);
            b.fill(2);
            let c = vec![3u8; 4096]; // a plain Vec: maybe not aligned for O_DIRECT
            let off = if direct { 4096 } else { 65536 };
            d.write_vectored_at(&[&a, &b], off).unwrap();
            d.write_vectored_at(&[&b, &c[..], &a[..4096]], off + 12288)
                .unwrap();
            let mut r = AlignedBuf::new(24576);
            d.read_at(&mut r, off).unwrap();
            let want: Vec<u8> = [
                [1u8; 8192].as_slice(),
                &[2; 4096],
                &[2; 4096],
                &[3; 4096],
                &[1; 4096],
            ]
            .concat();
            assert_eq!(&r[..], &want[..], "direct {direct}");
            assert!(
                d.write_vectored_at(&[&a, &b], (1 << 20) - 8192).is_err(),
                "beyond the end"
            );
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn aligned_buf_is_aligned() {
        for len in [0, 1, 512, 4096, 100_000] {
            let b = AlignedBuf::new(len);
            assert_eq!(b.len(), len);
            assert_eq!(b.as_ptr() as usize % DIRECT_ALIGN, 0);
        }
    }

    #[test]
    fn file_device_round_trip_and_discard_reads_zero() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f.img");
        create_file(&p, 1 << 20).unwrap();
        for direct in [false, true] {
            let d = match FileDevice::open(&p, direct) {
                Ok(d) => d,
                Err(_) if direct => continue, // tmpfs refuses O_DIRECT
                Err(e) => panic!("{e}"),
            };
            let data: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
            d.write_at(&data, 4096).unwrap();
            let mut back = vec![0; 8192];
            d.read_at(&mut back, 4096).unwrap();
            assert_eq!(back, data);
            d.discard(4096, 4096).unwrap();
            d.read_at(&mut back, 4096).unwrap();
            assert!(back[..4096].iter().all(|&b| b == 0));
            assert_eq!(&back[4096..], &data[4096..]);
            assert!(d.read_at(&mut back, (1 << 20) - 4096).is_err());
        }
    }
}
