//! The cleaner: a workload that overwrites a small working set in a small cache keeps
//! going at cache speed (lines are moved on the cache device, the backing device gets
//! few writes) while the log wraps many times; reads always return the newest data;
//! the per-segment live counts stay exact; a dead backing device does not stop it.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use lc_cache::testing::{FaultDevice, HoldDevice};
use lc_cache::{BlockDevice, MemDevice, Tunables};
use rand::Rng;

/// A backing device that counts the writes (and discards) it receives.
struct Counting {
    inner: Arc<dyn BlockDevice>,
    writes: AtomicU64,
}

impl BlockDevice for Counting {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, data: &[u8], offset: u64) -> std::io::Result<()> {
        self.writes.fetch_add(1, Ordering::Relaxed);
        self.inner.write_at(data, offset)
    }
    fn flush(&self) -> std::io::Result<()> {
        self.inner.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.writes.fetch_add(1, Ordering::Relaxed);
        self.inner.discard(offset, len)
    }
    fn describe(&self) -> String {
        "counting".into()
    }
}

const SEG: u64 = 64 << 10; // 15 lines per segment
const SLOTS: u64 = 32;

/// A [`Counting`] in-memory backing device of `lines` lines, and the device list to
/// open a cache with.
fn counting(lines: u64) -> (Arc<Counting>, Vec<Arc<dyn BlockDevice>>) {
    let backing = Arc::new(Counting {
        inner: Arc::new(MemDevice::new(lines * 4096)),
        writes: AtomicU64::new(0),
    });
    let devs: Vec<Arc<dyn BlockDevice>> = vec![backing.clone()];
    (backing, devs)
}

fn tunables(clean_live_max: &str) -> Tunables {
    let mut t = Tunables {
        // No background writeback: only space pressure frees slots.
        writeback_enabled: false,
        flush_interval_s: 0,
        ..Tunables::default()
    };
    t.set("clean_live_max", clean_live_max).unwrap();
    t
}

struct Run {
    user_writes: u64,
    backing_writes: u64,
    stats: lc_cache::Stats,
}

/// Random full-line overwrites of `working` lines, `laps` times the log's capacity;
/// checks reads against a model as it goes and every line at the end.
fn overwrite(seed: u64, clean_live_max: &str, working: u64, laps: u64) -> Run {
    let mut rng = rng(seed);
    let cache = mem_cache(SEG * (SLOTS + 1), 4096, SEG as u32);
    let (backing, devs) = counting(working);
    let c = open(cache, &devs, tunables(clean_live_max), 4);
    let capacity = SLOTS * 15;
    let n = laps * capacity;
    let mut model: Vec<u64> = vec![0; working as usize];
    let mut buf = vec![0u8; 4096];
    for i in 1..=n {
        let line = rng.gen_range(0..working);
        buf[..8].copy_from_slice(&i.to_le_bytes());
        c.write(0, line * 4096, &buf, rng.gen_bool(0.02))
            .unwrap_or_else(|e| panic!("seed {seed} write {i}: {e}"));
        model[line as usize] = i;
        if rng.gen_bool(0.05) {
            let l = rng.gen_range(0..working);
            c.read(0, l * 4096, &mut buf).unwrap();
            assert_eq!(
                u64::from_le_bytes(buf[..8].try_into().unwrap()),
                model[l as usize],
                "seed {seed}: read of line {l} after write {i}"
            );
        }
        if i % 500 == 0 {
            c.check_line_counts()
                .unwrap_or_else(|e| panic!("seed {seed} after write {i}: {e}"));
        }
    }
    check_model(&c, &model, seed);
    c.check_line_counts().unwrap();
    let stats = c.stats();
    assert_eq!(stats.live_lines, stats.index_entries);
    c.close().unwrap();
    Run {
        user_writes: n,
        backing_writes: backing.writes.load(Ordering::Relaxed),
        stats,
    }
}

/// Every line of `model` reads back the serial its first 8 bytes were last written
/// with (0: never written).
fn check_model(c: &lc_cache::Cache, model: &[u64], seed: u64) {
    let mut buf = vec![0u8; 4096];
    for (l, &want) in model.iter().enumerate() {
        c.read(0, l as u64 * 4096, &mut buf).unwrap();
        assert_eq!(
            u64::from_le_bytes(buf[..8].try_into().unwrap()),
            want,
            "seed {seed}: final read of line {l}"
        );
    }
}

#[test]
fn overwriting_a_small_working_set_moves_lines_instead_of_writing_back() {
    let base = seed("clean-overwrite");
    for i in 0..cases(4) as u64 {
        let seed = base.wrapping_add(i);
        // A working set of 40% of the log, written 20 times the log's capacity.
        let r = overwrite(seed, "0.8", SLOTS * 15 * 2 / 5, 20);
        let s = &r.stats;
        eprintln!(
            "seed {seed}: {} writes, log wrapped {} times, moved {}, written back {}, backing writes {}, live {}, stale {}",
            r.user_writes,
            s.last_flushed_id / SLOTS,
            s.moved_lines,
            s.written_back_lines,
            r.backing_writes,
            s.live_lines,
            s.stale_lines
        );
        assert!(
            s.last_flushed_id >= 10 * SLOTS,
            "seed {seed}: the log wrapped"
        );
        assert!(s.moved_lines > 0, "seed {seed}: the cleaner moved lines");
        // Before close: nothing but the cleaner freed space. Close itself writes back
        // nothing either (writeback is off and no drain ran).
        assert!(
            r.backing_writes * 20 < r.user_writes,
            "seed {seed}: {} backing writes for {} user writes",
            r.backing_writes,
            r.user_writes
        );
    }
}

#[test]
fn without_moving_the_same_workload_writes_back() {
    let seed = seed("clean-off");
    let r = overwrite(seed, "0", SLOTS * 15 * 2 / 5, 10);
    assert_eq!(r.stats.moved_lines, 0);
    assert!(r.stats.written_back_lines > 0);
    assert!(
        r.backing_writes * 20 >= r.user_writes,
        "seed {seed}: only {} backing writes for {} user writes",
        r.backing_writes,
        r.user_writes
    );
}

/// The cleaner waits for the log to run short, and background writeback waits for
/// dirty data: random overwrites of a working set of a quarter of the ring, until the
/// log is above `writeback_threshold` full (71 %: its tail segments hold a few live
/// lines each), have nothing moved or written back; once the log runs short the
/// cleaner moves lines, and the backing device still gets nothing (a quarter of the
/// ring is dirty, under the threshold).
#[test]
fn nothing_is_cleaned_or_written_back_before_it_is_needed() {
    let seed = seed("clean-lazy");
    let mut rng = rng(seed);
    let cache = mem_cache(SEG * (SLOTS + 1), 4096, SEG as u32);
    let working = SLOTS * 15 / 4;
    let (backing, devs) = counting(working);
    let mut t = tunables("0.8");
    t.writeback_enabled = true;
    assert_eq!(t.writeback_threshold, 70);
    let c = open(cache, &devs, t, 4);
    let mut buf = vec![0u8; 4096];
    let mut model = vec![0u64; working as usize];
    let mut i = 0u64;
    // A segment's worth of random overwrites, made durable.
    let mut segment = |c: &lc_cache::Cache, model: &mut [u64]| {
        for _ in 0..15 {
            i += 1;
            let l = rng.gen_range(0..working);
            buf[..8].copy_from_slice(&i.to_le_bytes());
            c.write(0, l * 4096, &buf, false).unwrap();
            model[l as usize] = i;
        }
        c.flush().unwrap();
    };
    while c.stats().last_flushed_id * 100 <= SLOTS * 70 {
        segment(&c, &mut model);
    }
    // Time for the writeback thread to act on a log above the threshold by fill.
    std::thread::sleep(Duration::from_millis(1500));
    let s = c.stats();
    assert!(
        s.last_flushed_id <= SLOTS - 7, // more free slots than the low watermark (6)
        "seed {seed}: {} flushed",
        s.last_flushed_id
    );
    assert_eq!(
        (s.moved_lines, s.written_back_lines),
        (0, 0),
        "seed {seed}: nothing cleaned early"
    );
    while c.stats().last_flushed_id < 5 * SLOTS {
        segment(&c, &mut model);
    }
    let s = c.stats();
    assert!(
        s.moved_lines > 0,
        "seed {seed}: the cleaner moved lines once the log ran short"
    );
    assert_eq!(s.written_back_lines, 0, "seed {seed}");
    assert_eq!(backing.writes.load(Ordering::Relaxed), 0, "seed {seed}");
    check_model(&c, &model, seed);
    c.check_line_counts().unwrap();
    c.close().unwrap();
}

/// Background writeback runs on dirty data: a working set of 40 % of the ring written
/// once, under a threshold of 20 %, reaches the backing device though the log is far
/// from short of slots.
#[test]
fn dirty_data_above_the_threshold_is_written_back() {
    let cache = mem_cache(SEG * (SLOTS + 1), 4096, SEG as u32);
    let working = SLOTS * 15 * 2 / 5;
    let (backing, devs) = counting(working);
    let mut t = tunables("0.8");
    t.writeback_enabled = true;
    t.writeback_threshold = 20;
    let c = open(cache, &devs, t, 4);
    let buf = vec![7u8; 4096];
    for l in 0..working {
        c.write(0, l * 4096, &buf, false).unwrap();
    }
    c.flush().unwrap();
    let start = Instant::now();
    while c.stats().written_back_lines == 0 {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "nothing written back"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(c.stats().moved_lines, 0);
    assert!(backing.writes.load(Ordering::Relaxed) > 0);
    c.close().unwrap();
}

#[test]
fn a_dead_backing_device_does_not_stop_cleaning() {
    let seed = seed("clean-dead-disk");
    let mut rng = rng(seed);
    let cache = mem_cache(SEG * (SLOTS + 1), 4096, SEG as u32);
    let working = 100u64;
    let dead = Arc::new(FaultDevice::new(Arc::new(MemDevice::new(working * 4096))));
    dead.faults.lock().unwrap().dead = true;
    let devs: Vec<Arc<dyn BlockDevice>> = vec![dead.clone()];
    let mut t = tunables("0.8");
    t.writeback_fail_timeout_s = 1;
    let c = open(cache, &devs, t, 4);
    let mut buf = vec![0u8; 4096];
    let mut model = vec![0u64; working as usize];
    let start = Instant::now();
    let n = 20 * SLOTS * 15;
    for i in 1..=n {
        let line = rng.gen_range(0..working);
        buf[..8].copy_from_slice(&i.to_le_bytes());
        c.write(0, line * 4096, &buf, false)
            .unwrap_or_else(|e| panic!("seed {seed} write {i}: {e}"));
        model[line as usize] = i;
    }
    for (l, &want) in model.iter().enumerate() {
        if want == 0 {
            continue;
        }
        c.read(0, l as u64 * 4096, &mut buf).unwrap();
        assert_eq!(u64::from_le_bytes(buf[..8].try_into().unwrap()), want);
    }
    let s = c.stats();
    assert!(s.last_flushed_id >= 10 * SLOTS, "the log wrapped");
    assert!(s.moved_lines > 0);
    assert_eq!(s.written_back_lines, 0);
    assert!(start.elapsed() < Duration::from_secs(60));
    c.check_line_counts().unwrap();
    drop(c);
}

#[test]
fn live_and_stale_counts_add_up_and_survive_reopen() {
    let seed = seed("clean-counts");
    let mut rng = rng(seed);
    let cache = mem_cache(SEG * (SLOTS + 1), 512, SEG as u32);
    let devs: Vec<Arc<dyn BlockDevice>> = vec![Arc::new(MemDevice::new(64 * 4096))];
    // No checkpoint: the reopen below replays the log, which counts every copy (a
    // checkpoint holds the live lines only; see DESIGN.md, "The cleaner").
    let mut t = tunables("0.8");
    t.checkpoint_interval_segments = 0;
    let c = open(cache.clone(), &devs, t.clone(), 4);
    let buf = vec![7u8; 4096];
    // 10 distinct lines, then 5 of them again: 15 copies, 10 live, 5 stale.
    for l in 0..10u64 {
        c.write(0, l * 4096, &buf, false).unwrap();
    }
    c.seal_now().unwrap();
    for l in 0..5u64 {
        c.write(0, l * 4096, &buf, false).unwrap();
    }
    c.seal_now().unwrap();
    let s = c.stats();
    assert_eq!((s.live_lines, s.stale_lines), (10, 5));
    c.check_line_counts().unwrap();
    c.close().unwrap();
    let c = open(cache, &devs, t, 4);
    let s = c.stats();
    assert_eq!((s.live_lines, s.stale_lines), (10, 5));
    c.check_line_counts().unwrap();
    // Random partial writes and discards keep the counts exact.
    for _ in 0..3000 {
        let l = rng.gen_range(0..64u64);
        match rng.gen_range(0..10) {
            0 => c.discard(0, l * 4096, 4096).unwrap(),
            1..=3 => c.write(0, l * 4096 + 512, &buf[..1024], false).unwrap(),
            _ => c.write(0, l * 4096, &buf, false).unwrap(),
        }
    }
    c.check_line_counts().unwrap();
    c.drain(0, &mut |_| {}).unwrap();
    let s = c.stats();
    assert_eq!(s.live_lines, 0);
    c.check_line_counts().unwrap();
    c.close().unwrap();
}

/// A line whose newest durable copy was lost to damage must never be moved: its older
/// copy at the head of the log would be replayed after the damaged segment and read
/// again after a restart. The cleaner leaves that segment to writeback instead.
#[test]
fn a_lost_line_is_never_moved() {
    use lc_cache::{Cache, Error};
    // Format 1, where each flush seals a segment, so the segment boundaries below are
    // fixed by the flushes (format 2 would append to one segment).
    let cache = mem_cache_v(SEG * 48, 512, SEG as u32, 1);
    let backing: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(1 << 20));
    let line = |serial: u64, l: u64| {
        let mut d = vec![0u8; 4096];
        for s in 0..8 {
            tagged_sector(serial, 0, l * 8 + s, &mut d[s as usize * 512..][..512]);
        }
        d
    };
    let c = open(
        cache.clone(),
        std::slice::from_ref(&backing),
        tunables("0.8"),
        4,
    );
    // Segment 1: lines 0..15; segment 2: lines 1..15 again, so segment 1 keeps one
    // live line (0); segment 3: line 0 and 20..34 (to be damaged); segment 4 after it.
    for l in 0..15 {
        c.write(0, l * 4096, &line(1, l), false).unwrap();
    }
    c.flush().unwrap();
    for l in 1..15 {
        c.write(0, l * 4096, &line(2, l), false).unwrap();
    }
    c.flush().unwrap();
    for l in [0].into_iter().chain(20..34) {
        c.write(0, l * 4096, &line(3, l), false).unwrap();
    }
    c.flush().unwrap();
    for l in 40..45 {
        c.write(0, l * 4096, &line(4, l), false).unwrap();
    }
    c.flush().unwrap();
    assert_eq!(c.stats().last_flushed_id, 4);
    let mut img = vec![0u8; cache.size() as usize];
    cache.read_at(&mut img, 0).unwrap();
    // Killed. Flip a byte of line 0's newest copy, segment 3 (slot 2) slot 0: durable
    // (segment 4 says so), so damage.
    std::mem::forget(c);
    img[SEG as usize * 3 + 4096 + 7] ^= 1;
    let reopen = |img: Vec<u8>| {
        let dev: Arc<dyn BlockDevice> = Arc::new(MemDevice::from_bytes(img, "cache"));
        let c = open(
            dev.clone(),
            std::slice::from_ref(&backing),
            tunables("0.8"),
            4,
        );
        (c, dev)
    };
    let (c, dev) = reopen(img);
    let lost = |c: &Cache| {
        let mut b = vec![0u8; 4096];
        matches!(c.read(0, 0, &mut b), Err(Error::Lost { .. }))
    };
    assert!(lost(&c), "line 0 is lost");
    // Only line 0: the intact lines of segment 3 are replayed.
    let mut b = vec![0u8; 4096];
    for l in 20..34 {
        c.read(0, l * 4096, &mut b).unwrap();
        assert!(b == line(3, l), "line {l}");
    }
    // Pressure: overwrite other lines until the log is blocked behind the damage.
    let mut blocked = false;
    for i in 0..47 * 15 * 4u64 {
        match c.write(0, (100 + i % 40) * 4096, &line(5, 100 + i % 40), false) {
            Ok(()) => {}
            Err(Error::LogBlocked { .. }) => {
                blocked = true;
                break;
            }
            Err(e) => panic!("write {i}: {e}"),
        }
    }
    assert!(blocked, "the log fills up to the damaged segment");
    assert!(lost(&c), "line 0 still lost");
    let s = c.stats();
    assert_eq!(s.moved_lines, 0, "nothing before the damage may be moved");
    assert_eq!(s.last_writeback_id, 2, "writeback passed segments 1 and 2");
    // Killed again: the restart still refuses line 0.
    let mut img = vec![0u8; dev.size() as usize];
    dev.read_at(&mut img, 0).unwrap();
    std::mem::forget(c);
    let (c, _) = reopen(img);
    assert!(lost(&c), "line 0 lost after a restart");
    drop(c);
}

/// A dead backing device no longer fills the log: once its lines sit in mostly stale
/// segments they are moved, so writes to the cache's other devices go on long after
/// writeback to the dead one failed past `writeback_fail_timeout_s` (before the
/// cleaner they failed once the log was full behind its lines). Writes to the dead
/// device itself are still refused after the timeout.
#[test]
fn a_dead_backing_device_does_not_stop_the_other_devices() {
    use lc_cache::Error;
    let seed = seed("clean-dead-neighbour");
    let mut rng = rng(seed);
    let cache = mem_cache(SEG * (SLOTS + 1), 4096, SEG as u32);
    let dead = Arc::new(FaultDevice::new(Arc::new(MemDevice::new(64 * 4096))));
    dead.faults.lock().unwrap().dead = true;
    let good: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(100 * 4096));
    let mut t = tunables("0.8");
    t.writeback_enabled = true;
    t.writeback_threshold = 0;
    t.writeback_fail_timeout_s = 1;
    let c = open(cache, &[dead.clone() as Arc<dyn BlockDevice>, good], t, 4);
    let mut buf = vec![0u8; 4096];
    for l in 0..5u64 {
        buf[..8].copy_from_slice(&(1000 + l).to_le_bytes());
        c.write(0, l * 4096, &buf, false).unwrap();
    }
    let start = Instant::now();
    let mut model = vec![0u64; 100];
    let mut i = 0u64;
    while i < 20 * SLOTS * 15 || start.elapsed() < Duration::from_millis(2500) {
        i += 1;
        let l = rng.gen_range(0..100u64);
        buf[..8].copy_from_slice(&i.to_le_bytes());
        if let Err(e) = c.write(1, l * 4096, &buf, false) {
            let s = c.stats();
            panic!("seed {seed}: write {i} to the healthy device: {e}; wb {} flushed {} open {} live {} stale {} moved {} wb lines {}", s.last_writeback_id, s.last_flushed_id, s.open_segment_id, s.live_lines, s.stale_lines, s.moved_lines, s.written_back_lines);
        }
        model[l as usize] = i;
        if i.is_multiple_of(64) {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "seed {seed}: too slow"
        );
    }
    let s = c.stats();
    assert!(
        s.writeback_failures.iter().any(|f| f.dev == 0),
        "seed {seed}: writeback to the dead device failed"
    );
    assert!(
        s.moved_lines > 0 && s.last_flushed_id >= 10 * SLOTS,
        "seed {seed}"
    );
    let e = c.write(0, 0, &buf, false).unwrap_err();
    assert!(matches!(e, Error::BackingFailed { dev: 0, .. }), "{e}");
    for l in 0..5u64 {
        c.read(0, l * 4096, &mut buf).unwrap();
        assert_eq!(u64::from_le_bytes(buf[..8].try_into().unwrap()), 1000 + l);
    }
    for (l, &want) in model.iter().enumerate() {
        c.read(1, l as u64 * 4096, &mut buf).unwrap();
        assert_eq!(u64::from_le_bytes(buf[..8].try_into().unwrap()), want);
    }
    c.check_line_counts().unwrap();
    drop(c);
}

/// Writes line `l` with serial `s` (recorded in `serial`).
fn put(c: &lc_cache::Cache, serial: &mut [u64], l: u64, s: u64) -> Result<(), lc_cache::Error> {
    c.write(0, l * 4096, &tagged_block(s, l), false)?;
    serial[l as usize] = s;
    Ok(())
}

/// Segment size of the sparse-tail tests: 252 lines, so that a few live lines lie far
/// apart.
const BIG: u64 = 1 << 20;
/// Lines of [`BIG`] segments.
const BIG_LINES: u64 = 252;
/// The line the sparse-tail tests rewrite (after the eight sparse segments' lines).
const HOT: u64 = 8 * BIG_LINES;

/// Segments 1..=8 full, then every line but those in slots 0 and 100 rewritten: the
/// eight segments keep two live lines each, far apart. Flushed.
fn fill_sparse(c: &lc_cache::Cache, serial: &mut [u64]) {
    let lps = c.geometry().lines_per_segment as u64;
    assert_eq!(lps, BIG_LINES);
    for l in 0..8 * lps {
        put(c, serial, l, 1).unwrap();
    }
    for l in (0..8 * lps).filter(|l| l % lps != 0 && l % lps != 100) {
        put(c, serial, l, 2).unwrap();
    }
    c.flush().unwrap();
}

/// Rewrites one line, flushed each time (rewritten in the open segment before its
/// append it would be rewritten in place), until the log has wrapped and the cleaner
/// moved the sparse segments' lines; returns the error that stopped it, if any.
fn rewrite_until_moved(c: &lc_cache::Cache, serial: &mut [u64]) -> Option<lc_cache::Error> {
    let lps = c.geometry().lines_per_segment as u64;
    for i in 0..3 * SLOTS * lps {
        if let Err(e) = put(c, serial, HOT, 3 + i).and_then(|_| c.flush()) {
            return Some(e);
        }
        if c.stats().moved_lines >= 16 && c.stats().last_writeback_id >= 8 {
            break;
        }
    }
    None
}

/// Every line reads back as last written.
fn check_lines(c: &lc_cache::Cache, serial: &[u64]) {
    let mut b = vec![0u8; 4096];
    for (l, &want) in serial.iter().enumerate().filter(|(_, &s)| s > 0) {
        c.read(0, l as u64 * 4096, &mut b).unwrap();
        assert!(
            b == tagged_block(want, l as u64),
            "line {l}: not serial {want}"
        );
    }
}

/// A cache of [`BIG`] segments, [`fill_sparse`]d: the cache, its device, its backing
/// device and the serials written.
fn sparse_cache() -> (
    lc_cache::Cache,
    Arc<dyn BlockDevice>,
    Arc<dyn BlockDevice>,
    Vec<u64>,
) {
    let cache = mem_cache(BIG * (SLOTS + 1), 512, BIG as u32);
    let backing: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(16 << 20));
    let c = open(
        cache.clone(),
        std::slice::from_ref(&backing),
        tunables("0.8"),
        4,
    );
    let mut serial = vec![0u64; HOT as usize + 1];
    fill_sparse(&c, &mut serial);
    (c, cache, backing, serial)
}

/// [`fill_sparse`] then [`rewrite_until_moved`]; `rot` flips a byte of line
/// `(segment, slot)` on the device in between. Returns the cache (maybe failed), its
/// device, the serials and the error that stopped the rewrites.
fn sparse_tails(
    rot: Option<(u64, u32)>,
) -> (
    lc_cache::Cache,
    Arc<dyn BlockDevice>,
    Vec<u64>,
    Option<lc_cache::Error>,
) {
    let (c, cache, _, mut serial) = sparse_cache();
    if let Some((id, slot)) = rot {
        let off = c.geometry().line_offset(id, slot) + 100;
        let mut b = vec![0u8; 512];
        cache.read_at(&mut b, off & !511).unwrap();
        b[(off % 512) as usize] ^= 0x10;
        cache.write_at(&b, off & !511).unwrap();
    }
    let err = rewrite_until_moved(&c, &mut serial);
    (c, cache, serial, err)
}

/// Rewrites every segment header of `img` (segments `1..=last`) as lc wrote them
/// before line checksums: no line crc, the chain of header crcs redone. (The open
/// segment's appends count: `last` is the newest segment with a header.)
fn strip_line_crcs(img: &mut [u8], g: &lc_cache::Geometry, last: u64) {
    use lc_cache::format::decode_copies;
    let hl = g.header_len();
    let mut prev = 0;
    for id in 1..=last {
        let at = g.segment_offset(id) as usize;
        let mut newest = (0, 0);
        for (copy, h) in decode_copies(&img[at..], g).into_iter().enumerate() {
            let Ok((mut h, _)) = h else { continue };
            assert_eq!(h.id, id);
            if id > 1 {
                h.prev_crc = prev;
            }
            h.entries.iter_mut().for_each(|e| e.crc = None);
            let b = &mut img[at + copy * hl..at + (copy + 1) * hl];
            let c = h.encode_into(b);
            newest = newest.max((h.gen, c));
        }
        prev = newest.1;
    }
}

/// Headers written before line checksums: the cleaner reads such a segment whole and
/// checks its data crc, as before, and moves its lines all the same.
#[test]
fn a_segment_without_line_crcs_is_read_whole() {
    let (c, cache, backing, mut serial) = sparse_cache();
    let (g, last) = (c.geometry(), c.stats().open_segment_id);
    let mut img = vec![0u8; cache.size() as usize];
    cache.read_at(&mut img, 0).unwrap();
    std::mem::forget(c); // killed
    strip_line_crcs(&mut img, &g, last);
    let dev: Arc<dyn BlockDevice> = Arc::new(MemDevice::from_bytes(img, "cache"));
    let c = open(dev, &[backing], tunables("0.8"), 4);
    check_lines(&c, &serial);
    let err = rewrite_until_moved(&c, &mut serial);
    assert!(err.is_none(), "{err:?}");
    let s = c.stats();
    assert!(s.moved_lines >= 16 && s.last_writeback_id >= 8);
    // At least the eight sparse segments, whole (their headers lack the crcs).
    assert!(
        s.cleaner_bytes_read >= 8 * (g.data_start() as u64 + g.lines_per_segment as u64 * 4096),
        "{} bytes read",
        s.cleaner_bytes_read
    );
    check_lines(&c, &serial);
    c.close().unwrap();
}

/// The cleaner reads a mostly stale tail segment's header and its live lines, not the
/// whole segment, and checks each line against its crc in the header: a rotten stale
/// line does not matter, every line reads back as last written.
#[test]
fn the_cleaner_reads_live_lines_alone() {
    let (c, _, serial, err) = sparse_tails(Some((3, 5)));
    assert!(err.is_none(), "{err:?}");
    let s = c.stats();
    eprintln!(
        "moved {}, cleaner read {} bytes, wb {}",
        s.moved_lines, s.cleaner_bytes_read, s.last_writeback_id
    );
    assert!(s.moved_lines >= 16 && s.last_writeback_id >= 8);
    // Whole segments would be half a segment per line moved (two live lines per
    // segment); a header (16 KiB) and a line are a fiftieth.
    assert!(
        s.cleaner_bytes_read * 16 <= s.moved_lines * BIG,
        "{} bytes read to move {} lines",
        s.cleaner_bytes_read,
        s.moved_lines
    );
    check_lines(&c, &serial);
    c.close().unwrap();
}

/// Flips a bit of line `slot` of segment `id` on `cache`.
fn rot_line(c: &lc_cache::Cache, cache: &Arc<dyn BlockDevice>, id: u64, slot: u32) {
    let off = c.geometry().line_offset(id, slot) + 100;
    let mut b = vec![0u8; 512];
    cache.read_at(&mut b, off & !511).unwrap();
    b[(off % 512) as usize] ^= 0x10;
    cache.write_at(&b, off & !511).unwrap();
}

/// A copy of device `d` as it is now.
fn copy_of(d: &Arc<dyn BlockDevice>, name: &str) -> Arc<dyn BlockDevice> {
    let mut b = vec![0u8; d.size() as usize];
    d.read_at(&mut b, 0).unwrap();
    Arc::new(MemDevice::from_bytes(b, name))
}

/// A cache serving copies of devices: the cache, its devices (cache, backing).
type Reopened = (
    lc_cache::Cache,
    lc_cache::RecoveryReport,
    [Arc<dyn BlockDevice>; 2],
);

/// Opens copies of devices `devs` (cache, backing) as they are now (a power cut of
/// whatever serves them).
fn reopened_copy(devs: &[Arc<dyn BlockDevice>; 2], t: Tunables) -> Reopened {
    let copies = [copy_of(&devs[0], "cache"), copy_of(&devs[1], "backing")];
    let (c, r) = open_report(copies[0].clone(), &copies[1..], t, 4);
    (c, r, copies)
}

/// Kills `c` (nothing more is written) and opens copies of its devices as they are.
fn killed_and_reopened(
    c: lc_cache::Cache,
    devs: &[Arc<dyn BlockDevice>; 2],
    t: Tunables,
) -> Reopened {
    c.kill();
    reopened_copy(devs, t)
}

/// Line `l` fails its reads with `Lost` and is the one loss reported.
fn only_lost(c: &lc_cache::Cache, l: u64) -> lc_cache::DamageReport {
    let mut b = vec![0u8; 4096];
    match c.read(0, l * 4096, &mut b) {
        Err(lc_cache::Error::Lost { dev: 0, offset }) => assert_eq!(offset, l * 4096),
        r => panic!("the rotten line reads {r:?}"),
    }
    let d = c.stats().damage.expect("damage reported");
    assert_eq!(d.lost_ranges, vec![(0, l * 8, 8)]);
    d
}

/// Waits until the loss (or its end) is recorded: nothing holds writeback back.
fn recorded(c: &lc_cache::Cache) -> lc_cache::Stats {
    let t0 = Instant::now();
    loop {
        let s = c.stats();
        if s.damage.as_ref().is_none_or(|d| d.recorded) {
            return s;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "never recorded: {s:?}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// A live line that fails its crc is never moved (a new copy would carry a fresh crc
/// over rotten data): it is lost, not the cache, and not the log. Reads of it fail
/// from then on and every other line reads as written; a checkpoint records the loss
/// (FORMAT.md, "Loss records"), after which the cleaner passes the damaged segment,
/// moving its intact line, and writes go on through laps of the log (without the
/// record they failed with `LogBlocked` once the log was full up to the damage).
/// Killed and restarted after the segment's slot was reused, the same line is lost
/// (the record says so) and the others read as written; a rewrite heals it, across a
/// restart right after it and after its record too.
#[test]
fn a_rotten_live_line_is_lost_not_the_cache_nor_the_log() {
    let (c, cache, backing, mut serial) = sparse_cache();
    let t = tunables("0.8");
    let rotten = c.geometry().lines_per_segment as u64 + 100;
    rot_line(&c, &cache, 2, 100);
    let err = rewrite_until_moved(&c, &mut serial);
    assert!(err.is_none(), "{err:?}");
    assert_eq!(c.failure(), None);
    let d = only_lost(&c, rotten);
    assert!(d.recorded, "{d:?}");
    // Two more laps: segment 2's slot is reused.
    let lps = c.geometry().lines_per_segment as u64;
    for i in 0..2 * SLOTS * lps {
        put(&c, &mut serial, HOT, 1_000_000 + i).unwrap();
        c.flush().unwrap();
    }
    let s = c.stats();
    assert!(s.last_writeback_id > SLOTS + 2, "{s:?}");
    assert!(only_lost(&c, rotten).segments.is_empty());
    let mut others = serial.clone();
    others[rotten as usize] = 0;
    check_lines(&c, &others);
    let (c, r, devs) = killed_and_reopened(c, &[cache, backing], t.clone());
    assert!(r.loss_records.is_some() && r.damaged.is_empty(), "{r:?}");
    only_lost(&c, rotten);
    check_lines(&c, &others);
    // A rewrite heals it; a restart right after replays the rewrite over the record.
    put(&c, &mut serial, rotten, 7).unwrap();
    c.flush().unwrap();
    check_lines(&c, &serial);
    let (c, _, devs) = killed_and_reopened(c, &devs, t.clone());
    check_lines(&c, &serial);
    let s = recorded(&c);
    assert!(s.damage.is_none(), "{s:?}");
    let err = rewrite_until_moved(&c, &mut serial);
    assert!(err.is_none(), "{err:?}");
    let (c, r, _) = killed_and_reopened(c, &devs, t);
    assert!(r.loss_records.is_none(), "{r:?}");
    check_lines(&c, &serial);
    c.check_line_counts().unwrap();
    c.close().unwrap();
}

/// A checkpoint covering the rotten line's segment lets the next recovery index the
/// rotten copy without reading it: the loss found while serving is recorded in a newer
/// checkpoint, so the restart loads that one and refuses the line at once; once the
/// operator accepts the loss, that is recorded too and the restart reads the older
/// data (the backing device's zeros).
#[test]
fn a_rotten_line_found_while_serving_stays_lost_after_a_restart_from_a_checkpoint() {
    let cache = mem_cache(BIG * (SLOTS + 1), 512, BIG as u32);
    let backing: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(16 << 20));
    let mut t = tunables("0.8");
    // No periodic checkpoint: the one below, and the loss records.
    t.checkpoint_interval_segments = 0;
    let c = open(cache.clone(), std::slice::from_ref(&backing), t.clone(), 4);
    let mut serial = vec![0u64; HOT as usize + 1];
    fill_sparse(&c, &mut serial);
    assert!(c.checkpoint().unwrap());
    let rotten = c.geometry().lines_per_segment as u64 + 100;
    rot_line(&c, &cache, 2, 100);
    let devs = [cache, backing];
    // Killed now, the restart loads a checkpoint covering segment 2 (the rot is found
    // by the first read).
    let (c2, r, _) = reopened_copy(&devs, t.clone());
    assert!(
        r.checkpoint.as_ref().is_some_and(|cp| cp.upto >= 2),
        "{r:?}"
    );
    assert!(r.loss_records.is_none(), "{r:?}");
    only_lost(&c2, rotten);
    c2.kill();
    let err = rewrite_until_moved(&c, &mut serial);
    assert!(err.is_none(), "{err:?} {:?}", c.stats());
    only_lost(&c, rotten);
    serial[rotten as usize] = 0;
    let (c, r, devs) = killed_and_reopened(c, &devs, t.clone());
    // The record is in a checkpoint with an index, or alone (written while sealed
    // segments waited beyond the ring).
    assert!(r.loss_records.is_some_and(|(_, n)| n == 1), "{r:?}");
    assert!(r.damaged.is_empty(), "{r:?}");
    only_lost(&c, rotten);
    check_lines(&c, &serial);
    let report = c.accept_loss();
    assert_eq!(report.lost_ranges, vec![(0, rotten * 8, 8)]);
    let s = recorded(&c);
    assert!(s.damage.is_none(), "{s:?}");
    let (c, r, _) = killed_and_reopened(c, &devs, t);
    assert!(r.loss_records.is_none(), "{r:?}");
    let mut b = vec![1u8; 4096];
    c.read(0, rotten * 4096, &mut b).unwrap();
    assert!(b.iter().all(|&x| x == 0));
    check_lines(&c, &serial);
    c.close().unwrap();
}

#[test]
fn moves_read_while_the_cache_closes_are_not_logged_after_the_flusher_stopped() {
    // The cleaner reads the segments it moves without the lock. When the cache starts
    // closing meanwhile, the flusher writes what is logged and exits, and the final
    // checkpoint follows: a line moved after that would never be written (and a move
    // landing just before the checkpoint would make it wait in vain for that line to
    // be durable, so the next open would replay the log). The close here lets the
    // cleaner's read return only once the final checkpoint is being written.
    let dev = mem_cache(BIG * (SLOTS + 1), 512, BIG as u32);
    let gate = Arc::new(HoldDevice::new(dev.clone(), false));
    let g = lc_cache::probe(dev.as_ref())
        .unwrap()
        .expect("formatted")
        .geometry;
    gate.watch_writes(
        (0..2)
            .map(|a| g.checkpoint_offset(a)..g.checkpoint_offset(a) + g.checkpoint_area_bytes())
            .collect(),
    );
    let backing: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(16 << 20));
    let mut t = tunables("0.8");
    // No periodic checkpoint: the only one is the close's.
    t.checkpoint_interval_segments = 1_000_000;
    let cache: Arc<dyn BlockDevice> = gate.clone();
    let c = open(cache, std::slice::from_ref(&backing), t.clone(), 4);
    let mut serial = vec![0u64; HOT as usize + 1];
    fill_sparse(&c, &mut serial);
    // Rewrite one line until the log is short of free slots and the cleaner reads a
    // sparse tail segment to move its two live lines (nothing else reads the cache
    // device here).
    let opened = gate.reads();
    gate.hold();
    let lps = c.geometry().lines_per_segment as u64;
    let mut i = 0;
    while gate.reads() == opened {
        assert!(i < 3 * SLOTS * lps, "the cleaner never read a segment");
        put(&c, &mut serial, HOT, 3 + i).unwrap();
        c.flush().unwrap();
        i += 1;
    }
    let before = gate.watched_writes();
    let closing = std::thread::spawn(move || c.close());
    let t0 = Instant::now();
    while gate.watched_writes() == before {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "no final checkpoint"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    gate.release();
    closing
        .join()
        .expect("close: lines logged after the flusher stopped")
        .unwrap();
    let (c, r) = open_report(dev, std::slice::from_ref(&backing), t, 4);
    assert_eq!(r.replayed_segments, 0, "{r:?}");
    assert!(r.checkpoint.is_some(), "{r:?}");
    check_lines(&c, &serial);
    c.check_line_counts().unwrap();
}
