//! Line checks on reads (docs/DESIGN.md): every line a read takes from the cache device
//! is checked against its line crc before any of it is returned or merged, whichever
//! path reads it (a whole line into the caller's buffer, a partial line through a
//! bounce, the caller's own reads of `start_read`, the older data a partial write
//! merges with). A rotten dirty copy fails the read as lost, loudly and from then on;
//! a rotten clean copy is read again from the backing device; the cache never fails.
//! The crcs of lines written since the open come from the appends and the flusher;
//! those of a restart are loaded from the headers (`corruption.rs` flips those).

mod common;

use std::sync::Arc;

use common::*;
use lc_cache::testing::HoldDevice;
use lc_cache::{BlockDevice, Cache, Error, MemDevice, Tunables};

const SEG: u32 = 64 << 10;
const LINE: u64 = 4096;

fn tunables() -> Tunables {
    Tunables {
        writeback_enabled: false,
        flush_interval_s: 0,
        ..Tunables::default()
    }
}

/// Flips one bit of byte `off` of `dev`.
fn flip(dev: &dyn BlockDevice, off: u64) {
    let mut b = vec![0u8; 512];
    dev.read_at(&mut b, off & !511).unwrap();
    b[(off % 512) as usize] ^= 0x04;
    dev.write_at(&b, off & !511).unwrap();
}

/// The bytes of `d`, whole.
fn image(d: &dyn BlockDevice) -> Vec<u8> {
    let mut b = vec![0u8; d.size() as usize];
    d.read_at(&mut b, 0).unwrap();
    b
}

/// A copy of `d` as it is now (a power cut of whatever serves it).
fn copy_of(d: &dyn BlockDevice) -> Arc<dyn BlockDevice> {
    Arc::new(MemDevice::from_bytes(image(d), "copy"))
}

/// Lines written (64 KiB segments hold 15).
const LINES: u64 = 12;

/// A fresh cache with lines `0..12` written as [`tagged_block`] serial 1 into segment
/// 1 (slot = line): lines 0..6 made durable by an append (their crcs come from it),
/// then lines 6..12 and the seal (theirs from the final header the flusher writes).
/// Every line is on the cache device and out of RAM.
fn twelve_lines() -> (Cache, Arc<HoldDevice>) {
    let (c, cache, _) = twelve_lines_with(tunables());
    (c, cache)
}

/// [`twelve_lines`] with tunables `t`; also returns the backing device.
/// The cache device counts its reads.
fn twelve_lines_with(t: Tunables) -> (Cache, Arc<HoldDevice>, Arc<dyn BlockDevice>) {
    let cache = Arc::new(HoldDevice::new(mem_cache(SEG as u64 * 8, 512, SEG), false));
    let backing: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(1 << 20));
    let c = open(cache.clone(), std::slice::from_ref(&backing), t, 4);
    assert!(LINES < c.geometry().lines_per_segment as u64);
    for l in 0..LINES {
        c.write(0, l * LINE, &tagged_block(1, l), false).unwrap();
        if l == 5 {
            c.flush().unwrap();
            assert_eq!(c.stats().appends, 1, "lines 0..6 appended");
        }
    }
    c.seal_now().unwrap();
    c.flush().unwrap();
    (c, cache, backing)
}

/// Line `line` read as the daemon's io_uring path does: the plan `start_read` must hand
/// out, the device reads into `b`, then `finish_read`'s verdict on the bytes.
fn uring_read(c: &Cache, cache: &dyn BlockDevice, line: u64, b: &mut [u8]) -> bool {
    let plan = c
        .start_read(0, line * LINE, &mut [&mut b[..]])
        .unwrap()
        .unwrap_or_else(|| panic!("line {line} not handed out"));
    for r in &plan.reads {
        cache
            .read_at(&mut b[r.pos..r.pos + r.len], r.device_offset)
            .unwrap();
    }
    c.finish_read(plan, &[&b[..]])
}

fn expect_lost(r: lc_cache::Result<()>, line: u64, what: &str) {
    match r {
        Err(Error::Lost { dev: 0, offset }) => {
            assert_eq!(offset / LINE, line, "{what}: lost at {offset}")
        }
        r => panic!("{what}: the rotten line {line} gave {r:?}"),
    }
}

#[test]
fn every_read_path_fails_a_rotten_line_instead_of_returning_it() {
    let (c, cache) = twelve_lines();
    let g = c.geometry();
    // One rotten line per path; 3 and 5 have their crcs from the append, 9 and 11
    // from the flusher's final header.
    for l in [3, 5, 9, 11] {
        flip(cache.as_ref(), g.line_offset(1, l as u32) + 777);
    }
    // (First: `start_read` declines a line once it is known lost.)
    // The caller's own device reads (the daemon's io_uring): the plan is handed out,
    // the check in `finish_read` refuses the bytes, and the full read reports the loss.
    let mut b = vec![0u8; LINE as usize];
    assert!(
        !uring_read(&c, cache.as_ref(), 11, &mut b),
        "rotten bytes accepted"
    );
    expect_lost(c.read(0, 11 * LINE, &mut b), 11, "read after finish_read");
    // A whole line read straight into the caller's buffers.
    expect_lost(c.read(0, 3 * LINE, &mut b), 3, "whole-line read");
    // A partial read (through the 4 KiB bounce).
    let mut s = vec![0u8; 512];
    expect_lost(c.read(0, 9 * LINE + 1024, &mut s), 9, "partial read");
    // A partial write would merge the line's other sectors into a new copy with a
    // fresh crc: it finds them rotten and carries none over. Its own sector reads the
    // new data; the others stay lost.
    c.write(0, 5 * LINE, &[0xabu8; 512], false).unwrap();
    c.read(0, 5 * LINE, &mut s).unwrap();
    assert!(s.iter().all(|&x| x == 0xab));
    expect_lost(
        c.read(0, 5 * LINE + 512, &mut s),
        5,
        "after the partial write",
    );
    expect_lost(
        c.read(0, 5 * LINE, &mut b),
        5,
        "whole line after the partial write",
    );
    // Exactly those four lines are lost, every other reads as written, nothing failed.
    assert_eq!(c.failure(), None);
    let d = c.stats().damage.expect("damage reported");
    assert_eq!(d.segments, vec![1]);
    let mut lost: Vec<u64> = d.lost_ranges.iter().map(|r| r.1 / 8).collect();
    lost.sort_unstable();
    assert_eq!(lost, vec![3, 5, 9, 11], "{d:?}");
    assert_eq!(c.stats().rotten_found, 4);
    for l in (0..LINES).filter(|l| ![3, 5, 9, 11].contains(l)) {
        c.read(0, l * LINE, &mut b).unwrap();
        assert!(b == tagged_block(1, l), "line {l}");
    }
    // A whole rewrite needs nothing old: it is taken, and reads the new data.
    c.write(0, 3 * LINE, &tagged_block(2, 3), false).unwrap();
    c.read(0, 3 * LINE, &mut b).unwrap();
    assert!(b == tagged_block(2, 3));
    c.check_line_counts().unwrap();
    c.close().unwrap();
}

/// A sound line is read by every path as written, including the caller's own reads:
/// the check does not refuse good data (and `start_read` hands out lines whose crc is
/// known).
#[test]
fn sound_lines_pass_the_check_on_every_path() {
    let (c, cache) = twelve_lines();
    // The crcs of lines written since the open are known: a read of a line is one
    // device read (no header read).
    let before = cache.reads();
    let mut b = vec![0u8; LINE as usize];
    c.read(0, 7 * LINE, &mut b).unwrap();
    c.read(0, 2 * LINE, &mut b).unwrap();
    assert_eq!(cache.reads() - before, 2);
    for l in 0..LINES {
        let mut b = vec![0u8; LINE as usize];
        assert!(
            uring_read(&c, cache.as_ref(), l, &mut b),
            "line {l} refused"
        );
        assert!(b == tagged_block(1, l), "line {l}");
        let mut s = vec![0u8; 512];
        c.read(0, l * LINE + 512, &mut s).unwrap();
        assert!(s[..] == tagged_block(1, l)[512..1024], "line {l}");
    }
    // The whole range in one read (runs of lines straight into the buffer).
    let mut all = vec![0u8; (LINES * LINE) as usize];
    c.read(0, 0, &mut all).unwrap();
    for l in 0..LINES {
        assert!(all[(l * LINE) as usize..((l + 1) * LINE) as usize] == tagged_block(1, l));
    }
    assert_eq!(c.stats().damage, None);
    c.close().unwrap();
}

/// A clean copy (promoted on a read miss) that rots is dropped, not lost: the read
/// that finds it returns the backing device's data.
#[test]
fn a_rotten_clean_copy_is_read_from_the_backing_device() {
    let cache = mem_cache(SEG as u64 * 8, 512, SEG);
    let data: Vec<u8> = (0..(1u64 << 20)).map(|i| (i * 7 % 251) as u8).collect();
    let backing: Arc<dyn BlockDevice> = Arc::new(MemDevice::from_bytes(data.clone(), "b"));
    let t = Tunables {
        read_promote_threshold: 1,
        ..tunables()
    };
    let c = open(cache.clone(), &[backing], t, 4);
    let mut b = vec![0u8; LINE as usize];
    c.read(0, 0, &mut b).unwrap();
    assert_eq!(c.stats().promoted_lines, 1);
    c.seal_now().unwrap();
    c.flush().unwrap();
    flip(cache.as_ref(), c.geometry().line_offset(1, 0) + 10);
    b.fill(0);
    c.read(0, 0, &mut b).unwrap();
    assert!(b[..] == data[..LINE as usize], "the backing device's data");
    assert_eq!(c.stats().damage, None);
    assert_eq!(c.stats().rotten_found, 1);
    assert_eq!(c.failure(), None);
    c.close().unwrap();
}

/// After a restart the crcs come from recovery's walk (a replayed segment) or, for a
/// segment indexed from a checkpoint, from its header read by the first read of one of
/// its lines: a line that rots after the restart fails its read either way.
#[test]
fn after_a_restart_a_line_that_rots_fails_its_read() {
    for checkpoint in [false, true] {
        let t = Tunables {
            checkpoint_interval_segments: 0,
            ..tunables()
        };
        let (c, cache, backing) = twelve_lines_with(t.clone());
        if checkpoint {
            assert!(c.checkpoint().unwrap());
        }
        let (cdev, bdev) = (copy_of(cache.as_ref()), copy_of(backing.as_ref()));
        let g = c.geometry();
        c.kill();
        let counted = Arc::new(HoldDevice::new(cdev.clone(), false));
        let (c, r) = open_report(counted.clone(), &[bdev], t, 4);
        assert_eq!(r.checkpoint.is_some(), checkpoint, "{r:?}");
        assert_eq!(r.replayed_segments > 0, !checkpoint, "{r:?}");
        // The first read of a line: its segment's header first only when the
        // checkpoint indexed it (the walk recorded the crcs of what it replayed).
        let mut b = vec![0u8; LINE as usize];
        let before = counted.reads();
        c.read(0, 0, &mut b).unwrap();
        assert!(b == tagged_block(1, 0));
        let header_reads = if checkpoint { 1 } else { 0 };
        assert_eq!(
            counted.reads() - before,
            1 + header_reads,
            "checkpoint {checkpoint}"
        );
        flip(cdev.as_ref(), g.line_offset(1, 4) + 5);
        expect_lost(c.read(0, 4 * LINE, &mut b), 4, "after the restart");
        for l in (0..LINES).filter(|&l| l != 4) {
            c.read(0, l * LINE, &mut b).unwrap();
            assert!(
                b == tagged_block(1, l),
                "line {l} (checkpoint {checkpoint})"
            );
        }
        c.kill();
    }
}

/// `lc check` (`check_device`) after a clean stop: the walk starts from the checkpoint,
/// so the lines it indexed are read and checked by the check itself. A sound log is
/// clean; a rotten line is reported lost, exactly that line; an unreadable header loses
/// every line indexed in its segment.
#[test]
fn check_device_reads_the_lines_a_checkpoint_indexed() {
    let t = Tunables {
        checkpoint_interval_segments: 0,
        ..tunables()
    };
    let (c, cache, _) = twelve_lines_with(t);
    assert!(c.checkpoint().unwrap());
    let g = c.geometry();
    let img = image(cache.as_ref());
    c.kill();
    let check = |img: &[u8]| {
        let dev = MemDevice::from_bytes(img.to_vec(), "copy");
        lc_cache::check_device(&dev).unwrap()
    };
    let r = check(&img);
    assert!(r.log.checkpoint.is_some(), "{:?}", r.log);
    assert_eq!(r.damage, None);
    assert_eq!(r.dirty_lines, vec![(0, LINES)]);
    // One line rotten.
    let mut bad = img.clone();
    bad[g.line_offset(1, 4) as usize + 99] ^= 1;
    let r = check(&bad);
    let d = r.damage.expect("damage found");
    assert_eq!(d.lost_ranges, vec![(0, 4 * 8, 8)]);
    assert_eq!(r.log.damaged.len(), 1);
    assert_eq!(r.log.damaged[0].0, 1);
    assert!(
        r.log.damaged[0].1.contains("line checksum"),
        "{:?}",
        r.log.damaged
    );
    assert_eq!(r.dirty_lines, vec![(0, LINES - 1)]);
    // Both header copies of segment 1 unreadable: every line indexed there is lost.
    let mut bad = img.clone();
    let at = g.segment_offset(1) as usize;
    for copy in 0..2 {
        bad[at + copy * g.header_len() + 40] ^= 1;
    }
    let r = check(&bad);
    let d = r.damage.expect("damage found");
    assert_eq!(d.lost_ranges, vec![(0, 0, LINES * 8)]);
    assert!(
        r.log.damaged[0].1.contains("header unreadable"),
        "{:?}",
        r.log.damaged
    );
}

/// `Cache::scrub` (`lc scrub`) reads every line the index holds on the cache device and
/// checks it: rot in lines nobody reads is found and dealt with as a read would (dirty:
/// lost; clean: dropped), nothing else is touched, and a sound cache scrubs clean.
#[test]
fn scrub_finds_rot_in_lines_nobody_reads() {
    let cache = Arc::new(HoldDevice::new(mem_cache(SEG as u64 * 8, 512, SEG), false));
    let data: Vec<u8> = (0..(1u64 << 20)).map(|i| (i * 13 % 251) as u8).collect();
    let backing: Arc<dyn BlockDevice> = Arc::new(MemDevice::from_bytes(data.clone(), "b"));
    let t = Tunables {
        read_promote_threshold: 1,
        ..tunables()
    };
    let c = open(cache.clone(), &[backing], t, 4);
    // 40 dirty lines (segments 1, 2 and 3), then line 100 promoted as a clean copy.
    for l in 0..40 {
        c.write(0, l * LINE, &tagged_block(1, l), false).unwrap();
    }
    let mut b = vec![0u8; LINE as usize];
    c.read(0, 100 * LINE, &mut b).unwrap();
    c.seal_now().unwrap();
    c.flush().unwrap();
    let lps = c.geometry().lines_per_segment as u64;
    let mut seen = Vec::new();
    let r = c.scrub(&mut |p| seen.push(p)).unwrap();
    assert_eq!((r.lines, r.rotten), (41, 0), "{r:?}");
    assert_eq!(seen.last().map(|p| (p.done, p.total)), Some((3, 3)));
    assert_eq!(c.stats().damage, None);
    // Rot in two dirty lines and in the clean copy (slot 40 % lps of segment 3).
    let g = c.geometry();
    flip(cache.as_ref(), g.line_offset(1, 3) + 1);
    flip(cache.as_ref(), g.line_offset(2, 0) + 4000);
    flip(cache.as_ref(), g.line_offset(3, (40 - 2 * lps) as u32) + 7);
    let reads = cache.reads();
    let r = c.scrub(&mut |_| {}).unwrap();
    assert_eq!((r.lines, r.rotten), (41, 3), "{r:?}");
    // A header and the live lines of each segment: 3 + 3 requests at most per segment
    // here (live lines close together are read by one request).
    assert!(
        cache.reads() - reads <= 6,
        "{} reads",
        cache.reads() - reads
    );
    let d = c.stats().damage.expect("damage");
    let mut lost: Vec<u64> = d.lost_ranges.iter().map(|r| r.1 / 8).collect();
    lost.sort_unstable();
    assert_eq!(lost, vec![3, lps]);
    assert_eq!(c.stats().rotten_found, 3, "the clean copy counts too");
    for l in 0..40 {
        let r = c.read(0, l * LINE, &mut b);
        if l == 3 || l == lps {
            expect_lost(r, l, "scrubbed");
        } else {
            r.unwrap();
            assert!(b == tagged_block(1, l), "line {l}");
        }
    }
    c.read(0, 100 * LINE, &mut b).unwrap();
    assert!(b[..] == data[100 * LINE as usize..101 * LINE as usize]);
    assert_eq!(c.failure(), None);
    c.close().unwrap();
}

/// Scrubs running while writers overwrite a small working set (so that the cleaner
/// moves lines and slots are reused under the scrub) find nothing in a sound cache.
#[test]
fn scrub_beside_writes_slot_reuse_and_cleaning_finds_no_false_rot() {
    let cache = mem_cache(SEG as u64 * 10, 512, SEG);
    let backing: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(1 << 20));
    let t = Tunables {
        writeback_enabled: true,
        ..Tunables::default()
    };
    let c = Arc::new(open(cache, &[backing], t, 4));
    // Cold lines, written once: the cleaner moves them when the ring comes round.
    for l in 100..110 {
        c.write(0, l * LINE, &tagged_block(1, l), false).unwrap();
    }
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (c, stop) = (c.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut serial = 1;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for l in 0..30 {
                    c.write(0, l * LINE, &tagged_block(serial, l), false)
                        .unwrap();
                }
                c.flush().unwrap();
                serial += 1;
            }
            serial - 1
        })
    };
    // At least 50 scrubs, and until the log went round its 10 slots six times.
    let (mut scrubbed, mut scrubs, t0) = (0, 0, std::time::Instant::now());
    while c.stats().open_segment_id < 60 || scrubs < 50 {
        scrubs += 1;
        assert!(t0.elapsed().as_secs() < 60, "{:?}", c.stats());
        let r = c.scrub(&mut |_| {}).unwrap();
        assert_eq!(r.rotten, 0, "{r:?}");
        scrubbed += r.lines;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let last = writer.join().unwrap();
    let s = c.stats();
    eprintln!(
        "{scrubs} scrubs, {scrubbed} lines, {last} rounds, moved {}, written back {}",
        s.moved_lines, s.written_back_lines
    );
    assert!(
        scrubbed > 0 && last > 10 && s.moved_lines + s.written_back_lines > 0,
        "scrubbed {scrubbed} lines, {last} rounds"
    );
    assert_eq!(c.stats().damage, None);
    let mut b = vec![0u8; LINE as usize];
    for l in 0..30 {
        c.read(0, l * LINE, &mut b).unwrap();
        assert!(b == tagged_block(last, l), "line {l}");
    }
    for l in 100..110 {
        c.read(0, l * LINE, &mut b).unwrap();
        assert!(b == tagged_block(1, l), "line {l}");
    }
}

/// A discard record's slot holds zeros nothing needs (the record is its header entry,
/// and it reads as zeros): rot there loses nothing, whichever path meets it, a read, the
/// scrub, recovery's walk of the segment it damaged or `lc check` of a checkpoint that
/// indexed it, writeback. The paths must agree: when writeback took such rot for a loss
/// but a read did not look, a restart read the backing device's older data where the
/// running cache had refused the line.
#[test]
fn a_rotten_discard_record_loses_nothing() {
    for checkpoint in [false, true] {
        rotten_discard_record(checkpoint);
    }
}

/// [`a_rotten_discard_record_loses_nothing`], the restart from a checkpoint covering the
/// record or walking the log.
fn rotten_discard_record(checkpoint: bool) {
    use lc_cache::format::{newest_header, Superblock, SB_COPY_SIZE};
    let t = Tunables {
        checkpoint_interval_segments: 0,
        ..tunables()
    };
    // Room for the log: nothing is written back before the copy below.
    let cache = Arc::new(HoldDevice::new(mem_cache(SEG as u64 * 32, 512, SEG), false));
    let older = vec![7u8; 1 << 20];
    let backing: Arc<dyn BlockDevice> = Arc::new(MemDevice::from_bytes(older, "b"));
    let c = open(cache.clone(), std::slice::from_ref(&backing), t.clone(), 4);
    for l in 0..LINES {
        c.write(0, l * LINE, &tagged_block(1, l), false).unwrap();
    }
    c.flush().unwrap();
    c.discard(0, 4 * LINE, LINE).unwrap();
    // Three segments more, and a superblock commit: the record's segment is proven
    // durable (else its rot is a torn tail, FORMAT.md "Why the proof is sound").
    let end = 4 * c.geometry().lines_per_segment as u64;
    for l in LINES..end {
        c.write(0, l * LINE, &tagged_block(1, l), false).unwrap();
    }
    c.seal_now().unwrap();
    c.flush().unwrap();
    c.commit_superblock().unwrap();
    if checkpoint {
        assert!(c.checkpoint().unwrap());
    }
    // Where the discard record lies, from the headers on the device.
    let g = c.geometry();
    let img = image(cache.as_ref());
    let sb = Superblock::decode(&img[..SB_COPY_SIZE], "c").unwrap();
    let (id, slot) = (1..4)
        .find_map(|id| {
            let off = g.segment_offset(id) as usize;
            let (h, _) = newest_header(&img[off..off + g.data_start()], &g, id, &sb.uuid)?;
            let slot = h.entries.iter().position(|e| e.is_tombstone())?;
            Some((id, slot as u32))
        })
        .expect("a discard record on the device");
    flip(cache.as_ref(), g.line_offset(id, slot) + 9);
    let (cdev, bdev) = (copy_of(cache.as_ref()), copy_of(backing.as_ref()));
    let reads_as_written = |c: &Cache, what: &str| {
        let mut b = vec![0u8; LINE as usize];
        for l in 0..end {
            c.read(0, l * LINE, &mut b).unwrap();
            let want = if l == 4 {
                vec![0u8; LINE as usize]
            } else {
                tagged_block(1, l)
            };
            assert!(b == want, "{what}: line {l}");
        }
        let lost = c.stats().damage.map(|d| d.lost_ranges);
        assert!(
            lost.as_ref().is_none_or(|l| l.is_empty()),
            "{what}: {lost:?}"
        );
    };
    reads_as_written(&c, "read");
    let r = c.scrub(&mut |_| {}).unwrap();
    assert_eq!(r.rotten, 0, "{r:?}");
    c.drain(0, &mut |_| {}).unwrap();
    reads_as_written(&c, "written back");
    c.close().unwrap();
    if checkpoint {
        // `lc check` reads and checks the lines the checkpoint indexed.
        let r = lc_cache::check_device(cdev.as_ref()).unwrap();
        assert!(r.log.checkpoint.is_some(), "{:?}", r.log);
        assert_eq!(r.damage, None);
    }
    // The restart: recovery's walk finds the segment's data crc failing and keeps the
    // record; or the checkpoint indexes it unread.
    let (c, r) = open_report(cdev, &[bdev], t, 4);
    let ctx = format!("checkpoint {checkpoint}: {r:?} (record: segment {id} slot {slot})");
    assert_eq!(r.checkpoint.is_some(), checkpoint, "{ctx}");
    let walked = r.damaged.first().map(|d| d.0);
    assert_eq!(walked, (!checkpoint).then_some(id), "{ctx}");
    reads_as_written(&c, &format!("after the restart, {ctx}"));
    let r = c.scrub(&mut |_| {}).unwrap();
    assert_eq!(r.rotten, 0, "{ctx}: {r:?}");
    c.drain(0, &mut |_| {}).unwrap();
    reads_as_written(&c, &format!("written back after the restart, {ctx}"));
    c.close().unwrap();
}

/// A lost line fails its reads until it is rewritten or the operator accepts the loss,
/// which may be long: meanwhile the rest of the cache keeps its fast paths. Reads of
/// other cached lines are still handed out for io_uring, read misses of other lines are
/// promoted, and a stream past the cutoff over other lines goes around the cache. The
/// lost line gets none of them: its read is declined there (the full read fails it as
/// lost), and a stream over it is cached, which heals it.
#[test]
fn a_lost_line_leaves_the_rest_of_the_cache_its_fast_paths() {
    let t = Tunables {
        read_promote_threshold: 1,
        // Always busy: streams past the cutoff go around from the start.
        writeback_threshold: 0,
        ..tunables()
    };
    let (c, cache, _) = twelve_lines_with(t);
    // (The twelve lines are a stream too: the cutoff only from here.)
    c.set_tunable("sequential_cutoff", &(2 * LINE).to_string())
        .unwrap();
    let g = c.geometry();
    flip(cache.as_ref(), g.line_offset(1, 4) + 5);
    let mut b = vec![0u8; LINE as usize];
    expect_lost(c.read(0, 4 * LINE, &mut b), 4, "the rotten line");
    assert!(c.stats().damage.is_some());
    // io_uring: another cached line is handed out and read; the lost one is declined.
    assert!(uring_read(&c, cache.as_ref(), 2, &mut b));
    assert!(b == tagged_block(1, 2));
    assert!(c
        .start_read(0, 4 * LINE, &mut [&mut b[..]])
        .unwrap()
        .is_none());
    // A read miss of another line is promoted.
    let promoted = c.stats().promoted_lines;
    c.read(0, 100 * LINE, &mut b).unwrap();
    assert_eq!(c.stats().promoted_lines, promoted + 1);
    // A stream over other lines goes around; one over the lost line is cached and
    // heals it.
    let stream = |first: u64, tag: u64| {
        for l in first..first + 6 {
            c.write(0, l * LINE, &tagged_block(tag, l), false).unwrap();
        }
    };
    stream(200, 2);
    let bypassed = c.stats().bypassed_bytes;
    assert!(bypassed >= 3 * LINE, "{bypassed}");
    stream(1, 3);
    assert_eq!(c.stats().bypassed_bytes, bypassed, "around the lost line");
    assert_eq!(c.stats().damage.map(|d| d.lost_ranges), Some(vec![]));
    for l in (200..206).chain(1..7) {
        c.read(0, l * LINE, &mut b).unwrap();
        assert!(
            b == tagged_block(if l < 200 { 3 } else { 2 }, l),
            "line {l}"
        );
    }
    c.close().unwrap();
}

/// The cache device of [`a_loss_found_while_writeback_reads_its_segment_holds_it_back`]:
/// reads of segment `seg` whole (writeback's) wait while `hold` is set; while `slow` is,
/// every other write but a superblock's waits 0.3 s (the loss records come late); and
/// at the first superblock commit whose writeback point passes `seg` it copies itself
/// and `backing` (a power cut right then).
struct WritebackGate {
    inner: Arc<dyn BlockDevice>,
    backing: Arc<dyn BlockDevice>,
    seg: u64,
    /// Segment `seg`'s byte offset and size: writeback's read of it.
    seg_read: (u64, usize),
    state: std::sync::Mutex<GateState>,
    cv: std::sync::Condvar,
    cut: std::sync::Mutex<Option<[Vec<u8>; 2]>>,
}

#[derive(Default)]
struct GateState {
    hold: bool,
    /// A read of the segment came (and waits while `hold`).
    held: bool,
    slow: bool,
}

impl WritebackGate {
    fn set(&self, f: impl FnOnce(&mut GateState)) {
        f(&mut self.state.lock().unwrap());
        self.cv.notify_all();
    }
}

impl BlockDevice for WritebackGate {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        if (offset, buf.len()) == self.seg_read {
            let mut s = self.state.lock().unwrap();
            s.held = true;
            self.cv.notify_all();
            while s.hold {
                s = self.cv.wait(s).unwrap();
            }
        }
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, data: &[u8], offset: u64) -> std::io::Result<()> {
        use lc_cache::format::{Superblock, SB_COPY_SIZE};
        let sb = (offset < 2 * SB_COPY_SIZE as u64)
            .then(|| Superblock::decode(&data[..SB_COPY_SIZE], "c").ok())
            .flatten();
        if sb.is_none() && self.state.lock().unwrap().slow {
            std::thread::sleep(std::time::Duration::from_millis(300));
        }
        self.inner.write_at(data, offset)?;
        if sb.is_some_and(|sb| sb.last_writeback_id >= self.seg) {
            let mut cut = self.cut.lock().unwrap();
            if cut.is_none() {
                *cut = Some([image(self.inner.as_ref()), image(self.backing.as_ref())]);
            }
        }
        Ok(())
    }
    fn flush(&self) -> std::io::Result<()> {
        self.inner.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.inner.discard(offset, len)
    }
    fn describe(&self) -> String {
        "gate".into()
    }
}

/// Writeback reads a segment, and before it decides what to write a read finds a line
/// of it rotten: the copy leaves the index, so writeback's own check never sees it, and
/// the batch used to pass the segment, committing its writeback point before any
/// checkpoint recorded the loss. A power cut right then restarted without the evidence
/// and without the record: the line read the backing device's older data. The batch
/// stops before the damage now, and passes it once the loss is recorded.
#[test]
fn a_loss_found_while_writeback_reads_its_segment_holds_it_back() {
    let mem = mem_cache(SEG as u64 * 8, 512, SEG);
    let backing: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(1 << 20));
    let probe = open(mem.clone(), std::slice::from_ref(&backing), tunables(), 4);
    let g = probe.geometry();
    probe.close().unwrap();
    let gate = Arc::new(WritebackGate {
        inner: mem.clone(),
        backing: backing.clone(),
        seg: 1,
        seg_read: (g.segment_offset(1), g.segment_size as usize),
        state: std::sync::Mutex::new(GateState::default()),
        cv: std::sync::Condvar::new(),
        cut: std::sync::Mutex::new(None),
    });
    let c = open(gate.clone(), std::slice::from_ref(&backing), tunables(), 4);
    for l in 0..LINES {
        c.write(0, l * LINE, &tagged_block(1, l), false).unwrap();
    }
    c.seal_now().unwrap();
    c.flush().unwrap();
    flip(mem.as_ref(), g.line_offset(1, 4) + 5);
    // Writeback reads segment 1 and waits there.
    gate.set(|s| s.hold = true);
    c.set_tunable("writeback_threshold", "0").unwrap();
    c.set_tunable("writeback_enabled", "true").unwrap();
    {
        let s = gate.state.lock().unwrap();
        let (s, t) = gate
            .cv
            .wait_timeout_while(s, std::time::Duration::from_secs(20), |s| !s.held)
            .unwrap();
        assert!(!t.timed_out(), "writeback never read segment 1");
        drop(s);
    }
    // The loss records come late; a read finds the loss; writeback goes on.
    gate.set(|s| s.slow = true);
    let mut b = vec![0u8; LINE as usize];
    expect_lost(c.read(0, 4 * LINE, &mut b), 4, "found by a read");
    gate.set(|s| s.hold = false);
    let t0 = std::time::Instant::now();
    while c.stats().last_writeback_id < 1 {
        assert!(
            t0.elapsed().as_secs() < 30,
            "writeback never passed the loss"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    gate.set(|s| s.slow = false);
    let [cache_img, backing_img] = gate.cut.lock().unwrap().take().expect("the cut");
    c.kill();
    let (c, r) = open_report(
        Arc::new(MemDevice::from_bytes(cache_img, "cut")),
        &[Arc::new(MemDevice::from_bytes(backing_img, "cut-b"))],
        tunables(),
        4,
    );
    assert!(r.loss_records.is_some(), "{r:?}");
    expect_lost(c.read(0, 4 * LINE, &mut b), 4, "after the cut");
    for l in (0..LINES).filter(|&l| l != 4) {
        c.read(0, l * LINE, &mut b).unwrap();
        assert!(b == tagged_block(1, l), "line {l}");
    }
    c.close().unwrap();
}
