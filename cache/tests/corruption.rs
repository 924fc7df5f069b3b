//! Corruption tests: random bytes flipped in the superblock, segment headers and cache
//! lines, and whole segments damaged in the middle of the log. Opening then recovers
//! every intact segment; a sector reads its newest durable value or fails with
//! `Error::Lost` — never an older value and never a damaged one — or opening refuses
//! with a clear error (both superblock copies damaged); it never panics.

mod common;

use std::sync::Arc;

use common::*;
use lc_cache::format::{Geometry, SB_COPY_SIZE};
use lc_cache::{BlockDevice, Cache, MemDevice, OpenOptions, Tunables};
use rand::Rng;

const SEG: u32 = 64 << 10;
const BACKING: u64 = 256 << 10;

/// Builds a cache whose log holds several segments of dirty data (writeback off) and
/// returns the cache image, the backing image and every sector's history. No
/// checkpoint is written: recovery walks (and checks) the whole log.
fn build(seed: u64) -> (Vec<u8>, Vec<u8>, Vec<Vec<u64>>) {
    build_with(seed, 0)
}

/// [`build`] with a checkpoint every `checkpoint_every` segments and at the clean stop
/// (0: none).
fn build_with(seed: u64, checkpoint_every: u32) -> (Vec<u8>, Vec<u8>, Vec<Vec<u64>>) {
    let mut rng = rng(seed);
    let cache = mem_cache(SEG as u64 * 12, 512, SEG);
    let backing: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(BACKING));
    let t = Tunables {
        writeback_enabled: false,
        checkpoint_interval_segments: checkpoint_every,
        ..Tunables::default()
    };
    let c = open(cache.clone(), std::slice::from_ref(&backing), t, 2);
    let sectors = (BACKING / 512) as usize;
    let mut hist = vec![vec![0u64]; sectors];
    let mut serial = 0;
    for _ in 0..150 {
        serial += 1;
        let n = rng.gen_range(1..16usize);
        let s0 = rng.gen_range(0..sectors - n);
        let mut data = vec![0u8; n * 512];
        for i in 0..n {
            tagged_sector(
                serial,
                0,
                (s0 + i) as u64,
                &mut data[i * 512..(i + 1) * 512],
            );
            hist[s0 + i].push(serial);
        }
        c.write(0, s0 as u64 * 512, &data, false).unwrap();
        if rng.gen_bool(0.1) {
            c.flush().unwrap();
        }
    }
    c.close().unwrap();
    let img = |d: &Arc<dyn BlockDevice>| {
        let mut b = vec![0u8; d.size() as usize];
        d.read_at(&mut b, 0).unwrap();
        b
    };
    (img(&cache), img(&backing), hist)
}

fn open_image(
    cache: Vec<u8>,
    backing: &[u8],
) -> lc_cache::Result<(Cache, lc_cache::RecoveryReport, Arc<dyn BlockDevice>)> {
    // Writeback off: what is checked is the state recovery left (writeback could pass
    // a damaged segment whose every line was rewritten later, and forget it).
    open_image_with(
        cache,
        backing,
        Tunables {
            writeback_enabled: false,
            ..Tunables::default()
        },
    )
}

fn open_image_with(
    cache: Vec<u8>,
    backing: &[u8],
    tunables: Tunables,
) -> lc_cache::Result<(Cache, lc_cache::RecoveryReport, Arc<dyn BlockDevice>)> {
    let cdev: Arc<dyn BlockDevice> = Arc::new(MemDevice::from_bytes(cache, "cache"));
    open_devices(cdev, backing, tunables)
}

/// Opens the cache on `cdev` with a backing device holding `backing`; returns it, the
/// recovery report and the backing device.
fn open_devices(
    cdev: Arc<dyn BlockDevice>,
    backing: &[u8],
    tunables: Tunables,
) -> lc_cache::Result<(Cache, lc_cache::RecoveryReport, Arc<dyn BlockDevice>)> {
    let bdev: Arc<dyn BlockDevice> = Arc::new(MemDevice::from_bytes(backing.to_vec(), "backing"));
    let (c, r) = Cache::open(
        cdev,
        backings(std::slice::from_ref(&bdev)),
        OpenOptions {
            tunables,
            ..Default::default()
        },
    )?;
    Ok((c, r, bdev))
}

/// Every sector reads its newest value, or (unless `exact`) fails as lost. Returns the
/// number of lost sectors.
fn check_reads(c: &Cache, hist: &[Vec<u64>], exact: bool, ctx: &str) -> usize {
    let mut lost = 0;
    let mut buf = vec![0u8; 512];
    for (s, h) in hist.iter().enumerate() {
        match c.read(0, s as u64 * 512, &mut buf) {
            Ok(()) => {
                let got = decode_sector(0, s as u64, &buf);
                assert_eq!(
                    got,
                    Some(*h.last().unwrap()),
                    "{ctx}: sector {s} read an older or damaged value, history {h:?}"
                );
            }
            Err(lc_cache::Error::Lost { .. }) if !exact => lost += 1,
            Err(e) => panic!("{ctx}: sector {s}: {e}"),
        }
    }
    lost
}

#[test]
fn clean_image_recovers_every_write() {
    let (img, back, hist) = build(seed("corruption-clean"));
    let (c, r, _) = open_image(img, &back).unwrap();
    // The log holds the newest data, unless the cleaner wrote it all back (it may,
    // when the ring runs short of slots at the wrong moment): then nothing is dirty.
    assert!(
        r.replayed_segments > 0 || c.stats().dirty_segments == 0,
        "{r:?}"
    );
    assert_eq!((r.tail.as_ref(), r.damaged.len()), (None, 0), "{r:?}");
    assert_eq!(c.stats().damage, None);
    check_reads(&c, &hist, true, "clean");
}

#[test]
fn flipped_bytes_in_log_never_serve_older_data() {
    let base = seed("corruption-log");
    let (img, back, hist) = build(base);
    let g = Geometry::new(512, SEG, img.len() as u64).unwrap();
    let mut rng = rng(base);
    let mut detected = 0;
    for case in 0..cases(300) {
        let mut bad = img.clone();
        let slot = rng.gen_range(0..g.nr_segments);
        let seg_off = (SEG as u64 * (1 + slot)) as usize;
        // Half the flips in headers, half in line data.
        let off = if rng.gen_bool(0.5) {
            seg_off + rng.gen_range(0..g.header_len())
        } else {
            seg_off + g.header_len() + rng.gen_range(0..(SEG as usize - g.header_len()))
        };
        bad[off] ^= 1 << rng.gen_range(0..8);
        let ctx = format!("seed {base} case {case} flip at {off}");
        match open_image(bad, &back) {
            Ok((c, r, _)) => {
                // The cache was closed cleanly: every segment of the log was durable, so
                // a flip in one is damage (a flip in the slot after the log only moves
                // where the log is seen to end).
                if let Some(t) = &r.tail {
                    let next =
                        r.last_writeback_id + r.replayed_segments + r.damaged.len() as u64 + 1;
                    assert!(t.starts_with(&format!("segment {next}:")), "{ctx}: {r:?}");
                }
                let damaged = !r.damaged.is_empty();
                detected += damaged as usize;
                // Reported, unless the cleaner already released every damaged segment
                // (one whose lines were all rewritten later holds nothing live; seen
                // under load, with writeback off) and so forgot it.
                let s = c.stats();
                let released = r.damaged.iter().all(|(id, _)| *id <= s.last_writeback_id);
                assert!(
                    s.damage.is_some() == damaged || (damaged && released),
                    "{ctx}: {r:?}, now {:?}",
                    s.damage
                );
                let lost = check_reads(&c, &hist, !damaged, &ctx);
                let report = c.stats().damage.unwrap_or_default();
                let reported: u64 = report.lost_ranges.iter().map(|r| r.2).sum();
                if report.unknown_upto == 0 {
                    assert_eq!(lost as u64, reported, "{ctx}: {report:?}");
                }
            }
            Err(e) => panic!("{ctx}: a damaged segment must not stop the cache opening: {e}"),
        }
    }
    assert!(detected > 0, "no flip was ever detected");
}

/// `c.drain(0)`; a drain still running after 60 s prints the cache's stats and ends
/// the test process (a hang would otherwise hold the whole run).
fn drain_or_exit(c: &Cache, ctx: &str) -> lc_cache::Result<()> {
    use std::sync::atomic::{AtomicBool, Ordering};
    let done = AtomicBool::new(false);
    std::thread::scope(|sc| {
        sc.spawn(|| {
            for _ in 0..600 {
                std::thread::sleep(std::time::Duration::from_millis(100));
                if done.load(Ordering::Relaxed) {
                    return;
                }
            }
            // Straight to stderr: the harness's capture is lost on exit.
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "{ctx}: drain hangs; stats {:?}",
                c.stats()
            );
            std::process::exit(101);
        });
        let r = c.drain(0, &mut |_| {});
        done.store(true, Ordering::Relaxed);
        r
    })
}

/// Writeback reads back every copy it writes back and checks it against its line crc.
/// `img` with one random bit flipped in a random segment slot: a third of the flips in
/// the header copies, the rest in the lines. Returns the image, the byte flipped and
/// whether it is in the lines.
fn flip_one_bit(rng: &mut impl Rng, img: &[u8], g: &Geometry) -> (Vec<u8>, usize, bool) {
    let mut bad = img.to_vec();
    let slot = rng.gen_range(0..g.nr_segments);
    let in_lines = rng.gen_bool(0.67);
    let at = g.segment_offset(slot + 1) as usize
        + if in_lines {
            g.data_start() + rng.gen_range(0..SEG as usize - g.data_start())
        } else {
            rng.gen_range(0..g.data_start())
        };
    bad[at] ^= 1 << rng.gen_range(0..8);
    (bad, at, in_lines)
}

/// With a checkpoint covering the whole log, recovery does not re-read the lines, so a
/// byte flipped in one is found only then: a live line is lost (reads of it fail, the
/// cache does not fail, the log is kept from the damaged segment on), a stale one does
/// not matter. A restart finds the same loss, the checkpoints having been retired.
#[test]
fn rotten_lines_found_by_writeback_are_lost_not_served() {
    use lc_cache::Error;
    let base = seed("corruption-writeback-rot");
    let (img, back, hist) = build_with(base, 2);
    let g = Geometry::new(512, SEG, img.len() as u64).unwrap();
    let mut rng = rng(base);
    let (mut found, mut harmless) = (0, 0);
    let wb_on = Tunables {
        writeback_enabled: true,
        writeback_threshold: 0,
        ..Tunables::default()
    };
    for case in 0..cases(60) {
        let (bad, at, in_lines) = flip_one_bit(&mut rng, &img, &g);
        let ctx = format!("seed {base} case {case} flip at {at}");
        let cdev: Arc<dyn BlockDevice> = Arc::new(MemDevice::from_bytes(bad, "cache"));
        let (c, r, bdev) = open_devices(cdev.clone(), &back, wb_on.clone()).unwrap();
        assert!(
            r.checkpoint.is_some() && r.damaged.is_empty(),
            "{ctx}: {r:?}"
        );
        let drained = drain_or_exit(&c, &ctx);
        assert_eq!(c.failure(), None, "{ctx}");
        let lost = check_reads(&c, &hist, false, &ctx);
        let report = c.stats().damage.unwrap_or_default();
        assert_eq!(
            lost as u64,
            report.lost_ranges.iter().map(|r| r.2).sum::<u64>(),
            "{ctx}: {report:?}"
        );
        // The drain writes back everything else (the damage recorded, writeback passes
        // it), and fails while sectors of the device are lost.
        match drained {
            Ok(()) => assert_eq!(lost, 0, "{ctx}"),
            Err(Error::Lost { .. }) => {
                assert!(lost > 0 && report.recorded, "{ctx}: {report:?}");
                assert_eq!(c.stats().dirty_lines, vec![(0, 0)], "{ctx}");
            }
            Err(e) => panic!("{ctx}: drain: {e}"),
        }
        if lost == 0 {
            assert!(report.segments.is_empty(), "{ctx}: {report:?}");
            harmless += 1;
            continue;
        }
        found += 1;
        recorded_and_lost_again(c, &cdev, &bdev, &hist, in_lines, lost, &report, &ctx);
    }
    assert!(
        found > 0 && harmless > 0,
        "found {found}, harmless {harmless}"
    );
}

/// Reads every 4 KiB line whole (the path that reads a line straight into the caller's
/// buffer): each sector of a line that reads is its newest value; a line may fail as
/// lost. Returns how many lines failed.
fn check_line_reads(c: &Cache, hist: &[Vec<u64>], ctx: &str) -> usize {
    let mut lost = 0;
    let mut buf = vec![0u8; 4096];
    for (l, h) in hist.chunks(8).enumerate() {
        match c.read(0, l as u64 * 4096, &mut buf) {
            Ok(()) => {
                for (i, h) in h.iter().enumerate() {
                    let s = (l * 8 + i) as u64;
                    assert_eq!(
                        decode_sector(0, s, &buf[i * 512..(i + 1) * 512]),
                        Some(*h.last().unwrap()),
                        "{ctx}: sector {s} read whole-line an older or damaged value, history {h:?}"
                    );
                }
            }
            Err(lc_cache::Error::Lost { .. }) => lost += 1,
            Err(e) => panic!("{ctx}: line {l}: {e}"),
        }
    }
    lost
}

/// The same flips as above, found by reads alone (writeback off, nothing moved): the
/// lines of a segment indexed from the checkpoint have their crcs loaded from its header
/// by the first read, and every line read from the cache device is checked. A rotten
/// newest copy fails the read that finds it (and every read after), never returns its
/// bytes; the cache does not fail; a checkpoint records the loss; a restart finds the
/// same loss.
#[test]
fn rotten_lines_found_by_reads_are_lost_not_served() {
    let base = seed("corruption-read-rot");
    let (img, back, hist) = build_with(base, 2);
    let g = Geometry::new(512, SEG, img.len() as u64).unwrap();
    let mut rng = rng(base);
    let (mut found, mut harmless) = (0, 0);
    let wb_off = Tunables {
        writeback_enabled: false,
        ..Tunables::default()
    };
    for case in 0..cases(60) {
        let (bad, at, in_lines) = flip_one_bit(&mut rng, &img, &g);
        let ctx = format!("seed {base} case {case} flip at {at}");
        let cdev: Arc<dyn BlockDevice> = Arc::new(MemDevice::from_bytes(bad, "cache"));
        let (c, r, bdev) = open_devices(cdev.clone(), &back, wb_off.clone()).unwrap();
        assert!(
            r.checkpoint.is_some() && r.damaged.is_empty(),
            "{ctx}: {r:?}"
        );
        // Half the cases read whole lines first, the others sector by sector.
        let whole = rng.gen_bool(0.5);
        let lines_lost = if whole {
            check_line_reads(&c, &hist, &ctx)
        } else {
            0
        };
        let lost = check_reads(&c, &hist, false, &ctx);
        assert_eq!(c.failure(), None, "{ctx}");
        let report = c.stats().damage.unwrap_or_default();
        assert_eq!(
            lost as u64,
            report.lost_ranges.iter().map(|r| r.2).sum::<u64>(),
            "{ctx}: {report:?}"
        );
        if whole {
            assert!(
                lines_lost * 8 >= lost && (lines_lost > 0) == (lost > 0),
                "{ctx}: {lines_lost} lines, {lost} sectors"
            );
        }
        if lost == 0 {
            assert!(report.segments.is_empty(), "{ctx}: {report:?}");
            harmless += 1;
            continue;
        }
        found += 1;
        recorded_and_lost_again(c, &cdev, &bdev, &hist, in_lines, lost, &report, &ctx);
    }
    assert!(
        found > 0 && harmless > 0,
        "found {found}, harmless {harmless}"
    );
}

/// After rot found while serving (`lost` sectors, `report` the damage reported): a
/// checkpoint records the loss (FORMAT.md, "Loss records"); killed and restarted, the
/// same sectors are lost (a flip in line data), or at least those (a header flip: the
/// serving cache lost the copies its index held in the segment; a restart that walks
/// the segment, without that index, refuses every line whose newest copy may have been
/// there: FORMAT.md, "Recovery" step 4).
#[allow(clippy::too_many_arguments)]
fn recorded_and_lost_again(
    c: Cache,
    cdev: &Arc<dyn BlockDevice>,
    bdev: &Arc<dyn BlockDevice>,
    hist: &[Vec<u64>],
    in_lines: bool,
    lost: usize,
    report: &lc_cache::DamageReport,
    ctx: &str,
) {
    let t0 = std::time::Instant::now();
    while !c.stats().damage.is_some_and(|d| d.recorded) {
        assert!(t0.elapsed().as_secs() < 20, "{ctx}: loss never recorded");
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    let mut cimg = vec![0u8; cdev.size() as usize];
    cdev.read_at(&mut cimg, 0).unwrap();
    let mut bimg = vec![0u8; bdev.size() as usize];
    bdev.read_at(&mut bimg, 0).unwrap();
    c.kill();
    let (c, r, _) = open_image(cimg, &bimg).unwrap();
    assert!(
        r.loss_records.is_some_and(|(_, n)| n as usize
            == report
                .lost_lines
                .iter()
                .map(|l| l.1 as usize)
                .sum::<usize>()),
        "{ctx}: {r:?}"
    );
    let again = check_reads(&c, hist, false, ctx);
    if in_lines {
        assert_eq!(again, lost, "{ctx}");
        assert_eq!(
            c.stats().damage.unwrap_or_default().lost_ranges,
            report.lost_ranges,
            "{ctx}"
        );
    } else {
        assert!(again >= lost, "{ctx}: {again} < {lost}");
    }
}

/// A segment whose header no longer reads while every line in it has a newer copy holds
/// nothing to write back: writeback passes it unread (once what was written before is
/// durable) instead of failing to read it on every retry (a drain never finished).
#[test]
fn an_unreadable_header_of_a_stale_segment_does_not_stop_writeback() {
    let cache = mem_cache(SEG as u64 * 12, 512, SEG);
    let backing: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(BACKING));
    let t = Tunables {
        writeback_enabled: false,
        checkpoint_interval_segments: 0,
        ..Tunables::default()
    };
    let c = open(cache.clone(), std::slice::from_ref(&backing), t, 2);
    let g = c.geometry();
    let lps = g.lines_per_segment as u64;
    // Round 1 fills segment 1, round 2 rewrites every line of it (segment 2).
    for round in 1..=2u64 {
        for l in 0..lps {
            c.write(0, l * 4096, &tagged_block(round, l), false)
                .unwrap();
        }
        c.flush().unwrap();
    }
    assert!(c.checkpoint().unwrap());
    let mut img = vec![0u8; cache.size() as usize];
    cache.read_at(&mut img, 0).unwrap();
    let mut back = vec![0u8; BACKING as usize];
    backing.read_at(&mut back, 0).unwrap();
    c.kill();
    // Both header copies of segment 1 unreadable (the checkpoint covers it: recovery
    // does not read it).
    let at = g.segment_offset(1) as usize;
    img[at..at + g.data_start()].fill(0x5a);
    let cdev: Arc<dyn BlockDevice> = Arc::new(MemDevice::from_bytes(img, "cache"));
    let wb_on = Tunables {
        writeback_enabled: true,
        writeback_threshold: 0,
        ..Tunables::default()
    };
    let (c, r, _) = open_devices(cdev, &back, wb_on).unwrap();
    assert!(r.checkpoint.is_some() && r.damaged.is_empty(), "{r:?}");
    drain_or_exit(&c, "stale segment, unreadable header").unwrap();
    let s = c.stats();
    assert!(s.damage.is_none() && s.last_writeback_id >= 2, "{s:?}");
    assert_eq!(c.failure(), None);
    let mut b = vec![0u8; 4096];
    for l in 0..lps {
        c.read(0, l * 4096, &mut b).unwrap();
        assert!(b == tagged_block(2, l), "line {l}");
    }
}

#[test]
fn flipped_bytes_in_checkpoint_areas_never_serve_stale_data() {
    // Checkpoints every 2 segments and at the clean stop: both areas hold one. A flip
    // in either (header or entries) makes recovery use the other or walk the whole
    // log; every sector reads its newest value.
    let base = seed("corruption-checkpoint");
    let (img, back, hist) = build_with(base, 2);
    let (c, r, _) = open_image(img.clone(), &back).unwrap();
    let used = r.checkpoint.clone().expect("checkpoint at clean stop");
    assert_eq!(r.replayed_segments, 0, "{r:?}");
    check_reads(&c, &hist, true, "intact checkpoint");
    drop(c);
    let g = Geometry::new(512, SEG, img.len() as u64).unwrap();
    let mut rng = rng(base);
    let mut fell_back = 0;
    for case in 0..cases(200) {
        let mut bad = img.clone();
        let mut flips = Vec::new();
        for _ in 0..rng.gen_range(1..=3) {
            // The used part of an area: its header and its entries.
            let area = rng.gen_range(0..2u64);
            let hdr = &img[g.checkpoint_offset(area) as usize..][..4096];
            let n = u64::from_le_bytes(hdr[64..72].try_into().unwrap()) as usize;
            let used_len = (4096 + 16 * n).min(g.checkpoint_area_bytes() as usize);
            let off = g.checkpoint_offset(area) as usize + rng.gen_range(0..used_len);
            bad[off] ^= 1 << rng.gen_range(0..8);
            flips.push(off);
        }
        let ctx = format!("seed {base} case {case} flips at {flips:?}");
        let (c, r, _) = open_image(bad, &back).unwrap_or_else(|e| panic!("{ctx}: {e}"));
        assert!(r.damaged.is_empty() && r.tail.is_none(), "{ctx}: {r:?}");
        if r.checkpoint.as_ref() != Some(&used) {
            fell_back += 1;
            assert!(!r.checkpoint_skipped.is_empty(), "{ctx}: {r:?}");
        }
        check_reads(&c, &hist, true, &ctx);
    }
    assert!(fell_back > 0, "no flip ever made recovery fall back");
}

#[test]
fn flipped_superblock_bytes_fall_back_to_the_other_copy_or_refuse() {
    let base = seed("corruption-sb");
    let (img, back, hist) = build(base);
    let mut rng = rng(base);
    for case in 0..cases(200) {
        let mut bad = img.clone();
        let both = rng.gen_bool(0.2);
        let off = rng.gen_range(0..SB_COPY_SIZE);
        bad[off] ^= 0x10;
        if both {
            bad[SB_COPY_SIZE + rng.gen_range(0..SB_COPY_SIZE)] ^= 0x10;
        }
        let ctx = format!("seed {base} case {case} flip at {off} both {both}");
        match open_image(bad, &back) {
            Ok((c, _, _)) => {
                assert!(!both, "{ctx}: opened with both copies damaged");
                check_reads(&c, &hist, true, &ctx);
            }
            Err(e) => {
                assert!(both, "{ctx}: one good copy must suffice: {e}");
                let msg = e.to_string();
                assert!(
                    msg.contains("superblock") || msg.contains("not an lc"),
                    "{ctx}: unclear error {msg}"
                );
            }
        }
    }
}

#[test]
fn newer_superblock_copy_lost_after_slot_reuse_still_recovers() {
    // Write enough to wrap the ring with writeback on, so slots are reused; then destroy
    // the newest superblock copy. The older copy's writeback point is stale, and
    // recovery must use the reused slots as proof of later writeback.
    let base = seed("corruption-stale-sb");
    let mut rng = rng(base);
    let cache = mem_cache(SEG as u64 * 6, 512, SEG);
    let backing: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(BACKING));
    let c = open(
        cache.clone(),
        std::slice::from_ref(&backing),
        Tunables {
            writeback_threshold: 0,
            ..Tunables::default()
        },
        2,
    );
    let mut model = vec![0u8; BACKING as usize];
    for i in 0..400 {
        if i == 370 {
            // Keep the last writes dirty in the log.
            c.set_tunable("writeback_enabled", "false").unwrap();
            c.set_tunable("writeback_threshold", "100").unwrap();
        }
        let n = rng.gen_range(1..8usize) * 512;
        let off = rng.gen_range(0..(BACKING as usize - n) / 512) * 512;
        let data: Vec<u8> = (0..n).map(|_| rng.gen()).collect();
        c.write(0, off as u64, &data, false).unwrap();
        model[off..off + n].copy_from_slice(&data);
    }
    c.flush().unwrap();
    let stats = c.stats();
    c.close().unwrap();
    assert!(stats.last_writeback_id > 6, "ring did not wrap: {stats:?}");
    assert!(stats.dirty_lines[0].1 > 0, "nothing dirty left: {stats:?}");
    let mut img = vec![0u8; cache.size() as usize];
    cache.read_at(&mut img, 0).unwrap();
    let mut back = vec![0u8; BACKING as usize];
    backing.read_at(&mut back, 0).unwrap();
    // Make the older copy stale (writeback point 0, as right after format, with a valid
    // checksum) and damage the newer one.
    let seq = |img: &[u8], i: usize| {
        u64::from_le_bytes(
            img[i * SB_COPY_SIZE + 56..i * SB_COPY_SIZE + 64]
                .try_into()
                .unwrap(),
        )
    };
    let newer = if seq(&img, 0) > seq(&img, 1) { 0 } else { 1 };
    let o = (1 - newer) * SB_COPY_SIZE;
    img[o + 64..o + 72].copy_from_slice(&0u64.to_le_bytes());
    let crc = crc32c::crc32c(&img[o..o + SB_COPY_SIZE - 4]);
    img[o + SB_COPY_SIZE - 4..o + SB_COPY_SIZE].copy_from_slice(&crc.to_le_bytes());
    img[newer * SB_COPY_SIZE + 100] ^= 0xff;
    let (c, _, _) = open_image(img, &back).unwrap();
    let mut buf = vec![0u8; BACKING as usize];
    c.read(0, 0, &mut buf).unwrap();
    assert!(
        buf == model,
        "seed {base}: data lost with the older superblock copy"
    );
}

#[test]
fn wrong_format_and_unformatted_devices_are_refused_clearly() {
    let back: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(BACKING));
    let blank: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(1 << 20));
    let e = Cache::open(
        blank,
        backings(std::slice::from_ref(&back)),
        OpenOptions::default(),
    )
    .err()
    .unwrap();
    assert!(e.to_string().contains("not an lc cache"), "{e}");
    let (mut img, b, _) = build(1);
    // Version 3 with a valid checksum in both copies.
    for copy in 0..2 {
        let o = copy * SB_COPY_SIZE;
        img[o + 8..o + 12].copy_from_slice(&3u32.to_le_bytes());
        let c = crc32c::crc32c(&img[o..o + SB_COPY_SIZE - 4]);
        img[o + SB_COPY_SIZE - 4..o + SB_COPY_SIZE].copy_from_slice(&c.to_le_bytes());
    }
    let e = open_image(img, &b).err().unwrap();
    assert!(e.to_string().contains("version 3"), "{e}");
}

/// The issue-7 scenario: 128 blocks written in rounds A and B, then C over the first
/// `c_blocks` of them, each round followed by a flush; the process dies (the image is
/// taken with the cache still open); `damage` spoils the cache image; the cache opens
/// again. Returns the reopened cache with its devices, the rounds' serials, and the
/// flushed id after each round.
struct Rounds {
    cache: Cache,
    cdev: Arc<dyn BlockDevice>,
    bdev: Arc<dyn BlockDevice>,
    report: lc_cache::RecoveryReport,
    flushed: [u64; 3],
}

const BLOCKS: u64 = 128;
const SEG_BYTES: usize = SEG as usize;

fn block(serial: u64, b: u64) -> Vec<u8> {
    tagged_block(serial, b)
}

/// The rounds on a format-1 cache: a flush seals the segment, so each round starts a
/// segment (the format-2 cases are `append_*` below).
fn rounds(c_blocks: u64, damage: impl Fn(&mut [u8], [u64; 3])) -> Rounds {
    let cache = mem_cache_v(SEG as u64 * 48, 512, SEG, 1);
    let backing: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(BACKING * 4));
    let t = Tunables {
        writeback_enabled: false,
        ..Tunables::default()
    };
    let c = open(cache.clone(), std::slice::from_ref(&backing), t, 4);
    let mut flushed = [0u64; 3];
    for (r, serial) in [1u64, 2, 3].into_iter().enumerate() {
        let n = if r == 2 { c_blocks } else { BLOCKS };
        for b in 0..n {
            c.write(0, b * 4096, &block(serial, b), false).unwrap();
        }
        c.flush().unwrap();
        flushed[r] = c.stats().last_flushed_id;
    }
    let mut img = vec![0u8; cache.size() as usize];
    cache.read_at(&mut img, 0).unwrap();
    let mut back = vec![0u8; backing.size() as usize];
    backing.read_at(&mut back, 0).unwrap();
    std::mem::forget(c); // killed: no clean close
    damage(&mut img, flushed);
    let cdev: Arc<dyn BlockDevice> = Arc::new(MemDevice::from_bytes(img, "cache"));
    let bdev: Arc<dyn BlockDevice> = Arc::new(MemDevice::from_bytes(back, "backing"));
    let (cache, report) = Cache::open(
        cdev.clone(),
        backings(std::slice::from_ref(&bdev)),
        OpenOptions {
            tunables: Tunables {
                writeback_enabled: false,
                ..Tunables::default()
            },
            ..Default::default()
        },
    )
    .unwrap();
    Rounds {
        cache,
        cdev,
        bdev,
        report,
        flushed,
    }
}

/// Byte offset in the image of segment `id` (48-segment device: 47 slots).
fn seg_off(id: u64) -> usize {
    SEG_BYTES * (1 + ((id - 1) % 47) as usize)
}

/// Reads block `b`: the serial it holds, or the error.
fn read_block(c: &Cache, b: u64) -> lc_cache::Result<u64> {
    let mut buf = vec![0u8; 4096];
    c.read(0, b * 4096, &mut buf)?;
    Ok(decode_sector(0, b * 8, &buf[..512]).expect("a tagged sector"))
}

#[test]
fn durable_segment_damaged_mid_log_fails_reads_of_its_data_never_serves_older() {
    // Round B's first segment gets a flipped byte in one line C rewrites (block 2) and
    // in four it does not (blocks 10..14); C rewrites blocks 0..8.
    let r = rounds(8, |img, f| {
        for b in [2, 10, 11, 12, 13] {
            img[seg_off(f[0] + 1) + 4096 + b * 4096 + 100] ^= 1;
        }
    });
    let hl = r.cache.geometry().header_len();
    assert_eq!(hl, 4096);
    assert_eq!(r.report.damaged.len(), 1, "{:?}", r.report);
    assert_eq!(r.report.damaged[0].0, r.flushed[0] + 1);
    assert!(
        r.report.replayed_segments > 0 && r.report.tail.is_none(),
        "{:?}",
        r.report
    );
    let damage = r.cache.stats().damage.expect("damage reported");
    assert_eq!(damage.segments, vec![r.flushed[0] + 1]);
    assert_eq!(damage.unknown_upto, 0);
    let lines = r.cache.geometry().lines_per_segment as u64;
    // B's first segment held blocks 0..lines; C rewrote 0..8 of them. Only the rotten
    // lines C did not rewrite are lost: the segment's intact lines are replayed.
    assert!(lines > 14);
    let lost: Vec<u64> = (0..BLOCKS)
        .filter(|&b| read_block(&r.cache, b).is_err())
        .collect();
    let expect: Vec<u64> = (10..14).collect();
    assert_eq!(lost, expect, "lost blocks");
    for b in 0..BLOCKS {
        match read_block(&r.cache, b) {
            Ok(v) => assert_eq!(v, if b < 8 { 3 } else { 2 }, "block {b}"),
            Err(e) => assert!(matches!(e, lc_cache::Error::Lost { dev: 0, .. }), "{e}"),
        }
    }
    assert_eq!(damage.lost_lines, vec![(0, expect.len() as u64)]);
    // A partial rewrite of a lost block makes only its sectors good again.
    let first = expect[0];
    let part = block(9, first);
    r.cache.write(0, first * 4096, &part[..512], true).unwrap();
    let mut s = vec![0u8; 512];
    r.cache.read(0, first * 4096, &mut s).unwrap();
    assert_eq!(decode_sector(0, first * 8, &s), Some(9));
    assert!(matches!(
        r.cache.read(0, first * 4096 + 512, &mut s),
        Err(lc_cache::Error::Lost { .. })
    ));
    // A full rewrite of another heals it.
    r.cache
        .write(0, (first + 1) * 4096, &block(9, first + 1), true)
        .unwrap();
    assert_eq!(read_block(&r.cache, first + 1).unwrap(), 9);
    // The evidence and the loss survive a restart (killed again).
    let mut img = vec![0u8; r.cdev.size() as usize];
    r.cdev.read_at(&mut img, 0).unwrap();
    let mut back = vec![0u8; r.bdev.size() as usize];
    r.bdev.read_at(&mut back, 0).unwrap();
    std::mem::forget(r.cache);
    let (c2, rep2, _) = open_image(img, &back).unwrap();
    assert_eq!(rep2.damaged.len(), 1, "{rep2:?}");
    c2.read(0, first * 4096, &mut s).unwrap();
    assert_eq!(decode_sector(0, first * 8, &s), Some(9));
    assert!(c2.read(0, first * 4096 + 512, &mut s).is_err());
    assert_eq!(read_block(&c2, first + 1).unwrap(), 9);
    let still: Vec<u64> = (0..BLOCKS)
        .filter(|&b| read_block(&c2, b).is_err())
        .collect();
    assert_eq!(
        still,
        expect
            .iter()
            .copied()
            .filter(|&b| b != first + 1)
            .collect::<Vec<_>>()
    );
    // A discard of a lost block makes it read zeros, like any discarded range.
    let gone = still[still.len() - 1];
    c2.discard(0, gone * 4096, 4096).unwrap();
    let mut z = vec![1u8; 4096];
    c2.read(0, gone * 4096, &mut z).unwrap();
    assert!(
        z.iter().all(|&b| b == 0),
        "discarded lost block reads zeros"
    );
    let still = &still[..still.len() - 1];
    // The operator accepts the loss: told what, then older data (round A) is readable.
    let accepted = c2.accept_loss();
    assert_eq!(accepted.lost_lines, vec![(0, still.len() as u64)]);
    assert_eq!(
        read_block(&c2, still[1]).unwrap(),
        1,
        "round A after accept-loss"
    );
    assert!(c2.stats().damage.is_some_and(|d| d.lost_lines.is_empty()));
}

#[test]
fn damaged_header_refuses_every_line_without_a_newer_copy() {
    // Round B's second segment loses its header: nobody knows which lines it held
    // (blocks lines..2*lines). C rewrites blocks 0..4.
    let r = rounds(4, |img, f| img[seg_off(f[0] + 2) + 70] ^= 0x80);
    assert_eq!(r.report.damaged.len(), 1, "{:?}", r.report);
    let d = r.cache.stats().damage.expect("damage");
    assert_eq!(d.unknown_upto, r.flushed[0] + 2);
    let lines = r.cache.geometry().lines_per_segment as u64;
    // Blocks whose newest copy is after the damaged segment read it; every other block
    // (its copy at or before the damaged one, or in it) is refused.
    for b in 0..BLOCKS {
        match read_block(&r.cache, b) {
            Ok(v) if b < 4 => assert_eq!(v, 3, "block {b}"),
            Ok(v) => assert!(b >= 2 * lines && v == 2, "block {b} read {v}"),
            Err(e) => assert!(
                (4..2 * lines).contains(&b) && matches!(e, lc_cache::Error::Lost { .. }),
                "{b}: {e}"
            ),
        }
    }
    // A partial write over such a line would merge unknown data: refused. A full one heals.
    let e = r.cache.write(0, 10 * 4096, &[7u8; 512], false).unwrap_err();
    assert!(matches!(e, lc_cache::Error::Lost { .. }), "{e}");
    r.cache.write(0, 10 * 4096, &block(8, 10), false).unwrap();
    assert_eq!(read_block(&r.cache, 10).unwrap(), 8);
    r.cache
        .write(0, 10 * 4096 + 512, &[7u8; 512], false)
        .unwrap();
}

#[test]
fn log_full_behind_damage_fails_writes_instead_of_hanging() {
    let r = rounds(4, |img, f| img[seg_off(f[0] + 1) + 6 * 4096] ^= 1);
    r.cache.set_tunable("writeback_enabled", "true").unwrap();
    r.cache.set_tunable("writeback_threshold", "0").unwrap();
    // Writeback cannot pass the damaged segment, so the ring fills: writes must fail
    // with LogBlocked within a bounded time, reads of intact data keep working.
    let started = std::time::Instant::now();
    let mut failed = None;
    for i in 0..4000u64 {
        let b = 128 + i % 100;
        if let Err(e) = r.cache.write(0, b * 4096, &block(20, b), true) {
            failed = Some(e);
            break;
        }
    }
    let e = failed.expect("writes went on although the log is full");
    assert!(matches!(e, lc_cache::Error::LogBlocked { .. }), "{e}");
    assert!(started.elapsed() < std::time::Duration::from_secs(30));
    assert_eq!(read_block(&r.cache, 0).unwrap(), 3);
    // A drain (the detach step) fails the same way instead of waiting forever.
    let e = r.cache.drain(0, &mut |_| {}).unwrap_err();
    assert!(matches!(e, lc_cache::Error::LogBlocked { .. }), "{e}");
    // Accepting the loss lets writeback pass the damaged segment; writes work again.
    r.cache.accept_loss();
    r.cache.write(0, 200 * 4096, &block(21, 200), true).unwrap();
    assert_eq!(read_block(&r.cache, 200).unwrap(), 21);
    assert!(
        r.cache.stats().damage.is_none(),
        "damaged slot passed by writeback"
    );
}
