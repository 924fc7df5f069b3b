//! Test devices: [`CrashWorld`] records every write since each device's last flush and
//! materialises what the devices could hold after a power cut; [`FaultDevice`] injects
//! I/O errors; [`HoldDevice`] holds reads (a hung disk, or a reader stopped at a chosen
//! moment). Used by the crash, corruption, cleaner and model tests and available to the
//! daemon's tests.

use std::collections::HashSet;
use std::io;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use rand::Rng;

use crate::device::BlockDevice;
use crate::format::SECTOR;

struct DevState {
    name: String,
    /// What a power cut is sure to leave.
    durable: Vec<u8>,
    /// What reads return now.
    current: Vec<u8>,
    /// Writes since the last flush, in order: (offset, data).
    pending: Vec<(u64, Vec<u8>)>,
}

struct World {
    devs: Vec<DevState>,
    ops: u64,
    /// After this many device operations every operation fails (the power is cut).
    cut_after: Option<u64>,
}

/// A set of devices sharing one power supply: a crash cuts them all at one instant.
#[derive(Clone)]
pub struct CrashWorld {
    inner: Arc<Mutex<World>>,
}

/// A device of a [`CrashWorld`].
pub struct CrashDevice {
    world: Arc<Mutex<World>>,
    idx: usize,
    size: u64,
}

impl Default for CrashWorld {
    fn default() -> Self {
        Self::new()
    }
}

impl CrashWorld {
    /// An empty world.
    pub fn new() -> Self {
        CrashWorld {
            inner: Arc::new(Mutex::new(World {
                devs: Vec::new(),
                ops: 0,
                cut_after: None,
            })),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, World> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a device whose durable content is `image`.
    pub fn add(&self, name: &str, image: Vec<u8>) -> Arc<CrashDevice> {
        let mut w = self.lock();
        let size = image.len() as u64;
        w.devs.push(DevState {
            name: name.to_string(),
            durable: image.clone(),
            current: image,
            pending: Vec::new(),
        });
        Arc::new(CrashDevice {
            world: self.inner.clone(),
            idx: w.devs.len() - 1,
            size,
        })
    }

    /// Device `idx` (in `add` order), another handle to it.
    pub fn device(&self, idx: usize) -> Arc<CrashDevice> {
        let w = self.lock();
        Arc::new(CrashDevice {
            world: self.inner.clone(),
            idx,
            size: w.devs[idx].current.len() as u64,
        })
    }

    /// Cuts the power after `n` more device operations (reads, writes, flushes).
    pub fn cut_after(&self, n: u64) {
        let mut w = self.lock();
        w.cut_after = Some(w.ops + n);
    }

    /// Cancels a pending cut (one that has not happened yet).
    pub fn clear_cut(&self) {
        let mut w = self.lock();
        if w.cut_after.is_some_and(|c| w.ops < c) {
            w.cut_after = None;
        }
    }

    /// Cuts the power now.
    pub fn cut_now(&self) {
        let mut w = self.lock();
        w.cut_after = Some(w.ops);
    }

    /// Device operations so far.
    pub fn ops(&self) -> u64 {
        self.lock().ops
    }

    /// True once the power is cut.
    pub fn is_cut(&self) -> bool {
        let w = self.lock();
        w.cut_after.is_some_and(|c| w.ops >= c)
    }

    /// What each device could hold after a power cut now: its durable content plus a
    /// random subset of its unflushed writes applied in order, any of them possibly
    /// torn at sector granularity. Returns one image per device, in `add` order.
    pub fn crash_images(&self, rng: &mut impl Rng) -> Vec<Vec<u8>> {
        let w = self.lock();
        w.devs
            .iter()
            .map(|d| {
                let mut img = d.durable.clone();
                for (off, data) in &d.pending {
                    if !rng.gen_bool(0.5) {
                        continue;
                    }
                    let torn = rng.gen_bool(0.3);
                    for (i, chunk) in data.chunks(SECTOR as usize).enumerate() {
                        if torn && rng.gen_bool(0.5) {
                            continue;
                        }
                        let o = *off as usize + i * SECTOR as usize;
                        img[o..o + chunk.len()].copy_from_slice(chunk);
                    }
                }
                img
            })
            .collect()
    }

    /// Names of the devices, in `add` order.
    pub fn names(&self) -> Vec<String> {
        self.lock().devs.iter().map(|d| d.name.clone()).collect()
    }
}

fn power_cut() -> io::Error {
    io::Error::other("power cut (crash test)")
}

impl CrashDevice {
    fn op<T>(&self, f: impl FnOnce(&mut DevState) -> io::Result<T>) -> io::Result<T> {
        let mut w = self.world.lock().unwrap_or_else(|e| e.into_inner());
        if w.cut_after.is_some_and(|c| w.ops >= c) {
            return Err(power_cut());
        }
        w.ops += 1;
        let idx = self.idx;
        f(&mut w.devs[idx])
    }

    fn check(&self, off: u64, len: u64) -> io::Result<()> {
        match off.checked_add(len) {
            Some(e) if e <= self.size => Ok(()),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "beyond device end",
            )),
        }
    }
}

impl BlockDevice for CrashDevice {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.check(offset, buf.len() as u64)?;
        self.op(|d| {
            let o = offset as usize;
            buf.copy_from_slice(&d.current[o..o + buf.len()]);
            Ok(())
        })
    }

    /// Served like a cached page: the crash tests take the non-blocking read path too.
    fn try_read_at(&self, buf: &mut [u8], offset: u64) -> Option<io::Result<()>> {
        Some(self.read_at(buf, offset))
    }

    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        self.check(offset, data.len() as u64)?;
        self.op(|d| {
            let o = offset as usize;
            d.current[o..o + data.len()].copy_from_slice(data);
            d.pending.push((offset, data.to_vec()));
            Ok(())
        })
    }

    fn flush(&self) -> io::Result<()> {
        self.op(|d| {
            d.durable.copy_from_slice(&d.current);
            d.pending.clear();
            Ok(())
        })
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check(offset, len)?;
        let zeros = vec![0u8; len as usize];
        self.write_at(&zeros, offset)
    }

    fn describe(&self) -> String {
        let w = self.world.lock().unwrap_or_else(|e| e.into_inner());
        w.devs[self.idx].name.clone()
    }
}

/// Which operations a [`FaultDevice`] fails.
#[derive(Default)]
pub struct Faults {
    /// Fail reads touching any of these 512-byte sectors.
    pub bad_read_sectors: HashSet<u64>,
    /// Fail writes touching any of these sectors.
    pub bad_write_sectors: HashSet<u64>,
    /// Fail every flush.
    pub fail_flush: bool,
    /// Fail every discard.
    pub fail_discard: bool,
    /// Fail everything.
    pub dead: bool,
}

/// Wraps a device and fails chosen operations with EIO.
pub struct FaultDevice {
    inner: Arc<dyn BlockDevice>,
    /// The faults in force; change them at any time.
    pub faults: Mutex<Faults>,
}

impl FaultDevice {
    /// Wraps `inner` with no faults.
    pub fn new(inner: Arc<dyn BlockDevice>) -> Self {
        FaultDevice {
            inner,
            faults: Mutex::new(Faults::default()),
        }
    }

    fn hits(set: &HashSet<u64>, offset: u64, len: u64) -> bool {
        let first = offset / SECTOR;
        let last = (offset + len).div_ceil(SECTOR);
        (first..last).any(|s| set.contains(&s))
    }

    fn faults(&self) -> std::sync::MutexGuard<'_, Faults> {
        self.faults.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn eio() -> io::Error {
    io::Error::from_raw_os_error(libc::EIO)
}

impl BlockDevice for FaultDevice {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        {
            let f = self.faults();
            if f.dead || Self::hits(&f.bad_read_sectors, offset, buf.len() as u64) {
                return Err(eio());
            }
        }
        self.inner.read_at(buf, offset)
    }
    fn try_read_at(&self, buf: &mut [u8], offset: u64) -> Option<io::Result<()>> {
        {
            let f = self.faults();
            if f.dead || Self::hits(&f.bad_read_sectors, offset, buf.len() as u64) {
                return Some(Err(eio()));
            }
        }
        self.inner.try_read_at(buf, offset)
    }
    fn advise_random(&self, random: bool) {
        self.inner.advise_random(random)
    }
    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        {
            let f = self.faults();
            if f.dead || Self::hits(&f.bad_write_sectors, offset, data.len() as u64) {
                return Err(eio());
            }
        }
        self.inner.write_at(data, offset)
    }
    fn flush(&self) -> io::Result<()> {
        {
            let f = self.faults();
            if f.dead || f.fail_flush {
                return Err(eio());
            }
        }
        self.inner.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        let f = self.faults();
        if f.dead || f.fail_discard {
            return Err(eio());
        }
        drop(f);
        self.inner.discard(offset, len)
    }
    fn describe(&self) -> String {
        format!("faulty:{}", self.inner.describe())
    }
}

/// Wraps a device; its reads wait while it is held (a hung disk), and never complete
/// without waiting (`try_read_at` declines, so a reader on a non-blocking path hands
/// them to a thread that may wait). Counts the reads begun, and the writes that start
/// in the ranges given to [`HoldDevice::watch_writes`].
pub struct HoldDevice {
    inner: Arc<dyn BlockDevice>,
    held: Mutex<bool>,
    released: Condvar,
    reads: AtomicU64,
    watched: Mutex<Vec<Range<u64>>>,
    watched_writes: AtomicU64,
}

impl HoldDevice {
    /// Wraps `inner`, held from the start or not.
    pub fn new(inner: Arc<dyn BlockDevice>, held: bool) -> Self {
        HoldDevice {
            inner,
            held: Mutex::new(held),
            released: Condvar::new(),
            reads: AtomicU64::new(0),
            watched: Mutex::new(Vec::new()),
            watched_writes: AtomicU64::new(0),
        }
    }

    /// Reads from now on wait.
    pub fn hold(&self) {
        *self.held.lock().unwrap_or_else(|e| e.into_inner()) = true;
    }

    /// Waiting reads go on, and later ones do not wait.
    pub fn release(&self) {
        *self.held.lock().unwrap_or_else(|e| e.into_inner()) = false;
        self.released.notify_all();
    }

    /// Reads begun so far (held or not).
    pub fn reads(&self) -> u64 {
        self.reads.load(Ordering::SeqCst)
    }

    /// Counts from now on the writes that start in any of `ranges`.
    pub fn watch_writes(&self, ranges: Vec<Range<u64>>) {
        *self.watched.lock().unwrap_or_else(|e| e.into_inner()) = ranges;
    }

    /// Writes counted in the watched ranges so far.
    pub fn watched_writes(&self) -> u64 {
        self.watched_writes.load(Ordering::SeqCst)
    }
}

impl BlockDevice for HoldDevice {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        while *held {
            held = self.released.wait(held).unwrap_or_else(|e| e.into_inner());
        }
        drop(held);
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        let watched = self.watched.lock().unwrap_or_else(|e| e.into_inner());
        if watched.iter().any(|r| r.contains(&offset)) {
            self.watched_writes.fetch_add(1, Ordering::SeqCst);
        }
        drop(watched);
        self.inner.write_at(data, offset)
    }
    fn flush(&self) -> io::Result<()> {
        self.inner.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.inner.discard(offset, len)
    }
    fn describe(&self) -> String {
        format!("held:{}", self.inner.describe())
    }
}
