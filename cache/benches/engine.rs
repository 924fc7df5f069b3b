//! Engine benchmark: a program that prints figures, not a test.
//!
//! Run: `cargo bench -p lc-cache --bench engine` (env: `LC_BENCH_DIR` for the scratch
//! directory, default a temporary directory under the current directory; `LC_BENCH_MB`
//! for the amount of random writes, default 512).
//!
//! All devices are regular files on the same file system, measured in one run so the
//! ratios are meaningful on a shared, noisy machine:
//! - random 4 KiB writes through the engine, flushing every 1 MiB written;
//! - sequential 1 MiB writes to a file, `fdatasync` after each (the log's physical limit);
//! - random 4 KiB writes straight to the backing file, `fdatasync` every 1 MiB;
//! - writeback throughput with and without sorting;
//! - recovery time per GiB of cache;
//! - RAM (index) per GiB of cache;
//! - sustained overwrite: random 4 KiB writes over a working set of half the cache,
//!   several times the cache size, the backing device slow (every write or flush
//!   sleeps as an HDD at 300 IOPS would), with the cleaner and without it
//!   (`clean_live_max` 0): MB/s over time and the cleaner's stats. `LC_BENCH_ONLY=overwrite`
//!   runs only this case; `LC_BENCH_OVERWRITE_X` sets how many times the cache is
//!   written (default 16), `LC_BENCH_OVERWRITE_MB` the cache size (default 128).
//! - recovery time per GiB of cache (the whole log walked, no checkpoint);
//! - restarts with checkpoints: a cache file of `LC_BENCH_RESTART_GIB` GiB (default 4,
//!   sparse until written) filled with dirty lines, killed and reopened, closed and
//!   reopened, and walked whole (`LC_BENCH_ONLY=restart` runs only this);
//! - a single writer flushing after every 4 KiB write: IOPS and cache space per byte of
//!   data, format 2 and format 1 (`LC_BENCH_ONLY=sync` runs only this, format 2 three
//!   times);
//! - RAM (index) per GiB of cache;
//! - random 4 KiB reads of cached lines from the cache device, with the cost of the
//!   line check every such read makes (`LC_BENCH_ONLY=reads` runs only this).

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use lc_cache::device::{create_file, AlignedBuf};
use lc_cache::{
    format_device, Backing, BlockDevice, Cache, FileDevice, FormatOptions, OpenOptions, Tunables,
};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;
const BACKING_SIZE: u64 = 8 * GIB;
const CACHE_SIZE: u64 = GIB + MIB;
const FLUSH_EVERY: u64 = 256; // 4 KiB writes per flush = 1 MiB

fn mbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / MIB as f64 / d.as_secs_f64()
}

fn dev(path: &Path, size: u64) -> Arc<dyn BlockDevice> {
    create_file(path, size).expect("create scratch file");
    Arc::new(FileDevice::open(path, false).expect("open scratch file"))
}

fn drop_caches() -> bool {
    // Best effort (root only): make the recovery figure a cold-cache one.
    std::fs::OpenOptions::new()
        .write(true)
        .open("/proc/sys/vm/drop_caches")
        .and_then(|mut f| f.write_all(b"3\n"))
        .is_ok()
}

fn open_cache(
    cache: &Arc<dyn BlockDevice>,
    backing: &Arc<dyn BlockDevice>,
    t: Tunables,
) -> (Cache, lc_cache::RecoveryReport) {
    Cache::open(
        cache.clone(),
        vec![Backing {
            id: 0,
            dev: backing.clone(),
            label: "bench".into(),
        }],
        OpenOptions {
            tunables: t,
            ..Default::default()
        },
    )
    .expect("open cache")
}

fn no_writeback() -> Tunables {
    Tunables {
        writeback_enabled: false,
        flush_interval_s: 0,
        checkpoint_interval_segments: 0,
        ..Tunables::default()
    }
}

/// Random 4 KiB writes through the engine from `threads` threads, each flushing after
/// every 1 MiB it wrote; returns (IOPS, elapsed, time the threads spent in flush / threads).
fn engine_random_writes(
    cache: &Cache,
    n: u64,
    threads: u64,
    seed: u64,
) -> (f64, Duration, Duration) {
    let start = Instant::now();
    let in_flush: Duration = std::thread::scope(|s| {
        let hs: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn(move || {
                    let mut rng = SmallRng::seed_from_u64(seed + t);
                    let mut buf = vec![0u8; 4096];
                    let mut in_flush = Duration::ZERO;
                    for i in 0..n / threads {
                        rng.fill(&mut buf[..64]);
                        let off = rng.gen_range(0..BACKING_SIZE / 4096) * 4096;
                        cache.write(0, off, &buf, false).expect("write");
                        if (i + 1) % FLUSH_EVERY == 0 {
                            let f = Instant::now();
                            cache.flush().expect("flush");
                            in_flush += f.elapsed();
                        }
                    }
                    in_flush
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().expect("writer")).sum()
    });
    cache.flush().expect("flush");
    let d = start.elapsed();
    (n as f64 / d.as_secs_f64(), d, in_flush / threads as u32)
}

/// Cache space (segments opened × segment size) a writer that flushes after every
/// 4 KiB write uses on a fresh cache of format `version`, its data, and its IOPS.
fn sync_writer(p: &Path, version: u32) -> (u64, u64, f64) {
    let cache_dev = dev(&p.join(format!("sync-{version}.img")), 2 * GIB + MIB);
    let backing = dev(&p.join(format!("sync-back-{version}.img")), GIB);
    let geo = format_device(
        cache_dev.as_ref(),
        FormatOptions {
            version,
            ..FormatOptions::default()
        },
    )
    .expect("format");
    let (cache, _) = open_cache(&cache_dev, &backing, no_writeback());
    // Within one lap of the ring, so the space used is the segments opened.
    let n = (geo.nr_segments - 8).min(2000);
    let mut buf = vec![0u8; 4096];
    let mut rng = SmallRng::seed_from_u64(7);
    let start = Instant::now();
    for _ in 0..n {
        rng.fill(&mut buf[..64]);
        let off = rng.gen_range(0..GIB / 4096) * 4096;
        cache.write(0, off, &buf, false).expect("write");
        cache.flush().expect("flush");
    }
    let iops = n as f64 / start.elapsed().as_secs_f64();
    let used = cache.stats().open_segment_id * geo.segment_size as u64;
    cache.close().expect("close");
    (used, n * 4096, iops)
}

/// Prints [`sync_writer`]'s figures for each format version.
fn sync_writers(p: &Path, versions: &[u32]) {
    println!("single writer, a flush after every 4 KiB write:");
    for &version in versions {
        let (used, data, iops) = sync_writer(p, version);
        println!(
            "  format {version}: {:>8.0} IOPS, cache space used {:>6.1} MiB for {:.1} MiB of data = {:.2}x (target <= 2.2)",
            iops,
            used as f64 / MIB as f64,
            data as f64 / MIB as f64,
            used as f64 / data as f64
        );
    }
}

/// A backing device as slow as an HDD doing random I/O: every write, discard and
/// flush (and read) sleeps `per_op` before it is done.
struct Slow {
    inner: Arc<dyn BlockDevice>,
    per_op: Duration,
}

impl BlockDevice for Slow {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        std::thread::sleep(self.per_op);
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, data: &[u8], offset: u64) -> std::io::Result<()> {
        std::thread::sleep(self.per_op);
        self.inner.write_at(data, offset)
    }
    fn flush(&self) -> std::io::Result<()> {
        std::thread::sleep(self.per_op);
        self.inner.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> std::io::Result<()> {
        std::thread::sleep(self.per_op);
        self.inner.discard(offset, len)
    }
    fn describe(&self) -> String {
        format!("slow:{}", self.inner.describe())
    }
}

/// Sustained overwrite of half the cache with a slow backing device, with and without
/// moving (see the module doc).
fn overwrite_case(p: &Path) {
    let env = |k: &str, d: u64| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let cache_mb = env("LC_BENCH_OVERWRITE_MB", 128);
    let times = env("LC_BENCH_OVERWRITE_X", 16);
    let cache_size = (cache_mb + 1) * MIB;
    let working = cache_mb * MIB / 2;
    let total = times * cache_mb * MIB;
    let limit = Duration::from_secs(env("LC_BENCH_OVERWRITE_SECS", 60));
    println!();
    println!(
        "sustained overwrite: {cache_mb} MiB cache, working set {} MiB, {} MiB of random 4 KiB writes (QD1, no flushes), backing device sleeps 3.3 ms per write/flush (300 IOPS), at most {} s per run",
        working / MIB,
        total / MIB,
        limit.as_secs()
    );
    for clean in ["0.8", "0"] {
        let cache_dev = dev(&p.join("ow-cache.img"), cache_size);
        format_device(cache_dev.as_ref(), FormatOptions::default()).expect("format");
        let backing: Arc<dyn BlockDevice> = Arc::new(Slow {
            inner: Arc::new(lc_cache::MemDevice::new(working)),
            per_op: Duration::from_micros(3333),
        });
        let mut t = Tunables::default();
        t.set("clean_live_max", clean).expect("tunable");
        let (cache, _) = open_cache(&cache_dev, &backing, t);
        let geo = cache.geometry();
        println!(
            "  clean_live_max {clean}: {} slots of {} lines",
            geo.nr_segments, geo.lines_per_segment
        );
        println!("     t s   MiB/s   log laps   moved lines   written back   live   stale");
        let mut rng = SmallRng::seed_from_u64(11);
        let mut buf = vec![0u8; 4096];
        let start = Instant::now();
        let (mut last_t, mut last_b) = (start, 0u64);
        let mut written = 0u64;
        let mut print = |cache: &Cache, written: u64, force: bool| {
            let now = Instant::now();
            if !force && now - last_t < Duration::from_secs(1) {
                return;
            }
            let s = cache.stats();
            println!(
                "  {:>6.1} {:>7.1} {:>10.2} {:>13} {:>14} {:>6} {:>7}",
                (now - start).as_secs_f64(),
                mbps(written - last_b, now - last_t),
                s.last_flushed_id as f64 / geo.nr_segments as f64,
                s.moved_lines,
                s.written_back_lines,
                s.live_lines,
                s.stale_lines
            );
            last_t = now;
            last_b = written;
        };
        while written < total && start.elapsed() < limit {
            rng.fill(&mut buf[..64]);
            let off = rng.gen_range(0..working / 4096) * 4096;
            cache.write(0, off, &buf, false).expect("write");
            written += 4096;
            print(&cache, written, false);
        }
        print(&cache, written, true);
        let d = start.elapsed();
        let s = cache.stats();
        println!(
            "  clean_live_max {clean}: {} MiB in {:.1} s = {:.1} MiB/s; moved {} lines ({} MiB read by the cleaner), wrote back {} ({} MiB to the backing device), cache device {} MiB written",
            written / MIB,
            d.as_secs_f64(),
            mbps(written, d),
            s.moved_lines,
            s.cleaner_bytes_read / MIB,
            s.written_back_lines,
            s.backing_bytes_written / MIB,
            s.cache_bytes_written / MIB
        );
        // Closing writes back nothing more (writeback is threshold-driven); no drain.
        cache.close().expect("close");
        let _ = std::fs::remove_file(p.join("ow-cache.img"));
    }
}

/// Restart times with checkpoints: a cache file of `gib` GiB (sparse until written)
/// whose ring is filled with dirty lines (1 MiB writes of distinct lines, writeback off,
/// the default checkpoint interval), then (1) killed and reopened, (2) closed cleanly
/// and reopened; and the same log walked whole without a checkpoint.
fn restarts(p: &Path, gib: u64) {
    let size = gib * GIB + 64 * MIB;
    let cache_dev = dev(&p.join("cp-cache.img"), size);
    let backing = dev(&p.join("cp-backing.img"), (2 * size).max(BACKING_SIZE));
    let geo = format_device(cache_dev.as_ref(), FormatOptions::default()).expect("format");
    let t = Tunables {
        writeback_enabled: false,
        flush_interval_s: 0,
        // The fill is one sequential stream: all of it goes into the log.
        sequential_cutoff: 0,
        ..Tunables::default()
    };
    let (cache, _) = open_cache(&cache_dev, &backing, t.clone());
    // Fill 95% of the ring's lines, leaving room for the open segment and the buffers.
    let lines = geo.total_lines() * 95 / 100;
    let mut buf = vec![0u8; MIB as usize];
    let start = Instant::now();
    for i in 0..lines / 256 {
        buf[..8].copy_from_slice(&i.to_le_bytes());
        cache.write(0, i * MIB, &buf, false).expect("fill");
    }
    cache.flush().expect("flush");
    let fill = start.elapsed();
    let s = cache.stats();
    cache.kill();
    let dirty_gib = (s.dirty_segments * geo.segment_size as u64) as f64 / GIB as f64;
    println!();
    println!(
        "restart with checkpoints (checkpoint_interval_segments {}): cache file {} GiB, {} segments, {:.2} GiB of dirty segments, {} dirty lines (filled in {:.1} s)",
        t.checkpoint_interval_segments,
        gib,
        geo.nr_segments,
        dirty_gib,
        s.index_entries,
        fill.as_secs_f64()
    );
    let timed = |label: &str, t: Tunables| {
        let dropped = drop_caches();
        let start = Instant::now();
        let (cache, r) = open_cache(&cache_dev, &backing, t);
        let d = start.elapsed();
        let cp = r.checkpoint.as_ref().map_or("none".to_string(), |c| {
            format!("{} entries up to segment {}", c.loaded, c.upto)
        });
        println!(
            "  {label:<34} {:>7.3} s  ({:.3} s per GiB of dirty segments; checkpoint: {cp}, loaded in {:.3} s; {} segments replayed, walk {:.3} s){}",
            d.as_secs_f64(),
            d.as_secs_f64() / dirty_gib,
            r.checkpoint_time.as_secs_f64(),
            r.replayed_segments,
            r.walk_time.as_secs_f64(),
            if dropped { "" } else { " (page cache not dropped)" }
        );
        (cache, d)
    };
    let (cache, killed) = timed("killed, reopened:", t.clone());
    cache.close().expect("close");
    let (cache, clean) = timed("closed cleanly, reopened:", t.clone());
    // The whole log walked: both checkpoint headers zeroed, as on a cache that never
    // wrote one.
    cache.kill();
    for area in 0..2 {
        cache_dev
            .write_at(&AlignedBuf::new(4096), geo.checkpoint_offset(area))
            .expect("zero checkpoint header");
    }
    let (cache, full) = timed("no checkpoint (whole log walked):", t);
    cache.kill();
    // The targets are for a 64 GiB cache. A killed restart also replays up to
    // `checkpoint_interval_segments` segments (256 MiB of reads), a constant: in a small
    // cache it outweighs the checkpoint, and the ratio says little.
    let at = if gib >= 64 { "" } else { " at 64 GiB" };
    println!(
        "  killed / clean restart: {:.2} (target <= 1.5{at}); killed restart {:.3} s (target <= 1 s{at}); whole-log walk {:.2} s per GiB",
        killed.as_secs_f64() / clean.as_secs_f64(),
        killed.as_secs_f64(),
        full.as_secs_f64() / dirty_gib
    );
    let _ = std::fs::remove_file(p.join("cp-cache.img"));
    let _ = std::fs::remove_file(p.join("cp-backing.img"));
}

/// Random 4 KiB reads of lines cached on the cache device (a 256 MiB cache file, full
/// of dirty lines, out of the engine's RAM; the file in the page cache, so the figure
/// is the engine's own cost): IOPS from 1 and 4 threads, beside the time one crc32c of
/// a 4 KiB line takes here, the check every such read now makes (docs/DESIGN.md, "Line
/// checks on reads").
fn cached_reads(p: &Path) {
    let size = 256 * MIB + MIB;
    let cdev = dev(&p.join("reads-cache.img"), size);
    format_device(
        cdev.as_ref(),
        FormatOptions {
            block_size: 4096,
            segment_size: MIB as u32,
            ..Default::default()
        },
    )
    .expect("format");
    let bdev = dev(&p.join("reads-backing.img"), GIB);
    let (c, _) = open_cache(&cdev, &bdev, no_writeback());
    let lines = 48 * 1024u64; // 192 MiB
    let buf = vec![0x5au8; 1 << 20];
    for l in (0..lines).step_by(256) {
        c.write(0, l * 4096, &buf, false).expect("fill");
    }
    c.seal_now().expect("seal");
    c.flush().expect("flush");
    let n = 200_000u64;
    let run = |threads: u64| {
        let t0 = Instant::now();
        std::thread::scope(|s| {
            for t in 0..threads {
                let c = &c;
                s.spawn(move || {
                    let mut rng = SmallRng::seed_from_u64(t);
                    let mut b = vec![0u8; 4096];
                    for _ in 0..n / threads {
                        let l = rng.gen_range(0..lines);
                        c.read(0, l * 4096, &mut b).expect("read");
                    }
                });
            }
        });
        n as f64 / t0.elapsed().as_secs_f64()
    };
    let (qd1, qd4) = (run(1), run(4));
    let line = vec![0xa5u8; 4096];
    let reps = 200_000u32;
    let t0 = Instant::now();
    let mut x = 0u32;
    for _ in 0..reps {
        x ^= crc32c::crc32c(std::hint::black_box(&line));
    }
    let crc_us = t0.elapsed().as_secs_f64() * 1e6 / reps as f64;
    std::hint::black_box(x);
    println!("random 4 KiB reads of lines cached on the cache device (page-cached file):");
    println!(
        "  1 thread {qd1:>10.0} IOPS ({:.2} us per read), 4 threads {qd4:>10.0} IOPS",
        1e6 / qd1
    );
    println!(
        "  crc32c of a 4 KiB line: {crc_us:.2} us, {:.1} % of a 1-thread read",
        crc_us * qd1 / 1e4
    );
    c.close().expect("close");
}

/// The scratch directory: under `LC_BENCH_DIR`, else under the current directory.
fn scratch_dir() -> tempfile::TempDir {
    match std::env::var("LC_BENCH_DIR") {
        Ok(d) => tempfile::tempdir_in(d),
        Err(_) => tempfile::tempdir_in("."),
    }
    .expect("scratch dir")
}

fn main() {
    if std::env::var("LC_BENCH_ONLY").as_deref() == Ok("reads") {
        cached_reads(scratch_dir().path());
        return;
    }
    if std::env::var("LC_BENCH_ONLY").as_deref() == Ok("overwrite") {
        overwrite_case(scratch_dir().path());
        return;
    }
    // `cargo bench` passes `--bench`; accept and ignore arguments.
    let mb: u64 = std::env::var("LC_BENCH_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(512);
    let dir = scratch_dir();
    let p = dir.path();
    let cp_gib: u64 = std::env::var("LC_BENCH_RESTART_GIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4);
    if std::env::var("LC_BENCH_ONLY").as_deref() == Ok("restart") {
        restarts(p, cp_gib);
        return;
    }
    if std::env::var("LC_BENCH_ONLY").as_deref() == Ok("sync") {
        sync_writers(p, &[2, 2, 2]);
        return;
    }
    println!(
        "lc-cache engine benchmark (scratch dir {}, {} MiB of random writes)",
        p.display(),
        mb
    );
    let n = mb * MIB / 4096;

    // Rounds alternate the sequential baseline and the engine so that the shared
    // machine's noise hits both alike; the ratio is taken per round and the median shown.
    let cache_dev = dev(&p.join("cache.img"), CACHE_SIZE);
    let backing = dev(&p.join("backing.img"), BACKING_SIZE);
    let geo = format_device(cache_dev.as_ref(), FormatOptions::default()).expect("format");
    let (cache, _) = open_cache(&cache_dev, &backing, no_writeback());
    let seq = dev(&p.join("seq.img"), CACHE_SIZE);
    let block = AlignedBuf::new(MIB as usize);
    let rounds = 3u64;
    let per_round = n / rounds / 2;
    let mut rows: Vec<(f64, f64, f64)> = Vec::new(); // (seq MiB/s, engine QD1 MiB/s, engine 4 threads MiB/s)
    let mut seq_pos = 0u64;
    let mut split = (Duration::ZERO, Duration::ZERO);
    for r in 0..rounds {
        let mbs = per_round * 4096 / MIB;
        let start = Instant::now();
        for _ in 0..mbs {
            seq.write_at(&block, (seq_pos % (CACHE_SIZE / MIB - 1)) * MIB)
                .expect("seq write");
            seq.flush().expect("seq flush");
            seq_pos += 1;
        }
        let seq_bw = mbps(mbs * MIB, start.elapsed());
        let (iops1, d1, f1) = engine_random_writes(&cache, per_round, 1, 100 + r);
        split.0 += d1 - f1;
        split.1 += f1;
        let (iops4, _, _) = engine_random_writes(&cache, per_round, 4, 200 + r * 4);
        rows.push((
            seq_bw,
            iops1 * 4096.0 / MIB as f64,
            iops4 * 4096.0 / MIB as f64,
        ));
    }
    let stats = cache.stats();
    cache.close().expect("close");
    let median = |mut v: Vec<f64>| {
        v.sort_by(|a, b| a.partial_cmp(b).expect("number"));
        v[v.len() / 2]
    };
    let eng_bw = median(rows.iter().map(|r| r.1).collect());
    let eng4_bw = median(rows.iter().map(|r| r.2).collect());
    let iops = eng_bw * MIB as f64 / 4096.0;

    // The same writes straight to the backing file, fdatasync every 1 MiB.
    let direct = dev(&p.join("direct.img"), BACKING_SIZE);
    let mut rng = SmallRng::seed_from_u64(9);
    let mut buf = vec![0u8; 4096];
    let direct_n = n.min(32768);
    let start = Instant::now();
    let mut done = 0;
    for i in 0..direct_n {
        rng.fill(&mut buf[..64]);
        let off = rng.gen_range(0..BACKING_SIZE / 4096) * 4096;
        direct.write_at(&buf, off).expect("direct write");
        done += 1;
        if (i + 1) % FLUSH_EVERY == 0 {
            direct.flush().expect("direct flush");
            if start.elapsed() > Duration::from_secs(20) {
                break;
            }
        }
    }
    direct.flush().expect("direct flush");
    let direct_iops = done as f64 / start.elapsed().as_secs_f64();
    drop(direct);
    let _ = std::fs::remove_file(p.join("direct.img"));

    println!();
    println!("random 4 KiB writes, each writer flushes after every 1 MiB it wrote (median of {rounds} rounds):");
    println!(
        "  round   sequential MiB/s   engine QD1 MiB/s   ratio   engine 4 writers MiB/s   ratio"
    );
    for (i, r) in rows.iter().enumerate() {
        println!(
            "  {:>5}   {:>16.1}   {:>16.1}   {:>5.2}   {:>22.1}   {:>5.2}",
            i + 1,
            r.0,
            r.1,
            r.1 / r.0,
            r.2,
            r.2 / r.0
        );
    }
    let ratio1 = median(rows.iter().map(|r| r.1 / r.0).collect());
    let ratio4 = median(rows.iter().map(|r| r.2 / r.0).collect());
    println!("  engine QD1        {:>10.0} IOPS  {:>8.1} MiB/s  ({:.2} s copying in, {:.2} s waiting for flushes)", iops, eng_bw, split.0.as_secs_f64(), split.1.as_secs_f64());
    println!(
        "  engine 4 writers  {:>10.0} IOPS  {:>8.1} MiB/s",
        eng4_bw * MIB as f64 / 4096.0,
        eng4_bw
    );
    println!(
        "  straight to backing file  {:>10.0} IOPS  {:>8.1} MiB/s",
        direct_iops,
        direct_iops * 4096.0 / MIB as f64
    );
    println!(
        "  speed-up over the backing file: QD1 {:.1}x, 4 writers {:.1}x",
        iops / direct_iops,
        eng4_bw * MIB as f64 / 4096.0 / direct_iops
    );
    println!("engine random-write bandwidth / sequential bandwidth: QD1 {:.2}, 4 writers {:.2} (target >= 0.8)", ratio1, ratio4);
    println!(
        "segments written {}, partial {}, cache bytes written {} MiB",
        stats.last_flushed_id,
        stats.partial_segments,
        stats.cache_bytes_written / MIB
    );

    // 3b. A single writer that flushes after every 4 KiB write: cache space used per
    // byte of data, format 2 (appends) against format 1 (a segment per flush).
    println!();
    sync_writers(p, &[2, 1]);

    // 4. Recovery time per GiB of cache (the log from step 2 is still dirty).
    // 4. Recovery time per GiB of cache (the log from step 2 is still dirty; no
    // checkpoint was written: `no_writeback` turns them off), the whole log walked.
    let dropped = drop_caches();
    let start = Instant::now();
    let (cache, report) = open_cache(&cache_dev, &backing, no_writeback());
    let rec = start.elapsed();
    let replayed_bytes = report.replayed_segments * geo.segment_size as u64;
    let index_bytes = cache.stats().index_bytes;
    cache.close().expect("close");
    println!();
    println!(
        "recovery: {} segments ({} MiB, {} lines) in {:.3} s = {:.2} s per GiB of cache{}",
        report.replayed_segments,
        replayed_bytes / MIB,
        report.restored_lines,
        rec.as_secs_f64(),
        rec.as_secs_f64() / (replayed_bytes as f64 / GIB as f64),
        if dropped {
            " (page cache dropped first)"
        } else {
            " (page cache not dropped)"
        }
    );
    let cache_gib = (geo.nr_segments * geo.segment_size as u64) as f64 / GIB as f64;
    println!(
        "RAM: index {:.2} MiB for {:.2} GiB of cache = {:.2} MiB per GiB (target <= 8); segment buffers {} MiB",
        index_bytes as f64 / MIB as f64,
        cache_gib,
        index_bytes as f64 / MIB as f64 / cache_gib,
        64
    );

    // 5. Writeback throughput, sorted and unsorted, from the same dirty log.
    println!();
    let wb_mb = mb.min(256);
    for sort in [true, false] {
        let cache_dev = dev(&p.join("wb-cache.img"), CACHE_SIZE);
        let backing = dev(&p.join("wb-backing.img"), BACKING_SIZE);
        format_device(cache_dev.as_ref(), FormatOptions::default()).expect("format");
        let (cache, _) = open_cache(&cache_dev, &backing, no_writeback());
        let _ = engine_random_writes(&cache, wb_mb * MIB / 4096, 1, 7);
        let dirty = cache.stats().dirty_lines[0].1;
        cache
            .set_tunable("writeback_sort", if sort { "true" } else { "false" })
            .expect("tunable");
        cache.set_tunable("writeback_batch", "32").expect("tunable");
        let start = Instant::now();
        cache.drain(0, &mut |_| {}).expect("drain");
        let d = start.elapsed();
        cache.close().expect("close");
        println!(
            "writeback {:<8} {} dirty lines in {:.2} s = {:>8.1} MiB/s",
            if sort { "sorted" } else { "unsorted" },
            dirty,
            d.as_secs_f64(),
            mbps(dirty * 4096, d)
        );
    }
    overwrite_case(p);

    // 6. Restarts with checkpoints.
    restarts(p, cp_gib);

    // 7. Reads of cached lines, and what their check costs.
    println!();
    cached_reads(p);
}
