//! Shared helpers for the engine's integration tests.
#![allow(dead_code)]

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use lc_cache::{
    format_device, Backing, BlockDevice, Cache, FormatOptions, MemDevice, OpenOptions, Tunables,
};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// A seed from the environment (`LC_SEED`) or random; printed so failures can be replayed.
pub fn seed(name: &str) -> u64 {
    let s = std::env::var("LC_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("{name}: seed {s} (rerun with LC_SEED={s})");
    s
}

/// Number of cases: `LC_CASES` or the default.
pub fn cases(default: usize) -> usize {
    std::env::var("LC_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

pub fn rng(seed: u64) -> SmallRng {
    SmallRng::seed_from_u64(seed)
}

/// Tunables that make a small cache exercise writeback, deadlines and wrap-around.
pub fn random_tunables(rng: &mut SmallRng) -> Tunables {
    // The cleaner: off, and moving segments up to half, 80% and 95% live.
    let clean = [0, 50, 80, 80, 95][rng.gen_range(0..5)];
    Tunables {
        clean_live_max: clean,
        writeback_threshold: rng.gen_range(0..=90),
        writeback_batch: rng.gen_range(1..=4),
        writeback_sort: rng.gen_bool(0.7),
        writeback_enabled: rng.gen_bool(0.8),
        barrier_deadline_ms: rng.gen_range(0..=2),
        flush_interval_s: 0,
        // Frequent checkpoints (0: none), so power cuts land in them too.
        checkpoint_interval_segments: rng.gen_range(0..=3),
        // Staging lines ahead of appends: off, every line, and every few lines.
        stage_lines: [0, 1, 1, 2, 8][rng.gen_range(0..5)],
        // Read caching: off, at the first miss (mostly), at the second; streams cut
        // off at 16 KiB, at the default, or never.
        read_promote_threshold: [0, 1, 1, 1, 2][rng.gen_range(0..5)],
        sequential_cutoff: [0, 16 << 10, 4 << 20][rng.gen_range(0..3)],
        ..Tunables::default()
    }
}

/// Formats a fresh in-memory cache device.
pub fn mem_cache(size: u64, block_size: u32, segment_size: u32) -> Arc<dyn BlockDevice> {
    mem_cache_v(
        size,
        block_size,
        segment_size,
        lc_cache::format::FORMAT_VERSION,
    )
}

/// [`mem_cache`] of format `version`.
pub fn mem_cache_v(
    size: u64,
    block_size: u32,
    segment_size: u32,
    version: u32,
) -> Arc<dyn BlockDevice> {
    let dev: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(size));
    format_device(
        dev.as_ref(),
        FormatOptions {
            block_size,
            segment_size,
            version,
        },
    )
    .unwrap();
    dev
}

pub fn backings(devs: &[Arc<dyn BlockDevice>]) -> Vec<Backing> {
    devs.iter()
        .enumerate()
        .map(|(i, d)| Backing {
            id: i as u8,
            dev: d.clone(),
            label: format!("disk{i}"),
        })
        .collect()
}

/// Segment size of a formatted cache device.
pub fn segment_bytes(cache: &dyn BlockDevice) -> u64 {
    lc_cache::probe(cache)
        .unwrap()
        .expect("formatted")
        .geometry
        .segment_size as u64
}

pub fn open(
    cache: Arc<dyn BlockDevice>,
    devs: &[Arc<dyn BlockDevice>],
    t: Tunables,
    bufs: usize,
) -> Cache {
    open_report(cache, devs, t, bufs).0
}

/// [`open`], with what recovery did.
pub fn open_report(
    cache: Arc<dyn BlockDevice>,
    devs: &[Arc<dyn BlockDevice>],
    t: Tunables,
    bufs: usize,
) -> (Cache, lc_cache::RecoveryReport) {
    let ram_bytes = bufs as u64 * segment_bytes(cache.as_ref());
    Cache::open(
        cache,
        backings(devs),
        OpenOptions {
            ram_bytes,
            tunables: t,
            ..Default::default()
        },
    )
    .unwrap()
}

/// The 4 KiB block `b` of device 0 as write number `serial` writes it (eight tagged
/// sectors, see [`tagged_sector`]).
pub fn tagged_block(serial: u64, b: u64) -> Vec<u8> {
    let mut data = vec![0u8; 4096];
    for s in 0..8u64 {
        tagged_sector(
            serial,
            0,
            b * 8 + s,
            &mut data[s as usize * 512..(s as usize + 1) * 512],
        );
    }
    data
}

/// The content of sector `sector` of device `dev` written by write number `serial`
/// (serial 0 = zeros): serial, sector and device up front, a pseudo-random fill after,
/// so any sector read back names the write it came from and a torn or foreign sector
/// is recognised.
pub fn tagged_sector(serial: u64, dev: u8, sector: u64, out: &mut [u8]) {
    if serial == 0 {
        out.fill(0);
        return;
    }
    out[0..8].copy_from_slice(&serial.to_le_bytes());
    out[8..16].copy_from_slice(&sector.to_le_bytes());
    out[16] = dev;
    let mut x = serial.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ sector.rotate_left(17) ^ dev as u64;
    for b in out[17..].iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
}

/// Which write a sector's content came from, or None when it matches none (garbage).
pub fn decode_sector(dev: u8, sector: u64, data: &[u8]) -> Option<u64> {
    if data.iter().all(|&b| b == 0) {
        return Some(0);
    }
    let serial = u64::from_le_bytes(data[0..8].try_into().unwrap());
    let mut expect = vec![0u8; data.len()];
    tagged_sector(serial, dev, sector, &mut expect);
    (serial != 0 && expect == data).then_some(serial)
}

/// Cut positions that split `len` bytes into up to five pieces at arbitrary bytes (not
/// sector or line aligned; empty pieces included), as scattered buffers come.
pub fn random_cuts(rng: &mut SmallRng, len: usize) -> Vec<usize> {
    let mut cuts: Vec<usize> = (0..rng.gen_range(0..5))
        .map(|_| rng.gen_range(0..=len))
        .collect();
    cuts.sort_unstable();
    cuts
}

/// `data` split at `cuts`.
pub fn pieces<'a>(data: &'a [u8], cuts: &[usize]) -> Vec<&'a [u8]> {
    let mut out = Vec::with_capacity(cuts.len() + 1);
    let mut rest = data;
    let mut at = 0;
    for &c in cuts {
        let (a, b) = rest.split_at(c - at);
        out.push(a);
        rest = b;
        at = c;
    }
    out.push(rest);
    out
}

/// `buf` split at `cuts`, mutably.
pub fn pieces_mut<'a>(buf: &'a mut [u8], cuts: &[usize]) -> Vec<&'a mut [u8]> {
    let mut out = Vec::with_capacity(cuts.len() + 1);
    let mut rest = buf;
    let mut at = 0;
    for &c in cuts {
        let (a, b) = rest.split_at_mut(c - at);
        out.push(a);
        rest = b;
        at = c;
    }
    out.push(rest);
    out
}

/// Where a random request of `blocks` blocks on a device of `total` blocks starts: 40%
/// of the time where the device's last request ended (`end`), so sequential streams
/// form (writes past `sequential_cutoff` go around the cache), else anywhere. Leaves
/// the request's end in `end`.
pub fn request_start(rng: &mut SmallRng, end: &mut u64, blocks: u64, total: u64) -> u64 {
    let start = if rng.gen_bool(0.4) && *end + blocks <= total {
        *end
    } else {
        rng.gen_range(0..=total - blocks)
    };
    *end = start + blocks;
    start
}

/// A backing device that counts writes, discards and flushes, can hold the next read
/// until released (to land other requests between a read's plan and its promotion) or
/// the next flush (to land requests while another thread's flush is under way), and
/// can fail writes.
pub struct Gated {
    inner: MemDevice,
    pub writes: AtomicU64,
    /// Flushes started, and flushes completed.
    pub flushes: AtomicU64,
    pub flushes_done: AtomicU64,
    /// Writes (and discards) done before the start of the latest completed flush:
    /// those a flush has made durable. Equal to `writes` when nothing is unflushed.
    pub writes_flushed: AtomicU64,
    pub fail_writes: AtomicBool,
    hold: AtomicBool,
    hold_flush: AtomicBool,
    hold_write: AtomicBool,
    gate: Mutex<Gate>,
    cv: Condvar,
}

#[derive(Default)]
struct Gate {
    /// A held read is waiting.
    waiting: bool,
    /// Let it go.
    open: bool,
}

impl Gated {
    pub fn new(data: Vec<u8>) -> Arc<Self> {
        Arc::new(Gated {
            inner: MemDevice::from_bytes(data, "backing"),
            writes: AtomicU64::new(0),
            flushes: AtomicU64::new(0),
            flushes_done: AtomicU64::new(0),
            writes_flushed: AtomicU64::new(0),
            fail_writes: AtomicBool::new(false),
            hold: AtomicBool::new(false),
            hold_flush: AtomicBool::new(false),
            hold_write: AtomicBool::new(false),
            gate: Mutex::new(Gate::default()),
            cv: Condvar::new(),
        })
    }

    /// The next read blocks until [`Gated::release`].
    pub fn hold_next_read(&self) {
        *self.gate.lock().unwrap() = Gate::default();
        self.hold.store(true, Ordering::SeqCst);
    }

    /// The next flush blocks, before it makes anything durable, until
    /// [`Gated::release`].
    pub fn hold_next_flush(&self) {
        *self.gate.lock().unwrap() = Gate::default();
        self.hold_flush.store(true, Ordering::SeqCst);
    }

    /// The next write blocks, before it writes anything, until [`Gated::release`].
    pub fn hold_next_write(&self) {
        *self.gate.lock().unwrap() = Gate::default();
        self.hold_write.store(true, Ordering::SeqCst);
    }

    /// Waits until a held read has read its data (or a held flush or write has
    /// started) and waits.
    pub fn wait_held(&self) {
        let mut g = self.gate.lock().unwrap();
        while !g.waiting {
            g = self.cv.wait(g).unwrap();
        }
    }

    pub fn release(&self) {
        self.gate.lock().unwrap().open = true;
        self.cv.notify_all();
    }

    /// Says it is held, and waits for [`Gated::release`].
    fn wait_release(&self) {
        let mut g = self.gate.lock().unwrap();
        g.waiting = true;
        self.cv.notify_all();
        while !g.open {
            g = self.cv.wait(g).unwrap();
        }
    }

    pub fn bytes(&self, off: u64, len: u64) -> Vec<u8> {
        let mut b = vec![0u8; len as usize];
        self.inner.read_at(&mut b, off).unwrap();
        b
    }
}

impl BlockDevice for Gated {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.inner.read_at(buf, offset)?;
        if self.hold.swap(false, Ordering::SeqCst) {
            // The data is read (the old data); the read returns only when released.
            self.wait_release();
        }
        Ok(())
    }
    fn write_at(&self, data: &[u8], offset: u64) -> std::io::Result<()> {
        if self.fail_writes.load(Ordering::SeqCst) {
            return Err(std::io::Error::other("injected write error"));
        }
        if self.hold_write.swap(false, Ordering::SeqCst) {
            self.wait_release();
        }
        self.inner.write_at(data, offset)?;
        // Counted once written, so a flush starting later covers it.
        self.writes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn flush(&self) -> std::io::Result<()> {
        self.flushes.fetch_add(1, Ordering::Relaxed);
        let covers = self.writes.load(Ordering::SeqCst);
        if self.hold_flush.swap(false, Ordering::SeqCst) {
            self.wait_release();
        }
        self.inner.flush()?;
        self.writes_flushed.fetch_max(covers, Ordering::SeqCst);
        self.flushes_done.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn discard(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.inner.discard(offset, len)?;
        self.writes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn describe(&self) -> String {
        "gated backing".into()
    }
}

/// A device whose writes each take `delay` first (a slow cache device: writers get
/// ahead of the flusher, which then writes many sealed segments at once).
pub struct Slow {
    pub inner: MemDevice,
    pub delay: std::time::Duration,
}

impl BlockDevice for Slow {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, data: &[u8], offset: u64) -> std::io::Result<()> {
        std::thread::sleep(self.delay);
        self.inner.write_at(data, offset)
    }
    fn write_vectored_at(&self, bufs: &[&[u8]], offset: u64) -> std::io::Result<()> {
        std::thread::sleep(self.delay);
        self.inner.write_vectored_at(bufs, offset)
    }
    fn flush(&self) -> std::io::Result<()> {
        self.inner.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.inner.discard(offset, len)
    }
    fn describe(&self) -> String {
        "slow cache".into()
    }
}
